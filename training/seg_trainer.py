"""The segmenters' trainer (train_segmentation.py is its command line), on :class:`training.harness.Harness`.

What is its own: every split decoded once and held in memory (the training split on the device, augmented there by
:mod:`training.augment`), the segmentation + classification loss, whole-epoch cadence (validation every
``--val_every`` epochs, ``last.pth`` at every epoch end unless ``--checkpointing_steps`` says otherwise), model
selection on mean validation Dice over lesion images, and the final evaluation of the best model on the real test
split (and each ``--test_data`` set): ``per_image_<name>.csv`` first, ``metrics.json`` last. ``--max_train_steps``
fixes the number of optimiser steps whatever the training-set size (equal steps across the arms of a study).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import load_checkpoint, load_resumable
from common.distributed import DistInfo
from common.errors import UserError
from common.io import sha256_file
from common.options import canonical_names, flat
from common.rundir import RunDir
from data.pairs import LABELS, TUMOUR_LABELS, PairDataset, dataset_fingerprint, open_pair_dataset, read_metadata
from metrics.seg_eval import (RULES, THRESHOLD, empty_prediction_warning, evaluate_predictions, mean_lesion_dice,
                              predict, write_per_image_csv)
from models.segmenters import build_segmenter, segmentation_loss, segmenter_spec
from training.augment import augment
from training.config import SEG_RESUMABLE, SegModelConfig, SegTrainConfig
from training.harness import Harness

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


def image_hashes(data: SegData) -> list[str]:
    """sha256 of every image's pixels (uint8, as the model sees them): the same image wherever it is stored."""
    return [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in data.images.cpu()]


def drop_seen(data: SegData, seen: set[str]) -> tuple[SegData, int]:
    """``data`` without the images whose pixels are in ``seen``, and how many were left out."""
    keep = [i for i, h in enumerate(image_hashes(data)) if h not in seen]
    if len(keep) == len(data):
        return data, 0
    idx = torch.tensor(keep, dtype=torch.long)
    return SegData(data.images[idx], data.masks[idx], data.labels[idx], [data.ids[i] for i in keep],
                   [data.label_names[i] for i in keep], [data.sources[i] for i in keep]), len(data) - len(keep)


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


MADGNET_MIN_SIZE = 32   # its encoder's deepest features are at stride 32 (models/madgnet.py)


def check_fits(m: SegModelConfig, img_size: int, data_dir: str | Path) -> None:
    """Refuse (one line, before any compute) a segmenter that the dataset's images are too small for."""
    if m.model == "unet" and 2 ** m.depth > img_size:
        fits = max(1, img_size.bit_length() - 1)
        raise UserError(f"--depth {m.depth}: the U-Net halves the image {m.depth} times, which needs images of at least "
                        f"{2 ** m.depth} px, but {data_dir} is {img_size} px; use --depth {fits} or less")
    if m.model == "madgnet" and img_size < MADGNET_MIN_SIZE:
        raise UserError(f"--model madgnet needs images of at least {MADGNET_MIN_SIZE} px (its encoder works at stride "
                        f"32), but {data_dir} is {img_size} px; use --model unet or prepare the data larger")


def segmenter_kwargs(m: SegModelConfig, num_labels: int, pretrained: bool) -> dict[str, Any]:
    """Constructor kwargs of the configured segmenter. ``pretrained=False`` (resuming, re-evaluating): the encoder's
    weights come from our own checkpoint, never from the internet."""
    if m.model == "unet":
        return {"num_labels": num_labels, "base_width": m.base_width, "depth": m.depth, "norm": m.norm}
    kw = {"num_labels": num_labels, "encoder_name": m.encoder_name}
    if pretrained:
        kw["encoder_weights"] = m.encoder_weights
        if m.encoder_checkpoint:
            kw["encoder_checkpoint"] = m.encoder_checkpoint
    else:
        kw["encoder_weights"] = "none"
    return kw


