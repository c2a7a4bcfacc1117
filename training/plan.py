"""Starting a diffusion training run, and ``--dry-run``: every input check a real start makes (data, sizes, classes,
device, precision, the network builds), then the plan (pairs, steps per epoch, total steps, parameters, FLOPs per
step, a memory and time estimate) without training. A failed check is one line and exit status 2."""
from __future__ import annotations

import json
import sys
from typing import Any

import torch

from common.distributed import cleanup, init_distributed
from common.errors import UserError
from common.options import flat
from common.outputs import OutputLock, check_kind, check_separate, check_writable
from common.precision import gpu_present_but_unusable, resolve_device, resolve_precision
from models.denoisers import build_denoiser
from models.diffusion import JointDiffusion
from training.config import DiffusionTrainConfig
from training.diffusion_trainer import DiffusionTrainer, class_names_for, denoiser_kwargs, with_dataset_size

CPU_FLOPS_PER_CORE = 1.0e11     # ~100 GFLOP/s of training per core (measured here: 0.08-0.13 TFLOP/s, one thread)


def start_training(cfg: DiffusionTrainConfig, command: str) -> dict[str, Any]:
    out = cfg.run.output_dir
    check_separate(out, {"--data_dir": cfg.data_dir})
    check_writable(out)
    check_kind(out, "diffusion-run")
    dist = init_distributed(cfg.run.device)
    try:
        with OutputLock(out, active=dist.is_main):
            device = resolve_device(cfg.run.device, dist.local_rank if dist.enabled else None)
            precision = resolve_precision(cfg.run.mixed_precision, device)
            if cfg.run.device == "auto" and device.type == "cpu" and gpu_present_but_unusable():
                _warn_cpu_time(cfg)
            torch.manual_seed(cfg.run.seed)
            trainer = DiffusionTrainer(cfg, dist, device, precision, command)
            return trainer.fit()
    finally:
        cleanup()


def _warn_cpu_time(cfg: DiffusionTrainConfig) -> None:
    """The fallback to the CPU, with what this run would cost there (resolve_device already said why)."""
    try:
        cfg2, ds = with_dataset_size(cfg)
        train = len(ds.select(split="train", labels=class_names_for(cfg2.num_classes)))
        per_step = cfg2.optim.train_batch_size * cfg2.optim.gradient_accumulation_steps
        total = cfg2.run.max_train_steps or cfg2.run.num_epochs * max(1, train // per_step)
        hours = step_flops(cfg2) * total / CPU_FLOPS_PER_CORE / max(1, torch.get_num_threads()) / 3600
    except (UserError, ValueError, RuntimeError):
        return
    print(f"WARNING: this run ({total} steps) would take about {hours:.1f} hours on this CPU "
          f"({torch.get_num_threads()} threads at ~{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s each); stop it (Ctrl-C) "
          "and fix CUDA unless that is what you want", file=sys.stderr, flush=True)


def step_flops(cfg: DiffusionTrainConfig, batch: int | None = None) -> int:
    """FLOPs of one optimiser step (forward + backward; self-conditioning's extra forward counted at its rate 1/2),
    counted by torch.utils.flop_counter on meta tensors (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    b = batch or cfg.optim.train_batch_size * cfg.optim.gradient_accumulation_steps
    size = cfg.img_size
    with torch.device("meta"):
        model = build_denoiser(cfg.model.arch, denoiser_kwargs(cfg))
    diffusion = JointDiffusion(cfg.diffusion)
    diffusion._alphas = diffusion._alphas.to("meta")
    diffusion.scheduler.alphas_cumprod = diffusion.scheduler.alphas_cumprod.to("meta")
    x0 = torch.zeros(b, diffusion.config.channels, size, size, device="meta")
    y = torch.zeros(b, dtype=torch.long, device="meta")
    t = (torch.full((b,), 0.5, device="meta") if diffusion.edm else
         torch.full((b,), 500, dtype=torch.long, device="meta"))
    total = 0.0
    for sc, weight in ((False, 0.5), (True, 0.5)) if diffusion.config.self_condition else ((False, 1.0),):
        with FlopCounterMode(display=False) as counter:
            loss, _ = diffusion.loss(model, x0, y, timesteps=t, noise=torch.zeros_like(x0), self_cond=sc)
            loss.backward()
        total += weight * counter.get_total_flops()
    return int(total)


def dry_run(cfg: DiffusionTrainConfig, command: str) -> int:
    cfg, ds = with_dataset_size(cfg)
    names = class_names_for(cfg.num_classes)
    train = ds.select(split="train", labels=names)
    missing = [c for c in names if not any(r["label"] == c for r in train)]
    if missing:
        raise UserError(f"{cfg.data_dir}: no training pairs of class {', '.join(missing)}")
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.mixed_precision, device)
    try:
        with torch.device("meta"):
            model = build_denoiser(cfg.model.arch, denoiser_kwargs(cfg))
    except ValueError as exc:
        raise UserError(f"model configuration: {exc}") from None
    params = sum(p.numel() for p in model.parameters())
    o, r = cfg.optim, cfg.run
    world = 1
    per_step = o.train_batch_size * o.gradient_accumulation_steps * world
    if len(train) < o.train_batch_size:
        raise UserError(f"{cfg.data_dir}: {len(train)} training pairs are fewer than one batch "
                        f"({o.train_batch_size}); lower --train_batch_size")
    steps_per_epoch = max(1, len(train) // per_step)
    total = r.max_train_steps or r.num_epochs * steps_per_epoch
    flops = step_flops(cfg)
    plan = {"dataset": cfg.data_dir, "img_size": cfg.img_size, "train_pairs": len(train),
            "val_pairs": len(ds.select(split="val", labels=names)), "classes": names, "parameters": params,
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "epochs": round(total / steps_per_epoch, 2),
            "device": str(device), "precision": precision, "step_tflop": flops / 1e12,
            "total_pflop": flops * total / 1e15,
            "cpu_hours_estimate": flops * total / CPU_FLOPS_PER_CORE / max(1, torch.get_num_threads()) / 3600,
            "weights_optimizer_ema_gib": 5 * params * 4 / 2**30}
    if r.budget_minutes:
        plan["budget_minutes"] = r.budget_minutes
    print(json.dumps({"config": flat(cfg), "command": command, "plan": plan}, indent=2, sort_keys=True))
    print(f"dry run: inputs checked; {total} steps of {per_step} pairs ({plan['epochs']:g} epochs), "
          f"{params / 1e6:.1f}M parameters, {flops / 1e12:.2f} TFLOP per step on {device} ({precision}); "
          + (f"about {plan['cpu_hours_estimate']:.1f} CPU hours at ~{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core"
             if device.type == "cpu" else f"about {flops * total / 0.3 / 1e15 / 3600 / _peak(device):.2f} GPU hours "
             "at 30% of the GPU's bf16 peak"), file=sys.stderr)
    return 0


def _peak(device: torch.device) -> float:
    """Dense bf16 peak of the GPU in PFLOP/s (a table of common ones; 300 TFLOP/s otherwise)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for key, peak in (("H200", 0.989), ("H100", 0.989), ("A100", 0.312), ("L40", 0.181), ("4090", 0.165),
                      ("A10", 0.125), ("V100", 0.125), ("T4", 0.065)):
        if key in name:
            return peak
    return 0.3
