#!/usr/bin/env python
"""Phase 1: a raw breast-ultrasound dataset (BUSI, BUS-BRA, UDIAT Dataset B, or a generated phantom) -> a pair
dataset (DESIGN.md "Contracts"): grayscale images and binary masks at img_size, stratified leak-free splits."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from common.errors import UserError
from common.cli import (fraction, make_parser, parse_config, positive_int,
                        print_config, run_main)
from common.options import bounded
from data.duplicates import THRESHOLD, leak_check, leak_line, rule, similarity_pairs
from data.pairs import LABELS, TUMOUR_LABELS, PairDatasetWriter
from data.readers import FORMATS, RESIZE_MODES, SPECK_RULE, decode_cases, problem_lines, scan_dataset
from data.splits import assign_splits, fold_splits, resolve_duplicates, split_table
from models.medsegdiff_v2 import default_channel_mult

EPILOG = """examples:
  # BUSI as downloaded (the folder holding Dataset_BUSI_with_GT/, or that folder itself)
  python prepare_busi_dataset.py --input_dir /path/to/busi --output_dir ./data/busi_processed
  # BUS-BRA: its official 5-fold split (grouped by patient) is used automatically; fold 2 as the test split
  python prepare_busi_dataset.py --input_dir /path/to/BUSBRA --output_dir ./data/busbra --test_fold 2
  # no dataset at hand: generate 200 phantom cases in the BUSI layout and prepare them at 64 px
  python prepare_busi_dataset.py --phantom 200 --img_size 64 --output_dir ./data/phantom64
  # UDIAT Dataset B, tumour images only, aspect ratio kept, leaving out (and recording) broken files
  python prepare_busi_dataset.py --input_dir /path/to/BUS --output_dir ./data/udiat --resize pad --on_error skip
