"""Phase 1's body: a raw breast-ultrasound dataset (BUSI, BUS-BRA, UDIAT Dataset B, or a generated phantom) -> a
pair dataset (docs/architecture.md, "The pair dataset"): decode, de-duplicate (identical and near-duplicate images),
split without leaks, write, and the summary that prepare_busi_dataset.py prints."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.errors import UserError
from data.decode import SPECK_RULE, decode_cases
from data.duplicates import leak_check, leak_line, rule, similarity_pairs
from data.pairs import LABELS, TUMOUR_LABELS, PairDatasetWriter
from data.readers import problem_lines, scan_dataset
from data.splits import assign_splits, fold_splits, resolve_duplicates, split_table
from phantom.simulator import generate_phantom

MAX_LISTED = 20


@dataclass(frozen=True)
class PrepareConfig:
    """prepare_busi_dataset.py's flags (same names; their help says what each does)."""

    input_dir: str | None
    output_dir: str
    img_size: int
    format: str
    phantom: int | None
    phantom_seed: int
    val_fraction: float
    test_fraction: float
    seed: int
    split: str
    test_fold: int
    exclude_normal: bool
    on_error: str
    resize: str
    duplicates: str
    near_duplicates: str
    near_duplicate_threshold: float
    workers: int | None
    command: str = ""          # recorded in dataset.json

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PrepareConfig":
        """The config out of a flat mapping (e.g. ``vars(args)``); other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def make_phantom(raw_dir: Path, n: int, seed: int, workers: int | None = None) -> dict:
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


def near_lines(cfg: PrepareConfig, dup, near, files, seconds: float, groups: Sequence[str | None]) -> list[str]:
    """Summary lines of the near-duplicate grouping."""
    if cfg.near_duplicates == "off":
        return ["near-duplicates: not grouped (--near_duplicates off)"]
    n_images = sum(map(len, dup.near_sets))
    lines = [f"near-duplicates (score >= {cfg.near_duplicate_threshold:.2f}): {len(near)} pair(s), identical copies "
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


def prepare_dataset(cfg: PrepareConfig) -> list[str]:
    """Write the pair dataset ``cfg`` asks for to ``cfg.output_dir``; return the summary lines to print."""
    t0 = time.time()
    out_dir = Path(cfg.output_dir)
    lines: list[str] = []
    # the output may not be, contain or lie inside the input (links resolved): replacing it would delete the input
    with PairDatasetWriter(out_dir, cfg.img_size, {"--input_dir": cfg.input_dir}) as writer:
        phantom = None
        if cfg.phantom:
            phantom = make_phantom(writer.staging / "raw", cfg.phantom, cfg.phantom_seed, cfg.workers)
            lines.append(f"phantom: {cfg.phantom} cases generated (seed {cfg.phantom_seed}) into {out_dir / 'raw'} "
                         f"in {time.time() - t0:.1f} s")
        t1 = time.time()
        scan = scan_dataset(writer.staging / "raw" if phantom is not None else cfg.input_dir, cfg.format,
                            "phantom" if phantom is not None else None)
        found = Counter(c.label for c in scan.cases)
        cases = [c for c in scan.cases if not (cfg.exclude_normal and c.label == "normal")]
        if not cases and not scan.problems:
            raise UserError(f"{scan.root}: no images found ({scan.dataset} layout)")
        decoded = decode_cases(cases, cfg.img_size, cfg.resize, cfg.workers, progress=True)
        problems = sorted(scan.problems + [p for d in decoded for p in d.problems], key=lambda p: (p.path, p.rule))
        if problems and cfg.on_error == "fail":
            fail_with(problems, scan.root)
        good = [(c, d) for c, d in zip(cases, decoded) if not d.problems]
        if not good:
            raise UserError(f"{scan.root}: no usable images left after skipping {len(problems)} problem(s)")
        sigs = np.stack([d.signature for _, d in good])
        threshold, t_near = cfg.near_duplicate_threshold, time.time()
        near = similarity_pairs(sigs, threshold) if cfg.near_duplicates == "group" else []
        t_near = time.time() - t_near
        dup = resolve_duplicates([c.case_id for c, _ in good], [c.label for c, _ in good],
                                 [d.pixel_hash for _, d in good], [c.group for c, _ in good], cfg.duplicates,
                                 near_pairs=[(i, j) for i, j, _ in near])
        kept = [k for k in range(len(good)) if dup.keep[k]]
        labels, groups = [good[k][0].label for k in kept], [dup.groups[k] for k in kept]
        mode = cfg.split if cfg.split != "auto" else ("folds" if scan.has_folds else "random")
        split_info = {"requested": cfg.split, "mode": mode, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
        if mode == "folds":
            if not all(good[k][0].fold is not None for k in kept):
                raise UserError(f"{scan.root}: --split folds needs official folds for every image (BUS-BRA's "
                                "5-fold-cv.csv); this dataset has none or not for all images: use --split random")
            splits = fold_splits(labels, groups, [good[k][0].fold for k in kept], cfg.test_fold,
                                 cfg.val_fraction, cfg.seed, draw_groups=[dup.identical_groups[k] for k in kept])
            split_info.update(test_fold=cfg.test_fold, folds_file=scan.folds_file)
            split_desc = (f"split: official fold {cfg.test_fold} of {scan.folds_file} as test; val drawn by patient "
                          f"from the other folds ({cfg.val_fraction:.0%} of all, seed {cfg.seed})")
        else:
            splits = assign_splits(labels, groups, cfg.val_fraction, cfg.test_fraction, cfg.seed)
            split_info.update(test_fraction=cfg.test_fraction)
            split_desc = (f"split: random, stratified by label, grouped by patient/identical image/near-duplicate (val "
                          f"{cfg.val_fraction:.0%}, test {cfg.test_fraction:.0%}, seed {cfg.seed})")
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
                 if mode == "folds" and split == "test" and good[k][0].fold != cfg.test_fold]
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
            "input_dir": str(out_dir / "raw") if phantom is not None else str(cfg.input_dir),
            "dataset_dir": str(out_dir / "raw" / scan.root.name) if phantom is not None else str(scan.root),
            "resize": cfg.resize, "split": split_info, "exclude_normal": cfg.exclude_normal,
            "cases_found": {lab: found[lab] for lab in LABELS},
            "counts_after_dedup": {lab: labels.count(lab) for lab in LABELS},
            "duplicates": {"mode": cfg.duplicates, "copies_dropped": dup.dropped_same_label,
                           "groups": [files(cl) for cl in dup.same_label]},
            "conflicts_dropped": [files(cl) for cl in dup.conflicts],
            "near_duplicates": {"mode": cfg.near_duplicates, "threshold": threshold, "rule": rule(threshold),
                                "pairs": len(near), "time_s": round(t_near, 2),
                                "sets": [near_set(cl) for cl in dup.near_sets],
                                "conflicts_dropped": [near_set(cl) for cl in dup.near_conflicts]},
            "leak_check": leak, "moved_out_of_official_fold": moved,
            "masks_merged": {"images": len(merged), "extra_masks": sum(merged)},
            "specks_removed": {"regions": sum(specks), "masks": len(specks), "rule": SPECK_RULE},
            "csv_size_differs": size_differs, "skipped": [p.as_dict() for p in problems],
            "unexpected_files": scan.unexpected, "notes": scan.notes, "time_s": round(elapsed, 2),
            "phantom": phantom and {"n_cases": cfg.phantom, "seed": cfg.phantom_seed, "info": phantom},
        }
        writer.commit(cfg.command, info)
    rate = len(cases) / max(time.time() - t1, 1e-9)
    shown_root = out_dir / "raw" / scan.root.name if phantom is not None else scan.root
    lines += [f"{scan.dataset} ({scan.format} layout) from {shown_root}",
              f"cases found (before de-duplication): {label_counts(found)}"]
    if cfg.exclude_normal and found["normal"]:
        lines.append(f"normal images left out (--exclude_normal): {found['normal']}")
    lines.append(f"masks merged (OR): {sum(merged)} extra masks on {len(merged)} images")
    if specks:
        lines.append(f"stray mask specks removed: {sum(specks)} in {len(specks)} masks ({SPECK_RULE})")
    if size_differs:
        lines.append(f"CSV width/height disagrees with the pixels for {len(size_differs)} images (pixel sizes used): "
                     + ", ".join(size_differs[:8]))
    verb = "extra copies dropped" if cfg.duplicates == "drop" else "copies kept, each set in one split"
    lines.append(f"identical images, same label: {len(dup.same_label)} set(s) "
                 f"({dup.dropped_same_label if cfg.duplicates == 'drop' else sum(map(len, dup.same_label))} {verb})")
    lines.append(f"identical images, conflicting labels: {len(dup.conflicts)} set(s), all copies dropped")
    for cl in dup.conflicts[:MAX_LISTED]:
        lines.append("  " + " == ".join(f"{f['file']} ({f['label']})" for f in files(cl)))
    lines += near_lines(cfg, dup, near, files, t_near, [good[i][0].group for i in range(len(good))])
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
              f"wrote {len(kept)} pairs ({cfg.img_size}x{cfg.img_size}, {cfg.resize}) to {out_dir} in "
              f"{time.time() - t0:.1f} s ({rate:.0f} images/s)"]
    return lines
