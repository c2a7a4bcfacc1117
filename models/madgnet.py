"""MADGNet (Nam et al., CVPR 2024) for 1-channel ultrasound, written from the paper's description.

Architecture (``MADGNet(num_labels=2, ...)``):

* **Encoder** -- ``timm.create_model(encoder_name, features_only=True)`` (default ``resnest50d``): five
  feature maps at strides 2, 4, 8, 16, 32 with 64, 256, 512, 1024, 2048 channels.
* **Skips** -- the four shallower maps are reduced to ``skip_channels`` (64) by 1x1 conv + BN + ReLU.
* **Decoder** -- four stages of widths ``decoder_channels`` (256, 128, 64, 32), deepest first. Each:
  upsample x2 (bilinear, to the skip's exact size), concatenate the skip, 3x3 conv, **MFMSA**, 3x3 conv.
* **MFMSA** (multi-frequency multi-scale attention): ``scale_branches`` (3) branches; branch ``s``
  average-pools the input by ``2**s`` (unless that leaves fewer than ``min_resolution`` rows/cols),
  applies a grouped 3x3 conv with dilation ``s+1`` and a 1x1 conv (to ``max(C / 2**s, min_channel)``
  channels), then *multi-frequency channel attention* (below), then a *spatial gate* -- a 1x1 conv +
  sigmoid map ``a`` mixing ``f*(1-a)*alpha + f*a*beta`` with learnt scalars -- and a 3x3 conv back to
  ``C``; branch outputs are upsampled back, averaged, and added to the input (residual).
* **Multi-frequency channel attention** -- the feature is pooled to ``dct_size x dct_size``, multiplied
  by ``num_frequencies`` fixed 2D DCT-II basis images, and each product is reduced by spatial
  average, max and min pooling; the three descriptors (each averaged over frequencies) pass through one
  shared bottleneck MLP, are summed, and a sigmoid gives per-channel weights.
  Frequencies: the ``num_frequencies`` lowest (u, v) pairs in zig-zag order (sorted by u+v, then u).
  The paper/code pick the "top-16" set from FcaNet's ImageNet ranking; the low-frequency set is this
  implementation's own choice. ``dct_size`` is fixed (7) instead of tracking each stage's 224-px
  resolution, so the cost is independent of the input size.
* **Cascaded sub-decoders** (one per stage, deep supervision) -- 1x1 heads for a mask *map*, a
  *distance* map and a *boundary* map; the distance head is gated by sigmoid(map), the boundary head
  by sigmoid(distance); all three are upsampled to the input size and fed back in reverse:
  ``distance += sigmoid(boundary)``, ``map += sigmoid(distance)``.
* **Classification head** -- global average pooling of the deepest encoder feature -> dropout ->
  linear -> ``num_labels`` logits.

Input: ``[B, 1, H, W]`` images in [0, 1] (any H, W >= 32; no multiple-of-32 rule). The model repeats
the grey channel to 3 (``in_chans=3``, the default, so ImageNet weights are used unchanged) or lets timm
sum the first conv's weights (``in_chans=1``), then normalises with the encoder's ImageNet mean/std.

Forward returns a dict: ``mask_logits`` [B,1,H,W] (stage-4 map), ``class_logits`` [B,num_labels], and
for deep supervision ``maps``, ``distances``, ``boundaries`` -- lists of four [B,1,H,W] tensors, deepest
stage first (the last entry of ``maps`` is ``mask_logits``). ``distances`` regress a normalised
distance transform (raw values, target in [0, 1]); ``boundaries`` are logits of a boundary map (see
``models.segmenters``).

Encoder weights:

* ``encoder_weights='imagenet'`` (default): timm's normal pretrained path (Hugging Face hub download or
  cache). If it fails (offline), a :class:`EncoderWeightsError` says to pass
  ``encoder_checkpoint=PATH`` or ``encoder_weights='none'``.
* ``encoder_checkpoint=PATH``: a local ``.pth`` / ``.safetensors`` state dict of timm's
  ``encoder_name`` (a full classifier's state dict, or a features-only one; ``module.``/``encoder.``
  prefixes and ``state_dict``/``model`` wrappers are accepted; the classifier ``fc.*`` is dropped).
  Loaded with ``weights_only=True``; every encoder tensor must be present or it raises.
* ``encoder_weights='none'``: random initialisation.

``init_kwargs`` rebuilds the architecture with ``encoder_weights='none'`` and no checkpoint (the
trained weights travel in the state dict, so rebuilding a saved model never downloads anything);
where the encoder weights originally came from is kept in ``encoder_source``.
"""

