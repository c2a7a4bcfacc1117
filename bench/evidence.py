#!/usr/bin/env python
"""Evidence on real ultrasound: the whole recipe on BUS-BRA, end to end, with the answer written to results/busbra_v2/.

Runs each phase as the plain command a user would type (printed before it starts; its output goes to
<runs_dir>/logs/<task>.log):

  prepare        prepare_busi_dataset.py on BUS-BRA (official case-grouped folds: no patient in two splits)
  subset<F>      a low-data regime: F of the training patients (stratified by label), val/test unchanged
  diffusion[F]   train_medsegdiff.py --config configs/busbra_evidence.yaml on the full data (and on each subset):
                 or --generator CKPT, a model already trained on this very dataset (checked by its fingerprint)
  generate[F]    generate_synthetic.py --balance_to <its real data>: the minority class topped up to the majority,
                 drawn with DDIM 50 steps (SAMPLER below: the sampler comparison of bench/quality.json)
  generate_cond  mask-conditioned pairs: images drawn for transformed TRAINING masks of the real data (never
                 val/test: create_combined_dataset.py checks it by content), as many as generate's
  combine*       create_combined_dataset.py (synthetic pairs in the training split only)
  seg_<arm>_seed<k>  train_segmentation.py --config configs/busbra_evidence_segmentation.yaml: every arm trains the
                 same number of optimiser steps (--max_train_steps of the preset), all tested on the same real
                 test split. Full data: real, real_strong (strong classic augmentation), synthetic (real + joint
                 synthetic), synthetic_strong, conditioned (real + mask-conditioned synthetic); each subset F:
                 real<F>, real<F>_strong, synthetic<F> (its generator trained on the subset only)
  evaluate*      evaluate.py: FID/KID beside real-vs-real floors on the same classes, SSIM, morphology,
                 memorisation, and (main evaluation) real vs real + synthetic

then summarises every arm and compares each other arm with the best non-synthetic arm of its regime, chosen on
VALIDATION Dice (nothing is tuned on the test split): 95% CIs from a two-level bootstrap over training seeds and test
images, one primary endpoint declared before the run (tumour Dice, full-data real + synthetic against the best
non-synthetic full-data arm), Holm-adjusted p for everything else, per-class Dice and HD95, and the plan's targets
scored (metrics/study.py, metrics/downstream.py, metrics/plan_targets.py). --reanalyse RESULTS_DIR redoes those
statistics from a results folder's per-image CSVs. Tasks run --jobs at a time in dependency order, each with
--threads_per_job CPU threads. Rerunning resumes: every phase resumes on its own, and finished datasets are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.cli import csv_list, positive_int, run_main
from common.errors import UserError  # noqa: E402

ARMS = {  # name -> (uses synthetic data, --augment, data regime (see arm_regime), training set)
    "real": (False, "standard", "full", "real"),
    "real_strong": (False, "strong", "full", "real"),
    "synthetic": (True, "standard", "full", "combined"),
    "synthetic_strong": (True, "strong", "full", "combined"),
    "conditioned": (True, "standard", "full", "combined_cond"),
}
# How every synthetic pair of the run is drawn. The declared run (docs/evidence.md) draws with DDIM 50 steps if the
# sampler comparison favours it once DPM-Solver++ at 50 steps is measured: on the same weights, 500 pairs each, DDIM
# 50 reached KID 0.0713 and 0.0750 on two snapshots against DPM-Solver++ 20's 0.0759 and 0.0822, and DPM-Solver++ 50
# 0.0802 (bench/quality.json "samplers"), so the gain is DDIM's, not the extra steps'.
SAMPLER = ["--sampler", "ddim", "--steps", "50"]
FRACTION_ARMS = {  # per low-data regime F (e.g. 25%): arm suffix -> (uses synthetic, --augment, training set)
    "": (False, "standard", "real"),
    "_strong": (False, "strong", "real"),
    "_synthetic": (True, "standard", "combined"),
}
COND_TRANSFORM = "scale=0.8:1.25,rotate=20,elastic=2,shift=0.1,flip=0.5"   # new lesions from training masks
EVIDENCE_BUDGET = 240       # CPU minutes of diffusion training (2x the first run's ~2 h of one thread)
QUICK = {  # a tiny budget that exercises every phase in about two minutes (tests/test_evidence.py)
    "img_size": 32,
    "diffusion": ["--model_channels", "16", "--channel_mult", "1,2", "--transformer_depth", "1", "--num_heads", "2",
                  "--batch_size", "2", "--max_steps", "12", "--warmup_steps", "2", "--save_every", "6",
                  "--log_every", "6", "--sample_every", "12", "--samples_per_class", "2", "--sample_steps", "4",
                  "--val_timesteps", "2", "--budget_minutes", "0", "--snapshot_minutes", ""],
    "generate": ["--steps", "4", "--batch_size", "8"],
    "segmentation": ["--max_train_steps", "6", "--batch_size", "2", "--base_width", "8", "--depth", "2"],
    "evaluate": ["--floor_draws", "2", "--kid_subsets", "10", "--diversity_pairs", "20"],
}


@dataclass
class Task:
    name: str
    argv: list[str]
    deps: list[str] = field(default_factory=list)
    skip_if: Path | None = None          # an output whose presence means the task is done (datasets only)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", default=os.environ.get("BUSBRA", "BUSBRA"),
                   help="the BUS-BRA folder (Images/, Masks/, bus_data.csv, 5-fold-cv.csv)")
    p.add_argument("--work_dir", default="data/evidence", help="prepared, synthetic and combined pair datasets")
    p.add_argument("--runs_dir", default="checkpoints/evidence", help="training runs, logs and the evaluation")
    p.add_argument("--results_dir", default=None,
                   help="where the small outputs are copied (default results/busbra_v2; with --quick "
                        "<runs_dir>/results)")
    p.add_argument("--img_size", type=positive_int, default=64, help="image size of every phase")
    p.add_argument("--total", type=positive_int, default=None,
                   help="size of the balanced training split, real + synthetic (generate_synthetic.py --total); "
                        "default: generate only the minority class, up to the majority's count")
    p.add_argument("--seeds", type=csv_list, default=["0", "1", "2"], help="segmentation seeds per arm")
    p.add_argument("--arms", type=csv_list, default=list(ARMS), help=f"full-data arms to train ({', '.join(ARMS)})")
    p.add_argument("--fractions", type=csv_list, default=["0.25"],
                   help="low-data regimes: fractions of the training patients (each gets its own generator and the "
                        "arms real<F>, real<F>_strong, real<F>_synthetic); empty for none")
    p.add_argument("--generator", default=None, metavar="CKPT",
                   help="use this joint checkpoint instead of training one (e.g. bench/quality.py's winner): it must "
                        "have been trained on this prepared dataset (checked by its recorded fingerprint)")
    p.add_argument("--generator_fraction", type=csv_list, default=[], metavar="F=CKPT",
                   help="the same for a low-data regime, e.g. 25=checkpoints/g25/snapshots/min240.pth")
    p.add_argument("--make_subset", nargs=3, metavar=("SOURCE", "OUTPUT", "FRACTION"), help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=positive_int, default=2, help="tasks run at the same time")
    p.add_argument("--threads_per_job", type=positive_int, default=None,
                   help="CPU threads per task (default: cores // jobs)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget (32 px, a few steps and epochs): checks that every phase runs, proves nothing")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands and exit")
    p.add_argument("--reanalyse", metavar="RESULTS_DIR", default=None,
                   help="instead of running: recompute the statistics of a results folder (e.g. results/busbra) "
                        "from its segmentation/<arm>_seed<k>_per_image_test.csv files and write reanalysis.json "
                        "and reanalysis.txt there, beside what its summary.json said")
    return p


def fraction_tag(f: float) -> str:
    return f"{round(100 * f):d}"


def fraction_arms(fractions) -> dict[str, tuple]:
    """The arms of the low-data regimes, e.g. real25, real25_strong, real25_synthetic for 25%."""
    out = {}
    for f in fractions:
        tag = fraction_tag(f)
        for suffix, (syn, augment, data) in FRACTION_ARMS.items():
            out[f"real{tag}{suffix}"] = (syn, augment, f"{tag}%", f"{data}{tag}")
    return out


def all_arms(args) -> dict[str, tuple]:
    return {**{a: v for a, v in ARMS.items() if a in args.arms}, **fraction_arms(args.fractions)}


def generator_path(runs: Path, name: str, quick: bool) -> Path:
    """The checkpoint a diffusion task leaves: the EMA weights at the end of the preset's training budget (its
    last snapshot), or best_model.pth for a run without a budget (--quick)."""
    if quick:
        return runs / name / "best_model.pth"
    from common.cli import config_from_flags
    from training.config import DiffusionTrainConfig
    cfg = config_from_flags(DiffusionTrainConfig, ["--config", str(ROOT / "configs" / "busbra_evidence.yaml")])
    if cfg.run.budget_minutes:
        return runs / name / "snapshots" / f"min{cfg.run.budget_minutes:g}.pth"
    return runs / name / "best_model.pth"


def plan(args) -> list[Task]:
    py = sys.executable
    size = QUICK["img_size"] if args.quick else args.img_size
    work, runs = Path(args.work_dir), Path(args.runs_dir)
    real = work / f"busbra{size}"
    data = {"real": real, "combined": work / "combined", "combined_cond": work / "combined_cond"}
    q = QUICK if args.quick else {k: [] for k in QUICK}
    total = ["--total", "12"] if args.quick else (["--total", str(args.total)] if args.total else [])
    tasks = [Task("prepare", [py, "prepare_busi_dataset.py", "--input_dir", args.input_dir, "--img_size", str(size),
                              "--output_dir", str(real)], skip_if=real / "dataset.json")]

    def generator_tasks(tag: str, real_dir: Path, given: str | None, prepared: str) -> None:
        """diffusion<tag> (unless a trained checkpoint is given), generate<tag>, combine<tag>."""
        name = f"medsegdiff{tag}"
        ckpt = Path(given) if given else generator_path(runs, name, args.quick)
        deps = [prepared]
        if not given:
            tasks.append(Task(f"diffusion{tag}", [py, "train_medsegdiff.py", "--config", "configs/busbra_evidence.yaml",
                                                  "--data_dir", str(real_dir), "--output_dir", str(runs / name),
                                                  "--img_size", str(size), *q["diffusion"]], deps=[prepared]))
            deps = [f"diffusion{tag}"]
        syn, comb = work / f"synthetic{tag}", work / f"combined{tag}"
        tasks.append(Task(f"generate{tag}", [py, "generate_synthetic.py", "--checkpoint_path", str(ckpt),
                                             "--balance_to", str(real_dir), *total, "--output_dir", str(syn),
                                             *SAMPLER, *q["generate"]], deps=deps))
        tasks.append(Task(f"combine{tag}", [py, "create_combined_dataset.py", "--real_data", str(real_dir),
                                            "--synthetic_data", str(syn), "--output_dir", str(comb), "--link"],
                          deps=[f"generate{tag}"], skip_if=comb / "dataset.json"))
        data[f"combined{tag}"], data[f"synthetic{tag}"], data[f"ckpt{tag}"] = comb, syn, ckpt

    generator_tasks("", real, args.generator, "prepare")
    n_cond = ["--num_samples_per_class", "6"] if args.quick else []
    cond_counts = n_cond or ["--balance_to", str(real), *total]
    tasks.append(Task("generate_cond", [py, "generate_synthetic.py", "--checkpoint_path", str(data["ckpt"]),
                                        "--condition_masks", str(real), "--mask_transform", COND_TRANSFORM,
                                        *cond_counts, "--output_dir", str(work / "synthetic_cond"), *SAMPLER,
                                        *q["generate"]],
                      deps=["generate"]))
    tasks.append(Task("combine_cond", [py, "create_combined_dataset.py", "--real_data", str(real), "--synthetic_data",
                                       str(work / "synthetic_cond"), "--output_dir", str(data["combined_cond"]),
                                       "--link"], deps=["generate_cond"], skip_if=data["combined_cond"] / "dataset.json"))
    for f in args.fractions:
        tag = fraction_tag(f)
        sub = work / f"busbra{size}_train{tag}"
        data[f"real{tag}"] = sub
        tasks.append(Task(f"subset{tag}", [py, "bench/evidence.py", "--make_subset", str(real), str(sub), str(f)],
                          deps=["prepare"], skip_if=sub / "dataset.json"))
        generator_tasks(tag, sub, (args.generator_fraction or {}).get(tag), f"subset{tag}")
    arms = all_arms(args)
    for arm, (uses_syn, augment, _, key) in arms.items():
        producer = {"real": "prepare", "combined": "combine", "combined_cond": "combine_cond"}.get(
            key, f"combine{key[8:]}" if key.startswith("combined") else f"subset{key[4:]}")
        for seed in args.seeds:
            tasks.append(Task(f"seg_{arm}_seed{seed}", [
                py, "train_segmentation.py", "--config", "configs/busbra_evidence_segmentation.yaml",
                "--data_dir", str(data[key]), "--augment", augment, "--seed", str(seed),
                "--output_dir", str(runs / f"seg_{arm}_seed{seed}"), *q["segmentation"]], deps=[producer]))
    ev = [py, "evaluate.py", "--real_data", str(real), "--synthetic_data", str(data["synthetic"]), "--output_dir",
          str(runs / "evaluation"), *q["evaluate"]]
    deps = ["generate"]
    for arm, flag in (("real", "--baseline_run"), ("synthetic", "--combined_run")):
        if arm in arms:
            for seed in args.seeds:
                ev += [flag, str(runs / f"seg_{arm}_seed{seed}")]
                deps.append(f"seg_{arm}_seed{seed}")
    tasks.append(Task("evaluate", ev, deps=deps))
    tasks.append(Task("evaluate_cond", [py, "evaluate.py", "--real_data", str(real), "--synthetic_data",
                                        str(work / "synthetic_cond"), "--output_dir", str(runs / "evaluation_cond"),
                                        "--skip", "downstream", *q["evaluate"]], deps=["generate_cond"]))
    return tasks


def run_tasks(tasks: list[Task], jobs: int, threads: int, log_dir: Path) -> dict[str, float]:
    """Run ``tasks`` respecting their dependencies, ``jobs`` at a time; returns seconds per task."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = {t.name: t for t in tasks}
    done: set[str] = set()
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    seconds: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "30"}
    failed = None
    while pending or running:
        for name in [n for n, t in pending.items() if failed is None and len(running) < jobs
                     and all(d in done for d in t.deps)]:
            if len(running) >= jobs:
                break
            task = pending.pop(name)
            if task.skip_if is not None and task.skip_if.exists():
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {task.skip_if} exists, kept", flush=True)
                done.add(name)
                seconds[name] = 0.0
                continue
            fh = open(log_dir / f"{name}.log", "a")
            cmd = shlex.join(task.argv[1:])
            fh.write(f"\n$ OMP_NUM_THREADS={threads} python {cmd}\n")
            fh.flush()
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: python {cmd}", flush=True)
            proc = subprocess.Popen(task.argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), fh)
        if failed is not None and not running:
            break
        if not pending and not running:
            break
        time.sleep(2)
        for name, (proc, t0, fh) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            fh.close()
            del running[name]
            seconds[name] = round(time.time() - t0, 1)
            if code == 0:
                done.add(name)
                print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {seconds[name] / 60:.1f} min", flush=True)
            else:
                failed = name
                tail = (log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {name} (exit {code}); last lines of "
                      f"{log_dir / f'{name}.log'}:\n  " + "\n  ".join(tail), flush=True)
        if failed is None and pending and not running and not any(all(d in done for d in t.deps)
                                                                  for t in pending.values()):
            raise RuntimeError(f"unsatisfiable dependencies: {sorted(pending)}")
    if failed is not None:
        raise UserError(f"task {failed} failed (see {log_dir / (failed + '.log')}); fix it and rerun the same "
                        "command: finished work is kept")
    return seconds


