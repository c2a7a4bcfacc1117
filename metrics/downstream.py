"""Downstream statistics: did training on real + synthetic data change a segmenter's results on the real test
images? The one code path behind evaluate.py's comparison and bench/evidence.py's arm table and comparisons.

**Data.** An *arm* is one training configuration trained with several seeds; every run writes
``per_image_test.csv`` (:mod:`metrics.seg_eval`) over the same real test images. For arm ``a`` and a column
(dice, iou, hd95, and ``correct`` = the predicted class is the true one) this is a matrix ``Y_a[s, i]`` over seeds
``s`` and test images ``i``; NaN where a value is undefined (Dice of an image without a lesion; ``correct`` of a
run without a class head).

**Estimates** (:data:`METRICS`, one name per quantity). Each image's value is first averaged over the arm's seeds,
``m_a[i] = mean_s Y_a[s, i]``; a metric is then the mean of ``m_a`` over a set of images (Dice over every lesion
image, ``dice_malignant`` over the malignant images, ``malignant_recall`` = mean ``correct`` over the malignant
images, ``benign_recall`` over the benign ones: the share of benign tumours called benign, the specificity of a
malignant call when no tumour is called normal), or for ``balanced_accuracy`` the mean over the tumour classes
of each class's mean ``correct`` (metrics/seg_eval.py's definition). A comparison is combined − baseline on the
images where both arms have a value. A class absent from the test split gives NaN with n 0, not an error.

**Intervals: a two-level (hierarchical) bootstrap of a crossed design.** Every replicate draws, independently and
with replacement,

1. each arm's training seeds (``S_a`` draws from its ``S_a`` runs): a run is one draw of the training randomness.
   Arms are *not* paired by seed: they train independently on different data, so "seed 0" of one arm shares
   nothing with "seed 0" of another beyond its initial weights. (If a shared part existed, ignoring its positive
   covariance would make the interval wider, not narrower.)
2. the test images, within each class (stratified: the test split's class mix is fixed by the official fold),
   the same images for both arms: images *are* paired, every arm is scored on each of them;

and recomputes the statistic from the resampled seeds and images. ``scipy.stats.bootstrap`` resamples the
elements of one array, or the shared indices of paired arrays; it has no resampling of two crossed factors of
one array. So it is given the *indices* of each factor as separate samples (each arm's seed indices, each
class's image indices) with ``paired=False``, which it resamples independently of each other: that is exactly
the two-level scheme above, and its intervals (percentile by default, or BCa) are used as they come. The
vectorised statistic turns each resampled index array into multiplicity weights (a seed drawn twice counts
twice), so nothing is resampled by hand. A factor with one level (one run, a class with one image) is held fixed.

Percentile is the default because BCa's acceleration is a jackknife over each factor, here 3 leave-one-seed-out
values per arm, too few to estimate a skewness, and because the p-value below is the one that matches the
percentile interval. Known limits, not corrected: with ``S`` seeds the bootstrap gives the seed mean
``(S - 1) / S`` of its usual variance (2/3 at 3 seeds: narrow); resampling both factors of a crossed design counts
the seed x image interaction more than once (McCullagh 2000, Bernoulli 6(2): wide).

**p-values**: two-sided, from the bootstrap distribution of the difference,
``p = min(1, 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1))``: the level at which the equal-tailed percentile
interval would just reach zero (with the +1 of Davison & Hinkley 1997, eq. 4.11, so it is never 0).
**Multiplicity**: :func:`finalise_family` marks one declared primary endpoint (:data:`PRIMARY_METRIC` of one
comparison), tested alone at its own p; every other comparison x metric is secondary and gets a Holm (1979)
step-down adjusted ``p_holm`` over that whole secondary family (:func:`holm`; statsmodels is not a dependency).
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.errors import UserError
from data.pairs import TUMOUR_LABELS

__all__ = ["Metric", "METRICS", "RENAMED", "PRIMARY_METRIC", "COLUMNS", "Arm", "read_per_image", "load_arm",
           "arm_statistics", "compare_arms", "compare_runs", "seeds_pooled", "holm", "finalise_family",
           "bootstrap_p_value"]

COLUMNS = ("dice", "iou", "hd95", "correct")
RUN_COLUMNS = ("id", "label", "dice", "iou", "hd95", "pred_label")
N_BOOT = 9999            # scipy.stats.bootstrap's default number of resamples
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Metric:
    """One reported quantity: the mean of ``column`` over the images of ``classes`` (None: every image with a
    value); with ``balanced`` the mean over those classes of each class's mean instead."""

    column: str
    classes: tuple[str, ...] | None
    name: str
    better: str = "higher"
    balanced: bool = False


