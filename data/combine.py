"""Real + synthetic pair datasets -> one combined pair dataset (create_combined_dataset.py is its CLI).

Rules:

* **Real pairs** are copied unchanged, every split (ids, labels, groups, provenance columns, pixels).
* **Every pair is decoded before anything is copied** (8-bit grayscale, the dataset's size, masks 0/255): a
  corrupt or wrong-size PNG is refused, named in its own dataset, and nothing is written.
* **Synthetic pairs** go to the training split only. The validation and test splits of the result are
  checked to be exactly the real ones (same ids, rows and file bytes) before the dataset is committed.
* **Selection** (deterministic given ``seed``; within a class a seeded permutation of the sorted ids):

  - ``balance`` (default): benign and malignant synthetic pairs are picked so the training split's
    tumour classes become 50/50, using **as many synthetic pairs as the cap allows** -- the result is both
    larger and balanced. With real training counts ``B``, ``M``, available synthetic ``sB``, ``sM`` and
    budget ``K``, it adds ``b`` benign and ``m`` malignant pairs with ``B + b = M + m`` and the largest
    ``b + m <= K``. When the synthetic set (or the budget) is too small for 50/50, the minority class gets
    what there is (up to ``K``), the majority class none, and a warning says how far from 50/50 it stays.
    Synthetic *normal* pairs are not used in this mode (the balance is about tumour classes).
  - no balance: every synthetic pair (all labels) up to ``K``; if more are available, each label gets its
    share by largest remainder.
  - the budget ``K = floor(max_synthetic_ratio x real training pairs)`` (all labels); ``inf`` = no cap.
* **Ids**: synthetic ids (and groups) are kept unless one could collide with a real id or group; then all
  synthetic ids and groups get a prefix (``syn_``, or ``syn2_``, ...). ``original_id`` is always recorded.

:func:`plan_combination` does the arithmetic (no I/O; tested on its own); :func:`combine` writes the
dataset; :func:`format_table` is the before/after table the script prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.errors import UserError
from common.io import pixel_hash, sha256_file
from common.outputs import check_separate
from data.pairs import LABELS, TUMOUR_LABELS, PairDataset, PairDatasetWriter, open_pair_dataset

DECODE_CHUNK = 256   # pairs decoded at a time by the check before copying (bounded memory)

__all__ = ["CombinationPlan", "balance_counts", "plan_combination", "check_sources", "combine", "format_table",
           "tumour_share", "id_prefix"]


@dataclass
class CombinationPlan:
    """How many synthetic pairs of each label are added, which ones, and why."""

    selected: dict[str, int]                       # label -> synthetic pairs added
    available: dict[str, int]                      # label -> synthetic pairs in the synthetic set
    budget: int | None                             # K (None = no cap)
    ids: dict[str, list[str]] = field(default_factory=dict)   # label -> chosen synthetic ids (original ids)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_selected(self) -> int:
        return sum(self.selected.values())


def tumour_share(counts: dict[str, int]) -> tuple[float, float] | None:
    """(benign share, malignant share) of the tumour images, or None when there are none."""
    n = counts.get("benign", 0) + counts.get("malignant", 0)
    if n == 0:
        return None
    return counts.get("benign", 0) / n, counts.get("malignant", 0) / n


def _pct(share: tuple[float, float] | None) -> str:
    if share is None:
        return "no tumour images"
    return f"{round(100 * share[0])}% benign / {round(100 * share[1])}% malignant"


def balance_counts(real_benign: int, real_malignant: int, syn_benign: int, syn_malignant: int,
                   budget: int | None) -> tuple[int, int, str | None]:
    """(benign to add, malignant to add, warning or None) for a 50/50 training split (module docstring)."""
    k = math.inf if budget is None else budget
    d = real_benign - real_malignant                # > 0: malignant is the minority
    # add b benign and m = b + d malignant; b >= max(0, -d), b <= sB, b + d <= sM, 2b + d <= K
    b_max = min(syn_benign, syn_malignant - d, math.floor((k - d) / 2) if k != math.inf else math.inf)
    if b_max >= max(0, -d):
        b = int(b_max)
        return b, b + d, None
    minority = "malignant" if d > 0 else "benign"
    have = syn_malignant if d > 0 else syn_benign
    need = abs(d)
    add = int(min(have, k))
    if have < need:
        why = f"the synthetic set has only {have} {minority} pairs; {need} are needed for 50/50"
    else:
        why = (f"the cap (--max_synthetic_ratio) allows only {int(k)} synthetic pairs; {need} {minority} are needed "
               "for 50/50")
    after = (real_benign, real_malignant + add) if d > 0 else (real_benign + add, real_malignant)
    share = _pct(tumour_share(dict(zip(TUMOUR_LABELS, after))))
    warning = f"{why}: adding all {add} usable {minority} pairs -> {share}"
    return (0, add, warning) if d > 0 else (add, 0, warning)


def _largest_remainder(available: dict[str, int], total: int) -> dict[str, int]:
    n = sum(available.values())
    if n <= total:
        return dict(available)
    exact = {k: total * v / n for k, v in available.items()}
    out = {k: int(math.floor(x)) for k, x in exact.items()}
    order = sorted(available, key=lambda k: (-(exact[k] - out[k]), LABELS.index(k)))
    for k in order[:total - sum(out.values())]:
        out[k] += 1
    return out


def plan_combination(real_train: dict[str, int], syn_ids: dict[str, list[str]], balance: bool,
                     max_synthetic_ratio: float, seed: int) -> CombinationPlan:
    """Decide the synthetic pairs to add. ``real_train``: label -> real training pairs; ``syn_ids``: label ->
    synthetic ids. Deterministic given ``seed``."""
    available = {lab: len(syn_ids.get(lab, [])) for lab in LABELS}
    n_real = sum(real_train.get(lab, 0) for lab in LABELS)
    budget = None if math.isinf(max_synthetic_ratio) else int(math.floor(max_synthetic_ratio * n_real + 1e-9))
    warnings: list[str] = []
    if balance:
        b, m, warn = balance_counts(real_train.get("benign", 0), real_train.get("malignant", 0),
                                    available["benign"], available["malignant"], budget)
        if warn:
            warnings.append(warn)
        selected = {"benign": b, "malignant": m, "normal": 0}
        if available["normal"]:
            warnings.append(f"{available['normal']} synthetic normal pairs not used (--balance is about the tumour "
                            "classes; --no-balance adds every label)")
    else:
        selected = _largest_remainder(available, budget if budget is not None else sum(available.values()))
        if sum(selected.values()) < sum(available.values()):
            warnings.append(f"the cap (--max_synthetic_ratio {max_synthetic_ratio:g} x {n_real} real training pairs) "
                            f"keeps {sum(selected.values())} of the {sum(available.values())} synthetic pairs")
    ids = {}
    for i, lab in enumerate(LABELS):
        pool = sorted(syn_ids.get(lab, []))
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
        order = rng.permutation(len(pool))
        ids[lab] = [pool[j] for j in order[:selected[lab]]]
    return CombinationPlan(selected=selected, available=available, budget=budget, ids=ids, warnings=warnings)


def id_prefix(real: PairDataset, syn_rows: list[dict[str, str]]) -> str:
    """'' when no synthetic id or group can collide with a real id or group, else the first free 'synN_'."""
    taken = {r["id"] for r in real.rows} | {r["group"] for r in real.rows}
    names = [r["id"] for r in syn_rows] + [r["group"] for r in syn_rows]
    if not any(n in taken for n in names):
        return ""
    k = 1
    while True:
        prefix = "syn_" if k == 1 else f"syn{k}_"
        if not any(prefix + n in taken for n in names):
            return prefix
        k += 1


def check_sources(real: PairDataset, syn: PairDataset) -> None:
    """Refuse inputs that cannot be combined cleanly (one clear line each)."""
    if real.img_size != syn.img_size:
        raise UserError(f"image sizes differ: {real.root} is {real.img_size} px, {syn.root} is {syn.img_size} px; "
                        f"generate (or prepare) both at one --img_size")
    bad = [r for r in real.rows if r["source"] != "real"]
    if bad:
        raise UserError(f"{real.root}: --real_data holds {len(bad)} synthetic pair(s) (e.g. {bad[0]['id']}); is it "
                        "already a combined dataset? pass the real dataset made by prepare_busi_dataset.py")
    bad = [r for r in syn.rows if r["split"] != "train"]
    if bad:
        raise UserError(f"{syn.root}: --synthetic_data has {len(bad)} pair(s) outside the training split (e.g. "
                        f"{bad[0]['id']} in {bad[0]['split']}); a synthetic set may only hold training pairs")
    bad = [r for r in syn.rows if r["source"] != "synthetic"]
    if bad:
        raise UserError(f"{syn.root}: --synthetic_data has {len(bad)} pair(s) whose source is not synthetic (e.g. "
                        f"{bad[0]['id']}: {bad[0]['source']}); pass a set made by generate_synthetic.py")
    if not syn.rows:
        raise UserError(f"{syn.root}: --synthetic_data holds no pairs")
    if not real.select(split="train", labels=TUMOUR_LABELS):
        raise UserError(f"{real.root}: --real_data has no benign or malignant training pairs")


def check_provenance(real: PairDataset, syn: PairDataset, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Refuse a synthetic set that has seen, by content, any validation or test pair of the real dataset: its
    generator trained on one of those images (the real data was re-split, or is another split than the generator's),
    or a pair was drawn for one of those masks (mask-conditioned generation). Returns what was checked."""
    held = real.select(split=["val", "test"])
    images, masks = real.load(held) if held else (np.zeros((0, 1, 1), np.uint8),) * 2
    held_images = {pixel_hash(a): r["id"] for a, r in zip(images, held)}
    held_masks = {pixel_hash((m > 0).astype(np.uint8)): r["id"] for m, r in zip(masks, held)}
    training = syn.info.get("generator_training") or {}
    checked = {"generator_training_images": None, "condition_masks": 0}
    if training.get("image_hashes"):
        seen = [held_images[h] for h in training["image_hashes"] if h in held_images]
        if seen:
            raise UserError(f"{syn.root}: its generator was trained on {len(seen)} image(s) that are in the val/test "
                            f"splits of {real.root} (e.g. {seen[0]}); was the real data re-split after the generator "
                            "was trained? Combine with the split the generator was trained on, or retrain it")
        checked["generator_training_images"] = len(training["image_hashes"])
    else:
        log(f"warning: {syn.root} does not record what its generator was trained on (made by an earlier version): "
            "leakage of val/test images through the generator cannot be checked")
    shas = [(r["id"], r["condition_sha"]) for r in syn.rows if r.get("condition_sha")]
    bad = [(pid, held_masks[h]) for pid, h in shas if h in held_masks]
    if bad:
        raise UserError(f"{syn.root}: {len(bad)} synthetic pair(s) were drawn for masks of the val/test splits of "
                        f"{real.root} (e.g. {bad[0][0]} for {bad[0][1]}); condition on training masks only")
    checked["condition_masks"] = len(shas)
    return checked


