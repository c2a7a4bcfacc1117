"""create_combined_dataset.py / data.combine: balance arithmetic, caps, leak guard, provenance, bad input."""
import json
import math
import os

import numpy as np
import pytest

import create_combined_dataset
from common.errors import UserError
from common.io import sha256_file
from data.combine import balance_counts, plan_combination
from data.pairs import PairDatasetWriter, open_pair_dataset


def write_set(path, spec, size=16, source="real", prefix="r", seed=0):
    """spec: list of (label, split, n). Small random pairs (fast; pixels only need to be distinct)."""
    rng = np.random.default_rng(seed)
    with PairDatasetWriter(path, size) as w:
        k = 0
        for label, split, n in spec:
            for _ in range(n):
                img = rng.integers(0, 256, (size, size), dtype=np.uint8)
                mask = np.zeros((size, size), bool)
                if label != "normal":
                    mask[4:10, 5:11] = True
                w.add(f"{prefix}{k:04d}", img, mask, label=label, split=split, source=source, note=f"n{k}")
                k += 1
        w.commit(f"test {source}")
    return str(path)


REAL_SPEC = [("benign", "train", 68), ("malignant", "train", 32), ("normal", "train", 10),
             ("benign", "val", 7), ("malignant", "val", 3), ("normal", "val", 2),
             ("benign", "test", 14), ("malignant", "test", 6), ("normal", "test", 3)]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    real = write_set(root / "real", REAL_SPEC)
    syn = write_set(root / "syn", [("benign", "train", 60), ("malignant", "train", 90), ("normal", "train", 5)],
                    source="synthetic", prefix="syn_", seed=1)
    return root, real, syn


def ids(rows):
    return {r["id"] for r in rows}


# ---------------------------------------------------------------------------- arithmetic
def test_balance_68_32_becomes_50_50_and_uses_the_budget():
    b, m, warn = balance_counts(68, 32, 1000, 1000, budget=110)  # ratio 1.0 of 110 real training pairs
    assert warn is None and 68 + b == 32 + m
    assert b + m <= 110 and b + m >= 109  # as large as the cap allows (parity may leave one)
    assert (b, m) == (37, 73)
    # no cap: limited by the synthetic set (min(68 + 40, 32 + 60) = 92 per class)
    assert balance_counts(68, 32, 40, 60, budget=None) == (24, 60, None)


def test_balance_too_few_minority_uses_what_there_is():
    b, m, warn = balance_counts(68, 32, 100, 10, budget=None)
    assert (b, m) == (0, 10)
    assert "only 10 malignant" in warn and "36 are needed" in warn and "62% benign / 38% malignant" in warn
    # the cap binds before 50/50 is reachable
    b, m, warn = balance_counts(68, 32, 100, 100, budget=20)
    assert (b, m) == (0, 20) and "allows only 20" in warn
    # benign is the minority
    assert balance_counts(10, 30, 50, 0, budget=None) == (20, 0, None)


def test_plan_is_deterministic_and_respects_cap():
    syn = {"benign": [f"b{i}" for i in range(50)], "malignant": [f"m{i}" for i in range(50)],
           "normal": [f"n{i}" for i in range(9)]}
    real = {"benign": 68, "malignant": 32, "normal": 10}
    p1 = plan_combination(real, syn, True, 0.5, seed=3)
    p2 = plan_combination(real, syn, True, 0.5, seed=3)
    p3 = plan_combination(real, syn, True, 0.5, seed=4)
    assert p1.ids == p2.ids and p1.ids != p3.ids
    assert p1.n_selected <= 55 and 68 + p1.selected["benign"] == 32 + p1.selected["malignant"]
    assert p1.selected["normal"] == 0 and any("normal pairs not used" in w for w in p1.warnings)
    # no balance: every label, capped, shares by largest remainder
    p = plan_combination(real, syn, False, 0.5, seed=0)
    assert p.n_selected == 55 and p.selected == {"benign": 25, "malignant": 25, "normal": 5}
    assert plan_combination(real, syn, False, math.inf, seed=0).n_selected == 109


