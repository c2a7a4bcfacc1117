#!/usr/bin/env python
"""Phase 3: train a tumour segmenter (U-Net or MADGNet, each with a benign/malignant head) on a pair dataset and
test it once on the real test split.

Model selection on the validation split's mean Dice; the selected model (best_model.pth) is evaluated on the
test split and on every --test_data set: metrics.json (Dice, IoU, HD95 overall and per class, false positives
on normal images, balanced accuracy, confusion matrix, training time, parameters, the data's counts) and
per_image_<name>.csv (one row per test image, for paired comparisons between runs). Rerunning the same command
continues from last.pth. Refuses a dataset whose validation or test split holds synthetic pairs."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

from common.errors import UserError
from common.cli import (csv_list, make_parser, non_negative_int, parse_config, positive_int,
                        print_config, resolved_config, run_main)

EPILOG = """examples:
  # the plan's command (BUSI + synthetic pairs, MADGNet with ImageNet weights, GPU)
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --epochs 50
  # offline: a local copy of timm's resnest50d weights, or no pretraining
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --encoder_checkpoint resnest50d.pth
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --encoder_weights none
  # the four arms of the synthetic-data study, three seeds each (runs one after another into ..._seed<k>)
  python train_segmentation.py --data_dir ./data/busi_processed --model madgnet --seeds 0,1,2
  python train_segmentation.py --data_dir ./data/busi_processed --model madgnet --seeds 0,1,2 --augment strong \\
      --output_dir checkpoints/segmentation/madgnet_busi_processed_strong_seed{seed}
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --seeds 0,1,2
  python train_segmentation.py --data_dir ./data/busi_combined --model madgnet --seeds 0,1,2 --augment strong \\
      --output_dir checkpoints/segmentation/madgnet_busi_combined_strong_seed{seed}
  # generalisation to other datasets prepared at the same size
  python train_segmentation.py --data_dir ./data/busi_processed --model unet --test_data ./data/busbra ./data/udiat
  # CPU demo on the phantom (64 px, small U-Net, a few minutes)
  python train_segmentation.py --data_dir data/phantom64 --model unet --img_size 64 --base_width 16 --depth 3 \\
      --epochs 10 --lr 1e-3 --batch_size 16
