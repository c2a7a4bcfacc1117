"""The joint image+mask diffusion model's trainer (train_medsegdiff.py is its command line), on
:class:`training.harness.Harness`.

What is its own: the training split held in memory as uint8 tensors on the device and augmented there (random
horizontal flips, classifier-free-guidance label dropout), the diffusion loss, EMA weights (plus optional extra EMA
lengths), the validation loss of the EMA model at fixed noise, labelled sample grids, and the checkpoint that
generate_synthetic.py reads (``best_model.pth``: EMA weights + everything needed to rebuild the model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.distributed import DistInfo
from common.errors import UserError
from common.io import pixel_hash, sha256_file
from common.options import canonical_names, flat
from common.precision import autocast
from common.rundir import RunDir
from common.visual import labelled_grid
from data.pairs import LABELS, dataset_fingerprint, open_pair_dataset
from models.denoisers import build_denoiser
from models.diffusion import JointDiffusion, model_space_to_images
from training.config import DIFFUSION_RESUMABLE, DiffusionTrainConfig
from training.ema import EMA, PowerEMA, warmup_note
from training.harness import Harness


@dataclass
class TrainData:
    images: torch.Tensor          # uint8 [N,1,S,S] on device
    masks: torch.Tensor           # uint8 [N,1,S,S] in {0,1}
    labels: torch.Tensor          # long [N]
    class_names: list[str]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def class_names_for(num_classes: int) -> list[str]:
    """The class names a diffusion model with ``num_classes`` classes is trained on, in label-index order."""
    if num_classes not in (2, 3):
        raise UserError(f"--num_classes must be 2 (benign, malignant) or 3 (+ normal), got {num_classes}")
    return list(LABELS[:num_classes])


def load_split(ds, split: str, class_names: list[str], device: torch.device) -> TrainData:
    rows = ds.select(split=split, labels=class_names)
    images, masks = ds.load(rows)
    labels = torch.tensor([class_names.index(r["label"]) for r in rows], dtype=torch.long)
    return TrainData(torch.from_numpy(images)[:, None].to(device), torch.from_numpy(masks)[:, None].to(device),
                     labels.to(device), class_names, [r["id"] for r in rows])


def denoiser_kwargs(cfg: DiffusionTrainConfig) -> dict[str, Any]:
    """Constructor kwargs of the configured denoiser (stored in every checkpoint)."""
    m = cfg.model
    if m.arch == "UNet2DPeer":
        return {"img_size": cfg.img_size, "num_classes": cfg.num_classes, "block_out_channels": list(m.peer_channels),
                "layers_per_block": m.num_res_blocks, "self_condition": cfg.diffusion.self_condition}
    return {"img_size": cfg.img_size, "num_classes": cfg.num_classes, "model_channels": m.model_channels,
            "channel_mult": tuple(m.channel_mult) or None, "num_res_blocks": m.num_res_blocks,
            "transformer_depth": m.transformer_depth, "num_heads": m.num_heads,
            "use_transformer": m.use_transformer, "attention_levels": list(m.attention_levels),
            "use_anchor": m.use_anchor, "patch_size": m.patch_size, "dropout": m.dropout,
            "grad_checkpointing": m.gradient_checkpointing, "self_condition": cfg.diffusion.self_condition}


def flip_augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flips (the only geometric change that keeps an ultrasound image plausible)."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    f = flip[:, None, None, None]
    return torch.where(f, images.flip(-1), images), torch.where(f, masks.flip(-1), masks)


def with_dataset_size(cfg: DiffusionTrainConfig) -> tuple[DiffusionTrainConfig, Any]:
    """The config with ``img_size`` taken from the dataset (when 0) or checked against it, and the dataset."""
    ds = open_pair_dataset(cfg.data_dir)
    if cfg.img_size and cfg.img_size != ds.img_size:
        raise UserError(f"{cfg.data_dir}: images are {ds.img_size} px but --img_size is {cfg.img_size} (prepare the "
                        f"data with --img_size {cfg.img_size}, or leave --img_size out to use {ds.img_size})")
    cfg.img_size = ds.img_size
    return cfg, ds


class DiffusionTrainer(Harness):
    kind = "diffusion"
    higher_is_better = False
    oom_hint = ("lower --train_batch_size (or raise --gradient_accumulation_steps), use --mixed_precision bf16, add "
                "--gradient_checkpointing, or shrink the model (--model_channels, --transformer_depth, --patch_size 2)")

    def __init__(self, cfg: DiffusionTrainConfig, dist: DistInfo, device: torch.device, precision: str,
                 command: str = ""):
        cfg, ds = with_dataset_size(cfg)
        fingerprint = dataset_fingerprint(ds.root)
        config = {**flat(cfg), "command": command, "dataset_json_sha256": sha256_file(ds.root / "dataset.json"),
                  "dataset_fingerprint": fingerprint}
        # runs saved before an option existed resume as if it had its default; one without a content fingerprint
        # is checked on its dataset.json hash only
        defaults = {**flat(DiffusionTrainConfig()), "dataset_fingerprint": fingerprint,
                    "dataset_json_sha256": config["dataset_json_sha256"]}
        super().__init__(cfg, config, dist, device, precision, DIFFUSION_RESUMABLE | {"command", "config"},
                         renamed=canonical_names(DiffusionTrainConfig), defaults=defaults)
        self.run = RunDir(cfg.run.output_dir, active=dist.is_main)
        self.class_names = class_names_for(cfg.num_classes)
        self.train = load_split(ds, "train", self.class_names, device)
        # what the generator saw, by content: a synthetic set carries it, and combining refuses a real dataset
        # whose validation or test split holds any of these images (create_combined_dataset.py)
        self.train_hashes = [pixel_hash(a) for a in self.train.images[:, 0].cpu().numpy()]
        missing = [c for i, c in enumerate(self.class_names) if not (self.train.labels == i).any()]
        if missing:
            raise UserError(f"{cfg.data_dir}: no training pairs of class {', '.join(missing)} "
                            f"(--num_classes {cfg.num_classes} needs every class; use 2 to leave out normal)")
        self.val = load_split(ds, "val", self.class_names, device)
        self.diffusion = JointDiffusion(cfg.diffusion)
        self.model_kwargs = denoiser_kwargs(cfg)
        try:
            model = build_denoiser(cfg.model.arch, self.model_kwargs).to(device)
        except ValueError as exc:
            raise UserError(f"model configuration: {exc}") from None
        if cfg.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.ema = EMA(model, decay=cfg.optim.ema_decay)
        # more EMA lengths tracked side by side (cheap: one lerp per step), saved in snapshots and checkpoints
        self.extra_emas = {**{f"{d:g}": EMA(model, decay=d) for d in cfg.optim.extra_ema_decays},
                           **{f"std{w:g}": PowerEMA(model, std=w) for w in cfg.optim.extra_ema_stds}}
        self.setup_optimisation(model, len(self.train))
        self.q_sum = torch.zeros(4, device=device)   # loss per noise-level quartile since the last record
        self.q_cnt = torch.zeros(4, device=device)

    def find_unused_parameters(self) -> bool:
        return self.cfg.model.arch == "MedSegDiffV2" and self.cfg.model.use_anchor and \
            self.cfg.diffusion.anchor_loss_weight == 0

    def describe_start(self) -> str:
        c = self.cfg
        counts = ", ".join(f"{n}: {int((self.train.labels == i).sum())}" for i, n in enumerate(self.class_names))
        return (f"training {c.model.arch} ({self.n_params / 1e6:.2f}M parameters) on {len(self.train)} pairs "
                f"({counts}), {self.total_steps} steps of global batch {self.global_batch}"
                f"{f' x {c.optim.gradient_accumulation_steps} accumulated' if c.optim.gradient_accumulation_steps > 1 else ''}"
                f" ({self.steps_per_epoch} steps/epoch), {c.img_size} px, {c.diffusion.parameterization}, "
                f"{self.precision}, {self.device}{f' x {self.dist.world_size} processes' if self.dist.enabled else ''}"
                + (f"\n{note}" if (note := warmup_note(c.optim.ema_decay, self.total_steps)) else ""))

    # ------------------------------------------------------------------ one step
    def make_batch(self, idx: torch.Tensor):
        c = self.cfg
        images, masks, labels = self.train.images[idx], self.train.masks[idx], self.train.labels[idx]
        if c.augment == "flip":
            images, masks = flip_augment(images, masks, self.gen)
        elif c.augment == "standard":
            from training.augment import augment
            img01, masks = augment(images.float() / 255.0, masks.float(), "standard", self.gen)
            images = (img01 * 255.0).round().clamp(0, 255).to(torch.uint8)
        x0 = self.diffusion.to_model_space(images, masks)
        if c.run.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        drop = torch.rand(labels.shape[0], device=self.device, generator=self.gen) < c.optim.cfg_dropout
        labels = torch.where(drop, torch.full_like(labels, c.num_classes), labels)
        return x0, labels

    def compute_loss(self, batch):
        x0, labels = batch
        loss, parts = self.diffusion.loss(self.net, x0, labels, generator=self.gen)
        q = parts["quartile"]
        self.q_sum.index_add_(0, q, parts["per_sample"].float())
        self.q_cnt.index_add_(0, q, torch.ones_like(parts["per_sample"], dtype=torch.float))
        return loss, {"image": parts["image"], "mask": parts["mask"], "anchor": parts["anchor"]}

    def after_step(self) -> None:
        self.ema.update(self.model)
        for e in self.extra_emas.values():
            e.update(self.model)

    def record_extra(self, rec: dict[str, Any]) -> dict[str, Any]:
        qm = (self.q_sum / self.q_cnt.clamp(min=1)).tolist()
        self.q_sum.zero_()
        self.q_cnt.zero_()
        return {f"loss_t_q{i + 1}": qm[i] for i in range(4)}

    # ------------------------------------------------------------------ cadence
    def val_due(self) -> bool:
        return self.step % (self.cfg.run.val_every or self.cfg.run.checkpointing_steps) == 0

    def interval_due(self) -> bool:
        return bool(self.cfg.run.sample_every) and self.step % self.cfg.run.sample_every == 0

    def interval_enabled(self) -> bool:
        return bool(self.cfg.run.sample_every)

    def no_val_keeps_latest(self) -> bool:
        return len(self.val) == 0

    # ------------------------------------------------------------------ checkpoints
    def best_payload(self) -> dict[str, Any]:
        return {"kind": "diffusion", "model_class": self.cfg.model.arch, "model_kwargs": self.model_kwargs,
                "diffusion": self.diffusion.config.to_dict(), "class_names": self.class_names,
                "img_size": self.cfg.img_size, "ema": self.ema.state_dict()["module"], "step": self.step,
                "epoch": self.epoch, "best_val_loss": self.best, "config": self.config,
                "train_cpu_s": self.train_cpu_s, "train_wall_s": self.train_wall_s,
                "train_machine": self.machine.summary(),
                "training_data": {"data_dir": self.cfg.data_dir, "dataset_fingerprint": self.config["dataset_fingerprint"],
                                  "n_train": len(self.train), "image_hashes": self.train_hashes}}

    def snapshot_payload(self) -> dict[str, Any]:
        return {**self.best_payload(), "extra_emas": {k: e.state_dict()["module"] for k, e in self.extra_emas.items()}}

    def state_extra(self) -> dict[str, Any]:
        return {**self.best_payload(), "ema_state": self.ema.state_dict(),
                "extra_emas": {k: e.state_dict() for k, e in self.extra_emas.items()}}

    def load_state_extra(self, ckpt: dict[str, Any]) -> None:
        self.ema.load_state_dict(ckpt["ema_state"])
        for k, state in ckpt.get("extra_emas", {}).items():
            if k in self.extra_emas:
                self.extra_emas[k].load_state_dict(state)
        if "best" not in ckpt and "best_val_loss" in ckpt:   # checkpoints of earlier versions
            self.best = float(ckpt["best_val_loss"])

    # ------------------------------------------------------------------ validation and samples
    @torch.no_grad()
    def validate(self) -> float:
        """EMA model's loss on the validation split at fixed noise and noise levels (deterministic)."""
        data, c = self.val, self.cfg
        if len(data) == 0:
            return math.nan
        n = min(len(data), c.run.max_val_images)
        g = torch.Generator(device=self.device)
        g.manual_seed(12345)
        grid = self.diffusion.level_grid(c.run.val_timesteps, self.device)
        total, count = torch.zeros((), device=self.device), 0
        model = self.ema.module
        for start in range(0, n, c.optim.train_batch_size):
            sl = slice(start, min(n, start + c.optim.train_batch_size))
            x0 = self.diffusion.to_model_space(data.images[sl], data.masks[sl])
            labels = data.labels[sl]
            for t in grid:
                noise = torch.randn(x0.shape, device=self.device, generator=g)
                with autocast(self.device, self.precision):
                    _, parts = self.diffusion.loss(model, x0, labels, timesteps=t.expand(x0.shape[0]), noise=noise,
                                                   self_cond=False)
                total += parts["per_sample"].sum()
                count += x0.shape[0]
        return float(total / count)

    def on_validated(self, score: float, improved: bool) -> None:
        self.run.stats({"step": self.step, "val_loss": score, "best_val_loss": self.best})
        note = "no val split: keeping the latest EMA weights" if math.isnan(score) else (
            "new best" if improved else f"best {self.best:.5f}")
        self.run.log(f"validation (EMA, fixed noise) at step {self.step}: {score:.5f} ({note})")

    def on_interval(self) -> None:
        """A labelled sample grid (one row per class) of the EMA model, and loss.png refreshed."""
        c = self.cfg
        per = c.run.samples_per_class
        labels = torch.arange(len(self.class_names), device=self.device).repeat_interleave(per)
        gens = [torch.Generator().manual_seed(1_000_000 + i) for i in range(labels.shape[0])]
        x = self.diffusion.sample(self.ema.module, labels, gens, c.img_size, sampler=c.run.sample_sampler,
                                  steps=c.run.sample_steps or None, guidance_scale=c.run.sample_guidance,
                                  null_class=c.num_classes, autocast=lambda: autocast(self.device, self.precision))
        images, masks = model_space_to_images(x)
        path = self.run.file("samples") / f"step_{self.step:07d}.png"
        names = np.array([self.class_names[i] for i in labels.tolist()])
        labelled_grid(path, images[:, 0].cpu().numpy(), masks[:, 0].cpu().numpy(), names,
                      f"{self.run.path.name}: EMA samples at step {self.step} ({c.run.sample_sampler}, guidance "
                      f"{c.run.sample_guidance:g})", per_class=per)
        self.write_loss_curves()
        self.run.log(f"samples: {path}")

    def finish(self, stopped: str, trained: bool) -> dict[str, Any]:
        return {"step": self.step, "best_val_loss": self.best, "stopped": stopped, "parameters": self.n_params}
