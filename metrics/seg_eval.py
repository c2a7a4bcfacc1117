"""Prediction and scoring of a segmenter on a pair dataset, in the schema of train_segmentation.py's metrics.json.

Two functions others build on (e.g. the diffusion model's own segmentation mode):

* :func:`predict` -- ``(model, images_u8, batch_size, device, precision) -> (prob masks [N,S,S], class probs
  [N,K])``: float32 CPU tensors, ``sigmoid(mask_logits)`` and ``softmax(class_logits)``; the model is called on
  ``[B,1,S,S]`` floats in [0,1] and must return ``mask_logits`` (and ``class_logits`` for class probs).
* :func:`evaluate_predictions` -- binary masks + ground truth + labels (+ predicted labels and malignant
  probabilities when the segmenter classifies) -> ``(section, rows)``: one metrics.json section and one
  per-image row per image (the columns of ``per_image_<name>.csv``, :data:`CSV_COLUMNS`).

The metric rules are those of :mod:`metrics.segmentation` (restated in :data:`RULES`, which goes into
metrics.json). Classification: the predicted class is the argmax over the model's classes; *balanced
accuracy* is the mean of benign and malignant recall on the tumour images (a tumour image predicted
'normal' counts as a miss), so it means the same with and without normal images; the confusion matrix
covers every evaluated image (rows = true class, columns = predicted); ``auc_malignant`` is the ROC AUC of
``prob_malignant`` for malignant vs benign on the tumour images (Mann-Whitney, ties count one half).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.io import atomic_write_text
from data.pairs import TUMOUR_LABELS
from metrics.segmentation import balanced_accuracy, confusion_matrix, segmentation_records, summarize
from common.precision import autocast

__all__ = ["CSV_COLUMNS", "RULES", "THRESHOLD", "predict", "evaluate_predictions", "write_per_image_csv",
           "mean_lesion_dice", "auc", "empty_prediction_warning", "run_warnings"]

THRESHOLD = 0.5
CSV_COLUMNS = ("id", "label", "source", "dice", "iou", "hd95", "pred_label", "prob_malignant",
               "false_positive", "pred_area", "gt_area")
RULES = {
    "mask": f"a pixel is lesion where sigmoid(mask_logits) > {THRESHOLD}; ground-truth masks are binarised with > 0",
    "units": "metrics are computed at the training size (img_size x img_size); HD95 is in pixels at that size",
    "empty_ground_truth": "Dice, IoU and HD95 are defined only on images with a lesion (non-empty ground truth); "
                          "an empty prediction there scores Dice 0, IoU 0 and HD95 = the image diagonal. An image "
                          "with an empty ground truth (a normal image) has no Dice/IoU/HD95 (empty cells in the CSV) "
                          "and counts as a false positive when any pixel is predicted lesion",
    "hd95": "95th percentile of the pooled symmetric surface distances (surface = lesion pixel with a background "
            "4-neighbour), Euclidean, in pixels",
    "summary": "mean, std (ddof=1) and median over the lesion images of each group",
    "balanced_accuracy": "mean of benign recall and malignant recall over the tumour images; the predicted class "
                         "is the argmax over the model's classes (a tumour image predicted normal is a miss)",
    "confusion_matrix": "rows = true class, columns = predicted class, over every evaluated image",
    "auc_malignant": "ROC AUC of prob_malignant (softmax over the model's classes), malignant vs benign tumour images",
}


@torch.no_grad()
def predict(model: torch.nn.Module, images_u8: Any, batch_size: int = 32, device: torch.device | str = "cpu",
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lesion probabilities [N,S,S] and class probabilities [N,K] (None if the model has no class head).

    ``images_u8``: uint8 [N,S,S] or [N,1,S,S] (numpy or torch, any device). The model is put in eval mode
    (and left there). Outputs are float32 CPU tensors.
    """
    device = torch.device(device)
    x_all = torch.as_tensor(images_u8)
    if x_all.dim() == 3:
        x_all = x_all[:, None]
    if x_all.dim() != 4 or x_all.shape[1] != 1:
        raise ValueError(f"images must be [N,S,S] or [N,1,S,S], got {tuple(x_all.shape)}")
    model.eval()
    probs, classes = [], []
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size].to(device).float() / 255.0
        with autocast(device, precision):
            out = model(x)
        probs.append(torch.sigmoid(out["mask_logits"].float())[:, 0].cpu())
        if out.get("class_logits") is not None:
            classes.append(torch.softmax(out["class_logits"].float(), dim=1).cpu())
    size = x_all.shape[-2:]
    prob = torch.cat(probs) if probs else torch.zeros((0, *size))
    cls = torch.cat(classes) if classes else None
    return prob, cls


