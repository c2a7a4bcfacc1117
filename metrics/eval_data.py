"""The images evaluate.py measures: a real pair dataset split into reference (train) and held-out (val + test) sets
and a synthetic one, loaded once as arrays."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from common.errors import UserError


def load_sets(real_data: str, synthetic_data: str, seed: int = 0, max_images: int | None = None) -> dict[str, Any]:
    """The real training split (reference), the held-out real images (val + test: the floors' other side) and the
    synthetic pairs, as arrays with their labels, groups and ids; each set capped at ``max_images`` (seeded)."""
    from data.pairs import open_pair_dataset
    real, syn = open_pair_dataset(real_data), open_pair_dataset(synthetic_data)
    if real.img_size != syn.img_size:
        raise UserError(f"image sizes differ: {real_data} is {real.img_size} px, {synthetic_data} is "
                        f"{syn.img_size} px (prepare / generate both at one --img_size)")
    rng = np.random.default_rng(seed)
    cap = (lambda rows: rows if max_images is None or len(rows) <= max_images else
           [rows[i] for i in sorted(rng.choice(len(rows), max_images, replace=False))])
    train = cap(real.select(split="train", source="real"))
    held = cap(real.select(split=("val", "test"), source="real"))
    syn_rows = syn.select(source="synthetic")
    note = None
    if not syn_rows:
        syn_rows = syn.rows
        note = f"{synthetic_data} has no synthetic-source pairs: all {len(syn_rows)} pairs are the synthetic side"
        print(f"note: {note}")
    syn_rows = cap(syn_rows)
    if not train:
        raise UserError(f"{real_data}: no real pairs in the train split (the reference set)")
    if not syn_rows:
        raise UserError(f"{synthetic_data}: no pairs to evaluate")
    t0 = time.time()
    ri, rm = real.load(train + held)
    si, sm = syn.load(syn_rows)
    print(f"loaded {len(train)} real train + {len(held)} held-out + {len(syn_rows)} synthetic pairs at "
          f"{real.img_size} px ({time.time() - t0:.1f} s)")
    return {"real_images": ri, "real_masks": rm, "real_heldout": np.array([False] * len(train) + [True] * len(held)),
            "real_labels": np.array([r["label"] for r in train + held]),
            "real_groups": np.array([r["group"] for r in train + held]), "train_ids": [r["id"] for r in train],
            "real_ids": [r["id"] for r in train + held],
            "syn_images": si, "syn_masks": sm, "syn_labels": np.array([r["label"] for r in syn_rows]),
            "syn_ids": [r["id"] for r in syn_rows], "img_size": real.img_size, "note": note}


def fewer_page_faults() -> None:
    """glibc hands every large tensor back to the OS and faults it in again on the next batch (~10% of the
    Inception time as system time on CPU); keep freed memory in the heap instead. No effect elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def label_counts(labels: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
