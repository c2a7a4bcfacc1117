"""Image-quality metrics of a synthetic set against real data: FID, KID, IS, FID-infinity, each beside its real-data
floor (:mod:`metrics.floors`). The features are :mod:`metrics.inception`'s.

The metric maths are torch-fidelity's: FID is ``fid_featuresdict_to_statistics`` + ``fid_statistics_to_metric``, KID
``kid_features_to_metric``, IS ``isc_features_to_metric``.

Small sets: FID over fewer images than feature dimensions (2048) uses the exact low-rank identity
``tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((n1-1)(n2-1))`` (A = centred features), which gives torch-fidelity's value
(tests check the agreement) in milliseconds instead of a 2048x2048 non-symmetric eigendecomposition; the headline
overall FID is also computed with torch-fidelity's own function and both are recorded.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from metrics.floors import MetricUnavailable, metric_with_floor, real_resplits
from metrics.inception import FEATURE, LOGITS

MIN_IMAGES = {"fid": 10, "kid": 10, "is": 20}
FEW_IMAGES = 100          # a per-class FID/KID/IS over fewer images than this gets a warning line
KID_MAX_SUBSET = 1000


# ============================================================================ metric maths
def fid_torch_fidelity(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """torch-fidelity's own FID: statistics of each featuresdict, then ``fid_statistics_to_metric``."""
    from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_featuresdict_to_statistics,
                                           fid_statistics_to_metric)
    s1 = fid_featuresdict_to_statistics({FEATURE: f1}, FEATURE)
    s2 = fid_featuresdict_to_statistics({FEATURE: f2}, FEATURE)
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def fid_lowrank(f1: torch.Tensor | np.ndarray, f2: torch.Tensor | np.ndarray) -> float:
    """The same FID (same unbiased covariances) via ``tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((n1-1)(n2-1))``."""
    a = np.asarray(f1, dtype=np.float64)
    b = np.asarray(f2, dtype=np.float64)
    n1, n2 = len(a), len(b)
    diff = a.mean(0) - b.mean(0)
    a = a - a.mean(0)
    b = b - b.mean(0)
    tr1 = float((a * a).sum()) / (n1 - 1)
    tr2 = float((b * b).sum()) / (n2 - 1)
    sv = np.linalg.svd(a @ b.T / math.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False)
    return float(diff @ diff + tr1 + tr2 - 2.0 * sv.sum())


def fid(f1, f2) -> float:
    """FID; the low-rank identity when a set has fewer images than feature dimensions, else torch-fidelity's."""
    if min(len(f1), len(f2)) < MIN_IMAGES["fid"]:
        raise MetricUnavailable(f"FID needs at least {MIN_IMAGES['fid']} images per set, got {len(f1)} and {len(f2)}")
    if min(len(f1), len(f2)) <= f1.shape[1]:
        return fid_lowrank(f1, f2)
    return fid_torch_fidelity(torch.as_tensor(f1), torch.as_tensor(f2))


