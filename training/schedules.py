"""Learning-rate schedules that run over the whole run, however the run is ended.

A run ends at ``max_train_steps`` or at ``budget_minutes`` of its budget clock, whichever comes first. diffusers'
``get_scheduler`` decays over a step count, so a run ended by a time budget (where the step count is not known in
advance) could only train at a constant rate: a benchmark of fixed budgets then measured a schedule that no
step-limited preset uses. Here a schedule's progress is the larger of the step fraction and the budget fraction,
so ``cosine`` and ``linear`` reach zero when the budget ends, exactly as they reach zero at the last step of a
step-limited run. The shapes follow diffusers' (``cosine``: half a cosine after a linear warm-up; ``linear``;
``constant_with_warmup``) and equal them step for step when no budget is set (tests/test_schedules.py).

``warmup_stable_decay`` holds the peak rate and decays it linearly to zero over the run's last ``decay_fraction``
(Hägele et al. 2024, "Scaling laws and compute-optimal training beyond fixed training durations"): snapshots taken
before the decay starts are those of a constant-rate run, so one run gives the curve and a decayed end point.

With a budget the rate depends on the budget clock, so two runs of one seed differ once their clocks do; a
resumed run continues from the restored clock (the harness keeps it in last.pth).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

# the multiplier of the peak learning rate after the warm-up, at progress p (0 to 1) of the run, with the
# warm-up-stable-decay fraction f
SHAPE_FACTORS: dict[str, Callable[[float, float], float]] = {
    "cosine": lambda p, f: 0.5 * (1.0 + math.cos(math.pi * p)),
    "constant_with_warmup": lambda p, f: 1.0,
    "linear": lambda p, f: 1.0 - p,
    "warmup_stable_decay": lambda p, f: min(1.0, (1.0 - p) / f),
}
SHAPES = tuple(SHAPE_FACTORS)


def run_progress(step: int, warmup: int, total_steps: int, budget_fraction: Callable[[], float] | None) -> float:
    """How far the run is past its warm-up, 0 to 1: the larger of the step fraction and the budget fraction."""
    by_steps = (step - warmup) / max(1, total_steps - warmup)
    by_budget = budget_fraction() if budget_fraction is not None else 0.0
    return min(1.0, max(0.0, by_steps, by_budget))


def make_lr_schedule(optimizer: torch.optim.Optimizer, shape: str, warmup_steps: int, total_steps: int,
                     budget_fraction: Callable[[], float] | None = None,
                     decay_fraction: float = 0.2) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (diffusers' schedules are LambdaLRs too, so checkpoints of either load into the other):
    linear warm-up over ``warmup_steps``, then ``shape`` over the rest of the run. ``budget_fraction`` returns the
    spent fraction of a time budget (None: the run is ended by steps only)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown learning-rate schedule {shape!r}; known: {', '.join(SHAPES)}")
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")

    shape_factor = SHAPE_FACTORS[shape]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return shape_factor(run_progress(step, warmup_steps, total_steps, budget_fraction), decay_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
