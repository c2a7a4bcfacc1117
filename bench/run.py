#!/usr/bin/env python
"""Performance benchmarks, each figure a ratio against a peer measured in the same run (`make bench`).

Sections (the CPU sizes in brackets; a GPU run uses the larger sizes given by --gpu_* flags):

  matmul      dense fp32 (GPU: bf16) matmul FLOP/s on this device: the peak the other figures are divided by
  train       MedSegDiffV2 training step [64 px, batch 8, fp32]: model FLOPs per step counted with
              torch.utils.flop_counter / step time, as a fraction of the matmul FLOP/s; and images/s against
              diffusers' UNet2DModel (UNet2DPeer) sized to the same FLOPs per image (within 10%)
  memory      peak memory of a training step (CUDA: max allocated; CPU: activations saved for backward + weights,
              gradients, AdamW and EMA states), and the same estimate for configs/busi256.yaml and
              configs/busi512.yaml on a GPU (activations measured at batch 1 under bf16 autocast, x batch)
  data        samples/s the in-memory input pipeline supplies vs the samples/s a training step consumes
  prepare     prepare_busi_dataset.py throughput on a 300-case phantom at 64 px (images/s)

Prints a table and writes bench/results.json (the committed file is the latest CPU run). Realism per unit of compute
(recipes against the peer, budgets, samplers at equal N) is bench/quality.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.cli import run_main
from common.errors import UserError  # noqa: E402
from common.io import atomic_write_json  # noqa: E402
from common.precision import resolve_device  # noqa: E402

SECTIONS = ("matmul", "train", "memory", "data", "prepare")
# the benchmarked MedSegDiffV2 is the demo preset's network and recipe; the peer takes the same preset with
# --arch UNet2DPeer (peer_flags)
DEMO_PRESET = ROOT / "configs" / "demo.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------- matmul
def matmul_peak(device, dtype) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, 2, 7)
    return 2 * n ** 3 / sec


# ---------------------------------------------------------------------------------------------- models
def preset_config(preset: Path, *flags: str):
    """train_medsegdiff.py's configuration for ``--config preset`` plus ``flags`` (built without the script)."""
    from common.cli import config_from_flags
    from training.config import DiffusionTrainConfig
    return config_from_flags(DiffusionTrainConfig, ["--config", str(preset), *flags])


def peer_flags(c: int) -> list[str]:
    """diffusers' UNet2DModel with widths c, 2c, 2c, 4c in place of MedSegDiffV2."""
    return ["--arch", "UNet2DPeer", "--peer_channels", f"{c},{2 * c},{2 * c},{4 * c}"]


def build(img_size: int, flags: Sequence[str] = (), preset: Path = DEMO_PRESET) -> torch.nn.Module:
    """The network train_medsegdiff.py would build from ``preset`` and ``flags`` at ``img_size``."""
    from models.denoisers import build_denoiser
    from training.diffusion_trainer import denoiser_kwargs
    cfg = preset_config(preset, "--img_size", str(img_size), *flags)
    return build_denoiser(cfg.model.arch, denoiser_kwargs(cfg))


def flops_of(img_size: int, batch: int, flags: Sequence[str] = (), preset: Path = DEMO_PRESET) -> int:
    """FLOPs of one training step of the preset's network (training.plan.step_flops, meta tensors)."""
    from training.plan import step_flops
    return step_flops(preset_config(preset, "--img_size", str(img_size), "--batch_size", str(batch), *flags))


def equal_flops_peer(ours_flops: int, batch: int, img_size: int) -> tuple[int, int]:
    """UNet2DPeer base width whose step FLOPs are closest to ours (widths c, 2c, 2c, 4c; c a multiple of 8)."""
    best = None
    for c in range(8, 257, 8):
        f = flops_of(img_size, batch, peer_flags(c))
        if best is None or abs(f - ours_flops) < abs(best[1] - ours_flops):
            best = (c, f)
        if f > 1.3 * ours_flops:
            break
    return best


def make_trainer(tmp: Path, data_dir: Path, img_size: int, batch: int, device: torch.device, precision: str,
                 extra: Sequence[str] = ()):
    """The demo preset's DiffusionTrainer (``extra``: more train_medsegdiff.py flags, e.g. :func:`peer_flags`)."""
    from common.distributed import DistInfo
    from training.diffusion_trainer import DiffusionTrainer
    cfg = preset_config(DEMO_PRESET, "--data_dir", str(data_dir), "--output_dir", str(tmp), "--img_size",
                        str(img_size), "--batch_size", str(batch), "--device", str(device), *extra)
    return DiffusionTrainer(cfg, DistInfo(), device, precision, "bench")