# ---------------------------------------------------------------------------- end to end
def test_combine_balances_and_keeps_heldout_real(sets, capsys):
    root, real, syn = sets
    out = root / "combined"
    create_combined_dataset.main(["--real_data", real, "--synthetic_data", syn, "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "train tumour classes: 68% benign / 32% malignant -> 50% / 50%" in printed
    ds, r = open_pair_dataset(out), open_pair_dataset(real)
    # validation and test are exactly the real ones: ids, rows, bytes
    for split in ("val", "test"):
        assert ids(ds.select(split=split)) == ids(r.select(split=split))
        assert not ds.select(split=split, source="synthetic")
        for row in r.select(split=split):
            assert ds.row(row["id"]) == {**{k: "" for k in ds.row(row["id"])}, **row}
            for sub in ("images", "masks"):
                assert sha256_file(out / sub / f"{row['id']}.png") == sha256_file(r.root / sub / f"{row['id']}.png")
    # every real training pair is kept; synthetic pairs only in train; 50/50 with as many as the cap allows
    assert ids(r.select(split="train")) <= ids(ds.select(split="train", source="real"))
    syn_rows = ds.select(source="synthetic")
    assert {x["split"] for x in syn_rows} == {"train"} and len(syn_rows) == 110
    nb, nm = len(ds.select(split="train", labels="benign")), len(ds.select(split="train", labels="malignant"))
    assert nb == nm == 105
    info = ds.info["combined"]
    assert info["synthetic_selected"] == {"benign": 37, "malignant": 73, "normal": 0}
    assert info["train_tumour_share_after"] == {"benign": 0.5, "malignant": 0.5}
    assert info["sources"]["real"]["dataset_json_sha256"] == sha256_file(r.root / "dataset.json")
    assert info["sources"]["synthetic"]["command"] == "test synthetic" and info["id_prefix"] == ""
    assert all(x["original_id"] == x["id"] for x in syn_rows)
    assert ds.info["counts"]["malignant"]["train"] == {"real": 32, "synthetic": 73}
    # deterministic given the seed
    out2 = root / "combined2"
    create_combined_dataset.main(["--real_data", real, "--synthetic_data", syn, "--output_dir", str(out2)])
    assert ids(open_pair_dataset(out2).rows) == ids(ds.rows)


def test_combine_too_few_and_no_balance_with_links(sets, capsys):
    root, real, syn = sets
    small = write_set(root / "syn_small", [("benign", "train", 30), ("malignant", "train", 10)], source="synthetic",
                      prefix="s", seed=2)
    out = root / "c_small"
    create_combined_dataset.main(["--real_data", real, "--synthetic_data", small, "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "only 10 malignant pairs; 36 are needed" in printed and "-> 62% / 38%" in printed
    assert open_pair_dataset(out).info["combined"]["synthetic_selected"] == {"benign": 0, "malignant": 10,
                                                                             "normal": 0}
    out = root / "c_nobal"
    create_combined_dataset.main(["--real_data", real, "--synthetic_data", syn, "--output_dir", str(out),
                                  "--no-balance", "--max_synthetic_ratio", "0.2", "--link"])
    ds = open_pair_dataset(out)
    assert len(ds.select(source="synthetic")) == 22  # floor(0.2 x 110)
    some = ds.select(source="synthetic")[0]["id"]
    assert os.path.samefile(out / "images" / f"{some}.png", os.path.join(syn, "images", f"{some}.png"))


def test_colliding_ids_are_prefixed(sets):
    root, real, _ = sets
    clash = write_set(root / "syn_clash", [("malignant", "train", 5)], source="synthetic", prefix="r", seed=3)
    out = root / "c_clash"
    create_combined_dataset.main(["--real_data", real, "--synthetic_data", clash, "--output_dir", str(out)])
    ds = open_pair_dataset(out)
    rows = ds.select(source="synthetic")
    assert len(rows) == 5 and all(x["id"] == "syn_" + x["original_id"] for x in rows)
    assert all(x["group"].startswith("syn_") for x in rows) and ds.info["combined"]["id_prefix"] == "syn_"


@pytest.mark.parametrize("case, match", [
    ("size", "image sizes differ"),
    ("syn_not_train", "outside the training split"),
    ("syn_not_synthetic", "source is not synthetic"),
    ("real_has_synthetic", "holds .* synthetic pair"),
    ("not_dataset", "not a pair dataset"),
    ("overlap", "same folder as --real_data"),
])
def test_bad_input_one_line(sets, tmp_path, case, match):
    root, real, syn = sets
    args = {"--real_data": real, "--synthetic_data": syn, "--output_dir": str(tmp_path / "out")}
    if case == "size":
        args["--synthetic_data"] = write_set(tmp_path / "s32", [("benign", "train", 2)], size=32, source="synthetic")
    elif case == "syn_not_train":
        args["--synthetic_data"] = write_set(tmp_path / "sv", [("benign", "val", 2)], source="real")
    elif case == "syn_not_synthetic":
        args["--synthetic_data"] = write_set(tmp_path / "sr", [("benign", "train", 2)], source="real")
    elif case == "real_has_synthetic":
        args["--real_data"] = write_set(tmp_path / "rs", [("benign", "train", 2), ("benign", "test", 1)])
        mixed = tmp_path / "mixed"
        create_combined_dataset.main(["--real_data", args["--real_data"], "--synthetic_data", syn, "--output_dir",
                                      str(mixed), "--no-balance"])
        args["--real_data"] = str(mixed)
    elif case == "not_dataset":
        (tmp_path / "empty").mkdir()
        args["--synthetic_data"] = str(tmp_path / "empty")
    else:
        args["--output_dir"] = real
    argv = [x for kv in args.items() for x in kv]
    with pytest.raises(UserError, match=match) as exc:
        create_combined_dataset.main(argv)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()
    assert json.loads((open_pair_dataset(real).root / "dataset.json").read_text())["n_pairs"] == 145


def test_script_exit_status_2(sets, tmp_path, capsys):
    _, real, _ = sets
    with pytest.raises(SystemExit) as exc:
        from common.cli import run_main
        run_main(create_combined_dataset.main, ["--real_data", real, "--synthetic_data", str(tmp_path / "none"),
                                                "--output_dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
