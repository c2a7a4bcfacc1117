"""Guarding output folders, for every script: nothing a script writes may destroy its inputs, overwrite another
script's results, or be written by two runs at once.

* :func:`check_separate` - an output folder may not be, contain, or lie inside any input (paths and symbolic links
  resolved first), so replacing or cleaning it can never delete data the run reads.
* :func:`check_writable` - the output's nearest existing folder is writable, checked before any compute.
* :class:`OutputLock` - an exclusive lock on the output folder for the life of the run (``fcntl.flock`` on a
  sibling ``.<name>.lock`` file, released by the kernel when the process ends, even on kill -9); a second run is
  refused with the holder's PID.
* :func:`claim` - every output folder says which kind of run made it (``.busdiff.json``); a script refuses a folder
  of another kind, or one holding unrelated files. Folders written before the marker existed are recognised by
  their files.
* :func:`clean_stale` - staging leftovers (``.<name>.partial-<pid>``, ``.<name>.old-<pid>``) of processes that are
  gone are removed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Mapping

from common.errors import UserError

MARKER = ".busdiff.json"
KINDS = ("pair-dataset", "diffusion-run", "segmentation-run", "diffusion-segmentation", "evaluation",
         "reader-study", "diffusers-export", "benchmark")


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def check_separate(output: str | Path, inputs: Mapping[str, str | Path | None], flag: str = "--output_dir") -> None:
    """Refuse an output folder that is, contains, or lies inside one of ``inputs`` ({flag: path})."""
    out = _real(output)
    for name, path in inputs.items():
        if not path:
            continue
        src = _real(path)
        if out == src:
            raise UserError(f"{flag} {output} is the same folder as {name} {path}; write the output elsewhere")
        if src.is_relative_to(out):
            raise UserError(f"{flag} {output} contains {name} {path}: replacing the output would delete the input; "
                            "write the output elsewhere")
        if out.is_relative_to(src) and src.is_dir():
            raise UserError(f"{flag} {output} lies inside {name} {path}; write the output outside the input")


def check_writable(output: str | Path, flag: str = "--output_dir") -> None:
    """The output folder (or its nearest existing parent) must be a writable folder."""
    p = Path(output).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {output}: exists and is not a folder")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output}: {probe} is not writable; choose another output folder")


class OutputLock:
    """Exclusive lock on an output folder for as long as the ``with`` block (the run) lasts."""

    def __init__(self, output: str | Path, active: bool = True):
        out = Path(output).expanduser().absolute()
        self.path = out.parent / f".{out.name}.lock"
        self.active = active
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        if not self.active:
            return self
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"{self.path.parent / self.path.name[1:-5]}: another run is writing this folder "
                                f"(process {holder}); wait for it to end or choose another output folder") from None
            # The holder removes the lock file when it ends; a lock taken on a file that was removed meanwhile
            # guards nothing, so take it again on the file now at that path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)   # removed while still held, so no run is left behind
            finally:
                os.close(self.fd)
            self.fd = None


def folder_kind(path: str | Path) -> str | None:
    """What made this folder: its marker, else recognised by its files; None for an empty or unknown folder."""
    p = Path(path)
    marker = p / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError):
            return None
    if (p / "dataset.json").is_file():
        return "pair-dataset"
    if (p / "model_index.json").is_file():
        return "diffusers-export"
    if any((p / f).is_file() for f in ("reader_study_key.json", "reader_study.html", "reader_study_score.json")):
        return "reader-study"
    if (p / "report.html").is_file():
        return "evaluation"
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            keys = set(json.loads(cfg.read_text()))
        except (OSError, ValueError):
            keys = set()
        if keys & {"checkpoint_path", "n_samples"} and "model" not in keys:
            return "diffusion-segmentation"
        if "model" in keys and ("base_width" in keys or "encoder_name" in keys):
            return "segmentation-run"
        if keys & {"model_channels", "arch"}:
            return "diffusion-run"
    return None


def check_kind(output: str | Path, kind: str, allow_kinds: tuple[str, ...] = ()) -> None:
    """Refuse ``output`` when it holds another kind of run or unrelated files (nothing is written)."""
    assert kind in KINDS, kind
    p = Path(output)
    if p.exists() and not p.is_dir():
        raise UserError(f"{output}: exists and is not a folder")
    if p.is_dir() and any(x.name != MARKER for x in p.iterdir()):
        found = folder_kind(p)
        if found is None:
            raise UserError(f"{output}: the folder holds files that no busdiff run wrote; choose another output "
                            "folder (nothing was changed)")
        if found != kind and found not in allow_kinds:
            raise UserError(f"{output}: holds a {found} output, not a {kind}; choose another output folder "
                            "(nothing was changed)")


def claim(output: str | Path, kind: str, command: str = "", allow_kinds: tuple[str, ...] = ()) -> None:
    """:func:`check_kind`, then mark the folder as ``kind`` (made if needed)."""
    check_kind(output, kind, allow_kinds)
    p = Path(output)
    p.mkdir(parents=True, exist_ok=True)
    if not (p / MARKER).is_file():
        from common.io import atomic_write_json
        atomic_write_json(p / MARKER, {"kind": kind, "command": command})


def clean_stale(output: str | Path) -> list[Path]:
    """Remove ``.<name>.partial-<pid>`` / ``.<name>.old-<pid>`` beside ``output`` whose process is gone."""
    out = Path(output).expanduser().absolute()
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*-*"):
        tag, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if tag not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        remove_tree(p)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: str | Path) -> None:
    """``shutil.rmtree`` that also removes read-only files and folders (it makes them writable first)."""
    def retry(func, p, _exc):
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
        func(p)
    if os.path.lexists(path):
        shutil.rmtree(path, **({"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}))
