"""Deterministic, leak-free splits: stratified group splitting, official folds, duplicate resolution.

* :func:`assign_splits` — random split stratified by label, with every member of a group (a patient, a set of
  pixel-identical copies) in one split; deterministic given the seed and the input order.
* :func:`fold_splits` — an official cross-validation fold as the test split (BUS-BRA ``kFold``), validation
  drawn by group from the other folds.
* :func:`resolve_duplicates` — pixel-identical images: same label -> one copy kept (or all kept), always one
  group; different labels -> every copy dropped and reported. Near-duplicates (:mod:`data.duplicates`): one
  group, all kept; a near-duplicate set with different labels -> every image of it dropped and reported.
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from common.errors import UserError
from data.pairs import LABELS, SPLITS


def _group_members(n: int, groups: Sequence[Hashable | None]) -> dict[Hashable, list[int]]:
    """Indices per group, groups in order of first appearance; ``None`` = an image on its own."""
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} labels")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(("#single", i) if g is None else g, []).append(i)
    return members


def assign_splits(labels: Sequence[str], groups: Sequence[Hashable | None], val_fraction: float,
                  test_fraction: float, seed: int) -> list[str]:
    """One of ``train``/``val``/``test`` per item.

    Groups are the unit: all members of a group share a split. Each group is filed under its most common
    label, and within each label the groups are shuffled (seeded by ``seed`` and the label, so one label's
    split does not change when another label's images are added or removed) and given, one by one, to the
    split furthest below its target image count (``fraction x images of that label``). So every split holds
    about the requested fraction of every label, within the size of one group.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must each be in [0, 1) "
                        "and leave something for training")
    members = _group_members(len(labels), groups)
    strata: dict[str, list[Hashable]] = {}
    for g, idx in members.items():
        counts = Counter(labels[i] for i in idx)
        top = max(counts.values())
        strata.setdefault(min(lab for lab, c in counts.items() if c == top), []).append(g)
    out = [""] * len(labels)
    for label, gs in sorted(strata.items()):
        rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(label.encode())])
        total = sum(len(members[g]) for g in gs)
        target = {"test": total * test_fraction, "val": total * val_fraction,
                  "train": total * (1 - test_fraction - val_fraction)}
        have = dict.fromkeys(SPLITS, 0)
        for j in rng.permutation(len(gs)):
            idx = members[gs[j]]
            split = max(("test", "val", "train"), key=lambda s: target[s] - have[s])  # ties: test, val, train
            have[split] += len(idx)
            for i in idx:
                out[i] = split
    return out


def fold_splits(labels: Sequence[str], groups: Sequence[Hashable | None], folds: Sequence[int], test_fold: int,
                val_fraction: float, seed: int, draw_groups: Sequence[Hashable | None] | None = None) -> list[str]:
    """Official folds: fold ``test_fold`` is the test split; ``val_fraction`` of all images is drawn as
    validation, by group and stratified, from the other folds. A group that reaches into the test fold
    (e.g. identical images filed in two folds) goes to test whole.

    ``draw_groups`` (default ``groups``): coarser-grained ``groups`` can be given as the finer groups the
    validation draw is made on (e.g. patients, where ``groups`` also joins near-duplicate patients), so that
    joining two groups moves only their own images: each group then takes the first of test, val, train that
    one of its members drew."""
    available = sorted(set(folds))
    if test_fold not in available:
        raise UserError(f"--test_fold {test_fold} is not one of the dataset's folds {available}")
    draw = list(groups) if draw_groups is None else list(draw_groups)
    out = [""] * len(labels)
    rest: list[int] = []
    for idx in _group_members(len(labels), draw).values():
        if any(folds[i] == test_fold for i in idx):
            for i in idx:
                out[i] = "test"
        else:
            rest += idx
    rest.sort()
    if rest:
        rel = min(val_fraction * len(labels) / len(rest), 0.95)
        sub = assign_splits([labels[i] for i in rest], [draw[i] for i in rest], rel, 0.0, seed)
        for i, split in zip(rest, sub):
            out[i] = split
    for idx in _group_members(len(labels), groups).values():
        split = min((out[i] for i in idx), key=("test", "val", "train").index)
        for i in idx:
            out[i] = split
    return out


