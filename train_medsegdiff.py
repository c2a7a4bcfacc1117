"""Phase 1: train the class-conditioned joint image+mask diffusion model (MedSegDiffV2) on a pair dataset.

Writes a run directory (default ./checkpoints): config.json, log.txt, stats.jsonl, loss.png, samples/ grids,
last.pth (full training state, for resuming) and best_model.pth (EMA weights with the lowest validation loss),
which generate_synthetic.py reads. Rerunning the same command resumes from last.pth. Flag names follow diffusers'
training examples; the earlier names (--lr, --batch_size, --max_steps, --warmup_steps, --save_every, --precision,
--grad_checkpointing) still work.
"""
from __future__ import annotations

import sys

from common.cli import parse_config, run_main
from common.errors import UserError
from common.options import build
from common.cli import options_parser
from training.config import DiffusionTrainConfig

EPILOG = """examples:
  # the plan's command (BUSI at 256 px on a GPU; preset: configs/busi256.yaml)
  python train_medsegdiff.py --data_dir ./data/busi_processed --batch_size 8 --num_epochs 100 --lr 1e-4 --img_size 256
  # the CPU demo preset on the phantom (a few minutes)
  python train_medsegdiff.py --config configs/demo.yaml --data_dir data/phantom64
  # check the inputs and see the plan (steps, memory, device) without training
  python train_medsegdiff.py --config configs/busi256.yaml --dry-run
  # several GPUs (DDP)
  torchrun --nproc_per_node 4 train_medsegdiff.py --config configs/busi256.yaml
  # resumable 9-minute chunks (rerun the same command to continue)
  python train_medsegdiff.py --config configs/busi256.yaml --time_limit_minutes 9
"""
GROUPS = {"": "data", "model": "model", "diffusion": "diffusion", "optim": "optimisation",
          "run": "run length, logging, samples, checkpoints and hardware"}


def build_parser():
    return options_parser(DiffusionTrainConfig, __doc__, EPILOG, GROUPS)


def config_from(args) -> DiffusionTrainConfig:
    try:
        return build(DiffusionTrainConfig, vars(args))
    except ValueError as exc:
        raise UserError(f"configuration: {exc}") from None


def main(argv=None) -> int:
    args = parse_config(build_parser(), argv)
    cfg = config_from(args)
    from training.plan import dry_run, start_training
    if args.dry_run:
        return dry_run(cfg, args.command)
    start_training(cfg, args.command)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
