#!/usr/bin/env python
"""Phase 1: a raw breast-ultrasound dataset (BUSI, BUS-BRA, UDIAT Dataset B, or a generated phantom) -> a pair
dataset: grayscale images and binary masks at img_size, stratified leak-free splits."""
from __future__ import annotations

import argparse
from typing import Sequence

from common.errors import UserError
from common.cli import (fraction, make_parser, parse_config, positive_int,
                        print_config, run_main)
from common.options import bounded
from data.decode import RESIZE_MODES
from data.duplicates import THRESHOLD
from data.prepare import PrepareConfig, prepare_dataset
from data.readers import FORMATS
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
                        "contrast; the README says how the default was chosen); also the leak check's threshold")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes generating the phantom and decoding images in parallel (None: one per CPU core)")
    return p


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
    print("\n".join(prepare_dataset(PrepareConfig.from_mapping(vars(args)))))
    return 0


if __name__ == "__main__":
    run_main(main)
