"""MedSegDiffV2: class-conditioned denoiser that generates an ultrasound image and its mask jointly.

The published MedSegDiff-V2 (Wu et al., AAAI 2024) is a diffusion *segmenter*: only the mask is
noised and the clean image is a condition. This network adapts its ideas to *joint* generation, where
image and mask are both noised and both denoised:

- a guided-diffusion (ADM) UNet: residual blocks with GroupNorm and scale-shift conditioning on the
  time + class embedding, zero-initialised residual outputs, skip connections;
- a transformer stack at the bottleneck for global context (pre-norm self-attention + MLP with
  DiT-style adaLN-zero conditioning, 2-D sin-cos positions), in place of the paper's SS-Former;
- the "anchor": a light encoder that sees only the noisy IMAGE channels. Its per-level features are
  injected into the main encoder through zero-initialised 1x1 convs (image path conditions the mask
  path), a small top-down head turns them into ``anchor_logits`` (a mask predicted from the image
  alone, supervised by the trainer with an auxiliary loss against the clean mask), and the head's
  full-resolution features are concatenated in front of the output conv, so the predicted mask is
  tied to the image features.

Input/output layout: ``x`` is ``[B, in_channels + out_channels, H, W]`` = noisy image channel(s)
followed by noisy mask channel(s); the output has the same layout (what it means -- epsilon, v or x0
-- is the diffusion wrapper's choice). ``class_labels`` in ``0..num_classes``; ``num_classes`` itself
is the null class (classifier-free guidance).

``patch_size > 1`` folds p x p pixel blocks into channels (PixelUnshuffle) before the stem and
unfolds them after the output conv ("simple diffusion", Hoogeboom et al. 2023): the UNet then runs at
``H/p``, which makes high resolution and CPU training much cheaper.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .blocks import (
    Downsample,
    GroupNorm,
    ResBlock,
    TransformerBlock,
    Upsample,
    maybe_checkpoint,
    sincos_pos_embed_2d,
    zero_module,
)

__all__ = ["MedSegDiffV2", "default_channel_mult"]


def default_channel_mult(img_size: int) -> tuple[int, ...]:
    """Per-level width multipliers by image size, following guided-diffusion's table."""
    if img_size >= 256:
        return (1, 1, 2, 2, 4, 4)
    if img_size >= 128:
        return (1, 1, 2, 3, 4)
    if img_size >= 64:
        return (1, 2, 3, 4)
    return (1, 2, 2)


def _as_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"MedSegDiffV2: {name} must be an integer, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"MedSegDiffV2: {name} must be >= {minimum}, got {value}")
    return value


class _EncoderLevel(nn.Module):
    def __init__(self, down: nn.Module | None, blocks: list[nn.Module], attn: list[nn.Module] | None = None):
        super().__init__()
        self.down = down
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn) if attn else None


class _DecoderLevel(nn.Module):
    def __init__(self, blocks: list[nn.Module], up: nn.Module | None, attn: list[nn.Module] | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.up = up
        self.attn = nn.ModuleList(attn) if attn else None


class SpatialTransformer(nn.Module):
    """One transformer block on the pixels of a feature map (attention inside a UNet level, as ADM's attention
    resolutions): tokens + fixed 2-D positions, adaLN-zero modulation from the conditioning vector, back to a map.
    Identity at initialisation."""

    def __init__(self, channels: int, num_heads: int, emb_dim: int, grid: int):
        super().__init__()
        self.block = TransformerBlock(channels, num_heads)
        self.modulation = zero_module(nn.Linear(emb_dim, 6 * channels))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(channels, grid, grid), persistent=False)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, c, gh, gw = h.shape
        tokens = h.permute(0, 2, 3, 1).reshape(b, gh * gw, c)
        pos = self.pos_embed if self.pos_embed.shape[0] == gh * gw else sincos_pos_embed_2d(c, gh, gw, h.device)
        tokens = self.block(tokens + pos.to(tokens.dtype), self.modulation(emb))
        return tokens.reshape(b, gh, gw, c).permute(0, 3, 1, 2).contiguous()


