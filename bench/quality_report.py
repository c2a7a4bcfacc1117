"""bench/quality.py's report phase: collect every evaluation, the headline table at one budget, KID per budget,
the samplers compared at equal N, the scaling fit and its extrapolation, the plot and the Markdown tables."""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench.quality_recipes import EMA_VARIANTS, PRESET, RECIPES, ROOT, Setup, default_sampler
from common.errors import UserError
from common.io import atomic_write_json


def sampler_label(sampler: dict[str, Any]) -> str:
    return f"{sampler['name']}-{sampler['steps']} guidance {sampler['guidance']:g}"


def recipe_step_flops(s: Setup, recipe: str) -> int:
    """FLOPs of one training step of a recipe at the benchmark's image size (training.plan.step_flops)."""
    from common.cli import config_from_flags
    from training.config import DiffusionTrainConfig
    from training.plan import step_flops
    cfg = config_from_flags(DiffusionTrainConfig, ["--config", str(ROOT / PRESET), *s.recipe_flags(recipe),
                                                   "--img_size", str(s.img_size)])
    return step_flops(cfg)


def collect(s: Setup, recipes: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    root = s.work / "eval"
    for r in recipes:
        for m in sorted((root / r).glob("min*_ema*/metrics.json")) if (root / r).is_dir() else []:
            rec = json.loads(m.read_text())
            if m.parent.name.count("_") > 1:   # a sampler variant: reported in the samplers table
                continue
            out.setdefault(r, {})[f"{rec['minutes']:g}/{rec['ema']}"] = rec
    return out


def power_fit(points: Sequence[tuple[float, float]]) -> dict[str, float] | None:
    """log KID = a + b log FLOPs by least squares over the points (FLOPs, KID)."""
    import numpy as np
    pts = [(f, k) for f, k in points if f > 0 and k > 0]
    if len(pts) < 2:
        return None
    x = np.log10([p[0] for p in pts])
    y = np.log10([p[1] for p in pts])
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    return {"log10_kid_intercept": float(a), "slope": float(b),
            "rms_residual_log10": float(np.sqrt(np.mean(resid ** 2))), "n_points": len(pts)}


def flops_at_kid(fit: dict[str, float], kid: float) -> float:
    """Where a power fit (``power_fit``) reaches ``kid``: its extrapolated training FLOPs."""
    return 10 ** ((math.log10(kid) - fit["log10_kid_intercept"]) / fit["slope"])


CORE_MINUTES_PER_DAY = 2 * 1440   # a day of the 2-core development machine, one thread per core


def carry_over(path: str | Path, s: Setup, recipes: Sequence[str], results: dict[str, Any]) -> dict[str, Any]:
    """Add to ``results`` the evaluations of an earlier report (its JSON) of the ``recipes`` that the work folder
    has none of, and return that report's sampler groups for them and a summary. A recipe is carried whole or not
    at all, so its curve always comes from one training run: one the work folder has evaluated is its own. This
    keeps what was measured when the work folder is gone (a new machine) while new recipes are added. The earlier
    report must have been measured like this one (same device kind, image size, N and, where this work folder has
    an evaluation to compare with, the same real-data KID floor, i.e. the same prepared data); otherwise the
    tables would mix incomparable numbers, and the report is refused."""
    path = Path(path)
    try:
        prev = json.loads(path.read_text())
        table = prev["recipes"]
        floor = float(prev["kid_floor"])
    except (OSError, ValueError, KeyError, TypeError):
        table = None
    if not isinstance(table, dict):
        raise UserError(f"--carry_over {path}: not a report JSON written by bench/quality.py")
    theirs = {"device kind": "cpu" if prev.get("device", "cpu") == "cpu" else "gpu",
              "image size": prev.get("img_size"), "N": prev.get("n_samples")}
    ours = {"device kind": "gpu" if s.on_gpu else "cpu", "image size": s.img_size, "N": s.n_samples}
    own = [rec for recs in results.values() for rec in recs.values()]
    if own:
        theirs["real-data KID floor"], ours["real-data KID floor"] = floor, own[0]["kid_floor"]
    for what, want in ours.items():
        have = theirs[what]
        if have != want and not (isinstance(want, float) and have is not None and abs(have - want) <= 1e-9):
            raise UserError(f"--carry_over {path}: measured at {what} {have}, this report at {want}: its numbers do "
                            "not compare with these (another dataset, preparation or setting); leave it out")
    carried = [r for r in recipes if r not in results and r in table]
    for r in carried:
        for m, by_ema in table[r].get("by_budget", {}).items():
            for ema, e in by_ema.items():
                key = f"{float(m):g}/{ema}"
                machine = {"load_1min_mean": e.get("train_load_1min_mean"),
                           "probe_gflops_mean": e.get("train_probe_gflops_mean")}
                results.setdefault(r, {})[key] = {**e, "minutes": float(m), "ema": ema, "train_machine": machine,
                                                  "carried_over": True}
    samplers = {k: v for k, v in (prev.get("samplers") or {}).items() if k.rsplit(" ", 2)[0] in carried}
    return {"samplers": samplers,
            "summary": {"from": str(path), "created": prev.get("created"), "recipes": carried,
                        "evaluations": sum(len(results[r]) for r in carried),
                        "note": "evaluations marked carried_over come from this earlier report (their work folder "
                                "is gone); measured at the same N, image size and real-data floor"}}


def report(args, s: Setup, recipes: Sequence[str]) -> dict[str, Any]:
    results = collect(s, recipes)
    carried = carry_over(args.carry_over, s, recipes, results) if getattr(args, "carry_over", None) else None
    if not results:
        raise UserError(f"{s.work / 'eval'}: nothing evaluated yet for {', '.join(recipes)}; run the evaluate phase")
    img_size = s.img_size
    flops = {r: recipe_step_flops(s, r) for r in results}
    table = recipe_table(results, flops, args.headline_budget)
    any_rec = next(iter(next(iter(results.values())).values()))
    res: dict[str, Any] = {
        "created": time.strftime("%F %T"), "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
        "dataset": str(s.data_dir), "img_size": img_size, "budget_minutes": args.headline_budget,
        "device": s.device,
        "budget_clock": (f"wall-clock minutes of the training steps on {s.device}, the recipes side by side on the "
                         "same GPU" if s.on_gpu else
                         "CPU minutes of the training steps (one thread per job); steps per CPU-minute fall "
                         "when the jobs oversubscribe the cores, so compare recipes' steps as well"),
        "n_samples": any_rec["n"], "kid_floor": any_rec["kid_floor"], "kid_floor_std": any_rec["kid_floor_std"],
        "fid_floor": any_rec["fid_floor"], "sampler": "DPM-Solver++ 20 steps, guidance 1.5 (the default)",
        "recipes": table,
    }
    winner = args.winner
    if winner and winner in table:
        res.update(winner_comparison(table, winner, args.headline_budget, res["kid_floor"], res["kid_floor_std"],
                                     img_size, s.on_gpu))
    spread = seed_spread(table)
    if spread:
        res["seed_spread"] = spread
    best = best_at_budget(table, args.headline_budget, spread)
    if best:
        res["best_at_headline_budget"] = best
    samplers = sampler_groups(s, recipes, results)
    if carried:
        samplers = {**carried["samplers"], **samplers}
        res["carried_over"] = carried["summary"]
    if samplers:
        res["samplers"] = samplers
        res["samplers_note"] = "every sampler draws the same N from the same snapshot, so KID and FID compare"
    atomic_write_json(args.output, res)
    plot(res, Path(args.output).with_name(Path(args.output).stem + "_kid.png"))
    print(markdown_table(res))
    print(f"wrote {args.output}")
    return res


def recipe_table(results: dict[str, Any], flops: dict[str, int], headline_budget: float) -> dict[str, Any]:
    """Per recipe: every evaluation by budget and EMA (with training FLOPs), and the headline entry, the preset's
    EMA at the largest evaluated budget up to the headline budget."""
    primary = EMA_VARIANTS[0]
    table = {}
    for r, recs in results.items():
        by_budget: dict[str, dict[str, Any]] = {}
        for rec in recs.values():
            entry = {k: rec[k] for k in ("kid", "kid_std", "kid_floor", "kid_floor_std", "fid", "fid_floor",
                                         "morphology_w1", "morphology_w1_floor", "nearest_train_ssim",
                                         "nearest_train_ssim_floor", "steps", "train_cpu_s", "n", "per_class")}
            entry["train_wall_s"] = rec.get("train_wall_s")
            # achieved training throughput: what the budget bought, against the hardware's peak
            entry["train_flop_per_wall_s"] = (flops[r] * rec["steps"] / rec["train_wall_s"]
                                              if rec.get("train_wall_s") else None)
            entry["flops"] = flops[r] * rec["steps"]
            entry["step_flops"] = flops[r]
            # the conditions it trained under: CPU seconds per step (what a CPU-minute bought), the share of the wall
            # clock it got a core (below 1 for a one-thread job: more runnable work than cores), and where the run
            # recorded them, the mean load average and matmul speed of its log records
            entry["cpu_s_per_step"] = rec["train_cpu_s"] / rec["steps"] if rec["steps"] else None
            entry["cpu_share"] = rec["train_cpu_s"] / rec["train_wall_s"] if rec.get("train_wall_s") else None
            machine = rec.get("train_machine") or {}
            entry["train_load_1min_mean"] = machine.get("load_1min_mean")
            entry["train_probe_gflops_mean"] = machine.get("probe_gflops_mean")
            if rec.get("carried_over"):
                entry["carried_over"] = True
            by_budget.setdefault(f"{rec['minutes']:g}", {})[rec["ema"]] = entry
        cands = [float(m) for m, v in by_budget.items() if primary in v and float(m) <= headline_budget]
        best_m = max(cands) if cands else max(float(m) for m in by_budget)
        head = dict(by_budget[f"{best_m:g}"].get(primary) or next(iter(by_budget[f"{best_m:g}"].values())))
        head["budget_minutes"] = best_m
        table[r] = {**head, "what": (RECIPES[r].what if r in RECIPES else ""), "by_budget": by_budget}
    return table


def at_budget(rec: dict[str, Any], minutes: float | str) -> dict[str, Any] | None:
    """A recipe's evaluation with the preset's EMA at ``minutes`` (None if not evaluated there)."""
    return rec["by_budget"].get(f"{float(minutes):g}", {}).get(EMA_VARIANTS[0])


def curve(rec: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """A recipe's evaluations with the preset's EMA, by increasing budget."""
    return sorted(((float(m), v[EMA_VARIANTS[0]]) for m, v in rec["by_budget"].items() if EMA_VARIANTS[0] in v),
                  key=lambda p: p[0])


def winner_comparison(table: dict[str, Any], winner: str, headline_budget: float, kid_floor: float,
                      kid_floor_std: float, img_size: int = 64, on_gpu: bool = False) -> dict[str, Any]:
    """The winner against current and peer at the headline budget, and the scaling fit over the winner's budgets
    with its extrapolation to KID 0.01 and to the floor band (FLOPs, this machine's minutes, GPU-hours)."""
    def kid_at(r):
        e = at_budget(table[r], headline_budget) if r in table else None
        return None if e is None else e["kid"]
    kw, kc, kp = kid_at(winner), kid_at("current"), kid_at("peer")
    res: dict[str, Any] = {"winner": winner}
    res["kid_ratio_winner_vs_current"] = None if kw is None or kc is None else kw / kc
    res["kid_ratio_winner_vs_peer"] = None if kw is None or kp is None else kw / kp
    pts = [(m, e["flops"], e["kid"]) for m, e in curve(table[winner])]
    fit = power_fit([(f, k) for _, f, k in pts])
    band = kid_floor + 2 * kid_floor_std
    scaling = {"points": [{"minutes": m, "flops": f, "kid": k} for m, f, k in pts], "fit": fit,
               "floor_band_kid": band}
    if fit and fit["slope"] < 0 and fit["n_points"] >= 3:   # two points fit any line exactly: no extrapolation
        need, need_001 = flops_at_kid(fit, band), flops_at_kid(fit, 0.01)
        scaling["predicted_flops_to_floor"] = need
        scaling["predicted_flops_to_kid_0.01"] = need_001
        # the same extrapolation in this machine's time: training FLOPs per budget minute at the largest budget;
        # a day of the development machine is 2 cores x 1440 minutes
        per_min = pts[-1][1] / pts[-1][0]
        clock = "gpu" if on_gpu else "cpu"
        scaling[f"predicted_{clock}_minutes_to_kid_0.01"] = need_001 / per_min
        scaling[f"predicted_{clock}_minutes_to_floor"] = need / per_min
        if not on_gpu:
            scaling["kid_0.01_within_a_2_core_day"] = need_001 / per_min <= CORE_MINUTES_PER_DAY
        # an extrapolation: the same number of optimiser steps at the larger size, FLOPs per step x pixels
        # (same network on 4x / 16x the pixels); an H100 at 30% of its dense bf16 peak (989 TFLOP/s)
        gpu = 0.3 * 989e12
        sizes = sorted({img_size, 64, 128, 256})
        scaling["gpu_hours_extrapolated"] = {f"{px}px": need * (px / img_size) ** 2 / gpu / 3600
                                             for px in sizes if px >= img_size}   # to the floor band
        scaling["gpu_hours_extrapolated_to_kid_0.01"] = {f"{px}px": need_001 * (px / img_size) ** 2 / gpu / 3600
                                                         for px in sizes if px >= img_size}
        scaling["note"] = ("extrapolation of a power law fitted to the points above; GPU-hours assume the same "
                           "number of optimiser steps at each size, FLOPs per step growing with the pixel count, "
                           "and an H100 at 30% of its dense bf16 peak, an assumed throughput: a batch-16 recipe "
                           "this small is host-bound on a GPU and far below it (the GPU run's "
                           "train_flop_per_wall_s), so these GPU-hours are a lower bound")
    else:
        scaling["predicted_flops_to_floor"] = None
        scaling["note"] = ("fewer than three points: a line through two says nothing about the trend, so no "
                           "extrapolation" if fit and fit["n_points"] < 3 else
                           "KID does not fall with compute over these points: no extrapolation")
    scaling.update(scaling_fits(table, winner, on_gpu))
    res["scaling"] = scaling
    return res


def scaling_fits(table: dict[str, Any], winner: str, on_gpu: bool = False) -> dict[str, Any]:
    """The power-law fit again for every recipe evaluated at four or more budgets (each its own training run, so
    the winner's other seeds give the spread that one curve cannot show, and another recipe's curve says whether it
    gains faster with compute), and one fit pooled over every seed of the winner (a seed with fewer budgets adds
    its points there). Each fit's FLOPs to KID 0.01 is also put in that run's own minutes (its FLOPs per budget
    minute at its largest budget: runs trained on a slower machine take more minutes for the same FLOPs)."""
    def entry(points, per_min=None):
        fit = power_fit([(f, k) for _, f, k in points])
        out: dict[str, Any] = {"n_points": len(points), "fit": fit}
        if fit and fit["slope"] < 0 and fit["n_points"] >= 3:
            need = out["predicted_flops_to_kid_0.01"] = flops_at_kid(fit, 0.01)
            if per_min:
                out[f"predicted_{'gpu' if on_gpu else 'cpu'}_minutes_to_kid_0.01"] = need / per_min
        return out
    curves = {n: [(m, e["flops"], e["kid"]) for m, e in curve(rec)] for n, rec in table.items()}
    # a run's own curve needs four budgets: three points a factor of four apart extrapolate to almost anything (a
    # seed whose KID rose from 30 to 60 minutes fits a slope of -0.04); the pooled fit takes every point
    by_recipe = {n: entry(p, p[-1][1] / p[-1][0]) for n, p in sorted(curves.items()) if len(p) >= 4}
    out: dict[str, Any] = {}
    if len(by_recipe) > 1 or (by_recipe and winner not in by_recipe):
        out["by_recipe"] = by_recipe
    seeds = [n for n in [winner] + [n for n, r in RECIPES.items() if r.repeats == winner]
             if n in table and curves[n]]
    if len(seeds) > 1:
        out["pooled_seeds"] = {**entry([q for n in seeds for q in curves[n]]), "recipes": seeds}
        need = [by_recipe[n]["predicted_flops_to_kid_0.01"] for n in seeds
                if "predicted_flops_to_kid_0.01" in by_recipe.get(n, {})]
        if len(need) >= 2:
            out["predicted_flops_to_kid_0.01_range_over_seeds"] = [min(need), max(need)]
    if out:
        out["fits_note"] = ("by_recipe: each run's own power-law fit (four or more budgets); pooled_seeds: one fit "
                            "over every point of every seed of the winner; extrapolations, like the headline fit")
    return out


SAMPLER_KEYS = ("kid", "kid_std", "kid_floor", "fid", "fid_floor", "n", "morphology_w1")


def sampler_groups(s: Setup, recipes: Sequence[str], results: dict[str, Any]) -> dict[str, Any]:
    """The sampler variants of each snapshot at the same N, with the evaluate phase's draw as the default's row."""
    primary = EMA_VARIANTS[0]
    samplers = {}
    for r in recipes:
        for m in sorted((s.work / "eval" / r).glob("min*_ema*_*/metrics.json")):
            rec = json.loads(m.read_text())
            group = samplers.setdefault(f"{r} {rec['minutes']:g} min", {})
            group[sampler_label(rec["sampler"])] = {k: rec[k] for k in SAMPLER_KEYS + ("s_per_sample",)}
            default = results.get(r, {}).get(f"{rec['minutes']:g}/{primary}")
            if default and default["n"] == rec["n"]:   # the evaluate phase's draw is the default sampler's entry
                d = default.get("sampler") or default_sampler()   # older metrics files do not name it
                group[f"{sampler_label(d)} (default)"] = {
                    **{k: default[k] for k in SAMPLER_KEYS},
                    "s_per_sample": default.get("s_per_sample", default["sampling_seconds"] / default["n"])}
    return samplers


def seed_spread(table: dict[str, Any]) -> dict[str, Any]:
    """How far KID moves when only the training seed changes: per base recipe and budget where two or more of its
    seeds (the recipe and those that ``repeats`` it) were evaluated.

    ``kid_range`` is max - min over the seeds (with two seeds |a - b|); ``seed_sd_estimate`` their sample standard
    deviation (n - 1 degrees of freedom: a rough yardstick, not an interval). A difference between two recipes that
    is not clearly larger than the range is not evidence that one recipe is better."""
    out: dict[str, Any] = {}
    bases = sorted({r.repeats for r in RECIPES.values() if r.repeats})
    for base in (b for b in bases if b in table):
        seeds = [base] + [name for name, r in RECIPES.items() if r.repeats == base and name in table]
        for m, _ in curve(table[base]):   # the budgets the base seed was evaluated at
            at = [(name, e) for name, e in ((name, at_budget(table[name], m)) for name in seeds) if e is not None]
            if len(at) < 2:
                continue
            kids = [e["kid"] for _, e in at]
            steps = [e["steps"] for _, e in at]
            entry = {"recipes": [name for name, _ in at], "kid": kids, "kid_mean": statistics.fmean(kids),
                     "kid_range": max(kids) - min(kids),
                     "seed_sd_estimate": statistics.stdev(kids), "kid_subset_std": [e["kid_std"] for _, e in at],
                     "steps": steps}
            if all(e.get("morphology_w1") is not None for _, e in at):
                # lesion shape moves with the seed too: the yardstick for a recipe that wins on shape
                entry["morphology_w1"] = [e["morphology_w1"] for _, e in at]
            if max(steps) - min(steps) > 0.05 * max(steps):
                entry["note"] = ("the seeds reached different step counts in the same budget (trained under "
                                 "different load), so the spread includes that difference too")
            out.setdefault(base, {})[f"{m:g}"] = entry
    return out


def best_at_budget(table: dict[str, Any], minutes: float, spread: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe with the lowest KID (preset's EMA) at exactly ``minutes``, its ratios to current and peer there
    (and, where the baseline has several seeds there, to their mean: one seed of the baseline may be a lucky one),
    and whether its lead over current exceeds the largest seed spread measured (if any)."""
    at = {r: e for r, e in ((r, at_budget(rec, minutes)) for r, rec in table.items()) if e is not None}
    if not at:
        return None
    name = min(at, key=lambda r: at[r]["kid"])
    out: dict[str, Any] = {"recipe": name, "minutes": minutes, "kid": at[name]["kid"], "steps": at[name]["steps"],
                           "recipes_at_this_budget": sorted(at)}
    for other in ("current", "peer"):
        out[f"kid_ratio_vs_{other}"] = at[name]["kid"] / at[other]["kid"] if other in at else None
    seeds = spread.get("current", {}).get(f"{minutes:g}")
    out["kid_ratio_vs_current_seed_mean"] = at[name]["kid"] / seeds["kid_mean"] if seeds else None
    diffs = [v["kid_range"] for by in spread.values() for v in by.values()]
    if diffs and "current" in at:
        lead = at["current"]["kid"] - at[name]["kid"]
        out["largest_seed_spread"] = max(diffs)
        out["lead_over_current_exceeds_seed_spread"] = lead > max(diffs)
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rec in sorted(res["recipes"].items()):
        pts = [(m, e["kid"]) for m, e in curve(rec)]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [max(p[1], 1e-5) for p in pts], marker="o", label=name,
                lw=2.5 if name in (res.get("winner"), "current", "peer") else 1.0)
    floor, std = res["kid_floor"], res.get("kid_floor_std") or 0.0
    ax.axhspan(max(floor - 2 * std, 1e-5), floor + 2 * std, color="grey", alpha=0.3,
               label="real vs real floor (mean +- 2 sd)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    gpu = res.get("device", "cpu") != "cpu"
    ax.set_xlabel(f"training minutes ({'wall clock, ' + res['device'] if gpu else 'CPU, one thread'})")
    ax.set_ylabel(f"KID vs real training images (N={res['n_samples']})")
    ax.set_title(f"Time to realism, BUS-BRA {res['img_size']} px (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(res: dict[str, Any]) -> str:
    lines = ["| recipe | minutes | steps | KID ± std | KID / floor | FID (floor) | morphology W1 (floor) | "
             "nearest SSIM (floor) | CPU s / step (share of wall) |", "|---|---|---|---|---|---|---|---|---|"]
    floor = res["kid_floor"]
    for name, rec in sorted(res["recipes"].items(), key=lambda kv: kv[1]["kid"]):
        ratio = rec["kid"] / floor if floor and floor > 0 else float("nan")
        cond = (f"{rec['cpu_s_per_step']:.3f}" if rec.get("cpu_s_per_step") else "") + \
            (f" ({rec['cpu_share']:.2f})" if rec.get("cpu_share") else "")
        lines.append(f"| {name} | {rec['budget_minutes']:g} | {rec['steps']} | {rec['kid']:.4f} ± {rec['kid_std']:.4f}"
                     f" | {ratio:.0f}x | {rec['fid']:.1f} ({rec['fid_floor']:.1f}) | {rec['morphology_w1']:.3f} "
                     f"({rec['morphology_w1_floor']:.3f}) | {rec['nearest_train_ssim']:.3f} "
                     f"({rec['nearest_train_ssim_floor']:.3f}) | {cond} |")
    budgets = sorted({float(m) for rec in res["recipes"].values() for m in rec["by_budget"]})
    if len(budgets) > 1:   # KID of every recipe at every budget it reached (the preset's EMA)
        lines += ["", "| recipe | " + " | ".join(f"{m:g} min" for m in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for name, rec in sorted(res["recipes"].items()):
            cells = [at_budget(rec, m) for m in budgets]
            lines.append(f"| {name} | " + " | ".join(f"{c['kid']:.4f} ({c['steps']} steps)" if c else ""
                                                     for c in cells) + " |")
    extra = [(name, m, v) for name, rec in sorted(res["recipes"].items())
             for m, v in sorted(rec["by_budget"].items(), key=lambda kv: float(kv[0])) if len(v) > 1]
    if extra:   # the EMA lengths evaluated on the same snapshot (a column for each length evaluated anywhere)
        emas = [e for e in EMA_VARIANTS if any(e in v for _, _, v in extra)]
        lines += ["", "| recipe, budget | " + " | ".join(f"EMA {e}" for e in emas) + " |",
                  "|---|" + "---|" * len(emas)]
        for name, m, v in extra:
            lines.append(f"| {name}, {m} min | " + " | ".join(
                f"{v[e]['kid']:.4f} ± {v[e]['kid_std']:.4f}" if e in v else "" for e in emas) + " |")
    for base, by_budget in res.get("seed_spread", {}).items():
        for m, v in by_budget.items():
            each = ", ".join(f"{k:.4f} ({name}, {n} steps)" for name, k, n in zip(v["recipes"], v["kid"], v["steps"]))
            lines.append(f"\nSeed spread ({base}, {m} min): KID {each}; mean {v['kid_mean']:.4f}, "
                         f"range {v['kid_range']:.4f}, "
                         f"against a KID subset std of ~{max(v['kid_subset_std']):.4f}"
                         + ("; lesion-shape W1 " + ", ".join(f"{w:.3f}" for w in v["morphology_w1"])
                            if "morphology_w1" in v else "")
                         + (f"; {v['note']}." if "note" in v else "."))
    sc = res.get("scaling", {})
    if sc.get("by_recipe") or sc.get("pooled_seeds"):   # the fit at each run with four or more budgets, and pooled
        def fit_line(name, v):
            need, mins = v.get("predicted_flops_to_kid_0.01"), v.get("predicted_cpu_minutes_to_kid_0.01")
            d = mins / CORE_MINUTES_PER_DAY if mins else None
            return (f"{name}: slope {v['fit']['slope']:.2f} over {v['n_points']} points"
                    + (f", KID 0.01 at {need:.1e} FLOPs" if need else ", no extrapolation")
                    + (f", ~{d:,.0f} days of 2 cores at its rate" if d and d < 1e5 else
                       f", ~{d:.1e} days of 2 cores at its rate" if d else ""))
        fits = [fit_line(n, v) for n, v in sc.get("by_recipe", {}).items()]
        if "pooled_seeds" in sc:
            fits.append(fit_line("pooled over " + ", ".join(sc["pooled_seeds"]["recipes"]), sc["pooled_seeds"]))
        lines.append("\nScaling (KID ~ FLOPs^slope, an extrapolation): " + "; ".join(fits) + ".")
    best = res.get("best_at_headline_budget")
    if best:
        ratios = ", ".join(f"{best[f'kid_ratio_vs_{o}']:.2f}x {o.replace('_', ' ')}"
                           for o in ("current", "current_seed_mean", "peer")
                           if best.get(f"kid_ratio_vs_{o}") is not None)
        verdict = ""
        if "lead_over_current_exceeds_seed_spread" in best:
            word = "exceeds" if best["lead_over_current_exceeds_seed_spread"] else "is within"
            verdict = f"; its lead over current {word} the seed spread ({best['largest_seed_spread']:.4f})"
        lines.append(f"\nLowest KID at {best['minutes']:g} min: {best['recipe']} {best['kid']:.4f} ({ratios})"
                     f"{verdict}.")
    for group, by_sampler in res.get("samplers", {}).items():   # the same snapshot, the same N
        lines += ["", f"| sampler ({group}, N = {next(iter(by_sampler.values()))['n']}) | KID ± std | FID | "
                      "morphology W1 | s / sample |", "|---|---|---|---|---|"]
        for key, v in sorted(by_sampler.items(), key=lambda kv: kv[1]["kid"]):
            lines.append(f"| {key} | {v['kid']:.4f} ± {v['kid_std']:.4f} | {v['fid']:.1f} | {v['morphology_w1']:.3f} "
                         f"| {v['s_per_sample']:.2f} |")
    return "\n".join(lines)
