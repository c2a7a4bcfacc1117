"""Segmentation and lesion-classification metrics.

Rules (every number the project reports about a segmenter follows them):

* Masks are binarised with ``> 0`` (bool / {0,1} / {0,255} all work); predictions are binarised by the
  caller (e.g. ``sigmoid(logits) > 0.5``, see :func:`binarize`). Metrics are computed at the evaluated
  size, in pixels.
* **Dice** of two masks is ``2|P & G| / (|P| + |G|)`` (:func:`dice`, the project's only Dice). Its one rule for
  empty masks: two empty masks agree (Dice 1); an empty mask against a non-empty one gives 0.
* A **lesion image** has a non-empty ground truth. Dice, IoU and HD95 are defined **only** on lesion
  images. An empty prediction on a lesion image gives Dice 0, IoU 0 and HD95 = the image diagonal
  ``sqrt(H^2 + W^2)`` (the largest distance possible in the image).
* An image with an **empty ground truth** (a normal image) has Dice/IoU/HD95 = NaN (excluded from their
  means) and instead a **false positive** flag: ``pred_area > min_area`` (pixels; ``min_area=0`` means
  any predicted pixel). The false-positive rate is the mean flag over such images.
* **HD95** is the 95th percentile (numpy ``linear``) of the pooled symmetric surface distances: the
  distances from every predicted surface pixel to the nearest ground-truth surface pixel together with
  those from every ground-truth surface pixel to the nearest predicted one. A surface pixel is a
  foreground pixel with a background 4-neighbour (the image border counts as background). Distances are
  Euclidean in pixels, from ``scipy.ndimage.distance_transform_edt``.
* Class metrics: the confusion matrix has rows = true class, columns = predicted class; balanced accuracy
  is the mean recall over the classes that occur in ``y_true``.
* Comparisons between training arms (differences with confidence intervals and p-values) are not here:
  they live in :mod:`metrics.downstream` (a two-level bootstrap over training seeds and test images).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "binarize",
    "dice",
    "dice_iou",
    "hd95",
    "false_positive",
    "segmentation_records",
    "summarize",
    "confusion_matrix",
    "balanced_accuracy",
]

_STATS = ("dice", "iou", "hd95")


def _to_bool(masks: Any) -> np.ndarray:
    """[N,H,W] / [N,1,H,W] / [H,W] (numpy or torch) -> bool [N,H,W]."""
    if hasattr(masks, "detach"):  # torch tensor
        masks = masks.detach().cpu().numpy()
    arr = np.asarray(masks)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"expected one mask channel, got shape {arr.shape}")
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"expected masks [N,H,W] or [N,1,H,W], got shape {arr.shape}")
    return arr > 0


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _to_bool(pred), _to_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != ground-truth shape {g.shape}")
    return p, g


def binarize(logits: Any, threshold: float = 0.5) -> np.ndarray:
    """Mask logits (torch or numpy, [N,1,H,W] or [N,H,W]) -> bool [N,H,W] where ``sigmoid > threshold``."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    logit_threshold = math.log(threshold / (1.0 - threshold))
    return _to_bool(np.asarray(logits) > logit_threshold)


def dice(pred: Any, gt: Any) -> np.ndarray:
    """Per-image Dice ``2|P & G| / (|P| + |G|)``, float64 [N]; 1 where both masks are empty (see module rules)."""
    p, g = _pair(pred, gt)
    inter = np.logical_and(p, g).sum(axis=(1, 2)).astype(np.float64)
    total = (p.sum(axis=(1, 2)) + g.sum(axis=(1, 2))).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total == 0, 1.0, 2.0 * inter / total)