class ImageAnchor(nn.Module):
    """Light image-only encoder + coarse mask head (MedSegDiff-V2's anchor, adapted to joint generation).

    Starts at half the UNet's finest resolution (``stride``-2 stem) -- narrow full-resolution 3x3 convs
    are the least FLOP-efficient work there is, and the main stem sees the image at full resolution
    anyway. Encoder: per level one ResBlock (width ``width * mult``), stride-2 convs between levels.
    ``inject[j]`` (zero-initialised 1x1 convs) map anchor level j to the main UNet's width at the same
    resolution. Head: FPN-style top-down sum of 1x1 lateral projections, one 3x3 conv at the anchor's
    finest level, GN + SiLU -> ``features`` -> 1x1 conv -> coarse mask logits.
    """

    def __init__(self, in_channels, out_channels, width, channel_mult, main_widths, emb_dim, dropout, stride):
        super().__init__()
        widths = [width * m for m in channel_mult]
        self.stride = stride
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stride=stride, padding=1)
        self.downs = nn.ModuleList([Downsample(widths[i - 1]) for i in range(1, len(widths))])
        self.blocks = nn.ModuleList(
            [ResBlock(widths[max(i - 1, 0)], w, emb_dim, dropout) for i, w in enumerate(widths)]
        )
        self.inject = nn.ModuleList(
            [zero_module(nn.Conv2d(w, mw, 1)) for w, mw in zip(widths, main_widths)]
        )
        self.lateral = nn.ModuleList([nn.Conv2d(w, width, 1) for w in widths])
        self.fuse = nn.Conv2d(width, width, 3, padding=1)
        self.norm = GroupNorm(width)
        self.head = nn.Conv2d(width, out_channels, 1)
        self.feature_channels = width

    def encode(self, img, emb, ckpt: bool):
        feats = []
        h = self.stem(img)
        for i, block in enumerate(self.blocks):
            if i > 0:
                h = self.downs[i - 1](h)
            h = maybe_checkpoint(ckpt, block, h, emb)
            feats.append(h)
        return feats

    def decode(self, feats):
        """Top-down path -> (features after GN+SiLU, mask logits), both at the anchor's finest level."""
        d = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            d = F.interpolate(d, scale_factor=2.0, mode="nearest") + self.lateral[i](feats[i])
        a = F.silu(self.norm(self.fuse(d)))
        return a, self.head(a)