"""

MODELS = ("madgnet", "unet")                    # models.segmenters.SEGMENTERS (kept light: no torch import for --help)
AUGMENT_LEVELS = ("none", "standard", "strong")  # training.augment.LEVELS


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, EPILOG)
    g = p.add_argument_group("data and run")
    g.add_argument("--data_dir", default="./data/busi_processed",
                   help="pair dataset (prepare_busi_dataset.py or create_combined_dataset.py)")
    g.add_argument("--model", default="madgnet", choices=MODELS, help="segmenter")
    g.add_argument("--epochs", type=positive_int, default=50, help="epochs over the training split")
    g.add_argument("--img_size", type=non_negative_int, default=0,
                   help="image size; must equal the dataset's (0 = take it from the dataset)")
    g.add_argument("--include_normal", action=argparse.BooleanOptionalAction, default=False,
                   help="also train/validate/test on normal images (empty masks; the class head gets 3 labels, the "
                        "false-positive rate on normal images is reported); default: benign + malignant only, "
                        "as MADGNet's BUSI protocol")
    g.add_argument("--augment", default="standard", choices=AUGMENT_LEVELS,
                   help="on-device augmentation (training/augment.py): standard = flip, small affine, brightness/"
                        "contrast; strong = + elastic, gamma, speckle, blur (the classic-augmentation comparator)")
    g.add_argument("--test_data", nargs="+", default=None, metavar="DIR",
                   help="more pair datasets to test on (every pair of a used class, whatever its split), each "
                        "reported separately (per_image_<folder name>.csv and metrics.json 'test_data')")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    g.add_argument("--seeds", type=csv_list, default=None, metavar="S1,S2,...",
                   help="run one training per seed, one after another (overrides --seed); output folders end in "
                        "_seed<k>, or put {seed} in --output_dir")
    g.add_argument("--output_dir", default=None,
                   help="run directory (default: checkpoints/segmentation/<model>_<data folder>_seed<seed>; "
                        "{seed} is replaced by the seed)")
    g.add_argument("--resume", default="auto", choices=("auto", "never"),
                   help="auto: continue from <output_dir>/last.pth if it exists; never: refuse an existing run")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=positive_int, default=8, help="training batch size")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (cosine decay after warm-up)")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=non_negative_int, default=100,
                   help="linear warm-up steps (at most 5%% of the run)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    g.add_argument("--class_weight", type=float, default=0.2,
                   help="weight of the classification (benign/malignant) cross-entropy in the loss; 0 = off")
    g.add_argument("--early_stop_patience", type=non_negative_int, default=0,
                   help="stop after this many validations without a better Dice (0 = never)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder_weights", default="imagenet", choices=("imagenet", "none"),
                   help="MADGNet encoder: ImageNet weights through timm (needs internet or timm's cache), or random")
    g.add_argument("--encoder_checkpoint", default=None, metavar="PATH",
                   help="MADGNet encoder: a local state dict of timm's encoder (offline ImageNet weights)")
    g.add_argument("--encoder_name", default="resnest50d", help="MADGNet encoder (a timm model name)")
    g.add_argument("--base_width", type=positive_int, default=32, help="U-Net: width of the first level")
    g.add_argument("--depth", type=positive_int, default=4, help="U-Net: number of down-sampling levels")
    g.add_argument("--norm", default="batch", choices=("batch", "group"), help="U-Net: normalisation layers")
    g = p.add_argument_group("hardware, evaluation and checkpoints")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto = bf16 on GPUs that support it, else fp32")
    g.add_argument("--eval_batch_size", type=positive_int, default=32, help="batch size of validation and test")
    g.add_argument("--val_every", type=positive_int, default=1, help="validate (and maybe keep best) every N epochs")
    g.add_argument("--save_every", type=positive_int, default=1, help="write last.pth every N epochs")
    g.add_argument("--time_limit_minutes", type=float, default=0.0,
                   help="save last.pth and exit after the epoch that passes this many minutes (0 = no limit)")
    g.add_argument("--stop_after_epochs", type=non_negative_int, default=0,
                   help="save last.pth and exit after this many epochs in this invocation (0 = no limit)")
    return p


def run_dir_for(args, seed: int) -> str:
    if args.output_dir is None:
        name = f"{args.model}_{Path(args.data_dir).resolve().name}_seed{seed}"
        return str(Path("checkpoints") / "segmentation" / name)
    if "{seed}" in args.output_dir:
        return args.output_dir.replace("{seed}", str(seed))
    return args.output_dir if args.seeds is None else f"{args.output_dir}_seed{seed}"


def check_args(args) -> None:
    if args.model != "madgnet" and args.encoder_checkpoint:
        raise UserError("--encoder_checkpoint applies to --model madgnet only")
    if args.encoder_checkpoint and args.encoder_weights == "none":
        raise UserError("--encoder_checkpoint and --encoder_weights none contradict each other; choose one")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("train_segmentation.py runs as one process (a segmenter trains in minutes on one GPU); "
                        "start it with python, not torchrun")


def train_one(args, seed: int) -> dict:
    import torch

    from common.precision import resolve_device, resolve_precision
    from training.seg_trainer import SegTrainer, dataset_fingerprint, open_training_dataset

    args = argparse.Namespace(**vars(args))
    args.seed = seed
    args.output_dir = run_dir_for(args, seed)
    dataset = open_training_dataset(args.data_dir)  # validates; refuses synthetic pairs in val/test
    if args.img_size == 0:
        args.img_size = dataset.img_size
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(seed)
    config = {k: v for k, v in resolved_config(args).items() if k != "seeds"}
    config.update(command=args.command, dataset_json_sha256=dataset_fingerprint(args.data_dir))
    trainer = SegTrainer(args, config, device, precision, dataset)
    trainer.run.write_config({**config, "resolved_precision": precision, "device_resolved": str(device),
                              "parameters": trainer.n_params})
    result = trainer.fit()
    result["output_dir"] = args.output_dir
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(build_parser(), argv)
    if args.dry_run:
        print_config(args)
        return 0
    check_args(args)
    try:
        seeds = [int(s) for s in args.seeds] if args.seeds is not None else [args.seed]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {','.join(args.seeds)}") from None
    if not seeds:
        raise UserError("--seeds is empty")
    results = []
    for seed in seeds:
        if len(seeds) > 1:
            print(f"=== seed {seed} ({len(results) + 1}/{len(seeds)}) -> {run_dir_for(args, seed)}", flush=True)
        results.append(train_one(args, seed))
    if len(seeds) > 1:
        dices = [r["metrics"]["test"]["overall"]["dice"]["mean"] for r in results if "metrics" in r]
        for seed, r in zip(seeds, results):
            d = r.get("metrics", {}).get("test", {}).get("overall", {}).get("dice", {}).get("mean")
            print(f"seed {seed}: test Dice {d:.4f}  ({r['output_dir']})" if d is not None
                  else f"seed {seed}: {r['stopped']} ({r['output_dir']})")
        if len(dices) > 1:
            import statistics
            print(f"test Dice over {len(dices)} seeds: {statistics.mean(dices):.4f} ± {statistics.stdev(dices):.4f}")
    return 0


if __name__ == "__main__":
    run_main(main)
