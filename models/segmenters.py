"""Segmenter registry, self-describing specs, and the training losses.

API (what ``train_segmentation.py`` needs)::

    model = build_segmenter("madgnet", num_labels=2, encoder_weights="imagenet")
    spec = segmenter_spec(model)                 # {'name': 'madgnet', 'kwargs': {...}}  (JSON-serialisable)
    model = build_segmenter_from_spec(spec)      # rebuilds the architecture, never downloads weights
    out = model(images)                          # images [B,1,H,W] in [0,1]
    loss, parts = segmentation_loss(out, masks, labels)

Every model returns a dict with ``mask_logits`` [B,1,H,W] and ``class_logits`` [B,num_labels];
MADGNet adds ``maps`` / ``distances`` / ``boundaries`` (deep supervision, see ``models.madgnet``).

Losses (:func:`segmentation_loss` picks by the outputs it is given):

* **U-Net** (no ``maps`` key): ``dice + bce`` on ``mask_logits``. Soft Dice is per image with
  smoothing 1 (``1 - (2 sum(p g) + 1) / (sum p + sum g + 1)``), averaged over the batch, so an image with an
  empty mask (a normal image) still pushes its prediction towards empty; BCE is the mean per pixel.
* **MADGNet** (``maps`` present), averaged over the four deep-supervision stages (equal weights):
  ``structure(map) + distance_weight * mse(distance, D) + boundary_weight * bce(boundary, E)``.
  The distance output is regressed directly (not through a sigmoid): in the cascade it is gated by
  sigmoid(map), so it sits near 0 on background, which is what ``D`` asks there; a sigmoid would put a
  floor of 0.5 under it.
  *structure* is weighted BCE + weighted IoU with pixel weights ``1 + 5 |avgpool_k(g) - g|`` (large near
  edges), computed per image and averaged; ``k`` is 31 at 352 px (the reference setting) and scales with
  the mask height (``2 round(15 H / 352) + 1``, at least 3). Unlike the reference code, whose
  ``reduce='none'`` argument silently turns the BCE into a plain mean, the BCE here really is per-pixel
  weighted. ``D`` = :func:`distance_target`, ``E`` = :func:`boundary_target`, both computed on the device
  from the masks (no host round-trip).
* **Both**: ``+ class_weight * cross_entropy(class_logits, labels)`` when ``labels`` is given
  (label ``-100`` marks an image without a class label, e.g. a normal image when ``num_labels=2``; it is
  skipped, and a batch with no labelled image adds 0; ``label_weights`` re-weights classes).

``parts`` holds detached scalar tensors (no host sync here); call ``float()`` when logging.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .madgnet import MADGNet
from .unet import UNet

__all__ = [
    "SEGMENTERS",
    "build_segmenter",
    "build_segmenter_from_spec",
    "segmenter_spec",
    "segmentation_loss",
    "dice_bce_loss",
    "structure_loss",
    "distance_target",
    "boundary_target",
    "count_parameters",
]

SEGMENTERS: dict[str, Callable[..., nn.Module]] = {"unet": UNet, "madgnet": MADGNet}


def build_segmenter(name: str, num_labels: int, **kw: Any) -> nn.Module:
    """Build a registered segmenter (``'unet'`` or ``'madgnet'``); ``kw`` go to its constructor.

    Raises ``ValueError`` listing the choices for an unknown name, and ``TypeError`` for an argument the
    model does not take.
    """
    key = str(name).lower()
    if key not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; choices: {', '.join(sorted(SEGMENTERS))}")
    return SEGMENTERS[key](num_labels=num_labels, **kw)


def segmenter_spec(model: nn.Module) -> dict[str, Any]:
    """``{'name', 'kwargs'}``: enough to rebuild ``model``'s architecture (store it in checkpoints)."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return {"name": model.segmenter_name, "kwargs": dict(model.init_kwargs)}


