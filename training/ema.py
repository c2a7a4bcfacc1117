"""Exponential moving average of a model's weights, kept as a named module (so its state_dict is the
model's own and a checkpoint's EMA weights load straight into a fresh model).

With ``warmup`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so short runs
(and the first thousands of steps of long ones) are not dominated by the random initialisation.

``PowerEMA`` is the power-function EMA of Karras et al. 2024 ("Analyzing and improving the training dynamics of
diffusion models", EDM2): after t updates the decay is ``(1 - 1/t) ** (gamma + 1)``, so the average always spans the
same fraction of training, of relative width ``std`` (sigma_rel), whatever the run's length. The warm-up cap above
is close to one of these (gamma ~ 8, sigma_rel ~ 0.09): a fixed decay below the cap is the only thing that differs.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, warmup_cap(self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])


class PowerEMA(EMA):
    """A power-function EMA of relative width ``std`` (EDM2's sigma_rel: the standard deviation of its averaging
    profile as a fraction of the run); no warm-up is needed, as the first update copies the weights."""

    def __init__(self, model: nn.Module, std: float):
        super().__init__(model, decay=0.0, warmup=False)
        self.std = float(std)
        self.gamma = power_gamma(self.std)

    def current_decay(self) -> float:
        t = self.num_updates + 1   # the update about to be made is the t-th
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "std": self.std}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.std = float(state["std"])
        self.gamma = power_gamma(self.std)


MAX_POWER_STD = 0.2886   # sigma_rel at gamma = 0 (sqrt(1/12)); wider averages have no power-function profile


def power_gamma(std: float) -> float:
    """The exponent gamma of the power-function EMA of relative width ``std``: the largest root of
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), i.e. of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) with s = sigma_rel^-2."""
    if not 0.0 < std <= MAX_POWER_STD:
        raise ValueError(f"power EMA width sigma_rel must be in (0, {MAX_POWER_STD}], got {std}")
    import numpy as np
    s = std ** -2
    return float(max(r.real for r in np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]) if abs(r.imag) < 1e-9))


def warmup_cap(n: int) -> float:
    """The highest decay the warm-up allows after n updates."""
    return (1.0 + n) / (10.0 + n)


def steps_until_decay(decay: float) -> int:
    """The update count from which the warm-up cap (1 + n) / (10 + n) no longer lowers `decay`."""
    return max(0, math.ceil(round(9.0 / (1.0 - decay) - 10.0, 6))) if decay < 1.0 else 0   # round: 0.9999 is not exact


def warmup_note(decay: float, total_steps: int) -> str:
    """A sentence when a run of `total_steps` never reaches its EMA decay (empty otherwise): until then the EMA
    averages over a window that grows with the step count, which is what a short run actually gets."""
    need = steps_until_decay(decay)
    if total_steps >= need:
        return ""
    final = warmup_cap(total_steps)
    return (f"EMA decay {decay:g} takes effect after {need} updates, beyond this run's {total_steps} steps: the "
            f"warm-up cap (1+n)/(10+n) sets the decay throughout ({final:.5f} at the last step)")
