"""A study of several arms x seeds on one real test split (bench/evidence.py): the arm table, the comparisons
against the best non-synthetic arm chosen on validation Dice, the primary endpoint and Holm-adjusted secondaries,
the plan's targets; and the re-analysis of a committed results folder with these statistics.

Arms are compared within their *regime* (e.g. all training patients, or 25% of them): each regime's best
non-synthetic arm by mean validation Dice (nothing is chosen on the test split) is the baseline of every other arm
of that regime. The primary endpoint is tumour Dice of ``primary_arm`` against the baseline of its regime;
everything else is secondary (:func:`metrics.downstream.finalise_family`). Statistics: :mod:`metrics.downstream`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.errors import UserError
from metrics.downstream import (METRICS, N_BOOT, PRIMARY_METRIC, RENAMED, arm_statistics, compare_arms, finalise_family,
                                load_arm, seeds_pooled)
from metrics.plan_targets import format_plan_targets, score_plan_targets

TABLE = ("dice", "iou", "hd95", "balanced_accuracy")
PER_CLASS = ("dice_malignant", "dice_benign", "hd95_malignant", "hd95_benign")
RUN_FILE = re.compile(r"(?P<arm>.+)_seed(?P<seed>\d+)_per_image_test\.csv")


def run_files(run) -> tuple[Path, Path]:
    """(per-image CSV, metrics.json) of a run: a train_segmentation.py folder, or a (CSV, JSON) pair such as the
    ``<arm>_seed<k>_per_image_test.csv`` / ``<arm>_seed<k>_metrics.json`` copies in a results folder."""
    if isinstance(run, (tuple, list)):
        return Path(run[0]), Path(run[1])
    return Path(run) / "per_image_test.csv", Path(run) / "metrics.json"


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: not found (a finished train_segmentation.py run writes it)")
    return json.loads(path.read_text())


def arm_summary(runs: Sequence, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Every metric of :data:`metrics.downstream.METRICS` with its two-level bootstrap CI, plus each run's ROC AUC
    (malignant vs benign), validation Dice and test Dice."""
    files = [run_files(r) for r in runs]
    arm = load_arm([csv for csv, _ in files])
    metas = [_json(m) for _, m in files]
    out: dict[str, Any] = {"n_runs": len(files), "n_test_images": len(arm.ids),
                           **arm_statistics(arm, n_boot=n_boot, seed=seed)}
    aucs = [a for a in ((m["test"].get("classification") or {}).get("auc_malignant") for m in metas) if a is not None]
    out["malignant_auc"] = {"mean": float(np.mean(aucs)) if aucs else None, "per_seed": aucs}
    vals = [m["best_val_dice"] for m in metas]
    out["val_dice"] = {"mean": float(np.mean(vals)), "per_seed": vals}
    out["test_dice_per_seed"] = [m["test"]["overall"]["dice"]["mean"] for m in metas]
    return out


