"""Starting segmentation runs (one per seed) and ``--dry-run`` for train_segmentation.py."""
from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any, Sequence

import torch

from common.errors import UserError
from common.options import flat
from common.outputs import OutputLock, check_kind, check_separate, check_writable
from common.precision import resolve_device, resolve_precision
from training.config import SegTrainConfig
from training.seg_trainer import SegTrainer, check_fits, class_names_for, open_training_dataset


def _one_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("train_segmentation.py runs as one process (a segmenter trains in minutes on one GPU); "
                        "start it with python, not torchrun")


def train_seeds(cfg: SegTrainConfig, seeds: Sequence[int], out_dirs: Sequence[str], command: str
                ) -> list[dict[str, Any]]:
    _one_process()
    dataset = open_training_dataset(cfg.data_dir)   # validates; refuses synthetic pairs in val/test
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.mixed_precision, device)
    results = []
    for k, (seed, out) in enumerate(zip(seeds, out_dirs)):
        if len(seeds) > 1:
            print(f"=== seed {seed} ({k + 1}/{len(seeds)}) -> {out}", flush=True)
        c = copy.deepcopy(cfg)
        c.run.seed, c.run.output_dir = seed, out
        check_separate(out, {"--data_dir": cfg.data_dir, **{f"--test_data {t}": t for t in cfg.test_data}})
        check_writable(out)
        check_kind(out, "segmentation-run")
        with OutputLock(out):
            result = SegTrainer(c, device, precision, dataset, command).fit()
        result["output_dir"] = out
        results.append(result)
    return results


def dry_run(cfg: SegTrainConfig, command: str) -> int:
    _one_process()
    ds = open_training_dataset(cfg.data_dir)
    if cfg.img_size and cfg.img_size != ds.img_size:
        raise UserError(f"{cfg.data_dir}: images are {ds.img_size} px but --img_size is {cfg.img_size}")
    check_fits(cfg.model, ds.img_size, cfg.data_dir)
    names = class_names_for(cfg.include_normal)
    rows = {sp: ds.select(split=sp, labels=names) for sp in ("train", "val", "test")}
    for sp in ("val", "test"):
        if not rows[sp]:
            raise UserError(f"{cfg.data_dir}: the {sp} split has no {'/'.join(names)} pairs")
    if len(rows["train"]) < cfg.optim.train_batch_size:
        raise UserError(f"{cfg.data_dir}: {len(rows['train'])} training pairs are fewer than one batch")
    device = resolve_device(cfg.run.device)
    per_step = cfg.optim.train_batch_size * cfg.optim.gradient_accumulation_steps
    spe = max(1, len(rows["train"]) // per_step)
    total = cfg.run.max_train_steps or cfg.run.num_epochs * spe
    plan = {"dataset": cfg.data_dir, "img_size": ds.img_size, "train_pairs": len(rows["train"]),
            "synthetic_train_pairs": sum(1 for r in rows["train"] if r["source"] == "synthetic"),
            "val_pairs": len(rows["val"]), "test_pairs": len(rows["test"]), "steps_per_epoch": spe,
            "total_steps": total, "epochs": round(total / spe, 2), "device": str(device),
            "precision": resolve_precision(cfg.run.mixed_precision, device), "threads": torch.get_num_threads()}
    print(json.dumps({"config": flat(cfg), "command": command, "plan": plan}, indent=2, sort_keys=True))
    print(f"dry run: inputs checked; {total} steps ({plan['epochs']:g} epochs of {spe}) on {device}", file=sys.stderr)
    return 0
