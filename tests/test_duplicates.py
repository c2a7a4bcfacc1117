"""Near-duplicates: the content score (re-saved copies high, distinct scans low), the grouping and dropping rules,
the fold-preserving split, the leak check, and the whole path on a phantom with emulated BUSI near-duplicates."""
from __future__ import annotations

import json

import numpy as np
import pytest

import prepare_busi_dataset as prep
from data.duplicates import (THRESHOLD, leak_check, leak_line, nearest, signature, signatures, similarity_pairs,
                             split_leak_check)
from data.pairs import open_pair_dataset
from data.splits import fold_splits, resolve_duplicates
from phantom.copies import NEAR_VARIANTS, resave
from phantom.render import render_full
from phantom.simulator import case_rng

LABELS = ("benign", "malignant", "normal")


def _case(number: int, label: str = "benign", overlay_seed: int | None = None):
    rng = case_rng(11, label, number)
    over = None if overlay_seed is None else np.random.default_rng(overlay_seed)
    return render_full(rng, label, 340 + 7 * (number % 5), 400 + 11 * (number % 7), overlay_rng=over)


@pytest.fixture(scope="module")
def scans():
    """12 distinct phantom captures (4 per class) and re-saved copies of the first three."""
    cases = [_case(n, LABELS[n % 3]) for n in range(12)]
    copies = []
    for i in range(3):
        c = cases[i]
        copies += [(i, "crop", resave(c.image, c.masks, "crop", [0.06, 0.0, 0.04, 0.08])[0]),
                   (i, "shift", resave(c.image, c.masks, "shift", [0.05, -0.04])[0]),
                   (i, "scale down", resave(c.image, c.masks, "scale", 0.74)[0]),
                   (i, "scale up", resave(c.image, c.masks, "scale", 1.25)[0]),
                   (i, "jpeg", resave(c.image, c.masks, "jpeg", 60)[0]),
                   (i, "overlay", _case(i, LABELS[i % 3], overlay_seed=99).image)]
    return cases, copies


def _gray(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., 0])


# ------------------------------------------------------------------------------------------------ the score
def test_copies_score_high_distinct_scans_low(scans):
    cases, copies = scans
    sig = signatures([c.gray for c in cases])
    assert sig.shape == (12, 64, 64) and sig.dtype == np.uint8
    distinct = similarity_pairs(sig, threshold=-1.0)
    assert distinct and max(s for _, _, s in distinct) < THRESHOLD - 0.05      # no two distinct scans merge
    csig = signatures([_gray(im) for _, _, im in copies])
    score, idx = nearest(csig, sig)
    for (src, kind, _), s, j in zip(copies, score, idx):
        assert j == src and s >= THRESHOLD, (kind, src, j, s)                   # each copy finds its original
    # the grouping finds exactly the copy pairs among all 30 images
    pairs = similarity_pairs(np.concatenate([sig, csig]))
    found = {(i, j) for i, j, _ in pairs}
    assert {(src, 12 + k) for k, (src, _, _) in enumerate(copies)} <= found
    origin = {12 + k: src for k, (src, _, _) in enumerate(copies)}
    assert all(origin.get(i, i) == origin.get(j, j) for i, j in found)         # nothing joins two distinct scans
    assert [s for _, _, s in pairs] == sorted((s for _, _, s in pairs), reverse=True)


def test_brightness_contrast_and_identity():
    g = _case(3).gray
    a, b = signature(g), signature(np.clip(g * 0.7 + 30, 0, 255).astype(np.uint8))
    (i, j, s), = similarity_pairs(np.stack([a, b]))
    assert (i, j) == (0, 1) and s > 0.98
    assert similarity_pairs(np.stack([a, a]))[0][2] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        signature(g.astype(np.float32))


def test_small_and_empty_inputs():
    assert similarity_pairs(np.zeros((0, 64, 64), np.uint8)) == []
    assert similarity_pairs(signatures([_case(1).gray])) == []
    best, idx = nearest(signatures([_case(1).gray]), np.zeros((0, 64, 64), np.uint8))
    assert best.tolist() == [-1.0] and idx.tolist() == [-1]
    flat = np.full((64, 64), 90, np.uint8)                     # no texture: never a duplicate of anything
    assert similarity_pairs(np.stack([flat, flat, signature(_case(2).gray)])) == []


