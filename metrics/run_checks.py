"""Checks on the segmentation runs evaluate.py compares, made before any compute: what each run trained on (from its
own record), that the baseline trained on real pairs only and the combined run on synthetic + real ones, and that no
run is given twice or on both sides of the comparison."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from common.errors import UserError
from common.io import sha256_file


def run_folder(path: Path) -> Path | None:
    """The run folder of a --baseline_run / --combined_run argument (a folder, or a per_image_*.csv inside one)."""
    if path.is_dir():
        return path
    if path.name.startswith("per_image_") and ((path.parent / "metrics.json").is_file()
                                                or (path.parent / "config.json").is_file()):
        return path.parent
    return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def training_sources(path: Path) -> tuple[dict[str, int] | None, str]:
    """What a segmentation run trained on, from its own record: ({"real": n, "synthetic": n} of its training pairs,
    where that was read), or (None, why it cannot be told)."""
    folder = run_folder(path)
    if folder is None:
        return None, "a per-image CSV outside a run folder records no training data"
    metrics, config = read_json(folder / "metrics.json"), read_json(folder / "config.json")
    if "checkpoint_path" in metrics or "checkpoint_path" in config:
        return None, "a segment_with_diffusion.py run: its segmenter is the diffusion model"
    ds = metrics.get("dataset") if isinstance(metrics.get("dataset"), dict) else {}
    used = (ds.get("used") or {}).get("train") if isinstance(ds.get("used"), dict) else None
    if isinstance(used, dict) and used:
        counts = {"real": 0, "synthetic": 0}
        for per_source in used.values():
            for source, n in (per_source or {}).items():
                counts[source] = counts.get(source, 0) + int(n)
        return counts, f"{folder / 'metrics.json'} (dataset {ds.get('path')})"
    if isinstance(ds.get("n_train"), int) and isinstance(ds.get("n_synthetic_train"), int):
        return ({"real": ds["n_train"] - ds["n_synthetic_train"], "synthetic": ds["n_synthetic_train"]},
                f"{folder / 'metrics.json'} (dataset {ds.get('path')})")
    data_dir, recorded = config.get("data_dir"), config.get("dataset_json_sha256")
    if data_dir and recorded and (Path(data_dir) / "dataset.json").is_file():   # a run older than the record
        from data.pairs import read_metadata
        if sha256_file(Path(data_dir) / "dataset.json") != recorded:
            return None, f"its dataset {data_dir} has changed since it trained"
        counts = {"real": 0, "synthetic": 0}
        for row in read_metadata(Path(data_dir) / "metadata.csv"):
            if row.get("split") == "train":
                counts[row.get("source", "real")] = counts.get(row.get("source", "real"), 0) + 1
        return counts, f"{data_dir} (recorded in {folder / 'config.json'})"
    return None, "its folder records no training dataset"


def check_runs(baseline_runs: Sequence[str], combined_runs: Sequence[str]) -> list[str]:
    """The downstream verdict's inputs, before any compute: every --baseline_run trained on real pairs only and every
    --combined_run on synthetic + real ones (from each run's own record), no run given twice or on both sides (paths
    resolved, copies found by their per-image results). Returns warnings for runs whose data cannot be told."""
    runs = [("--baseline_run", r) for r in baseline_runs] + [("--combined_run", r) for r in combined_runs]
    seen: dict[Any, tuple[str, str]] = {}
    notes = []
    for flag, run in runs:
        path = Path(run).expanduser()
        if not path.exists():
            raise UserError(f"{flag} {run}: not found (a train_segmentation.py run folder or its per_image_test.csv)")
        folder = run_folder(path)
        table = (folder / "per_image_test.csv") if folder is not None and path.is_dir() else path
        if not table.is_file():
            raise UserError(f"{flag} {run}: {table} not found (is it a finished train_segmentation.py run?)")
        content = hashlib.sha256(table.read_bytes())   # a copied run: the same results and the same weights
        if folder is not None and (folder / "best_model.pth").is_file():
            content.update(sha256_file(folder / "best_model.pth").encode())
        keys = [("path", os.path.realpath(folder if folder is not None else path)), ("results", content.hexdigest())]
        for key in keys:
            if key in seen:
                other_flag, other = seen[key]
                how = "is the same run as" if key[0] == "path" else "has the same results and weights as (a copy of)"
                if other_flag == flag:
                    raise UserError(f"{flag} {run} {how} {other_flag} {other}: give each run (seed) once")
                raise UserError(f"{flag} {run} {how} {other_flag} {other}: a run cannot be on both sides of the "
                                "comparison")
            seen[key] = (flag, run)
    for flag, run in runs:
        counts, where = training_sources(Path(run).expanduser())
        want = "real pairs only" if flag == "--baseline_run" else "synthetic + real pairs"
        if counts is None:
            notes.append(f"{flag} {run}: cannot check that it trained on {want} ({where})")
            continue
        n_real, n_syn = counts.get("real", 0), counts.get("synthetic", 0)
        trained = f"trained on {n_real} real + {n_syn} synthetic pairs ({where})"
        if flag == "--baseline_run" and n_syn:
            raise UserError(f"--baseline_run {run}: {trained}; the baseline must be trained on real data only "
                            "(are --baseline_run and --combined_run swapped?)")
        if flag == "--combined_run" and not (n_syn and n_real):
            raise UserError(f"--combined_run {run}: {trained}; the combined run must be trained on synthetic + real "
                            "data (create_combined_dataset.py; are --baseline_run and --combined_run swapped?)")
    return notes
