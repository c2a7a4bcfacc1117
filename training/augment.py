"""Batched, on-device, seeded augmentation of (image, mask) pairs.

``augment(images, masks, level, generator) -> (images, masks)`` with ``images`` [B,1,H,W] float in [0,1]
and ``masks`` [B,1,H,W] in {0,1}. Everything is drawn from ``generator`` (a ``torch.Generator`` on the
tensors' device) in a fixed order, so the output is a deterministic function of the inputs and the
generator state. No Python loop over the batch, no host synchronisation (no ``.item()``, no
data-dependent branching), one ``grid_sample`` call for all geometry of image and mask together.

Levels (each random transform is drawn per image; "p" = probability per image):

``'none'``
    Returns the inputs unchanged.
``'standard'``
    Geometry: horizontal flip (p 0.5; never vertical -- the skin line stays at the top of an
    ultrasound image), rotation U(-10, 10) degrees, isotropic scale U(0.9, 1.1), translation
    U(-0.05, 0.05) of the width/height. Intensity: brightness + U(-0.1, 0.1), contrast x U(0.9, 1.1)
    about the image mean.
``'strong'``
    Geometry: flip (p 0.5), rotation U(-20, 20) degrees, scale U(0.8, 1.2), anisotropic stretch
    U(0.9, 1.1), translation U(-0.1, 0.1), elastic deformation (p 0.5; a 6x6 grid of N(0, 1)
    displacements, bicubically upsampled -- a smooth field -- times U(0, 0.02) of the image size).
    Intensity: gamma ``x**g`` with log g ~ U(log 0.7, log 1.5) (p 0.5), brightness U(-0.15, 0.15),
    contrast U(0.8, 1.2), multiplicative Rayleigh speckle ``x * (1 + s (n - 1))`` with ``n`` Rayleigh of
    mean 1 and s ~ U(0, 0.3) (p 0.5), then Gaussian blur with sigma U(0.3, 1.2) px (p 0.3; 7-tap
    separable, reflect padding).

Geometry: one affine matrix per image (aspect-ratio correct rotation in pixel space), plus the elastic
field, builds one sampling grid; image and mask are stacked as two channels and resampled together
with bilinear interpolation, zero padding outside the image (ultrasound background is black), and
``align_corners=False``; the mask is re-binarised with ``> 0.5``. So a pixel is lesion after
augmentation exactly where the bilinearly interpolated mask exceeds one half -- image and mask stay
aligned. Intensity transforms touch the image only, are monotone per image except speckle and blur,
and the result is clamped to [0, 1].

:func:`augment_geometry` and :func:`augment_intensity` are the two halves (``augment`` calls them in
that order with the same generator).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LEVELS", "augment", "augment_geometry", "augment_intensity"]

LEVELS = ("none", "standard", "strong")

_GEOMETRY = {
    "standard": dict(rotate=10.0, scale=(0.9, 1.1), stretch=(1.0, 1.0), translate=0.05, elastic_p=0.0, elastic=0.0),
    "strong": dict(rotate=20.0, scale=(0.8, 1.2), stretch=(0.9, 1.1), translate=0.10, elastic_p=0.5, elastic=0.02),
}
_INTENSITY = {
    "standard": dict(brightness=0.10, contrast=(0.9, 1.1), gamma_p=0.0, gamma=(1.0, 1.0),
                     speckle_p=0.0, speckle=0.0, blur_p=0.0, blur=(0.3, 0.3)),
    "strong": dict(brightness=0.15, contrast=(0.8, 1.2), gamma_p=0.5, gamma=(0.7, 1.5),
                   speckle_p=0.5, speckle=0.3, blur_p=0.3, blur=(0.3, 1.2)),
}
_ELASTIC_GRID = 6
_BLUR_TAPS = 7


def _check(images: torch.Tensor, masks: torch.Tensor | None, level: str, generator: torch.Generator) -> None:
    if level not in LEVELS:
        raise ValueError(f"augmentation level must be one of {LEVELS}, got {level!r}")
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [B,1,H,W], got {tuple(images.shape)}")
    if masks is not None and masks.shape != images.shape:
        raise ValueError(f"masks {tuple(masks.shape)} must match images {tuple(images.shape)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (on the images' device)")
    if generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device}, images on {images.device}; create "
                         f"torch.Generator(device=images.device)")


def _uniform(lo: float, hi: float, shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=like.device, dtype=like.dtype)


def _bernoulli(p: float, shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.rand(shape, generator=g, device=like.device, dtype=like.dtype) < p).to(like.dtype)


def augment_geometry(
    images: torch.Tensor, masks: torch.Tensor, level: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip/affine(/elastic) applied identically to images and masks (one ``grid_sample``)."""
    _check(images, masks, level, generator)
    if level == "none":
        return images, masks
    cfg, g = _GEOMETRY[level], generator
    b, _, h, w = images.shape
    x = images.float() if not images.is_floating_point() else images
    flip = 1.0 - 2.0 * _bernoulli(0.5, (b,), g, x)
    angle = _uniform(-cfg["rotate"], cfg["rotate"], (b,), g, x) * (math.pi / 180.0)
    scale = _uniform(*cfg["scale"], (b,), g, x)
    stretch = _uniform(*cfg["stretch"], (b,), g, x)
    shift = _uniform(-2 * cfg["translate"], 2 * cfg["translate"], (b, 2), g, x)  # normalised units span 2
    # output->input map in pixel-centred coordinates: A = R(angle) diag(flip*sx, sy) / scale
    sx, sy = stretch.sqrt(), stretch.rsqrt()
    cos, sin = angle.cos(), angle.sin()
    a00, a01 = cos * flip * sx / scale, -sin * sy / scale
    a10, a11 = sin * flip * sx / scale, cos * sy / scale
    # to affine_grid's normalised coordinates (x in units of w/2, y of h/2)
    theta = torch.stack(
        [torch.stack([a00, a01 * (h / w), shift[:, 0]], -1), torch.stack([a10 * (w / h), a11, shift[:, 1]], -1)], 1
    )
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    if cfg["elastic_p"] > 0:
        coarse = torch.randn((b, 2, _ELASTIC_GRID, _ELASTIC_GRID), generator=g, device=x.device, dtype=x.dtype)
        amount = _uniform(0.0, cfg["elastic"], (b,), g, x) * _bernoulli(cfg["elastic_p"], (b,), g, x)
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        grid = grid + 2.0 * amount[:, None, None, None] * field.permute(0, 2, 3, 1)
    stacked = torch.cat([x, masks.to(x.dtype)], dim=1)
    warped = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_images = warped[:, :1].clamp(0.0, 1.0).to(images.dtype)
    out_masks = (warped[:, 1:] > 0.5).to(masks.dtype)
    return out_images, out_masks


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur: [B,1,H,W], sigma [B] -> grouped conv, no batch loop."""
    b, _, h, w = x.shape
    taps = torch.arange(_BLUR_TAPS, device=x.device, dtype=x.dtype) - _BLUR_TAPS // 2
    k = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]).square())
    k = k / k.sum(dim=1, keepdim=True)  # [B, T]
    y = x.reshape(1, b, h, w)
    pad = _BLUR_TAPS // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=b)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=b)
    return y.reshape(b, 1, h, w)


def augment_intensity(images: torch.Tensor, level: str, generator: torch.Generator) -> torch.Tensor:
    """Random gamma / brightness / contrast / speckle / blur of images only; result clamped to [0, 1]."""
    _check(images, None, level, generator)
    if level == "none":
        return images
    cfg, g = _INTENSITY[level], generator
    b = images.shape[0]
    x = images.float() if not images.is_floating_point() else images
    per = (b, 1, 1, 1)
    # draw every parameter (also for transforms this level switches off) so the stream stays in step
    gamma_on = _bernoulli(cfg["gamma_p"], per, g, x)
    log_gamma = _uniform(math.log(cfg["gamma"][0]), math.log(cfg["gamma"][1]), per, g, x) * gamma_on
    brightness = _uniform(-cfg["brightness"], cfg["brightness"], per, g, x)
    contrast = _uniform(*cfg["contrast"], per, g, x)
    speckle = _uniform(0.0, cfg["speckle"], per, g, x) * _bernoulli(cfg["speckle_p"], per, g, x)
    blur_on = _bernoulli(cfg["blur_p"], (b,), g, x)
    sigma = _uniform(*cfg["blur"], (b,), g, x)

    x = x.clamp(0.0, 1.0).pow(log_gamma.exp())
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    if cfg["speckle_p"] > 0:
        u = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype).clamp_min(1e-7)
        rayleigh = torch.sqrt(-2.0 * torch.log(u)) / math.sqrt(math.pi / 2.0)  # mean 1
        x = x * (1.0 + speckle * (rayleigh - 1.0))
    if cfg["blur_p"] > 0:
        x = torch.lerp(x, _blur(x, sigma), blur_on[:, None, None, None])
    return x.clamp(0.0, 1.0).to(images.dtype)


def augment(
    images: torch.Tensor, masks: torch.Tensor, level: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometry (image + mask) then intensity (image only) at ``level`` (``'none'|'standard'|'strong'``).

    See the module docstring for the transforms and their ranges. ``level='none'`` returns the inputs.
    """
    images, masks = augment_geometry(images, masks, level, generator)
    return augment_intensity(images, level, generator), masks
