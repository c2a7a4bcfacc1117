"""A generated breast-ultrasound phantom written in the exact raw BUSI layout, quirks included.

BUSI cannot be shipped, so this is the project's embedded default dataset. How one capture is rendered (tissue,
speckle, lesions, overlays) is :mod:`phantom.render`; this module plans the dataset and writes it.

File layout and quirks (``quirks=True``, the default; BUSI's own, as found in the published dataset)::

    <output_dir>/Dataset_BUSI_with_GT/{benign,malignant,normal}/<cls> (<n>).png, <cls> (<n>)_mask.png

* every image is 8-bit RGB with the grey value replicated; about 2 % carry real colour (a Doppler-like colour
  box with a colour bar, or coloured markers);
* lesion masks are 1-bit PNGs (PIL mode '1'); every normal mask is an empty 8-bit RGB PNG;
* about 2.6 % of tumour cases have extra masks ``_mask_1`` (and, from ~300 cases, one ``_mask_2``), each
  covering a separate further lesion, so that the full lesion is the OR of all masks; at least one extra mask
  is RGBA (like ``benign (4)_mask_1``);
* one cross-label pixel-identical duplicate (an image saved as malignant and as benign, like
  ``malignant (145)`` == ``benign (433)``) and a couple of same-label duplicates under different numbers;
* near-duplicates (from 50 cases, :mod:`phantom.copies`): one case in 20 is a copy of another case of its class
  saved again cropped, shifted, with other overlays, rescaled or JPEG re-encoded, and one in 300 (at least 2) a
  copy of a case of the other tumour class (like ``benign (399)`` / ``malignant (93)``); ``phantom.json`` lists
  them under ``near_duplicates``.

With ``quirks=False`` the files are plain: 8-bit grayscale ('L') images, 8-bit 0/255 grayscale masks for every
class, one lesion and one mask per image, no colour, no duplicates or near-duplicates (burned-in overlays are
image content and stay).

The dataset is written to ``Dataset_BUSI_with_GT.partial`` and renamed when complete; ``phantom.json`` beside it
records the parameters and the summary. Every case has its own RNG derived from ``(seed, class, number)``, so
the output is byte-identical whatever the number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from common.errors import UserError
from common.io import atomic_write_json
from common.workers import die_with_parent
from phantom.copies import plan_near_duplicates, resave
from phantom.render import CLASSES, Case, render_full

BUSI_ROOT = "Dataset_BUSI_with_GT"
BUSI_RATIO = (437, 210, 133)
WIDTH_RANGE = (190, 1048)
HEIGHT_RANGE = (310, 719)
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
_PLAN_KEY = 7  # spawn key of the dataset-level RNG (case keys are (class index, number) pairs)


# ----------------------------------------------------------------------------------------------- helpers
def case_rng(seed: int, label: str, number: int) -> np.random.Generator:
    """The RNG of one case, derived from (seed, class, number) only."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(CLASSES.index(label), number)))


def class_counts(n_cases: int, ratio=BUSI_RATIO) -> dict[str, int]:
    """Split ``n_cases`` by ``ratio`` (largest remainder); each class with a non-zero ratio gets >= 1 case when
    ``n_cases`` allows (so every class when ``n_cases >= 3`` with BUSI's ratio)."""
    if n_cases < 0 or len(ratio) != 3 or min(ratio) < 0 or sum(ratio) <= 0:
        raise ValueError(f"need n_cases >= 0 and three non-negative ratio parts, got {n_cases}, {ratio}")
    exact = [n_cases * r / sum(ratio) for r in ratio]
    counts = [int(e) for e in exact]
    for i in sorted(range(3), key=lambda i: (counts[i] - exact[i], i))[: n_cases - sum(counts)]:
        counts[i] += 1
    if n_cases >= sum(r > 0 for r in ratio):
        for i in range(3):
            while counts[i] == 0 and ratio[i] > 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return dict(zip(CLASSES, counts))


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a capture: mostly ~450-550 x 500-600, now and then anywhere in BUSI's range."""
    if rng.random() < 0.08:
        h, w = rng.uniform(*HEIGHT_RANGE), rng.uniform(*WIDTH_RANGE)
    else:
        h, w = rng.normal(495, 40), rng.normal(555, 50)
    return (int(np.clip(round(h), *HEIGHT_RANGE)), int(np.clip(round(w), *WIDTH_RANGE)))