def statistics(runs: Mapping[str, Sequence], synthetic: Mapping[str, bool], regime: Mapping[str, str] | None = None,
               primary_arm: str | None = None, evaluation: dict[str, Any] | None = None, n_boot: int = N_BOOT,
               seed: int = 0, training_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """The study's statistics. ``runs``: arm -> its runs (see :func:`run_files`); ``synthetic``: arm -> trained
    with synthetic data; ``regime``: arm -> data regime (default one regime, "full"); ``evaluation``: evaluate.py's
    metrics.json, for the plan's image-quality targets."""
    regime = {arm: (regime or {}).get(arm, "full") for arm in runs}
    arms = {arm: arm_summary(r, n_boot, seed) for arm, r in runs.items()}
    loaded = {arm: load_arm([run_files(x)[0] for x in r]) for arm, r in runs.items()}
    best: dict[str, str] = {}
    for reg in dict.fromkeys(regime.values()):
        non_syn = [a for a in arms if regime[a] == reg and not synthetic[a]]
        if non_syn:
            best[reg] = max(non_syn, key=lambda a: arms[a]["val_dice"]["mean"])
    comparisons: dict[str, dict[str, Any]] = {}
    for arm in arms:
        base = best.get(regime[arm])
        if base is not None and arm != base:
            comparisons[f"{arm} - {base}"] = {"baseline_arm": base, "combined_arm": arm, "regime": regime[arm],
                                              **compare_arms(loaded[base], loaded[arm], n_boot=n_boot, seed=seed)}
    base = best.get(regime.get(primary_arm, ""))
    primary = f"{primary_arm} - {base}" if base and f"{primary_arm} - {base}" in comparisons else None
    family = finalise_family(comparisons, primary)
    methods = {c.get("ci_method") for c in comparisons.values() if c.get("ci_method")}
    return {"arms": arms, "best_non_synthetic_arm_by_validation_dice": best.get("full", next(iter(best.values()), None)),
            "best_non_synthetic_arm_by_regime": best, "regimes": regime, "comparisons": comparisons,
            "primary_endpoint": {**family.get("primary", {}), "declared": (
                f"tumour Dice ({PRIMARY_METRIC}), {primary_arm} against the best non-synthetic arm of its regime "
                "chosen on validation Dice; every other comparison and metric is secondary")} if primary else None,
            "multiplicity": family["holm"], "ci_method": " | ".join(sorted(methods)) or None,
            "plan_targets": score_plan_targets(evaluation, comparisons.get(primary) if primary else None,
                                               training_counts)}


# ---------------------------------------------------------------------------------------------- text
def _ci(v: dict[str, Any] | None, fmt: str, key: str = "mean", signed: bool = False) -> str:
    if not v or v.get(key) is None or not math.isfinite(v[key]):
        return "n/a"
    s = "+" if signed else ""
    return f"{v[key]:{s}{fmt}} [{v['ci_low']:{s}{fmt}}, {v['ci_high']:{s}{fmt}}]"


def _fmt(name: str) -> str:
    return ".2f" if name.startswith("hd95") else ".3f"


def format_statistics(s: dict[str, Any]) -> str:
    """The arm tables, the primary endpoint, every comparison with p and Holm p, and the plan's targets."""
    lines = [f"{'arm':<18} {'Dice':>22} {'IoU':>22} {'HD95 px':>20} {'bal. acc.':>22} {'val Dice':>9}"]
    for arm, a in s["arms"].items():
        cells = [_ci(a.get(n), _fmt(n)) for n in TABLE]
        lines.append(f"{arm:<18} {cells[0]:>22} {cells[1]:>22} {cells[2]:>20} {cells[3]:>22} "
                     f"{a['val_dice']['mean']:>9.3f}")
    lines.append(f"{'arm':<18} {'Dice malignant':>22} {'Dice benign':>22} {'HD95 malignant':>20} {'HD95 benign':>20}")
    for arm, a in s["arms"].items():
        cells = [_ci(a.get(n), _fmt(n)) for n in PER_CLASS]
        lines.append(f"{arm:<18} {cells[0]:>22} {cells[1]:>22} {cells[2]:>20} {cells[3]:>20}")
    for arm, a in s["arms"].items():
        auc = a["malignant_auc"]["mean"]
        lines.append(f"{arm:<18} malignant recall {_ci(a.get('malignant_recall'), '.3f')}, benign recall "
                     f"{_ci(a.get('benign_recall'), '.3f')}, ROC AUC {'n/a' if auc is None else f'{auc:.3f}'} "
                     "(mean over seeds)")
    first = next(iter(s["arms"].values()), {})
    lines.append(f"arm CIs: {first.get('ci_method', 'n/a')}")
    lines.append("best non-synthetic arm by validation Dice: "
                 + ", ".join(f"{b} ({reg})" for reg, b in s.get("best_non_synthetic_arm_by_regime", {}).items()))
    p = s.get("primary_endpoint")
    if p:
        lines.append(f"PRIMARY endpoint: {p['name']}, {p['comparison']}: {p['mean_diff']:+.4f} "
                     f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], p {p['p_value']:.2g} (tested alone); "
                     f"CI {'excludes' if p['ci_excludes_zero'] else 'includes'} zero")
    h = s.get("multiplicity") or {}
    lines.append(f"comparisons: CI {s.get('ci_method')}; p_holm: Holm over the {h.get('m', 0)} secondary tests")
    for name, comp in s["comparisons"].items():
        if "metrics" not in comp:
            lines.append(f"{name}: {comp.get('skipped')}")
            continue
        lines.append(f"{name}" + ("   [primary comparison]" if comp.get("primary") else ""))
        for m, v in comp["metrics"].items():
            if "skipped" in v:
                lines.append(f"  {METRICS[m].name:<28} n/a ({v['skipped']})")
                continue
            tag = "primary" if v.get("role") == "primary" else f"p_holm {v.get('p_holm', float('nan')):.2g}"
            lines.append(f"  {METRICS[m].name:<28} {_ci(v, _fmt(m), 'mean_diff', True):>28}  p {v['p_value']:<7.2g}"
                         f"{tag}")
    if s.get("plan_targets"):
        lines += ["", format_plan_targets(s["plan_targets"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- re-analysis
def find_runs(seg_dir: Path, known: Sequence[str]) -> dict[str, list[tuple[Path, Path]]]:
    """``<arm>_seed<k>_per_image_test.csv`` (+ ``_metrics.json``) in a results folder's segmentation/, by arm."""
    runs: dict[str, list[tuple[int, Path, Path]]] = {}
    for csv in sorted(Path(seg_dir).glob("*_per_image_test.csv")):
        m = RUN_FILE.fullmatch(csv.name)
        if m is None:
            continue
        if m["arm"] not in known:
            raise UserError(f"{csv}: unknown arm {m['arm']!r} (known: {', '.join(known)})")
        runs.setdefault(m["arm"], []).append((int(m["seed"]), csv, seg_dir / f"{m['arm']}_seed{m['seed']}_metrics.json"))
    if not runs:
        raise UserError(f"{seg_dir}: no <arm>_seed<k>_per_image_test.csv files (is it a bench/evidence.py results "
                        "folder's segmentation/?)")
    return {arm: [(c, j) for _, c, j in sorted(v)] for arm, v in runs.items()}


def _old(block: Mapping[str, Any], metric: str) -> Any:
    """``block[metric]``, or the entry under the metric's name before a renaming (:data:`RENAMED`)."""
    if metric in block:
        return block[metric]
    return next((v for old, new in RENAMED.items() if new == metric for v in [block.get(old)] if v is not None), None)


def reanalyse(results_dir, synthetic: Mapping[str, bool], regime: Mapping[str, str] | None = None,
              primary_arm: str | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Recompute a committed study's statistics from its per-image CSVs, beside what its summary.json said.

    ``old_vs_new`` holds, per comparison and metric, the summary's interval (images only, seeds averaged first,
    when the summary has the metric), the same image-only bootstrap redone here (stratified by class), and the
    two-level interval with its p and Holm p; ``arms_old_vs_new`` the same for each arm's metrics."""
    res = Path(results_dir)
    runs = find_runs(res / "segmentation", list(synthetic))
    ev_path, old_path = res / "evaluation_metrics.json", res / "summary.json"
    evaluation = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    stats = statistics(runs, synthetic, regime, primary_arm, evaluation, n_boot, seed)
    loaded = {arm: load_arm([c for c, _ in r]) for arm, r in runs.items()}

    def interval(v: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
        if not v or key not in v:
            return None
        return {k: v.get(k) for k in (key, "ci_low", "ci_high", "p_value", "p_holm") if v.get(k) is not None}

    rows = []
    for name, comp in stats["comparisons"].items():
        pooled = compare_arms(seeds_pooled(loaded[comp["baseline_arm"]]), seeds_pooled(loaded[comp["combined_arm"]]),
                              n_boot=n_boot, seed=seed)
        for metric, v in comp.get("metrics", {}).items():
            was = _old(((old.get("comparisons") or {}).get(name) or {}).get("metrics", {}), metric)
            rows.append({"comparison": name, "metric": metric, "role": v.get("role"), "estimate": v.get("mean_diff"),
                         "old": interval(was, "mean_diff"), "image_only": interval(pooled["metrics"][metric], "mean_diff"),
                         "two_level": interval(v, "mean_diff")})
    arm_rows = []
    for arm, a in stats["arms"].items():
        for metric in METRICS:
            was = _old((old.get("arms") or {}).get(arm) or {}, metric)
            arm_rows.append({"arm": arm, "metric": metric, "estimate": a[metric]["mean"],
                             "old": interval(was, "mean"), "two_level": interval(a[metric], "mean")})
    return {"source": str(res), "runs": {arm: [str(c) for c, _ in r] for arm, r in runs.items()}, **stats,
            "old_vs_new": rows, "arms_old_vs_new": arm_rows,
            "old_method": (next(iter((old.get("comparisons") or {}).values()), {}) or {}).get("note")}


def format_reanalysis(r: dict[str, Any]) -> str:
    """The old-vs-new table of the comparisons, then the full statistics."""
    def cell(v: dict[str, Any] | None, fmt: str, p: bool = True) -> str:
        if not v or v.get("ci_low") is None or not math.isfinite(v["ci_low"]):
            return "—"
        text = f"[{v['ci_low']:+{fmt}}, {v['ci_high']:+{fmt}}]"
        return text + (f" p {v['p_value']:.2g}" if p and v.get("p_value") is not None else "")

    lines = [f"re-analysis of {r['source']} (per-image CSVs of {sum(len(v) for v in r['runs'].values())} runs)",
             f"old: {r.get('old_method') or 'n/a'}", f"new: {r.get('ci_method')}", "",
             f"{'comparison':<26} {'metric':<20} {'estimate':>9}  {'old (summary.json)':<27} "
             f"{'images only, redone':<27} {'seeds + images (new)':<27} {'p_holm':>7}"]
    for row in r["old_vs_new"]:
        fmt = _fmt(row["metric"])
        new = row["two_level"] or {}
        holm = "primary" if row["role"] == "primary" else f"{new.get('p_holm', float('nan')):.2g}"
        est = "n/a" if row["estimate"] is None or not math.isfinite(row["estimate"]) else f"{row['estimate']:+{fmt}}"
        lines.append(f"{row['comparison']:<26} {row['metric']:<20} {est:>9}  {cell(row['old'], fmt):<27} "
                     f"{cell(row['image_only'], fmt):<27} {cell(new, fmt):<27} {holm:>7}")
    return "\n".join(lines + ["", format_statistics(r)])
