"""The evaluation report's figures, each a PNG (bytes) that metrics/report.py embeds as base64.

Image grids (samples with their mask outline, closest pairs) are drawn with OpenCV; plots with matplotlib (Agg).
The downstream figures read the segmentation runs' ``per_image_test.csv`` (:data:`metrics.seg_eval.CSV_COLUMNS`):
a forest plot of every combined − baseline difference, ROC curves of the malignant head (``prob_malignant``),
per-image Dice with the same test image joined across the two arms, and a benign / malignant confusion matrix
per arm. An arm of several runs (seeds) is one curve / one point per image: each image's value averaged over the
runs, as in metrics/downstream.py; its confusion matrix counts every run's prediction.
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from data.pairs import TUMOUR_LABELS
from metrics.downstream import METRICS
from metrics.morphology import FEATURES

__all__ = ["png", "overlay", "tile", "sample_grid", "pairs_grid", "morphology_histograms", "distribution_plot",
           "read_arm", "roc_points", "forest_plot", "roc_plot", "paired_dice_plot", "confusion_plot", "build_figures"]

GOOD, BAD, NEUTRAL = "#2e7d32", "#c62828", "#555555"
ARM_COLOURS = {"baseline": "#1f77b4", "combined": "#d95f02"}


# ============================================================================ image grids
def png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def overlay(image: np.ndarray, mask: np.ndarray | None, scale: int = 1) -> np.ndarray:
    """Grayscale image as BGR with the mask outline in red, upscaled by ``scale`` (nearest)."""
    img = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if scale > 1:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), img.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, (40, 40, 230), 1)
    return img


def tile(cells: Sequence[np.ndarray], cols: int, pad: int = 2) -> np.ndarray:
    h, w = cells[0].shape[:2]
    rows = (len(cells) + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, c in enumerate(cells):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = c
    return out


def _scale(size: int) -> int:
    return max(1, 128 // size)


def sample_grid(images: np.ndarray, masks: np.ndarray, count: int = 8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), min(count, len(images)), replace=False) if len(images) else []
    s = _scale(images.shape[-1])
    return png(tile([overlay(images[i], masks[i], s) for i in idx], cols=count))


def pairs_grid(left: np.ndarray, right: np.ndarray, left_masks=None, right_masks=None) -> bytes:
    """Rows of (left | right) pairs, e.g. synthetic image | its nearest training image."""
    s = _scale(left.shape[-1])
    cells = []
    for i in range(len(left)):
        cells.append(overlay(left[i], None if left_masks is None else left_masks[i], s))
        cells.append(overlay(right[i], None if right_masks is None else right_masks[i], s))
    return png(tile(cells, cols=2))


# ============================================================================ matplotlib plumbing
def _fig_png(fig, dpi: int = 80) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def morphology_histograms(raw: dict[str, Any], label: str) -> bytes:
    plt = _plt()
    syn_t, syn_lab = raw["synthetic"]
    real_t, real_lab, real_held = raw["real"]
    s_sel, r_sel = syn_lab == label, (real_lab == label) & ~real_held
    fig, axes = plt.subplots(2, 4, figsize=(12, 5))
    for ax, name in zip(axes.ravel(), FEATURES):
        a, b = real_t[name][r_sel], syn_t[name][s_sel]
        both = np.concatenate([a, b])
        bins = np.linspace(both.min(), both.max() + 1e-9, 16) if len(both) else 10
        ax.hist(a, bins=bins, alpha=0.55, density=True, label=f"real train ({len(a)})")
        ax.hist(b, bins=bins, alpha=0.55, density=True, label=f"synthetic ({len(b)})")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"lesion morphology, class {label}")
    fig.tight_layout()
    return _fig_png(fig)


def distribution_plot(values: dict[str, np.ndarray], title: str, xlabel: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    both = np.concatenate([v for v in values.values() if len(v)])
    bins = np.linspace(both.min(), both.max() + 1e-9, 30)
    for name, v in values.items():
        ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{name} ({len(v)})")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    return _fig_png(fig)


# ============================================================================ the segmentation runs' per-image tables
def _float(text: Any) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def read_arm(runs: Sequence[Any]) -> dict[str, Any] | None:
    """One arm's per-image test results over the images every run scored: ``{runs, ids, labels [N], dice [R,N],
    prob [R,N] (prob_malignant; NaN where the run has none), pred [R][N] (predicted label, '' without a class
    head)}``; None without runs or when a run has no ``per_image_test.csv``."""
    tables = []
    for run in runs:
        path = Path(run)
        path = path / "per_image_test.csv" if path.is_dir() else path
        if not path.is_file():
            return None
        with open(path, newline="") as fh:
            tables.append({r["id"]: r for r in csv.DictReader(fh)})
    if not tables:
        return None
    ids = sorted(set(tables[0]).intersection(*tables[1:]))
    return {"runs": [str(r) for r in runs], "ids": ids,
            "labels": np.array([tables[0][i].get("label", "") for i in ids], dtype=object),
            "dice": np.array([[_float(t[i].get("dice")) for i in ids] for t in tables]).reshape(len(tables), -1),
            "prob": np.array([[_float(t[i].get("prob_malignant")) for i in ids] for t in tables]
                             ).reshape(len(tables), -1),
            "pred": [[t[i].get("pred_label") or "" for i in ids] for t in tables]}


def _seed_mean(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # an image without any value stays NaN
        return np.nanmean(values, axis=0)


def roc_points(scores: Sequence[float], positive: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, float]:
    """(false positive rates, true positive rates, AUC) of ``scores`` for ``positive``; tied scores are one step
    (the trapezoid then counts a tie one half, as the Mann-Whitney AUC of metrics/seg_eval.py does)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], int)
    tpr = np.r_[0.0, np.cumsum(y)[last] / max(1, y.sum())]
    fpr = np.r_[0.0, np.cumsum(~y)[last] / max(1, (~y).sum())]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