def kid(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 100, seed: int = 0,
        subset_size: int | None = None) -> tuple[float, float, int]:
    """torch-fidelity's KID (polynomial kernel); subset size min(1000, smallest N). Returns mean, std, size."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    n = min(len(f1), len(f2))
    if n < MIN_IMAGES["kid"]:
        raise MetricUnavailable(f"KID needs at least {MIN_IMAGES['kid']} images per set, got {len(f1)} and {len(f2)}")
    size = min(KID_MAX_SUBSET, n) if subset_size is None else min(subset_size, n)
    out = kid_features_to_metric(torch.as_tensor(f1), torch.as_tensor(f2), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD]), size


def inception_score(logits: torch.Tensor | None, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    if logits is None:
        raise MetricUnavailable("IS unavailable: the offline FID Inception has no classifier (logits); use "
                                "--inception_weights download or a torch-fidelity weights file for IS")
    if len(logits) < MIN_IMAGES["is"]:
        raise MetricUnavailable(f"IS needs at least {MIN_IMAGES['is']} images, got {len(logits)}")
    out = isc_features_to_metric(torch.as_tensor(logits), splits=splits, shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def fid_infinity(f_eval, f_ref, points: int = 5, reps: int = 3, min_frac: float = 0.5, seed: int = 0
                 ) -> dict[str, Any]:
    """FID-infinity (Chong & Forsyth 2020): FID of random subsets of ``f_eval`` (sizes from ``min_frac*N`` to N)
    against the fixed reference ``f_ref``, a linear fit of FID against 1/N, extrapolated to 1/N = 0.

    Only the evaluated side's small-sample bias is removed; the reference set's own finite size still counts.
    """
    n = len(f_eval)
    lo = max(MIN_IMAGES["fid"], int(math.ceil(n * min_frac)))
    if n < 2 * MIN_IMAGES["fid"] or lo >= n:
        raise MetricUnavailable(f"FID-infinity needs at least {2 * MIN_IMAGES['fid']} images, got {n}")
    sizes = sorted({int(round(s)) for s in np.linspace(lo, n, points)})
    rng = np.random.default_rng(seed)
    means = []
    for size in sizes:
        vals = [fid(f_eval[rng.choice(n, size, replace=False)], f_ref) for _ in range(1 if size == n else reps)]
        means.append(float(np.mean(vals)))
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, float), means, 1)
    return {"value": float(intercept), "slope": float(slope), "sizes": sizes, "fid_at_sizes": means}


def _few(warnings: list[str], what: str, label: str, n_syn: int, n_ref: int, n_held: int) -> None:
    if min(n_syn, n_held) < FEW_IMAGES:
        which = "over all classes" if label == "all" else f"for class '{label}'"
        warnings.append(f"{what} {which} rests on few images (synthetic {n_syn}, real train {n_ref}, "
                        f"held-out {n_held}; < {FEW_IMAGES}): read it as indicative only")


def evaluate_generation(feats: dict[str, dict[str, torch.Tensor]], labels: dict[str, np.ndarray],
                        real_groups: np.ndarray, real_is_heldout: np.ndarray, draws: int = 5, seed: int = 0,
                        kid_subsets: int = 100, metrics: Sequence[str] = ("fid", "kid", "is"),
                        fid_inf: bool = True) -> dict[str, Any]:
    """FID / KID / IS (+ FID-infinity) of the synthetic set against the real training images, overall and per
    class, each beside its real-vs-real floor.

    ``feats`` has keys ``synthetic`` and ``real`` (real = train and held-out images together, in the order of
    ``real_groups`` / ``real_is_heldout``), each a torch-fidelity featuresdict. ``labels`` likewise.
    """
    rng = np.random.default_rng(seed)
    syn_f, real_f = feats["synthetic"][FEATURE], feats["real"][FEATURE]
    syn_l, real_l = feats["synthetic"].get(LOGITS), feats["real"].get(LOGITS)
    all_f = torch.cat([syn_f, real_f]).numpy()
    all_l = None if syn_l is None or real_l is None else torch.cat([syn_l, real_l])
    n_syn = len(syn_f)
    real_is_heldout = np.asarray(real_is_heldout, bool)
    out: dict[str, Any] = {"warnings": [], "per_class": {}}

    def block(syn_idx: np.ndarray, real_idx: np.ndarray, label: str) -> dict[str, Any]:
        held_mask = real_is_heldout[real_idx]
        ref_idx = n_syn + real_idx[~held_mask]
        splits = [(n_syn + real_idx[r], n_syn + real_idx[h]) for r, h in
                  real_resplits(real_groups[real_idx], held_mask, draws, rng, labels["real"][real_idx])]
        n_held = int(held_mask.sum())
        n = min(len(syn_idx), n_held)
        res: dict[str, Any] = {"n_synthetic": int(len(syn_idx)), "n_real_train": int(len(ref_idx)),
                               "n_heldout": n_held, "n": int(n)}
        computed = False
        for name in metrics:
            try:
                if min(len(syn_idx), len(ref_idx), n_held) < MIN_IMAGES[name]:
                    raise MetricUnavailable(
                        f"{name.upper()} needs at least {MIN_IMAGES[name]} images on each side, got synthetic "
                        f"{len(syn_idx)}, real train {len(ref_idx)}, held-out {n_held}")
                res[name] = _one_metric(name, syn_idx, ref_idx, splits, n, rng, all_f, all_l, draws, kid_subsets,
                                        seed)
                computed = True
            except MetricUnavailable as exc:
                res[name] = {"skipped": str(exc)}
        if computed:
            _few(out["warnings"], "FID/KID/IS", label, len(syn_idx), len(ref_idx), n_held)
        if fid_inf and "fid" in metrics:
            try:
                res["fid_infinity"] = {
                    "synthetic": fid_infinity(all_f[syn_idx], all_f[ref_idx], seed=seed),
                    "floor": fid_infinity(all_f[splits[0][1]], all_f[splits[0][0]], seed=seed)}
            except MetricUnavailable as exc:
                res["fid_infinity"] = {"skipped": str(exc)}
        return res

    out["all"] = block(np.arange(n_syn), np.arange(len(real_f)), "all")
    for label in sorted(set(labels["synthetic"]) & set(labels["real"])):
        syn_idx = np.flatnonzero(labels["synthetic"] == label)
        real_idx = np.flatnonzero(labels["real"] == label)
        if real_is_heldout[real_idx].sum() == 0 or len(syn_idx) == 0:
            continue
        out["per_class"][label] = block(syn_idx, real_idx, label)
    n_all = out["all"]["n"]
    out["headline"] = "kid" if n_all < KID_MAX_SUBSET else "fid"
    out["headline_reason"] = (f"KID is the headline: N={n_all} < {KID_MAX_SUBSET} makes FID mostly small-sample bias "
                              "(read FID only beside its floor)" if n_all < KID_MAX_SUBSET else
                              f"N={n_all} >= {KID_MAX_SUBSET}: FID and KID both usable")
    return out


def _one_metric(name, syn_idx, ref_idx, splits, n, rng, all_f, all_l, draws, kid_subsets, seed):
    if name == "fid":
        res = metric_with_floor(lambda e, r: fid(all_f[e], all_f[r]), syn_idx, ref_idx, splits, n, draws, rng)
        res["full_sets"] = fid(all_f[syn_idx], all_f[ref_idx])
        return res
    if name == "kid":
        # each draw averages fewer KID subsets (the draws average again); the full-set KID uses kid_subsets
        draw_subsets = max(10, kid_subsets // 4)
        res = metric_with_floor(lambda e, r: kid(torch.from_numpy(all_f[e]), torch.from_numpy(all_f[r]),
                                                 draw_subsets, seed)[0],
                                syn_idx, ref_idx, splits, n, draws, rng, ratio_ok=False)
        mean, std, size = kid(torch.from_numpy(all_f[syn_idx]), torch.from_numpy(all_f[ref_idx]), kid_subsets, seed)
        res["full_sets"] = {"mean": mean, "std": std, "subset_size": size}
        return res
    if all_l is None:
        inception_score(None)
    res = metric_with_floor(lambda e, r: inception_score(all_l[e], seed=seed)[0], syn_idx, ref_idx, splits, n,
                            draws, rng, kind="level")
    mean, std = inception_score(all_l[syn_idx], seed=seed)
    res["full_sets"] = {"mean": mean, "std": std}
    res["real_train"] = inception_score(all_l[ref_idx], seed=seed)[0]
    return res
