"""Self-describing checkpoints: plain tensors and dicts, written atomically, read with weights_only=True.

A checkpoint from the internet must never be able to run code, so :func:`load_checkpoint` always uses
``torch.load(weights_only=True)``; everything saved must therefore be tensors, numbers, strings, lists,
tuples, dicts or None (no numpy arrays, no pickled classes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.io import atomic_path

FORMAT = "busdiff-checkpoint-v1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` written atomically (:func:`common.io.atomic_path`), with the usual file permissions."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def unsafe_load_message(path: str | Path, exc: BaseException, what: str = "checkpoint") -> str:
    """One line for a file that ``torch.load(weights_only=True)`` did not read: refused because loading it could run
    code (it holds pickled Python objects, not only tensors and plain containers), or unreadable (corrupt, truncated,
    not a torch file). torch's own text (several paragraphs) is not passed on."""
    import pickle
    import re
    head = f"{path}: cannot be read as a safe {what}: "
    refused = [e for e in (exc, exc.__cause__, exc.__context__)   # (timm wraps torch's error in its own)
               if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower()]
    text = str(refused[0] if refused else exc)
    if refused:
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            held = f"it holds the Python object {found.group(1).rstrip('.,')}"
        else:
            detail = re.search(r"(Unsupported [^\n]*)", text)
            held = ("it holds pickled data beyond tensors, numbers, strings and plain containers"
                    + (f" ({detail.group(1).strip()[:80]})" if detail else ""))
        return (head + f"refused, because {held} and loading it could run code (only what torch.load(weights_only="
                "True) reads is loaded; if you trust its source, re-save its tensors as a plain state dict)")
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(exc).__name__
    return head + f"corrupt, truncated or not a torch file ({first[:160]})"


def load_checkpoint(path: str | Path, expect_kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``; one clear UserError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, truncated write, or something that needs unpickling code
        raise UserError(unsafe_load_message(path, exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint written by this project (no '{FORMAT}' marker)")
    if expect_kind is not None and payload.get("kind") != expect_kind:
        raise UserError(f"{path}: is a {payload.get('kind')!r} checkpoint, expected {expect_kind!r}")
    return payload


def load_resumable(path: str | Path, kind: str, config: dict[str, Any], resumable_keys: set[str],
                   resume: str = "auto", renamed: dict[str, str] | None = None,
                   defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``last.pth`` of a run to continue, or None when there is none.

    Refuses (one UserError) with ``resume='never'``, or when the run was started with settings that differ from
    ``config`` in a key outside ``resumable_keys`` (run length, logging, hardware and paths may change). Runs saved
    by earlier versions: ``renamed`` maps their key names to today's, and a key they lack counts as ``defaults``'
    value (an option added since, at its default, changes nothing)."""
    path = Path(path)
    if not path.exists():
        return None
    if resume == "never":
        raise UserError(f"{path}: this --output_dir already holds a run; choose another --output_dir, remove "
                        "it, or pass --resume auto to continue it")
    ckpt = load_checkpoint(path, expect_kind=kind)
    old = {(renamed or {}).get(k, k): v for k, v in ckpt.get("config", {}).items()}
    for k, v in (defaults or {}).items():
        old.setdefault(k, v)
    diffs = sorted(k for k in set(old) | set(config) if k not in resumable_keys and old.get(k) != config.get(k))
    if diffs:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diffs[:6])
        raise UserError(f"{path}: cannot resume, the run was started with different settings ({detail}); "
                        "use another --output_dir for a new run")
    return ckpt


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
