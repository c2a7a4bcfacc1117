"""Memorisation: is a synthetic image a (near) copy of a training image?

For each synthetic image (and, as the reference, each held-out real image) its nearest real training image:

1. pre-filter: the ``top_k`` training images with the highest correlation at 32 px (cheap matrix product);
2. similarity: normalised cross-correlation (NCC) maximised over integer shifts of up to ``max_shift`` px, at a
   working resolution of at most 64 px (area-downsampled; at 64 px and below the images themselves), so an
   exact copy scores 1 and a copy with a little noise or a shift of a few pixels still scores close to 1.

Reported: the synthetic images whose nearest NCC reaches ``threshold`` (ids + nearest training ids), the held-out
real images' nearest-training NCC as the natural reference for that threshold, a Carlini et al. (2023) style ratio
(L2 distance to the nearest training image / mean L2 distance to the 50 nearest) for synthetic and held-out images,
and a Meehan et al. (2020) style test: are synthetic images closer to the training set than held-out real images
are (one-sided Mann-Whitney U on 1 - NCC)?
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metrics.similarity import candidates

WORK_MAX = 64


def working(images: np.ndarray, size: int = WORK_MAX) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(images)).float()
    if t.shape[-1] > size:
        t = F.interpolate(t.unsqueeze(1), size=(size, size), mode="area").squeeze(1)
    return t


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-6)


def shifted_ncc(a: torch.Tensor, b: torch.Tensor, max_shift: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over shifts |dy|,|dx| <= max_shift of the NCC of a[i] and b[i] on their overlap. Returns (ncc, shift)."""
    s = a.shape[-1]
    best = torch.full((len(a),), -2.0)
    shift = torch.zeros(len(a), 2, dtype=torch.long)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            ya, yb = max(0, dy), max(0, -dy)
            xa, xb = max(0, dx), max(0, -dx)
            h, w = s - abs(dy), s - abs(dx)
            v = _ncc(a[:, ya:ya + h, xa:xa + w], b[:, yb:yb + h, xb:xb + w])
            better = v > best
            best = torch.where(better, v, best)
            shift[better] = torch.tensor([dy, dx])
    return best, shift


