#!/usr/bin/env python
"""Training throughput on the CPU: how close a diffusion training step gets to the machine's matmul peak, and why.

For one preset (default configs/busbra_evidence.yaml, 64 px) on a prepared pair dataset, on ONE thread and timed in
that thread's CPU time (so that other jobs on the machine change little):

  peak      a dense fp32 1024x1024 matmul, FLOP/s (the reference "peak")
  variants  eager, --channels_last and --compile (torch.compile, inductor): median CPU seconds per optimiser step,
            the step's FLOPs (torch.utils.flop_counter), and FLOPs / time / peak
  profile   torch.profiler over a few eager steps: self CPU time per operator family (convolution forward and
            backward, matmul / attention, normalisation, pointwise, optimiser, other) beside the family's share of
            the step's FLOPs (flop_counter on the same step), the family's own FLOP/s against the peak, and the
            number of operator calls: what stops the step from reaching the peak

Writes bench/throughput.json and prints a table. Not part of the test suite (a few minutes; --compile's warm-up is
most of it). Example:

  python bench/throughput.py --data_dir ./data/busbra64
  python bench/throughput.py --data_dir ./data/busbra64 --config configs/demo.yaml --variants eager,channels_last
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.cli import csv_list, positive_int, run_main  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.io import atomic_write_json  # noqa: E402

VARIANTS = {"eager": [], "channels_last": ["--channels_last"], "compile": ["--compile"]}
FAMILIES = (  # (family, substrings of aten operator names), first match wins
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "conv2d", "mkldnn_convolution")),
    ("matmul / attention", ("mm", "matmul", "linear", "attention", "bmm", "addmm", "baddbmm")),
    ("normalisation", ("group_norm", "native_group_norm", "layer_norm", "native_layer_norm")),
    ("optimiser", ("_fused_adamw", "adam", "_foreach")),
    ("pointwise", ("silu", "sigmoid", "mul", "add", "sub", "div", "gelu", "exp", "sqrt", "where", "copy_", "fill_",
                   "clamp", "neg", "pow", "cat", "sum", "mean", "threshold", "tanh")),
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="a prepared pair dataset (prepare_busi_dataset.py) at the "
                   "preset's image size")
    p.add_argument("--config", default="configs/busbra_evidence.yaml", help="training preset whose step is measured")
    p.add_argument("--variants", type=csv_list, default=list(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per variant (after warm-up)")
    p.add_argument("--profile_steps", type=positive_int, default=3, help="eager steps under torch.profiler")
    p.add_argument("--output", default=str(ROOT / "bench" / "throughput.json"), help="results JSON")
    return p


def cpu_median(fn, warm: int, reps: int) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def family(name: str) -> str:
    n = name.lower().removeprefix("aten::")
    for fam, keys in FAMILIES:
        if any(k in n for k in keys):
            return fam
    return "other"


def make_trainer(args, flags: list[str], out: Path):
    import torch
    from common.cli import config_from_flags
    from common.distributed import DistInfo
    from training.config import DiffusionTrainConfig
    from training.diffusion_trainer import DiffusionTrainer
    cfg = config_from_flags(DiffusionTrainConfig, ["--config", args.config, "--data_dir", args.data_dir,
                                                   "--output_dir", str(out), "--device", "cpu", *flags])
    return cfg, DiffusionTrainer(cfg, DistInfo(), torch.device("cpu"), "fp32", "throughput")


def flops_by_family(trainer) -> dict[str, float]:
    """FLOPs of one optimiser step per operator family (torch.utils.flop_counter on the real step)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        trainer.optimiser_step()
    out: dict[str, float] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        fam = family(str(op).removeprefix("aten."))
        out[fam] = out.get(fam, 0.0) + n
    return out


def profile_breakdown(trainer, steps: int, s_per_step: float, peak: float) -> dict:
    from torch.profiler import ProfilerActivity, profile
    fam_flops = flops_by_family(trainer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.optimiser_step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    fams: dict[str, dict] = {}
    for e in events:
        f = fams.setdefault(family(e.key), {"self_cpu_share": 0.0, "calls_per_step": 0.0})
        f["self_cpu_share"] += e.self_cpu_time_total / total
        f["calls_per_step"] += e.count / steps
    calls = sum(f["calls_per_step"] for f in fams.values())
    total_flops = sum(fam_flops.values()) or 1.0
    for name, f in fams.items():   # the family's share of the step's FLOPs, and its own FLOP/s against the peak
        fl = fam_flops.get(name, 0.0)
        f["flop_share"] = fl / total_flops
        seconds = f["self_cpu_share"] * s_per_step
        f["fraction_of_matmul_peak"] = fl / seconds / peak if fl and seconds else None
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"families": {k: {"self_cpu_share": round(v["self_cpu_share"], 4),
                             "flop_share": round(v["flop_share"], 4),
                             "fraction_of_matmul_peak": None if v["fraction_of_matmul_peak"] is None else
                             round(v["fraction_of_matmul_peak"], 3),
                             "calls_per_step": round(v["calls_per_step"], 1)} for k, v in
                         sorted(fams.items(), key=lambda kv: -kv[1]["self_cpu_share"])},
            "aten_calls_per_step": round(calls, 1),
            "mean_us_per_call": round(total / steps / max(calls, 1), 1),
            "top_operators": [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 4),
                               "calls_per_step": round(e.count / steps, 1),
                               "us_per_call": round(e.self_cpu_time_total / max(e.count, 1), 1)} for e in top]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        raise UserError(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if not (Path(args.data_dir) / "dataset.json").is_file():
        raise UserError(f"{args.data_dir}: not a prepared pair dataset (no dataset.json)")
    import tempfile

    import torch
    from training.plan import step_flops
    torch.set_num_threads(1)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    peak = 2 * n ** 3 / cpu_median(lambda: a @ b, 2, 9)
    print(f"matmul peak, 1 thread: {peak / 1e9:.1f} GFLOP/s", flush=True)
    result: dict = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"), "config": args.config, "threads": 1,
                    "timing": "median thread CPU time per optimiser step", "torch": torch.__version__,
                    "matmul_gflop_per_s": round(peak / 1e9, 1), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            t0 = time.time()
            cfg, trainer = make_trainer(args, VARIANTS[name], Path(tmp) / name)
            s = cpu_median(trainer.optimiser_step, 6 if name == "compile" else 3, args.steps)
            flops = step_flops(cfg)
            result["variants"][name] = {"s_per_step": round(s, 4), "gflop_per_step": round(flops / 1e9, 2),
                                        "fraction_of_matmul_peak": round(flops / s / peak, 3),
                                        "wall_s_incl_warmup": round(time.time() - t0, 1)}
            print(f"{name:14s} {s:.3f} s/step  {flops / 1e9:.1f} GFLOP/step  "
                  f"{flops / s / peak:.2f} of peak", flush=True)
            if name == "eager":
                result["profile"] = profile_breakdown(trainer, args.profile_steps, s, peak)
            del trainer
    prof = result.get("profile")
    if prof:
        print(f"eager profile: {prof['aten_calls_per_step']:.0f} aten calls per step, "
              f"{prof['mean_us_per_call']:.0f} us each on average")
        for fam, v in prof["families"].items():
            eff = "" if v["fraction_of_matmul_peak"] is None else f", {v['fraction_of_matmul_peak']:.2f} of peak"
            print(f"  {fam:22s} {100 * v['self_cpu_share']:5.1f}% of self CPU time, {100 * v['flop_share']:5.1f}% "
                  f"of FLOPs{eff}, {v['calls_per_step']:.0f} calls")
    atomic_write_json(Path(args.output), result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
