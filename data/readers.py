"""Raw-dataset readers: BUSI, BUS-BRA and UDIAT Dataset B folders -> raw cases -> decoded pairs.

Two steps, kept apart so every problem can be listed before anything is written:

* **scan** (:func:`scan_dataset`): list the files of one raw layout, pair images with their mask(s), read
  labels (folder name, ``bus_data.csv``, ``DatasetB.xlsx``) and official folds; no pixel is decoded. The
  result holds :class:`RawCase` s plus :class:`Problem` s (a path and the rule it breaks) and the unexpected
  files that were not used.
* **decode** (:func:`load_case`, :func:`decode_cases` for a process pool): image -> 8-bit grayscale, every
  mask -> binary and merged with OR, sizes checked and taken from the pixels, stray specks removed, a pixel
  hash and a content signature of the original image for de-duplication (pixel-identical copies and
  near-duplicates, :mod:`data.duplicates`), and a resize to ``img_size x img_size``.

Layouts (REFERENCE.md, "Raw datasets"); ``detect_format`` accepts the dataset folder or its parent:

* BUSI   ``Dataset_BUSI_with_GT/{benign,malignant,normal}/<cls> (<n>).png`` + ``<cls> (<n>)_mask[_k].png``
* BUS-BRA ``Images/bus_NNNN-{l,r,s}.png``, ``Masks/mask_NNNN-{l,r,s}.png``, ``bus_data.csv``, ``5-fold-cv.csv``
* UDIAT  ``BUS/original/NNNNNN.png``, ``BUS/GT/NNNNNN.png``, ``BUS/DatasetB.xlsx`` (``Image``, ``Type``)
"""
from __future__ import annotations

import csv
import functools
import multiprocessing
import os
import re
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from common.errors import UserError
from common.io import pixel_hash
from common.workers import die_with_parent
from data.duplicates import signature
from data.pairs import LABELS, TUMOUR_LABELS

FORMATS = ("busi", "busbra", "udiat")
DATASET_NAMES = {"busi": "BUSI", "busbra": "BUS-BRA", "udiat": "UDIAT"}
RESIZE_MODES = ("stretch", "pad")
LAYOUTS = {
    "busi": "BUSI: benign/, malignant/, normal/ folders of '<cls> (<n>).png' + '<cls> (<n>)_mask.png' "
            "(e.g. Dataset_BUSI_with_GT/)",
    "busbra": "BUS-BRA: Images/, Masks/ and bus_data.csv (e.g. BUSBRA/)",
    "udiat": "UDIAT Dataset B: original/, GT/ and DatasetB.xlsx (e.g. BUS/)",
}
_HIDDEN = {"thumbs.db", "desktop.ini", "__macosx", "ehthumbs.db"}
#: a 4-connected mask region of at most this many pixels, in a mask that also has a larger region, is a stray
#: annotation speck (BUS-BRA has three masks with a 1-2 px speck) and is removed
SPECK_MAX_PIXELS = 4
SPECK_RULE = (f"4-connected mask regions of <= {SPECK_MAX_PIXELS} px are removed when the mask also has a "
              "larger region (stray annotation specks)")
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class Problem:
    """One input file (or folder) and the rule it breaks."""

    path: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "rule": self.rule}

    @property
    def kind(self) -> str:
        """The rule without its particulars (line numbers, names, explanations), for counting."""
        return re.split(r" \(|: | for | '|, ", re.sub(r"^(line|row) \d+: ", "", self.rule))[0]


def problem_lines(problems: Sequence[Problem], limit: int = 20) -> list[str]:
    """Indented lines listing ``problems`` (sorted by path), at most ``limit`` of them with at least one of
    every kind, then how many more there are and the count per kind."""
    problems = sorted(problems, key=lambda p: (p.path, p.rule))
    first: dict[str, Problem] = {}
    for p in problems:
        first.setdefault(p.kind, p)
    chosen = list(first.values())[:limit]
    chosen += [p for p in problems if p not in chosen][:max(0, limit - len(chosen))]
    lines = [f"  {p}" for p in sorted(chosen, key=lambda p: (p.path, p.rule))]
    if len(problems) > len(chosen):
        counts = {}
        for p in problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        lines.append(f"  ... and {len(problems) - len(chosen)} more (" +
                     ", ".join(f"{k}: {n}" for k, n in counts.items()) + ")")
    return lines


