"""Which candidates make a synthetic dataset (sampling.generation's module docstring says why): the seed of each
candidate, pair ids, the accept rule, how many pairs each class needs (a fixed count or a 50/50 balance of a real
training split), and the rounds of candidates that settle the first N accepted ones, dealt out over processes.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from common.errors import UserError
from data.pairs import LABELS, TUMOUR_LABELS, open_pair_dataset

SEED_STRIDE = 1_000_003          # seeds of consecutive classes never overlap below this many candidates
_ID_RE = re.compile(r"^syn_(benign|malignant|normal)_(\d{6,})$")


# ---------------------------------------------------------------------------- seeds, ids, masks
def sample_seed(base_seed: int, class_index: int, candidate: int) -> int:
    if not 0 <= candidate < SEED_STRIDE:
        raise UserError(f"candidate index {candidate} is outside 0..{SEED_STRIDE - 1} (too many samples per class)")
    return int(base_seed) + SEED_STRIDE * int(class_index) + int(candidate)


def pair_id(label: str, candidate: int) -> str:
    return f"syn_{label}_{candidate:06d}"


def parse_pair_id(stem: str) -> tuple[str, int] | None:
    m = _ID_RE.match(stem)
    return (m.group(1), int(m.group(2))) if m else None


def accept(label: str, area: int) -> tuple[bool, str]:
    """A tumour class needs a lesion; 'normal' needs an empty mask."""
    if label in TUMOUR_LABELS:
        return (area > 0), "empty mask"
    return (area == 0), "lesion in a normal sample"


# ---------------------------------------------------------------------------- how many to draw
def resolve_classes(text_or_list: str | Sequence[str]) -> list[str]:
    classes = [c.strip() for c in text_or_list.split(",")] if isinstance(text_or_list, str) else list(text_or_list)
    classes = [c for c in classes if c]
    bad = [c for c in classes if c not in LABELS]
    if bad or not classes:
        raise UserError(f"--classes: unknown class {', '.join(bad) or '(none given)'} (known: {', '.join(LABELS)})")
    if len(set(classes)) != len(classes):
        raise UserError(f"--classes: a class is listed twice ({','.join(classes)})")
    return classes


def resolve_counts(classes: Sequence[str], num_samples_per_class: int | None, balance_to: str | None,
                   total: int | None, default: int = 1000) -> dict[str, int]:
    """Pairs to generate per class: a fixed count, or what --balance_to (and --total) works out."""
    if balance_to:
        if num_samples_per_class is not None:
            raise UserError("--num_samples_per_class and --balance_to both given: choose one")
        return balance_counts(balance_to, classes, total)
    if total is not None:
        raise UserError("--total scales --balance_to: give --balance_to DATASET as well")
    n = default if num_samples_per_class is None else num_samples_per_class
    return {c: n for c in classes}


def balance_counts(dataset_path: str | Path, classes: Sequence[str], total: int | None = None) -> dict[str, int]:
    """Synthetic pairs per class that make the training split of ``dataset_path`` 50/50 benign/malignant.

    Without ``total`` the minority class is topped up to the majority's count; with it the balanced
    training split (real + synthetic) has ``total`` pairs, ``total / 2`` per class.
    """
    if sorted(classes) != sorted(TUMOUR_LABELS):
        raise UserError(f"--balance_to balances benign and malignant: use --classes benign,malignant "
                        f"(got {','.join(classes)})")
    ds = open_pair_dataset(dataset_path, check_files=False)
    have = {c: len(ds.select(split="train", labels=c)) for c in classes}
    if total is None:
        goal = max(have.values())
    else:
        if total % 2:
            raise UserError(f"--total {total}: must be even (half benign, half malignant)")
        goal = total // 2
        if goal < max(have.values()):
            need = 2 * max(have.values())
            raise UserError(f"--total {total} is impossible: the training split of {dataset_path} already has "
                            f"{have['benign']} benign and {have['malignant']} malignant pairs, so a 50/50 split "
                            f"needs --total >= {need}")
    return {c: goal - have[c] for c in classes}


def plan_class(target: int, status: dict[int, bool], cap: int, overdraw_rate: float = 0.0) -> list[int]:
    """Candidates to draw next so that the first ``target`` accepted ones can be known.

    ``status`` maps decided candidates to accepted (True) / rejected (False). Walks candidates in order,
    counting accepted ones and collecting undecided ones as if each would be accepted, until ``target``
    is reached or ``cap`` candidates were considered; then adds about ``overdraw_rate`` / (1 - rate) more
    undecided ones to expect the rejections. Empty list: the class is complete (or failed, see
    :func:`selection`).
    """
    todo: list[int] = []
    accepted, j = 0, 0
    while accepted + len(todo) < target and j < cap:
        s = status.get(j)
        if s is None:
            todo.append(j)
        elif s:
            accepted += 1
        j += 1
    if todo and overdraw_rate > 0:
        extra = min(len(todo) * 4, math.ceil(len(todo) * min(overdraw_rate, 0.95) / (1.0 - min(overdraw_rate, 0.95))))
        while extra > 0 and j < cap:
            if j not in status:
                todo.append(j)
                extra -= 1
            j += 1
    return todo


def selection(target: int, status: dict[int, bool], cap: int) -> tuple[list[int] | None, int]:
    """(first ``target`` accepted candidates, prefix length) once decided; (None, k) while not.

    Returns (None, -1) if the cap on candidates was reached first (too many rejections)."""
    chosen: list[int] = []
    j = 0
    while len(chosen) < target:
        if j >= cap:
            return None, -1
        s = status.get(j)
        if s is None:
            return None, j
        if s:
            chosen.append(j)
        j += 1
    return chosen, j


def rejection_rate(status: dict[int, bool]) -> float:
    return (sum(1 for v in status.values() if not v) / len(status)) if status else 0.0


def next_round(targets: dict[str, int], statuses: dict[str, dict[int, bool]], caps: dict[str, int],
               overdraw: bool = True) -> list[tuple[str, int]]:
    """All candidates of the next round, class by class in candidate order (the same on every rank)."""
    items: list[tuple[str, int]] = []
    for label, target in targets.items():
        st = statuses[label]
        rate = rejection_rate(st) if overdraw else 0.0
        items += [(label, j) for j in plan_class(target, st, caps[label], rate)]
    return items


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of a round: every ``world_size``-th item starting at ``rank``."""
    return list(items[rank::world_size])