"""
MAX_LISTED = 20
SEED = bounded(int, 0, 2**31 - 1)


def image_size(text: str) -> int:
    """--img_size: one every model here can take, from 16 to 4096 px. The default denoiser halves the image once per
    level of models.medsegdiff_v2.default_channel_mult (2 times below 64 px, 3 below 128, 4 below 256, then 5), so
    the size must divide by 4, 8, 16 or 32 accordingly; the segmenters take any size (MADGNet from 32 px)."""
    value = bounded(int, 16, 4096)(text)
    step = 2 ** (len(default_channel_mult(value)) - 1)
    if value % step:
        lower = value // step * step
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {step} at this size (the default denoiser halves a {value}-px image "
            f"{step.bit_length() - 1} times), got {text}; e.g. {lower if lower >= 16 else lower + step} or "
            f"{lower + step}")
    return value


def build_parser():
    p = make_parser(__doc__, EPILOG)
    p.add_argument("--input_dir", type=str, default=None,
                   help="the raw dataset folder as downloaded, or the folder containing it (e.g. the folder holding "
                        "Dataset_BUSI_with_GT/); read only, never modified")
    p.add_argument("--output_dir", type=str, default="./data/busi_processed",
                   help="where the pair dataset is written (built in a hidden staging folder, renamed when complete; "
                        "an older pair dataset there is replaced, any other non-empty folder is refused)")
    p.add_argument("--img_size", type=image_size, default=256, help="output images and masks are img_size x img_size "
                   "(16 to 4096; a multiple of 4, of 8 from 64 px, 16 from 128, 32 from 256)")
    p.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                   help="raw layout: busi (class folders), busbra (Images/, Masks/, bus_data.csv), udiat (original/, "
                        "GT/, DatasetB.xlsx); auto detects it")
    p.add_argument("--phantom", type=positive_int, default=None, metavar="N",
                   help="instead of --input_dir: generate N phantom cases in the BUSI layout into <output_dir>/raw/ "
                        "and prepare them (needs no download)")
    p.add_argument("--phantom_seed", type=SEED, default=0, help="seed of the phantom generator (--phantom)")
    p.add_argument("--val_fraction", type=fraction, default=0.1, help="share of every label put in the val split")
    p.add_argument("--test_fraction", type=fraction, default=0.2,
                   help="share of every label put in the test split (random splits; with folds the test fold decides)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the split (same seed + same input = same split)")
    p.add_argument("--split", choices=("auto", "random", "folds"), default="auto",
                   help="random: stratified by label, grouped by patient / identical image; folds: the dataset's "
                        "official folds (BUS-BRA 5-fold-cv.csv), --test_fold as test, val drawn by patient from the "
                        "others; auto: folds when the dataset has them, else random")
    p.add_argument("--test_fold", type=positive_int, default=1,
                   help="official fold used as the test split (--split folds)")
    p.add_argument("--exclude_normal", action="store_true", help="leave out normal (lesion-free) images")
    p.add_argument("--on_error", choices=("fail", "skip"), default="fail",
                   help="fail: list every problem (corrupt file, missing mask, size mismatch, ...) and write nothing; "
                        "skip: leave the problem files out, count them and record them in dataset.json")
    p.add_argument("--resize", choices=RESIZE_MODES, default="stretch",
                   help="stretch: resize straight to a square (what the field does); pad: zero-pad to a square "
                        "first, keeping the aspect ratio")
    p.add_argument("--duplicates", choices=("drop", "keep"), default="drop",
                   help="pixel-identical images with the same label: drop keeps one copy, keep keeps all (always "
                        "in one split); identical images with different labels are always dropped and reported")
    p.add_argument("--near_duplicates", choices=("group", "off"), default="group",
                   help="group: images of one acquisition saved more than once (cropped or shifted a little, rescaled, "
                        "re-encoded, other overlays) share a split, like identical copies; their score is the "
                        "normalised cross-correlation of the image centres (the outer sixth of each side, where "
                        "overlays sit, left out) after the best zoom/shift alignment of 64-px signatures "
                        "(data/duplicates.py); a near-duplicate set with different labels is dropped whole and "
                        "listed. off: only pixel-identical images are grouped (the leak check still reports "
                        "near-duplicates across the splits)")
    p.add_argument("--near_duplicate_threshold", type=float, default=THRESHOLD, metavar="SCORE",
                   help="score from which two images are near-duplicates (1 = the same pixels up to brightness and "
                        f"contrast; default {THRESHOLD}: on BUS-BRA, distinct scans scored at most 0.84, the same scan "
                        "saved twice 0.87 and more); also the leak check's threshold")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes generating the phantom and decoding images in parallel (None: one per CPU core)")
    return p


def make_phantom(raw_dir: Path, n: int, seed: int, workers: int | None = None) -> dict:
    from phantom.simulator import generate_phantom
    info = generate_phantom(raw_dir, n, seed=seed, workers=workers, progress=True)
    return json.loads(json.dumps(info or {}, default=str))


def fail_with(problems: Sequence, root: Path) -> None:
    print("\n".join([f"{len(problems)} problem(s) in {root}:", *problem_lines(problems, MAX_LISTED)]),
          file=sys.stderr)
    raise UserError(f"{len(problems)} problem(s) in the input (listed above); nothing was written. Fix those files, "
                    "or rerun with --on_error skip to leave them out (each is then recorded in dataset.json)")


def percent_line(counts: Counter) -> str:
    n = sum(counts[lab] for lab in TUMOUR_LABELS)
    if not n:
        return "tumour classes: none"
    return "tumour classes: " + " / ".join(f"{round(100 * counts[lab] / n)}% {lab}" for lab in TUMOUR_LABELS)


def label_counts(counts: Counter) -> str:
    return ", ".join(f"{lab} {counts[lab]}" for lab in LABELS if counts[lab]) + f" ({sum(counts.values())} images)"


def near_lines(args, dup, near, files, seconds: float, groups: Sequence[str | None]) -> list[str]:
    """Summary lines of the near-duplicate grouping."""
    if args.near_duplicates == "off":
        return ["near-duplicates: not grouped (--near_duplicates off)"]
    n_images = sum(map(len, dup.near_sets))
    lines = [f"near-duplicates (score >= {args.near_duplicate_threshold:.2f}): {len(near)} pair(s), identical copies "
             f"included; {len(dup.near_sets)} set(s) of one label ({n_images} images), each kept in one split "
             f"({seconds:.1f} s)"]
    joined = [cl for cl in dup.near_sets if len({groups[i] for i in cl if groups[i]}) > 1]
    if joined:
        lines.append(f"  {len(joined)} of them join different patients (now one group):")
        for cl in joined[:MAX_LISTED]:
            lines.append("    " + " ~ ".join(f"{f['file']}" for f in files(cl)))
    lines.append(f"near-duplicates, conflicting labels: {len(dup.near_conflicts)} set(s), all copies dropped")
    for cl in dup.near_conflicts[:MAX_LISTED]:
        lines.append("  " + " ~ ".join(f"{f['file']} ({f['label']})" for f in files(cl)))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(build_parser(), argv)
    if args.dry_run:
        print_config(args)
        return 0
    if not 0 < args.near_duplicate_threshold <= 1:
        raise UserError(f"--near_duplicate_threshold must be in (0, 1], got {args.near_duplicate_threshold}")
    if (args.input_dir is None) == (args.phantom is None):
        raise UserError("give either --input_dir (a downloaded dataset) or --phantom N (generate one), not "
                        + ("both" if args.input_dir else "neither"))
    t0 = time.time()
    out_dir = Path(args.output_dir)
    lines: list[str] = []
    # the output may not be, contain or lie inside the input (links resolved): replacing it would delete the input
    with PairDatasetWriter(out_dir, args.img_size, {"--input_dir": args.input_dir}) as writer:
        phantom = None
        if args.phantom:
            phantom = make_phantom(writer.staging / "raw", args.phantom, args.phantom_seed, args.workers)
            lines.append(f"phantom: {args.phantom} cases generated (seed {args.phantom_seed}) into {out_dir / 'raw'} "
                         f"in {time.time() - t0:.1f} s")
        t1 = time.time()
        scan = scan_dataset(writer.staging / "raw" if phantom is not None else args.input_dir, args.format,
                            "phantom" if phantom is not None else None)
        found = Counter(c.label for c in scan.cases)
        cases = [c for c in scan.cases if not (args.exclude_normal and c.label == "normal")]
        if not cases and not scan.problems:
            raise UserError(f"{scan.root}: no images found ({scan.dataset} layout)")
        decoded = decode_cases(cases, args.img_size, args.resize, args.workers, progress=True)
        problems = sorted(scan.problems + [p for d in decoded for p in d.problems], key=lambda p: (p.path, p.rule))
        if problems and args.on_error == "fail":
            fail_with(problems, scan.root)
        good = [(c, d) for c, d in zip(cases, decoded) if not d.problems]
        if not good:
            raise UserError(f"{scan.root}: no usable images left after skipping {len(problems)} problem(s)")
        sigs = np.stack([d.signature for _, d in good])
        threshold, t_near = args.near_duplicate_threshold, time.time()
        near = similarity_pairs(sigs, threshold) if args.near_duplicates == "group" else []
        t_near = time.time() - t_near
        dup = resolve_duplicates([c.case_id for c, _ in good], [c.label for c, _ in good],
                                 [d.pixel_hash for _, d in good], [c.group for c, _ in good], args.duplicates,
                                 near_pairs=[(i, j) for i, j, _ in near])
        kept = [k for k in range(len(good)) if dup.keep[k]]
        labels, groups = [good[k][0].label for k in kept], [dup.groups[k] for k in kept]
        mode = args.split if args.split != "auto" else ("folds" if scan.has_folds else "random")
        split_info = {"requested": args.split, "mode": mode, "val_fraction": args.val_fraction, "seed": args.seed}
        if mode == "folds":
            if not all(good[k][0].fold is not None for k in kept):
                raise UserError(f"{scan.root}: --split folds needs official folds for every image (BUS-BRA's "
                                "5-fold-cv.csv); this dataset has none or not for all images: use --split random")
            splits = fold_splits(labels, groups, [good[k][0].fold for k in kept], args.test_fold,
                                 args.val_fraction, args.seed, draw_groups=[dup.identical_groups[k] for k in kept])
            split_info.update(test_fold=args.test_fold, folds_file=scan.folds_file)
            split_desc = (f"split: official fold {args.test_fold} of {scan.folds_file} as test; val drawn by patient "
                          f"from the other folds ({args.val_fraction:.0%} of all, seed {args.seed})")
        else:
            splits = assign_splits(labels, groups, args.val_fraction, args.test_fraction, args.seed)
            split_info.update(test_fraction=args.test_fraction)
            split_desc = (f"split: random, stratified by label, grouped by patient/identical image/near-duplicate (val "
                          f"{args.val_fraction:.0%}, test {args.test_fraction:.0%}, seed {args.seed})")
        copies = {i: [good[j][0].provenance["original_image"] for j in cl if j != i]
                  for cl in dup.same_label for i in cl}
        near_copies = {i: [good[j][0].provenance["original_image"] for j in cl if j != i]
                       for cl in dup.near_sets for i in cl}
        for k, split in zip(kept, splits):
            c, d = good[k]
            writer.add(c.case_id, d.image, d.mask, label=c.label, split=split, source="real", group=dup.groups[k],
                       **c.provenance, orig_width=d.width, orig_height=d.height, pixel_hash=d.pixel_hash,
                       identical_copies=";".join(copies.get(k, [])), near_duplicates=";".join(near_copies.get(k, [])))

        def files(cluster):
            return [{"file": good[i][0].provenance["original_image"], "label": good[i][0].label} for i in cluster]

        t_leak = time.time()
        held = [k for k, split in zip(kept, splits) if split != "train"]
        train = [k for k, split in zip(kept, splits) if split == "train"]
        leak = leak_check(sigs[train], sigs[held], [good[k][0].case_id for k in held],
                          [good[k][0].case_id for k in train], threshold)
        leak["time_s"] = round(time.time() - t_leak, 2)
        moved = [good[k][0].case_id for k, split in zip(kept, splits)
                 if mode == "folds" and split == "test" and good[k][0].fold != args.test_fold]
        score = {(i, j): sc for i, j, sc in near}

        def near_set(cluster):
            pairs = [{"files": [good[i][0].provenance["original_image"], good[j][0].provenance["original_image"]],
                      "score": round(score[(i, j)], 4)} for i in cluster for j in cluster if (i, j) in score]
            return {"images": files(cluster), "pairs": pairs,
                    "groups": sorted({str(good[i][0].group) for i in cluster if good[i][0].group})}

        merged = [len(c.masks) - 1 for c, _ in good if len(c.masks) > 1]
        specks = [d.specks_removed for _, d in good if d.specks_removed]
        size_differs = [c.case_id for c, d in good if d.size_differs]
        elapsed = time.time() - t0
        info = {
            "source_dataset": scan.dataset, "format": scan.format,
            "input_dir": str(out_dir / "raw") if phantom is not None else str(args.input_dir),
            "dataset_dir": str(out_dir / "raw" / scan.root.name) if phantom is not None else str(scan.root),
            "resize": args.resize, "split": split_info, "exclude_normal": args.exclude_normal,
            "cases_found": {lab: found[lab] for lab in LABELS},
            "counts_after_dedup": {lab: labels.count(lab) for lab in LABELS},
            "duplicates": {"mode": args.duplicates, "copies_dropped": dup.dropped_same_label,
                           "groups": [files(cl) for cl in dup.same_label]},
            "conflicts_dropped": [files(cl) for cl in dup.conflicts],
            "near_duplicates": {"mode": args.near_duplicates, "threshold": threshold, "rule": rule(threshold),
                                "pairs": len(near), "time_s": round(t_near, 2),
                                "sets": [near_set(cl) for cl in dup.near_sets],
                                "conflicts_dropped": [near_set(cl) for cl in dup.near_conflicts]},
            "leak_check": leak, "moved_out_of_official_fold": moved,
            "masks_merged": {"images": len(merged), "extra_masks": sum(merged)},
            "specks_removed": {"regions": sum(specks), "masks": len(specks), "rule": SPECK_RULE},
            "csv_size_differs": size_differs, "skipped": [p.as_dict() for p in problems],
            "unexpected_files": scan.unexpected, "notes": scan.notes, "time_s": round(elapsed, 2),
            "phantom": phantom and {"n_cases": args.phantom, "seed": args.phantom_seed, "info": phantom},
        }
        writer.commit(args.command, info)
    rate = len(cases) / max(time.time() - t1, 1e-9)
    shown_root = out_dir / "raw" / scan.root.name if phantom is not None else scan.root
    lines += [f"{scan.dataset} ({scan.format} layout) from {shown_root}",
              f"cases found (before de-duplication): {label_counts(found)}"]
    if args.exclude_normal and found["normal"]:
        lines.append(f"normal images left out (--exclude_normal): {found['normal']}")
    lines.append(f"masks merged (OR): {sum(merged)} extra masks on {len(merged)} images")
    if specks:
        lines.append(f"stray mask specks removed: {sum(specks)} in {len(specks)} masks ({SPECK_RULE})")
    if size_differs:
        lines.append(f"CSV width/height disagrees with the pixels for {len(size_differs)} images (pixel sizes used): "
                     + ", ".join(size_differs[:8]))
    verb = "extra copies dropped" if args.duplicates == "drop" else "copies kept, each set in one split"
    lines.append(f"identical images, same label: {len(dup.same_label)} set(s) "
                 f"({dup.dropped_same_label if args.duplicates == 'drop' else sum(map(len, dup.same_label))} {verb})")
    lines.append(f"identical images, conflicting labels: {len(dup.conflicts)} set(s), all copies dropped")
    for cl in dup.conflicts[:MAX_LISTED]:
        lines.append("  " + " == ".join(f"{f['file']} ({f['label']})" for f in files(cl)))
    lines += near_lines(args, dup, near, files, t_near, [good[i][0].group for i in range(len(good))])
    lines.append(f"skipped problems: {len(problems)}" + (" (listed in dataset.json 'skipped')" if problems else ""))
    lines += problem_lines(problems, MAX_LISTED)
    if scan.unexpected:
        lines.append(f"unexpected files, not used: {len(scan.unexpected)}")
        lines += [f"  {u}" for u in scan.unexpected[:5]] + (["  ..."] if len(scan.unexpected) > 5 else [])
    lines += [f"  note: {n}" for n in scan.notes]
    if moved:
        lines.append(f"official folds: {len(moved)} image(s) of other folds put in test with a near-duplicate or "
                     f"identical copy there: " + ", ".join(moved[:MAX_LISTED]))
    lines += [split_desc, split_table(labels, splits), percent_line(Counter(labels)), leak_line(leak),
              f"wrote {len(kept)} pairs ({args.img_size}x{args.img_size}, {args.resize}) to {out_dir} in "
              f"{time.time() - t0:.1f} s ({rate:.0f} images/s)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run_main(main)
