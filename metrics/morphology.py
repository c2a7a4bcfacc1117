"""Tumour morphology of mask (+ image) pairs, and real-vs-synthetic distribution distances per class.

Per non-empty mask (the lesion is the union of its components; shape features use the largest component):

* ``area_fraction``   lesion pixels / image pixels
* ``circularity``     4 pi A / P^2 (skimage ``perimeter_crofton``; ~1 for a disc, lower for elongated/irregular)
* ``solidity``        A / convex-hull area
* ``aspect_ratio``    major / minor axis of the moment ellipse (>= 1)
* ``height_width``    bounding-box height / width; ``taller_than_wide`` = height_width > 1 (BI-RADS non-parallel)
* ``irregularity``    1 - IoU(lesion, the ellipse with the lesion's centroid, second moments and area): 0 for an
                      ellipse, high for lobulated / spiculated margins (elongation alone does not count)
* ``n_components``    8-connected components of the mask
* ``contrast``        (mean intensity of a ring around the lesion - mean inside) / 255; positive = hypoechoic

Distances per feature and class: Wasserstein-1 divided by the real training feature's standard deviation, and the
two-sample Kolmogorov-Smirnov statistic; both also between the real training and the held-out real lesions
(the floor), with the synthetic side subsampled to the held-out count.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import ks_2samp, wasserstein_distance
from skimage import measure

from metrics.floors import real_resplits, subsets, summarise, verdict

FEATURES = ("area_fraction", "circularity", "solidity", "aspect_ratio", "height_width", "irregularity",
            "n_components", "contrast")
MIN_LESIONS = 5      # fewer lesions than this in a class: its morphology is not computed
FEW_LESIONS = 30     # fewer than this: a warning line


def ellipse_irregularity(region: np.ndarray) -> float:
    """1 - IoU between a binary region and its equal-area moment ellipse."""
    ys, xs = np.nonzero(region)
    area = len(ys)
    if area < 5:
        return 0.0
    pts = np.stack([ys, xs], 1).astype(np.float64)
    mu = pts.mean(0)
    cov = np.cov(pts, rowvar=False) + np.eye(2) / 12.0  # + pixel-extent variance
    det = np.linalg.det(cov)
    if det <= 0:
        return 0.0
    k = area / (math.pi * math.sqrt(det))   # {x: x^T cov^-1 x <= k} has area pi k sqrt(det) = A
    h, w = region.shape
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.stack([yy - mu[0], xx - mu[1]], -1)
    inside = np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d) <= k
    inter = np.logical_and(inside, region).sum()
    union = np.logical_or(inside, region).sum()
    return float(1.0 - inter / union)


def lesion_features(image: np.ndarray, mask: np.ndarray, ring: int | None = None) -> dict[str, float] | None:
    """Morphology features of one pair (see the module docstring); None for an empty mask."""
    mask = mask.astype(bool)
    if not mask.any():
        return None
    labels = measure.label(mask, connectivity=2)
    props = measure.regionprops(labels)
    main = max(props, key=lambda p: p.area)
    region = labels == main.label
    perim = main.perimeter_crofton
    minr, minc, maxr, maxc = main.bbox
    major, minor = main.axis_major_length, main.axis_minor_length
    ring = ring or max(2, round(0.05 * mask.shape[0]))
    around = (ndimage.distance_transform_edt(~mask) <= ring) & ~mask
    img = image.astype(np.float64)
    contrast = (img[around].mean() - img[mask].mean()) / 255.0 if around.any() else 0.0
    return {
        "area_fraction": float(mask.sum() / mask.size),
        "circularity": float(4 * math.pi * main.area / perim ** 2) if perim > 0 else 1.0,
        "solidity": float(main.solidity),
        "aspect_ratio": float(major / minor) if minor > 0 else float(max(maxr - minr, maxc - minc)),
        "height_width": float((maxr - minr) / (maxc - minc)),
        "irregularity": ellipse_irregularity(region[minr:maxr, minc:maxc]),
        "n_components": float(len(props)),
        "contrast": float(contrast),
    }


def feature_table(images: np.ndarray, masks: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of every non-empty mask ({name: [M]}) and the indices (into the input) of those masks."""
    rows, keep = [], []
    for i in range(len(masks)):
        f = lesion_features(images[i], masks[i])
        if f is not None:
            rows.append(f)
            keep.append(i)
    table = {name: np.array([r[name] for r in rows], float) for name in FEATURES}
    return table, np.asarray(keep, int)


def distances(real: dict[str, np.ndarray], other: dict[str, np.ndarray], scale: dict[str, float]
              ) -> dict[str, dict[str, float]]:
    """Per feature: Wasserstein-1 / real std, and the KS statistic."""
    out = {}
    for name in FEATURES:
        a, b = real[name], other[name]
        out[name] = {"wasserstein": float(wasserstein_distance(a, b) / scale[name]),
                     "ks": float(ks_2samp(a, b).statistic)}
    return out


