"""Typed configurations of the two trainers: one dataclass field per flag of train_medsegdiff.py /
train_segmentation.py (:mod:`common.options`), grouped as data / model / diffusion / optimisation / run.

Flag names follow diffusers' training examples (``--learning_rate``, ``--train_batch_size``, ``--lr_warmup_steps``,
``--max_train_steps``, ``--mixed_precision``, ``--gradient_checkpointing``, ``--checkpointing_steps``,
``--num_epochs``); the project's earlier names stay as aliases (``--lr``, ``--batch_size``, ``--warmup_steps``,
``--max_steps``, ``--precision``, ``--grad_checkpointing``, ``--save_every``, ``--epochs``), in presets too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.options import option
from models.diffusion import DiffusionConfig
from training.ema import MAX_POWER_STD
from training.schedules import SHAPES as LR_SCHEDULERS

SEED_MAX = 2**31 - 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard", "wandb")


def _check_device(name: str) -> None:
    import re
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


# ---------------------------------------------------------------------------------------------- shared groups
@dataclass
class OptimConfig:
    train_batch_size: int = option(8, "batch size per process and micro-step (an optimiser step sees train_batch_"
                                   "size x gradient_accumulation_steps x processes pairs)", low=1, high=65536,
                                   aliases=("--batch_size",))
    gradient_accumulation_steps: int = option(1, "micro-batches summed into one optimiser step (same maths as a "
                                              "larger batch, in less memory)", low=1, high=1024)
    learning_rate: float = option(1e-4, "AdamW peak learning rate (after warm-up)", low=0, low_open=True,
                                  aliases=("--lr",))
    lr_scheduler: str = option("cosine", "learning-rate schedule after the warm-up (diffusers' shapes, plus "
                               "warmup_stable_decay: the peak rate, then a linear decay to zero over the run's last "
                               "lr_decay_fraction); it runs over the whole run, whether max_train_steps or "
                               "budget_minutes ends it (training/schedules.py)", choices=LR_SCHEDULERS)
    lr_decay_fraction: float = option(0.2, "warmup_stable_decay: the fraction of the run, at its end, over which the "
                                      "rate decays to zero", low=0, low_open=True, high=1)
    lr_warmup_steps: int = option(500, "linear warm-up steps (at most 5%% of the run)", low=0,
                                  aliases=("--warmup_steps",))
    weight_decay: float = option(0.0, "AdamW weight decay", low=0, high=1)
    grad_clip: float = option(1.0, "gradient-norm clipping threshold", low=0, low_open=True)


@dataclass
class RunConfig:
    output_dir: str = option("./checkpoints", "run directory (checkpoints, logs, sample grids)")
    seed: int = option(0, "seed of initialisation, data order, augmentation and noise", low=0, high=SEED_MAX)
    resume: str = option("auto", "auto: continue from <output_dir>/last.pth if it exists; never: refuse an existing "
                         "run", choices=("auto", "never"))
    num_epochs: int = option(100, "epochs over the training split (ignored when max_train_steps is set)", low=1,
                             high=10**7, aliases=("--epochs",))
    max_train_steps: int = option(0, "total optimiser steps; 0 = num_epochs x steps per epoch", low=0,
                                  aliases=("--max_steps",))
    log_every: int = option(50, "status line + stats.jsonl every N steps", low=1)
    checkpointing_steps: int = option(1000, "write last.pth every N steps", low=1, aliases=("--save_every",))
    early_stop_patience: int = option(0, "stop after this many validations without improvement (0 = never)", low=0)
    time_limit_minutes: float = option(0.0, "save last.pth and exit after this many minutes of this invocation "
                                       "(0 = no limit); rerun the same command to continue", low=0)
    stop_after_steps: int = option(0, "save last.pth and exit after this many steps in this invocation (0 = no "
                                   "limit)", low=0)
    budget_minutes: float = option(0.0, "finish once the training steps have taken this many minutes on "
                                   "budget_clock, over every invocation of the run (0 = no budget)", low=0)
    snapshot_minutes: list[float] = option([], "training minutes (on budget_clock) at which the EMA weights are "
                                           "saved to snapshots/min<M>.pth, e.g. 15,30,60", low=0, low_open=True)
    budget_clock: str = option("cpu", "cpu: the process's CPU seconds in training steps (all threads; not "
                               "affected by other programs on a shared machine); wall: wall-clock seconds",
                               choices=("cpu", "wall"))
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    mixed_precision: str = option("auto", "auto = bf16 on GPUs that support it, else fp32", choices=PRECISIONS,
                                  aliases=("--precision",))
    channels_last: bool = option(False, "channels-last memory format (faster convolutions on recent GPUs)")
    compile: bool = option(False, "torch.compile the model")
    report_to: str = option("none", "also send the training records to TensorBoard (<output_dir>/tensorboard) or "
                            "Weights & Biases (imported only when asked for)", choices=REPORT_TO)

    def __post_init__(self) -> None:
        _check_device(self.device)


RUN_LENGTH_KEYS = {"num_epochs", "max_train_steps", "stop_after_steps", "time_limit_minutes", "budget_minutes",
                   "snapshot_minutes", "log_every", "checkpointing_steps", "early_stop_patience", "device",
                   "mixed_precision", "channels_last", "compile", "resume", "output_dir", "report_to"}
"""Options that may change between a run and its resumption (run length, logging, hardware, paths)."""


# ---------------------------------------------------------------------------------------------- diffusion model
@dataclass
class DenoiserConfig:
    arch: str = option("MedSegDiffV2", "denoiser: this project's MedSegDiffV2, or diffusers' UNet2DModel (the peer "
                       "of the benchmarks)", choices=("MedSegDiffV2", "UNet2DPeer"))
    model_channels: int = option(128, "base width of the UNet", low=1, high=4096)
    channel_mult: list[int] = option([], "width multipliers per level, e.g. 1,1,2,2,4,4 (empty = by image size, as "
                                     "guided-diffusion)", low=1, high=64)
    num_res_blocks: int = option(2, "residual blocks per level", low=1, high=16)
    transformer_depth: int = option(6, "transformer blocks at the lowest resolution", low=0, high=64)
    num_heads: int = option(8, "attention heads", low=1, high=128)
    use_transformer: bool = option(True, "--no-use_transformer gives the plain UNet (ablation)")
    attention_levels: list[int] = option([], "UNet levels (0 = finest) that get a transformer block after each "
                                         "residual block, e.g. 1,2", low=0, high=16)
    use_anchor: bool = option(True, "MedSegDiff-V2-style anchor: image-path features condition the mask path")
    patch_size: int = option(1, "pixel-unshuffle factor before the UNet (2 = 4x cheaper, for high resolution or CPU)",
                             low=1, high=16)
    dropout: float = option(0.0, "dropout in residual blocks", low=0, high=1, high_open=True)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, one "
                                          "more forward pass of compute)", aliases=("--grad_checkpointing",))
    peer_channels: list[int] = option([32, 64, 64, 128], "block widths of the UNet2DPeer (only with --arch "
                                      "UNet2DPeer)", low=1, high=4096)


@dataclass
class DiffusionOptim(OptimConfig):
    ema_decay: float = option(0.9999, "EMA decay (with warm-up: min(decay, (1+n)/(10+n)) after n steps)", low=0,
                              high=1, high_open=True)
    extra_ema_decays: list[float] = option([], "more EMA decays tracked beside ema_decay, saved in snapshots: "
                                           "compares EMA lengths without training again", low=0, high=1,
                                           high_open=True)
    extra_ema_stds: list[float] = option([], "power-function EMAs (Karras et al. 2024, EDM2) of these relative "
                                         "widths sigma_rel tracked beside ema_decay, saved in snapshots as "
                                         "'std<width>', e.g. 0.05,0.1,0.2", low=0, high=MAX_POWER_STD,
                                         low_open=True)
    cfg_dropout: float = option(0.1, "probability of replacing the class by the null class (classifier-free "
                                "guidance)", low=0, high=1, high_open=True)


@dataclass
class DiffusionRun(RunConfig):
    val_every: int = option(0, "validation loss (picks best_model.pth) every N steps; 0 = with every checkpoint",
                            low=0)
    val_timesteps: int = option(8, "fixed noise levels per validation image", low=1, high=1000)
    max_val_images: int = option(256, "validation images used", low=1)
    sample_every: int = option(1000, "sample grid (and loss.png) every N steps (0 = off)", low=0)
    samples_per_class: int = option(4, "samples per class in each grid", low=1, high=64)
    sample_sampler: str = option("ddim", "sampler for the grids", choices=("ddpm", "ddim", "dpmsolver++"))
    sample_steps: int = option(0, "sampler steps (0 = its default)", low=0, high=10000)
    sample_guidance: float = option(1.0, "classifier-free guidance for the grids", low=0, high=100)


@dataclass
class DiffusionTrainConfig:
    data_dir: str = option("./data/busi_processed", "pair dataset made by prepare_busi_dataset.py")
    img_size: int = option(0, "image size; 0 = the dataset's (dataset.json); must equal it when given", low=0,
                           high=4096)
    num_classes: int = option(2, "2: benign + malignant; 3: also normal (empty masks)", choices=(2, 3))
    augment: str = option("flip", "on-device augmentation: flip = random horizontal flips; standard = flips, small "
                          "affine and intensity changes (these leak into what the model learns to draw)",
                          choices=("none", "flip", "standard"))
    model: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: DiffusionOptim = field(default_factory=DiffusionOptim)
    run: DiffusionRun = field(default_factory=DiffusionRun)


DIFFUSION_RESUMABLE = RUN_LENGTH_KEYS | {"data_dir", "sample_every", "samples_per_class", "sample_sampler",
                                         "sample_steps", "sample_guidance", "val_every", "val_timesteps",
                                         "max_val_images"}


# ---------------------------------------------------------------------------------------------- segmentation
@dataclass
class SegModelConfig:
    model: str = option("madgnet", "segmenter", choices=("madgnet", "unet"))
    encoder_weights: str = option("imagenet", "MADGNet encoder: ImageNet weights through timm (needs internet or "
                                  "timm's cache), or random", choices=("imagenet", "none"))
    encoder_checkpoint: str | None = option(None, "MADGNet encoder: a local state dict of timm's encoder (offline "
                                            "ImageNet weights)", metavar="PATH")
    encoder_name: str = option("resnest50d", "MADGNet encoder (a timm model name)")
    base_width: int = option(32, "U-Net: width of the first level", low=1, high=1024)
    depth: int = option(4, "U-Net: number of down-sampling levels", low=1, high=8)
    norm: str = option("batch", "U-Net: normalisation layers", choices=("batch", "group"))

    def __post_init__(self) -> None:
        if self.model != "madgnet" and self.encoder_checkpoint:
            raise ValueError("--encoder_checkpoint applies to --model madgnet only")
        if self.encoder_checkpoint and self.encoder_weights == "none":
            raise ValueError("--encoder_checkpoint and --encoder_weights none contradict each other; choose one")


@dataclass
class SegOptim(OptimConfig):
    weight_decay: float = option(1e-4, "AdamW weight decay", low=0, high=1)
    lr_warmup_steps: int = option(100, "linear warm-up steps (at most 5%% of the run)", low=0,
                                  aliases=("--warmup_steps",))
    class_weight: float = option(0.2, "weight of the classification (benign/malignant) cross-entropy in the loss; "
                                 "0 = off", low=0)


@dataclass
class SegRun(RunConfig):
    output_dir: str | None = option(None, "run directory (default: checkpoints/segmentation/<model>_<data "
                                    "folder>_seed<seed>; {seed} is replaced by the seed)", nullable=True)
    num_epochs: int = option(50, "epochs over the training split (ignored when max_train_steps is set)", low=1,
                             high=10**7, aliases=("--epochs",))
    checkpointing_steps: int = option(0, "write last.pth every N steps; 0 = at the end of every epoch", low=0,
                                      aliases=("--save_every_steps",))
    val_every: int = option(1, "validate (and maybe keep best) every N epochs", low=1)
    stop_after_epochs: int = option(0, "save last.pth and exit after this many epochs in this invocation (0 = no "
                                    "limit)", low=0)
    eval_batch_size: int = option(32, "batch size of validation and test", low=1)


@dataclass
class SegTrainConfig:
    data_dir: str = option("./data/busi_processed", "pair dataset (prepare_busi_dataset.py or "
                           "create_combined_dataset.py)")
    img_size: int = option(0, "image size; 0 = the dataset's (dataset.json); must equal it when given", low=0,
                           high=4096)
    include_normal: bool = option(False, "also train/validate/test on normal images (empty masks; the class head "
                                  "gets 3 labels, the false-positive rate on normal images is reported); default: "
                                  "benign + malignant only, as MADGNet's BUSI protocol")
    augment: str = option("standard", "on-device augmentation: standard = flip, small affine, brightness/contrast; "
                          "strong = + elastic, gamma, speckle, blur (the classic-augmentation comparator)",
                          choices=("none", "standard", "strong"))
    test_data: list[str] = option([], "more pair datasets to test on (every pair of a used class, whatever its "
                                  "split), each reported separately", metavar="DIR", nargs="+")
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptim = field(default_factory=SegOptim)
    run: SegRun = field(default_factory=SegRun)


SEG_RESUMABLE = RUN_LENGTH_KEYS | {"data_dir", "test_data", "eval_batch_size", "val_every", "stop_after_epochs"}
