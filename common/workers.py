"""Worker processes that end with their parent: a pool's workers must not outlive a killed run (kill -9 included),
or they go on writing into a staging folder that nobody will use, and hold CPUs.

:func:`die_with_parent` is a pool ``initializer``: on Linux it asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to
kill the worker when the process that started it ends; elsewhere it does nothing (the pools' own shutdown is all
there is).
"""
from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Have this process killed when its parent ends; True when armed. ``parent_pid``: the parent's PID, to catch a
    parent that ended before the signal was armed (the worker then exits at once)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    return True
