"""Real-data floors (issue 10): a number about the synthetic set is read beside the same number between the real
training images and the held-out real images (val + test) at the same N, with the synthetic side subsampled to that
N over several draws; the floor's spread comes from the official split plus random group-respecting re-splits of
the real images. Shared by FID/KID/IS, similarity and morphology. See :func:`verdict`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np


class MetricUnavailable(Exception):
    """One metric cannot be computed (too few images, no logits, ...); the others still are."""


def summarise(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return {"mean": None, "std": None, "draws": []}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "draws": [float(x) for x in v]}


def subsets(n_total: int, n: int, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` random subsets of size ``n`` (all of them when ``n >= n_total``)."""
    if n >= n_total:
        return [np.arange(n_total)] * draws
    return [np.sort(rng.choice(n_total, n, replace=False)) for _ in range(draws)]


def real_resplits(groups: Sequence[str], is_heldout: np.ndarray, draws: int, rng: np.random.Generator,
                  labels: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Floor splits of the pooled real images: (reference idx, held-out idx) — first the official split, then
    random re-splits that keep each group (patient / identical images) on one side and, like the official split,
    hold out the official number of images of each label (a group counts under the label of its first image)."""
    is_heldout = np.asarray(is_heldout, bool)
    out = [(np.flatnonzero(~is_heldout), np.flatnonzero(is_heldout))]
    groups = np.asarray(groups)
    labels = np.zeros(len(groups), int) if labels is None else np.asarray(labels)
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_label = labels[first]
    for _ in range(max(0, draws - 1)):
        held_parts, taken_groups = [], []
        for lab in np.unique(labels):
            target = int((is_heldout & (labels == lab)).sum())
            got: list[int] = []
            for g in rng.permutation(np.flatnonzero(group_label == lab)):
                if len(got) >= target:
                    break
                got.extend(np.flatnonzero(inverse == g).tolist())
                taken_groups.append(g)
            held_parts.extend(got[:target])
        taken = np.isin(inverse, taken_groups)
        # images of a group that did not fit stay out of both sides (never leak into the reference)
        out.append((np.flatnonzero(~taken), np.sort(np.asarray(held_parts, int))))
    return out


def verdict(synthetic: dict[str, Any], floor: dict[str, Any], kind: str = "distance",
            ratio_ok: bool = True) -> str:
    """"within floor" when the synthetic mean is within 2 combined standard deviations of the real-vs-real floor.

    ``kind="distance"`` (lower is better; FID, KID, morphology distances): only exceeding the floor counts, shown as
    "above floor (2.3x)" (or "+0.012" when a ratio means nothing, e.g. KID near 0). ``kind="level"`` (IS, nearest
    SSIM, MS-SSIM): a difference either way counts, "above floor (+0.08)" / "below floor (-0.08)".
    """
    s, f = synthetic.get("mean"), floor.get("mean")
    if s is None or f is None:
        return "n/a"
    tol = 2.0 * math.hypot(synthetic.get("std") or 0.0, floor.get("std") or 0.0) + 1e-9 * max(1.0, abs(f))
    diff = s - f
    if kind == "distance":
        if diff <= tol:
            return "within floor"
        if ratio_ok and f > 0 and s / f >= 1.05:
            return f"above floor ({s / f:.1f}x)"
        return f"above floor (+{diff:.3g})"
    if abs(diff) <= tol:
        return "within floor"
    return f"{'above' if diff > 0 else 'below'} floor ({diff:+.3g})"


def metric_with_floor(fn: Callable[[np.ndarray, np.ndarray], float], syn_idx: np.ndarray, ref_idx: np.ndarray,
                      splits: list[tuple[np.ndarray, np.ndarray]], n: int, draws: int, rng: np.random.Generator,
                      kind: str = "distance", ratio_ok: bool = True) -> dict[str, Any]:
    """``fn(eval_idx, ref_idx)`` for synthetic subsets of size ``n`` against the official reference, and for each
    floor split (held-out side subsampled to ``n``) against that split's reference."""
    syn = [fn(sub, ref_idx) for sub in (syn_idx[s] for s in subsets(len(syn_idx), n, draws, rng))]
    flo = []
    for ref, held in splits:
        sub = held if len(held) <= n else np.sort(rng.choice(held, n, replace=False))
        flo.append(fn(sub, ref))
    s, f = summarise(syn), summarise(flo)
    return {"synthetic": s, "floor": f, "n": int(n), "floor_official": float(flo[0]),
            "verdict": verdict(s, f, kind, ratio_ok)}

