"""A low-data regime from a prepared pair dataset: a fraction of the training groups (patients, or identical-image
groups), stratified by label, with the validation and test splits kept exactly as they are.

Used by the evidence study (``bench/evidence.py``) to ask whether synthetic pairs matter more when real data is
scarce: the generator is retrained on the same subset, and every arm of that regime tests on the same real test
split as the full-data arms.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import UserError
from data.pairs import PairDataset, PairDatasetWriter, dataset_fingerprint, open_pair_dataset


def training_subset_rows(ds: PairDataset, fraction: float, seed: int) -> list[dict[str, str]]:
    """The kept training rows: per label, round(fraction x groups) of its groups (a group counts under the label of
    its first training row), chosen by a seeded permutation; at least one group per label that has any."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"training fraction must be in (0, 1], got {fraction}")
    train = ds.select(split="train")
    groups: dict[str, list[dict[str, str]]] = {}
    for r in train:
        groups.setdefault(r.get("group") or r["id"], []).append(r)
    by_label: dict[str, list[str]] = {}
    for g, rows in groups.items():
        by_label.setdefault(rows[0]["label"], []).append(g)
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for label in sorted(by_label):
        names = sorted(by_label[label])
        k = max(1, int(round(fraction * len(names))))
        keep.update(names[i] for i in rng.permutation(len(names))[:k])
    return [r for r in train if (r.get("group") or r["id"]) in keep]


def write_subset(source: str | Path, output_dir: str | Path, fraction: float, seed: int = 0,
                 command: str = "") -> PairDataset:
    """Write the subset dataset (hard links to the source's PNGs); returns it, opened."""
    ds = open_pair_dataset(source)
    kept = training_subset_rows(ds, fraction, seed)
    held = ds.select(split=["val", "test"])
    with PairDatasetWriter(output_dir, ds.img_size, {"--source": source}) as w:
        for r in kept + held:
            extra = {k: v for k, v in r.items() if k not in ("id", "label", "split", "source", "group")}
            w.add_files(r["id"], ds.image_path(r["id"]), ds.mask_path(r["id"]), link=True, label=r["label"],
                        split=r["split"], source=r["source"], group=r.get("group") or r["id"], **extra)
        counts = {lab: sum(1 for r in kept if r["label"] == lab) for lab in sorted({r["label"] for r in kept})}
        return w.commit(command, {"subset": {"source": str(Path(source).resolve()),
                                             "source_fingerprint": dataset_fingerprint(source),
                                             "fraction": fraction, "seed": seed, "n_train": len(kept),
                                             "n_train_source": len(ds.select(split="train")),
                                             "train_counts": counts,
                                             "rule": "a fraction of the training groups per label (seeded); "
                                                     "validation and test kept unchanged"}})
