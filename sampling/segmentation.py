"""Segmentation by the joint diffusion model (what the published MedSegDiff-V2 does), in train_segmentation.py's
metrics schema; segment_with_diffusion.py is its command line.

For every image of a split the image channel is held fixed while K masks are sampled (replacement conditioning,
null class: the test label is unknown); the K binary masks are fused by majority vote, and the per-pixel
disagreement 4 p (1 - p) is written as an uncertainty map. With ``classify`` the benign/malignant label is the
class under which the model denoises the image and its fused mask best (fixed noise and noise levels for both
classes: a "diffusion classifier").
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from common.io import write_png
from common.options import flat, option
from common.outputs import OutputLock, check_kind, check_separate, check_writable, claim
from common.precision import resolve_device
from common.progress import progress_bar
from common.rundir import RunDir
from common.visual import save_grid
from data.pairs import TUMOUR_LABELS, open_pair_dataset
from metrics.seg_eval import evaluate_predictions, write_per_image_csv
from models.diffusion import DEFAULT_STEPS, SAMPLERS
from models.loading import load_diffusion_checkpoint
from sampling.generation import JointSampler


@dataclass
class SegmentConfig:
    checkpoint_path: str = option("./checkpoints/best_model.pth", "diffusion checkpoint written by "
                                  "train_medsegdiff.py (or a folder export_model.py wrote)")
    data_dir: str = option("./data/busi_processed", "pair dataset with the images to segment")
    split: str = option("test", "which split to segment", choices=("train", "val", "test"))
    output_dir: str = option("./checkpoints/diffusion_segmentation", "predictions, uncertainty maps and metrics")
    ensemble: int = option(5, "masks sampled per image (fused by majority vote)", low=1, high=1000)
    sampler: str = option("ddim", "diffusers scheduler", choices=SAMPLERS)
    steps: int = option(10, "denoising steps; 0 = the sampler's default (" +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")", low=0, high=10000)
    resample: int = option(8, "RePaint resampling: repeat every step this many times (ddim / ddpm only; costs that "
                           "many times the network evaluations) so the sampled mask can follow the image", low=1,
                           high=100)
    classify: bool = option(True, "also predict benign/malignant by the class-conditional denoising error")
    classify_timesteps: int = option(16, "noise levels of the class comparison", low=1, high=1000)
    seed: int = option(0, "member k of image i uses seed + ensemble*i + k", low=0, high=2**31 - 1)
    batch_size: int = option(16, "samples drawn together", low=1, high=4096)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if self.resample > 1 and self.sampler == "dpmsolver++":
            raise ValueError("--resample needs --sampler ddim or ddpm (DPM-Solver++ keeps a history of steps)")


def segment(cfg: SegmentConfig, command: str = "") -> dict[str, Any]:
    """Segment the split, write predictions / uncertainty / per-image CSV / samples, then metrics.json last."""
    out = cfg.output_dir
    check_separate(out, {"--checkpoint_path": cfg.checkpoint_path, "--data_dir": cfg.data_dir})
    check_writable(out)
    check_kind(out, "diffusion-segmentation")
    with OutputLock(out):
        return _segment(cfg, command)


def _segment(cfg: SegmentConfig, command: str) -> dict[str, Any]:
    t0 = time.time()
    device = resolve_device(cfg.device)
    model, diffusion, ckpt = load_diffusion_checkpoint(cfg.checkpoint_path, device)
    ds = open_pair_dataset(cfg.data_dir)
    if ds.img_size != int(ckpt["img_size"]):
        raise UserError(f"{cfg.data_dir}: images are {ds.img_size} px but the checkpoint draws {ckpt['img_size']} px; "
                        f"prepare the data with --img_size {ckpt['img_size']}")
    class_names = list(ckpt["class_names"])
    rows = ds.select(split=cfg.split, labels=class_names)
    if not rows:
        raise UserError(f"{cfg.data_dir}: no {'/'.join(class_names)} pairs in the {cfg.split} split")
    run = RunDir(out := cfg.output_dir)
    claim(out, "diffusion-segmentation", command)
    run.file("metrics.json").unlink(missing_ok=True)   # the results below replace any earlier ones: never mixed
    images, gt = ds.load(rows)
    steps = cfg.steps or DEFAULT_STEPS[cfg.sampler]
    sampler = JointSampler(model, diffusion, ckpt, device, "fp32", cfg.sampler, steps, 1.0, cfg.resample)
    null = len(class_names)
    k, n = cfg.ensemble, len(rows)
    items = [(i, m) for i in range(n) for m in range(k)]
    votes = np.zeros((n,) + images.shape[1:], np.float32)
    image_channel = diffusion.to_model_space(torch.from_numpy(images)[:, None],
                                             torch.zeros_like(torch.from_numpy(images))[:, None])[:, :1]
    bar = progress_bar(total=len(items), desc="segment", unit="sample")
    t_sample = time.time()
    for s in range(0, len(items), cfg.batch_size):
        batch = items[s:s + cfg.batch_size]
        _, masks = sampler.draw([null] * len(batch), [cfg.seed + k * i + m for i, m in batch],
                                known=image_channel[[i for i, _ in batch]], known_channels=[0])
        for (i, _), mask in zip(batch, masks):
            votes[i] += mask
        bar.update(len(batch))
    bar.close()
    sample_seconds = time.time() - t_sample
    prob = votes / k
    pred = prob > 0.5
    pred_labels = prob_mal = errors = None
    if cfg.classify and set(TUMOUR_LABELS) <= set(class_names):
        x0 = diffusion.to_model_space(torch.from_numpy(images)[:, None], torch.from_numpy(pred.astype(np.uint8))[:, None])
        errors = diffusion.class_errors(model, x0.to(device), len(class_names), cfg.classify_timesteps, cfg.seed)
        pred_labels = [class_names[int(j)] for j in errors.argmin(1)]
        b, m = class_names.index("benign"), class_names.index("malignant")
        prob_mal = torch.sigmoid((errors[:, b] - errors[:, m]) / errors.mean().clamp(min=1e-8) * 10).tolist()
    for sub in ("predictions", "uncertainty"):
        run.file(sub).mkdir(parents=True, exist_ok=True)
    for r, p_mask, p in zip(rows, pred, prob):
        write_png(run.file("predictions") / f"{r['id']}.png", p_mask.astype(np.uint8) * 255, atomic=True)
        write_png(run.file("uncertainty") / f"{r['id']}.png", np.round(255 * 4 * p * (1 - p)).astype(np.uint8),
                  atomic=True)
    section, per_image = evaluate_predictions(pred, gt, [r["label"] for r in rows], [r["id"] for r in rows],
                                              [r["source"] for r in rows], pred_labels, prob_mal, class_names)
    write_per_image_csv(run.file(f"per_image_{cfg.split}.csv"), per_image)
    sel = torch.linspace(0, n - 1, min(8, n)).round().long().unique()
    save_grid(run.file("samples") / f"{cfg.split}_predictions.png",
              torch.from_numpy(images[sel])[:, None].repeat(2, 1, 1, 1),
              torch.cat([torch.from_numpy(gt[sel] > 0), torch.from_numpy(pred[sel])])[:, None], rows=2)
    metrics = {
        "model": f"{ckpt['model_class']} (diffusion segmentation, {k}-sample majority vote)",
        "checkpoint_path": str(Path(cfg.checkpoint_path).resolve()), "checkpoint_step": int(ckpt.get("step", -1)),
        "class_names": class_names, "img_size": ds.img_size, "split": cfg.split, "ensemble": k,
        "sampler": cfg.sampler, "steps": steps, "resample": cfg.resample,
        "conditioning": "null class (the test label is not used)",
        "classification": "argmin over classes of the denoising error of (image, fused mask) at fixed noise and "
                          f"{cfg.classify_timesteps} noise levels" if errors is not None else None,
        "rules": {"fusion": "majority vote of the ensemble's binary masks; uncertainty = 4 p (1 - p)",
                  "prob_malignant": "a monotone score (sigmoid of the scaled error difference), for AUC only"},
        "seconds_per_image": sample_seconds / n, "n_test_images": section["n_images"],
        "dataset": {"path": str(Path(cfg.data_dir).resolve()), "n_pairs": len(ds)},
        cfg.split: section, "command": command, "config": flat(cfg),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": time.time() - t0,
    }
    run.write_metrics(metrics)
    o = section["overall"]
    cls = section.get("classification") or {}
    bacc = f"; balanced accuracy {cls['balanced_accuracy']:.3f}" if cls.get("balanced_accuracy") is not None else ""
    run.log(f"{cfg.split}: {n} images, {k} samples each ({cfg.sampler}-{steps}, {sample_seconds / n:.2f} s/image): "
            f"Dice {o['dice']['mean']:.4f} ± {o['dice']['std']:.4f}, IoU {o['iou']['mean']:.4f}, "
            f"HD95 {o['hd95']['mean']:.2f} px{bacc}")
    run.log(f"wrote {run.file('metrics.json')}, {run.file(f'per_image_{cfg.split}.csv')}, predictions/ and "
            "uncertainty/")
    return metrics