def dice_iou(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice (:func:`dice`) and IoU of a segmenter, float64 [N], on lesion images only: NaN where the
    ground truth is empty (those images get the false-positive flag instead; see module rules)."""
    p, g = _pair(pred, gt)
    inter = np.logical_and(p, g).sum(axis=(1, 2)).astype(np.float64)
    ps, gs = p.sum(axis=(1, 2)).astype(np.float64), g.sum(axis=(1, 2)).astype(np.float64)
    lesion = gs > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(lesion, inter / (ps + gs - inter), np.nan)
    return np.where(lesion, dice(p, g), np.nan), iou


def _surface(masks: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour; the image border counts as background."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # 2D cross, no coupling across images
    return masks & ~ndimage.binary_erosion(masks, structure=structure, border_value=0)


def _hd95_one(sp: np.ndarray, sg: np.ndarray) -> float:
    """HD95 of two non-empty surface images (bool [H,W]); distances gathered at surface pixels only."""
    d_to_g = ndimage.distance_transform_edt(~sg)[sp]
    d_to_p = ndimage.distance_transform_edt(~sp)[sg]
    return float(np.percentile(np.concatenate([d_to_g, d_to_p]), 95))


def hd95(pred: Any, gt: Any) -> np.ndarray:
    """Per-image HD95 in pixels, float64 [N] (see module rules).

    NaN where the ground truth is empty; the image diagonal where the prediction is empty and the ground
    truth is not. Surfaces are extracted for all images in one vectorised erosion; the two 2D Euclidean
    distance transforms run per image (one scipy call each -- a 2D EDT per image is ~3x faster than one
    3D EDT over the stack), and only surface pixels are read back.
    """
    p, g = _pair(pred, gt)
    n, h, w = p.shape
    sp, sg = _surface(p), _surface(g)
    has_p, has_g = sp.any(axis=(1, 2)), sg.any(axis=(1, 2))
    out = np.where(has_g, math.hypot(h, w), np.nan)  # empty prediction on a lesion image -> diagonal
    for i in np.flatnonzero(has_p & has_g):
        out[i] = _hd95_one(sp[i], sg[i])
    return out


def false_positive(pred: Any, gt: Any, min_area: int = 0) -> np.ndarray:
    """Per-image false-positive flag as float [N]: 1.0/0.0 where the ground truth is empty, else NaN.

    A false positive is a prediction with more than ``min_area`` pixels on an empty-ground-truth image.
    """
    p, g = _pair(pred, gt)
    area = p.sum(axis=(1, 2))
    normal = ~g.any(axis=(1, 2))
    return np.where(normal, (area > min_area).astype(np.float64), np.nan)


def segmentation_records(
    pred: Any,
    gt: Any,
    labels: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    min_area: int = 0,
) -> list[dict[str, Any]]:
    """One dict per image: ``id, label, has_lesion, dice, iou, hd95, false_positive, pred_area, gt_area``.

    Metric values are floats, or ``None`` where a rule leaves them undefined (JSON-ready).
    """
    p, g = _pair(pred, gt)
    n = len(p)
    if labels is not None and len(labels) != n or ids is not None and len(ids) != n:
        raise ValueError(f"labels/ids must have one entry per image ({n})")
    dice, iou = dice_iou(p, g)
    hd = hd95(p, g)
    fp = false_positive(p, g, min_area)
    pa, ga = p.sum(axis=(1, 2)), g.sum(axis=(1, 2))

    def val(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return [
        {
            "id": None if ids is None else ids[i],
            "label": None if labels is None else labels[i],
            "has_lesion": bool(ga[i] > 0),
            "dice": val(dice[i]),
            "iou": val(iou[i]),
            "hd95": val(hd[i]),
            "false_positive": val(fp[i]),
            "pred_area": int(pa[i]),
            "gt_area": int(ga[i]),
        }
        for i in range(n)
    ]


def _stats(values: np.ndarray) -> dict[str, float | None]:
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return {"mean": None, "std": None, "median": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "median": float(np.median(v))}


def _group_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    def column(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=np.float64)

    fp = column("false_positive")
    n_normal = int((~np.isnan(fp)).sum())
    out: dict[str, Any] = {"n": len(records), "n_lesion": int(sum(bool(r["has_lesion"]) for r in records))}
    for key in _STATS:
        out[key] = _stats(column(key))
    out["n_empty_gt"] = n_normal
    out["false_positive_rate"] = float(np.nanmean(fp)) if n_normal else None
    return out


def summarize(per_image_records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-label summary of :func:`segmentation_records` output.

    ``{'overall': S, 'per_label': {label: S, ...}}`` where ``S`` = ``{n, n_lesion, dice, iou, hd95,
    n_empty_gt, false_positive_rate}`` and each metric is ``{mean, std (ddof=1), median}`` over lesion
    images (``None`` when there are none); ``false_positive_rate`` is over empty-ground-truth images
    (``None`` when there are none). Records without a label are only in ``overall``.
    """
    records = list(per_image_records)
    per_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("label") is not None:
            per_label.setdefault(str(r["label"]), []).append(r)
    return {
        "overall": _group_summary(records),
        "per_label": {k: _group_summary(v) for k, v in sorted(per_label.items())},
    }


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """Integer [K, K] matrix, rows = true class, columns = predicted class; labels are ints in [0, K)."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries, y_pred {p.size}")
    k = int(num_classes) if num_classes is not None else int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k):
        raise ValueError(f"labels must be integers in [0, {k})")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def balanced_accuracy(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (NaN for no samples)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(cm)[present] / support[present]).mean())
