"""The training loop of the segmenters (train_segmentation.py is its command line).

Same style as the diffusion trainer: every split is decoded once and held in memory as uint8 tensors (the
training split on the device), augmentation runs on the device (:mod:`training.augment`), one seeded
permutation per epoch from ``order_gen`` and every augmentation draw from ``gen``, both saved in
``last.pth`` with the optimiser, scheduler and RNG states, so an interrupted and resumed CPU run ends with the
same weights as an uninterrupted one. ``last.pth`` is written at the end of every epoch; a rerun of the same
command continues from it (settings other than the run length, hardware and evaluation sets must match).

Model selection: mean Dice over the lesion images of the validation split after each epoch; the best epoch's
weights go to ``best_model.pth``. When training ends, that model is evaluated once on the real test split
(and on each ``--test_data`` set): ``metrics.json`` and ``per_image_<name>.csv``.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.io import sha256_file
from data.pairs import LABELS, TUMOUR_LABELS, PairDataset, open_pair_dataset, read_metadata
from models.segmenters import build_segmenter, count_parameters, segmentation_loss, segmenter_spec
from training.augment import augment
from common.checkpoint import load_checkpoint, load_resumable, rng_state, save_checkpoint, set_rng_state
from common.precision import autocast, grad_scaler, memory_stats
from common.rundir import RunDir
from metrics.seg_eval import RULES, THRESHOLD, evaluate_predictions, mean_lesion_dice, predict, write_per_image_csv

# flags that may change between a run and its resumption (run length, hardware, evaluation, paths)
RESUMABLE_KEYS = {"epochs", "stop_after_epochs", "time_limit_minutes", "device", "config", "resume", "data_dir",
                  "output_dir", "precision", "test_data", "eval_batch_size", "val_every", "early_stop_patience",
                  "seeds", "command"}
KIND = "segmenter"


@dataclass
class SegData:
    """One evaluated or trained set, decoded: uint8 images/masks [N,1,S,S], class indices, names per image."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    label_names: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device) -> "SegData":
        return SegData(self.images.to(device), self.masks.to(device), self.labels.to(device), self.ids,
                       self.label_names, self.sources)


def class_names_for(include_normal: bool) -> list[str]:
    return list(LABELS) if include_normal else list(TUMOUR_LABELS)


def open_training_dataset(data_dir: str | Path) -> PairDataset:
    """Open ``data_dir``; refuse one whose validation or test split holds synthetic pairs."""
    meta = Path(data_dir) / "metadata.csv"
    if meta.is_file():
        rows = read_metadata(meta)
        leaked = [r for r in rows if r.get("source") == "synthetic" and r.get("split") != "train"]
        if leaked:
            r = leaked[0]
            raise UserError(f"{data_dir}: refusing to train on it: {len(leaked)} synthetic pair(s) in its val/test "
                            f"splits (e.g. {r.get('id')} in {r.get('split')}); model selection and the test must use "
                            "real images only -- rebuild it with create_combined_dataset.py")
    return open_pair_dataset(data_dir)


def load_rows(ds: PairDataset, rows: list[dict[str, str]], class_names: list[str]) -> SegData:
    images, masks = ds.load(rows)
    return SegData(torch.from_numpy(images)[:, None], torch.from_numpy(masks)[:, None],
                   torch.tensor([class_names.index(r["label"]) for r in rows], dtype=torch.long),
                   [r["id"] for r in rows], [r["label"] for r in rows], [r["source"] for r in rows])


def load_test_set(path: str | Path, class_names: list[str], img_size: int) -> SegData:
    """An external pair dataset (``--test_data``): every pair of a used class, whatever its split, real only."""
    ds = open_pair_dataset(path)
    if ds.img_size != img_size:
        raise UserError(f"--test_data {path}: images are {ds.img_size} px but the model is trained at {img_size} px; "
                        f"prepare it with prepare_busi_dataset.py --img_size {img_size}")
    syn = ds.select(source="synthetic")
    if syn:
        raise UserError(f"--test_data {path}: holds {len(syn)} synthetic pair(s) (e.g. {syn[0]['id']}); "
                        "test sets must be real images")
    rows = ds.select(labels=class_names)
    if not rows:
        raise UserError(f"--test_data {path}: no pairs of class {', '.join(class_names)}")
    return load_rows(ds, rows, class_names)


