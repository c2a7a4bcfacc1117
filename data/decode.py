"""Decoding the raw cases a scan found (:mod:`data.readers`): image -> 8-bit grayscale, every mask -> binary and
merged with OR, sizes checked and taken from the pixels, stray specks removed, a pixel hash and a content signature
of the original image for de-duplication (pixel-identical copies and near-duplicates, :mod:`data.duplicates`), and
a resize to ``img_size x img_size``. :func:`load_case` does one case, :func:`decode_cases` a process pool of them.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from common.io import pixel_hash
from common.workers import die_with_parent
from data.duplicates import signature
from data.pairs import TUMOUR_LABELS
from data.readers import Problem, RawCase

RESIZE_MODES = ("stretch", "pad")
#: a 4-connected mask region of at most this many pixels, in a mask that also has a larger region, is a stray
#: annotation speck (BUS-BRA has three masks with a 1-2 px speck) and is removed
SPECK_MAX_PIXELS = 4
SPECK_RULE = (f"4-connected mask regions of <= {SPECK_MAX_PIXELS} px are removed when the mask also has a "
              "larger region (stray annotation specks)")
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


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
    from common.progress import progress_bar

    fn = functools.partial(load_case, img_size=img_size, resize=resize, speck_max_px=speck_max_px)
    workers = max(1, min(workers or os.cpu_count() or 1, len(cases)))
    bar = progress_bar(total=len(cases), desc="decode", unit="img", disable=not progress)
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