def _take(table: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in table.items()}


def evaluate_morphology(syn_images: np.ndarray, syn_masks: np.ndarray, syn_labels: np.ndarray,
                        real_images: np.ndarray, real_masks: np.ndarray, real_labels: np.ndarray,
                        real_groups: np.ndarray, real_is_heldout: np.ndarray, draws: int = 5, seed: int = 0
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per class: feature summaries, distances synthetic-vs-train beside train-vs-held-out floors, empty-mask
    fractions. Returns (metrics, raw feature tables for the histograms)."""
    rng = np.random.default_rng(seed)
    real_is_heldout = np.asarray(real_is_heldout, bool)
    syn_t, syn_keep = feature_table(syn_images, syn_masks)
    real_t, real_keep = feature_table(real_images, real_masks)
    syn_lab, real_lab = syn_labels[syn_keep], real_labels[real_keep]
    real_held, real_grp = real_is_heldout[real_keep], real_groups[real_keep]
    out: dict[str, Any] = {"features": list(FEATURES), "per_class": {}, "warnings": [], "empty_masks": {}}
    raw = {"synthetic": (syn_t, syn_lab), "real": (real_t, real_lab, real_held)}
    for lab in sorted(set(syn_labels) | set(real_labels)):
        s_sel, r_sel = syn_labels == lab, (real_labels == lab) & ~real_is_heldout
        out["empty_masks"][lab] = {
            "synthetic": float((syn_masks[s_sel].reshape(s_sel.sum(), -1).sum(1) == 0).mean()) if s_sel.any() else None,
            "real_train": float((real_masks[r_sel].reshape(r_sel.sum(), -1).sum(1) == 0).mean()) if r_sel.any() else None}
    for lab in sorted(set(syn_lab) & set(real_lab)):
        s_idx = np.flatnonzero(syn_lab == lab)
        r_all = np.flatnonzero(real_lab == lab)
        held = real_held[r_all]
        n_tr, n_he = int((~held).sum()), int(held.sum())
        res: dict[str, Any] = {"n_synthetic": int(len(s_idx)), "n_real_train": n_tr, "n_heldout": n_he}
        if min(len(s_idx), n_tr, n_he) < MIN_LESIONS:
            res["skipped"] = (f"morphology needs at least {MIN_LESIONS} lesions per side, got synthetic {len(s_idx)}, "
                              f"real train {n_tr}, held-out {n_he}")
            out["per_class"][lab] = res
            continue
        if min(len(s_idx), n_he) < FEW_LESIONS:
            out["warnings"].append(f"morphology of class '{lab}' rests on few lesions (synthetic {len(s_idx)}, "
                                   f"held-out {n_he}; < {FEW_LESIONS}): distances are noisy")
        train_t = _take(real_t, r_all[~held])
        scale = {k: float(np.std(v)) if np.std(v) > 1e-9 else 1.0 for k, v in train_t.items()}
        n = min(len(s_idx), n_he)
        syn_d = [distances(train_t, _take(syn_t, s_idx[sub]), scale) for sub in subsets(len(s_idx), n, draws, rng)]
        floor_d = []
        for ref, he in real_resplits(real_grp[r_all], held, draws, rng):
            he = he if len(he) <= n else rng.choice(he, n, replace=False)
            floor_d.append(distances(_take(real_t, r_all[ref]), _take(real_t, r_all[he]), scale))
        feats: dict[str, Any] = {}
        for name in FEATURES:
            entry: dict[str, Any] = {
                "synthetic_mean": float(syn_t[name][s_idx].mean()), "real_train_mean": float(train_t[name].mean()),
                "real_train_std": scale[name]}
            for dist in ("wasserstein", "ks"):
                s = summarise([d[name][dist] for d in syn_d])
                f = summarise([d[name][dist] for d in floor_d])
                entry[dist] = {"synthetic": s, "floor": f, "verdict": verdict(s, f)}
            feats[name] = entry
        s = summarise([np.mean([d[k]["wasserstein"] for k in FEATURES]) for d in syn_d])
        f = summarise([np.mean([d[k]["wasserstein"] for k in FEATURES]) for d in floor_d])
        res.update(n=int(n), features=feats,
                   taller_than_wide={"synthetic": float((syn_t["height_width"][s_idx] > 1).mean()),
                                     "real_train": float((train_t["height_width"] > 1).mean())},
                   mean_wasserstein={"synthetic": s, "floor": f, "verdict": verdict(s, f)})
        out["per_class"][lab] = res
    return out, raw
