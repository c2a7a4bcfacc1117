"""prepare_busi_dataset.py and data/splits.py: split rules, duplicates, every bad input, end-to-end runs."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare_busi_dataset as prep
from common.cli import run_main
from common.errors import UserError
from data.pairs import PairDatasetWriter, open_pair_dataset
from data.splits import assign_splits, fold_splits, resolve_duplicates, split_table
from fixtures.make_raw import ellipse, write_busi, write_udiat, write_udiat_sheet

ROOT = Path(__file__).resolve().parents[1]
BUSBRA = Path(__file__).parent / "fixtures" / "busbra"


def run(argv, capsys):
    """Run the script in-process as a user would; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        run_main(prep.main, [*map(str, argv)])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows_of(out: Path) -> list[dict]:
    with open(out / "metadata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------------------- splits
def _toy(n=900, seed=1):
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    g = 0
    while len(labels) < n:
        lab = rng.choice(["benign", "malignant", "normal"], p=[0.56, 0.27, 0.17])
        for _ in range(int(rng.integers(1, 3))):          # patients with one or two images
            labels.append(str(lab))
            groups.append(f"p{g}")
        g += 1
    return labels, groups


def test_assign_splits_stratified_grouped_deterministic():
    labels, groups = _toy()
    splits = assign_splits(labels, groups, 0.1, 0.2, seed=0)
    for lab in ("benign", "malignant", "normal"):
        idx = [i for i, x in enumerate(labels) if x == lab]
        share = Counter(splits[i] for i in idx)
        for split, want in (("test", 0.2), ("val", 0.1), ("train", 0.7)):
            assert abs(share[split] / len(idx) - want) <= 2 / len(idx) + 1e-9, (lab, split, share)
    where = {}
    for g, s in zip(groups, splits):
        assert where.setdefault(g, s) == s                  # a group never spans splits
    assert assign_splits(labels, groups, 0.1, 0.2, seed=0) == splits
    assert assign_splits(labels, groups, 0.1, 0.2, seed=1) != splits
    # one label's split does not move when another label's images are removed
    keep = [i for i, x in enumerate(labels) if x != "normal"]
    sub = assign_splits([labels[i] for i in keep], [groups[i] for i in keep], 0.1, 0.2, seed=0)
    assert sub == [splits[i] for i in keep]


def test_assign_splits_singletons_small_and_errors():
    s = assign_splits(["benign"] * 10, [None] * 10, 0.1, 0.2, seed=3)
    assert Counter(s) == {"train": 7, "test": 2, "val": 1}
    assert Counter(assign_splits(["normal"] * 3, [None] * 3, 0.1, 0.2, 0)) == {"train": 2, "test": 1}
    mixed = assign_splits(["benign", "malignant", "benign"], ["a", "a", "b"], 0.0, 0.5, 0)
    assert mixed[0] == mixed[1]
    with pytest.raises(UserError):
        assign_splits(["benign"], [None], 0.5, 0.6, 0)
    table = split_table(["benign", "benign", "malignant"], ["train", "test", "train"])
    assert table.splitlines()[1].split() == ["benign", "1", "0", "1", "2"]


def test_fold_splits():
    labels, groups = _toy(500, seed=2)
    rng = np.random.default_rng(0)
    fold_of = {g: int(rng.integers(1, 6)) for g in set(groups)}
    folds = [fold_of[g] for g in groups]
    splits = fold_splits(labels, groups, folds, 3, 0.1, seed=0)
    assert all((s == "test") == (f == 3) for s, f in zip(splits, folds))
    assert abs(splits.count("val") - 50) <= 3
    where = {}
    for g, s in zip(groups, splits):
        assert where.setdefault(g, s) == s
    assert fold_splits(labels, groups, folds, 3, 0.1, seed=0) == splits
    # a group reaching into the test fold goes to test whole
    s2 = fold_splits(["benign"] * 3, ["a", "a", "b"], [1, 2, 2], 1, 0.0, 0)
    assert s2 == ["test", "test", "train"]
    with pytest.raises(UserError, match="--test_fold 7"):
        fold_splits(labels, groups, folds, 7, 0.1, 0)


def test_resolve_duplicates():
    ids = ["a", "b", "c", "d", "e", "f"]
    labels = ["benign", "benign", "malignant", "benign", "normal", "benign"]
    hashes = ["h1", "h1", "h2", "h2", "h3", "h4"]
    groups = [None, "patient7", None, None, None, "patient7"]
    d = resolve_duplicates(ids, labels, hashes, groups, "drop")
    assert d.keep == [True, False, False, False, True, True]
    assert d.same_label == [[0, 1]] and d.conflicts == [[2, 3]] and d.dropped_same_label == 1
    assert d.groups[0] == d.groups[1] == d.groups[5]        # a's copy belongs to patient7: one group
    k = resolve_duplicates(ids, labels, hashes, groups, "keep")
    assert k.keep == [True, True, False, False, True, True] and k.groups == d.groups


# ----------------------------------------------------------------------------------- end to end: BUSI
@pytest.fixture()
def busi(tmp_path):
    write_busi(tmp_path / "download")
    return tmp_path / "download"


def test_busi_end_to_end(busi, tmp_path, capsys):
    before = tree_digest(busi)
    out = tmp_path / "processed"
    code, stdout, err = run(["--input_dir", busi, "--output_dir", out, "--img_size", 32, "--workers", 1], capsys)
    assert code == 0, err
    assert tree_digest(busi) == before                       # input never modified
    ds = open_pair_dataset(out)
    info, rows = ds.info, rows_of(out)
    assert info["cases_found"] == {"benign": 5, "malignant": 3, "normal": 2}
    assert {r["id"] for r in rows} == {"busi_benign_0001", "busi_benign_0002", "busi_benign_0003",
                                       "busi_malignant_0001", "busi_malignant_0002", "busi_normal_0001",
                                       "busi_normal_0002"}
    assert info["counts_after_dedup"] == {"benign": 3, "malignant": 2, "normal": 2}
    assert [[f["file"] for f in c] for c in info["conflicts_dropped"]] == [["benign/benign (4).png",
                                                                            "malignant/malignant (3).png"]]
    assert info["duplicates"]["copies_dropped"] == 1 and info["masks_merged"] == {"images": 2, "extra_masks": 3}
    assert info["format"] == "busi" and info["source_dataset"] == "BUSI" and info["resize"] == "stretch"
    assert info["split"]["mode"] == "random" and info["skipped"] == [] and info["time_s"] >= 0
    b1 = ds.row("busi_benign_0001")
    assert b1["mask_files"].count(";") == 2 and b1["original_image"] == "benign/benign (1).png"
    assert b1["dataset"] == "BUSI" and len(b1["pixel_hash"]) == 40 and int(b1["orig_width"]) > 0
    assert ds.row("busi_benign_0003")["identical_copies"] == "benign/benign (5).png"
    imgs, masks = ds.load()
    assert imgs.shape == (7, 32, 32)
    assert [bool(m.any()) for m in masks] == [r["label"] != "normal" for r in ds.rows]
    assert "benign/benign (4).png (benign) == malignant/malignant (3).png (malignant)" in stdout
    assert "masks merged (OR): 3 extra masks on 2 images" in stdout
    assert "tumour classes: 60% benign / 40% malignant" in stdout
    assert "cases found (before de-duplication): benign 5, malignant 3, normal 2 (10 images)" in stdout
    assert "images/s" in stdout and "train" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging folder left


def test_busi_keep_duplicates_exclude_normal_pad(busi, tmp_path, capsys):
    out = tmp_path / "keep"
    code, stdout, err = run(["--input_dir", busi / "Dataset_BUSI_with_GT", "--output_dir", out, "--img_size", 24,
                             "--duplicates", "keep", "--exclude_normal", "--resize", "pad", "--workers", 2], capsys)
    assert code == 0, err
    ds = open_pair_dataset(out)
    b3, b5 = ds.row("busi_benign_0003"), ds.row("busi_benign_0005")
    assert b3["group"] == b5["group"] and b3["split"] == b5["split"]
    assert {r["label"] for r in ds.rows} == {"benign", "malignant"} and len(ds) == 6
    assert ds.info["resize"] == "pad" and "normal images left out (--exclude_normal): 2" in stdout


# ------------------------------------------------------------------------------- end to end: BUS-BRA
def test_busbra_fixture_uses_official_folds(tmp_path, capsys):
    before = tree_digest(BUSBRA)
    out = tmp_path / "busbra"
    code, stdout, err = run(["--input_dir", BUSBRA.parent, "--format", "busbra", "--output_dir", out,
                             "--img_size", 32, "--workers", 1], capsys)
    assert code == 0, err
    assert tree_digest(BUSBRA) == before
    ds = open_pair_dataset(out)
    assert len(ds) == 12 and ds.info["split"]["mode"] == "folds" and ds.info["split"]["test_fold"] == 1
    test_ids = {r["id"] for r in ds.select(split="test")}
    assert test_ids == {"busbra_0165-l", "busbra_0165-r", "busbra_0191-l", "busbra_0191-r"}
    assert all(r["official_fold"] == "1" for r in ds.select(split="test"))
    for r in ds.rows:                                         # left / right images of a patient share a split
        assert r["group"] == f"busbra_case_{int(r['patient'])}"
        assert all(o["split"] == r["split"] for o in ds.rows if o["patient"] == r["patient"])
    assert ds.info["specks_removed"]["regions"] == 2 and ds.info["csv_size_differs"] == ["busbra_0912-l"]
    assert "official fold 1 of 5-fold-cv.csv" in stdout and "stray mask specks removed: 2" in stdout
    code, _, _ = run(["--input_dir", BUSBRA, "--output_dir", out, "--img_size", 16, "--split", "random",
                      "--workers", 1], capsys)
    assert code == 0 and open_pair_dataset(out).info["split"]["mode"] == "random"
    code, _, err = run(["--input_dir", BUSBRA, "--output_dir", tmp_path / "x", "--test_fold", 9, "--workers", 1],
                       capsys)
    assert code == 2 and "--test_fold 9" in err and not (tmp_path / "x").exists()


def test_udiat_end_to_end(tmp_path, capsys):
    write_udiat(tmp_path / "in")
    out = tmp_path / "udiat"
    code, stdout, err = run(["--input_dir", tmp_path / "in", "--output_dir", out, "--img_size", 16, "--workers", 1],
                            capsys)
    assert code == 0, err
    ds = open_pair_dataset(out)
    assert len(ds) == 6 and ds.info["format"] == "udiat" and ds.info["split"]["mode"] == "random"
    assert ds.row("udiat_000003")["identical_copies"] == "original/000310.png"
    code, _, err = run(["--input_dir", tmp_path / "in", "--output_dir", tmp_path / "u2", "--split", "folds",
                        "--workers", 1], capsys)
    assert code == 2 and "needs official folds" in err and not (tmp_path / "u2").exists()


# ----------------------------------------------------------------------------------------- bad inputs
def _busi_image_without_mask(ds):
    (ds / "benign" / "benign (2)_mask.png").unlink()
    return ds / "benign" / "benign (2).png", "image without mask"


def _busi_mask_without_image(ds):
    shutil.copy(ds / "benign" / "benign (1)_mask.png", ds / "benign" / "benign (99)_mask.png")
    return ds / "benign" / "benign (99)_mask.png", "mask without image"


def _busi_truncated(ds):
    p = ds / "malignant" / "malignant (2).png"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p, "corrupt or truncated image"


def _busi_size_mismatch(ds):
    p = ds / "malignant" / "malignant (2)_mask.png"
    w, h = Image.open(p).size
    Image.fromarray(ellipse(w + 3, h, w / 2, h / 2, 9, 9)).convert("1").save(p)
    return p, "image/mask size mismatch"


def _busi_empty_tumour_mask(ds):
    p = ds / "benign" / "benign (2)_mask.png"
    w, h = Image.open(p).size
    Image.fromarray(np.zeros((h, w), bool)).convert("1").save(p)
    return p, "empty mask in the benign class"


def _busi_normal_with_lesion(ds):
    p = ds / "normal" / "normal (1)_mask.png"
    w, h = Image.open(p).size
    Image.fromarray(ellipse(w, h, w / 2, h / 2, 9, 9)).convert("1").save(p)
    return p, "non-empty mask on a normal image"


@pytest.mark.parametrize("breaker", [_busi_image_without_mask, _busi_mask_without_image, _busi_truncated,
                                     _busi_size_mismatch, _busi_empty_tumour_mask, _busi_normal_with_lesion])
def test_bad_busi_input(breaker, busi, tmp_path, capsys):
    path, rule = breaker(busi / "Dataset_BUSI_with_GT")
    out = tmp_path / "out"
    code, stdout, err = run(["--input_dir", busi, "--output_dir", out, "--img_size", 16, "--workers", 1], capsys)
    assert code == 2
    assert f"{path}: {rule}" in err and "nothing was written" in err and "--on_error skip" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    code, stdout, err = run(["--input_dir", busi, "--output_dir", out, "--img_size", 16, "--workers", 1,
                             "--on_error", "skip"], capsys)
    assert code == 0, err
    info = open_pair_dataset(out).info
    assert [s["path"] for s in info["skipped"]] == [str(path)] and info["skipped"][0]["rule"].startswith(rule)
    assert "skipped problems: 1" in stdout and f"{path}: {rule}" in stdout


def test_bad_label_in_csv_and_xlsx(tmp_path, capsys):
    bb = tmp_path / "BUSBRA"
    shutil.copytree(BUSBRA, bb)
    csv_path = bb / "bus_data.csv"
    csv_path.write_text(csv_path.read_text().replace("mucinous carcinoma,malignant", "mucinous carcinoma,maligant", 1))
    code, _, err = run(["--input_dir", bb, "--output_dir", tmp_path / "o1", "--img_size", 16, "--workers", 1], capsys)
    assert code == 2 and f"{csv_path}: line 7: unknown label 'maligant' for bus_0165-l" in err
    assert not (tmp_path / "o1").exists()
    code, _, err = run(["--input_dir", bb, "--output_dir", tmp_path / "o1", "--on_error", "skip", "--img_size", 16,
                        "--workers", 1], capsys)
    assert code == 0 and len(open_pair_dataset(tmp_path / "o1")) == 11
    bus = write_udiat(tmp_path / "ud")
    write_udiat_sheet(bus / "DatasetB.xlsx", [(1, "Benign"), (2, "Malignant"), (3, "Cyst"), (4, "Malignant"),
                                              (147, "Benign"), (295, "Malignant"), (310, "Benign")])
    code, _, err = run(["--input_dir", tmp_path / "ud", "--output_dir", tmp_path / "o2", "--workers", 1], capsys)
    assert code == 2 and "DatasetB.xlsx: row 4: unknown label 'Cyst' for image 000003" in err
    code, _, err = run(["--input_dir", tmp_path / "ud", "--output_dir", tmp_path / "o2", "--on_error", "skip",
                        "--img_size", 16, "--workers", 1], capsys)
    info = open_pair_dataset(tmp_path / "o2").info
    assert code == 0 and len(info["skipped"]) == 1 and info["counts_after_dedup"]["benign"] == 3


def test_missing_empty_and_unknown_input(tmp_path, capsys):
    code, _, err = run(["--input_dir", tmp_path / "nope", "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "nope: input folder not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["--input_dir", tmp_path / "empty", "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "empty: input folder is empty" in err
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"x")
    code, _, err = run(["--input_dir", tmp_path / "photos", "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "no known dataset layout" in err and "Dataset_BUSI_with_GT" in err
    assert not (tmp_path / "o").exists() and err.count("\n") == 1


def test_every_problem_listed_capped(busi, tmp_path, capsys):
    ds = busi / "Dataset_BUSI_with_GT"
    for i in range(30, 55):                                  # 25 images without masks
        shutil.copy(ds / "benign" / "benign (1).png", ds / "benign" / f"benign ({i}).png")
    _busi_truncated(ds)
    code, _, err = run(["--input_dir", busi, "--output_dir", tmp_path / "o", "--workers", 1], capsys)
    assert code == 2 and "26 problem(s)" in err
    listed = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(listed) == 21 and listed[-1].startswith("  ... and 6 more (image without mask: 25, corrupt")
    assert f"{ds / 'malignant' / 'malignant (2).png'}: corrupt or truncated image" in err   # not only the first kind


def test_interrupted_run_leaves_nothing(busi, tmp_path, capsys, monkeypatch):
    real_add, calls = PairDatasetWriter.add, []

    def add(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(PairDatasetWriter, "add", add)
    code, _, err = run(["--input_dir", busi, "--output_dir", tmp_path / "o", "--workers", 1], capsys)
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_flags_dry_run_help(busi, tmp_path, capsys):
    code, out, _ = run(["--input_dir", busi, "--output_dir", tmp_path / "o", "--dry-run"], capsys)
    assert code == 0 and json.loads(out)["img_size"] == 256 and not (tmp_path / "o").exists()
    code, _, err = run(["--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "neither" in err
    code, _, err = run(["--input_dir", busi, "--phantom", "5", "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "both" in err
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    code, _, err = run(["--input_dir", busi, "--output_dir", tmp_path / "thesis"], capsys)
    assert code == 2 and "not a pair dataset" in err and (tmp_path / "thesis" / "chapter1.tex").exists()
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"input_dir: {busi}\nimg_size: 16\nformat: busi\nworkers: 1\n")
    code, _, err = run(["--config", cfg, "--output_dir", tmp_path / "cfg"], capsys)
    assert code == 0, err
    assert open_pair_dataset(tmp_path / "cfg").img_size == 16
    help_text = prep.build_parser().format_help()
    for text in ("--phantom 200", "BUSBRA", "Dataset_BUSI_with_GT", "--on_error", "--duplicates"):
        assert text in help_text


# ------------------------------------------------------------------------------------------- subprocess
def _script(*args, cwd=ROOT):
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(ROOT / "prepare_busi_dataset.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def test_script_subprocess(busi, tmp_path):
    res = _script("--input_dir", busi, "--output_dir", tmp_path / "p", "--img_size", 16, "--workers", 1)
    assert res.returncode == 0, res.stderr
    assert "conflicting labels: 1 set(s)" in res.stdout and open_pair_dataset(tmp_path / "p").img_size == 16
    res = _script("--input_dir", tmp_path / "missing", "--output_dir", tmp_path / "q")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_phantom_200_at_64(tmp_path):
    out = tmp_path / "phantom64"
    res = _script("--phantom", 200, "--img_size", 64, "--output_dir", out)
    assert res.returncode == 0, res.stderr
    ds = open_pair_dataset(out)
    assert ds.img_size == 64 and ds.info["source_dataset"] == "phantom"
    assert ds.info["cases_found"] == {"benign": 112, "malignant": 54, "normal": 34}   # BUSI's 437:210:133
    assert (out / "raw" / "Dataset_BUSI_with_GT" / "benign").is_dir()               # the raw copy came along
    assert len(ds.info["conflicts_dropped"]) == 1
    ratio = Counter(r["label"] for r in ds.rows)
    benign = round(100 * ratio["benign"] / (ratio["benign"] + ratio["malignant"]))
    assert 66 <= benign <= 69 and f"tumour classes: {benign}% benign / {100 - benign}% malignant" in res.stdout
    for lab in ("benign", "malignant", "normal"):
        rows = ds.select(labels=lab)
        share = Counter(r["split"] for r in rows)
        assert abs(share["test"] / len(rows) - 0.2) < 0.05 and abs(share["val"] / len(rows) - 0.1) < 0.05
    assert all(r["id"].startswith("busi_") and r["dataset"] == "phantom" for r in ds.rows)
