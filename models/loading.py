"""Loading a checkpoint into a model: the joint diffusion model (its EMA weights and diffusion process) and a
trained segmenter. Both read self-describing checkpoints (class name + constructor kwargs), so nothing about the
architecture has to be retyped, and both load with ``weights_only=True`` (a file can never run code)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from common.checkpoint import load_checkpoint
from common.errors import UserError
from models.denoisers import build_denoiser
from models.diffusion import DiffusionConfig, JointDiffusion


def load_diffusion_checkpoint(path: str | Path, device: torch.device | str = "cpu"
                              ) -> tuple[nn.Module, JointDiffusion, dict[str, Any]]:
    """Rebuild the EMA denoiser and its diffusion process from a checkpoint (best_model.pth, last.pth or a
    snapshot) or from a folder export_model.py wrote (diffusers format, models/hub.py): the same network, noise
    process and record (``class_names``, ``img_size``, ``step``, ...), so both give the same samples."""
    if Path(path).is_dir():
        from models.hub import load_export
        return load_export(path, device)
    ckpt = load_checkpoint(path, expect_kind="diffusion")
    try:
        model = build_denoiser(ckpt["model_class"], ckpt["model_kwargs"])
        model.load_state_dict(ckpt["ema"])
        diffusion = JointDiffusion(DiffusionConfig(**ckpt["diffusion"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: checkpoint does not match any model this code can build "
                        f"({str(exc).splitlines()[0][:200]})") from None
    model.to(device).eval()
    return model, diffusion, ckpt


def checkpoint_sha256(path: str | Path) -> str:
    """Fingerprint of what ``load_diffusion_checkpoint(path)`` loads: the .pth file's sha256, or for an exported
    folder a sha256 over its denoiser files (configs and weights)."""
    if Path(path).is_dir():
        from models.hub import export_fingerprint
        return export_fingerprint(path)
    from common.io import sha256_file
    return sha256_file(path)


SEGMENTER_BUILDER: Callable | None = None  # tests put a stand-in here; None = models.segmenters.build_segmenter


def load_segmenter(run_dir, builder: Callable | None = None):
    """The segmenter of a run directory (``best_model.pth``), in eval mode, and its training image size.

    Contract (train_segmentation.py): ``load_checkpoint(path, expect_kind="segmenter")`` -> ``model_name``,
    ``model_kwargs``, ``model`` (state dict), ``config`` (with ``img_size``); forward on [B,1,S,S] floats in [0,1]
    returns a dict with ``mask_logits`` [B,1,S,S].
    """
    path = Path(run_dir) / "best_model.pth"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: segmentation run folder not found")
    ckpt = load_checkpoint(path, expect_kind="segmenter")
    builder = builder or SEGMENTER_BUILDER
    if builder is None:
        from models.segmenters import build_segmenter as builder
    try:
        model = builder(ckpt["model_name"], **ckpt.get("model_kwargs", {}))
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: cannot rebuild the segmenter ({str(exc).splitlines()[0][:160]})") from None
    return model.eval(), int(ckpt.get("config", {}).get("img_size", 0) or 0)