# ----------------------------------------------------------------------------------------------- dataset
def _stem(label, number):
    return f"{label} ({number})"


def _plan(seed, counts, quirks):
    """Dataset-level choices (duplicates, extra masks, RGBA masks, colour images), from their own RNG.

    Returns ``tasks`` ({(label, number): task dict, or None for a duplicate that is copied, not rendered})
    and ``duplicates`` ([(kind, source key, copy key)])."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(_PLAN_KEY,)))
    n = sum(counts.values())
    tasks = {(c, i): {"n_lesions": 1, "rgba": False, "colour": False} for c in CLASSES
             for i in range(1, counts[c] + 1)}
    duplicates = []
    if not quirks:
        return tasks, duplicates
    taken = set()

    def pick(label, k):
        free = [i for i in range(1, counts[label] + 1) if (label, i) not in taken]
        chosen = sorted(int(i) for i in rng.choice(free, size=min(k, len(free)), replace=False)) if free else []
        taken.update((label, i) for i in chosen)
        return chosen

    if n >= 50 and counts["benign"] >= 3 and counts["malignant"] >= 3:
        # cross-label duplicate at BUSI's position: malignant (145) == benign (433)
        src = ("malignant", int(np.clip(round(counts["malignant"] * 145 / 210), 1, counts["malignant"])))
        dst = ("benign", int(np.clip(round(counts["benign"] * 433 / 437), 1, counts["benign"])))
        taken.update((src, dst))
        duplicates.append(("cross-label", src, dst))
        # same-label duplicates under different numbers: two, plus one per further 400 cases
        for _ in range(2 + (n - 50) // 400):
            label = CLASSES[int(rng.choice(3, p=np.array([counts[c] for c in CLASSES]) / n))]
            pair = pick(label, 2)
            if len(pair) == 2:
                a, b = pair if rng.random() < 0.5 else pair[::-1]
                duplicates.append(("same-label", (label, a), (label, b)))
    # extra masks: BUSI has 16 benign cases with 17 extra masks and one malignant case with one
    n_b = max(int(round(counts["benign"] * 16 / 437)), 1 if n >= 50 and counts["benign"] else 0)
    n_m = int(round(counts["malignant"] * 1 / 210))
    extra = [("benign", i) for i in pick("benign", n_b)] + [("malignant", i) for i in pick("malignant", n_m)]
    for key in extra:
        tasks[key]["n_lesions"] = 2
    if n >= 300 and extra:
        tasks[extra[int(rng.integers(len(extra)))]]["n_lesions"] = 3
    for j in rng.choice(len(extra), size=min(len(extra), max(1, int(round(len(extra) * 2 / 17)))), replace=False):
        tasks[extra[int(j)]]["rgba"] = True
    # real colour: 16 of 780
    n_col = max(int(round(n * 16 / 780)), 1 if n >= 50 else 0)
    pool = [k for k in tasks if k not in taken]
    for j in sorted(rng.choice(len(pool), size=min(n_col, len(pool)), replace=False)):
        tasks[pool[int(j)]]["colour"] = True
    if n >= 50 and counts["benign"] >= 6 and counts["malignant"] >= 6:
        plan_near_duplicates(rng, tasks, counts, taken | set(extra), CLASSES)
    for _, _, key in duplicates:
        tasks[key] = None        # not rendered: copied from its source
    return tasks, duplicates


def _save_rgb(path, rgb, grey=False):
    if not cv2.imwrite(str(path), rgb if grey else np.ascontiguousarray(rgb[..., ::-1]), PNG_PARAMS):
        raise OSError(f"could not write {path}")


def _render_and_write(job):
    """Worker: render one case from its own RNG and write its files. Returns a small record.

    A near-duplicate copy (``copy_of`` in its task) renders its source case again from the source's RNG (with
    its own overlay RNG for the ``overlay`` variant) and re-saves it (:func:`phantom.copies.resave`) under its own
    name."""
    root, seed, label, number, task, quirks = job
    source = task.get("copy_of")
    src_label, src_number = source if source else (label, number)
    rng = case_rng(seed, src_label, src_number)
    height, width = draw_size(rng)
    overlay_rng = case_rng(seed + 1, label, number) if task.get("variant") == "overlay" else None
    case = render_full(rng, src_label, height, width, n_lesions=task["n_lesions"], colour=task["colour"] and quirks,
                       overlay_rng=overlay_rng)
    if source:
        image, masks = resave(case.image, case.masks, task["variant"], task["params"], HEIGHT_RANGE, WIDTH_RANGE)
        if masks and masks[0].sum() < 0.5 * case.masks[0].sum() * (task["params"] if task["variant"] == "scale"
                                                                      else 1.0) ** 2:
            image, masks = resave(case.image, case.masks, "jpeg", 85)     # the crop would cut the lesion off
        case = Case(image, masks, False, case.posterior)
        height, width = image.shape[:2]
    folder = Path(root) / label
    stem = _stem(label, number)
    if quirks:
        _save_rgb(folder / f"{stem}.png", case.image, grey=not case.colour)
    else:
        cv2.imwrite(str(folder / f"{stem}.png"), case.gray, PNG_PARAMS)
    written = []
    if label == "normal":
        if quirks:
            _save_rgb(folder / f"{stem}_mask.png", np.zeros((height, width, 3), np.uint8), grey=True)
        else:
            cv2.imwrite(str(folder / f"{stem}_mask.png"), np.zeros((height, width), np.uint8), PNG_PARAMS)
    elif not quirks:
        cv2.imwrite(str(folder / f"{stem}_mask.png"), case.mask.astype(np.uint8) * 255, PNG_PARAMS)
    else:
        for k, m in enumerate(case.masks):
            name = f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"
            if k == 1 and task["rgba"]:
                v = m.astype(np.uint8) * 255
                Image.fromarray(np.dstack([v, v, v, np.full_like(v, 255)]), "RGBA").save(folder / name)
                written.append((name, "RGBA"))
            else:
                Image.fromarray(m).save(folder / name)        # bool array -> mode '1', a 1-bit PNG
                if k:
                    written.append((name, "1"))
    return {"label": label, "number": number, "size": (height, width), "extra": written,
            "copy_of": f"{src_label}/{_stem(src_label, src_number)}.png" if source else None,
            "variant": task.get("variant"),
            "colour": bool(case.colour), "posterior": case.posterior,
            "lesion_fraction": float(case.mask.mean()) if case.masks else 0.0}


def _worker_init(parent_pid: int | None = None):
    die_with_parent(parent_pid)   # a killed run takes its workers with it
    cv2.setNumThreads(1)


def generate_phantom(output_dir: str | Path, n_cases: int, seed: int = 0,
                     ratio: tuple[int, int, int] = BUSI_RATIO, workers: int | None = None,
                     quirks: bool = True, progress: bool = False) -> dict:
    """Write ``n_cases`` phantom cases as ``<output_dir>/Dataset_BUSI_with_GT/{benign,malignant,normal}/``.

    Counts follow ``ratio``; numbering is 1..count per class. The folder is built as
    ``Dataset_BUSI_with_GT.partial`` and renamed when complete; an existing ``Dataset_BUSI_with_GT`` is replaced
    only if ``phantom.json`` beside it shows that it is a phantom (real data is never overwritten).
    Returns the summary (also written to ``<output_dir>/phantom.json``).
    """
    start = time.perf_counter()
    out = Path(output_dir)
    final, partial, record = out / BUSI_ROOT, out / f"{BUSI_ROOT}.partial", out / "phantom.json"
    if final.exists() and not record.exists():
        raise UserError(f"{final} exists and is not a generated phantom (no {record.name} beside it); "
                        "choose another --output_dir or remove it yourself")
    counts = class_counts(int(n_cases), tuple(ratio))
    tasks, duplicates = _plan(seed, counts, quirks)
    if partial.exists():
        shutil.rmtree(partial)
    for c in CLASSES:
        (partial / c).mkdir(parents=True)
    jobs = [(str(partial), int(seed), c, i, t, bool(quirks)) for (c, i), t in tasks.items() if t is not None]
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    bar = None
    if progress:
        from common.progress import progress_bar
        bar = progress_bar(total=len(jobs), desc="phantom", unit="case")
    records = []
    if workers == 1 or len(jobs) < 8:
        for job in jobs:
            records.append(_render_and_write(job))
            bar is not None and bar.update()
    else:
        # spawn, not fork: a child forked after the parent used OpenCV's thread pool can hang for ever in
        # cv2 (seen in the test suite); the workers only use numpy/OpenCV/PIL, with OpenCV's own pool off
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            for rec in pool.map(_render_and_write, jobs, chunksize=4):
                records.append(rec)
                bar is not None and bar.update()
    if bar is not None:
        bar.close()
    dup_summary = []
    for kind, (sl, si), (dl, di) in duplicates:
        for suffix in (".png", "_mask.png"):
            shutil.copyfile(partial / sl / f"{_stem(sl, si)}{suffix}", partial / dl / f"{_stem(dl, di)}{suffix}")
        dup_summary.append({"kind": kind, "files": [f"{sl}/{_stem(sl, si)}.png", f"{dl}/{_stem(dl, di)}.png"]})
    extra = [f"{r['label']}/{name}" for r in records for name, _ in r["extra"]]
    summary = {
        "root": str(final), "seed": int(seed), "n_cases": int(n_cases), "ratio": list(ratio), "quirks": bool(quirks),
        "counts": counts, "extra_masks": len(extra), "extra_mask_files": extra,
        "rgba_masks": [f"{r['label']}/{name}" for r in records for name, mode in r["extra"] if mode == "RGBA"],
        "duplicates": dup_summary,
        "near_duplicates": [{"kind": "cross-label" if r["copy_of"].split("/")[0] != r["label"] else "same-label",
                             "variant": r["variant"],
                             "files": [r["copy_of"], f"{r['label']}/{_stem(r['label'], r['number'])}.png"]}
                            for r in records if r["copy_of"]],
        "colour_images": [f"{r['label']}/{_stem(r['label'], r['number'])}.png" for r in records if r["colour"]],
        "mean_lesion_fraction": {c: float(np.mean([r["lesion_fraction"] for r in records if r["label"] == c] or [0]))
                                 for c in CLASSES[:2]},
    }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(record, summary)     # first: a Dataset_BUSI_with_GT beside it is always known as ours
    if final.exists():
        trash = out / f"{BUSI_ROOT}.old"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        shutil.rmtree(trash)
    partial.rename(final)
    return summary


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Write a BUSI-layout ultrasound phantom.")
    p.add_argument("output_dir")
    p.add_argument("--n_cases", type=int, default=780)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no_quirks", action="store_true")
    a = p.parse_args(argv)
    s = generate_phantom(a.output_dir, a.n_cases, seed=a.seed, workers=a.workers, quirks=not a.no_quirks,
                         progress=True)
    print(json.dumps({k: s[k] for k in ("root", "counts", "extra_masks", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
