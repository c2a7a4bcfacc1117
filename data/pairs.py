"""The pair dataset: the one on-disk format every phase reads and writes (real, synthetic, combined).

Layout (docs/architecture.md, "The pair dataset")::

    <dir>/images/<id>.png    8-bit grayscale, img_size x img_size
    <dir>/masks/<id>.png     8-bit, values 0 or 255, same size
    <dir>/metadata.csv       one row per pair: id,label,split,source,group + provenance columns
    <dir>/dataset.json       img_size, counts per label x split x source, command, format version

``dataset.json`` is written last: a folder without it is not a (complete) pair dataset. Writers build the
dataset in a hidden staging folder beside the output and rename it into place when complete
(:class:`PairDatasetWriter`); generation, which resumes in place, writes each PNG atomically and the
index at the end (:func:`write_index`).
"""
from __future__ import annotations

import csv
import hashlib
import datetime as _dt
import io
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from common.errors import UserError
from common.outputs import OutputLock, check_separate, check_writable, clean_stale, remove_tree
from common.io import atomic_write_json, atomic_write_text, read_png_gray, write_png

FORMAT_VERSION = 1
LABELS = ("benign", "malignant", "normal")
TUMOUR_LABELS = ("benign", "malignant")
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}
SPLITS = ("train", "val", "test")
SOURCES = ("real", "synthetic")
BASE_COLUMNS = ("id", "label", "split", "source", "group")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class DatasetError(UserError):
    """A pair dataset (or a file in it) breaks the format; the message names the file and the rule."""