class MedSegDiffV2(nn.Module):
    """Joint image + mask denoiser: ADM UNet + bottleneck transformer + image anchor (see module doc).

    ``forward(x, timesteps, class_labels, return_anchor=False)`` returns ``[B, in+out, H, W]``; with
    ``return_anchor=True`` it returns ``(out, anchor_logits)`` where ``anchor_logits`` is
    ``[B, out_channels, H, W]`` (``None`` when ``use_anchor=False``). ``class_labels=None`` means the
    null class for the whole batch. ``init_kwargs`` rebuilds the model: ``MedSegDiffV2(**m.init_kwargs)``.
    """

    def __init__(
        self,
        img_size: int = 256,
        in_channels: int = 1,
        out_channels: int = 1,
        num_classes: int = 2,
        model_channels: int = 128,
        transformer_depth: int = 6,
        num_heads: int = 8,
        use_transformer: bool = True,
        channel_mult: tuple[int, ...] | list[int] | None = None,
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        patch_size: int = 1,
        use_anchor: bool = True,
        grad_checkpointing: bool = False,
        self_condition: bool = False,
        attention_levels: tuple[int, ...] | list[int] = (),
    ):
        super().__init__()
        img_size = _as_int("img_size", img_size, 1)
        in_channels = _as_int("in_channels", in_channels, 1)
        out_channels = _as_int("out_channels", out_channels, 1)
        num_classes = _as_int("num_classes", num_classes, 1)
        model_channels = _as_int("model_channels", model_channels, 1)
        transformer_depth = _as_int("transformer_depth", transformer_depth, 0)
        num_heads = _as_int("num_heads", num_heads, 1)
        num_res_blocks = _as_int("num_res_blocks", num_res_blocks, 1)
        patch_size = _as_int("patch_size", patch_size, 1)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"MedSegDiffV2: dropout must be in [0, 1), got {dropout}")
        if channel_mult is None:
            channel_mult = default_channel_mult(img_size)
        if isinstance(channel_mult, (str, bytes)) or not hasattr(channel_mult, "__iter__"):
            raise ValueError(f"MedSegDiffV2: channel_mult must be a sequence of integers, got {channel_mult!r}")
        channel_mult = tuple(_as_int("channel_mult entry", m, 1) for m in channel_mult)
        if not channel_mult:
            raise ValueError("MedSegDiffV2: channel_mult must have at least one level")
        if img_size % patch_size:
            raise ValueError(f"MedSegDiffV2: img_size={img_size} is not divisible by patch_size={patch_size}")
        grid = img_size // patch_size
        levels = len(channel_mult)
        attention_levels = sorted({_as_int("attention_levels entry", a, 0) for a in attention_levels})
        if attention_levels and attention_levels[-1] >= levels:
            raise ValueError(f"MedSegDiffV2: attention_levels {attention_levels} must be level indices below "
                             f"{levels} (0 = the finest level)")
        for a in attention_levels:
            if (model_channels * channel_mult[a]) % num_heads or (model_channels * channel_mult[a]) % 4:
                raise ValueError(f"MedSegDiffV2: width {model_channels * channel_mult[a]} of attention level {a} "
                                 f"must be divisible by num_heads={num_heads} and by 4")
        if grid % 2 ** (levels - 1):
            raise ValueError(
                f"MedSegDiffV2: img_size/patch_size = {grid} must be divisible by 2^(levels-1) = "
                f"{2 ** (levels - 1)} for channel_mult={channel_mult} ({levels} levels); "
                f"pick another img_size, patch_size or a shorter channel_mult"
            )
        width_mid = model_channels * channel_mult[-1]
        if use_transformer and transformer_depth > 0:
            if width_mid % num_heads:
                raise ValueError(
                    f"MedSegDiffV2: bottleneck width model_channels*channel_mult[-1] = {width_mid} "
                    f"is not divisible by num_heads={num_heads}"
                )
            if width_mid % 4:
                raise ValueError(f"MedSegDiffV2: bottleneck width {width_mid} must be divisible by 4 "
                                 "(2-D positional embedding)")
        if use_anchor and model_channels < 2:
            raise ValueError("MedSegDiffV2: use_anchor needs model_channels >= 2 (anchor width is model_channels//2)")

        self.init_kwargs = dict(
            img_size=img_size, in_channels=in_channels, out_channels=out_channels, num_classes=num_classes,
            model_channels=model_channels, transformer_depth=transformer_depth, num_heads=num_heads,
            use_transformer=bool(use_transformer), channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks, dropout=float(dropout), patch_size=patch_size,
            use_anchor=bool(use_anchor), grad_checkpointing=bool(grad_checkpointing),
            self_condition=bool(self_condition), attention_levels=list(attention_levels),
        )
        self.img_size, self.in_channels, self.out_channels = img_size, in_channels, out_channels
        self.num_classes, self.null_class = num_classes, num_classes
        self.patch_size, self.channel_mult = patch_size, channel_mult
        self.use_transformer = bool(use_transformer) and transformer_depth > 0
        self.use_anchor = bool(use_anchor)
        self.grad_checkpointing = bool(grad_checkpointing)
        self.self_condition = bool(self_condition)
        self.attention_levels = tuple(attention_levels)

        p2 = patch_size * patch_size
        io_channels = (in_channels + out_channels) * p2
        stem_channels = io_channels * (2 if self.self_condition else 1)
        emb_dim = 4 * model_channels
        mc = model_channels
        widths = [mc * m for m in channel_mult]

        # conditioning: sinusoidal timestep -> MLP, plus a learned class vector (last row = null class)
        self.time_proj = Timesteps(mc, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(mc, emb_dim)
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim)

        # encoder: level i = [downsample (i > 0)] + num_res_blocks ResBlocks; one skip per module
        self.stem = nn.Conv2d(stem_channels, widths[0], 3, padding=1)
        skip_widths, ch = [], widths[0]
        enc = []
        for i, w in enumerate(widths):
            down = Downsample(ch) if i > 0 else None
            skip_widths.append(ch)
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, w, emb_dim, dropout))
                ch = w
                skip_widths.append(ch)
            attn = ([SpatialTransformer(w, num_heads, emb_dim, grid // 2 ** i) for _ in range(num_res_blocks)]
                    if i in self.attention_levels else None)
            enc.append(_EncoderLevel(down, blocks, attn))
        self.encoder = nn.ModuleList(enc)

        # bottleneck: ResBlock, transformer stack (or plain ResBlocks), ResBlock
        self.mid_in = ResBlock(ch, ch, emb_dim, dropout)
        if self.use_transformer:
            self.mid_stack = nn.ModuleList(
                [TransformerBlock(ch, num_heads) for _ in range(transformer_depth)]
            )
            self.mid_modulation = zero_module(nn.Linear(emb_dim, 6 * ch))  # shared adaLN (adaLN-single)
            g = grid // 2 ** (levels - 1)
            self.register_buffer("pos_embed", sincos_pos_embed_2d(ch, g, g), persistent=False)
        else:
            self.mid_stack = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout) for _ in range(transformer_depth)])
            self.pos_embed = self.mid_modulation = None
        self.mid_out = ResBlock(ch, ch, emb_dim, dropout)

        # decoder: level i (deepest first) = num_res_blocks + 1 ResBlocks on cat(h, skip) + upsample (i > 0)
        dec = []
        for i in reversed(range(levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_widths.pop(), widths[i], emb_dim, dropout))
                ch = widths[i]
            attn = ([SpatialTransformer(ch, num_heads, emb_dim, grid // 2 ** i) for _ in range(num_res_blocks + 1)]
                    if i in self.attention_levels else None)
            dec.append(_DecoderLevel(blocks, Upsample(ch) if i > 0 else None, attn))
        self.decoder = nn.ModuleList(dec)

        # anchor on the image channels; its full-resolution features join the output conv's input
        if self.use_anchor:
            entry_widths = [widths[0]] + widths[:-1]  # main width where level i starts (after downsample)
            first = 1 if levels > 1 else 0  # the anchor covers levels first..L-1
            self.anchor = ImageAnchor(in_channels * p2, out_channels, mc // 2, channel_mult[first:],
                                      entry_widths[first:], emb_dim, dropout, stride=2 if first else 1)
            self.anchor_first_level = first
            extra = self.anchor.feature_channels
        else:
            self.anchor, extra = None, 0
        self.out_norm = GroupNorm(ch)
        self.out_conv = zero_module(nn.Conv2d(ch + extra, io_channels, 3, padding=1))

    # ------------------------------------------------------------------------------------------
    def _embed(self, timesteps, class_labels, batch: int, device) -> torch.Tensor:
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor(timesteps, device=device)
        timesteps = timesteps.to(device).reshape(-1)
        if timesteps.shape[0] == 1 and batch != 1:
            timesteps = timesteps.expand(batch)
        if timesteps.shape[0] != batch:
            raise ValueError(f"MedSegDiffV2: timesteps has {timesteps.shape[0]} entries for a batch of {batch}")
        if class_labels is None:
            class_labels = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        else:
            class_labels = class_labels.to(device).reshape(-1)
            if class_labels.shape[0] != batch:
                raise ValueError(f"MedSegDiffV2: class_labels has {class_labels.shape[0]} entries "
                                 f"for a batch of {batch}")
        t = self.time_proj(timesteps).to(self.time_embedding.linear_1.weight.dtype)
        emb = self.time_embedding(t) + self.class_embedding(class_labels.long())
        return F.silu(emb)  # every consumer applies SiLU first: do it once

    def _transformer(self, h, emb, ckpt):
        b, c, gh, gw = h.shape
        channels_last = h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
        tokens = h.permute(0, 2, 3, 1).reshape(b, gh * gw, c)
        pos = self.pos_embed
        if pos.shape[0] != gh * gw:  # input larger/smaller than img_size: positions for this grid
            pos = sincos_pos_embed_2d(c, gh, gw, device=h.device)
        tokens = tokens + pos.to(tokens.dtype)
        mod = self.mid_modulation(emb)
        for blk in self.mid_stack:
            tokens = maybe_checkpoint(ckpt, blk, tokens, mod)
        h = tokens.reshape(b, gh, gw, c).permute(0, 3, 1, 2)
        return h if channels_last else h.contiguous()

    def forward(self, x, timesteps, class_labels=None, return_anchor: bool = False):
        b, c, height, width = x.shape
        p = self.patch_size
        expected = (self.in_channels + self.out_channels) * (2 if self.self_condition else 1)
        if c != expected:
            raise ValueError(f"MedSegDiffV2: expected {expected} input channels (image + mask"
                             f"{', then their self-conditioning estimate' if self.self_condition else ''}), got {c}")
        step = p * 2 ** (len(self.channel_mult) - 1)
        if height % step or width % step:
            raise ValueError(f"MedSegDiffV2: input size {height}x{width} must be divisible by {step} "
                             f"(patch_size * 2^(levels-1))")
        ckpt = self.grad_checkpointing and self.training
        emb = self._embed(timesteps, class_labels, b, x.device)

        if p > 1:
            x = F.pixel_unshuffle(x, p)  # channel order: image channels' p*p sub-pixels first
        feats = None
        if self.anchor is not None:
            feats = self.anchor.encode(x[:, : self.in_channels * p * p], emb, ckpt)

        h = self.stem(x)
        skips = []
        for i, level in enumerate(self.encoder):
            if level.down is not None:
                h = level.down(h)
            if feats is not None and i >= self.anchor_first_level:
                j = i - self.anchor_first_level
                h = h + self.anchor.inject[j](feats[j])
            skips.append(h)
            for k, blk in enumerate(level.blocks):
                h = maybe_checkpoint(ckpt, blk, h, emb)
                if level.attn is not None:
                    h = maybe_checkpoint(ckpt, level.attn[k], h, emb)
                skips.append(h)

        h = maybe_checkpoint(ckpt, self.mid_in, h, emb)
        if self.use_transformer:
            h = self._transformer(h, emb, ckpt)
        else:
            for blk in self.mid_stack:
                h = maybe_checkpoint(ckpt, blk, h, emb)
        h = maybe_checkpoint(ckpt, self.mid_out, h, emb)

        for level in self.decoder:
            for k, blk in enumerate(level.blocks):
                h = maybe_checkpoint(ckpt, blk, h, emb, skips.pop())
                if level.attn is not None:
                    h = maybe_checkpoint(ckpt, level.attn[k], h, emb)
            if level.up is not None:
                h = level.up(h)

        h = F.silu(self.out_norm(h))
        anchor_logits = None
        if self.anchor is not None:
            a, anchor_logits = self.anchor.decode(feats)
            if self.anchor.stride > 1:  # anchor features to the UNet's finest grid, logits to the image's
                a = F.interpolate(a, scale_factor=float(self.anchor.stride), mode="nearest")
            if anchor_logits.shape[-2:] != (height, width):
                anchor_logits = F.interpolate(anchor_logits, size=(height, width), mode="bilinear",
                                              align_corners=False)
            h = torch.cat([h, a], dim=1)
        out = self.out_conv(h)
        if p > 1:
            out = F.pixel_shuffle(out, p)
        return (out, anchor_logits) if return_anchor else out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.init_kwargs.items())