def build_model(m: SegModelConfig, num_labels: int, pretrained: bool) -> torch.nn.Module:
    from models.madgnet import EncoderWeightsError
    kw = segmenter_kwargs(m, num_labels, pretrained)
    kw.pop("num_labels")
    try:
        return build_segmenter(m.model, num_labels, **kw)
    except EncoderWeightsError as exc:
        why = type(exc.__cause__).__name__ if exc.__cause__ is not None else "download failed"
        raise UserError(f"could not load ImageNet weights for the {m.encoder_name} encoder through timm ({why}). "
                        f"Offline? Pass --encoder_checkpoint PATH (a local state dict of timm's {m.encoder_name}, "
                        f"saved on a machine with internet by torch.save(timm.create_model('{m.encoder_name}', "
                        "pretrained=True).state_dict(), PATH)), or --encoder_weights none to train from scratch"
                        ) from None
    except FileNotFoundError as exc:
        raise UserError(f"--encoder_checkpoint: {exc}") from None
    except ValueError as exc:
        what = "--encoder_checkpoint" if m.model == "madgnet" and m.encoder_checkpoint else "model configuration"
        raise UserError(f"{what}: {str(exc).splitlines()[0][:600]}") from None


class SegTrainer(Harness):
    kind = KIND
    output_kind = "segmentation-run"
    higher_is_better = True
    oom_hint = "lower --train_batch_size (or raise --gradient_accumulation_steps) or use --mixed_precision bf16"

    def __init__(self, cfg: SegTrainConfig, device: torch.device, precision: str, dataset: PairDataset | None = None,
                 command: str = ""):
        self.ds = dataset if dataset is not None else open_training_dataset(cfg.data_dir)
        if cfg.img_size and cfg.img_size != self.ds.img_size:
            raise UserError(f"{cfg.data_dir}: images are {self.ds.img_size} px but --img_size is {cfg.img_size} "
                            f"(leave --img_size out, or prepare the data with --img_size {cfg.img_size})")
        cfg.img_size = self.ds.img_size
        check_fits(cfg.model, cfg.img_size, cfg.data_dir)
        config = {**flat(cfg), "command": command, "dataset_json_sha256": dataset_json_sha256(cfg.data_dir),
                  "dataset_fingerprint": dataset_fingerprint(cfg.data_dir)}
        super().__init__(cfg, config, DistInfo(), device, precision, SEG_RESUMABLE | {"command", "seeds", "config"},
                         renamed=canonical_names(SegTrainConfig),
                         defaults={**flat(SegTrainConfig()), "dataset_fingerprint": config["dataset_fingerprint"]})
        self.class_names = class_names_for(cfg.include_normal)
        self.rows = {sp: self.ds.select(split=sp, labels=self.class_names) for sp in ("train", "val", "test")}
        what = "benign/malignant" + ("/normal" if cfg.include_normal else "")
        if not self.rows["test"]:
            raise UserError(f"{cfg.data_dir}: the test split has no {what} pairs; the final evaluation needs a real "
                            "test split (prepare the data with --test_fraction > 0)")
        if not self.rows["val"]:
            raise UserError(f"{cfg.data_dir}: the validation split has no {what} pairs; model selection needs it "
                            "(prepare the data with --val_fraction > 0)")
        if not any(r["label"] in TUMOUR_LABELS for r in self.rows["val"]):
            raise UserError(f"{cfg.data_dir}: the validation split has no lesion image to select the model on")
        train = load_rows(self.ds, self.rows["train"], self.class_names)
        self.val = load_rows(self.ds, self.rows["val"], self.class_names)
        self.test = load_rows(self.ds, self.rows["test"], self.class_names)
        # an external test set must not hold the images this model trains or is selected on (by pixels, wherever
        # they are stored and whatever they are called): those are left out, loudly, and counted in metrics.json
        seen = set(image_hashes(train)) | set(image_hashes(self.val))
        self.test_sets, self.test_overlap = [], {}
        for name, path in zip(test_set_names(cfg.test_data), cfg.test_data):
            data, dropped = drop_seen(load_test_set(path, self.class_names, cfg.img_size), seen)
            if dropped and not len(data):
                raise UserError(f"--test_data {path}: all {dropped} of its images are training or validation images "
                                f"of this segmenter (same pixels as in {cfg.data_dir}); an external test needs other "
                                "images")
            if dropped:
                self.test_overlap[name] = dropped
                print(f"warning: --test_data {path}: {dropped} of its {dropped + len(data)} images are training or "
                      f"validation images of this segmenter (same pixels as in {cfg.data_dir}); they are left out of "
                      f"its external test ({len(data)} images remain)", file=sys.stderr, flush=True)
            self.test_sets.append((name, path, data))
        self.train = train.to(device)
        self.run = RunDir(cfg.run.output_dir)
        last = self.run.file("last.pth")
        resuming = load_resumable(last, KIND, self.config, self.resumable, cfg.run.resume, self.renamed,
                                  self.defaults) is not None
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, len(self.class_names), pretrained=not resuming).to(device)
        self.spec = segmenter_spec(model)
        self.encoder_source = getattr(model, "encoder_source", None)
        self.setup_optimisation(model, len(self.train))
        self.last_bacc: float | None = None

    def gen_salt(self) -> int:
        return 17

    def describe_start(self) -> str:
        c = self.cfg
        counts = ", ".join(f"{lab} {sum(1 for r in self.rows['train'] if r['label'] == lab)}" for lab in self.class_names)
        n_syn = sum(1 for r in self.rows["train"] if r["source"] == "synthetic")
        return (f"training {c.model.model} ({self.n_params / 1e6:.2f}M parameters"
                f"{f', encoder {self.encoder_source}' if self.encoder_source else ''}) on {len(self.train)} pairs "
                f"({counts}; {n_syn} synthetic), val {len(self.val)}, test {len(self.test)}; {self.total_steps} steps "
                f"({self.total_steps / self.steps_per_epoch:g} epochs of {self.steps_per_epoch}) of batch "
                f"{c.optim.train_batch_size}, {c.img_size} px, augment {c.augment}, {self.precision}, {self.device}")

    # ------------------------------------------------------------------ one step
    def make_batch(self, idx: torch.Tensor):
        return augment(self.train.images[idx].float() / 255.0, self.train.masks[idx].float(), self.cfg.augment,
                       self.gen) + (self.train.labels[idx],)

    def compute_loss(self, batch):
        x, m, labels = batch
        out = self.net(x)
        loss, parts = segmentation_loss(out, m, labels, class_weight=self.cfg.optim.class_weight)
        parts.pop("total", None)
        return loss, parts

    # ------------------------------------------------------------------ cadence: whole epochs
    def epochs_done(self) -> int:
        return self.step // self.steps_per_epoch

    def at_epoch_end(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def val_due(self) -> bool:
        return self.at_epoch_end() and self.epochs_done() % self.cfg.run.val_every == 0

    def log_due(self) -> bool:
        return self.at_epoch_end()

    def log_with_validation(self) -> bool:
        return True

    def checkpoint_due(self) -> bool:
        n = self.cfg.run.checkpointing_steps
        return self.step % n == 0 if n else self.at_epoch_end()

    def chunk_done(self, steps_this_run: int) -> bool:
        e = self.cfg.run.stop_after_epochs
        return bool(e) and self.at_epoch_end() and steps_this_run >= e * self.steps_per_epoch

    def invalidate_results(self) -> None:
        """Before training goes on, remove the results of an earlier finish: they would describe another model."""
        for p in [self.run.file("metrics.json"), self.run.file("samples") / "test_predictions.png",
                  *self.run.path.glob("per_image_*.csv")]:
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ validation, records, checkpoints
    def validate(self) -> float:
        prob, cls = predict(self.model, self.val.images, self.cfg.run.eval_batch_size, self.device, self.precision)
        dice = mean_lesion_dice(prob > THRESHOLD, self.val.masks[:, 0])
        self.last_bacc = None
        if cls is not None:
            tumour = torch.tensor([lab in TUMOUR_LABELS for lab in self.val.label_names])
            if tumour.any():
                from metrics.segmentation import balanced_accuracy
                self.last_bacc = balanced_accuracy(self.val.labels[tumour].numpy(), cls.argmax(1)[tumour].numpy(),
                                                   len(self.class_names))
        self.validated_at = self.step
        return dice

    def record_extra(self, rec: dict[str, Any]) -> dict[str, Any]:
        fresh = getattr(self, "validated_at", -1) == self.step
        return {"epoch": self.epochs_done(), "s_per_epoch": rec["s_per_step"] * self.steps_per_epoch, "val_dice": self.last_val if fresh else None,
                "val_balanced_accuracy": self.last_bacc if fresh else None, "best_val_dice": self.best,
                "best_epoch": self.best_step // self.steps_per_epoch}

    def status_line(self, rec: dict[str, Any]) -> str:
        parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in rec.items() if k.startswith("loss_") and isinstance(v, float))
        if rec["val_dice"] is not None:
            note = " (new best)" if self.best_step == self.step else \
                f" (best {self.best:.4f} @ {self.best_step // self.steps_per_epoch})"
            val = f"val Dice {rec['val_dice']:.4f}{note}"
        else:
            val = "no validation"
        bacc = f" val bal.acc {rec['val_balanced_accuracy']:.3f}" if rec["val_balanced_accuracy"] is not None else ""
        return (f"epoch {rec['epoch']}/{self.total_steps / self.steps_per_epoch:g} loss {rec['loss']:.4f} ({parts}) "
                f"{val}{bacc} lr {rec['lr']:.2e} {rec['s_per_epoch']:.1f} s/epoch {rec['img_per_s']:.1f} img/s")

    def best_payload(self) -> dict[str, Any]:
        return {"kind": KIND, "model_name": self.spec["name"], "model_kwargs": self.spec["kwargs"],
                "model": self.model.state_dict(), "config": self.config, "class_names": self.class_names,
                "epoch": self.epochs_done(), "step": self.step, "best_val_dice": self.best,
                "encoder_source": self.encoder_source, "n_parameters": self.n_params}

    def state_extra(self) -> dict[str, Any]:
        return {"model_name": self.spec["name"], "model_kwargs": self.spec["kwargs"], "class_names": self.class_names,
                "encoder_source": self.encoder_source}

    def load_state_extra(self, ckpt: dict[str, Any]) -> None:
        self.encoder_source = ckpt.get("encoder_source", self.encoder_source)

    # ------------------------------------------------------------------ final evaluation
    def finish(self, stopped: str, trained: bool) -> dict[str, Any]:
        if not trained:
            self.run.log(f"already trained ({self.epochs_done()} epochs{', early stop' if self.finished else ''}); "
                         "evaluating best_model.pth")
        metrics = self.evaluate(stopped)
        return {"stopped": stopped, "epoch": self.epochs_done(), "metrics": metrics}

    def _score(self, data: SegData) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        prob, cls = predict(self.model, data.images, self.cfg.run.eval_batch_size, self.device, self.precision)
        pred_labels = prob_mal = None
        if cls is not None:
            pred_labels = [self.class_names[i] for i in cls.argmax(1).tolist()]
            prob_mal = cls[:, self.class_names.index("malignant")].tolist()
        return evaluate_predictions((prob > THRESHOLD).numpy(), data.masks[:, 0].numpy(), data.label_names, data.ids,
                                    data.sources, pred_labels, prob_mal, self.class_names)

    def evaluate(self, stopped: str) -> dict[str, Any]:
        run, c = self.run, self.cfg
        best = load_checkpoint(run.file("best_model.pth"), expect_kind=KIND)
        self.model.load_state_dict(best["model"])
        t0 = time.time()
        val_section, _ = self._score(self.val)
        test_section, test_rows = self._score(self.test)
        external = {}
        ext_rows = {}
        for name, path, data in self.test_sets:
            section, rows = self._score(data)
            ext_rows[name] = rows
            external[name] = {"path": str(Path(path).resolve()), "per_image_csv": f"per_image_{name}.csv",
                              "overlap_dropped": self.test_overlap.get(name, 0),
                              "overlap_rule": "images pixel-identical to a training or validation image of this "
                                              "segmenter are left out", **section}
        grid = self._save_prediction_grid()
        info = self.ds.info
        epochs = self.epochs_done()
        metrics = {
            "model": self.spec["name"], "model_kwargs": self.spec["kwargs"], "parameters": self.n_params,
            "encoder_source": self.encoder_source, "class_names": self.class_names,
            "include_normal": bool(c.include_normal), "img_size": c.img_size, "augment": c.augment,
            "seed": c.run.seed, "epochs": round(self.total_steps / self.steps_per_epoch, 3), "epochs_trained": epochs,
            "steps": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "stopped": stopped, "best_epoch": self.best_step // self.steps_per_epoch, "best_step": self.best_step,
            "best_val_dice": self.best, "training_time_s": self.train_wall_s,
            "s_per_epoch": self.train_wall_s / epochs if epochs else None,
            "train_img_per_s": (self.step * self.global_batch * c.optim.gradient_accumulation_steps / self.train_wall_s
                                if self.train_wall_s else None),
            "evaluation_time_s": None,
            "model_selection": "best mean validation Dice over lesion images, checked every --val_every epochs; "
                               "that model is evaluated once on the test split(s)",
            "rules": RULES,
            "dataset": {
                "path": str(Path(c.data_dir).resolve()),
                "dataset_json_sha256": self.config["dataset_json_sha256"],
                "dataset_fingerprint": self.config["dataset_fingerprint"],
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
        metrics["warnings"] = [w for w in [empty_prediction_warning(test_rows, "this run, on the test split,")] +
                               [empty_prediction_warning(rows, f"this run, on --test_data {name},")
                                for name, rows in ext_rows.items()] if w]
        # the per-image tables first, metrics.json last: a folder with metrics.json is a finished run
        write_per_image_csv(run.file("per_image_test.csv"), test_rows)
        for name, rows in ext_rows.items():
            write_per_image_csv(run.file(f"per_image_{name}.csv"), rows)
        run.write_metrics(metrics)
        run.log(summary_line("test", test_section))
        for name, section in external.items():
            run.log(summary_line(name, section))
            if section["overlap_dropped"]:
                run.log(f"warning: {name}: {section['overlap_dropped']} image(s) left out, being training or "
                        "validation images of this segmenter")
        run.log(f"metrics: {run.file('metrics.json')}; per image: {run.file('per_image_test.csv')}; "
                f"{grid} (top: ground truth, bottom: prediction)")
        for warning in metrics["warnings"]:   # loud, and last, so it is not lost above the summary lines
            for line in ("!" * 80, warning, "!" * 80):
                run.log(line)
        return metrics

    def _save_prediction_grid(self, n: int = 8) -> Path:
        """samples/test_predictions.png: n test images with the ground-truth outline (top) and the prediction's."""
        from common.visual import save_grid
        idx = torch.linspace(0, len(self.test) - 1, min(n, len(self.test))).round().long().unique()
        images = self.test.images[idx]
        prob, _ = predict(self.model, images, self.cfg.run.eval_batch_size, self.device, self.precision)
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


def dataset_json_sha256(data_dir: str | Path) -> str:
    path = Path(data_dir) / "dataset.json"
    return sha256_file(path) if path.is_file() else ""