def _source_info(ds: PairDataset) -> dict[str, Any]:
    info = {"path": str(ds.root.resolve()), "dataset_json_sha256": sha256_file(ds.root / "dataset.json"),
            "command": ds.info.get("command"), "created": ds.info.get("created"), "n_pairs": len(ds),
            "img_size": ds.img_size}
    for key in ("generation", "checkpoint_path", "source_dataset"):
        if key in ds.info:
            info[key] = ds.info[key]
    return info


def _counts(rows, split: str = "train") -> dict[str, dict[str, int]]:
    """label -> source -> count for one split."""
    out = {lab: {"real": 0, "synthetic": 0} for lab in LABELS}
    for r in rows:
        if r["split"] == split:
            out[r["label"]][r["source"]] += 1
    return out


def format_table(before: list[dict], after: list[dict]) -> str:
    """The printed summary: the training split per label x source after combination, class shares, held-out."""
    b, a = _counts(before), _counts(after)
    lines = [f"{'train split':<12} {'real':>7} {'synthetic':>10} {'total':>7}"]
    for lab in LABELS:
        lines.append(f"{lab:<12} {a[lab]['real']:>7} {a[lab]['synthetic']:>10} {sum(a[lab].values()):>7}")
    tr = sum(a[lab]["real"] for lab in LABELS)
    ts = sum(a[lab]["synthetic"] for lab in LABELS)
    lines.append(f"{'total':<12} {tr:>7} {ts:>10} {tr + ts:>7}")
    before_share = tumour_share({lab: sum(b[lab].values()) for lab in TUMOUR_LABELS})
    after_share = tumour_share({lab: sum(a[lab].values()) for lab in TUMOUR_LABELS})
    arrow = _pct(after_share).replace(" benign", "").replace(" malignant", "")
    lines.append(f"train tumour classes: {_pct(before_share)} -> {arrow}")
    held = {sp: sum(1 for r in after if r["split"] == sp) for sp in ("val", "test")}
    lines.append(f"val and test: the real ones, unchanged ({held['val']} val + {held['test']} test pairs, "
                 "no synthetic pair)")
    return "\n".join(lines)


