"""Denoisers by name, so a checkpoint can rebuild its network from (class name, constructor kwargs).

* ``MedSegDiffV2`` — this project's joint image+mask denoiser (models/medsegdiff_v2.py).
* ``UNet2DPeer`` — diffusers' ``UNet2DModel`` behind the same call signature: the peer that the
  benchmarks train with the same loop for like-for-like comparisons.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def diffusers_unet():
    """diffusers' UNet2DModel class, or one clear line naming the broken install. (diffusers imports its optional
    integrations lazily; with peft and an older transformers installed beside a newer huggingface-hub, importing the
    model raises a RuntimeError about huggingface-hub's version — seen on a lent GPU machine.)"""
    from common.errors import UserError
    try:
        from diffusers import UNet2DModel
        return UNet2DModel
    except (ImportError, RuntimeError) as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        cause = [ln for ln in str(exc).splitlines() if "is required" in ln]
        raise UserError(f"diffusers' UNet2DModel (the peer network) cannot be imported: {(cause or [last])[0]} "
                        "(install the versions in requirements.txt)") from None


class UNet2DPeer(nn.Module):
    """diffusers ``UNet2DModel`` with a class embedding (one extra index = the null class)."""

    def __init__(self, img_size: int = 64, in_channels: int = 1, out_channels: int = 1, num_classes: int = 2,
                 block_out_channels: tuple[int, ...] | list[int] = (32, 64, 64, 128), layers_per_block: int = 2,
                 attention_levels: tuple[int, ...] | list[int] = (3,), self_condition: bool = False):
        super().__init__()
        UNet2DModel = diffusers_unet()
        chans = tuple(int(c) for c in block_out_channels)
        attn = set(int(a) for a in attention_levels)
        down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(chans)))
        up = tuple("AttnUpBlock2D" if (len(chans) - 1 - i) in attn else "UpBlock2D" for i in range(len(chans)))
        self.self_condition = bool(self_condition)
        io = in_channels + out_channels
        self.net = UNet2DModel(sample_size=img_size, in_channels=io * (2 if self.self_condition else 1),
                               out_channels=in_channels + out_channels, block_out_channels=chans,
                               layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
                               num_class_embeds=num_classes + 1,
                               norm_num_groups=32 if all(c % 32 == 0 for c in chans) else 8)
        self.num_classes = num_classes
        self.null_class = num_classes
        self.init_kwargs = {"img_size": img_size, "in_channels": in_channels, "out_channels": out_channels,
                            "num_classes": num_classes, "block_out_channels": list(chans),
                            "layers_per_block": layers_per_block, "attention_levels": sorted(attn),
                            "self_condition": self.self_condition}

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor,
                return_anchor: bool = False):
        out = self.net(x, timesteps, class_labels=class_labels).sample
        return (out, None) if return_anchor else out


def denoiser_classes() -> dict[str, type[nn.Module]]:
    from models.medsegdiff_v2 import MedSegDiffV2
    return {"MedSegDiffV2": MedSegDiffV2, "UNet2DPeer": UNet2DPeer}


def build_denoiser(class_name: str, kwargs: dict[str, Any]) -> nn.Module:
    classes = denoiser_classes()
    if class_name not in classes:
        raise ValueError(f"unknown denoiser class {class_name!r} (known: {', '.join(classes)})")
    return classes[class_name](**kwargs)