def build_segmenter_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`segmenter_spec` (weights are then loaded from the checkpoint's state dict)."""
    kwargs = dict(spec["kwargs"])
    num_labels = kwargs.pop("num_labels")
    return build_segmenter(spec["name"], num_labels, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# Targets computed from the masks on the device
# ----------------------------------------------------------------------------------------------


def _as_mask(masks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.shape != like.shape:
        raise ValueError(f"masks have shape {tuple(masks.shape)}, outputs {tuple(like.shape)}")
    return masks.to(like.dtype)


@torch.no_grad()
def distance_target(masks: torch.Tensor, row_chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Exact Euclidean distance of each lesion pixel to the nearest non-lesion pixel, / per-image max.

    ``masks`` [B,1,H,W] in {0,1} -> [B,1,H,W] float in [0,1]: 0 outside the lesion, 1 at the pixel deepest
    inside it; all-zero for an empty mask. Pixels beyond the image border count as background, so a lesion
    cut by the border has finite distances. Two separable passes: a 1D distance along each row by
    cumulative max/min of background indices, then ``min_k (i-k)^2 + g(k,j)^2`` over rows, evaluated in
    row chunks of at most ``row_chunk_elems`` elements. Pure tensor ops, runs on the masks' device.
    """
    fg = masks[:, 0] > 0.5
    b, h, w = fg.shape
    dev = fg.device
    cols = torch.arange(w, device=dev).expand(b, h, w)
    left = torch.where(fg, torch.full_like(cols, -1), cols).cummax(dim=-1).values
    right = torch.where(fg, torch.full_like(cols, w), cols).flip(-1).cummin(dim=-1).values.flip(-1)
    g2 = torch.minimum(cols - left, right - cols).float().square()  # [B,H,W], 0 on background
    rows = torch.arange(h, device=dev, dtype=torch.float32)
    border2 = torch.minimum(rows + 1, h - rows).square()  # distance to the rows outside the image
    out = torch.empty_like(g2)
    chunk = max(1, row_chunk_elems // max(1, b * h * w))
    for start in range(0, h, chunk):
        i = rows[start:start + chunk]
        diff2 = (i[:, None] - rows[None, :]).square()  # [c, H]
        d2 = (g2[:, None, :, :] + diff2[None, :, :, None]).amin(dim=2)  # [B, c, W]
        out[:, start:start + chunk] = torch.minimum(d2, border2[start:start + chunk, None])
    dist = out.sqrt() * fg
    peak = dist.amax(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return (dist / peak).unsqueeze(1)


@torch.no_grad()
def boundary_target(masks: torch.Tensor, width: int = 3) -> torch.Tensor:
    """Morphological gradient (dilation - erosion, ``width`` x ``width`` square) of {0,1} masks.

    [B,1,H,W] -> [B,1,H,W] in {0,1}: a band about ``width - 1`` pixels wide straddling the lesion edge.
    The image border is not an edge (pooling pads with -inf), and an empty mask gives an empty map.
    """
    m = (masks > 0.5).to(torch.float32)
    pad = width // 2
    dilated = F.max_pool2d(m, width, stride=1, padding=pad)
    eroded = -F.max_pool2d(-m, width, stride=1, padding=pad)
    return dilated - eroded


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def dice_bce_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft Dice loss per image with ``smooth``, averaged; mean pixel BCE). See the module docstring."""
    prob = torch.sigmoid(logits)
    inter = (prob * masks).sum(dim=(1, 2, 3))
    total = prob.sum(dim=(1, 2, 3)) + masks.sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * inter + smooth) / (total + smooth)
    return dice.mean(), F.binary_cross_entropy_with_logits(logits, masks)


def structure_loss(logits: torch.Tensor, masks: torch.Tensor, kernel: int | None = None) -> torch.Tensor:
    """Edge-weighted BCE + edge-weighted IoU, per image, averaged (see the module docstring for ``kernel``)."""
    if kernel is None:
        kernel = max(3, 2 * round(15 * masks.shape[-2] / 352) + 1)
    weight = 1.0 + 5.0 * (F.avg_pool2d(masks, kernel, stride=1, padding=kernel // 2) - masks).abs()
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * masks * weight).sum(dim=(2, 3))
    union = ((prob + masks) * weight).sum(dim=(2, 3))
    wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)
    return (wbce + wiou).mean()


def _class_loss(outputs: dict[str, Any], labels: torch.Tensor, label_weights: torch.Tensor | None) -> torch.Tensor:
    """(Weighted) mean cross-entropy over labelled images; 0, not NaN, when every label is -100."""
    labels = labels.long()
    per_image = F.cross_entropy(
        outputs["class_logits"].float(), labels, weight=label_weights, ignore_index=-100, reduction="none"
    )  # already multiplied by the class weight; 0 where ignored
    valid = labels != -100
    if label_weights is None:
        denom = valid.sum()
    else:
        denom = (label_weights.to(per_image)[labels.clamp_min(0)] * valid).sum()
    return per_image.sum() / denom.clamp_min(1e-12)


def segmentation_loss(
    outputs: dict[str, Any],
    masks: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    class_weight: float = 0.2,
    label_weights: torch.Tensor | None = None,
    distance_weight: float = 1.0,
    boundary_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total training loss and its detached parts for any registered segmenter's outputs.

    ``masks`` [B,1,H,W] (or [B,H,W]) in {0,1}; ``labels`` [B] class indices or ``None`` (no class loss).
    Losses are computed in float32 even under autocast. Parts: U-Net ``dice``, ``bce``; MADGNet
    ``structure``, ``distance``, ``boundary`` (stage means); both ``cls`` (when labels given) and ``total``.
    """
    parts: dict[str, torch.Tensor] = {}
    mask_logits = outputs["mask_logits"].float()
    masks = _as_mask(masks, mask_logits)
    if "maps" in outputs:
        dist_t, bnd_t = distance_target(masks), boundary_target(masks)
        n = len(outputs["maps"])
        s = d = e = 0.0
        for m, dl, bl in zip(outputs["maps"], outputs["distances"], outputs["boundaries"]):
            s = s + structure_loss(m.float(), masks)
            d = d + F.mse_loss(dl.float(), dist_t)
            e = e + F.binary_cross_entropy_with_logits(bl.float(), bnd_t)
        parts.update(structure=s / n, distance=d / n, boundary=e / n)
        loss = parts["structure"] + distance_weight * parts["distance"] + boundary_weight * parts["boundary"]
    else:
        dice, bce = dice_bce_loss(mask_logits, masks)
        parts.update(dice=dice, bce=bce)
        loss = dice + bce
    if labels is not None and class_weight > 0:
        parts["cls"] = _class_loss(outputs, labels.to(mask_logits.device), label_weights)
        loss = loss + class_weight * parts["cls"]
    parts["total"] = loss
    return loss, {k: v.detach() for k, v in parts.items()}
