"""The pair-dataset format: write, read, validate, leak rules, atomic commit."""
import json

import numpy as np
import pytest

from data.pairs import (DatasetError, PairDatasetWriter, count_table, open_pair_dataset, validate_rows,
                        write_index)


def _make(tmp_path, n=6, size=16, name="ds"):
    rng = np.random.default_rng(0)
    out = tmp_path / name
    with PairDatasetWriter(out, size) as w:
        for i in range(n):
            img = rng.integers(0, 256, (size, size), dtype=np.uint8)
            mask = np.zeros((size, size), bool)
            mask[2:6 + i % 3, 3:9] = True
            w.add(f"p{i}", img, mask, label=("benign", "malignant")[i % 2], split=("train", "val", "test")[i % 3],
                  source="real", original_file=f"case {i}.png")
        ds = w.commit("python test", {"note": "x"})
    return ds


def test_roundtrip(tmp_path):
    ds = _make(tmp_path)
    again = open_pair_dataset(tmp_path / "ds")
    assert len(again) == 6 and again.img_size == 16
    assert again.info["counts"]["benign"]["train"]["real"] == 1
    assert again.info["note"] == "x" and again.info["command"] == "python test"
    imgs, masks = again.load()
    assert imgs.shape == (6, 16, 16) and imgs.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1}
    assert masks[0].sum() == 4 * 6
    assert again.rows[0]["original_file"] == "case 0.png"
    assert len(ds.select(split="train", labels=["benign", "malignant"])) == 2
    assert not list(tmp_path.glob(".ds.partial-*"))


def test_missing_index_is_not_a_dataset(tmp_path):
    _make(tmp_path)
    (tmp_path / "ds" / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        open_pair_dataset(tmp_path / "ds")


def test_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with PairDatasetWriter(tmp_path / "ds", 8) as w:
            w.add("a", np.zeros((8, 8), np.uint8), np.zeros((8, 8), bool), label="normal", split="train",
                  source="real")
            raise RuntimeError("crash")
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="not a pair dataset"):
        PairDatasetWriter(tmp_path / "ds", 8)


def test_replaces_previous_dataset(tmp_path):
    _make(tmp_path, n=6)
    ds = _make(tmp_path, n=3)
    assert len(open_pair_dataset(ds.root)) == 3


@pytest.mark.parametrize("row, match", [
    ({"id": "a", "label": "cat", "split": "train", "source": "real", "group": "g"}, "label must be"),
    ({"id": "a", "label": "benign", "split": "dev", "source": "real", "group": "g"}, "split must be"),
    ({"id": "a", "label": "benign", "split": "test", "source": "synthetic", "group": "g"}, "synthetic pair"),
    ({"id": "a b", "label": "benign", "split": "train", "source": "real", "group": "g"}, "ids may use"),
    ({"id": "a", "label": "benign", "split": "train", "source": "real", "group": ""}, "empty group"),
])
def test_row_rules(row, match):
    with pytest.raises(DatasetError, match=match):
        validate_rows([row])


def test_group_across_splits_is_leak():
    rows = [{"id": "a", "label": "benign", "split": "train", "source": "real", "group": "patient1"},
            {"id": "b", "label": "benign", "split": "test", "source": "real", "group": "patient1"}]
    with pytest.raises(DatasetError, match="both train and test"):
        validate_rows(rows)


def test_corrupt_and_wrong_size_files(tmp_path):
    ds = _make(tmp_path)
    ds.image_path("p1").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match="p1.png: cannot be decoded"):
        open_pair_dataset(ds.root).load()
    ds = _make(tmp_path, name="ds2")
    import cv2
    cv2.imwrite(str(ds.mask_path("p2")), np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match="p2.png: mask is 8x8 but dataset.json says img_size 16"):
        open_pair_dataset(ds.root).load()


def test_counts_must_match(tmp_path):
    ds = _make(tmp_path)
    info = json.loads((ds.root / "dataset.json").read_text())
    info["counts"]["benign"]["train"]["real"] = 99
    (ds.root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="counts disagree"):
        open_pair_dataset(ds.root)


def test_missing_file_named(tmp_path):
    ds = _make(tmp_path)
    ds.mask_path("p3").unlink()
    with pytest.raises(DatasetError, match="missing p3.png"):
        open_pair_dataset(ds.root)


def test_write_index_in_place(tmp_path):
    (tmp_path / "images").mkdir()
    rows = [{"id": "s1", "label": "malignant", "split": "train", "source": "synthetic", "group": "s1", "seed": 5}]
    info = write_index(tmp_path, rows, 32, "cmd")
    assert info["counts"]["malignant"]["train"]["synthetic"] == 1
    assert count_table(rows)["benign"]["train"]["real"] == 0


def test_atomic_writes_are_readable_by_others(tmp_path):
    """Files written atomically get the permissions of a plain open() under the process umask, not the temporary
    file's private 0600 (a report or reader-study page must be shareable as written)."""
    import os
    import stat
    from common.io import atomic_write_text
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_text(tmp_path / "page.html", "<html></html>")
    assert stat.S_IMODE((tmp_path / "page.html").stat().st_mode) == 0o666 & ~umask
    assert 0o666 & ~umask != 0o600