def nearest_ncc(query: np.ndarray, ref: np.ndarray, top_k: int = 10, max_shift: int = 2, batch: int = 2048
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each query image's highest shift-tolerant NCC against ``ref`` and that image's index."""
    cand = candidates(query, ref, top_k)
    k = cand.shape[1]
    q, r = working(query), working(ref)
    qi = torch.arange(len(query)).repeat_interleave(k)
    ri = cand.flatten()
    vals = torch.cat([shifted_ncc(q[qi[i:i + batch]], r[ri[i:i + batch]], max_shift)[0]
                      for i in range(0, len(qi), batch)]).view(len(query), k)
    best, pos = vals.max(1)
    return best.numpy().astype(np.float64), cand[torch.arange(len(query)), pos].numpy()


def carlini_ratio(query: np.ndarray, ref: np.ndarray, n_near: int = 50, chunk: int = 1024) -> np.ndarray:
    """L2 distance (pixels in [0,1], working resolution) to the nearest reference image divided by the mean
    distance to the ``n_near`` nearest (Carlini et al. 2023); near 0 = a copy standing out from its neighbours."""
    q = working(query).flatten(1) / 255.0
    r = working(ref).flatten(1) / 255.0
    rn = (r * r).sum(1)
    n_near = min(n_near, len(ref))
    out = []
    for i in range(0, len(q), chunk):
        qc = q[i:i + chunk]
        d2 = ((qc * qc).sum(1, keepdim=True) + rn[None] - 2 * qc @ r.T).clamp_min(0)
        d = d2.sqrt().topk(n_near, dim=1, largest=False).values
        out.append(d[:, 0] / d.mean(1).clamp_min(1e-12))
    return torch.cat(out).numpy().astype(np.float64)


def meehan_test(d_syn: np.ndarray, d_held: np.ndarray) -> dict[str, Any]:
    """One-sided Mann-Whitney U: are synthetic->train nearest distances smaller than held-out->train ones?"""
    from scipy.stats import mannwhitneyu
    if len(d_syn) < 2 or len(d_held) < 2:
        return {"skipped": f"needs at least 2 synthetic and 2 held-out images, got {len(d_syn)} and {len(d_held)}"}
    res = mannwhitneyu(d_syn, d_held, alternative="less")
    # P(d_syn < d_held) + 0.5 P(tie): 0.5 = synthetic images sit as far from the training set as new real images
    less = (d_syn[:, None] < d_held[None]).mean() + 0.5 * (d_syn[:, None] == d_held[None]).mean()
    return {"u_statistic": float(res.statistic), "p_value": float(res.pvalue),
            "prob_synthetic_closer": float(less), "n_synthetic": int(len(d_syn)), "n_heldout": int(len(d_held)),
            "reading": ("synthetic images are significantly closer to the training images than held-out real "
                        "images are (memorisation / overfitting signature)" if res.pvalue < 0.05 else
                        "no evidence that synthetic images sit closer to the training images than new real images")}


def _q(v: np.ndarray) -> dict[str, float]:
    p = np.percentile(v, [50, 95, 99])
    return {"mean": float(v.mean()), "median": float(p[0]), "p95": float(p[1]), "p99": float(p[2]),
            "max": float(v.max()), "min": float(v.min()), "n": int(len(v))}


def evaluate_memorisation(syn: np.ndarray, train: np.ndarray, heldout: np.ndarray, syn_ids: Sequence[str],
                          train_ids: Sequence[str], threshold: float = 0.95, top_k: int = 10,
                          max_shift: int = 2, n_closest: int = 8) -> tuple[dict[str, Any], dict[str, Any]]:
    """Memorisation metrics (see the module docstring). Returns (metrics, raw arrays for the report)."""
    s_ncc, s_idx = nearest_ncc(syn, train, top_k, max_shift)
    flagged = np.flatnonzero(s_ncc >= threshold)
    order = np.argsort(-s_ncc)
    out: dict[str, Any] = {
        "threshold": float(threshold),
        "similarity": (f"max NCC over shifts of up to {max_shift} px at <= {WORK_MAX} px, best of the top {top_k} "
                       "training images by 32-px correlation"),
        "n_synthetic": int(len(syn)), "n_train": int(len(train)),
        "n_flagged": int(len(flagged)),
        "flagged": [{"synthetic_id": syn_ids[i], "train_id": train_ids[s_idx[i]], "ncc": float(s_ncc[i])}
                    for i in flagged[np.argsort(-s_ncc[flagged])]],
        "synthetic_nearest_ncc": _q(s_ncc),
        "closest": [{"synthetic_id": syn_ids[i], "train_id": train_ids[s_idx[i]], "ncc": float(s_ncc[i])}
                    for i in order[:n_closest]],
    }
    s_ratio = carlini_ratio(syn, train)
    out["carlini_ratio"] = {"synthetic": _q(s_ratio), "n_near": int(min(50, len(train))),
                            "note": "L2 to nearest / mean L2 to the 50 nearest training images; near 0 = copy"}
    raw: dict[str, Any] = {"syn_ncc": s_ncc, "syn_idx": s_idx, "flagged": flagged, "order": order}
    if len(heldout):
        h_ncc, _ = nearest_ncc(heldout, train, top_k, max_shift)
        out["heldout_nearest_ncc"] = _q(h_ncc)
        out["heldout_above_threshold"] = int((h_ncc >= threshold).sum())
        out["carlini_ratio"]["heldout"] = _q(carlini_ratio(heldout, train))
        out["meehan"] = meehan_test(1.0 - s_ncc, 1.0 - h_ncc)
        if out["heldout_above_threshold"]:
            out["threshold_warning"] = (f"{out['heldout_above_threshold']} of {len(h_ncc)} held-out real images also "
                                        f"reach NCC {threshold} with a training image: the threshold is within the "
                                        "natural similarity of this data (near-duplicate acquisitions?) — raise it")
        raw["held_ncc"] = h_ncc
    return out, raw