# ------------------------------------------------------------------------------------------------ duplicates
@dataclass
class Duplicates:
    """Outcome of :func:`resolve_duplicates` (indices refer to the input order)."""

    keep: list[bool]
    groups: list[str]                                  # final group per item (identical copies, near-dups unioned)
    same_label: list[list[int]] = field(default_factory=list)   # clusters of identical same-label copies
    conflicts: list[list[int]] = field(default_factory=list)    # clusters of identical copies, different labels
    near_sets: list[list[int]] = field(default_factory=list)    # near-duplicate sets, one label: one group, all kept
    near_conflicts: list[list[int]] = field(default_factory=list)  # near-duplicate sets, different labels: dropped
    identical_groups: list[str] = field(default_factory=list)   # group per item before near-duplicates were joined

    @property
    def dropped_same_label(self) -> int:
        return sum(1 for cluster in self.same_label for i in cluster if not self.keep[i])


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, x: Hashable) -> Hashable:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, items: Sequence[Hashable]) -> None:
        """Join the sets of ``items``; the smallest root names the joined set (independent of the order)."""
        roots = sorted({self.find(x) for x in items})
        for r in roots[1:]:
            self.parent[r] = roots[0]


def resolve_duplicates(ids: Sequence[str], labels: Sequence[str], hashes: Sequence[str],
                       groups: Sequence[str | None], mode: str = "drop",
                       near_pairs: Sequence[tuple[int, int]] = ()) -> Duplicates:
    """Pixel-identical images (same ``hashes``) always end up in one group (their groups are unioned, e.g.
    two patients' images that are the same file). Same label: ``drop`` keeps the first copy (input order),
    ``keep`` keeps all. Conflicting labels: every copy is dropped (its label cannot be trusted).

    ``near_pairs`` (index pairs, from :func:`data.duplicates.similarity_pairs`) are near-duplicates. A
    near-duplicate set is a connected component of near pairs and identical copies that holds at least two
    different images (two hashes): one label -> its groups are unioned and every image is kept (they are not
    the same pixels); several labels -> every image of the set is dropped (one acquisition with two labels)."""
    if mode not in ("drop", "keep"):
        raise ValueError(f"mode must be drop or keep, got {mode!r}")
    base = [g if g else i for g, i in zip(groups, ids)]
    uf = _UnionFind()
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    keep = [True] * len(ids)
    result = Duplicates(keep, [])
    for cluster in by_hash.values():
        if len(cluster) < 2:
            continue
        uf.union([base[i] for i in cluster])
        if len({labels[i] for i in cluster}) > 1:
            result.conflicts.append(cluster)
            for i in cluster:
                keep[i] = False
        else:
            result.same_label.append(cluster)
            if mode == "drop":
                for i in cluster[1:]:
                    keep[i] = False
    result.identical_groups = [uf.find(b) for b in base]
    if near_pairs:
        sets = _UnionFind()
        for i, j in near_pairs:
            sets.union([i, j])
        for cluster in by_hash.values():
            sets.union(cluster)
        members: dict[Hashable, list[int]] = {}
        for i in range(len(ids)):
            members.setdefault(sets.find(i), []).append(i)
        for cluster in members.values():
            if len({hashes[i] for i in cluster}) < 2:
                continue
            if len({labels[i] for i in cluster}) > 1:
                result.near_conflicts.append(cluster)
                for i in cluster:
                    keep[i] = False
            else:
                result.near_sets.append(cluster)
                uf.union([base[i] for i in cluster])
    result.groups = [uf.find(b) for b in base]
    return result


def split_table(labels: Sequence[str], splits: Sequence[str]) -> str:
    """Pairs per label x split as a small text table (labels with no pairs left out)."""
    counts = Counter(zip(labels, splits))
    present = [lab for lab in LABELS if any(counts[(lab, s)] for s in SPLITS)]
    lines = [f"{'':<10}" + "".join(f"{s:>7}" for s in SPLITS) + f"{'total':>7}"]
    for lab in present:
        row = [counts[(lab, s)] for s in SPLITS]
        lines.append(f"{lab:<10}" + "".join(f"{c:>7}" for c in row) + f"{sum(row):>7}")
    col = [sum(counts[(lab, s)] for lab in present) for s in SPLITS]
    lines.append(f"{'total':<10}" + "".join(f"{c:>7}" for c in col) + f"{sum(col):>7}")
    return "\n".join(lines)
