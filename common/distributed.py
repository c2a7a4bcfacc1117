"""Multi-process training under ``torchrun`` (DDP); a plain ``python script.py`` is one process.

``torchrun --nproc_per_node N`` sets RANK / WORLD_SIZE / LOCAL_RANK; we initialise the NCCL backend on
GPUs and gloo on the CPU (which is how the DDP path is tested on a machine without a GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision for everyone (e.g. 'stop now')."""
    return bool(broadcast_value(float(flag), info, device)) if info.enabled else flag


def broadcast_value(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's number for everyone (e.g. the spent fraction of a time budget, whose clocks differ per process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())