def test_leak_check(scans):
    cases, copies = scans
    train = signatures([c.gray for c in cases[:8]])
    held = signatures([cases[9].gray, cases[10].gray, _gray(copies[4][2])])   # the JPEG copy of case 0
    ids_t, ids_h = [f"t{i}" for i in range(8)], ["h9", "h10", "h0jpeg"]
    leak = leak_check(train, held, ids_h, ids_t)
    assert (leak["n_above"], leak["n_heldout"], leak["n_train"]) == (1, 3, 8) and not leak["ok"]
    assert leak["pairs"] == [{"heldout": "h0jpeg", "train": "t0", "score": leak["pairs"][0]["score"]}]
    assert leak_line(leak).startswith("WARNING leak check: 1 of 3 held-out") and "h0jpeg ~ t0" in leak_line(leak)
    clean = leak_check(train, held[:2], ids_h[:2], ids_t)
    assert clean["ok"] and clean["n_above"] == 0 and leak_line(clean).startswith("leak check: 0 of 2")
    images = np.stack([c.gray[:300, :300] for c in cases[:4]] + [cases[0].gray[:300, :300]])
    res = split_leak_check(images, [False, False, False, False, True], list("abcde"))
    assert res["n_above"] == 1 and res["pairs"][0]["train"] == "a"


# ------------------------------------------------------------------------------------------------ the rules
def test_resolve_near_duplicates():
    ids = [f"i{k}" for k in range(7)]
    labels = ["benign", "benign", "malignant", "benign", "malignant", "benign", "normal"]
    hashes = ["h0", "h1", "h2", "h3", "h3", "h5", "h6"]           # i3 == i4: identical, conflicting labels
    groups = ["p0", "p1", "p2", None, None, "p5", "p0"]
    near = [(0, 1), (2, 3), (1, 0)]                                # i2 ~ i3 joins a conflict: all three dropped
    d = resolve_duplicates(ids, labels, hashes, groups, "drop", near_pairs=near)
    assert d.near_sets == [[0, 1]] and d.near_conflicts == [[2, 3, 4]] and d.conflicts == [[3, 4]]
    assert d.keep == [True, True, False, False, False, True, True]
    assert d.groups[0] == d.groups[1] == d.groups[6] == "p0" and d.groups[5] == "p5"
    assert d.identical_groups[:2] == ["p0", "p1"]                  # before the near-duplicates were joined
    plain = resolve_duplicates(ids, labels, hashes, groups, "drop")
    assert plain.near_sets == [] and plain.groups[1] == "p1" and plain.keep[2]


