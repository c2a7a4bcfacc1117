"""The one training harness both trainers run on (``fit()``): optimiser and learning-rate schedule, gradient
accumulation and clipping, mixed precision, data order, RNG state, resume, best-model keeping, early stop, time /
chunk / budget stops, NaN and out-of-memory hints, the log record, loss.png and optional TensorBoard / W&B.

A trainer subclasses :class:`Harness` and supplies only what is its own: the data (``n_train`` and
``make_batch``), the model, ``compute_loss``, ``validate`` (a score and which direction is better), what goes in
``best_model.pth``, and what happens at the end. The loop, in order, per optimiser step:

  1. ``gradient_accumulation_steps`` micro-batches: indices from one seeded permutation per epoch (every process
     takes its slice of each global batch), ``make_batch`` (augmentation draws from ``self.gen``), the loss under
     autocast, backward of loss / accumulation;
  2. unscale, clip, optimiser and scheduler step, ``after_step`` (e.g. EMA updates);
  3. budget clock, snapshots, validation and best model when due, the log record when due, ``on_interval`` when
     due, ``last.pth`` when due, then the stop rules.

Every random draw comes from generators whose state ``last.pth`` keeps, so an interrupted and resumed CPU run ends
with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch

from common.checkpoint import load_resumable, rng_state, save_checkpoint, set_rng_state
from common.distributed import DistInfo, all_reduce_mean, barrier, broadcast_flag, broadcast_value
from common.errors import UserError
from common.machine import MachineLog, machine_stats
from common.precision import autocast, grad_scaler, memory_stats
from common.progress import progress_bar
from common.tracking import Tracker
from training.schedules import make_lr_schedule


class Harness:
    kind = "model"                 # checkpoint kind
    output_kind = "diffusion-run"  # what common.outputs.claim records for the run folder
    higher_is_better = False       # direction of validate()'s score
    oom_hint = "lower --train_batch_size (or raise --gradient_accumulation_steps), or use --mixed_precision bf16"

    def __init__(self, cfg, config: dict[str, Any], dist: DistInfo, device: torch.device, precision: str,
                 resumable: set[str], renamed: dict[str, str] | None = None, defaults: dict[str, Any] | None = None):
        self.cfg, self.config, self.dist, self.device, self.precision = cfg, config, dist, device, precision
        self.resumable, self.renamed, self.defaults = resumable, renamed or {}, defaults or {}
        self.optim, self.runcfg = cfg.optim, cfg.run
        self.step = self.epoch = self.pos = 0
        self.best = -math.inf if self.higher_is_better else math.inf
        self.best_step = 0
        self.bad_vals = 0
        self.val_history: list[list[float]] = []
        self.train_cpu_s = self.train_wall_s = 0.0
        self.shared_fraction: float | None = None    # budget_fraction's last shared value under DDP
        self.machine = MachineLog()   # load average and matmul speed at every log record, averaged over the run
        self.finished = False
        self.last_val: float | None = None
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(self.runcfg.seed * 1000 + self.gen_salt() + dist.rank)
        self.order_gen = torch.Generator()
        self.order_gen.manual_seed(self.runcfg.seed)
        self.perm: torch.Tensor | None = None

    # ------------------------------------------------------------------ what a trainer provides
    def gen_salt(self) -> int:
        return 0

    def make_batch(self, idx: torch.Tensor):
        raise NotImplementedError

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, {name: scalar tensor}) of one micro-batch, under autocast; no host synchronisation."""
        raise NotImplementedError

    def validate(self) -> float:
        raise NotImplementedError

    def best_payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_extra(self) -> dict[str, Any]:
        return {}

    def load_state_extra(self, ckpt: dict[str, Any]) -> None:
        pass

    def after_step(self) -> None:
        pass

    def record_extra(self, rec: dict[str, Any]) -> dict[str, Any]:
        """More fields for the log record ``rec`` (called at log time; may reset the trainer's running sums)."""
        return {}

    def on_interval(self) -> None:
        pass

    def interval_due(self) -> bool:
        return False

    def val_due(self) -> bool:
        return False

    def checkpoint_due(self) -> bool:
        return self.step % self.runcfg.checkpointing_steps == 0

    def log_due(self) -> bool:
        return self.step % self.runcfg.log_every == 0

    def snapshot_payload(self) -> dict[str, Any] | None:
        return None

    def describe_start(self) -> str:
        return ""

    # ------------------------------------------------------------------ set-up the subclass calls
    def setup_optimisation(self, model: torch.nn.Module, n_train: int) -> None:
        """Optimiser, schedule, scaler and the data order, once the model and the training-set size are known."""
        o, r = self.optim, self.runcfg
        self.model, self.n_train = model, n_train
        self.n_params = sum(p.numel() for p in model.parameters())
        self.micro_batch = o.train_batch_size
        self.global_batch = o.train_batch_size * self.dist.world_size
        per_step = self.global_batch * o.gradient_accumulation_steps
        if n_train < self.global_batch:
            raise UserError(f"{self.cfg.data_dir}: {n_train} training pairs are fewer than one global batch "
                            f"({self.global_batch}); lower --train_batch_size")
        self.steps_per_epoch = max(1, n_train // per_step)
        self.total_steps = r.max_train_steps or r.num_epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, weight_decay=o.weight_decay,
                                           betas=(0.9, 0.999), fused=self.device.type in ("cuda", "cpu"))
        warmup = min(o.lr_warmup_steps, max(1, self.total_steps // 20))
        self.lr_sched = make_lr_schedule(self.optimizer, o.lr_scheduler, warmup, self.total_steps,
                                         self.budget_fraction if r.budget_minutes else None, o.lr_decay_fraction)
        self.scaler = grad_scaler(self.device, self.precision)
        self.perm = torch.randperm(n_train, generator=self.order_gen)
        self.net = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=self.find_unused_parameters())
        if r.compile:
            self.net = torch.compile(self.net)

    def find_unused_parameters(self) -> bool:
        return False

    def budget_fraction(self) -> float:
        """The spent fraction of the time budget, which a decaying learning rate follows. Under DDP every process
        must step at the same rate, but each has its own clock: rank 0's fraction is used, refreshed every
        log_every steps (as the budget's end is) rather than at the cost of a collective every step."""
        spent = self.budget_clock() / (60 * self.runcfg.budget_minutes)
        if not self.dist.enabled:
            return spent
        if self.shared_fraction is None or self.step % self.runcfg.log_every == 0:
            self.shared_fraction = broadcast_value(spent, self.dist, self.device)
        return self.shared_fraction

    def lr_factor_now(self) -> float:
        """The schedule's multiplier of the peak learning rate at the current step and clock."""
        return self.lr_sched.lr_lambdas[0](self.step)

    # ------------------------------------------------------------------ checkpoints
    def budget_clock(self) -> float:
        return self.train_cpu_s if self.runcfg.budget_clock == "cpu" else self.train_wall_s

    def state_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(), "scaler": self.scaler.state_dict(),
            "perm": self.perm, "pos": self.pos, "gen": self.gen.get_state(), "order_gen": self.order_gen.get_state(),
            "rng": rng_state(), "step": self.step, "epoch": self.epoch, "best": self.best, "best_step": self.best_step,
            "bad_vals": self.bad_vals, "val_history": self.val_history, "train_cpu_s": self.train_cpu_s,
            "train_wall_s": self.train_wall_s, "machine": self.machine.state_dict(), "finished": self.finished,
            "config": self.config,
            **self.state_extra()}

    def save_last(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.run.file("last.pth"), self.state_payload())

    def try_resume(self) -> bool:
        path = self.run.file("last.pth")
        ckpt = load_resumable(path, self.kind, self.config, self.resumable, self.runcfg.resume, self.renamed,
                              self.defaults)
        if ckpt is None:
            return False
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise UserError(f"{path}: weights do not fit this model ({str(exc).splitlines()[0]})") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_sched.load_state_dict(ckpt["lr_scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.gen.set_state(ckpt["gen"])
        self.order_gen.set_state(ckpt["order_gen"])
        set_rng_state(ckpt["rng"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        if ckpt.get("perm") is not None:
            self.perm, self.pos = ckpt["perm"], int(ckpt["pos"])
        self.best = float(ckpt.get("best", self.best))
        self.best_step = int(ckpt.get("best_step", 0))
        self.bad_vals = int(ckpt.get("bad_vals", 0))
        self.val_history = [list(v) for v in ckpt.get("val_history", [])]
        self.train_cpu_s = float(ckpt.get("train_cpu_s", 0.0))
        self.train_wall_s = float(ckpt.get("train_wall_s", 0.0))
        self.machine.load_state_dict(ckpt.get("machine", {}))
        self.finished = bool(ckpt.get("finished", False))
        self.load_state_extra(ckpt)
        self.run.log(f"resumed from {path} at step {self.step} (epoch {self.epoch})")
        before = float(ckpt.get("config", {}).get("budget_minutes") or 0.0)
        if self.optim.lr_scheduler != "constant_with_warmup" and before != self.runcfg.budget_minutes:
            self.run.log(f"note: the budget changed from {before:g} to {self.runcfg.budget_minutes:g} minutes "
                         f"(0 = none), and the {self.optim.lr_scheduler} learning rate runs over the run's length: "
                         f"it continues from {self.lr_factor_now():.3f} of its peak")
        return True

    # ------------------------------------------------------------------ one optimiser step
    def next_indices(self) -> torch.Tensor:
        """This process's share of the next global batch. ``epoch`` counts finished passes: it goes up as soon as
        the permutation has no full batch left (a checkpoint taken at an epoch's end says that epoch is done)."""
        if self.pos + self.global_batch > len(self.perm):   # a state saved by an earlier version at an epoch end
            self._new_epoch()
        idx = self.perm[self.pos:self.pos + self.global_batch]
        self.pos += self.global_batch
        if self.pos + self.global_batch > len(self.perm):
            self._new_epoch()
        b = self.micro_batch
        return idx[self.dist.rank * b:(self.dist.rank + 1) * b].to(self.device)

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.perm = torch.randperm(self.n_train, generator=self.order_gen)
        self.pos = 0

    def optimiser_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns the mean loss and parts."""
        accum = self.optim.gradient_accumulation_steps
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, parts_sum = None, {}
        for k in range(accum):
            batch = self.make_batch(self.next_indices())
            sync = k == accum - 1 or not self.dist.enabled
            ctx = self.net.no_sync() if not sync and hasattr(self.net, "no_sync") else contextlib.nullcontext()
            with ctx:
                with autocast(self.device, self.precision):
                    loss, parts = self.compute_loss(batch)
                self.scaler.scale(loss / accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
            for name, v in parts.items():
                parts_sum[name] = v.detach().float() if name not in parts_sum else parts_sum[name] + v.detach().float()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_sched.step()
        self.after_step()
        return total / accum, {k: v / accum for k, v in parts_sum.items()}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        r, run = self.runcfg, self.run
        resumed = self.try_resume()          # refuses before anything is written
        if self.dist.is_main:
            from common.outputs import claim
            claim(run.path, self.output_kind, self.config.get("command", ""))
        run.write_config({**self.config, "resolved_precision": self.precision, "device_resolved": str(self.device),
                          "world_size": self.dist.world_size, "parameters": self.n_params})
        if not resumed:
            run.log(self.describe_start())
        budget_left = lambda: not r.budget_minutes or self.budget_clock() < 60 * r.budget_minutes  # noqa: E731
        if self.step >= self.total_steps or self.finished or not budget_left():
            run.log(f"already trained for {self.step} steps (target {self.total_steps}"
                    f"{f', budget {r.budget_minutes:g} min' if r.budget_minutes else ''}); nothing to do")
            return self.finish("complete", trained=False)
        self.invalidate_results()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc="train", unit="step",
                           disable=not self.dist.is_main)
        self.tracker = Tracker(r.report_to, run.path, self.config, active=self.dist.is_main)
        t_start, steps_this_run, t_log, n_log = time.time(), 0, time.time(), 0
        sums: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        last_good, stop = self.step, "complete"
        while self.step < self.total_steps:
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                loss, parts = self.optimiser_step()
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"CUDA out of memory at step {self.step} (batch {self.optim.train_batch_size}): "
                                f"{self.oom_hint}") from None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_cpu_s += time.process_time() - c0
            self.train_wall_s += time.perf_counter() - w0
            self.step += 1
            steps_this_run += 1
            n_log += 1
            bar.update(1)
            nonfinite |= ~torch.isfinite(loss)
            for name, v in {"loss": loss.float(), **parts}.items():   # running sums on the device: no host sync
                sums[name] = v if name not in sums else sums[name] + v
            self.save_due_snapshots()

            at_end = self.step >= self.total_steps
            out_of_time = budget_done = False
            if r.time_limit_minutes and self.step % r.log_every == 0:
                out_of_time = broadcast_flag(time.time() - t_start > 60 * r.time_limit_minutes, self.dist,
                                             self.device)
            if r.budget_minutes and (self.step % r.log_every == 0 or not self.dist.enabled):
                budget_done = broadcast_flag(not budget_left(), self.dist, self.device)
            chunk_done = bool(r.stop_after_steps) and steps_this_run >= r.stop_after_steps
            chunk_done |= self.chunk_done(steps_this_run)
            last_step = at_end or budget_done
            checkpoint_now = last_step or out_of_time or chunk_done or self.checkpoint_due()
            validated = False
            if self.val_due() or last_step:
                self.validate_and_keep_best()
                validated = True
            if self.log_due() or checkpoint_now or validated and self.log_with_validation():
                if bool(nonfinite):
                    raise UserError(
                        f"loss became NaN/inf between steps {last_good} and {self.step}; the last good checkpoint is "
                        f"{run.file('last.pth')} (step {last_good}, if one was saved). Try a lower --learning_rate, "
                        "--mixed_precision bf16 or fp32 instead of fp16, or a smaller --grad_clip")
                last_good = self.step
                self.log_record(sums, n_log, time.time() - t_log)
                sums, n_log, t_log = {}, 0, time.time()
            early = False
            if validated and r.early_stop_patience:
                early = broadcast_flag(self.bad_vals >= r.early_stop_patience, self.dist, self.device)
            if self.dist.is_main and (self.interval_due() or (last_step and self.interval_enabled())):
                self.on_interval()
            if early:
                self.finished = True
                stop = f"early stop: validation did not improve in {r.early_stop_patience} validations"
            if checkpoint_now or early:
                self.save_last()
                barrier(self.dist)
            if early:
                break
            if budget_done:
                stop = f"complete: training budget of {r.budget_minutes:g} minutes reached"
                break
            if out_of_time or chunk_done:
                stop = "time limit" if out_of_time else "chunk done"
                break
        bar.close()
        self.tracker.close()
        if self.dist.is_main:
            self.write_loss_curves()
        if stop.startswith(("complete", "early")):
            run.log(f"finished at step {self.step} ({stop}); best validation {self.best:.5f} at step "
                    f"{self.best_step}; best model: {run.file('best_model.pth')}")
            return self.finish(stop, trained=True)
        run.log(f"stopped at step {self.step}/{self.total_steps} ({stop}); rerun the same command to continue from "
                f"{run.file('last.pth')}")
        return {"stopped": stop, "step": self.step, "epoch": self.epoch}

    def chunk_done(self, steps_this_run: int) -> bool:
        return False

    def invalidate_results(self) -> None:
        """Called before training goes on: remove results of an earlier finish that the new steps make stale."""

    def interval_enabled(self) -> bool:
        return False

    def log_with_validation(self) -> bool:
        return False

    def finish(self, stopped: str, trained: bool) -> dict[str, Any]:
        return {"stopped": stopped, "step": self.step, "best_val": self.best}

    # ------------------------------------------------------------------ pieces of the loop
    def log_record(self, sums: dict[str, torch.Tensor], n: int, dt: float) -> None:
        names = sorted(sums)
        means = all_reduce_mean(torch.stack([sums[k] for k in names]) / n, self.dist).tolist()
        rec: dict[str, Any] = {"step": self.step, "epoch": self.epoch,
                               **{k if k == "loss" else f"loss_{k}": v for k, v in zip(names, means)},
                               "lr": self.lr_sched.get_last_lr()[0], "s_per_step": dt / n,
                               "img_per_s": n * self.global_batch * self.optim.gradient_accumulation_steps / dt,
                               "world_size": self.dist.world_size, "time": time.time(), **memory_stats(self.device)}
        if self.dist.is_main:   # outside the timed step: neither the budget clock nor s_per_step counts it
            sample = machine_stats(self.device)
            self.machine.add(sample)
            rec.update(sample)
        rec.update(self.record_extra(rec))
        self.run.stats(rec)
        self.tracker.log(rec, self.step)
        self.run.log(self.status_line(rec))

    def status_line(self, rec: dict[str, Any]) -> str:
        parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in rec.items() if k.startswith("loss_") and isinstance(v, float)
                         and not k.startswith("loss_t_q"))
        mem = f" mem {rec['mem_gib']:.1f} GiB" if "mem_gib" in rec else ""
        return (f"step {self.step}/{self.total_steps} epoch {self.epoch} loss {rec['loss']:.4f} ({parts}) lr "
                f"{rec['lr']:.2e} {rec['s_per_step']:.3f} s/step {rec['img_per_s']:.1f} img/s{mem}")

    def validate_and_keep_best(self) -> None:
        score = self.validate() if self.dist.is_main else math.nan
        self.last_val = score
        if not self.dist.is_main:
            barrier(self.dist)
            return
        self.val_history.append([self.step, score])
        better = score > self.best if self.higher_is_better else score < self.best
        improved = better or (math.isnan(score) and self.best_step == 0) or (math.isnan(score) and
                                                                            self.no_val_keeps_latest())
        if improved:
            if not math.isnan(score):
                self.best = score
            self.best_step, self.bad_vals = self.step, 0
            save_checkpoint(self.run.file("best_model.pth"), self.best_payload())
        else:
            self.bad_vals += 1
        self.on_validated(score, improved)
        barrier(self.dist)

    def no_val_keeps_latest(self) -> bool:
        return False

    def on_validated(self, score: float, improved: bool) -> None:
        pass

    def save_due_snapshots(self) -> None:
        """Weights at each snapshot_minutes mark the budget clock has passed: snapshots/min<M>.pth."""
        marks = [m for m in self.runcfg.snapshot_minutes if self.budget_clock() >= 60 * m]
        if not marks or not self.dist.is_main:
            return
        for m in marks:
            path = self.run.file("snapshots") / f"min{m:g}.pth"
            if path.exists():
                continue
            payload = self.snapshot_payload()
            if payload is None:
                return
            save_checkpoint(path, {**payload, "snapshot_minutes": m})
            self.run.log(f"snapshot at {m:g} min of training ({self.runcfg.budget_clock} clock), step {self.step}: "
                         f"{path}")

    def write_loss_curves(self) -> None:
        from common.visual import plot_training_curves
        try:
            plot_training_curves(self.run.file("stats.jsonl"), self.run.file("loss.png"))
        except (OSError, ValueError) as exc:   # a plot must never stop a run
            self.run.log(f"loss.png not written ({exc})")