def mean_lesion_dice(pred_masks: Any, gt_masks: Any) -> float:
    """Mean Dice over the images with a lesion (NaN when there are none); the validation criterion."""
    from metrics.segmentation import dice_iou
    dice, _ = dice_iou(pred_masks, gt_masks)
    dice = dice[~np.isnan(dice)]
    return float(dice.mean()) if len(dice) else float("nan")


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """ROC AUC by the Mann-Whitney statistic (ties count one half); None without both classes."""
    from scipy.stats import rankdata
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _fmt(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def evaluate_predictions(pred_masks_bool: Any, gt_masks: Any, labels: Sequence[str], ids: Sequence[str],
                         sources: Sequence[str], pred_labels: Sequence[str] | None = None,
                         prob_malignant: Sequence[float] | None = None,
                         class_names: Sequence[str] = TUMOUR_LABELS) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score binary predictions against the ground truth (rules: module docstring and :data:`RULES`).

    Returns ``(section, rows)``. ``section`` = ``{n_images, counts (label -> n), sources (source -> n),
    overall, per_label, false_positive_rate_normal, classification}`` where ``overall`` / ``per_label[label]``
    are :func:`metrics.segmentation.summarize` groups (``n, n_lesion, dice, iou, hd95`` each ``{mean, std,
    median}``, ``n_empty_gt, false_positive_rate``) and ``classification`` is ``None`` without
    ``pred_labels``, else ``{class_names, confusion_matrix, balanced_accuracy, accuracy, auc_malignant,
    n_tumour, recall}``. ``rows`` are dicts with :data:`CSV_COLUMNS`.
    """
    n = len(ids)
    for name, seq in (("labels", labels), ("sources", sources), ("pred_labels", pred_labels),
                      ("prob_malignant", prob_malignant)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, expected {n} (one per image)")
    records = segmentation_records(pred_masks_bool, gt_masks, labels=list(labels), ids=list(ids))
    summary = summarize(records)
    class_names = list(class_names)
    rows = []
    for i, rec in enumerate(records):
        rows.append({"id": ids[i], "label": labels[i], "source": sources[i], "dice": rec["dice"], "iou": rec["iou"],
                     "hd95": rec["hd95"], "pred_label": None if pred_labels is None else pred_labels[i],
                     "prob_malignant": None if prob_malignant is None else float(prob_malignant[i]),
                     "false_positive": rec["false_positive"], "pred_area": rec["pred_area"],
                     "gt_area": rec["gt_area"]})
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    srcs: dict[str, int] = {}
    for s in sources:
        srcs[s] = srcs.get(s, 0) + 1
    section: dict[str, Any] = {
        "n_images": n, "counts": counts, "sources": srcs,
        "overall": summary["overall"], "per_label": summary["per_label"],
        "false_positive_rate_normal": summary["per_label"].get("normal", {}).get("false_positive_rate"),
        "classification": None,
    }
    if pred_labels is not None:
        names = list(class_names)
        for lab in list(labels) + list(pred_labels):
            if lab not in names:
                names.append(lab)  # a true label the model has no class for (kept visible in the matrix)
        t = np.array([names.index(x) for x in labels], dtype=np.int64)
        p = np.array([names.index(x) for x in pred_labels], dtype=np.int64)
        tumour = np.isin(np.asarray(labels), TUMOUR_LABELS)
        cm = confusion_matrix(t, p, len(names))
        cm_t = confusion_matrix(t[tumour], p[tumour], len(names))
        recall = {lab: _fmt(cm_t[names.index(lab), names.index(lab)] / cm_t[names.index(lab)].sum())
                  if lab in names and cm_t[names.index(lab)].sum() else None for lab in TUMOUR_LABELS}
        section["classification"] = {
            "class_names": names,
            "confusion_matrix": cm.tolist(),
            "balanced_accuracy": _fmt(balanced_accuracy(t[tumour], p[tumour], len(names))) if tumour.any() else None,
            "recall": recall,
            "accuracy": _fmt(float((t == p).mean())) if n else None,
            "n_tumour": int(tumour.sum()),
            "auc_malignant": None if prob_malignant is None else auc(
                np.asarray(prob_malignant, dtype=np.float64)[tumour], np.asarray(labels)[tumour] == "malignant"),
        }
        if len(set(labels)) > 2:
            section["classification"]["balanced_accuracy_all_classes"] = _fmt(balanced_accuracy(t, p, len(names)))
    return section, rows


def write_per_image_csv(path, rows: Sequence[dict[str, Any]]) -> None:
    """``per_image_<name>.csv`` (atomic): :data:`CSV_COLUMNS`; metric cells empty where undefined."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        out = {}
        for k in CSV_COLUMNS:
            v = r.get(k)
            if v is None:
                out[k] = ""
            elif isinstance(v, float):
                out[k] = "" if math.isnan(v) else str(int(v)) if k == "false_positive" else f"{v:.6f}"
            else:
                out[k] = v
        writer.writerow(out)
    atomic_write_text(path, buf.getvalue())


# ============================================================================ a segmenter that predicts nothing
def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def empty_prediction_warning(rows: Sequence[dict[str, Any]], what: str) -> str | None:
    """A loud warning when a segmenter predicted nothing: an empty mask on every image (``pred_area`` 0 on all of
    them) or Dice 0 on every lesion image; None otherwise. ``rows``: per-image rows (:data:`CSV_COLUMNS`), as
    :func:`evaluate_predictions` returns them or as read back from a ``per_image_*.csv`` (strings)."""
    if not rows:
        return None
    areas = [_number(r.get("pred_area")) for r in rows]
    dice = [d for d in (_number(r.get("dice")) for r in rows) if d is not None]
    if all(a is not None for a in areas) and not any(areas):
        found = f"predicts an EMPTY mask on every one of its {len(rows)} test images (predicted area 0)"
    elif dice and not any(dice):
        found = f"scores Dice 0 on every one of its {len(dice)} lesion test images"
    else:
        return None
    return (f"WARNING {what} {found}: the segmenter has learnt nothing usable; its Dice, and any comparison made "
            "with it, mean nothing (train longer, check the masks and the learning rate)")


def run_warnings(runs: Sequence[Any]) -> list[str]:
    """:func:`empty_prediction_warning` for each segmentation run (a run folder's ``per_image_test.csv``, or the
    CSV file itself); runs without the file are left to the reader that needs it."""
    out = []
    for run in runs:
        path = Path(run)
        path = path / "per_image_test.csv" if path.is_dir() else path
        if not path.is_file():
            continue
        with open(path, newline="") as fh:
            warning = empty_prediction_warning(list(csv.DictReader(fh)), f"segmentation run {run}")
        if warning:
            out.append(warning)
    return out