def train_speed(trainer, device, reps: int) -> float:
    """Median seconds per optimiser step: the trainer's own batch making, loss, backward, AdamW and EMA."""
    return timed(trainer.optimiser_step, device, 3, reps)


def data_speed(trainer, device, reps: int = 50) -> float:
    return timed(lambda: trainer.make_batch(trainer.next_indices()), device, 3, reps)


# ---------------------------------------------------------------------------------------------- memory
def activation_bytes(model, batch: int, img_size: int) -> int:
    """Bytes of the activations autograd saves for the backward pass of one forward (fp32, CPU; each storage
    counted once, parameters excluded: they are in :func:`state_bytes`)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    x0 = torch.zeros(batch, 2, img_size, img_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x0, torch.full((batch,), 500, dtype=torch.long), torch.zeros(batch, dtype=torch.long),
              return_anchor=True)
    return sum(seen.values())


def state_bytes(model) -> int:
    """fp32 weights + gradients + AdamW (2 moments) + EMA copy."""
    return 5 * sum(p.numel() for p in model.parameters()) * 4


def preset_memory(path: Path) -> dict[str, object]:
    """GPU memory estimate of a preset: the activations saved for backward, measured at batch 1 on the CPU (fp32,
    and under bf16 autocast) x batch, plus fp32 weights, gradients, AdamW moments and EMA. Not included: the
    CUDA context, cuDNN workspaces and allocator fragmentation (typically 1-2 GiB more)."""
    cfg = preset_config(path)
    model = build(cfg.img_size, preset=path)
    batch = cfg.optim.train_batch_size
    act = activation_bytes(model, 1, cfg.img_size) * batch
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the same autocast policy as --precision bf16 on a GPU
        act_bf16 = activation_bytes(model, 1, cfg.img_size) * batch
    states = state_bytes(model)
    return {"preset": path.name, "img_size": cfg.img_size, "batch_size": batch,
            "patch_size": cfg.model.patch_size, "parameters": sum(p.numel() for p in model.parameters()),
            "activations_fp32_gib": act / 2**30, "activations_bf16_gib": act_bf16 / 2**30,
            "states_gib": states / 2**30, "total_bf16_gib_estimate": (act_bf16 + states) / 2**30}


# ---------------------------------------------------------------------------------------------- helpers
def run(cmd: list[str], log: Path, threads: int | None = None) -> str:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed (see {log}):\n{proc.stderr[-1500:]}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--output", default=str(ROOT / "bench" / "results.json"), help="results JSON")
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one, removed)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"--sections: unknown {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    precision = "bf16" if gpu else "fp32"
    size, batch = (256, 8) if gpu else (64, 8)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="busdiff_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, object] = {"device": torch.cuda.get_device_name(device) if gpu else
                              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
                              f"{torch.get_num_threads()} threads)",
                              "torch": torch.__version__, "precision": precision, "created": time.strftime("%F %T"),
                              "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    t_all = time.time()
    peak = None
    if "matmul" in sections or "train" in sections:
        peak = matmul_peak(device, torch.bfloat16 if gpu else torch.float32)
        res["matmul_flops_per_s"] = peak
        say(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({'bf16' if gpu else 'fp32'})")
    # a phantom pair dataset for the trainer-based sections
    data_dir = work / f"phantom{size}"
    if any(s in sections for s in ("train", "data", "memory")) and not (data_dir / "dataset.json").exists():
        run(["prepare_busi_dataset.py", "--phantom", "120", "--img_size", str(size), "--output_dir", str(data_dir)],
            work / "prepare_train.log")
    if "train" in sections:
        ours_flops = flops_of(size, batch)
        c, peer_flops = equal_flops_peer(ours_flops, batch, size)
        tr_ours = make_trainer(work / "t_ours", data_dir, size, batch, device, precision)
        tr_peer = make_trainer(work / "t_peer", data_dir, size, batch, device, precision, peer_flags(c))
        reps = 20 if gpu else 8
        s_ours = train_speed(tr_ours, device, reps)
        s_peer = train_speed(tr_peer, device, reps)
        s_ours = min(s_ours, train_speed(tr_ours, device, reps))   # interleaved second pass: the machine is shared
        s_peer = min(s_peer, train_speed(tr_peer, device, reps))
        res["train"] = {"img_size": size, "batch": batch, "ours_parameters": tr_ours.n_params,
                        "peer_parameters": tr_peer.n_params, "peer_block_out_channels": [c, 2 * c, 2 * c, 4 * c],
                        "ours_step_flops": ours_flops, "peer_step_flops": peer_flops,
                        "flops_ratio_peer_vs_ours": peer_flops / ours_flops,
                        "ours_s_per_step": s_ours, "peer_s_per_step": s_peer,
                        "ours_img_per_s": batch / s_ours, "peer_img_per_s": batch / s_peer}
        res["train_fraction_of_matmul_peak"] = ours_flops / s_ours / peak
        res["peer_fraction_of_matmul_peak"] = peer_flops / s_peer / peak
        # equal FLOPs per image within 10%: images/s ratio, scaled by the residual FLOP difference
        res["train_speedup_vs_unet2d"] = (s_peer / s_ours)
        res["train_speedup_vs_unet2d_per_flop"] = (ours_flops / s_ours) / (peer_flops / s_peer)
        say(f"train step ({size} px, batch {batch}): ours {tr_ours.n_params / 1e6:.2f}M params "
            f"{ours_flops / 1e9:.1f} GFLOP/step {s_ours:.3f} s/step = {res['train_fraction_of_matmul_peak']:.2f} of "
            f"matmul peak; UNet2DModel peer {tr_peer.n_params / 1e6:.2f}M params {peer_flops / 1e9:.1f} GFLOP/step "
            f"(x{peer_flops / ours_flops:.2f}) {s_peer:.3f} s/step = {res['peer_fraction_of_matmul_peak']:.2f}; "
            f"images/s ours/peer {res['train_speedup_vs_unet2d']:.2f}")
        if "data" in sections:
            s_data = data_speed(tr_ours, device)
            res["data"] = {"supplied_img_per_s": batch / s_data, "consumed_img_per_s": batch / s_ours,
                           "ratio": s_ours / s_data}
            say(f"input pipeline: {batch / s_data:.0f} img/s supplied vs {batch / s_ours:.1f} consumed "
                f"(x{s_ours / s_data:.0f} headroom)")
        del tr_ours, tr_peer
    if "memory" in sections:
        model = build(size)
        mem: dict[str, object] = {}
        if gpu:
            tr = make_trainer(work / "t_mem", data_dir, size, batch, device, precision)
            torch.cuda.reset_peak_memory_stats(device)
            train_speed(tr, device, 3)
            mem["measured_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            res["peak_memory_bytes"] = mem["measured_peak_bytes"]
        else:
            act = activation_bytes(model, batch, size)
            mem["activations_bytes"] = act
            mem["states_bytes"] = state_bytes(model)
            res["peak_memory_bytes"] = act + mem["states_bytes"]
        mem["presets"] = [preset_memory(ROOT / "configs" / n) for n in ("busi256.yaml", "busi512.yaml")
                          if (ROOT / "configs" / n).exists()]
        res["memory"] = mem
        say(f"training-step memory ({size} px, batch {batch}): {res['peak_memory_bytes'] / 2**20:.0f} MiB"
            + ("" if gpu else " (activations saved for backward + weights, grads, AdamW, EMA)"))
        for p in mem["presets"]:
            say(f"  {p['preset']}: {p['parameters'] / 1e6:.1f}M params, activations {p['activations_fp32_gib']:.1f} GiB "
                f"fp32 ({p['activations_bf16_gib']:.1f} bf16 autocast) + states {p['states_gib']:.1f} GiB = "
                f"~{p['total_bf16_gib_estimate']:.1f} GiB in bf16 at batch {p['batch_size']} (estimate)")
    if "prepare" in sections:
        raw = work / "prep"
        run(["prepare_busi_dataset.py", "--phantom", "300", "--img_size", "64", "--output_dir", str(raw)],
            work / "prepare_raw.log")
        t0 = time.time()
        run(["prepare_busi_dataset.py", "--input_dir", str(raw / "raw"), "--img_size", "64", "--output_dir",
             str(work / "prep_again")], work / "prepare_timed.log")
        dt = time.time() - t0
        n = json.loads((work / "prep_again" / "dataset.json").read_text())["n_pairs"]
        res["prepare_images_per_s"] = n / dt
        say(f"prepare_busi_dataset.py: {n} images in {dt:.1f} s = {n / dt:.0f} images/s (whole command, 300 raw "
            "phantom cases at 64 px)")
    res["total_seconds"] = round(time.time() - t_all, 1)
    res["summary_lines"] = lines
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, res)
    print(f"\nwrote {args.output} ({res['total_seconds'] / 60:.1f} min)")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
