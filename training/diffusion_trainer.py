"""The training loop of the joint image+mask diffusion model (train_medsegdiff.py is its command line).

The training split is held in memory as uint8 tensors on the device and augmented there: no per-step
decoding, no DataLoader. One global permutation per epoch (shared by all DDP ranks, each taking its slice
of every global batch); every random draw of a step comes from one seeded generator whose state is saved,
so an interrupted and resumed CPU run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from data.pairs import LABEL_INDEX, LABELS, open_pair_dataset
from models.denoisers import build_denoiser
from models.diffusion import DiffusionConfig, JointDiffusion, model_space_to_images
from common.checkpoint import load_checkpoint, load_resumable, rng_state, save_checkpoint, set_rng_state
from common.distributed import DistInfo, all_reduce_mean, barrier, broadcast_flag
from training.ema import EMA
from common.precision import autocast, grad_scaler, memory_stats
from common.rundir import RunDir
from common.visual import save_grid

# flags that may change between a run and its resumption (run length, logging, hardware)
RESUMABLE_KEYS = {"num_epochs", "max_steps", "stop_after_steps", "time_limit_minutes", "budget_minutes",
                  "snapshot_minutes", "log_every",
                  "sample_every", "save_every", "val_every", "device", "config", "resume", "compile",
                  "early_stop_patience", "samples_per_class", "sample_sampler", "sample_steps",
                  "sample_guidance", "data_dir", "output_dir", "precision", "channels_last"}
# flags that define the network (stored in the checkpoint as the model's constructor kwargs)
MODEL_FLAGS = ("img_size", "model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "num_heads",
               "use_transformer", "patch_size", "use_anchor", "dropout", "grad_checkpointing", "self_condition")


@dataclass
class TrainData:
    images: torch.Tensor          # uint8 [N,1,S,S] on device
    masks: torch.Tensor           # uint8 [N,1,S,S] in {0,1}
    labels: torch.Tensor          # long [N]
    class_names: list[str]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def load_split(data_dir: str, split: str, class_names: list[str], img_size: int, device: torch.device
               ) -> TrainData:
    ds = open_pair_dataset(data_dir)
    if ds.img_size != img_size:
        raise UserError(f"{data_dir}: images are {ds.img_size} px but --img_size is {img_size} (prepare the data "
                        f"with --img_size {img_size}, or pass --img_size {ds.img_size})")
    rows = ds.select(split=split, labels=class_names)
    images, masks = ds.load(rows)
    labels = torch.tensor([class_names.index(r["label"]) for r in rows], dtype=torch.long)
    return TrainData(torch.from_numpy(images)[:, None].to(device), torch.from_numpy(masks)[:, None].to(device),
                     labels.to(device), class_names, [r["id"] for r in rows])


def parse_floats(text: str) -> list[float]:
    return [float(c) for c in str(text or "").split(",") if c.strip()]


def class_names_for(num_classes: int) -> list[str]:
    if num_classes not in (2, 3):
        raise UserError(f"--num_classes must be 2 (benign, malignant) or 3 (+ normal), got {num_classes}")
    return list(LABELS[:num_classes])


def int_list(text: str) -> list[int]:
    return [int(c) for c in str(text).split(",") if c.strip()]


def model_kwargs_from_args(args) -> dict[str, Any]:
    if args.arch == "UNet2DPeer":
        return {"img_size": args.img_size, "num_classes": args.num_classes,
                "block_out_channels": int_list(args.peer_channels),
                "layers_per_block": args.num_res_blocks, "self_condition": bool(args.self_condition)}
    kw = {k: getattr(args, k) for k in MODEL_FLAGS}
    kw["channel_mult"] = tuple(int_list(args.channel_mult)) if args.channel_mult else None
    kw["attention_levels"] = int_list(args.attention_levels)
    kw["num_classes"] = args.num_classes
    return kw


def diffusion_config_from_args(args) -> DiffusionConfig:
    return DiffusionConfig(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                           beta_start=args.beta_start, beta_end=args.beta_end, prediction_type=args.prediction_type,
                           mask_loss_weight=args.mask_loss_weight, anchor_loss_weight=args.anchor_loss_weight,
                           snr_gamma=args.snr_gamma or None, parameterization=args.parameterization,
                           sigma_data=args.sigma_data, p_mean=args.p_mean, p_std=args.p_std,
                           self_condition=bool(args.self_condition), mask_encoding=args.mask_encoding,
                           mask_scale=args.mask_scale, sdf_width=args.sdf_width)


def flip_augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flips (the only geometric change that keeps an ultrasound image plausible)."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    f = flip[:, None, None, None]
    return torch.where(f, images.flip(-1), images), torch.where(f, masks.flip(-1), masks)


class DiffusionTrainer:
    def __init__(self, args, config: dict[str, Any], dist: DistInfo, device: torch.device, precision: str):
        self.args, self.config, self.dist, self.device, self.precision = args, config, dist, device, precision
        self.run = RunDir(args.output_dir, active=dist.is_main)
        self.class_names = class_names_for(args.num_classes)
        self.train = load_split(args.data_dir, "train", self.class_names, args.img_size, device)
        missing = [c for i, c in enumerate(self.class_names) if not (self.train.labels == i).any()]
        if missing:
            raise UserError(f"{args.data_dir}: no training pairs of class {', '.join(missing)} "
                            f"(--num_classes {args.num_classes} needs every class; use 2 to leave out normal)")
        self.val = load_split(args.data_dir, "val", self.class_names, args.img_size, device)
        try:
            self.diffusion = JointDiffusion(diffusion_config_from_args(args))
        except ValueError as exc:
            raise UserError(f"diffusion configuration: {exc}") from None
        self.model_kwargs = model_kwargs_from_args(args)
        try:
            self.model = build_denoiser(args.arch, self.model_kwargs).to(device)
        except ValueError as exc:
            raise UserError(f"model configuration: {exc}") from None
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.ema = EMA(self.model, decay=args.ema_decay)
        # more EMA lengths tracked side by side (cheap: one lerp per step), saved in snapshots and checkpoints
        self.extra_emas = {f"{d:g}": EMA(self.model, decay=d) for d in parse_floats(args.extra_ema_decays)}
        self.snapshot_minutes = sorted(parse_floats(args.snapshot_minutes))
        self.train_cpu_s = 0.0    # time spent in training steps, summed over every invocation (the budget clock)
        self.train_wall_s = 0.0
        fused = device.type in ("cuda", "cpu")   # one kernel for all parameters (CPU: 27 -> 8 ms per step, demo)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           betas=(0.9, 0.999), fused=fused)
        per_rank = args.batch_size
        self.global_batch = per_rank * dist.world_size
        self.steps_per_epoch = max(1, len(self.train) // self.global_batch)
        if len(self.train) < self.global_batch:
            raise UserError(f"{args.data_dir}: {len(self.train)} training pairs are fewer than one global batch "
                            f"({self.global_batch}); lower --batch_size")
        self.total_steps = args.max_steps or args.num_epochs * self.steps_per_epoch
        warmup = min(args.warmup_steps, max(1, self.total_steps // 20))
        from diffusers.optimization import get_scheduler
        self.lr_sched = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=warmup,
                                      num_training_steps=self.total_steps)
        self.scaler = grad_scaler(device, precision)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(args.seed * 1000 + dist.rank)
        self.order_gen = torch.Generator()
        self.order_gen.manual_seed(args.seed)
        self.step = 0
        self.epoch = 0
        self.perm = torch.randperm(len(self.train), generator=self.order_gen)
        self.pos = 0
        self.best_val = math.inf
        self.bad_vals = 0
        self.val_history: list[list[float]] = []
        self.net = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            unused = args.arch == "MedSegDiffV2" and args.use_anchor and args.anchor_loss_weight == 0
            self.net = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                           find_unused_parameters=unused)
        if args.compile:
            self.net = torch.compile(self.net)

    # ------------------------------------------------------------------ checkpoints
    def payload(self, full: bool) -> dict[str, Any]:
        base = {
            "kind": "diffusion",
            "model_class": self.args.arch,
            "model_kwargs": self.model_kwargs,
            "diffusion": self.diffusion.config.to_dict(),
            "class_names": self.class_names,
            "img_size": self.args.img_size,
            "ema": self.ema.state_dict()["module"],
            "step": self.step,
            "epoch": self.epoch,
            "best_val_loss": self.best_val,
            "config": self.config,
            "train_cpu_s": self.train_cpu_s,
            "train_wall_s": self.train_wall_s,
        }
        if full:
            base.update({
                "model": self.model.state_dict(),
                "ema_state": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "perm": self.perm, "pos": self.pos,
                "gen": self.gen.get_state(), "order_gen": self.order_gen.get_state(),
                "rng": rng_state(),
                "val_history": self.val_history, "bad_vals": self.bad_vals,
                "extra_emas": {k: e.state_dict() for k, e in self.extra_emas.items()},
            })
        return base

    def budget_clock(self) -> float:
        """Seconds of training so far on the clock that --budget_minutes and --snapshot_minutes count: the process's
        CPU time (all its threads) with --budget_clock cpu, wall-clock time of the training steps with wall."""
        return self.train_cpu_s if self.args.budget_clock == "cpu" else self.train_wall_s

    def save_due_snapshots(self) -> None:
        """EMA weights at each --snapshot_minutes mark the budget clock has passed: snapshots/min<M>.pth, a checkpoint
        generate_synthetic.py reads like best_model.pth, plus the extra EMA lengths."""
        if not self.snapshot_minutes or not self.dist.is_main:
            return
        clock = self.budget_clock() / 60.0
        while self.snapshot_minutes and clock >= self.snapshot_minutes[0]:
            minutes = self.snapshot_minutes.pop(0)
            path = self.run.file("snapshots") / f"min{minutes:g}.pth"
            if not path.exists():
                payload = self.payload(full=False)
                payload["snapshot_minutes"] = minutes
                payload["extra_emas"] = {k: e.state_dict()["module"] for k, e in self.extra_emas.items()}
                save_checkpoint(path, payload)
                self.run.log(f"snapshot at {minutes:g} min of training ({self.args.budget_clock} clock), step "
                             f"{self.step}: {path}")

    def save_last(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.run.file("last.pth"), self.payload(full=True))

    def try_resume(self) -> bool:
        path = self.run.file("last.pth")
        ckpt = load_resumable(path, "diffusion", self.config, RESUMABLE_KEYS, self.args.resume)
        if ckpt is None:
            return False
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema_state"])
        except RuntimeError as exc:
            raise UserError(f"{path}: weights do not fit this model ({str(exc).splitlines()[0]})") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_sched.load_state_dict(ckpt["lr_scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.perm, self.pos = ckpt["perm"], int(ckpt["pos"])
        self.gen.set_state(ckpt["gen"])
        self.order_gen.set_state(ckpt["order_gen"])
        set_rng_state(ckpt["rng"])
        self.best_val = float(ckpt["best_val_loss"])
        self.val_history = [list(v) for v in ckpt.get("val_history", [])]
        self.bad_vals = int(ckpt.get("bad_vals", 0))
        self.train_cpu_s = float(ckpt.get("train_cpu_s", 0.0))
        self.train_wall_s = float(ckpt.get("train_wall_s", 0.0))
        done = self.budget_clock() / 60.0
        self.snapshot_minutes = [m for m in self.snapshot_minutes if m > done]
        for k, state in ckpt.get("extra_emas", {}).items():
            if k in self.extra_emas:
                self.extra_emas[k].load_state_dict(state)
        self.run.log(f"resumed from {path} at step {self.step} (epoch {self.epoch})")
        return True

    # ------------------------------------------------------------------ data
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.global_batch > len(self.perm):
            self.epoch += 1
            self.perm = torch.randperm(len(self.train), generator=self.order_gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.global_batch]
        self.pos += self.global_batch
        b = self.args.batch_size
        idx = idx[self.dist.rank * b:(self.dist.rank + 1) * b].to(self.device)
        images, masks = self.train.images[idx], self.train.masks[idx]
        labels = self.train.labels[idx]
        if self.args.augment == "flip":
            images, masks = flip_augment(images, masks, self.gen)
        elif self.args.augment == "standard":
            from training.augment import augment
            img01, masks = augment(images.float() / 255.0, masks.float(), "standard", self.gen)
            images = (img01 * 255.0).round().clamp(0, 255).to(torch.uint8)
        x0 = self.diffusion.to_model_space(images, masks)
        if self.args.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        drop = torch.rand(labels.shape[0], device=self.device, generator=self.gen) < self.args.cfg_dropout
        labels = torch.where(drop, torch.full_like(labels, self.args.num_classes), labels)
        return x0, labels

    def train_step(self, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step on a batch (loss, backward, clipping, AdamW, LR schedule, EMA); no host sync."""
        self.model.train()
        with autocast(self.device, self.precision):
            loss, parts = self.diffusion.loss(self.net, x0, labels, generator=self.gen)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_sched.step()
        self.ema.update(self.model)
        for e in self.extra_emas.values():
            e.update(self.model)
        return loss, parts

    # ------------------------------------------------------------------ validation and samples
    @torch.no_grad()
    def validate(self) -> float:
        """EMA model's loss on the validation split at fixed noise and timesteps (deterministic)."""
        data = self.val
        if len(data) == 0:
            return math.nan
        n = min(len(data), self.args.max_val_images)
        k = self.args.val_timesteps
        g = torch.Generator(device=self.device)
        g.manual_seed(12345)
        t_grid = self.diffusion.level_grid(k, self.device)
        total, count = torch.zeros((), device=self.device), 0
        model = self.ema.module
        for start in range(0, n, self.args.batch_size):
            sl = slice(start, min(n, start + self.args.batch_size))
            x0 = self.diffusion.to_model_space(data.images[sl], data.masks[sl])
            labels = data.labels[sl]
            for t in t_grid:
                noise = torch.randn(x0.shape, device=self.device, generator=g)
                ts = t.expand(x0.shape[0])
                with autocast(self.device, self.precision):
                    _, parts = self.diffusion.loss(model, x0, labels, timesteps=ts, noise=noise, self_cond=False)
                total += parts["per_sample"].sum()
                count += x0.shape[0]
        return float(total / count)

    def save_samples(self) -> Path:
        per = self.args.samples_per_class
        labels = torch.arange(len(self.class_names), device=self.device).repeat_interleave(per)
        gens = [torch.Generator().manual_seed(1_000_000 + i) for i in range(labels.shape[0])]
        x = self.diffusion.sample(self.ema.module, labels, gens, self.args.img_size,
                                  sampler=self.args.sample_sampler, steps=self.args.sample_steps or None,
                                  guidance_scale=self.args.sample_guidance, null_class=self.args.num_classes,
                                  autocast=lambda: autocast(self.device, self.precision))
        images, masks = model_space_to_images(x)
        path = self.run.file("samples") / f"step_{self.step:07d}.png"
        save_grid(path, images, masks, rows=len(self.class_names))
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        args, run = self.args, self.run
        resumed = self.try_resume()
        if not resumed:
            run.log(f"training {args.arch} ({self.n_params / 1e6:.2f}M parameters) on {len(self.train)} pairs "
                    f"({', '.join(f'{c}: {int((self.train.labels == i).sum())}' for i, c in enumerate(self.class_names))}), "
                    f"{self.total_steps} steps of global batch {self.global_batch} "
                    f"({self.steps_per_epoch} steps/epoch), {args.img_size} px, {self.precision}, "
                    f"{self.device}{f' x {self.dist.world_size} processes' if self.dist.enabled else ''}")
        if self.step >= self.total_steps or (args.budget_minutes and self.budget_clock() >= 60 * args.budget_minutes):
            run.log(f"already trained for {self.step} steps (target {self.total_steps}"
                    f"{f', budget {args.budget_minutes:g} min' if args.budget_minutes else ''}); nothing to do")
            return {"step": self.step, "best_val_loss": self.best_val, "stopped": "complete"}
        from tqdm import tqdm
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.dist.is_main)
        t_start, steps_this_run = time.time(), 0
        q_sum = torch.zeros(4, device=self.device)
        q_cnt = torch.zeros(4, device=self.device)
        acc = torch.zeros(4, device=self.device)  # loss, image, mask, anchor
        acc_n = 0
        t_log = time.time()
        stop_reason = "complete"
        val_every = args.val_every or args.save_every
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        last_good_step = self.step
        while self.step < self.total_steps:
            c0, w0 = time.process_time(), time.perf_counter()
            x0, labels = self.next_batch()
            try:
                loss, parts = self.train_step(x0, labels)
            except torch.cuda.OutOfMemoryError:
                raise UserError(
                    f"CUDA out of memory at step {self.step} (batch {args.batch_size}, {args.img_size} px): lower "
                    "--batch_size, use --precision bf16, add --grad_checkpointing, or shrink the model "
                    "(--model_channels, --transformer_depth, --patch_size 2)") from None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_cpu_s += time.process_time() - c0
            self.train_wall_s += time.perf_counter() - w0
            self.step += 1
            steps_this_run += 1
            bar.update(1)
            self.save_due_snapshots()
            # running statistics on the device: no host synchronisation per step
            nonfinite |= ~torch.isfinite(loss.detach())
            acc += torch.stack([loss.detach().float(), parts["image"], parts["mask"], parts["anchor"]])
            acc_n += 1
            q = parts["quartile"]
            q_sum.index_add_(0, q, parts["per_sample"].float())
            q_cnt.index_add_(0, q, torch.ones_like(parts["per_sample"], dtype=torch.float))

            at_end = self.step >= self.total_steps
            out_of_time = False
            if args.time_limit_minutes and self.step % args.log_every == 0:  # rank 0 decides for all ranks
                out_of_time = broadcast_flag((time.time() - t_start) > 60 * args.time_limit_minutes,
                                             self.dist, self.device)
            chunk_done = bool(args.stop_after_steps) and steps_this_run >= args.stop_after_steps
            budget_done = False
            if args.budget_minutes and (self.step % args.log_every == 0 or self.dist.world_size == 1):
                budget_done = broadcast_flag(self.budget_clock() >= 60 * args.budget_minutes, self.dist, self.device)
                at_end = at_end or budget_done
            checkpoint_now = at_end or out_of_time or chunk_done or self.step % args.save_every == 0
            if self.step % args.log_every == 0 or checkpoint_now:
                if bool(nonfinite):
                    raise UserError(
                        f"loss became NaN/inf between steps {last_good_step} and {self.step}; the last good "
                        f"checkpoint is {run.file('last.pth')} (step {last_good_step}, if one was saved). Try a "
                        "lower --lr, --precision bf16 or fp32 instead of fp16, or a smaller --grad_clip")
                last_good_step = self.step
                acc_all = all_reduce_mean(acc / acc_n, self.dist).tolist()
                dt = time.time() - t_log
                qm = (q_sum / q_cnt.clamp(min=1)).tolist()
                rec = {"step": self.step, "epoch": self.epoch, "loss": acc_all[0], "loss_image": acc_all[1],
                       "loss_mask": acc_all[2], "loss_anchor": acc_all[3],
                       **{f"loss_t_q{i + 1}": qm[i] for i in range(4)},
                       "lr": self.lr_sched.get_last_lr()[0], "s_per_step": dt / acc_n,
                       "img_per_s": acc_n * self.global_batch / dt, "world_size": self.dist.world_size,
                       "time": time.time(), **memory_stats(self.device)}
                run.stats(rec)
                mem = f" mem {rec['mem_gib']:.1f} GiB" if "mem_gib" in rec else ""
                run.log(f"step {self.step}/{self.total_steps} epoch {self.epoch} loss {rec['loss']:.4f} "
                        f"(img {rec['loss_image']:.4f} mask {rec['loss_mask']:.4f} anchor {rec['loss_anchor']:.3f}) "
                        f"lr {rec['lr']:.2e} {rec['s_per_step']:.3f} s/step {rec['img_per_s']:.1f} img/s{mem}")
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                acc.zero_(); q_sum.zero_(); q_cnt.zero_()
                acc_n = 0
                t_log = time.time()
            early = False
            if self.step % val_every == 0 or at_end:
                self.validate_and_keep_best()
                early = broadcast_flag(bool(args.early_stop_patience) and self.bad_vals >= args.early_stop_patience,
                                       self.dist, self.device)
            if self.dist.is_main and args.sample_every and (self.step % args.sample_every == 0 or at_end):
                path = self.save_samples()
                run.log(f"samples: {path}")
            if checkpoint_now:
                self.save_last()
                barrier(self.dist)
            if early:
                stop_reason = f"early stop: validation loss did not improve in {args.early_stop_patience} evaluations"
                self.save_last()
                break
            if budget_done:
                stop_reason = f"complete: training budget of {args.budget_minutes:g} minutes reached"
                break
            if out_of_time or chunk_done:
                stop_reason = "time limit" if out_of_time else "chunk done"
                break
        bar.close()
        if stop_reason.startswith(("complete", "early")):
            run.log(f"finished at step {self.step} ({stop_reason}); best validation loss {self.best_val:.5f}; "
                    f"best model: {run.file('best_model.pth')}")
        else:
            run.log(f"stopped at step {self.step}/{self.total_steps} ({stop_reason}); rerun the same command to "
                    f"continue from {run.file('last.pth')}")
        return {"step": self.step, "best_val_loss": self.best_val, "stopped": stop_reason,
                "parameters": self.n_params}

    def validate_and_keep_best(self) -> None:
        val = self.validate() if self.dist.is_main else math.nan
        if not self.dist.is_main:
            barrier(self.dist)
            return
        self.val_history.append([self.step, val])
        improved = math.isnan(val) or val < self.best_val
        if improved:
            self.best_val = val if not math.isnan(val) else self.best_val
            self.bad_vals = 0
            save_checkpoint(self.run.file("best_model.pth"), self.payload(full=False))
        else:
            self.bad_vals += 1
        self.run.stats({"step": self.step, "val_loss": val, "best_val_loss": self.best_val})
        note = "no val split: keeping the latest EMA weights" if math.isnan(val) else (
            "new best" if improved else f"best {self.best_val:.5f}")
        self.run.log(f"validation (EMA, fixed noise) at step {self.step}: {val:.5f} ({note})")
        barrier(self.dist)
