#!/usr/bin/env python
"""Segmentation by the joint diffusion model (what the published MedSegDiff-V2 does), in the same metrics schema as
train_segmentation.py, so it sits in the same comparison table as U-Net and MADGNet.

For every image of a split, the image channel is held fixed while K masks are sampled (replacement conditioning,
null class: the test label is unknown); the K binary masks are fused by majority vote, and the per-pixel
disagreement 4 p (1 - p) (p = share of the K masks that call the pixel lesion) is written as an uncertainty map.
With --classify the benign/malignant label is the class under which the model denoises the image and its fused
mask best (same fixed noise and timesteps for both classes: a "diffusion classifier"), which gives balanced
accuracy too. Writes <output_dir>/predictions/<id>.png (0/255), uncertainty/<id>.png (0..255), metrics.json
and per_image_<split>.csv (evaluate.py --baseline_run / --combined_run accept the folder), and samples/."""
from __future__ import annotations

import sys
from typing import Sequence

from common.cli import parse_config, print_config, run_main
from common.errors import UserError
from common.options import build
from common.cli import options_parser

EPILOG = """examples:
  python segment_with_diffusion.py --checkpoint_path ./checkpoints/best_model.pth --data_dir ./data/busi_processed \\
      --output_dir ./checkpoints/diffusion_segmentation
  # the demo model on the phantom's test split, 5 samples per image
  python segment_with_diffusion.py --checkpoint_path checkpoints/demo/medsegdiff/best_model.pth \\
      --data_dir data/demo/phantom64 --ensemble 5 --output_dir checkpoints/demo/diffusion_segmentation
"""




def build_parser():
    from sampling.segmentation import SegmentConfig
    return options_parser(SegmentConfig, __doc__, EPILOG)


def main(argv: Sequence[str] | None = None) -> int:
    from sampling.segmentation import SegmentConfig, segment
    args = parse_config(build_parser(), argv)
    try:
        cfg = build(SegmentConfig, vars(args))
    except ValueError as exc:
        raise UserError(f"configuration: {exc}") from None
    if args.dry_run:
        print_config(args)
        return 0
    segment(cfg, args.command)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
