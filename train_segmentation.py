"""Phase 3: train a tumour segmenter (MADGNet or U-Net, with a benign/malignant head) on a pair dataset and test it
on the dataset's real test split (and on any --test_data sets).

Writes a run directory: config.json, log.txt, stats.jsonl, loss.png, last.pth (to resume), best_model.pth (best
validation Dice), then per_image_test.csv and metrics.json (Dice, IoU, HD95 overall and per class, balanced
accuracy, false positives on normal images). Synthetic pairs are used for training only: a dataset with synthetic
pairs in its validation or test split is refused. Rerunning the same command resumes. --max_train_steps fixes the
number of optimiser steps whatever the training-set size (equal steps for real vs real + synthetic).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from common.cli import csv_list, parse_config, run_main
from common.errors import UserError
from common.options import build
from common.cli import options_parser
from training.config import SegTrainConfig

EPILOG = """examples:
  # the plan's command (BUSI + synthetic pairs, MADGNet with ImageNet weights, GPU)
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --epochs 50
  # offline: a local copy of timm's resnest50d weights, or no pretraining
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --encoder_checkpoint resnest50d.pth
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --encoder_weights none
  # real vs real + synthetic at the same number of optimiser steps, three seeds each
  python train_segmentation.py --data_dir ./data/busi_processed --model madgnet --seeds 0,1,2 --max_train_steps 3000
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --seeds 0,1,2 --max_train_steps 3000
  # generalisation to other datasets prepared at the same size
  python train_segmentation.py --data_dir ./data/busi_processed --model unet --test_data ./data/busbra ./data/udiat
  # CPU demo on the phantom (64 px, small U-Net, a few minutes)
  python train_segmentation.py --data_dir data/phantom64 --model unet --base_width 16 --depth 3 \\
      --epochs 10 --lr 1e-3 --batch_size 16
"""
GROUPS = {"": "data", "model": "model", "optim": "optimisation", "run": "run, evaluation and hardware"}


def build_parser():
    p = options_parser(SegTrainConfig, __doc__, EPILOG, GROUPS)
    p.add_argument("--seeds", type=csv_list, default=None, metavar="S1,S2,...",
                   help="run one training per seed, one after another (overrides --seed); output folders end in "
                        "_seed<k>, or put {seed} in --output_dir")
    return p


def run_dir_for(cfg: SegTrainConfig, seed: int, several: bool) -> str:
    out = cfg.run.output_dir
    if out is None:
        return str(Path("checkpoints") / "segmentation" / f"{cfg.model.model}_{Path(cfg.data_dir).resolve().name}"
                   f"_seed{seed}")
    if "{seed}" in out:
        return out.replace("{seed}", str(seed))
    return f"{out}_seed{seed}" if several else out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(build_parser(), argv)
    try:
        cfg = build(SegTrainConfig, vars(args))
        seeds = [int(s) for s in args.seeds] if args.seeds is not None else [cfg.run.seed]
    except ValueError as exc:
        raise UserError(f"configuration: {exc}") from None
    if not seeds or any(s < 0 or s >= 2**31 for s in seeds):
        raise UserError(f"--seeds must be integers in [0, 2^31), got {args.seeds}")
    from training.seg_runs import dry_run, train_seeds
    if args.dry_run:
        return dry_run(cfg, args.command)
    results = train_seeds(cfg, seeds, [run_dir_for(cfg, s, args.seeds is not None) for s in seeds], args.command)
    if len(seeds) > 1:
        import statistics
        dices = []
        for seed, r in zip(seeds, results):
            d = r.get("metrics", {}).get("test", {}).get("overall", {}).get("dice", {}).get("mean")
            print(f"seed {seed}: test Dice {d:.4f}  ({r['output_dir']})" if d is not None
                  else f"seed {seed}: {r['stopped']} ({r['output_dir']})")
            if d is not None:
                dices.append(d)
        if len(dices) > 1:
            print(f"test Dice over {len(dices)} seeds: {statistics.mean(dices):.4f} ± {statistics.stdev(dices):.4f}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
