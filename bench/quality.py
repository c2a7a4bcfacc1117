#!/usr/bin/env python
"""Time to realism: how close to real each generator recipe gets for a given amount of training compute.

`make bench-quality` (or `python bench/quality.py --data_dir <prepared BUS-BRA> ...`). Phases, each resumable
(rerun the same command and finished work is skipped; a recipe that fails does not stop the others, and the
command exits 2 at the end naming what failed):

  train      every recipe is train_medsegdiff.py on the same prepared dataset (BUS-BRA at 64 px, patient-grouped
             official folds), from configs/busbra_evidence.yaml plus the recipe's flags, with a constant learning
             rate after warm-up, until --budgets' largest value in training minutes; EMA weights are saved at every
             budget (snapshots/min<M>.pth), with two more EMA lengths beside the preset's. A recipe whose rate
             decays over the budget (lr_cosine, lr_wsd) is a point at the largest budget only. Minutes are CPU minutes
             of the training steps (--budget_clock cpu: one thread = one core-minute), so a recipe's budget
             depends little on what else runs, as long as the jobs' threads do not exceed the cores: with 4 jobs on
             2 cores the same recipe reached 10% fewer steps in 30 CPU-minutes (time-sharing costs CPU time too),
             and the train phase warns when asked to oversubscribe. Run the recipes of one comparison side by side
             (--jobs 2 --threads_per_job 1 on 2 cores) so they also share the same machine load.
  draw       per recipe and budget: N pairs drawn in the real training split's class proportions with the default
             sampler (generate_synthetic.py's DPM-Solver++ 20 steps, guidance 1.5, the same lesion-area rejection)
             into the evaluation folder, with draw.json (the snapshot's steps and training time, the sampling time).
  evaluate   draws what the draw phase has not, then measures: KID (the headline) and FID against the real
             training images beside the real-vs-real floor at the same N (held-out real vs training real:
             patient-disjoint), lesion-morphology W1 beside its floor, the mean nearest-training-image SSIM, and a
             labelled sample grid.
  report     bench/quality.json, bench/quality_kid.png (KID against training minutes, log-log, one line per
             recipe), the scaling fit of the winner (KID against training FLOPs) and a Markdown table.

On a GPU (--device cuda, --img_size 128 with a dataset prepared at 128 px) the budgets are wall-clock minutes of
the training steps, and the recipes of one comparison train side by side on the same GPU (--jobs = recipes). The
draw phase needs no Inception weights, so a GPU machine without them can train and draw, and the evaluate phase
measures the drawn folders on any machine (the snapshots need not travel).

Recipes are named changes to a baseline (bench/quality_recipes.py; `--list` prints them); the report phase is
bench/quality_report.py. `--quick` runs the whole path on a
small phantom in about a minute (tested); it measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality_recipes import (BASELINE_FLAGS, EMA_VARIANTS, PRESET, QUICK_RECIPES,  # noqa: E402
                                   RECIPES, Setup, is_default_sampler, parse_sampler)
from bench.quality_report import report  # noqa: E402
from common.cli import csv_list, positive_int, run_main  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.io import atomic_write_json  # noqa: E402

QUALITY_JSON = ROOT / "bench" / "quality.json"
PHASES = ("train", "draw", "evaluate", "samplers", "report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/quality/busbra64",
                   help="prepared pair dataset (prepare_busi_dataset.py output); made from --input_dir if missing")
    p.add_argument("--input_dir", default=None,
                   help="the raw BUS-BRA folder, prepared at --img_size into --data_dir when that does not exist yet")
    p.add_argument("--img_size", type=positive_int, default=64,
                   help="the benchmark's image size: --data_dir must be prepared at it (the CPU benchmark is 64 px; "
                        "128 or 256 on a GPU); training FLOPs are counted at it")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda / cuda:N: train and draw on that GPU, the budgets then being wall-clock minutes "
                        "of the training steps (use a separate --work_dir: the minutes are not CPU minutes)")
    p.add_argument("--work_dir", default="checkpoints/quality", help="training runs, samples and per-run metrics")
    p.add_argument("--recipes", type=csv_list, default=["current", "peer"],
                   help=f"recipes to train / evaluate / report, or all (known: {', '.join(RECIPES)}); add a recipe to "
                        "RECIPES to try another change, so that it is named in the results")
    p.add_argument("--budgets", type=csv_list, default=["15", "30", "60"],
                   help="training minutes at which each recipe is evaluated; training runs to the largest")
    p.add_argument("--phases", type=csv_list, default=["train", "evaluate", "report"],
                   help="any of train, draw, evaluate, samplers, report (draw: only the synthetic pairs, e.g. on a "
                        "GPU machine without the Inception weights; evaluate draws what is missing and measures)")
    p.add_argument("--jobs", type=positive_int, default=2, help="trainings / evaluations at the same time")
    p.add_argument("--threads_per_job", type=positive_int, default=1, help="CPU threads of each")
    p.add_argument("--n_samples", type=positive_int, default=500,
                   help="synthetic pairs per evaluation, in the real training split's class proportions")
    p.add_argument("--ema_variants", nargs="?", type=csv_list, const=list(EMA_VARIANTS[1:]), default=[],
                   metavar="NAMES",
                   help="also evaluate other EMA lengths of each snapshot: alone, every one the benchmark tracks "
                        f"({', '.join(EMA_VARIANTS[1:])}); or a comma list of them. A length absent from a snapshot, "
                        "or whose weights equal the preset's EMA there (the warm-up cap binds), is skipped with a "
                        "note")
    p.add_argument("--winner", default=None, help="recipe whose budgets make the scaling fit (report phase)")
    p.add_argument("--headline_budget", type=float, default=60.0,
                   help="minutes at which the winner is compared with current and peer (report phase)")
    p.add_argument("--output", default=str(QUALITY_JSON), help="results JSON (report phase)")
    p.add_argument("--carry_over", default=None, metavar="JSON",
                   help="report phase: take the --recipes that the work folder has not evaluated at all (whole "
                        "recipes: a curve never mixes two runs) from an earlier report, e.g. the committed "
                        "bench/quality.json, marked carried_over, so a report made after the work folder was lost "
                        "keeps them; refused if that report was measured at another N, image size, device kind or "
                        "real-data floor")
    p.add_argument("--quick", action="store_true",
                   help="the whole path on a small phantom in about a minute: checks that it runs, measures nothing")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--samplers", type=csv_list, default=["dpmsolver++:20:1.5", "ddim:50:1.5", "ddpm:1000:1.5",
                                                             "dpmsolver++:20:1.0", "dpmsolver++:50:1.5"],
                   help="samplers phase: SAMPLER:STEPS:GUIDANCE variants, each drawing the same --n_samples from the "
                        "snapshot of --recipes at --budgets (first recipe, largest budget)")
    p.add_argument("--eval_one", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    p.add_argument("--draw_only", action="store_true", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------- settings
def setup_from(args) -> Setup:
    work = Path(args.work_dir)
    data = Path(args.data_dir)
    if args.quick:
        data = work / "phantom32"
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise UserError(f"--device: cpu, cuda or cuda:N, not {args.device!r}")
    return Setup(data, work, 24 if args.quick else args.n_samples, args.quick, args.threads_per_job,
                 32 if args.quick else args.img_size, args.device)


def env(threads: int) -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return e


def run_tasks(tasks: list[tuple[str, list[str], Path]], jobs: int, threads: int) -> list[str]:
    """Run (name, argv, log) tasks ``jobs`` at a time; returns the names of those that failed. The tasks are
    independent recipes or budgets, so one failure does not stop the others (nor, in main, the later phases for what
    succeeded): on a lent GPU a broken recipe must not cost the rest their draws."""
    pending, running, failed = list(tasks), [], []
    while pending or running:
        while pending and len(running) < jobs:
            name, argv, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(argv)}", flush=True)
            fh = open(log, "a")
            running.append((name, subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                                   env=env(threads)), fh, log))
        time.sleep(2)
        for item in list(running):
            name, proc, fh, log = item
            if proc.poll() is None:
                continue
            fh.close()
            running.remove(item)
            print(f"[{time.strftime('%H:%M:%S')}] {name} {'done' if proc.returncode == 0 else 'FAILED'} "
                  f"(log: {log})", flush=True)
            if proc.returncode:
                failed.append(name)
    return failed


# ---------------------------------------------------------------------------------------------- train
def prepare(args, s: Setup) -> None:
    if (s.data_dir / "dataset.json").is_file():
        check_data_size(s)
        return
    py = sys.executable
    if s.quick:
        argv = [py, "prepare_busi_dataset.py", "--phantom", "80", "--img_size", "32", "--output_dir", str(s.data_dir)]
    elif args.input_dir:
        argv = [py, "prepare_busi_dataset.py", "--input_dir", args.input_dir, "--img_size", str(s.img_size),
                "--output_dir", str(s.data_dir)]
    else:
        raise UserError(f"{s.data_dir}: no prepared dataset; pass --input_dir /path/to/BUSBRA to prepare it")
    print(f"prepare: {' '.join(argv)}", flush=True)
    subprocess.run(argv, cwd=ROOT, check=True, env=env(s.threads), stdout=subprocess.DEVNULL)


def check_data_size(s: Setup) -> None:
    """The prepared dataset must be at the benchmark's image size (its FLOPs and floors are counted at it)."""
    try:
        size = int(json.loads((s.data_dir / "dataset.json").read_text()).get("img_size", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        raise UserError(f"{s.data_dir / 'dataset.json'}: unreadable; prepare the dataset again") from None
    if size and size != s.img_size:
        raise UserError(f"{s.data_dir}: prepared at {size} px, but --img_size is {s.img_size}; pass --img_size "
                        f"{size} or a --data_dir prepared at {s.img_size} px")


def train_argv(s: Setup, recipe: str, budgets: Sequence[float]) -> list[str]:
    argv = [sys.executable, "train_medsegdiff.py", "--config", PRESET, "--data_dir", str(s.data_dir),
            "--output_dir", str(s.run_dir(recipe)), "--budget_minutes", f"{max(budgets):g}",
            "--snapshot_minutes", ",".join(f"{b:g}" for b in budgets), *s.bench_flags(), "--img_size", str(s.img_size)]
    return argv + s.recipe_flags(recipe)


def oversubscription(jobs: int, threads: int, cores: int | None) -> str:
    """A warning when the trainings running at once ask for more threads than the machine has cores ('' if not)."""
    if cores and jobs * threads > cores:
        return (f"warning: {jobs} jobs x {threads} threads on {cores} cores: time-sharing makes each step cost more "
                f"CPU time, so a CPU-minute budget buys fewer steps than on a machine that is not oversubscribed "
                f"(measured here: 10% fewer at 4 jobs on 2 cores); compare only recipes trained under the same load")
    return ""


def started_budget(s: Setup, recipe: str) -> float | None:
    """The budget a recipe's run was started for (None: not started, or no budget recorded)."""
    try:
        return float(json.loads((s.run_dir(recipe) / "config.json").read_text())["budget_minutes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train(args, s: Setup, recipes: Sequence[str], budgets: Sequence[float]) -> list[str]:
    tasks = []
    for r in recipes:
        mine = s.recipe_budgets(r, budgets)
        if all(s.snapshot(r, b).is_file() for b in mine):
            continue
        if s.decays_to_budget(r) and (trained := started_budget(s, r)) not in (None, max(mine)):
            raise UserError(f"{r}: its learning rate decays over the budget, and its run in {s.run_dir(r)} was "
                            f"started for {trained:g} minutes, not {max(mine):g}; continuing it would restart the "
                            f"decay, so use another --work_dir for that budget")
        tasks.append((f"train {r}", train_argv(s, r, mine), s.work / "logs" / f"train_{r}.log"))
    warning = "" if s.on_gpu else oversubscription(min(args.jobs, len(tasks)), s.threads, os.cpu_count())
    if warning:
        print(warning, flush=True)
    return run_tasks(tasks, args.jobs, s.threads)


# ---------------------------------------------------------------------------------------------- evaluate
def real_reference(s: Setup) -> dict[str, Any]:
    """The real images split into training and held-out (val + test) sides, with their Inception features
    (computed once per dataset, cached in the work folder)."""
    import numpy as np
    import torch

    from data.pairs import open_pair_dataset
    ds = open_pair_dataset(s.data_dir)
    rows = ds.select(labels=["benign", "malignant"])
    images, masks = ds.load(rows)
    held = np.array([r["split"] != "train" for r in rows])
    labels = np.array([r["label"] for r in rows])
    groups = np.array([r.get("group") or r["id"] for r in rows])
    cache = s.work / "eval" / "real_features.pt"
    if cache.is_file():
        feats = torch.load(cache, weights_only=True)
    else:
        feats = inception_features(images)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, cache)
    return {"images": images, "masks": masks, "heldout": held, "labels": labels, "groups": groups, "feats": feats}


_EXTRACTOR = []


def inception_features(images) -> dict[str, Any]:
    from metrics.inception import create_extractor, extract_features, resolve_inception_weights
    if not _EXTRACTOR:
        _EXTRACTOR.append(create_extractor(resolve_inception_weights("offline"), "cpu"))
    return extract_features(images, _EXTRACTOR[0], progress=False)


def class_counts(labels, n: int) -> dict[str, int]:
    """``n`` split over the classes in the proportions of the real training split (largest remainder)."""
    import numpy as np
    names, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    out = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - out))[: n - out.sum()]:
        out[i] += 1
    return {str(k): int(v) for k, v in zip(names, out)}


def same_as_primary(ckpt: dict[str, Any], ema: str) -> str | None:
    """Why the snapshot's EMA of decay `ema` is not a separate result (its weights equal the preset's EMA), or None.

    With the warm-up cap min(d, (1 + n) / (10 + n)) two decays above the cap at step n have followed the same
    trajectory, bit for bit; evaluating both would report one model twice as two EMA lengths."""
    import torch
    extra = ckpt["extra_emas"][ema]
    if any(not torch.equal(extra[k], v) for k, v in ckpt["ema"].items()):
        return None
    from training.ema import warmup_cap
    n = int(ckpt.get("step", 0))
    return (f"EMA {ema} equals EMA {EMA_VARIANTS[0]} at step {n}: the warm-up cap (1+n)/(10+n) = "
            f"{warmup_cap(n):.5f} is below both decays, so both are that cap")


def checkpoint_for(s: Setup, recipe: str, minutes: float, ema: str) -> Path:
    """The snapshot, or (another EMA length) a copy of it whose EMA weights are that length's."""
    from common.checkpoint import load_checkpoint, save_checkpoint
    snap = s.snapshot(recipe, minutes)
    if ema == EMA_VARIANTS[0]:
        return snap
    out = s.eval_dir(recipe, minutes, ema) / "checkpoint.pth"
    if not out.is_file():
        ckpt = load_checkpoint(snap, expect_kind="diffusion")
        why = extra_ema_skip(snap, ema, ckpt)
        if why:
            raise UserError(f"{snap}: {why}; nothing to evaluate")
        ckpt["ema"] = ckpt.pop("extra_emas")[ema]
        ckpt.pop("format", None)
        save_checkpoint(out, ckpt)
    return out


def draw_one(s: Setup, recipe: str, minutes: float, ema: str, sampler: str = "") -> dict[str, Any]:
    """Draw N pairs from one snapshot into <eval_dir>/samples on s.device and record the draw in draw.json (the
    snapshot's training steps and time, the sampling time), so that measuring needs neither the snapshot nor the
    device it was drawn on. Returns draw.json."""
    import numpy as np
    import torch

    from common.checkpoint import load_checkpoint
    from data.pairs import open_pair_dataset
    from sampling.generation import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, GenerationRequest, generate

    out = s.eval_dir(recipe, minutes, ema, sampler)
    if (out / "draw.json").is_file():
        return json.loads((out / "draw.json").read_text())
    torch.set_num_threads(s.threads)
    ds = open_pair_dataset(s.data_dir)
    train_labels = np.array([r["label"] for r in ds.select(labels=["benign", "malignant"]) if r["split"] == "train"])
    counts = class_counts(train_labels, s.n_samples)
    ckpt_path = checkpoint_for(s, recipe, minutes, ema)
    ckpt = load_checkpoint(ckpt_path, expect_kind="diffusion")
    name, steps, guidance = parse_sampler(sampler) if sampler else (DEFAULT_SAMPLER, 0, DEFAULT_GUIDANCE)
    t0 = time.time()
    summary = generate(GenerationRequest(
        checkpoint_path=str(ckpt_path), output_dir=str(out / "samples"), classes=sorted(counts), counts=counts,
        sampler=name, steps=4 if s.quick else steps, guidance_scale=guidance,
        batch_size=128 if s.on_gpu else 16, device=s.device,
        command=f"bench/quality.py {recipe} {minutes} {ema} {sampler}"))
    sampling_s = time.time() - t0
    drawn = sum(summary.get("drawn_this_run", {}).values())
    res = {"recipe": recipe, "minutes": minutes, "ema": ema, "checkpoint": str(ckpt_path), "device": s.device,
           "img_size": s.img_size, "steps": int(ckpt["step"]), "train_cpu_s": float(ckpt.get("train_cpu_s", 0.0)),
           "train_wall_s": float(ckpt.get("train_wall_s", 0.0)), "train_machine": ckpt.get("train_machine"),
           "parameters": sum(v.numel() for v in ckpt["ema"].values()), "counts": counts,
           "rejected": summary.get("rejected_this_run"), "sampling_seconds": sampling_s,
           "loop_seconds": summary.get("sampling_seconds"),
           "s_per_sample": (summary.get("sampling_seconds") or sampling_s) / max(1, drawn),
           "sampler": {"name": name, "steps": summary.get("steps"), "guidance": guidance}}
    atomic_write_json(out / "draw.json", res)
    return res


def evaluate_one(s: Setup, recipe: str, minutes: float, ema: str, sampler: str = "") -> dict[str, Any]:
    """Draw (unless drawn), measure and write <eval_dir>/metrics.json + grid.png for one snapshot (see the module
    docstring)."""
    import numpy as np

    from data.pairs import open_pair_dataset
    from metrics.generation import evaluate_generation
    from metrics.morphology import evaluate_morphology
    from metrics.similarity import nearest_ssim

    out = s.eval_dir(recipe, minutes, ema, sampler)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    drawn = draw_one(s, recipe, minutes, ema, sampler)
    counts = drawn["counts"]
    real = real_reference(s)
    syn = open_pair_dataset(out / "samples")
    syn_images, syn_masks = syn.load()
    syn_labels = np.array([r["label"] for r in syn.rows])
    feats = {"synthetic": inception_features(syn_images), "real": real["feats"]}
    gen = evaluate_generation(feats, {"synthetic": syn_labels, "real": real["labels"]}, real["groups"],
                              real["heldout"], draws=3 if s.quick else 5, seed=0, metrics=("fid", "kid"),
                              kid_subsets=20 if s.quick else 100, fid_inf=False)
    morph, _ = evaluate_morphology(syn_images, syn_masks, syn_labels, real["images"], real["masks"],
                                   real["labels"], real["groups"], real["heldout"], draws=3 if s.quick else 5)
    train_images = real["images"][~real["heldout"]]
    near, _ = nearest_ssim(syn_images, train_images)
    near_held, _ = nearest_ssim(real["images"][real["heldout"]], train_images)
    w1 = {lab: v["mean_wasserstein"] for lab, v in morph["per_class"].items() if "mean_wasserstein" in v}
    weights = {lab: counts.get(lab, 0) for lab in w1}
    total = sum(weights.values()) or 1

    def wmean(key):
        vals = [w1[lab][key]["mean"] for lab in w1]
        return float(sum(v * weights[lab] for v, lab in zip(vals, w1)) / total) if vals else None

    a = gen["all"]
    res = {
        **{k: v for k, v in drawn.items() if k not in ("device", "img_size")},
        "n": int(a["n"]),
        "kid": a["kid"]["full_sets"]["mean"], "kid_std": a["kid"]["full_sets"]["std"],
        "kid_floor": a["kid"]["floor"]["mean"], "kid_floor_std": a["kid"]["floor"]["std"],
        "fid": a["fid"]["full_sets"], "fid_floor": a["fid"]["floor"]["mean"], "fid_floor_std": a["fid"]["floor"]["std"],
        "per_class": {lab: {"kid": v["kid"]["full_sets"]["mean"], "kid_floor": v["kid"]["floor"]["mean"],
                            "fid": v["fid"]["full_sets"], "fid_floor": v["fid"]["floor"]["mean"], "n": v["n"]}
                      for lab, v in gen["per_class"].items() if "full_sets" in v.get("kid", {})},
        "morphology_w1": wmean("synthetic"), "morphology_w1_floor": wmean("floor"),
        "morphology_per_class": {lab: {"synthetic": v["synthetic"]["mean"], "floor": v["floor"]["mean"]}
                                 for lab, v in w1.items()},
        "nearest_train_ssim": float(near.mean()), "nearest_train_ssim_floor": float(near_held.mean()),
    }
    if drawn.get("device", "cpu") != "cpu":
        res["drawn_on"] = drawn["device"]
    name, steps, guidance = drawn["sampler"]["name"], drawn["sampler"]["steps"], drawn["sampler"]["guidance"]
    from common.visual import labelled_grid
    labelled_grid(out / "grid.png", syn_images, syn_masks, syn_labels,
                  f"{recipe} - {minutes:g} min ({res['steps']} steps), EMA {ema}, {name} {steps} "
                  f"steps, guidance {guidance:g} - KID {res['kid']:.4f}")
    atomic_write_json(out / "metrics.json", res)
    return res


def compare_samplers(args, s: Setup, recipe: str, minutes: float, specs: Sequence[str]) -> list[str]:
    """The same snapshot drawn with each sampler variant at the same N (so their KIDs compare)."""
    real_reference(s)
    tasks = []
    for spec in specs:
        if (s.eval_dir(recipe, minutes, EMA_VARIANTS[0], spec) / "metrics.json").is_file():
            continue
        if is_default_sampler(spec):   # the evaluate phase's draw: reused in the report, not drawn twice
            if not (s.eval_dir(recipe, minutes, EMA_VARIANTS[0]) / "metrics.json").is_file():
                print(f"sampler {spec} on {recipe} {minutes:g} min: the default; run the evaluate phase for it")
            continue
        tasks.append((f"sampler {spec} on {recipe} {minutes:g} min", eval_argv(args, s, recipe, minutes,
                                                                                EMA_VARIANTS[0], spec),
                      s.work / "logs" / f"sampler_{recipe}_min{minutes:g}_{spec.replace(':', '-')}.log"))
    return run_tasks(tasks, args.jobs, s.threads)


def extra_ema_skip(snap: Path, ema: str, ckpt: dict[str, Any] | None = None) -> str | None:
    """A reason not to evaluate EMA `ema` of a snapshot (``ckpt``: the snapshot, if already loaded): absent, or
    identical to the preset's EMA."""
    from common.checkpoint import load_checkpoint
    ckpt = ckpt if ckpt is not None else load_checkpoint(snap, expect_kind="diffusion")
    if ema not in ckpt.get("extra_emas", {}):
        return (f"EMA {ema} not in the snapshot (trained with extra EMA decays "
                f"{', '.join(ckpt.get('extra_emas', {})) or 'none'})")
    return same_as_primary(ckpt, ema)


def eval_argv(args, s: Setup, recipe: str, minutes: float, ema: str, *extra: str) -> list[str]:
    """One evaluation (or, with --draw_only, one draw) in a worker process."""
    return [sys.executable, "bench/quality.py", "--eval_one", recipe, f"{minutes:g}", ema, *extra, "--work_dir",
            str(s.work), "--data_dir", str(args.data_dir), "--n_samples", str(args.n_samples), "--threads_per_job",
            str(s.threads), "--img_size", str(s.img_size), "--device", s.device] + (["--quick"] if s.quick else [])


def evaluate(args, s: Setup, recipes: Sequence[str], budgets: Sequence[float], draw_only: bool = False) -> list[str]:
    """The evaluate phase (or, draw_only, the draw phase) over every recipe, budget and EMA length."""
    from common.checkpoint import load_checkpoint
    if not draw_only:
        real_reference(s)   # the real features once, before the workers start
    emas = [EMA_VARIANTS[0], *args.ema_variants]
    done, phase, log = ("draw.json", "draw", "draw") if draw_only else ("metrics.json", "evaluate", "eval")
    extra = ["--draw_only"] if draw_only else []
    tasks = []
    loaded: dict[Path, dict[str, Any]] = {}
    for r in recipes:
        for b in budgets:
            for ema in emas:
                out = s.eval_dir(r, b, ema)
                drawn = (out / "draw.json").is_file()
                if (out / done).is_file() or (not s.snapshot(r, b).is_file() and not drawn):
                    continue
                if ema != EMA_VARIANTS[0] and not drawn:
                    snap = s.snapshot(r, b)
                    if snap not in loaded:   # one read per snapshot, whatever the number of extra EMAs
                        loaded = {snap: load_checkpoint(snap, expect_kind="diffusion")}
                    why = extra_ema_skip(snap, ema, loaded[snap])
                    if why:
                        print(f"skip {r} {b:g} min EMA {ema}: {why}", flush=True)
                        continue
                tasks.append((f"{phase} {r} {b:g} min EMA {ema}", eval_argv(args, s, r, b, ema, *extra),
                              s.work / "logs" / f"{log}_{r}_min{b:g}_ema{ema}.log"))
    return run_tasks(tasks, args.jobs, s.threads)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, r in RECIPES.items():
            print(f"{name:12s} {r.what}\n{'':12s} flags: {' '.join(BASELINE_FLAGS + r.flags)}")
        return 0
    s = setup_from(args)
    if args.eval_one:
        r, m, ema, *sampler = args.eval_one
        (draw_one if args.draw_only else evaluate_one)(s, r, float(m), ema, sampler[0] if sampler else "")
        return 0
    known = QUICK_RECIPES if args.quick else RECIPES
    recipes = list(known) if (args.quick and args.recipes == ["current", "peer"]) or args.recipes == ["all"] \
        else args.recipes
    bad_ema = [e for e in args.ema_variants if e not in EMA_VARIANTS[1:]]
    if bad_ema:
        raise UserError(f"--ema_variants: unknown {', '.join(bad_ema)} (known: {', '.join(EMA_VARIANTS[1:])})")
    bad = [r for r in recipes if r not in known]
    if bad:
        raise UserError(f"--recipes: unknown {', '.join(bad)} (known: {', '.join(known)}; see --list)")
    try:
        budgets = sorted({float(b) for b in args.budgets})
    except ValueError:
        raise UserError(f"--budgets: not a comma list of minutes: {','.join(args.budgets)}") from None
    if args.quick:
        budgets = [0.02, 0.04]
    if not budgets or budgets[0] <= 0:
        raise UserError("--budgets: every budget must be > 0 minutes")
    phases = args.phases
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise UserError(f"--phases: unknown {', '.join(bad)} ({', '.join(PHASES)})")
    for spec in args.samplers:
        parse_sampler(spec)
    s.work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.output = str(s.work / "quality.json")
        args.headline_budget = budgets[-1]
        args.winner = args.winner or "edm"
    failed: list[str] = []
    if "train" in phases:
        prepare(args, s)
        failed += train(args, s, recipes, budgets)
    elif (s.data_dir / "dataset.json").is_file():
        check_data_size(s)
    if "draw" in phases:
        failed += evaluate(args, s, recipes, budgets, draw_only=True)
    if "evaluate" in phases:
        failed += evaluate(args, s, recipes, budgets)
    if "samplers" in phases:
        failed += compare_samplers(args, s, recipes[0], budgets[-1], args.samplers)
    if "report" in phases:
        report(args, s, recipes)
    if failed:
        raise UserError(f"failed: {', '.join(failed)} (see their logs under {s.work / 'logs'}); the rest ran; "
                        "rerun to resume")
    return 0


if __name__ == "__main__":
    run_main(main)
