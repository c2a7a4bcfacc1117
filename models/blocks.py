"""Shared building blocks for the project's networks (ADM / guided-diffusion style, modern PyTorch).

Everything here is written for throughput as well as clarity:
- normalisation goes through the fused functional kernels (``F.group_norm`` / ``F.layer_norm``),
  conditioning is applied with one ``torch.addcmul`` per tensor, attention through
  ``F.scaled_dot_product_attention``;
- no Python loops over the batch, no host synchronisation, no data-dependent control flow, so the
  blocks run under ``torch.autocast``, with ``channels_last`` tensors and under ``torch.compile``;
- every block is per-sample: nothing mixes information between the samples of a batch.

Conditioning convention: blocks that take ``emb`` expect the conditioning vector ALREADY passed
through SiLU (the owner computes ``F.silu(emb)`` once per forward instead of once per block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "norm_groups",
    "zero_module",
    "GroupNorm",
    "ResBlock",
    "Downsample",
    "Upsample",
    "TransformerBlock",
    "sincos_pos_embed_2d",
    "maybe_checkpoint",
]


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups for ``channels``: 32 when it divides, else the largest divisor."""
    return math.gcd(max_groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (used for residual branch outputs) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose group count is picked from the channel count (see :func:`norm_groups`).

    Computes in the input dtype when called directly; under autocast torch keeps group_norm in fp32.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(norm_groups(channels), channels, eps=eps)


def maybe_checkpoint(enabled: bool, fn, *args):
    """Run ``fn(*args)``, under non-reentrant activation checkpointing when ``enabled`` and grad is on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock(nn.Module):
    """Residual block: GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv3x3.

    ``scale, shift`` come from a linear map of the (SiLU-activated) conditioning vector, as in ADM's
    ``use_scale_shift_norm``. The last conv is zero-initialised so the block starts as (a projection
    of) the identity. ``forward(x, emb, skip=None)``: with ``skip`` the block consumes
    ``cat([x, skip], 1)`` (a UNet decoder input); doing the concat inside the block lets activation
    checkpointing recompute it instead of storing it.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = GroupNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.norm2 = GroupNorm(out_channels)
        self.dropout = float(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, skip: torch.Tensor | None = None):
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        h = F.silu(self.norm1(x))
        h = self.conv1(h)
        h = self.norm2(h)
        if self.emb_proj is not None:
            scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, h, scale + 1.0)
        h = F.silu(h)
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, self.dropout, training=True)
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (self-attention + MLP) with adaLN-zero modulation.

    ``forward(x, mod)``: ``x`` is ``[B, N, C]`` tokens and ``mod`` is ``[B, 6 * C]``, a modulation
    vector computed once by the owner from the conditioning embedding and shared by every block of a
    stack ("adaLN-single", PixArt-alpha); each block adds its own learned ``[6, C]`` table to it, so
    blocks still differ while the stack needs one ``E x 6C`` linear map instead of one per block.
    The six rows are shift/scale/gate of the attention and MLP sub-blocks. With the shared map and
    the tables zero-initialised (DiT's adaLN-zero) the block is the identity at initialisation.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"transformer width {dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        hidden = int(dim * mlp_ratio)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.mod_table = nn.Parameter(torch.zeros(6, dim))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        mod = mod.view(b, 6, c) + self.mod_table
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, :, None, :].unbind(1)
        h = torch.addcmul(shift1, F.layer_norm(x, (c,), eps=self.eps), scale1 + 1.0)
        q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = torch.addcmul(x, gate1, self.proj(a))
        h = torch.addcmul(shift2, F.layer_norm(x, (c,), eps=self.eps), scale2 + 1.0)
        return torch.addcmul(x, gate2, self.fc2(F.gelu(self.fc1(h), approximate="tanh")))


def sincos_pos_embed_2d(dim: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding, ``[height * width, dim]`` (row-major tokens).

    Half of the channels encode the row, half the column (MAE / DiT layout); ``dim`` must be a
    multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positional embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float64),
        torch.arange(width, device=device, dtype=torch.float64),
        indexing="ij",
    )
    ay = ys.reshape(-1, 1) * omega[None]
    ax = xs.reshape(-1, 1) * omega[None]
    emb = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return emb.to(dtype)