@dataclass
class RawCase:
    """One image of a raw dataset, not yet decoded."""

    case_id: str                      # the pair id it will get: busi_benign_0012, busbra_0001-l, udiat_000001
    label: str                        # benign | malignant | normal
    image: Path
    masks: list[Path]                 # merged with OR
    group: str | None = None          # patient (BUS-BRA Case) where the dataset records one
    fold: int | None = None           # official cross-validation fold (BUS-BRA 5-fold-cv.csv kFold)
    provenance: dict[str, Any] = field(default_factory=dict)   # metadata.csv columns
    expected_size: tuple[int, int] | None = None               # (w, h) a CSV claims; the pixels win


@dataclass
class Scan:
    """What :func:`scan_dataset` found in one raw dataset folder."""

    format: str
    dataset: str
    root: Path
    cases: list[RawCase]
    problems: list[Problem]
    unexpected: list[str]             # files that are not part of the layout (reported, not used)
    notes: list[str] = field(default_factory=list)
    folds_file: str | None = None

    @property
    def has_folds(self) -> bool:
        return bool(self.cases) and all(c.fold is not None for c in self.cases)


# ----------------------------------------------------------------------------------------------- detection
def is_hidden(name: str) -> bool:
    """System clutter that is ignored everywhere (.DS_Store, Thumbs.db, ._* files, __MACOSX)."""
    return name.startswith(".") or name.lower() in _HIDDEN


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not is_hidden(p.name))


def _child(folder: Path, name: str) -> Path | None:
    """``folder/name``, matched case-insensitively; None if absent."""
    exact = folder / name
    if exact.exists():
        return exact
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.name.lower() == name.lower():
            return p
    return None


def _dir(folder: Path, name: str) -> Path | None:
    p = _child(folder, name)
    return p if p is not None and p.is_dir() else None


def _file(folder: Path, name: str) -> Path | None:
    p = _child(folder, name)
    return p if p is not None and p.is_file() else None


def looks_like(fmt: str, folder: Path) -> bool:
    """Whether ``folder`` itself has the top-level shape of layout ``fmt``."""
    if fmt == "busi":
        return any(p.is_dir() and p.name.lower() in LABELS for p in _entries(folder))
    if fmt == "busbra":
        return _file(folder, "bus_data.csv") is not None or (
            _dir(folder, "Images") is not None and _dir(folder, "Masks") is not None)
    if fmt == "udiat":
        return _file(folder, "DatasetB.xlsx") is not None or (
            _dir(folder, "original") is not None and _dir(folder, "GT") is not None)
    raise ValueError(f"unknown format {fmt!r}")


