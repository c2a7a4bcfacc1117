"""The run directory (docs/architecture.md): config.json, log.txt, stats.jsonl, samples/, checkpoints, metrics.json."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from common.io import atomic_write_json


class RunDir:
    """Everything a run writes lives here. Only the main process writes (``active=False`` on other ranks)."""

    def __init__(self, path: str | Path, active: bool = True):
        self.path = Path(path)
        self.active = active
        self._t0 = time.time()

    def _ensure(self) -> None:
        """The folder is made by the first thing written, so a run refused before that leaves nothing behind."""
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any]) -> None:
        if self.active:
            atomic_write_json(self.path / "config.json", config)

    def log(self, message: str, echo: bool = True) -> None:
        """Append a line to log.txt and print it (tqdm-safe)."""
        if not self.active:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._ensure()
        with open(self.path / "log.txt", "a") as fh:
            fh.write(f"[{stamp}] {message}\n")
        if echo:
            try:
                from tqdm import tqdm
                tqdm.write(message, file=sys.stdout)
            except ImportError:  # pragma: no cover
                print(message, flush=True)

    def stats(self, record: dict[str, Any]) -> None:
        """Append one JSON line to stats.jsonl."""
        if self.active:
            self._ensure()
            with open(self.path / "stats.jsonl", "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")

    def write_metrics(self, metrics: dict[str, Any], name: str = "metrics.json") -> None:
        if self.active:
            atomic_write_json(self.path / name, metrics)
