"""Device and numeric-precision choices shared by the training and generation scripts."""
from __future__ import annotations

import contextlib

import torch

from common.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")


def gpu_present_but_unusable() -> str | None:
    """Why CUDA is unusable although this machine seems to have an NVIDIA GPU (driver files present), or None."""
    import os
    import shutil
    if torch.cuda.is_available():
        return None
    driver = None
    try:
        with open("/proc/driver/nvidia/version") as fh:
            driver = fh.readline().strip()
    except OSError:
        pass
    if driver is None and shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
        return None
    built = torch.version.cuda or "none (a CPU-only build of torch)"
    return (f"an NVIDIA GPU seems present (driver: {driver or 'nvidia-smi found'}) but torch cannot use it: torch "
            f"{torch.__version__} was built for CUDA {built}. Install the torch wheel that matches the driver (see "
            "https://pytorch.org/get-started/locally/), or pass --device cpu to run on the CPU on purpose")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' -> the local CUDA device when there is one, else the CPU (with a loud warning when a GPU seems present
    but CUDA is unusable, e.g. a driver older than torch's CUDA build)."""
    if name == "auto":
        why = gpu_present_but_unusable()
        if why:
            import sys
            print(f"WARNING: --device auto falls back to the CPU: {why}", file=sys.stderr, flush=True)
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