def count_table(rows: Iterable[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Counts per label x split x source (every combination present, zeros included)."""
    table = {lab: {sp: {so: 0 for so in SOURCES} for sp in SPLITS} for lab in LABELS}
    for row in rows:
        table[row["label"]][row["split"]][row["source"]] += 1
    return table


def check_id(pair_id: str) -> str:
    if not _ID_RE.match(pair_id or ""):
        raise DatasetError(f"pair id {pair_id!r}: ids may use letters, digits, '_', '-', '.' and must not start "
                           "with a symbol")
    return pair_id


@dataclass
class PairDataset:
    """A validated pair dataset opened from disk. ``rows`` are metadata.csv rows (dicts of strings)."""

    root: Path
    info: dict[str, Any]
    rows: list[dict[str, str]]
    _by_id: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {row["id"]: row for row in self.rows}

    # ---------------------------------------------------------------- access
    @property
    def img_size(self) -> int:
        return int(self.info["img_size"])

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, pair_id: str) -> dict[str, str]:
        return self._by_id[pair_id]

    def image_path(self, pair_id: str) -> Path:
        return self.root / "images" / f"{pair_id}.png"

    def mask_path(self, pair_id: str) -> Path:
        return self.root / "masks" / f"{pair_id}.png"

    def select(self, split: str | Sequence[str] | None = None, labels: str | Sequence[str] | None = None,
               source: str | Sequence[str] | None = None) -> list[dict[str, str]]:
        """Rows filtered by split / label / source (each a name or a list of names; None = any)."""
        def norm(v):
            return None if v is None else ({v} if isinstance(v, str) else set(v))
        sp, lab, so = norm(split), norm(labels), norm(source)
        return [r for r in self.rows
                if (sp is None or r["split"] in sp) and (lab is None or r["label"] in lab)
                and (so is None or r["source"] in so)]

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        return count_table(self.rows)

    # ---------------------------------------------------------------- pixels
    def load(self, rows: Sequence[dict[str, str]] | None = None, workers: int = 4
             ) -> tuple[np.ndarray, np.ndarray]:
        """Decode ``rows`` (default: all) into ``images`` uint8 [N,S,S] and ``masks`` uint8 [N,S,S] in {0,1}.

        Every file is checked: 8-bit single channel, img_size x img_size, mask values only 0 and 255.
        """
        rows = self.rows if rows is None else list(rows)
        size = self.img_size
        images = np.empty((len(rows), size, size), np.uint8)
        masks = np.empty((len(rows), size, size), np.uint8)

        def one(i: int) -> None:
            pair_id = rows[i]["id"]
            for kind, path, out in (("image", self.image_path(pair_id), images),
                                    ("mask", self.mask_path(pair_id), masks)):
                try:
                    arr = read_png_gray(path)
                except OSError as exc:
                    raise DatasetError(f"{path}: {exc}") from None
                if arr.shape != (size, size):
                    raise DatasetError(f"{path}: {kind} is {arr.shape[1]}x{arr.shape[0]} but dataset.json says "
                                       f"img_size {size}")
                if kind == "mask":
                    if not np.isin(arr, (0, 255)).all():
                        raise DatasetError(f"{path}: mask values must be 0 or 255, found {np.unique(arr)[:6]}")
                    arr = (arr > 0).astype(np.uint8)
                out[i] = arr

        if rows:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                list(pool.map(one, range(len(rows))))
        return images, masks

    def load_one(self, pair_id: str) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self.load([self.row(pair_id)], workers=1)
        return images[0], masks[0]


def open_pair_dataset(path: str | Path, check_files: bool = True) -> PairDataset:
    """Open and validate a pair dataset; raise :class:`DatasetError` naming the file and the problem."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: pair dataset folder not found")
    info_path, meta_path = root / "dataset.json", root / "metadata.csv"
    if not info_path.is_file():
        hint = " (an unfinished or interrupted run? rerun the command that makes it)" if meta_path.exists() or (
            root / "images").is_dir() else " (make one with prepare_busi_dataset.py)"
        raise DatasetError(f"{root}: not a pair dataset: dataset.json is missing{hint}")
    import json
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{info_path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or "img_size" not in info or "format_version" not in info:
        raise DatasetError(f"{info_path}: must be an object with at least 'img_size' and 'format_version'")
    if info["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{info_path}: format_version {info['format_version']} is not supported "
                           f"(this code reads version {FORMAT_VERSION})")
    if not isinstance(info["img_size"], int) or info["img_size"] <= 0:
        raise DatasetError(f"{info_path}: img_size must be a positive integer, got {info['img_size']!r}")
    if not meta_path.is_file():
        raise DatasetError(f"{root}: not a pair dataset: metadata.csv is missing")
    rows = read_metadata(meta_path)
    validate_rows(rows, meta_path)
    if "counts" in info and info["counts"] != count_table(rows):
        raise DatasetError(f"{info_path}: counts disagree with {meta_path.name} (edited by hand? rebuild the dataset)")
    if check_files:
        for sub in ("images", "masks"):
            folder = root / sub
            present = {p.stem for p in folder.glob("*.png")} if folder.is_dir() else set()
            missing = [r["id"] for r in rows if r["id"] not in present]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise DatasetError(f"{folder}: missing {', '.join(m + '.png' for m in missing[:3])}{more} "
                                   "listed in metadata.csv")
    return PairDataset(root=root, info=info, rows=rows)


def read_metadata(meta_path: Path) -> list[dict[str, str]]:
    try:
        with open(meta_path, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = [dict(r) for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{meta_path}: not a readable CSV ({exc})") from None
    missing = [c for c in BASE_COLUMNS if c not in columns]
    if missing:
        raise DatasetError(f"{meta_path}: missing column(s) {', '.join(missing)} (need at least "
                           f"{','.join(BASE_COLUMNS)})")
    return rows


def validate_rows(rows: Sequence[dict[str, str]], where: Path | str = "metadata.csv") -> None:
    """Check values and the no-leak rules: unique ids, known labels/splits/sources, no group across splits,
    no synthetic pair outside the training split."""
    seen: set[str] = set()
    group_split: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        pair_id = row.get("id") or ""
        try:
            check_id(pair_id)
        except DatasetError as exc:
            raise DatasetError(f"{where}: line {line}: {exc}") from None
        if pair_id in seen:
            raise DatasetError(f"{where}: line {line}: duplicate id {pair_id!r}")
        seen.add(pair_id)
        for col, allowed in (("label", LABELS), ("split", SPLITS), ("source", SOURCES)):
            if row.get(col) not in allowed:
                raise DatasetError(f"{where}: line {line} ({pair_id}): {col} must be one of {', '.join(allowed)}, "
                                   f"got {row.get(col)!r}")
        if not row.get("group"):
            raise DatasetError(f"{where}: line {line} ({pair_id}): empty group")
        if row["source"] == "synthetic" and row["split"] != "train":
            raise DatasetError(f"{where}: line {line} ({pair_id}): synthetic pair in the {row['split']} split — "
                               "synthetic data may only enter the training split")
        prev = group_split.setdefault(row["group"], row["split"])
        if prev != row["split"]:
            raise DatasetError(f"{where}: line {line} ({pair_id}): group {row['group']!r} is in both {prev} and "
                               f"{row['split']} (images of one patient / identical images must share a split)")


def write_index(root: str | Path, rows: Sequence[dict[str, Any]], img_size: int, command: str,
                extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write metadata.csv then dataset.json (last: it marks the dataset complete). Returns the info dict."""
    root = Path(root)
    rows = [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows]
    validate_rows(rows, root / "metadata.csv")
    extra_cols = sorted({k for r in rows for k in r} - set(BASE_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*BASE_COLUMNS, *extra_cols], restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (root / "dataset.json").unlink(missing_ok=True)
    atomic_write_text(root / "metadata.csv", buf.getvalue())
    info = {
        "format_version": FORMAT_VERSION,
        "img_size": int(img_size),
        "n_pairs": len(rows),
        "counts": count_table(rows),
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra_info or {}),
    }
    atomic_write_json(root / "dataset.json", info)
    return info


def is_pair_dataset(path: str | Path) -> bool:
    return (Path(path) / "dataset.json").is_file()


class PairDatasetWriter:
    """Build a new pair dataset in a staging folder; ``commit`` renames it into place.

    Used as a context manager, an exception (or Ctrl-C) removes the staging folder, so an interrupted run
    never leaves a folder that looks like a finished dataset. An existing ``output_dir`` is replaced only
    if it is itself a pair dataset (or empty); anything else is refused rather than deleted.
    """

    def __init__(self, output_dir: str | Path, img_size: int, inputs: dict[str, Any] | None = None):
        self.output_dir = Path(output_dir)
        self.img_size = int(img_size)
        check_separate(self.output_dir, inputs or {})
        check_writable(self.output_dir)
        if self.output_dir.exists():
            if not self.output_dir.is_dir():
                raise DatasetError(f"{self.output_dir}: exists and is not a folder")
            if any(self.output_dir.iterdir()) and not is_pair_dataset(self.output_dir):
                raise DatasetError(f"{self.output_dir}: exists, is not empty and is not a pair dataset; "
                                   "choose another --output_dir or remove it")
        self.lock = OutputLock(self.output_dir).__enter__()   # held until commit / abort
        clean_stale(self.output_dir)
        self.staging = self.output_dir.parent / f".{self.output_dir.name}.partial-{os.getpid()}"
        if self.staging.exists():
            remove_tree(self.staging)
        (self.staging / "images").mkdir(parents=True)
        (self.staging / "masks").mkdir()
        self.rows: list[dict[str, Any]] = []
        self._ids: set[str] = set()

    def __enter__(self) -> "PairDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _row(self, pair_id: str, label: str, split: str, source: str, group: str | None,
             extra: dict[str, Any]) -> dict[str, Any]:
        check_id(pair_id)
        if pair_id in self._ids:
            raise DatasetError(f"duplicate pair id {pair_id!r}")
        self._ids.add(pair_id)
        row = {"id": pair_id, "label": label, "split": split, "source": source, "group": group or pair_id, **extra}
        self.rows.append(row)
        return row

    def add(self, pair_id: str, image: np.ndarray, mask: np.ndarray, *, label: str, split: str, source: str,
            group: str | None = None, **extra: Any) -> dict[str, Any]:
        """Write one pair. ``image`` uint8 [S,S]; ``mask`` bool/0-1/0-255 [S,S] (stored as 0/255)."""
        s = self.img_size
        if image.shape != (s, s) or image.dtype != np.uint8:
            raise ValueError(f"{pair_id}: image must be uint8 {s}x{s}, got {image.dtype} {image.shape}")
        if mask.shape != (s, s):
            raise ValueError(f"{pair_id}: mask must be {s}x{s}, got {mask.shape}")
        row = self._row(pair_id, label, split, source, group, extra)
        write_png(self.staging / "images" / f"{pair_id}.png", image)
        write_png(self.staging / "masks" / f"{pair_id}.png", np.where(mask > 0, 255, 0).astype(np.uint8))
        return row

    def add_files(self, pair_id: str, image_src: Path, mask_src: Path, *, link: bool = False, label: str,
                  split: str, source: str, group: str | None = None, **extra: Any) -> dict[str, Any]:
        """Add a pair from existing PNGs of a pair dataset (copied, or hard-linked with ``link``;
        symlinked when a hard link is impossible, e.g. across file systems)."""
        row = self._row(pair_id, label, split, source, group, extra)
        for src, sub in ((image_src, "images"), (mask_src, "masks")):
            dst = self.staging / sub / f"{pair_id}.png"
            if link:
                try:
                    os.link(src, dst)
                except OSError:
                    os.symlink(Path(src).resolve(), dst)
            else:
                shutil.copyfile(src, dst)
        return row

    def check_decodes(self, rows: Sequence[dict[str, Any]]) -> None:
        """Decode the staged files of ``rows`` with every check :meth:`PairDataset.load` makes (8-bit, one channel,
        the dataset's size, masks 0/255): copied or linked files are not trusted."""
        staged = PairDataset(self.staging, {"img_size": self.img_size},
                             [{k: str(v) for k, v in r.items()} for r in rows])
        staged.load(staged.rows)

    def commit(self, command: str, extra_info: dict[str, Any] | None = None) -> PairDataset:
        """Write the index and move the finished dataset into ``output_dir`` (replacing an older one)."""
        write_index(self.staging, self.rows, self.img_size, command, extra_info)
        old = None
        if self.output_dir.exists():
            old = self.output_dir.parent / f".{self.output_dir.name}.old-{os.getpid()}"
            os.replace(self.output_dir, old)
        os.replace(self.staging, self.output_dir)
        if old is not None:
            remove_tree(old)   # read-only leftovers too
        self.lock.__exit__()
        return open_pair_dataset(self.output_dir, check_files=False)

    def abort(self) -> None:
        remove_tree(self.staging)
        self.lock.__exit__()


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 over a pair dataset's content: its image size, metadata.csv (ids, labels, splits, groups, provenance)
    and the bytes of every image and mask, so two datasets with the same ids but other pixels differ, and the same
    data prepared twice (other folder, other date in dataset.json) matches. Reads every file once (BUS-BRA at 64 px:
    ~0.2 s)."""
    root = Path(path)
    digest = hashlib.sha256()
    digest.update(str(json.loads((root / "dataset.json").read_text()).get("img_size")).encode())
    digest.update((root / "metadata.csv").read_bytes())
    for row in read_metadata(root / "metadata.csv"):
        for sub in ("images", "masks"):
            digest.update(hashlib.sha256((root / sub / f"{row['id']}.png").read_bytes()).digest())
    return digest.hexdigest()