def test_fold_splits_join_moves_only_the_joined_images():
    rng = np.random.default_rng(0)
    n = 200
    labels = list(rng.choice(["benign", "malignant"], n))
    patients = [f"p{k // 2}" for k in range(n)]
    folds = [1 + (k // 2) % 5 for k in range(n)]
    before = fold_splits(labels, patients, folds, 1, 0.1, seed=0)
    a = next(k for k in range(n) if folds[k] == 1)                                   # a test patient ...
    b = next(k for k in range(n) if folds[k] == 3 and before[k] == "train")          # ... and a training patient
    joined = [patients[a] if p == patients[b] else p for p in patients]
    after = fold_splits(labels, joined, folds, 1, 0.1, seed=0, draw_groups=patients)
    changed = {k for k in range(n) if after[k] != before[k]}
    assert changed == {k for k in range(n) if patients[k] == patients[b]} and after[b] == "test"
    assert fold_splits(labels, patients, folds, 1, 0.1, 0, draw_groups=patients) == before
    c = next(k for k in range(n) if folds[k] == 2 and before[k] == "val")
    joined = [patients[c] if p == patients[b] else p for p in patients]               # val + train -> val
    after = fold_splits(labels, joined, folds, 1, 0.1, seed=0, draw_groups=patients)
    assert {k for k in range(n) if after[k] != before[k]} == {k for k in range(n) if patients[k] == patients[b]}
    assert after[b] == "val"


# ------------------------------------------------------------------------------- end to end on the phantom
@pytest.fixture(scope="module")
def phantom_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("neardup")
    out = root / "grouped"
    assert prep.main(["--phantom", "100", "--phantom_seed", "4", "--img_size", "32", "--output_dir", str(out),
                      "--workers", "2"]) == 0
    off = root / "off"
    assert prep.main(["--input_dir", str(out / "raw"), "--img_size", "32", "--output_dir", str(off), "--workers", "2",
                      "--near_duplicates", "off"]) == 0
    return out, off


def _case_id(rel: str) -> str:
    label, name = rel.split("/")
    return f"busi_{label}_{int(name.split('(')[1].split(')')[0]):04d}"


def test_phantom_copies_share_their_originals_split(phantom_runs):
    out, _ = phantom_runs
    ds = open_pair_dataset(out)
    phantom = json.loads((out / "raw" / "phantom.json").read_text())
    near = phantom["near_duplicates"]
    assert {d["variant"] for d in near} == set(NEAR_VARIANTS)
    same = [d for d in near if d["kind"] == "same-label"]
    cross = [d for d in near if d["kind"] == "cross-label"]
    assert len(same) >= 5 and len(cross) >= 2
    ids = {r["id"] for r in ds.rows}
    for d in same:
        a, b = (ds.row(_case_id(f)) for f in d["files"])
        assert a["split"] == b["split"] and a["group"] == b["group"], d
        assert d["files"][0] in b["near_duplicates"].split(";")
    dropped = ds.info["near_duplicates"]["conflicts_dropped"]
    named = [sorted(f["file"] for f in s["images"]) for s in dropped]
    for d in cross:
        assert not {_case_id(f) for f in d["files"]} & ids                          # every copy dropped ...
        assert sorted(d["files"]) in named                                          # ... and named
    assert len(dropped) == len(cross)
    # no distinct cases merged: every near-duplicate set is a planned copy pair (or an identical copy of one)
    planned = [set(d["files"]) for d in near] + [set(d["files"]) for d in phantom["duplicates"]]
    for s in ds.info["near_duplicates"]["sets"]:
        files = {f["file"] for f in s["images"]}
        assert any(files <= p for p in planned), files
    assert len(ds.info["near_duplicates"]["sets"]) == len(same)
    assert ds.info["leak_check"]["n_above"] == 0 and ds.info["leak_check"]["ok"]
    assert ds.info["near_duplicates"]["threshold"] == THRESHOLD and f"{THRESHOLD}" in ds.info["near_duplicates"]["rule"]


def test_phantom_without_grouping_leaks_and_says_so(phantom_runs, capsys):
    out, off = phantom_runs
    ds = open_pair_dataset(off)
    assert ds.info["near_duplicates"]["mode"] == "off" and ds.info["near_duplicates"]["sets"] == []
    leak = ds.info["leak_check"]
    # phantom seed 4, split seed 0: some of the phantom's copies straddle the splits when only identical images
    # are grouped (deterministic; the leak check names them)
    assert leak["n_above"] >= 1 and {p["heldout"] for p in leak["pairs"]} <= {r["id"] for r in ds.rows}
    phantom = json.loads((out / "raw" / "phantom.json").read_text())
    copy_ids = {_case_id(f) for d in phantom["near_duplicates"] for f in d["files"]}
    assert all({p["heldout"], p["train"]} <= copy_ids for p in leak["pairs"])
    # the cross-label copies are kept (only identical conflicts are dropped) when grouping is off
    n_cross = sum(1 for d in phantom["near_duplicates"] if d["kind"] == "cross-label")
    assert ds.info["near_duplicates"]["conflicts_dropped"] == []
    assert len(ds) == len(open_pair_dataset(out)) + 2 * n_cross


def test_flags_and_printed_summary(phantom_runs, tmp_path, capsys):
    out, _ = phantom_runs
    code = prep.main(["--input_dir", str(out / "raw"), "--img_size", "16", "--output_dir", str(tmp_path / "o"),
                      "--workers", "1", "--near_duplicate_threshold", "0.995"])
    printed = capsys.readouterr().out
    assert code == 0 and "near-duplicates (score >= 0.99" in printed and "leak check:" in printed
    info = open_pair_dataset(tmp_path / "o").info
    assert info["near_duplicates"]["threshold"] == 0.995 and info["leak_check"]["threshold"] == 0.995
    assert len(info["near_duplicates"]["sets"]) < len(open_pair_dataset(out).info["near_duplicates"]["sets"])
    with pytest.raises(SystemExit):
        prep.main(["--input_dir", str(out / "raw"), "--near_duplicates", "maybe"])
    from common.cli import run_main
    with pytest.raises(SystemExit) as err:
        run_main(prep.main, ["--input_dir", str(out / "raw"), "--output_dir", str(tmp_path / "x"),
                             "--near_duplicate_threshold", "1.5"])
    assert err.value.code == 2 and "--near_duplicate_threshold must be in (0, 1]" in capsys.readouterr().err
    help_text = " ".join(prep.build_parser().format_help().split())
    assert "--near_duplicates" in help_text and "--near_duplicate_threshold" in help_text
    assert f"(default: {THRESHOLD})" in help_text
