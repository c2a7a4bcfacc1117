"""Phase 1: train the class-conditioned joint image+mask diffusion model (MedSegDiffV2) on a pair dataset.

Writes a run directory (default ./checkpoints): config.json, log.txt, stats.jsonl, samples/ grids,
last.pth (full training state, for resuming) and best_model.pth (EMA weights with the lowest validation
loss), which generate_synthetic.py reads. Rerunning the same command resumes from last.pth.
"""
from __future__ import annotations

import argparse
import os
import sys

from common.cli import (fraction, make_parser, non_negative_int, parse_config, positive_int,
                        print_config, resolved_config, run_main)

EPILOG = """examples:
  # the plan's command (BUSI at 256 px on a GPU; preset: configs/busi256.yaml)
  python train_medsegdiff.py --data_dir ./data/busi_processed --batch_size 8 --num_epochs 100 --lr 1e-4 --img_size 256
  # the CPU demo preset on the phantom (a few minutes)
  python train_medsegdiff.py --config configs/demo.yaml --data_dir data/phantom64
  # several GPUs (DDP)
  torchrun --nproc_per_node 4 train_medsegdiff.py --config configs/busi256.yaml
  # resumable 9-minute chunks (rerun the same command to continue)
  python train_medsegdiff.py --config configs/busi256.yaml --time_limit_minutes 9
"""


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, EPILOG)
    g = p.add_argument_group("data and run")
    g.add_argument("--data_dir", default="./data/busi_processed", help="pair dataset made by prepare_busi_dataset.py")
    g.add_argument("--output_dir", default="./checkpoints", help="run directory (checkpoints, logs, sample grids)")
    g.add_argument("--img_size", type=positive_int, default=256, help="image size; must equal the dataset's")
    g.add_argument("--num_classes", type=int, default=2, choices=(2, 3),
                   help="2: benign + malignant; 3: also normal (empty masks)")
    g.add_argument("--augment", default="flip", choices=("none", "flip", "standard"),
                   help="on-device augmentation: flip = random horizontal flips; standard = flips, small "
                        "affine and intensity changes (these leak into what the model learns to draw)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and noise")
    g.add_argument("--resume", default="auto", choices=("auto", "never"),
                   help="auto: continue from <output_dir>/last.pth if it exists; never: refuse to touch an "
                        "existing run")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=positive_int, default=8, help="batch size per process")
    g.add_argument("--num_epochs", type=positive_int, default=100, help="epochs over the training split")
    g.add_argument("--max_steps", type=non_negative_int, default=0,
                   help="total optimiser steps; 0 = num_epochs x steps per epoch")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (after warm-up)")
    g.add_argument("--lr_scheduler", default="cosine", choices=("cosine", "constant_with_warmup", "linear"),
                   help="learning-rate schedule after the warm-up (diffusers' get_scheduler names); "
                        "constant_with_warmup suits runs measured by a time budget rather than a step count")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=non_negative_int, default=500,
                   help="linear warm-up steps (at most 5%% of the run)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    g.add_argument("--ema_decay", type=float, default=0.9999,
                   help="EMA decay (with warm-up: min(decay, (1+n)/(10+n)) after n steps)")
    g.add_argument("--extra_ema_decays", default="",
                   help="more EMA decays tracked beside --ema_decay (comma list), saved in snapshots: compares EMA "
                        "lengths without training again")
    g.add_argument("--cfg_dropout", type=fraction, default=0.1,
                   help="probability of replacing the class by the null class (classifier-free guidance)")
    g.add_argument("--early_stop_patience", type=non_negative_int, default=0,
                   help="stop after this many validations without improvement (0 = never)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="MedSegDiffV2", choices=("MedSegDiffV2", "UNet2DPeer"),
                   help="denoiser: this project's MedSegDiffV2, or diffusers' UNet2DModel (a peer for comparisons)")
    g.add_argument("--model_channels", type=positive_int, default=128, help="base width of the UNet")
    g.add_argument("--channel_mult", default="", help="width multipliers per level, e.g. 1,1,2,2,4,4 "
                                                       "(empty = by image size, as guided-diffusion)")
    g.add_argument("--num_res_blocks", type=positive_int, default=2, help="residual blocks per level")
    g.add_argument("--transformer_depth", type=non_negative_int, default=6,
                   help="transformer blocks at the lowest resolution")
    g.add_argument("--num_heads", type=positive_int, default=8, help="attention heads")
    g.add_argument("--use_transformer", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-use_transformer gives the plain UNet (ablation)")
    g.add_argument("--use_anchor", action=argparse.BooleanOptionalAction, default=True,
                   help="MedSegDiff-V2-style anchor: image-path features condition the mask path")
    g.add_argument("--patch_size", type=positive_int, default=1,
                   help="pixel-unshuffle factor before the UNet (2 = 4x cheaper, for high resolution or CPU)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in residual blocks")
    g.add_argument("--attention_levels", default="",
                   help="UNet levels (0 = finest) that get a transformer block after each residual block, e.g. 1,2; "
                        "the --transformer_depth stack sits at the bottleneck either way")
    g.add_argument("--self_condition", action=argparse.BooleanOptionalAction, default=False,
                   help="self-conditioning (Analog Bits): the network also sees its previous clean-sample estimate")
    g.add_argument("--peer_channels", default="32,64,64,128",
                   help="block widths of the UNet2DPeer (only with --arch UNet2DPeer)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--parameterization", default="ddpm", choices=("ddpm", "edm"),
                   help="ddpm: discrete schedule (--beta_*, --prediction_type, --snr_gamma); edm: Karras et al. 2022 "
                        "preconditioning, log-normal noise levels and loss weighting (--sigma_data, --p_mean, --p_std)")
    g.add_argument("--prediction_type", default="epsilon", choices=("epsilon", "v_prediction", "sample"),
                   help="what the network predicts (ddpm parameterisation)")
    g.add_argument("--sigma_data", type=float, default=0.5, help="EDM: standard deviation of the data")
    g.add_argument("--p_mean", type=float, default=-1.2, help="EDM: mean of log(sigma) in training")
    g.add_argument("--p_std", type=float, default=1.2, help="EDM: standard deviation of log(sigma) in training")
    g.add_argument("--mask_encoding", default="binary", choices=("binary", "sdf"),
                   help="the mask channel: binary (+-mask_scale) or a signed distance map (+-1 at sdf_width px from "
                        "the boundary, times mask_scale); either way positive inside the lesion")
    g.add_argument("--mask_scale", type=float, default=1.0,
                   help="amplitude of the mask channel in (0, 1] (scaled analog bits: < 1 lets noise hide it sooner)")
    g.add_argument("--sdf_width", type=float, default=8.0, help="pixels at which the signed distance map saturates")
    g.add_argument("--num_train_timesteps", type=positive_int, default=1000, help="diffusion steps")
    g.add_argument("--beta_schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"),
                   help="noise schedule (diffusers name)")
    g.add_argument("--beta_start", type=float, default=1e-4, help="first beta of the schedule")
    g.add_argument("--beta_end", type=float, default=0.02, help="last beta of the schedule")
    g.add_argument("--mask_loss_weight", type=float, default=1.0, help="weight of the mask channel's loss")
    g.add_argument("--anchor_loss_weight", type=float, default=1.0,
                   help="weight of the anchor's auxiliary mask loss (BCE + Dice)")
    g.add_argument("--snr_gamma", type=float, default=0.0, help="Min-SNR loss weighting gamma (0 = off; 5 is usual)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto = bf16 on GPUs that support it, else fp32")
    g.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels-last memory format (faster convolutions on recent GPUs)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g = p.add_argument_group("logging, samples and checkpoints")
    g.add_argument("--log_every", type=positive_int, default=50, help="status line + stats.jsonl every N steps")
    g.add_argument("--save_every", type=positive_int, default=1000, help="write last.pth every N steps")
    g.add_argument("--val_every", type=non_negative_int, default=0,
                   help="validation loss (picks best_model.pth) every N steps; 0 = with every save")
    g.add_argument("--val_timesteps", type=positive_int, default=8, help="fixed timesteps per validation image")
    g.add_argument("--max_val_images", type=positive_int, default=256, help="validation images used")
    g.add_argument("--sample_every", type=non_negative_int, default=1000, help="sample grid every N steps (0 = off)")
    g.add_argument("--samples_per_class", type=positive_int, default=4, help="samples per class in each grid")
    g.add_argument("--sample_sampler", default="ddim", choices=("ddpm", "ddim", "dpmsolver++"),
                   help="sampler for the grids")
    g.add_argument("--sample_steps", type=non_negative_int, default=0, help="sampler steps (0 = its default)")
    g.add_argument("--sample_guidance", type=float, default=1.0, help="classifier-free guidance for the grids")
    g.add_argument("--time_limit_minutes", type=float, default=0.0,
                   help="save last.pth and exit after this many minutes (0 = no limit); rerun to continue")
    g.add_argument("--stop_after_steps", type=non_negative_int, default=0,
                   help="save last.pth and exit after this many steps in this invocation (0 = no limit)")
    g.add_argument("--budget_minutes", type=float, default=0.0,
                   help="finish once the training steps have taken this many minutes on --budget_clock, over every "
                        "invocation of the run (0 = no budget; --max_steps / --num_epochs still cap the run)")
    g.add_argument("--snapshot_minutes", default="",
                   help="comma list of training minutes (on --budget_clock) at which the EMA weights are saved to "
                        "snapshots/min<M>.pth, e.g. 15,30,60: one run then gives every budget up to its longest")
    g.add_argument("--budget_clock", default="cpu", choices=("cpu", "wall"),
                   help="cpu: the process's CPU seconds in training steps (all threads; unaffected by other "
                        "programs' load on a shared machine); wall: wall-clock seconds of the training steps")
    return p


def main(argv=None) -> int:
    args = parse_config(build_parser(), argv)
    if args.dry_run:
        print_config(args)
        return 0
    import torch

    from training.diffusion_trainer import DiffusionTrainer
    from common.distributed import cleanup, init_distributed
    from common.precision import resolve_device, resolve_precision

    dist = init_distributed(args.device)
    try:
        device = resolve_device(args.device, dist.local_rank if dist.enabled else None)
        precision = resolve_precision(args.precision, device)
        torch.manual_seed(args.seed)
        config = resolved_config(args)
        trainer = DiffusionTrainer(args, config, dist, device, precision)
        trainer.run.write_config({**config, "resolved_precision": precision, "device_resolved": str(device),
                                  "world_size": dist.world_size, "command": args.command})
        trainer.fit()
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
