"""A plain U-Net baseline for 1-channel ultrasound, with a lesion-class head.

``UNet(num_labels=2, in_channels=1, base_width=32, depth=4, norm='batch', up='bilinear', dropout=0.0)``

* Encoder: ``depth`` down levels (2x2 max-pool), each a double 3x3 conv block
  (conv -> norm -> ReLU, twice). Widths ``base_width * 2**i``: 32, 64, 128, 256, 512 with the defaults.
* Decoder: ``up='bilinear'`` (bilinear x2 then a 1x1 conv halving the width) or ``up='transpose'``
  (2x2 transposed conv), concatenation with the skip, then a double conv block.
  Upsampling goes to the skip's exact size, so any input size works (no multiple-of-16 rule).
* ``norm``: ``'batch'`` (BatchNorm) or ``'group'`` (GroupNorm with 8 groups; better for batch sizes
  of 1-2 per device).
* Classification head: global average + max pooling of the bottleneck -> dropout -> linear ->
  ``num_labels`` logits (benign/malignant, or benign/malignant/normal with ``num_labels=3``).

Input: images ``[B, in_channels, H, W]`` in [0, 1] (the pair-dataset convention); the first
conv + norm absorbs the offset, so no extra normalisation is needed.

Forward returns ``{'mask_logits': [B,1,H,W], 'class_logits': [B,num_labels]}``.
``init_kwargs`` holds the JSON-serialisable constructor arguments (for self-describing checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UNet", "make_norm"]


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2D normalisation layer: ``'batch'`` or ``'group'`` (8 groups, or fewer if ``channels`` is small)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = 8
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int, norm: str):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample to the skip's size, concatenate, double conv."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: str, up: str):
        super().__init__()
        self.mode = up
        if up == "bilinear":
            self.reduce = nn.Conv2d(in_ch, in_ch // 2, 1)
        elif up == "transpose":
            self.reduce = nn.ConvTranspose2d(in_ch, in_ch // 2, 2, stride=2)
        else:
            raise ValueError(f"up must be 'bilinear' or 'transpose', got {up!r}")
        self.conv = DoubleConv(in_ch // 2 + skip_ch, out_ch, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        size = skip.shape[-2:]
        if self.mode == "bilinear":
            x = self.reduce(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        else:
            x = self.reduce(x)
            if x.shape[-2:] != size:  # odd input sizes: transposed conv gives 2*floor(n/2)
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net segmenter + bottleneck classification head (see the module docstring)."""

    segmenter_name = "unet"

    def __init__(
        self,
        num_labels: int = 2,
        in_channels: int = 1,
        base_width: int = 32,
        depth: int = 4,
        norm: str = "batch",
        up: str = "bilinear",
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.init_kwargs = dict(
            num_labels=int(num_labels), in_channels=int(in_channels), base_width=int(base_width),
            depth=int(depth), norm=str(norm), up=str(up), dropout=float(dropout),
        )
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], norm)
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], norm) for i in range(depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i], norm, up) for i in reversed(range(depth))
        )
        self.mask_head = nn.Conv2d(widths[0], 1, 1)
        self.class_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * widths[-1], num_labels))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # A slightly negative prior on the mask head: lesions cover ~10% of a BUSI image.
        nn.init.constant_(self.mask_head.bias, -2.0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        bottleneck = skips.pop()
        h = bottleneck
        for up in self.ups:
            h = up(h, skips.pop())
        pooled = torch.cat([bottleneck.mean(dim=(2, 3)), bottleneck.amax(dim=(2, 3))], dim=1)
        return {"mask_logits": self.mask_head(h), "class_logits": self.class_head(pooled)}