METRICS: dict[str, Metric] = {
    "dice": Metric("dice", None, "Dice"),
    "iou": Metric("iou", None, "IoU"),
    "hd95": Metric("hd95", None, "HD95 (px)", better="lower"),
    "dice_malignant": Metric("dice", ("malignant",), "Dice, malignant images"),
    "dice_benign": Metric("dice", ("benign",), "Dice, benign images"),
    "hd95_malignant": Metric("hd95", ("malignant",), "HD95 (px), malignant images", better="lower"),
    "hd95_benign": Metric("hd95", ("benign",), "HD95 (px), benign images", better="lower"),
    "balanced_accuracy": Metric("correct", tuple(TUMOUR_LABELS), "balanced accuracy", balanced=True),
    "malignant_recall": Metric("correct", ("malignant",), "malignant recall"),
    "benign_recall": Metric("correct", ("benign",), "benign recall"),
}
# keys a results file written before the renaming may hold: old key -> key of METRICS
RENAMED = {"benign_specificity": "benign_recall"}
PRIMARY_METRIC = "dice"   # tumour Dice over every lesion image of the real test split


# ============================================================================ reading runs
def _float(text: str | None) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def read_per_image(run) -> dict[str, dict[str, Any]]:
    """A run's per-image test results, ``{id: {label, dice, iou, hd95, correct}}``.

    ``run`` is a train_segmentation.py run folder (its ``per_image_test.csv`` is read) or the CSV file itself.
    ``correct`` is 1/0 when the run predicted a class, NaN when its ``pred_label`` cell is empty (no class head)."""
    path = Path(run)
    if path.is_dir():
        path = path / "per_image_test.csv"
    if not path.is_file():
        raise UserError(f"{path}: not found (is {run} a finished train_segmentation.py run?)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in RUN_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
        return {r["id"]: {"label": r["label"], "dice": _float(r["dice"]), "iou": _float(r["iou"]),
                          "hd95": _float(r["hd95"]),
                          "correct": float(r["pred_label"] == r["label"]) if r["pred_label"] else float("nan")}
                for r in reader}


@dataclass
class Arm:
    """The runs (seeds) of one arm on their shared test images: ``values[column]`` is ``[n_runs, n_images]``."""

    runs: list[str]
    ids: list[str]
    labels: np.ndarray
    values: dict[str, np.ndarray] = field(repr=False)
    all_ids: frozenset = frozenset()    # every image any run scored (ids holds those every run scored)

    def subset(self, ids: Sequence[str]) -> "Arm":
        pos = {i: k for k, i in enumerate(self.ids)}
        idx = np.array([pos[i] for i in ids], dtype=np.int64)
        return Arm(self.runs, list(ids), self.labels[idx], {c: v[:, idx] for c, v in self.values.items()},
                   self.all_ids)


def seeds_pooled(arm: Arm) -> Arm:
    """The arm as one run whose per-image values are the means over its seeds: bootstrapping it resamples test
    images only (the first run's method; kept to show what resampling the seeds adds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # an image without any value stays NaN
        values = {c: np.nanmean(v, axis=0, keepdims=True) for c, v in arm.values.items()}
    return Arm([f"mean of {len(arm.runs)} runs"], arm.ids, arm.labels, values, arm.all_ids)


def load_arm(runs: Sequence) -> Arm:
    """Read every run of an arm (folders or per-image CSV files); keeps the images every run scored."""
    runs = [str(r) for r in runs]
    if not runs:
        raise UserError("an arm needs at least one run")
    tables = [read_per_image(r) for r in runs]
    ids = sorted(set(tables[0]).intersection(*tables[1:]))
    for r, t in zip(runs[1:], tables[1:]):
        bad = [i for i in ids if t[i]["label"] != tables[0][i]["label"]]
        if bad:
            raise UserError(f"{r}: image {bad[0]} is labelled {t[bad[0]]['label']!r} there and "
                            f"{tables[0][bad[0]]['label']!r} in {runs[0]} (runs of one arm on different test sets?)")
    labels = np.array([tables[0][i]["label"] for i in ids], dtype=object)
    values = {c: np.array([[t[i][c] for i in ids] for t in tables], dtype=np.float64).reshape(len(tables), len(ids))
              for c in COLUMNS}
    return Arm(runs, ids, labels, values, frozenset().union(*tables))


# ============================================================================ the two-level bootstrap
def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Resampled indices [..., k] -> multiplicity weights [L, n] (L = product of the leading dimensions)."""
    flat = idx.reshape(-1, idx.shape[-1]).astype(np.int64)
    rows = flat.shape[0]
    return np.bincount((flat + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n)


class _Design:
    """The statistic of :func:`_bootstrap` over the factors (seeds of each arm, images of each class)."""

    def __init__(self, arms: list[Arm], signs: Sequence[float], names: Sequence[str], keep: dict[str, np.ndarray]):
        self.arms, self.signs, self.names, self.keep = arms, list(signs), list(names), keep
        labels = arms[0].labels
        self.n_images = len(labels)
        self.strata = [np.flatnonzero(labels == lab) for lab in sorted(set(labels.tolist()))]
        self.factors = ([("seed", a) for a, arm in enumerate(arms) if len(arm.runs) >= 2]
                        + [("image", s) for s, idx in enumerate(self.strata) if len(idx) >= 2])
        self.data = tuple(np.arange(len(arms[k].runs) if kind == "seed" else len(self.strata[k]))
                          for kind, k in self.factors)
        self.groups = {}   # metric -> image masks of its groups (the classes present, when balanced)
        for name in names:
            m = METRICS[name]
            sel = [keep[name] & (labels == c) for c in m.classes] if m.balanced else [keep[name]]
            self.groups[name] = [g for g in sel if g.any()]
        self.filled = [{c: np.nan_to_num(arm.values[c]) for c in COLUMNS} for arm in arms]
        self.finite = [{c: np.isfinite(arm.values[c]).astype(np.float64) for c in COLUMNS} for arm in arms]

    def __call__(self, *idx: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = idx[0].shape[:-1] if idx else ()
        rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
        seed_w = [np.ones((rows, len(arm.runs))) for arm in self.arms]
        img_w = np.ones((rows, self.n_images))
        for (kind, k), ix in zip(self.factors, idx):
            if kind == "seed":
                seed_w[k] = _counts(ix, len(self.arms[k].runs)).astype(np.float64)
            else:
                img_w[:, self.strata[k]] = _counts(ix, len(self.strata[k]))
        out = np.zeros((len(self.names), rows))
        cache: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        for j, name in enumerate(self.names):
            col = METRICS[name].column
            for a, sign in enumerate(self.signs):
                if (a, col) not in cache:   # per-image means over the resampled seeds, [rows, n_images]
                    den = seed_w[a] @ self.finite[a][col]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        cache[a, col] = (np.where(den > 0, (seed_w[a] @ self.filled[a][col]) / den, 0.0),
                                         (den > 0).astype(np.float64))
                mean, has = cache[a, col]
                per_group = []
                for sel in self.groups[name]:
                    w = img_w * sel
                    with np.errstate(invalid="ignore", divide="ignore"):
                        per_group.append((w * mean).sum(1) / (w * has).sum(1))
                out[j] += sign * np.mean(per_group, axis=0)
        return out.reshape((len(self.names), *lead))


def bootstrap_p_value(distribution: np.ndarray) -> float:
    """Two-sided p of "no difference" from a bootstrap distribution (module docstring); NaN without finite values."""
    d = np.asarray(distribution, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    return float(min(1.0, 2.0 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / (len(d) + 1)))


def _bootstrap(arms: list[Arm], signs: Sequence[float], names: Sequence[str], keep: dict[str, np.ndarray],
               n_boot: int, seed: int, method: str, confidence: float) -> tuple[dict[str, dict[str, float]], str]:
    """Estimate, interval and p of ``sum(sign * statistic(arm))`` for each metric; returns (results, ci_method)."""
    from scipy.stats import bootstrap
    design = _Design(arms, signs, names, keep)
    estimate = design(*design.data)
    runs = " and ".join(str(len(a.runs)) for a in arms)
    fixed = sum(len(s) < 2 for s in design.strata)
    if not design.factors or n_boot < 1:
        why = "no factor has two levels" if not design.factors else "no resamples asked for"
        return ({n: {"estimate": float(estimate[j]), "ci_low": float("nan"), "ci_high": float("nan"),
                     "p_value": float("nan")} for j, n in enumerate(names)}, f"none ({why})")
    res = bootstrap(design.data, design, n_resamples=n_boot, batch=min(n_boot, 2000), paired=False,
                    vectorized=True, axis=-1, confidence_level=confidence, method=method,
                    rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution
    if len(signs) > 1:   # a difference: the p of "no difference"
        ps = [bootstrap_p_value(dist[j]) for j in range(len(names))]
    else:
        ps = [float("nan")] * len(names)
    seeds = [len(a.runs) for a in arms]
    seed_text = ("each arm's training seeds resampled independently (" if len(arms) > 1 else
                 "the arm's training seeds resampled (") + f"{runs} runs)"
    if all(s < 2 for s in seeds):
        seed_text = f"one run per arm, so training-seed variance is NOT in the interval ({runs} runs)"
    elif any(s < 2 for s in seeds):
        seed_text = seed_text[:-1] + "; an arm with one run adds no seed variance)"
    how = (f"two-level bootstrap (scipy.stats.bootstrap, {method}, {n_boot} resamples, {confidence:.0%}): "
           f"{seed_text}, then the test images resampled within their class"
           + (", paired across arms" if len(arms) > 1 else "")
           + (f" ({fixed} class(es) with a single image held fixed)" if fixed else ""))
    out = {n: {"estimate": float(estimate[j]), "ci_low": float(res.confidence_interval.low[j]),
               "ci_high": float(res.confidence_interval.high[j]), "p_value": ps[j]} for j, n in enumerate(names)}
    return out, how


def _keep(arms: list[Arm], name: str) -> np.ndarray:
    """Images in the metric's classes with a value in every arm (some seed of each)."""
    m = METRICS[name]
    ok = np.ones(len(arms[0].ids), bool)
    for arm in arms:
        ok &= np.isfinite(arm.values[m.column]).any(axis=0)
    if m.classes is not None:
        ok &= np.isin(arms[0].labels, list(m.classes))
    return ok


def _absent(name: str, arms: list[Arm]) -> str:
    m = METRICS[name]
    where = f"{'/'.join(m.classes)} image" if m.classes else "image"
    return f"no test {where} has a {m.column} value" + (" in both arms" if len(arms) > 1 else "")


def _check(names: Sequence[str], method: str, confidence: float) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})")
    if method not in ("percentile", "BCa", "basic"):
        raise UserError(f"bootstrap method must be percentile, BCa or basic, got {method!r}")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"confidence must be in (0, 1), got {confidence}")


def arm_statistics(arm: Arm, names: Sequence[str] = tuple(METRICS), n_boot: int = N_BOOT, seed: int = 0,
                   method: str = "percentile", confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Each metric of one arm: ``{mean, ci_low, ci_high, n, per_seed}`` (``per_seed``: the metric of each run
    alone), plus ``ci_method``. A metric without images is ``{mean: NaN, ci_low: NaN, ci_high: NaN, n: 0}``."""
    _check(names, method, confidence)
    keep = {n: _keep([arm], n) for n in names}
    live = [n for n in names if keep[n].any()]
    res, how = _bootstrap([arm], [1.0], live, keep, n_boot, seed, method, confidence) if live else ({}, "none")
    out: dict[str, Any] = {"ci_method": how}
    for n in names:
        if n not in res:
            out[n] = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0,
                      "skipped": _absent(n, [arm])}
            continue
        per_seed = []
        for s in range(len(arm.runs)):
            one = Arm([arm.runs[s]], arm.ids, arm.labels, {c: v[s:s + 1] for c, v in arm.values.items()})
            per_seed.append(float(_Design([one], [1.0], [n], keep)()[0]))
        out[n] = {"mean": res[n]["estimate"], "ci_low": res[n]["ci_low"], "ci_high": res[n]["ci_high"],
                  "n": int(keep[n].sum()), "per_seed": per_seed}
    return out


def compare_arms(baseline: Arm, combined: Arm, names: Sequence[str] = tuple(METRICS), n_boot: int = N_BOOT,
                 seed: int = 0, method: str = "percentile", confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Combined − baseline for each metric on the test images both arms scored (module docstring).

    Returns ``{n_images, n_baseline_runs, n_combined_runs, ci_method, metrics: {name: {mean_diff, ci_low,
    ci_high, ci, p_value, n, n_boot, baseline, combined, better}}, note}``; ``p_holm``, ``role`` and ``primary``
    are added by :func:`finalise_family`. ``{"skipped": why}`` when the arms share no test image."""
    _check(names, method, confidence)
    ids = sorted(set(baseline.ids) & set(combined.ids))
    if not ids:
        return {"skipped": "the baseline and combined runs share no test image ids (different test sets?)"}
    base, comb = baseline.subset(ids), combined.subset(ids)
    if list(base.labels) != list(comb.labels):
        bad = next(i for i, a, b in zip(ids, base.labels, comb.labels) if a != b)
        raise UserError(f"test image {bad} has different labels in the baseline and combined runs")
    out: dict[str, Any] = {"n_images": len(ids), "n_baseline_runs": len(base.runs),
                           "n_combined_runs": len(comb.runs), "metrics": {}}
    union = len(baseline.all_ids | combined.all_ids | set(baseline.ids) | set(combined.ids))
    if union > len(ids):
        out["warning"] = f"only {len(ids)} of {union} test images are in every run's per_image_test.csv"
    keep = {n: _keep([base, comb], n) for n in names}
    live = [n for n in names if keep[n].any()]
    res, how = (_bootstrap([base, comb], [-1.0, 1.0], live, keep, n_boot, seed, method, confidence)
                if live else ({}, "none"))
    out["ci_method"] = how
    for n in names:
        m = METRICS[n]
        if n not in res:
            out["metrics"][n] = {"mean_diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                                 "p_value": float("nan"), "n": 0, "better": m.better, "skipped": _absent(n, [base, comb])}
            continue
        sides = {side: float(_Design([arm], [1.0], [n], keep)()[0]) for side, arm in (("baseline", base),
                                                                                       ("combined", comb))}
        out["metrics"][n] = {"mean_diff": res[n]["estimate"], "ci_low": res[n]["ci_low"],
                             "ci_high": res[n]["ci_high"], "ci": confidence, "p_value": res[n]["p_value"],
                             "n": int(keep[n].sum()), "n_boot": int(n_boot), **sides, "better": m.better}
    out["note"] = ("combined − baseline on the same real test images: each image's value averaged over an arm's "
                   "seeds, then the mean over images (balanced accuracy: the mean of the benign and malignant "
                   "recalls); Dice/IoU/HD95 over lesion images; per-class rows over that class's images; "
                   f"CI: {how}; p: two-sided, from the same bootstrap distribution")
    return out


def compare_runs(baseline_runs: Sequence, combined_runs: Sequence, **kwargs) -> dict[str, Any]:
    """:func:`compare_arms` of two lists of runs (folders or per-image CSV files)."""
    return compare_arms(load_arm(baseline_runs), load_arm(combined_runs), **kwargs)


# ============================================================================ multiplicity
def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values, in the input order. With ``m`` finite p-values sorted ascending,
    ``p_holm(k) = max_{j <= k} min(1, (m - j + 1) p(j))``; NaN entries are not in the family and stay NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return out
    if (p[ok] < 0).any() or (p[ok] > 1).any():
        raise ValueError(f"p-values must be in [0, 1], got {p[ok].min()} .. {p[ok].max()}")
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def finalise_family(comparisons: dict[str, dict[str, Any]], primary: str | None,
                    primary_metric: str = PRIMARY_METRIC) -> dict[str, Any]:
    """Mark the primary endpoint and Holm-adjust the rest, in place.

    ``primary`` names the comparison whose ``primary_metric`` is the one declared primary endpoint: its
    ``p_holm`` is its own p (one pre-declared test). Every other comparison x metric with a p is secondary and
    gets ``p_holm`` adjusted over all of them together. Each comparison gets ``primary`` (bool) and each metric
    ``role``. Returns ``{primary: {comparison, metric, ...}, holm: {family, m}}`` for the summary."""
    if primary is not None and primary not in comparisons:
        raise UserError(f"primary comparison {primary!r} is not one of {', '.join(comparisons) or 'none'}")
    keys, ps = [], []
    for name, comp in comparisons.items():
        comp["primary"] = name == primary
        for metric, v in comp.get("metrics", {}).items():
            is_primary = name == primary and metric == primary_metric
            v["role"] = "primary" if is_primary else "secondary"
            if is_primary:
                v["p_holm"] = v.get("p_value", float("nan"))
            elif math.isfinite(v.get("p_value", float("nan"))):
                keys.append((name, metric))
                ps.append(v["p_value"])
    for (name, metric), q in zip(keys, holm(ps)):
        comparisons[name]["metrics"][metric]["p_holm"] = float(q)
    info: dict[str, Any] = {"holm": {"family": "every secondary comparison x metric with a p-value", "m": len(ps),
                                     "method": "Holm (1979) step-down, family-wise error rate"}}
    if primary is not None:
        v = comparisons[primary].get("metrics", {}).get(primary_metric, {})
        info["primary"] = {"comparison": primary, "metric": primary_metric, "name": METRICS[primary_metric].name,
                           **{k: v.get(k) for k in ("mean_diff", "ci_low", "ci_high", "p_value", "baseline",
                                                    "combined", "n")},
                           "ci_excludes_zero": bool(v.get("ci_low", float("nan")) > 0 or
                                                    v.get("ci_high", float("nan")) < 0)}
    return info