# ---------------------------------------------------------------------------------------------- summary
PRIMARY_ARM = "synthetic"   # the primary endpoint: its tumour Dice against the best non-synthetic arm, chosen on
                            # validation Dice (metrics/study.py); every other comparison and metric is secondary


def arm_regime(arm: str, arms: dict | None = None) -> str:
    """The data regime of an arm ("full", or e.g. "25%"). Arms are compared only with the best non-synthetic arm of
    their own regime. Arms of the first run (results/busbra) are all "full"."""
    spec = (arms or ARMS).get(arm)
    return str(spec[2]) if spec is not None and len(spec) > 2 else "full"


def arm_summary(run_dirs: list[Path]) -> dict[str, object]:
    """Each metric of one arm with its two-level (seeds x images) bootstrap CI (metrics.study.arm_summary)."""
    from metrics.study import arm_summary as summary
    return summary(run_dirs)


def study_statistics(runs: dict[str, list], evaluation: dict | None, arms: dict) -> dict[str, object]:
    """Arms, comparisons, primary endpoint, Holm-adjusted secondaries and plan targets (metrics/study.py)."""
    from metrics.study import statistics
    return statistics(runs, {a: arms[a][0] for a in runs}, {a: arm_regime(a, arms) for a in runs}, PRIMARY_ARM,
                      evaluation)


