"""What the machine was doing while a run trained: the 1-minute load average and the speed of a fixed matmul on
the run's own threads, sampled at every log record. A CPU-minute budget buys fewer steps when the machine is
slower per CPU-second (other work on the cores, a busier host); these put that beside the step counts."""
from __future__ import annotations

import os
import time
from typing import Any

import torch

PROBE_SIZE = 512   # a 512 x 512 fp32 matmul: 0.27 GFLOP, ~1 ms on one core, 3 MB of operands (cache and memory)


def load_1min() -> float | None:
    """The 1-minute load average (runnable threads), or None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def matmul_gflops(n: int = PROBE_SIZE, reps: int = 3) -> float:
    """GFLOP/s of an n x n fp32 matmul on the CPU with torch's current threads (median of ``reps``). Constant
    operands: no random generator is touched, so a run's random stream is the same with or without the probe."""
    a = torch.full((n, n), 0.5)
    b = torch.full((n, n), 0.25)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)   # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / sorted(times)[len(times) // 2] / 1e9


def machine_stats(device: torch.device) -> dict[str, float]:
    """One sample: the load average, and on the CPU the matmul probe's GFLOP/s."""
    out: dict[str, float] = {}
    load = load_1min()
    if load is not None:
        out["load_1min"] = load
    if device.type == "cpu":
        out["probe_gflops"] = matmul_gflops()
    return out


class MachineLog:
    """Running means of the samples over a run (carried across resumes in last.pth)."""

    KEYS = ("load_1min", "probe_gflops")

    def __init__(self) -> None:
        self.sums = {k: 0.0 for k in self.KEYS}
        self.counts = {k: 0 for k in self.KEYS}

    def add(self, sample: dict[str, float]) -> None:
        for k in self.KEYS:
            if k in sample:
                self.sums[k] += float(sample[k])
                self.counts[k] += 1

    def summary(self) -> dict[str, Any]:
        """``<key>_mean`` (None if never sampled) and ``samples``."""
        return {**{f"{k}_mean": (self.sums[k] / self.counts[k] if self.counts[k] else None) for k in self.KEYS},
                "samples": max(self.counts.values())}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.KEYS:
            self.sums[k] = float(state.get("sums", {}).get(k, 0.0))
            self.counts[k] = int(state.get("counts", {}).get(k, 0))
