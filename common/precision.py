"""Device and numeric-precision choices shared by the training and generation scripts."""
from __future__ import annotations

import contextlib

import torch

from common.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' -> the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N)") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, else fp32; fp16 on the CPU is refused."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for mixed precision; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated GPU memory in GiB (empty on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