from __future__ import annotations

import math
import os

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import unsafe_load_message

__all__ = [
    "MADGNet",
    "MFMSABlock",
    "MultiFrequencyChannelAttention",
    "EncoderWeightsError",
    "create_encoder",
    "load_encoder_checkpoint",
    "dct_basis",
]


class EncoderWeightsError(RuntimeError):
    """The pretrained encoder weights could not be obtained."""


# ----------------------------------------------------------------------------------------------
# Multi-frequency channel attention and the MFMSA block
# ----------------------------------------------------------------------------------------------


def dct_basis(size: int, num_frequencies: int) -> torch.Tensor:
    """``[num_frequencies, size, size]`` orthonormal 2D DCT-II basis images, lowest frequencies first.

    Frequencies (u, v) are ordered by ``u + v`` then ``u`` (zig-zag); basis (u, v) at pixel (x, y) is
    ``c(u) c(v) cos(pi u (x + 1/2) / N) cos(pi v (y + 1/2) / N)`` with ``c(0) = sqrt(1/N)`` and
    ``c(k) = sqrt(2/N)`` otherwise.
    """
    if not 1 <= num_frequencies <= size * size:
        raise ValueError(f"num_frequencies must be in [1, {size * size}], got {num_frequencies}")
    pairs = sorted(((u, v) for u in range(size) for v in range(size)), key=lambda p: (p[0] + p[1], p[0]))
    pos = torch.arange(size, dtype=torch.float64) + 0.5
    k = torch.arange(size, dtype=torch.float64)
    one_d = torch.cos(math.pi * k[:, None] * pos[None, :] / size)  # [freq, pos]
    one_d *= torch.where(k == 0, math.sqrt(1.0 / size), math.sqrt(2.0 / size))[:, None]
    basis = torch.stack([one_d[u][:, None] * one_d[v][None, :] for u, v in pairs[:num_frequencies]])
    return basis.float()


class MultiFrequencyChannelAttention(nn.Module):
    """Channel attention from DCT-weighted {avg, max, min} pooled descriptors (see module docstring)."""

    def __init__(self, channels: int, num_frequencies: int = 16, dct_size: int = 7, reduction: int = 16):
        super().__init__()
        self.dct_size = dct_size
        self.register_buffer("basis", dct_basis(dct_size, num_frequencies), persistent=False)
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        pooled = x
        if x.shape[-2:] != (self.dct_size, self.dct_size):
            pooled = F.adaptive_avg_pool2d(x, self.dct_size)
        # [B, C, F, s*s]: every channel times every basis image
        spectral = (pooled.unsqueeze(2) * self.basis.to(x.dtype)).flatten(3)
        descriptors = torch.stack(
            [spectral.mean(-1).mean(-1), spectral.amax(-1).mean(-1), spectral.amin(-1).mean(-1)]
        )  # [3, B, C]
        weights = self.mlp(descriptors.reshape(3 * b, c, 1, 1)).reshape(3, b, c).sum(0)
        return x * torch.sigmoid(weights)[:, :, None, None]


