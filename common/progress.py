"""Progress bars that suit both a terminal and a log file.

On a terminal: a normal tqdm bar. When output is not a terminal (SLURM, ``| tee``, CI logs) the bar is off, because
tqdm's carriage-return redraws fill such logs; the scripts' status lines (one per log interval) carry the progress
there instead. ``BUSDIFF_PROGRESS=1`` forces bars on, ``=0`` off.
"""
from __future__ import annotations

import os
import sys


def interactive() -> bool:
    forced = os.environ.get("BUSDIFF_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress_bar(*args, disable: bool = False, **kwargs):
    """``tqdm(...)``, disabled when output is not a terminal (see the module docstring)."""
    from tqdm import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(*args, disable=disable or not interactive(), **kwargs)