def detect_format(root: str | Path, fmt: str = "auto") -> tuple[str, Path]:
    """Find the raw dataset in ``root`` or in one of its sub-folders: returns ``(format, dataset_folder)``.

    ``fmt`` = ``auto`` tries every layout; a format name looks only for that one. Raises
    :class:`UserError` for a missing or empty folder, no match (naming what was looked for) or several.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: input folder not found (--input_dir must be the downloaded dataset folder "
                        "or the folder containing it)")
    if not root.is_dir():
        raise UserError(f"{root}: --input_dir must be a folder, this is a file")
    if not _entries(root):
        raise UserError(f"{root}: input folder is empty")
    fmts = FORMATS if fmt == "auto" else (fmt,)
    for level in ([root], [p for p in _entries(root) if p.is_dir()]):
        hits = [(f, p) for p in level for f in fmts if looks_like(f, p)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            found = "; ".join(f"{p} ({DATASET_NAMES[f]})" for f, p in hits)
            raise UserError(f"{root}: several datasets found: {found}; point --input_dir at one of them"
                            + ("" if fmt != "auto" else " or pass --format"))
    wanted = " | ".join(LAYOUTS[f] for f in fmts)
    raise UserError(f"{root}: no known dataset layout found here or in its sub-folders (looked for {wanted})")


def scan_dataset(root: str | Path, fmt: str = "auto", dataset_name: str | None = None) -> Scan:
    """Detect the layout (or use ``fmt``) and scan it. ``dataset_name`` overrides the provenance name."""
    fmt, folder = detect_format(root, fmt)
    scan = {"busi": scan_busi, "busbra": scan_busbra, "udiat": scan_udiat}[fmt](folder)
    if dataset_name:
        scan.dataset = dataset_name
        for case in scan.cases:
            case.provenance["dataset"] = dataset_name
    return scan


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("_.-") or "x"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------- BUSI
_BUSI_MASK = re.compile(r"^(?P<base>.+)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)
_BUSI_NAME = re.compile(r"^(?P<cls>[A-Za-z]+) \((?P<n>\d+)\)$")


def scan_busi(root: Path) -> Scan:
    """BUSI: label = folder name; masks ``<stem>_mask.png``, ``<stem>_mask_<k>.png`` (merged)."""
    cases: list[RawCase] = []
    problems: list[Problem] = []
    unexpected: list[str] = []
    notes: list[str] = []
    class_dirs: dict[str, Path] = {}
    for p in _entries(root):
        if p.is_dir() and p.name.lower() in LABELS and p.name.lower() not in class_dirs:
            class_dirs[p.name.lower()] = p
        else:
            unexpected.append(str(p))
    for label in LABELS:
        if label not in class_dirs:
            notes.append(f"no {label}/ folder in {root}")
    for label, folder in sorted(class_dirs.items()):
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for f in _entries(folder):
            if not f.is_file() or f.suffix.lower() != ".png":
                unexpected.append(str(f))
                continue
            m = _BUSI_MASK.match(f.stem)
            if m:
                masks.setdefault(m["base"], []).append((int(m["k"] or 0), f))
            else:
                images[f.stem] = f
        if not images and not masks:
            notes.append(f"{folder}: empty class folder")
        for base, found in sorted(masks.items()):
            if base not in images:
                problems += [Problem(str(f), f"mask without image (no '{base}.png' beside it)") for _, f in found]

        def order(stem: str) -> tuple:
            m = _BUSI_NAME.match(stem)
            return (0, int(m["n"]), stem) if m else (1, 0, stem)

        used: set[str] = set()
        for stem in sorted(images, key=order):
            img = images[stem]
            found = sorted(masks.get(stem, []))
            if not found:
                problems.append(Problem(str(img), f"image without mask (expected '{stem}_mask.png' beside it)"))
                continue
            m = _BUSI_NAME.match(stem)
            case_id = f"busi_{label}_{int(m['n']):04d}" if m and m["cls"].lower() == label else \
                f"busi_{label}_{_safe(stem)}"
            while case_id in used:
                case_id += "_"
            used.add(case_id)
            mask_paths = [f for _, f in found]
            cases.append(RawCase(case_id, label, img, mask_paths, provenance={
                "dataset": "BUSI", "original_image": _rel(img, root),
                "mask_files": ";".join(_rel(f, root) for f in mask_paths), "n_masks": len(mask_paths)}))
    return Scan("busi", "BUSI", root, cases, problems, unexpected, notes)


# ------------------------------------------------------------------------------------------------ BUS-BRA
def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        return [(c or "").strip() for c in (reader.fieldnames or [])], rows


def _png_files(folder: Path | None, unexpected: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in _entries(folder) if folder is not None else []:
        if f.is_file() and f.suffix.lower() == ".png":
            out[f.stem] = f
        else:
            unexpected.append(str(f))
    return out


def scan_busbra(root: Path) -> Scan:
    """BUS-BRA: labels from ``bus_data.csv`` (``Pathology``), patient = ``Case``, folds from ``5-fold-cv.csv``."""
    problems: list[Problem] = []
    unexpected: list[str] = []
    notes: list[str] = []
    img_dir, mask_dir = _dir(root, "Images"), _dir(root, "Masks")
    csv_path, folds_path = _file(root, "bus_data.csv"), _file(root, "5-fold-cv.csv")
    known = {"images", "masks", "bus_data.csv", "5-fold-cv.csv", "10-fold-cv.csv", "license.txt", "readme.txt",
             "readme.md"}
    unexpected += [str(p) for p in _entries(root) if p.name.lower() not in known]
    for name, found in (("Images", img_dir), ("Masks", mask_dir)):
        if found is None:
            problems.append(Problem(str(root / name), f"{name}/ folder missing (BUS-BRA layout)"))
        elif not _entries(found):
            problems.append(Problem(str(found), f"{name}/ folder is empty"))
    images, masks = _png_files(img_dir, unexpected), _png_files(mask_dir, unexpected)
    rows: list[dict[str, str]] = []
    if csv_path is None:
        problems.append(Problem(str(root / "bus_data.csv"), "missing: BUS-BRA labels (Pathology) are read from it"))
    else:
        try:
            cols, rows = _read_csv(csv_path)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            problems.append(Problem(str(csv_path), f"not a readable CSV ({exc})"))
            cols, rows = [], []
        if rows and not {"ID", "Pathology"} <= set(cols):
            problems.append(Problem(str(csv_path), "needs the columns ID and Pathology"))
            rows = []
    folds: dict[str, tuple[int, str]] = {}
    if folds_path is not None:
        try:
            cols, frows = _read_csv(folds_path)
            for line, r in enumerate(frows, start=2):
                try:
                    folds[r["ID"]] = (int(float(r["kFold"])), r.get("Pathology", "").lower())
                except (KeyError, ValueError):
                    problems.append(Problem(str(folds_path), f"line {line}: needs an ID and an integer kFold"))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            problems.append(Problem(str(folds_path), f"not a readable CSV ({exc})"))
    else:
        notes.append(f"no 5-fold-cv.csv in {root}: no official folds")
    cases: list[RawCase] = []
    listed: set[str] = set()
    used_masks: set[str] = set()
    for line, r in enumerate(rows, start=2):
        rid = r.get("ID", "")
        if not rid or rid in listed:
            problems.append(Problem(str(csv_path), f"line {line}: empty or repeated ID {rid!r}"))
            continue
        listed.add(rid)
        label = r.get("Pathology", "").lower()
        mask_stem = "mask" + rid[3:] if rid.lower().startswith("bus") else f"mask_{rid}"
        img, mask = images.get(rid), masks.get(mask_stem)
        if mask is not None:
            used_masks.add(mask_stem)
        if label not in LABELS:
            problems.append(Problem(str(csv_path), f"line {line}: unknown label {r.get('Pathology')!r} for {rid} "
                                                   "(Pathology must be benign or malignant)"))
            continue
        if img is None:
            problems.append(Problem(str((img_dir or root / "Images") / f"{rid}.png"),
                                    "listed in bus_data.csv but the image file is missing"))
            continue
        if mask is None:
            problems.append(Problem(str(img), f"image without mask (expected Masks/{mask_stem}.png)"))
            continue
        fold = None
        if rid in folds:
            fold, fold_label = folds[rid]
            if fold_label and fold_label != label:
                problems.append(Problem(str(folds_path), f"{rid}: Pathology {fold_label!r} disagrees with "
                                                         f"bus_data.csv ({label!r})"))
                continue
        case = r.get("Case", "")
        try:
            expected = (int(r["Width"]), int(r["Height"]))
        except (KeyError, ValueError):
            expected = None
        cid = "busbra_" + (_safe(rid[4:]) if rid.lower().startswith("bus_") else _safe(rid))
        cases.append(RawCase(
            cid, label, img, [mask], group=f"busbra_case_{_safe(case)}" if case else None, fold=fold,
            expected_size=expected,
            provenance={"dataset": "BUS-BRA", "original_image": _rel(img, root), "mask_files": _rel(mask, root),
                        "n_masks": 1, "patient": case, "birads": r.get("BIRADS", ""),
                        "device": r.get("Device", ""), "histology": r.get("Histology", ""),
                        "side": r.get("Side", ""), "official_fold": "" if fold is None else fold}))
    missing_fold = sum(c.fold is None for c in cases)
    if folds and missing_fold:
        notes.append(f"{missing_fold} images have no kFold in 5-fold-cv.csv: --split auto draws a random split")
    if rows:
        problems += [Problem(str(p), "image not listed in bus_data.csv (label unknown)")
                     for stem, p in sorted(images.items()) if stem not in listed]
        problems += [Problem(str(p), "mask without image") for stem, p in sorted(masks.items())
                     if stem not in used_masks]
    return Scan("busbra", "BUS-BRA", root, cases, problems, unexpected, notes,
                folds_file=folds_path.name if folds_path is not None else None)


# -------------------------------------------------------------------------------------------------- UDIAT
def read_udiat_sheet(path: Path) -> tuple[dict[str, tuple[str | None, str, int]], list[Problem]]:
    """``DatasetB.xlsx`` -> {"000001": (label, diagnosis, row)}; unnamed junk columns are ignored. A row with
    an unknown Type is reported and kept with label None (so its image is not reported a second time)."""
    import openpyxl

    problems: list[Problem] = []
    out: dict[str, tuple[str, str, int]] = {}
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile/KeyError/InvalidFileException on a bad file
        return out, [Problem(str(path), f"cannot be read as an .xlsx workbook ({type(exc).__name__}: {exc})")]
    try:
        for ws in wb.worksheets:
            header: dict[str, int] | None = None
            for row_no, row in enumerate(ws.iter_rows(values_only=True), start=1):
                cells = ["" if v is None else str(v).strip() for v in row]
                if header is None:
                    names = [c.lower() for c in cells]
                    if "image" in names and "type" in names:
                        header = {n: i for i, n in reversed(list(enumerate(names))) if n}
                    continue
                def cell(name: str) -> str:
                    i = header.get(name)
                    return cells[i] if i is not None and i < len(cells) else ""
                value, kind = cell("image"), cell("type")
                if not value and not kind:
                    continue
                try:
                    number = float(value)
                    if not number.is_integer() or number < 0:
                        raise ValueError
                    key = f"{int(number):06d}"
                except ValueError:
                    problems.append(Problem(str(path), f"row {row_no}: Image {value!r} is not an image number"))
                    continue
                if key in out:
                    problems.append(Problem(str(path), f"row {row_no}: image {key} listed twice"))
                    continue
                if kind.lower() not in TUMOUR_LABELS:
                    problems.append(Problem(str(path), f"row {row_no}: unknown label {kind!r} for image {key} "
                                                       "(Type must be Benign or Malignant)"))
                out[key] = (kind.lower() if kind.lower() in TUMOUR_LABELS else None, cell("diagnosis"), row_no)
            if header is not None:
                break
        else:
            problems.append(Problem(str(path), "no sheet with an 'Image' and a 'Type' column"))
    finally:
        wb.close()
    return out, problems


def scan_udiat(root: Path) -> Scan:
    """UDIAT Dataset B: ``original/`` + ``GT/`` (same names), labels from ``DatasetB.xlsx``; no patient ids."""
    problems: list[Problem] = []
    unexpected = [str(p) for p in _entries(root) if p.name.lower() not in {"original", "gt", "datasetb.xlsx"}]
    orig, gt, xlsx = _dir(root, "original"), _dir(root, "GT"), _file(root, "DatasetB.xlsx")
    for name, found in (("original", orig), ("GT", gt)):
        if found is None:
            problems.append(Problem(str(root / name), f"{name}/ folder missing (UDIAT layout)"))
        elif not _entries(found):
            problems.append(Problem(str(found), f"{name}/ folder is empty"))
    images, masks = _png_files(orig, unexpected), _png_files(gt, unexpected)
    if xlsx is None:
        problems.append(Problem(str(root / "DatasetB.xlsx"), "missing: UDIAT labels (Type) are read from it"))
        sheet: dict[str, tuple[str | None, str, int]] = {}
    else:
        sheet, sheet_problems = read_udiat_sheet(xlsx)
        problems += sheet_problems
    cases: list[RawCase] = []
    for stem, (label, diagnosis, row_no) in sorted(sheet.items()):
        img, mask = images.get(stem), masks.get(stem)
        if label is None:
            continue
        if img is None:
            problems.append(Problem(str((orig or root / "original") / f"{stem}.png"),
                                    f"listed in DatasetB.xlsx (row {row_no}) but the image file is missing"))
        elif mask is None:
            problems.append(Problem(str(img), f"image without mask (expected GT/{stem}.png)"))
        else:
            cases.append(RawCase(f"udiat_{_safe(stem)}", label, img, [mask], provenance={
                "dataset": "UDIAT", "original_image": _rel(img, root), "mask_files": _rel(mask, root),
                "n_masks": 1, "diagnosis": diagnosis}))
    if xlsx is not None:
        problems += [Problem(str(p), "image not listed in DatasetB.xlsx (label unknown)")
                     for stem, p in sorted(images.items()) if stem not in sheet]
    problems += [Problem(str(p), "mask without image") for stem, p in sorted(masks.items()) if stem not in images]
    return Scan("udiat", "UDIAT", root, cases, problems, unexpected)


# ------------------------------------------------------------------------------------------------- decode
@dataclass
class Decoded:
    """One decoded case: ``image`` uint8 and ``mask`` bool at img_size x img_size (None if it has problems)."""

    case_id: str
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    width: int = 0
    height: int = 0
    pixel_hash: str = ""
    signature: np.ndarray | None = None   # near-duplicate signature of the original image (64 x 64 uint8)
    specks_removed: int = 0
    size_differs: bool = False        # a CSV's Width/Height disagreed with the pixels (pixels used)
    problems: list[Problem] = field(default_factory=list)


class UnsupportedImage(ValueError):
    """A file that decodes but whose pixel format the project does not handle."""


def to_gray(im: Image.Image) -> np.ndarray:
    """Any 8-bit PIL image (L, RGB-stored gray, colour, palette, 1-bit) -> uint8 grayscale (ITU-R 601 luma)."""
    if im.mode in _HIGH_BIT_MODES:
        raise UnsupportedImage(f"unsupported pixel format {im.mode} (16-bit or float): convert it to 8-bit")
    return np.asarray(im if im.mode == "L" else im.convert("L"))


def to_binary(im: Image.Image) -> np.ndarray:
    """A mask of any storage (1-bit, 8-bit 0/255, RGB, RGBA, palette) -> bool: ``convert('L') > 0``; where
    the mask has an alpha channel, fully transparent pixels count as background (as a viewer shows it)."""
    if im.mode in _HIGH_BIT_MODES:
        return np.asarray(im) > 0
    fg = np.asarray(im.convert("L")) > 0
    if "A" in im.getbands():
        fg &= np.asarray(im.getchannel("A")) > 0
    return fg


def _decode(path: Path, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    with Image.open(path) as im:
        im.load()                     # raises on a truncated or corrupt file
        return np.ascontiguousarray(convert(im))


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int]]:
    """4-connected regions of a non-empty mask, labelled on its bounding box (fast for small lesions):
    (count + 1, labels of the crop, areas per label, (y0, x0) of the crop)."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = mask[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1].astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=4)
    return n, lab, stats[:, cv2.CC_STAT_AREA], (int(ys[0]), int(xs[0]))