def _conv_bn_relu(in_ch: int, out_ch: int, k: int = 3, *, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class _ScaleBranch(nn.Module):
    def __init__(self, channels: int, scale: int, min_channel: int, groups: int, num_frequencies: int, dct_size: int):
        super().__init__()
        inner = max(channels // 2**scale, min_channel)
        self.pool = 2**scale
        self.context = nn.Sequential(
            _conv_bn_relu(channels, channels, 3, dilation=scale + 1, groups=math.gcd(channels, groups)),
            _conv_bn_relu(channels, inner, 1),
        )
        self.attention = MultiFrequencyChannelAttention(inner, num_frequencies, dct_size)
        self.gate = nn.Conv2d(inner, 1, 1, bias=False)
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.ones(1))
        self.project = _conv_bn_relu(inner, channels, 3)

    def forward(self, x: torch.Tensor, min_resolution: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = x
        if self.pool > 1 and min(h, w) // self.pool >= min_resolution:
            f = F.avg_pool2d(x, self.pool)
        f = self.attention(self.context(f))
        a = torch.sigmoid(self.gate(f))
        f = self.project(f * (1 - a) * self.alpha + f * a * self.beta)
        if f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        return f


class MFMSABlock(nn.Module):
    """Multi-frequency multi-scale attention: averaged scale branches plus a residual."""

    def __init__(
        self,
        channels: int,
        scale_branches: int = 3,
        num_frequencies: int = 16,
        min_channel: int = 32,
        min_resolution: int = 8,
        groups: int = 32,
        dct_size: int = 7,
    ):
        super().__init__()
        self.min_resolution = min_resolution
        self.branches = nn.ModuleList(
            _ScaleBranch(channels, s, min_channel, groups, num_frequencies, dct_size) for s in range(scale_branches)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = sum(branch(x, self.min_resolution) for branch in self.branches)
        return x + out / len(self.branches)


class _DecoderStage(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, mfmsa: dict):
        super().__init__()
        self.conv_in = _conv_bn_relu(in_ch + skip_ch, out_ch)
        self.attention = MFMSABlock(out_ch, **mfmsa)
        self.conv_out = _conv_bn_relu(out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_out(self.attention(self.conv_in(torch.cat([x, skip], dim=1))))


class _CascadedHeads(nn.Module):
    """Map -> distance -> boundary heads, each gated by the previous one, fused back at full size."""

    def __init__(self, channels: int):
        super().__init__()
        self.map = nn.Conv2d(channels, 1, 1)
        self.distance = nn.Conv2d(channels, 1, 1)
        self.boundary = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.map(x)
        d = self.distance(x) * torch.sigmoid(m)
        b = self.boundary(x) * torch.sigmoid(d)
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        b = up(b)
        d = up(d) + torch.sigmoid(b)
        m = up(m) + torch.sigmoid(d)
        return m, d, b


# ----------------------------------------------------------------------------------------------
# Encoder construction and local checkpoints
# ----------------------------------------------------------------------------------------------


def load_encoder_checkpoint(encoder: nn.Module, path: str, in_chans: int = 3) -> None:
    """Load a local timm state dict (``.pth``/``.pt``/``.bin``/``.safetensors``) into a features-only encoder.

    Accepts a full classifier state dict (its ``fc.*`` is dropped), a features-only one, or one whose keys
    carry a ``module.`` / ``_orig_mod.`` / ``encoder.`` prefix, wrapped or not in ``state_dict`` / ``model``.
    A 3-channel first conv is adapted to ``in_chans`` with timm's ``adapt_input_conv``.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is absent or does not match.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder checkpoint {path!r} does not exist")
    try:
        state = timm.models.load_state_dict(path, use_ema=False, weights_only=True)
    except Exception as exc:  # unreadable / unsafe pickle: one line, never torch's paragraphs
        raise ValueError(unsafe_load_message(path, exc, "encoder checkpoint")) from None
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = encoder.state_dict()
    first_conv = encoder.pretrained_cfg.get("first_conv", "conv1") + ".weight"
    if first_conv in state and first_conv in expected and state[first_conv].shape[1] != in_chans:
        state[first_conv] = timm.models.adapt_input_conv(in_chans, state[first_conv])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"encoder checkpoint {path!r} does not match timm's encoder: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(bad_shape)} with another shape (e.g. {bad_shape[:3]}); it must be a state dict of the same timm model"
        )
    encoder.load_state_dict(state, strict=True)


def create_encoder(
    name: str = "resnest50d",
    in_chans: int = 3,
    weights: str = "imagenet",
    checkpoint: str | None = None,
) -> nn.Module:
    """A timm ``features_only`` encoder; weights from ImageNet (timm's hub path), a local file, or random."""
    if weights not in ("imagenet", "none"):
        raise ValueError(f"encoder_weights must be 'imagenet' or 'none', got {weights!r}")
    if checkpoint is not None:
        if weights == "none":
            raise ValueError("encoder_checkpoint was given together with encoder_weights='none'; choose one")
        encoder = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans)
        load_encoder_checkpoint(encoder, checkpoint, in_chans)
        return encoder
    if weights == "none":
        return timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans)
    try:
        return timm.create_model(name, features_only=True, pretrained=True, in_chans=in_chans)
    except Exception as exc:  # network / hub / cache errors come in many types
        raise EncoderWeightsError(
            f"could not load ImageNet weights for encoder {name!r} through timm ({type(exc).__name__}: {exc}). "
            f"Offline? Pass encoder_checkpoint=PATH (a local .pth/.safetensors state dict of timm's {name!r}, "
            f"e.g. saved on a machine with internet by torch.save(timm.create_model({name!r}, pretrained=True)"
            f".state_dict(), PATH)), or encoder_weights='none' to train the encoder from scratch."
        ) from exc


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


class MADGNet(nn.Module):
    """MADGNet segmenter with deep-supervision heads and a lesion-class head (see module docstring)."""

    segmenter_name = "madgnet"

    def __init__(
        self,
        num_labels: int = 2,
        encoder_name: str = "resnest50d",
        encoder_weights: str = "imagenet",
        encoder_checkpoint: str | None = None,
        in_chans: int = 3,
        skip_channels: int = 64,
        decoder_channels: tuple[int, ...] | list[int] = (256, 128, 64, 32),
        scale_branches: int = 3,
        num_frequencies: int = 16,
        dct_size: int = 7,
        min_channel: int = 32,
        min_resolution: int = 8,
        groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        decoder_channels = [int(c) for c in decoder_channels]
        self.init_kwargs = dict(
            num_labels=int(num_labels), encoder_name=str(encoder_name), encoder_weights="none",
            encoder_checkpoint=None, in_chans=int(in_chans), skip_channels=int(skip_channels),
            decoder_channels=decoder_channels, scale_branches=int(scale_branches),
            num_frequencies=int(num_frequencies), dct_size=int(dct_size), min_channel=int(min_channel),
            min_resolution=int(min_resolution), groups=int(groups), dropout=float(dropout),
        )
        self.encoder_source = (
            f"file:{os.fspath(encoder_checkpoint)}" if encoder_checkpoint is not None else str(encoder_weights)
        )
        self.in_chans = in_chans
        self.encoder = create_encoder(encoder_name, in_chans, encoder_weights, encoder_checkpoint)
        channels = self.encoder.feature_info.channels()  # shallow -> deep
        if len(channels) != len(decoder_channels) + 1:
            raise ValueError(
                f"encoder {encoder_name!r} gives {len(channels)} feature maps; "
                f"decoder_channels needs {len(channels) - 1} entries, got {decoder_channels}"
            )
        cfg = self.encoder.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32)
        if in_chans == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        self.register_buffer("input_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", std.view(1, -1, 1, 1), persistent=False)

        skip_in = channels[-2::-1]  # 1024, 512, 256, 64 for resnest50d
        self.skips = nn.ModuleList(_conv_bn_relu(c, skip_channels, 1) for c in skip_in)
        mfmsa = dict(scale_branches=scale_branches, num_frequencies=num_frequencies, min_channel=min_channel,
                     min_resolution=min_resolution, groups=groups, dct_size=dct_size)
        ins = [channels[-1]] + decoder_channels[:-1]
        self.stages = nn.ModuleList(
            _DecoderStage(i, skip_channels, o, mfmsa) for i, o in zip(ins, decoder_channels)
        )
        self.heads = nn.ModuleList(_CascadedHeads(c) for c in decoder_channels)
        self.class_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels[-1], num_labels))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        size = x.shape[-2:]
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        feats = self.encoder((x - self.input_mean) / self.input_std)
        deepest = feats[-1]
        h = deepest
        maps, distances, boundaries = [], [], []
        for stage, skip_conv, heads, skip in zip(self.stages, self.skips, self.heads, feats[-2::-1]):
            h = stage(h, skip_conv(skip))
            m, d, b = heads(h, size)
            maps.append(m)
            distances.append(d)
            boundaries.append(b)
        return {
            "mask_logits": maps[-1],
            "class_logits": self.class_head(deepest.mean(dim=(2, 3))),
            "maps": maps,
            "distances": distances,
            "boundaries": boundaries,
        }