def test_set_names(paths: list[str]) -> list[str]:
    """``per_image_<name>.csv`` names for the --test_data sets: the folder name, made unique (never 'test')."""
    names: list[str] = []
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(p).resolve().name) or "external"
        name, k = base, 2
        while name in names or name in ("test", "val"):
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def used_counts(rows: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["label"], {}).setdefault(r["source"], 0)
        out[r["label"]][r["source"]] += 1
    return out


def model_kwargs_from_args(args, num_labels: int, pretrained: bool) -> dict[str, Any]:
    if args.model == "unet":
        return {"num_labels": num_labels, "base_width": args.base_width, "depth": args.depth, "norm": args.norm}
    kw = {"num_labels": num_labels, "encoder_name": args.encoder_name}
    if pretrained:
        kw["encoder_weights"] = args.encoder_weights
        if args.encoder_checkpoint:
            kw["encoder_checkpoint"] = args.encoder_checkpoint
    else:  # resuming or re-evaluating: the weights come from our own checkpoint, never from the internet
        kw["encoder_weights"] = "none"
    return kw


def build_model(args, num_labels: int, pretrained: bool) -> torch.nn.Module:
    from models.madgnet import EncoderWeightsError
    kw = model_kwargs_from_args(args, num_labels, pretrained)
    kw.pop("num_labels")
    try:
        return build_segmenter(args.model, num_labels, **kw)
    except EncoderWeightsError as exc:
        why = type(exc.__cause__).__name__ if exc.__cause__ is not None else "download failed"
        raise UserError(f"could not load ImageNet weights for the {args.encoder_name} encoder through timm ({why}). "
                        f"Offline? Pass --encoder_checkpoint PATH (a local state dict of timm's {args.encoder_name}, "
                        f"saved on a machine with internet by torch.save(timm.create_model('{args.encoder_name}', "
                        "pretrained=True).state_dict(), PATH)), or --encoder_weights none to train from scratch"
                        ) from None
    except FileNotFoundError as exc:
        raise UserError(f"--encoder_checkpoint: {exc}") from None
    except ValueError as exc:
        what = "--encoder_checkpoint" if args.model == "madgnet" and args.encoder_checkpoint else "model configuration"
        raise UserError(f"{what}: {str(exc).splitlines()[0][:300]}") from None


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class SegTrainer:
    def __init__(self, args, config: dict[str, Any], device: torch.device, precision: str,
                 dataset: PairDataset | None = None):
        self.args, self.config, self.device, self.precision = args, config, device, precision
        self.class_names = class_names_for(args.include_normal)
        self.ds = dataset if dataset is not None else open_training_dataset(args.data_dir)
        if self.ds.img_size != args.img_size:
            raise UserError(f"{args.data_dir}: images are {self.ds.img_size} px but --img_size is {args.img_size} "
                            f"(pass --img_size {self.ds.img_size}, or prepare the data with --img_size "
                            f"{args.img_size})")
        self.rows = {sp: self.ds.select(split=sp, labels=self.class_names) for sp in ("train", "val", "test")}
        what = "benign/malignant" + ("/normal" if args.include_normal else "")
        if not self.rows["test"]:
            raise UserError(f"{args.data_dir}: the test split has no {what} pairs; the final evaluation needs a real "
                            "test split (prepare the data with --test_fraction > 0)")
        if not self.rows["val"]:
            raise UserError(f"{args.data_dir}: the validation split has no {what} pairs; model selection needs it "
                            "(prepare the data with --val_fraction > 0)")
        if not any(r["label"] in TUMOUR_LABELS for r in self.rows["val"]):
            raise UserError(f"{args.data_dir}: the validation split has no lesion image to select the model on")
        if len(self.rows["train"]) < args.batch_size:
            raise UserError(f"{args.data_dir}: {len(self.rows['train'])} training pairs are fewer than one batch "
                            f"({args.batch_size}); lower --batch_size")
        self.test_sets = [(name, path, load_test_set(path, self.class_names, args.img_size))
                          for name, path in zip(test_set_names(args.test_data or []), args.test_data or [])]
        self.train = load_rows(self.ds, self.rows["train"], self.class_names).to(device)
        self.val = load_rows(self.ds, self.rows["val"], self.class_names)
        self.test = load_rows(self.ds, self.rows["test"], self.class_names)

        self.resume_ckpt = self._resume_checkpoint(Path(args.output_dir) / "last.pth")
        torch.manual_seed(args.seed)
        self.model = build_model(args, len(self.class_names), pretrained=self.resume_ckpt is None).to(device)
        self.run = RunDir(args.output_dir)  # created only once the inputs and the model are known to be good
        self.spec = segmenter_spec(self.model)
        self.n_params = count_parameters(self.model)
        self.encoder_source = getattr(self.model, "encoder_source", None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           fused=device.type in ("cuda", "cpu"))
        self.steps_per_epoch = len(self.train) // args.batch_size
        self.total_steps = args.epochs * self.steps_per_epoch
        warmup = min(args.warmup_steps, max(1, self.total_steps // 20))
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(self.total_steps, warmup))
        self.scaler = grad_scaler(device, precision)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(args.seed * 1000 + 17)
        self.order_gen = torch.Generator()
        self.order_gen.manual_seed(args.seed)
        self.epoch = 0
        self.step = 0
        self.best_val = -math.inf
        self.best_epoch = 0
        self.bad_vals = 0
        self.train_time = 0.0
        self.epoch_times: list[float] = []
        self.finished = False

    # ------------------------------------------------------------------ checkpoints
    def _resume_checkpoint(self, path: Path) -> dict[str, Any] | None:
        return load_resumable(path, KIND, self.config, RESUMABLE_KEYS, self.args.resume)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        path = self.run.file("last.pth")
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
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best_val, self.best_epoch = float(ckpt["best_val_dice"]), int(ckpt["best_epoch"])
        self.bad_vals = int(ckpt["bad_vals"])
        self.train_time = float(ckpt["train_time_s"])
        self.epoch_times = [float(t) for t in ckpt["epoch_times"]]
        self.finished = bool(ckpt.get("finished", False))
        self.encoder_source = ckpt.get("encoder_source", self.encoder_source)
        self.run.log(f"resumed from {path} at epoch {self.epoch} (step {self.step})")

    def _best_payload(self) -> dict[str, Any]:
        return {"kind": KIND, "model_name": self.spec["name"], "model_kwargs": self.spec["kwargs"],
                "model": self.model.state_dict(), "config": self.config, "class_names": self.class_names,
                "epoch": self.epoch, "best_val_dice": self.best_val, "encoder_source": self.encoder_source,
                "n_parameters": self.n_params}

    def _save_last(self) -> None:
        save_checkpoint(self.run.file("last.pth"), {
            "kind": KIND, "model_name": self.spec["name"], "model_kwargs": self.spec["kwargs"],
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(), "scaler": self.scaler.state_dict(),
            "gen": self.gen.get_state(), "order_gen": self.order_gen.get_state(), "rng": rng_state(),
            "epoch": self.epoch, "step": self.step, "best_val_dice": self.best_val, "best_epoch": self.best_epoch,
            "bad_vals": self.bad_vals, "train_time_s": self.train_time, "epoch_times": self.epoch_times,
            "finished": self.finished, "config": self.config, "class_names": self.class_names,
            "encoder_source": self.encoder_source})

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self) -> dict[str, float]:
        args, data, bs = self.args, self.train, self.args.batch_size
        from tqdm import tqdm
        perm = torch.randperm(len(data), generator=self.order_gen)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        t0 = time.time()
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{args.epochs}", unit="step",
                   leave=False, dynamic_ncols=True)
        for s in bar:
            idx = perm[s * bs:(s + 1) * bs].to(self.device)
            x, m = augment(data.images[idx].float() / 255.0, data.masks[idx].float(), args.augment, self.gen)
            try:
                with autocast(self.device, self.precision):
                    out = self.model(x)
                loss, parts = segmentation_loss(out, m, data.labels[idx], class_weight=args.class_weight)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"CUDA out of memory (batch {bs}, {args.img_size} px): lower --batch_size or use "
                                "--precision bf16") from None
            self.lr_sched.step()
            self.step += 1
            for k, v in parts.items():  # running sums on the device: no host sync per step
                sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v.float()
        bar.close()
        means = {k: float(v) / self.steps_per_epoch for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise UserError(f"loss became NaN/inf in epoch {self.epoch + 1}; the last good state is "
                            f"{self.run.file('last.pth')} (if one was saved). Try a lower --lr or --precision fp32")
        dt = time.time() - t0
        means.update(s_per_epoch=dt, img_per_s=self.steps_per_epoch * bs / dt)
        return means

    def validate(self) -> tuple[float, float | None]:
        prob, cls = predict(self.model, self.val.images, self.args.eval_batch_size, self.device, self.precision)
        dice = mean_lesion_dice(prob > THRESHOLD, self.val.masks[:, 0])
        bacc = None
        if cls is not None:
            tumour = torch.tensor([lab in TUMOUR_LABELS for lab in self.val.label_names])
            if tumour.any():
                from metrics.segmentation import balanced_accuracy
                bacc = balanced_accuracy(self.val.labels[tumour].numpy(), cls.argmax(1)[tumour].numpy(),
                                         len(self.class_names))
        return dice, bacc

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        args, run = self.args, self.run
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
            self.resume_ckpt = None
        else:
            counts = ", ".join(f"{lab} {n}" for lab, n in
                               ((c, sum(1 for r in self.rows['train'] if r['label'] == c)) for c in self.class_names))
            n_syn = sum(1 for r in self.rows["train"] if r["source"] == "synthetic")
            run.log(f"training {args.model} ({self.n_params / 1e6:.2f}M parameters"
                    f"{f', encoder {self.encoder_source}' if self.encoder_source else ''}) on {len(self.train)} pairs "
                    f"({counts}; {n_syn} synthetic), val {len(self.val)}, test {len(self.test)}; {args.epochs} epochs "
                    f"x {self.steps_per_epoch} steps of batch {args.batch_size}, {args.img_size} px, augment "
                    f"{args.augment}, {self.precision}, {self.device}")
        stop = "complete"
        t_run = time.time()
        epochs_this_run = 0
        while self.epoch < args.epochs and not self.finished:
            stats = self.train_epoch()
            self.epoch += 1
            epochs_this_run += 1
            self.train_time += stats["s_per_epoch"]
            self.epoch_times.append(stats["s_per_epoch"])
            val_now = self.epoch % args.val_every == 0 or self.epoch == args.epochs
            val_dice, val_bacc = self.validate() if val_now else (math.nan, None)
            note = ""
            if val_now:
                if val_dice > self.best_val or (math.isnan(val_dice) and self.best_epoch == 0):
                    self.best_val, self.best_epoch, self.bad_vals = val_dice, self.epoch, 0
                    save_checkpoint(run.file("best_model.pth"), self._best_payload())
                    note = " (new best)"
                else:
                    self.bad_vals += 1
                    note = f" (best {self.best_val:.4f} @ {self.best_epoch})"
            if args.early_stop_patience and self.bad_vals >= args.early_stop_patience:
                self.finished = True
                stop = f"early stop: validation Dice did not improve in {args.early_stop_patience} validations"
            loss_parts = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if k not in ("total", "s_per_epoch",
                                                                                         "img_per_s"))
            lr = self.lr_sched.get_last_lr()[0]
            rec = {"epoch": self.epoch, "step": self.step, "loss": stats["total"],
                   **{f"loss_{k}": v for k, v in stats.items() if k not in ("total", "s_per_epoch", "img_per_s")},
                   "lr": lr, "val_dice": None if math.isnan(val_dice) else val_dice, "val_balanced_accuracy": val_bacc,
                   "best_val_dice": self.best_val, "best_epoch": self.best_epoch, "s_per_epoch": stats["s_per_epoch"],
                   "img_per_s": stats["img_per_s"], "time": time.time(), **memory_stats(self.device)}
            run.stats(rec)
            val_txt = f"val Dice {val_dice:.4f}{note}" if val_now else "no validation"
            bacc_txt = f" val bal.acc {val_bacc:.3f}" if val_bacc is not None else ""
            run.log(f"epoch {self.epoch}/{args.epochs} loss {stats['total']:.4f} ({loss_parts}) {val_txt}{bacc_txt} "
                    f"lr {lr:.2e} {stats['s_per_epoch']:.1f} s/epoch {stats['img_per_s']:.1f} img/s")
            if self.epoch % args.save_every == 0 or self.epoch == args.epochs or self.finished:
                self._save_last()
            out_of_time = args.time_limit_minutes and time.time() - t_run > 60 * args.time_limit_minutes
            chunk_done = args.stop_after_epochs and epochs_this_run >= args.stop_after_epochs
            if (out_of_time or chunk_done) and self.epoch < args.epochs and not self.finished:
                self._save_last()
                stop = "time limit" if out_of_time else "chunk done"
                run.log(f"stopped at epoch {self.epoch}/{args.epochs} ({stop}); rerun the same command to continue "
                        f"from {run.file('last.pth')}")
                return {"stopped": stop, "epoch": self.epoch}
        if epochs_this_run == 0:
            run.log(f"already trained ({self.epoch} epochs{', early stop' if self.finished else ''}); "
                    "evaluating best_model.pth")
        else:
            run.log(f"finished at epoch {self.epoch} ({stop}); best validation Dice {self.best_val:.4f} at epoch "
                    f"{self.best_epoch}; best model: {run.file('best_model.pth')}")
        metrics = self.evaluate(stop if epochs_this_run else ("early stop" if self.finished else "complete"))
        return {"stopped": stop, "epoch": self.epoch, "metrics": metrics}

    # ------------------------------------------------------------------ final evaluation
    def _score(self, data: SegData) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        prob, cls = predict(self.model, data.images, self.args.eval_batch_size, self.device, self.precision)
        pred_labels = prob_mal = None
        if cls is not None:
            pred_labels = [self.class_names[i] for i in cls.argmax(1).tolist()]
            prob_mal = cls[:, self.class_names.index("malignant")].tolist()
        return evaluate_predictions((prob > THRESHOLD).numpy(), data.masks[:, 0].numpy(), data.label_names, data.ids,
                                    data.sources, pred_labels, prob_mal, self.class_names)

    def evaluate(self, stopped: str) -> dict[str, Any]:
        run = self.run
        best = load_checkpoint(run.file("best_model.pth"), expect_kind=KIND)
        self.model.load_state_dict(best["model"])
        t0 = time.time()
        val_section, _ = self._score(self.val)
        test_section, test_rows = self._score(self.test)
        write_per_image_csv(run.file("per_image_test.csv"), test_rows)
        external = {}
        for name, path, data in self.test_sets:
            section, rows = self._score(data)
            write_per_image_csv(run.file(f"per_image_{name}.csv"), rows)
            external[name] = {"path": str(Path(path).resolve()), "per_image_csv": f"per_image_{name}.csv", **section}
        grid = self._save_prediction_grid()
        info = self.ds.info
        metrics = {
            "model": self.spec["name"], "model_kwargs": self.spec["kwargs"], "parameters": self.n_params,
            "encoder_source": self.encoder_source, "class_names": self.class_names,
            "include_normal": bool(self.args.include_normal), "img_size": self.args.img_size,
            "augment": self.args.augment, "seed": self.args.seed,
            "epochs": self.args.epochs, "epochs_trained": self.epoch, "stopped": stopped,
            "best_epoch": self.best_epoch, "best_val_dice": self.best_val,
            "training_time_s": self.train_time,
            "s_per_epoch": sum(self.epoch_times) / len(self.epoch_times) if self.epoch_times else None,
            "train_img_per_s": (self.steps_per_epoch * self.args.batch_size * len(self.epoch_times) / self.train_time
                                if self.train_time else None),
            "evaluation_time_s": None,
            "model_selection": "best mean validation Dice over lesion images, checked every --val_every epochs; "
                               "that model is evaluated once on the test split(s)",
            "rules": RULES,
            "dataset": {
                "path": str(Path(self.args.data_dir).resolve()),
                "dataset_json_sha256": self.config["dataset_json_sha256"],
                "command": info.get("command"), "n_pairs": info.get("n_pairs", len(self.ds)),
                "counts": info.get("counts"),
                "used": {sp: used_counts(self.rows[sp]) for sp in ("train", "val", "test")},
                "n_train": len(self.rows["train"]),
                "n_synthetic_train": sum(1 for r in self.rows["train"] if r["source"] == "synthetic"),
                "combined": info.get("combined"),
            },
            "n_test_images": test_section["n_images"],
            "test": test_section, "val": val_section, "test_data": external,
            "command": self.config.get("command"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        metrics["evaluation_time_s"] = time.time() - t0
        run.write_metrics(metrics)
        run.log(summary_line("test", test_section))
        for name, section in external.items():
            run.log(summary_line(name, section))
        run.log(f"metrics: {run.file('metrics.json')}; per image: {run.file('per_image_test.csv')}; "
                f"{grid} (top: ground truth, bottom: prediction)")
        return metrics

    def _save_prediction_grid(self, n: int = 8) -> Path:
        """samples/test_predictions.png: n test images with the ground-truth outline (top) and the prediction's."""
        from common.visual import save_grid
        idx = torch.linspace(0, len(self.test) - 1, min(n, len(self.test))).round().long().unique()
        images = self.test.images[idx]
        prob, _ = predict(self.model, images, self.args.eval_batch_size, self.device, self.precision)
        path = self.run.file("samples") / "test_predictions.png"
        masks = torch.cat([self.test.masks[idx].bool(), (prob > THRESHOLD)[:, None]])
        save_grid(path, torch.cat([images, images]), masks, rows=2)
        return path


def _ms(stat: dict[str, Any], digits: int = 4) -> str:
    if stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f} (median {stat['median']:.{digits}f})"


def summary_line(name: str, section: dict[str, Any]) -> str:
    o = section["overall"]
    text = (f"{name}: {section['n_images']} images ({o['n_lesion']} with a lesion): Dice {_ms(o['dice'])}, "
            f"IoU {_ms(o['iou'])}, HD95 {_ms(o['hd95'], 2)} px")
    if section.get("false_positive_rate_normal") is not None:
        text += f"; false positives on normal images {section['false_positive_rate_normal']:.3f}"
    cls = section.get("classification")
    if cls and cls.get("balanced_accuracy") is not None:
        text += f"; balanced accuracy (benign vs malignant) {cls['balanced_accuracy']:.3f}"
    return text


def dataset_fingerprint(data_dir: str | Path) -> str:
    path = Path(data_dir) / "dataset.json"
    return sha256_file(path) if path.is_file() else ""
