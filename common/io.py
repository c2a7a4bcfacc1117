"""Small file helpers: atomic writes, 8-bit PNG read/write, hashing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()   # what open() would give: mkstemp's temporary files are 0600


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in ``path``'s folder (created if needed); when the block succeeds it is given the
    permissions a plain ``open(path, "w")`` would give (not mkstemp's private 0600) and renamed over ``path``
    atomically; when it fails it is removed. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def encode_png(array: np.ndarray) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit grayscale PNG."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array, got {array.dtype} {array.shape}")
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | Path, array: np.ndarray, atomic: bool = False) -> None:
    data = encode_png(array)
    if atomic:
        atomic_write_bytes(path, data)
    else:
        Path(path).write_bytes(data)


def read_png_gray(path: str | Path) -> np.ndarray:
    """Read an 8-bit single-channel PNG exactly as stored; raises OSError if it cannot be decoded."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise OSError("cannot be decoded as an image (missing, corrupt or truncated)")
    if array.ndim != 2 or array.dtype != np.uint8:
        raise OSError(f"expected an 8-bit grayscale PNG, found shape {array.shape} dtype {array.dtype}")
    return array


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pixel_hash(array: np.ndarray) -> str:
    """Hash of the pixel values and shape (not of the file bytes): equal for pixel-identical images."""
    digest = hashlib.sha1(np.ascontiguousarray(array).tobytes())
    digest.update(repr(array.shape).encode())
    return digest.hexdigest()