def remove_specks(mask: np.ndarray, max_px: int = SPECK_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """Drop 4-connected regions of <= ``max_px`` pixels when a larger region exists; returns (mask, n removed)."""
    if max_px <= 0 or not mask.any():
        return mask, 0
    n, lab, areas, (y0, x0) = _components(mask)
    if n <= 2 or areas[1:].max() <= max_px:
        return mask, 0
    small = np.flatnonzero(areas[1:] <= max_px) + 1
    if small.size == 0:
        return mask, 0
    mask = mask.copy()
    h, w = lab.shape
    mask[y0:y0 + h, x0:x0 + w] &= ~np.isin(lab, small)
    return mask, int(small.size)


def pad_to_square(a: np.ndarray) -> np.ndarray:
    """Centre ``a`` on a zero square of side max(h, w)."""
    h, w = a.shape
    s = max(h, w)
    out = np.zeros((s, s), a.dtype)
    y, x = (s - h) // 2, (s - w) // 2
    out[y:y + h, x:x + w] = a
    return out


def _cover(mask: np.ndarray, size: int) -> np.ndarray:
    """Share of each output pixel covered by ``mask`` (area interpolation), in 1/255 steps."""
    return cv2.resize(mask.astype(np.uint8) * np.uint8(255), (size, size), interpolation=cv2.INTER_AREA)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int, mode: str = "stretch"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size x size``: ``stretch`` (what the field does) or ``pad`` (zero-pad to a square first).

    The image uses area interpolation; the mask area interpolation then ``>= 0.5``, and a mask region that
    would vanish keeps its best-covered pixel, so no lesion is ever lost.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "pad":
        image, mask = pad_to_square(image), pad_to_square(mask)
    img = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    cover = _cover(mask, size)
    out = cover >= 128
    if mask.any():
        n, lab, _, (y0, x0) = _components(mask)
        for k in range(1, n):
            if n == 2:
                ck = cover
            else:
                region = np.zeros_like(mask)
                region[y0:y0 + lab.shape[0], x0:x0 + lab.shape[1]] = lab == k
                ck = _cover(region, size)
            if not out[ck > 0].any():
                out[np.unravel_index(int(np.argmax(ck)), ck.shape)] = True
    return img, out


def load_case(case: RawCase, img_size: int, resize: str = "stretch",
              speck_max_px: int = SPECK_MAX_PIXELS) -> Decoded:
    """Decode and check one case; problems (corrupt file, size mismatch, empty tumour mask, ...) are returned
    in ``Decoded.problems`` rather than raised, so a whole dataset can be checked in one pass."""
    out = Decoded(case.case_id)
    try:
        gray = _decode(case.image, to_gray)
    except UnsupportedImage as exc:
        out.problems.append(Problem(str(case.image), str(exc)))
        gray = None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on damaged files
        out.problems.append(Problem(str(case.image), f"corrupt or truncated image, cannot be decoded ({exc})"))
        gray = None
    masks = []
    for path in case.masks:
        try:
            m = _decode(path, to_binary)
        except Exception as exc:
            out.problems.append(Problem(str(path), f"corrupt or truncated mask, cannot be decoded ({exc})"))
            continue
        if gray is not None and m.shape != gray.shape:
            out.problems.append(Problem(str(path), f"image/mask size mismatch: mask is {m.shape[1]}x{m.shape[0]}, "
                                                   f"image {case.image.name} is {gray.shape[1]}x{gray.shape[0]}"))
        masks.append(m)
    if gray is None or out.problems:
        return out
    mask = np.logical_or.reduce(masks)
    if case.label in TUMOUR_LABELS and not mask.any():
        out.problems.append(Problem(str(case.masks[0]), f"empty mask in the {case.label} class (a tumour image "
                                                        "needs its lesion outlined)"))
        return out
    if case.label not in TUMOUR_LABELS and mask.any():
        out.problems.append(Problem(str(case.masks[0]), "non-empty mask on a normal image (normal images have "
                                                        "no lesion)"))
        return out
    mask, out.specks_removed = remove_specks(mask, speck_max_px)
    out.height, out.width = gray.shape
    out.size_differs = case.expected_size is not None and case.expected_size != (out.width, out.height)
    out.pixel_hash = pixel_hash(gray)
    out.signature = signature(gray)
    out.image, out.mask = resize_pair(gray, mask, img_size, resize)
    return out


def _init_worker(parent_pid: int | None = None) -> None:
    die_with_parent(parent_pid)                    # a killed run takes its workers with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is handled once, by the main process
    cv2.setNumThreads(1)


def decode_cases(cases: Sequence[RawCase], img_size: int, resize: str = "stretch", workers: int | None = None,
                 progress: bool = False, speck_max_px: int = SPECK_MAX_PIXELS) -> list[Decoded]:
    """:func:`load_case` over ``cases`` in a process pool (``workers`` default os.cpu_count()), in order."""
    from tqdm import tqdm

    fn = functools.partial(load_case, img_size=img_size, resize=resize, speck_max_px=speck_max_px)
    workers = max(1, min(workers or os.cpu_count() or 1, len(cases)))
    bar = tqdm(total=len(cases), desc="decode", unit="img", disable=not progress)
    try:
        if workers == 1:
            results = []
            for case in cases:
                results.append(fn(case))
                bar.update()
            return results
        # spawn, not fork: a forked child inherits the parent's thread pools (OpenCV, tqdm) in a broken state and
        # can hang; spawned workers start clean (about half a second each, in parallel)
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(os.getpid(),),
                                   mp_context=multiprocessing.get_context("spawn"))
        try:
            results = []
            chunk = max(1, min(16, len(cases) // (workers * 8)))
            for res in pool.map(fn, cases, chunksize=chunk):
                results.append(res)
                bar.update()
            return results
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
    finally:
        bar.close()