def diffusion_history(run_dir: Path) -> dict[str, object]:
    """Steps, training wall-clock and resumptions of a train_medsegdiff.py run over ALL its invocations (the
    scheduler's task time holds only the last one): each stats.jsonl training record covers the steps since the
    previous logged step at its s/step, and where a resume redid steps the later record of a step wins, so the
    time is that of the steps the final model went through (work lost to an interruption is not counted); a
    resumption counts when it went on training (a rerun of a finished run also logs "resumed ... at step <final>")."""
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    recs = [s for s in stats if "img_per_s" in s]
    s_per_step = {rec["step"]: rec["s_per_step"] for rec in recs}   # later records (after a resume) win
    steps = sorted(s_per_step)
    train_s = sum(s_per_step[st] * (st - prev) for prev, st in zip([0] + steps, steps))
    final = recs[-1]["step"] if recs else 0
    log = run_dir / "log.txt"
    starts = re.findall(r"resumed from .* at step (\d+)", log.read_text()) if log.is_file() else []
    return {"steps": final if recs else None, "train_wallclock_s": round(train_s, 1),
            "resumes": sum(int(n) < final for n in starts),
            "img_per_s_median": sorted(s["img_per_s"] for s in recs)[len(recs) // 2] if recs else None}


def generator_record(run_dir: Path, ckpt: Path | None) -> dict[str, object]:
    """What trained a generator: its config, steps and the budget clock over every invocation."""
    out: dict[str, object] = {"run_dir": str(run_dir)}
    if (run_dir / "stats.jsonl").is_file():
        out.update(diffusion_history(run_dir))
    if (run_dir / "config.json").is_file():
        c = json.loads((run_dir / "config.json").read_text())
        out["config"] = {k: c.get(k) for k in ("img_size", "train_batch_size", "learning_rate", "lr_scheduler",
                                               "arch", "model_channels", "channel_mult", "patch_size",
                                               "parameterization", "prediction_type", "snr_gamma", "self_condition",
                                               "mask_encoding", "mask_scale", "sdf_width", "budget_minutes",
                                               "data_dir", "resolved_precision", "device_resolved") if k in c}
    if ckpt is not None and ckpt.is_file():
        from common.checkpoint import load_checkpoint
        ck = load_checkpoint(ckpt, expect_kind="diffusion")
        out.update(checkpoint=str(ckpt), checkpoint_step=ck.get("step"),
                   train_cpu_minutes=round(float(ck.get("train_cpu_s", 0.0)) / 60, 1))
    return out


def summarise(args, tasks_seconds: dict[str, float]) -> dict[str, object]:
    runs = Path(args.runs_dir)
    arms = all_arms(args)
    ev = runs / "evaluation" / "metrics.json"
    stats = study_statistics({arm: [runs / f"seg_{arm}_seed{s}" for s in args.seeds] for arm in arms},
                             json.loads(ev.read_text()) if ev.is_file() else None, arms)
    generators = {}
    for tag in [""] + [fraction_tag(f) for f in args.fractions]:
        given = args.generator if not tag else (args.generator_fraction or {}).get(tag)
        run_dir = Path(given).parent.parent if given and Path(given).parent.name == "snapshots" else (
            Path(given).parent if given else runs / f"medsegdiff{tag}")
        generators[tag or "full"] = generator_record(run_dir, Path(given) if given else None)
    ev_cond = runs / "evaluation_cond" / "metrics.json"
    return {
        "command": shlex.join(["python", "bench/evidence.py", *sys.argv[1:]]),
        "quick": bool(args.quick), "seeds": args.seeds, "arm_definitions": {a: {"synthetic": v[0], "augment": v[1],
                                                                     "regime": v[2], "training_set": v[3]}
                                                                 for a, v in arms.items()},
        **stats,
        "generators": generators,
        "conditioned_realism": (json.loads(ev_cond.read_text()).get("generation") if ev_cond.is_file() else None),
        "task_seconds": tasks_seconds,
        "threads_per_job": args.threads_per_job, "jobs": args.jobs,
        "machine": {"cpu_count": os.cpu_count(), "platform": sys.platform},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_summary(s: dict[str, object]) -> str:
    from metrics.study import format_statistics
    return format_statistics(s)


def reanalyse(results_dir: str) -> Path:
    """--reanalyse: the statistics of a committed results folder recomputed from its per-image CSVs, beside its
    summary.json; writes reanalysis.json and reanalysis.txt there and prints the text."""
    from common.io import atomic_write_json, atomic_write_text
    from metrics.study import format_reanalysis, reanalyse as redo
    res = Path(results_dir)
    first_run = {"real": (False,), "real_strong": (False,), "synthetic": (True,), "synthetic_strong": (True,)}
    arms = {**first_run, **ARMS, **fraction_arms([0.25, 0.5])}
    r = redo(res, {a: v[0] for a, v in arms.items()}, {a: arm_regime(a, arms) for a in arms}, PRIMARY_ARM)
    r = {"command": shlex.join(["python", "bench/evidence.py", *sys.argv[1:]]), **r,
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = format_reanalysis(r)
    atomic_write_json(res / "reanalysis.json", r)
    atomic_write_text(res / "reanalysis.txt", text + "\n")
    print(text)
    return res


def copy_results(args, summary: dict[str, object]) -> Path:
    """The small outputs (no checkpoints, no bulk images) into the results folder."""
    from common.io import atomic_write_json, atomic_write_text
    runs, work = Path(args.runs_dir), Path(args.work_dir)
    res = Path(args.results_dir or (runs / "results" if args.quick else "results/busbra_v2"))
    res.mkdir(parents=True, exist_ok=True)
    ev = runs / "evaluation"
    copies = {ev / "metrics.json": "evaluation_metrics.json", ev / "report.html": "report.html",
              work / "synthetic" / "preview.png": "synthetic_preview.png",
              runs / "medsegdiff" / "log.txt": "diffusion_log.txt",
              runs / "medsegdiff" / "stats.jsonl": "diffusion_stats.jsonl",
              runs / "medsegdiff" / "config.json": "diffusion_config.json",
              work / "synthetic" / "generation.json": "generation.json",
              work / "synthetic_cond" / "preview.png": "synthetic_cond_preview.png",
              runs / "evaluation_cond" / "metrics.json": "evaluation_cond_metrics.json",
              Path(args.input_dir) / "LICENSE.txt": "BUSBRA_LICENSE.txt"}
    grids = sorted((runs / "medsegdiff" / "samples").glob("step_*.png"))
    if grids:
        copies[grids[-1]] = "diffusion_samples_last.png"
    for src, name in copies.items():
        if src.is_file():
            shutil.copyfile(src, res / name)
    seg = res / "segmentation"
    seg.mkdir(exist_ok=True)
    for arm in all_arms(args):
        for s in args.seeds:
            d = runs / f"seg_{arm}_seed{s}"
            for f in ("metrics.json", "per_image_test.csv"):
                if (d / f).is_file():
                    shutil.copyfile(d / f, seg / f"{arm}_seed{s}_{f}")
    _real_grid(work, res, QUICK["img_size"] if args.quick else args.img_size)
    atomic_write_json(res / "summary.json", summary)
    atomic_write_text(res / "summary.txt", format_summary(summary) + "\n")
    return res


def _real_grid(work: Path, res: Path, size: int) -> None:
    """real_samples.png: 8 real training pairs per class, laid out like synthetic_preview.png."""
    from data.pairs import open_pair_dataset
    from common.visual import grid_from_arrays
    ds = open_pair_dataset(work / f"busbra{size}")
    rows = []
    for lab in ("benign", "malignant"):
        rows += ds.select(split="train", labels=lab)[:8]
    if rows:
        images, masks = ds.load(rows)
        grid_from_arrays(res / "real_samples.png", list(images), list(masks > 0), rows=2)


def check_generators(args) -> None:
    """A given generator must have been trained on the dataset this study prepares (its recorded fingerprint)."""
    from common.checkpoint import load_checkpoint
    from data.pairs import dataset_fingerprint
    size = QUICK["img_size"] if args.quick else args.img_size
    real = Path(args.work_dir) / f"busbra{size}"
    given = {"": args.generator, **args.generator_fraction}
    for tag, ckpt in given.items():
        if not ckpt:
            continue
        if not Path(ckpt).is_file():
            raise UserError(f"--generator{'_fraction ' + tag if tag else ''}: {ckpt} not found")
        data = real if not tag else Path(args.work_dir) / f"busbra{size}_train{tag}"
        trained = (load_checkpoint(ckpt, expect_kind="diffusion").get("training_data") or {})
        if not trained.get("dataset_fingerprint"):
            raise UserError(f"{ckpt}: does not record what it was trained on (an earlier version's checkpoint); "
                            "train the generator with this study instead")
        if (data / "dataset.json").is_file() and trained["dataset_fingerprint"] != dataset_fingerprint(data):
            raise UserError(f"{ckpt}: was trained on another dataset than {data} (fingerprints differ); its "
                            "samples could carry this study's val/test images into training")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.make_subset:
        from data.subset import write_subset
        src, out, frac = args.make_subset
        ds = write_subset(src, out, float(frac), command=shlex.join(["python", "bench/evidence.py", *sys.argv[1:]]))
        print(f"wrote {ds.root}: {ds.info['subset']['n_train']} of {ds.info['subset']['n_train_source']} training "
              f"pairs ({ds.info['subset']['train_counts']}), val/test unchanged")
        return 0
    if args.quick and args.fractions == ["0.25"]:
        args.fractions = ["0.5"]     # the 12-image fixture has too few training patients for a quarter
    try:
        args.fractions = [float(f) for f in args.fractions]
        args.generator_fraction = dict(item.split("=", 1) for item in args.generator_fraction)
    except ValueError:
        raise UserError("--fractions takes numbers in (0, 1); --generator_fraction takes F=CKPT items") from None
    if any(not 0 < f < 1 for f in args.fractions):
        raise UserError(f"--fractions must be in (0, 1), got {args.fractions}")
    unknown_tags = set(args.generator_fraction) - {fraction_tag(f) for f in args.fractions}
    if unknown_tags:
        raise UserError(f"--generator_fraction: no regime {', '.join(sorted(unknown_tags))} in --fractions")
    if args.reanalyse:
        res = reanalyse(args.reanalyse)
        print(f"\nwrote {res / 'reanalysis.json'} and {res / 'reanalysis.txt'}")
        return 0
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    try:
        [int(s) for s in args.seeds]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {','.join(args.seeds)}") from None
    if not (Path(args.input_dir) / "bus_data.csv").is_file():
        raise UserError(f"--input_dir {args.input_dir}: not a BUS-BRA folder (no bus_data.csv); download BUS-BRA "
                        "(Zenodo 10.5281/zenodo.8231412) and pass its folder")
    args.threads_per_job = args.threads_per_job or max(1, (os.cpu_count() or 1) // args.jobs)
    check_generators(args)
    tasks = plan(args)
    if args.dry_run:
        for t in tasks:
            print(f"{t.name}: python {shlex.join(t.argv[1:])}" + (f"   (after {', '.join(t.deps)})" if t.deps else ""))
        return 0
    t0 = time.time()
    seconds = run_tasks(tasks, args.jobs, args.threads_per_job, Path(args.runs_dir) / "logs")
    seconds["total"] = round(time.time() - t0, 1)
    summary = summarise(args, seconds)
    res = copy_results(args, summary)
    print()
    print(format_summary(summary))
    print(f"\nresults: {res} (summary.json, summary.txt, report.html, evaluation_metrics.json, sample grids)")
    return 0


if __name__ == "__main__":
    run_main(main)