def _verify_heldout(real: PairDataset, rows: list[dict[str, Any]], staging: Path) -> None:
    """Val/test of the staged dataset must be exactly the real ones: ids, row values and file bytes."""
    real_held = {r["id"]: r for r in real.rows if r["split"] != "train"}
    held = {r["id"]: r for r in rows if r["split"] != "train"}
    if set(held) != set(real_held):
        raise RuntimeError(f"leak check failed: val/test ids differ from the real dataset's "
                           f"({len(set(held) ^ set(real_held))} differ); nothing was written")
    for pid, row in held.items():
        if row["source"] != "real" or any(str(row.get(k, "")) != str(v) for k, v in real_held[pid].items()):
            raise RuntimeError(f"leak check failed: held-out row {pid} differs from the real dataset's")
        for sub in ("images", "masks"):
            if sha256_file(staging / sub / f"{pid}.png") != sha256_file(real.root / sub / f"{pid}.png"):
                raise RuntimeError(f"leak check failed: {sub}/{pid}.png differs from the real dataset's")
    real_train = {r["id"] for r in real.rows if r["split"] == "train"}
    if not real_train <= {r["id"] for r in rows if r["split"] == "train"}:
        raise RuntimeError("leak check failed: a real training pair went missing")


def combine(real_dir: str | Path, synthetic_dir: str | Path, output_dir: str | Path, *, balance: bool = True,
            max_synthetic_ratio: float = 1.0, link: bool = False, seed: int = 0, command: str = "",
            log: Callable[[str], None] = print) -> PairDataset:
    """Build the combined dataset (see the module docstring) and return it, opened."""
    real_dir, synthetic_dir, output_dir = Path(real_dir), Path(synthetic_dir), Path(output_dir)
    check_separate(output_dir, {"--real_data": real_dir, "--synthetic_data": synthetic_dir})
    if not (max_synthetic_ratio >= 0):
        raise UserError(f"--max_synthetic_ratio must be >= 0 (or inf), got {max_synthetic_ratio}")
    real = open_pair_dataset(real_dir)
    syn = open_pair_dataset(synthetic_dir)
    check_sources(real, syn)
    provenance = check_provenance(real, syn, log)

    real_train = {lab: len(real.select(split="train", labels=lab)) for lab in LABELS}
    syn_ids = {lab: [r["id"] for r in syn.select(labels=lab)] for lab in LABELS}
    plan = plan_combination(real_train, syn_ids, balance, max_synthetic_ratio, seed)
    if plan.n_selected == 0:
        raise UserError(f"no synthetic pair can be added ({'; '.join(plan.warnings) or 'nothing selected'}); "
                        "nothing was written")
    for w in plan.warnings:
        log(f"warning: {w}")
    chosen = [syn.row(i) for lab in LABELS for i in plan.ids[lab]]
    prefix = id_prefix(real, chosen)
    if prefix:
        log(f"synthetic ids could collide with real ids or groups: prefixed with {prefix!r}")

    # every pair to be copied decodes as an 8-bit grayscale image and a 0/255 mask of the dataset's size: a corrupt
    # or wrong-size PNG is named (in its own dataset) before anything is written, never copied unread
    for ds, rows in ((real, real.rows), (syn, chosen)):
        for k in range(0, len(rows), DECODE_CHUNK):
            ds.load(rows[k:k + DECODE_CHUNK])

    with PairDatasetWriter(output_dir, real.img_size,
                           {"--real_data": real_dir, "--synthetic_data": synthetic_dir}) as writer:
        for r in real.rows:
            extra = {k: v for k, v in r.items() if k not in ("id", "label", "split", "source", "group")}
            writer.add_files(r["id"], real.image_path(r["id"]), real.mask_path(r["id"]), link=link,
                             label=r["label"], split=r["split"], source="real", group=r["group"], **extra)
        for r in chosen:
            extra = {k: v for k, v in r.items() if k not in ("id", "label", "split", "source", "group")}
            extra["original_id"] = r["id"]
            writer.add_files(prefix + r["id"], syn.image_path(r["id"]), syn.mask_path(r["id"]), link=link,
                             label=r["label"], split="train", source="synthetic", group=prefix + r["group"], **extra)
        _verify_heldout(real, writer.rows, writer.staging)
        before = {lab: real_train[lab] for lab in TUMOUR_LABELS}
        after = {lab: real_train[lab] + plan.selected[lab] for lab in TUMOUR_LABELS}
        extra_info = {"combined": {
            "sources": {"real": _source_info(real), "synthetic": _source_info(syn)},
            "balance": bool(balance),
            "max_synthetic_ratio": None if math.isinf(max_synthetic_ratio) else float(max_synthetic_ratio),
            "budget": plan.budget, "seed": int(seed), "link": bool(link), "id_prefix": prefix,
            "n_real_train": sum(real_train.values()), "n_synthetic": plan.n_selected,
            "synthetic_selected": plan.selected, "synthetic_available": plan.available,
            "train_tumour_share_before": dict(zip(TUMOUR_LABELS, tumour_share(before) or (None, None))),
            "train_tumour_share_after": dict(zip(TUMOUR_LABELS, tumour_share(after) or (None, None))),
            "heldout_verified": "val and test rows, ids and file bytes equal the real dataset's",
            "provenance_checked": provenance,
            "warnings": plan.warnings,
        }}
        table = format_table(real.rows, writer.rows)
        ds = writer.commit(command, extra_info)
    log(table)
    return ds