# ============================================================================ downstream figures
def forest_plot(comparison: dict[str, Any]) -> bytes:
    """Every metric's combined − baseline difference with its CI on one forest plot: a zero line, the primary
    endpoint marked, each row's p (primary, tested alone) or Holm-adjusted p written beside it; fractions and
    pixel distances (HD95) on their own axes, one above the other."""
    plt = _plt()
    from matplotlib.transforms import blended_transform_factory
    rows = [k for k in METRICS if "skipped" not in comparison["metrics"].get(k, {"skipped": 1})
            and math.isfinite(comparison["metrics"][k].get("mean_diff", float("nan")))]
    rows += [k for k, v in comparison["metrics"].items() if k not in METRICS and "skipped" not in v]
    groups = [(g, unit) for g, unit in (([k for k in rows if not k.startswith("hd95")], "fraction"),
                                        ([k for k in rows if k.startswith("hd95")], "pixels")) if g]
    if not groups:
        groups = [([], "fraction")]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8.5, 0.45 * max(1, len(rows)) + 1.4 * len(groups)),
                             gridspec_kw={"height_ratios": [max(1, len(g)) for g, _ in groups]}, squeeze=False)
    for ax, (keys, unit) in zip(axes[:, 0], groups):
        trans = blended_transform_factory(ax.transAxes, ax.transData)
        ys = np.arange(len(keys))[::-1]
        labels = []
        for y, key in zip(ys, keys):
            v = comparison["metrics"][key]
            m = METRICS.get(key)
            better = v.get("better", m.better if m else "higher")
            primary = v.get("role") == "primary"
            d, lo, hi = v["mean_diff"], v.get("ci_low", float("nan")), v.get("ci_high", float("nan"))
            excludes = lo > 0 or hi < 0
            good = (d > 0) == (better == "higher")
            colour = (GOOD if good else BAD) if excludes else NEUTRAL
            err = [[d - lo], [hi - d]] if math.isfinite(lo) and math.isfinite(hi) else None
            ax.errorbar([d], [y], xerr=err, fmt="D" if primary else "o", ms=9 if primary else 5, color=colour,
                        capsize=3, lw=2.2 if primary else 1.2)
            p = v.get("p_value") if primary else v.get("p_holm")
            ptext = "n/a" if p is None or not math.isfinite(p) else f"{p:.2g}"
            ax.text(1.02, y, f"p {ptext} (primary)" if primary else f"Holm p {ptext}", transform=trans,
                    va="center", fontsize=8, fontweight="bold" if primary else "normal")
            name = m.name if m else key
            labels.append(f"PRIMARY: {name}" if primary else name)
            labels[-1] += f"  ({better} is better)"
        ax.axvline(0.0, color="black", lw=0.9, ls="--")
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        for tick, key in zip(ax.get_yticklabels(), keys):
            if comparison["metrics"][key].get("role") == "primary":
                tick.set_fontweight("bold")
        ax.set_ylim(-0.7, len(keys) - 0.3)
        ax.set_xlabel(f"combined − baseline ({unit}); 95% CI", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Downstream: combined − baseline on the real test images (green / red: CI excludes zero, "
                 "better / worse; grey: includes zero)", fontsize=9)
    fig.tight_layout()
    return _fig_png(fig, dpi=100)


def roc_plot(arms: dict[str, dict[str, Any]]) -> bytes | None:
    """ROC curves of the malignant head, malignant vs benign tumour images, one per arm (each image's
    ``prob_malignant`` averaged over the arm's runs; each run alone as a thin line). None without probabilities."""
    curves = {}
    for name, arm in arms.items():
        tumour = np.isin(arm["labels"], TUMOUR_LABELS)
        prob = _seed_mean(arm["prob"])
        ok = tumour & np.isfinite(prob)
        y = arm["labels"][ok] == "malignant"
        if ok.any() and 0 < y.sum() < len(y):
            runs = [roc_points(arm["prob"][r][ok], y) for r in range(len(arm["prob"]))
                    if np.isfinite(arm["prob"][r][ok]).all()]
            curves[name] = (roc_points(prob[ok], y), runs, int(y.sum()), int((~y).sum()))
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
    for name, ((fpr, tpr, area), runs, n_pos, n_neg) in curves.items():
        colour = ARM_COLOURS.get(name)
        for rf, rt, _ in runs if len(runs) > 1 else []:
            ax.plot(rf, rt, color=colour, lw=0.6, alpha=0.35)
        n_runs = len(arms[name]["runs"])
        ax.plot(fpr, tpr, color=colour, lw=2, label=f"{name}: AUC {area:.3f}"
                + (f" (mean prob of {n_runs} runs)" if n_runs > 1 else ""))
    n_pos, n_neg = next(iter(curves.values()))[2:]
    ax.set_xlabel("1 − benign recall (false positive rate)", fontsize=8)
    ax.set_ylabel("malignant recall (true positive rate)", fontsize=8)
    ax.set_title(f"Malignant head ROC ({n_pos} malignant, {n_neg} benign test images)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    return _fig_png(fig, dpi=100)


def paired_dice_plot(base: dict[str, Any], comb: dict[str, Any]) -> bytes | None:
    """Per-image Dice, baseline vs combined, one line per test image joining its two values (green: combined
    higher, red: lower), box plots of each side behind. None without a lesion image scored by both arms."""
    ids = sorted(set(base["ids"]) & set(comb["ids"]))
    if not ids:
        return None
    b_pos, c_pos = {i: k for k, i in enumerate(base["ids"])}, {i: k for k, i in enumerate(comb["ids"])}
    b = _seed_mean(base["dice"])[[b_pos[i] for i in ids]]
    c = _seed_mean(comb["dice"])[[c_pos[i] for i in ids]]
    ok = np.isfinite(b) & np.isfinite(c)
    if not ok.any():
        return None
    b, c = b[ok], c[ok]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.boxplot([b, c], positions=[0, 1], widths=0.35, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "#999999"})
    alpha = float(np.clip(12 / len(b), 0.08, 0.6))
    for x, y in zip(b, c):
        colour = GOOD if y > x + 1e-12 else BAD if y < x - 1e-12 else NEUTRAL
        ax.plot([0, 1], [x, y], color=colour, lw=0.8, alpha=alpha)
    ax.scatter(np.zeros(len(b)), b, s=8, color=ARM_COLOURS["baseline"], zorder=3)
    ax.scatter(np.ones(len(c)), c, s=8, color=ARM_COLOURS["combined"], zorder=3)
    up, down = int((c > b + 1e-12).sum()), int((c < b - 1e-12).sum())
    nb, nc = len(base["runs"]), len(comb["runs"])
    ax.set_xticks([0, 1])
    ax.set_xticklabels([f"baseline\nmean {b.mean():.3f}", f"combined\nmean {c.mean():.3f}"], fontsize=8)
    ax.set_ylabel("Dice (each image: mean over the arm's runs)" if max(nb, nc) > 1 else "Dice", fontsize=8)
    ax.set_title(f"Per-image Dice, {len(b)} lesion test images:\n{up} higher with combined, {down} lower",
                 fontsize=9)
    ax.set_xlim(-0.5, 1.5)
    return _fig_png(fig, dpi=100)


def confusion_plot(arms: dict[str, dict[str, Any]]) -> bytes | None:
    """Benign / malignant confusion matrix of each arm over the tumour test images (rows: true class, columns:
    predicted; every run's prediction counted, with the row share). None when no run predicted a class."""
    mats = {}
    for name, arm in arms.items():
        tumour = np.isin(arm["labels"], TUMOUR_LABELS)
        preds = [p for run in arm["pred"] for p, t in zip(run, tumour) if t]
        truth = [lab for _ in arm["pred"] for lab, t in zip(arm["labels"], tumour) if t]
        pairs = [(t, p) for t, p in zip(truth, preds) if p]
        if not pairs:
            continue
        cols = list(TUMOUR_LABELS) + sorted({p for _, p in pairs} - set(TUMOUR_LABELS))
        cm = np.zeros((len(TUMOUR_LABELS), len(cols)), int)
        for t, p in pairs:
            cm[list(TUMOUR_LABELS).index(t), cols.index(p)] += 1
        mats[name] = (cm, cols, len(arm["runs"]))
    if not mats:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(mats), figsize=(3.6 * len(mats), 3.3), squeeze=False)
    for ax, (name, (cm, cols, n_runs)) in zip(axes[0], mats.items()):
        share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, q), n in np.ndenumerate(cm):
            ax.text(q, r, f"{n}\n{share[r, q]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if share[r, q] > 0.6 else "black")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, fontsize=8)
        ax.set_yticks(range(len(TUMOUR_LABELS)))
        ax.set_yticklabels(TUMOUR_LABELS, fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{name}" + (f" ({n_runs} runs pooled)" if n_runs > 1 else ""), fontsize=9)
    fig.tight_layout()
    return _fig_png(fig, dpi=100)


# ============================================================================ all of them
def build_figures(d: dict[str, Any], raw: dict[str, Any], metrics: dict[str, Any],
                  runs: dict[str, Sequence[Any]] | None = None, per_class: int = 8) -> dict[str, Any]:
    """All figures of the report from the loaded sets (``d``, see evaluate.py), the stages' raw arrays and the
    segmentation runs of each arm (``runs``: {"baseline": [...], "combined": [...]}, read only when the
    downstream comparison ran). Keys: samples {label: (synthetic, real)}, morphology {label}, nearest_ssim,
    closest (png, rows), forest, roc, paired_dice, confusion."""
    figs: dict[str, Any] = {"samples": {}, "morphology": {}}
    held = d["real_heldout"]
    train_i, train_m, train_l = d["real_images"][~held], d["real_masks"][~held], d["real_labels"][~held]
    for lab in sorted(set(d["syn_labels"])):
        s_sel, r_sel = d["syn_labels"] == lab, train_l == lab
        real_png = sample_grid(train_i[r_sel], train_m[r_sel], per_class) if r_sel.any() else b""
        figs["samples"][lab] = (sample_grid(d["syn_images"][s_sel], d["syn_masks"][s_sel], per_class), real_png)
    if "morphology" in raw:
        for lab, blk in (metrics.get("morphology") or {}).get("per_class", {}).items():
            if "skipped" not in blk:
                figs["morphology"][lab] = morphology_histograms(raw["morphology"], lab)
    sim = raw.get("similarity", {})
    if "nearest_syn" in sim:
        figs["nearest_ssim"] = distribution_plot(
            {"synthetic": sim["nearest_syn"], "held-out real": sim["nearest_held"]},
            "nearest-real SSIM: highest SSIM against the real training images", "SSIM")
    mem = raw.get("memorisation")
    if mem is not None:
        rows = (metrics.get("memorisation") or {}).get("closest", [])
        order = mem["order"][:len(rows)]
        if len(order):
            figs["closest"] = (pairs_grid(d["syn_images"][order], train_i[mem["syn_idx"][order]],
                                          d["syn_masks"][order], train_m[mem["syn_idx"][order]]),
                               [{**r, "ncc": f"{r['ncc']:.4f}"} for r in rows])
    figs.update(downstream_figures(metrics, runs))
    return figs


def downstream_figures(metrics: dict[str, Any], runs: dict[str, Sequence[Any]] | None) -> dict[str, bytes]:
    """forest / roc / paired_dice / confusion, those that can be drawn (see :func:`build_figures`)."""
    comp = (metrics.get("downstream") or {}).get("comparison") or {}
    if not comp.get("metrics"):
        return {}
    out: dict[str, bytes] = {"forest": forest_plot(comp)}
    arms = {name: read_arm((runs or {}).get(name) or []) for name in ("baseline", "combined")}
    if all(arms.values()):
        for key, fig in (("roc", roc_plot(arms)), ("paired_dice", paired_dice_plot(arms["baseline"],
                                                                                   arms["combined"])),
                         ("confusion", confusion_plot(arms))):
            if fig:
                out[key] = fig
    return out
