"""Tumour morphology features on hand-made shapes, and real-vs-synthetic distances beside their floors."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, ellipse, polygon

from metrics.morphology import FEATURES, ellipse_irregularity, evaluate_morphology, lesion_features
from test_generation_metrics import degrade, draw_pairs

S = 64


def _img(mask, inside=40, outside=160):
    return np.where(mask, inside, outside).astype(np.uint8)


def _disk(r=15, c=(32, 32)):
    m = np.zeros((S, S), bool)
    m[disk(c, r, shape=(S, S))] = True
    return m


def test_circle():
    f = lesion_features(_img(_disk()), _disk())
    assert f["circularity"] == pytest.approx(1.0, abs=0.05)
    assert f["aspect_ratio"] == pytest.approx(1.0, abs=0.03)
    assert f["solidity"] > 0.95 and f["irregularity"] < 0.03 and f["n_components"] == 1
    assert f["area_fraction"] == pytest.approx(np.pi * 15 ** 2 / S ** 2, rel=0.03)
    assert f["contrast"] == pytest.approx(120 / 255)


def test_rectangle_aspect_and_circularity():
    m = np.zeros((S, S), bool)
    m[12:22, 10:50] = True                       # 40 wide, 10 tall
    f = lesion_features(_img(m), m)
    assert f["aspect_ratio"] == pytest.approx(4.0, rel=0.03)
    assert f["height_width"] == pytest.approx(0.25)
    assert f["solidity"] == pytest.approx(1.0)
    assert f["circularity"] < 0.7                 # 4 pi 400 / 100^2 = 0.50 for the ideal rectangle


def test_taller_than_wide():
    tall = np.zeros((S, S), bool)
    tall[ellipse(32, 32, 20, 8)] = True          # 20 rows radius, 8 columns radius
    wide = tall.T.copy()
    assert lesion_features(_img(tall), tall)["height_width"] > 2.0
    assert lesion_features(_img(wide), wide)["height_width"] < 0.5
    # elongation alone is not margin irregularity
    assert ellipse_irregularity(tall) < 0.05


def test_irregular_margin_and_components():
    t = np.linspace(0, 2 * np.pi, 400)
    r = 14 + 6 * np.sin(8 * t)
    star = np.zeros((S, S), bool)
    star[polygon(32 + r * np.sin(t), 32 + r * np.cos(t), (S, S))] = True
    fs, fd = lesion_features(_img(star), star), lesion_features(_img(_disk()), _disk())
    assert fs["irregularity"] > fd["irregularity"] + 0.2
    assert fs["solidity"] < fd["solidity"] - 0.2 and fs["circularity"] < 0.5
    two = _disk(6, (16, 16)) | _disk(8, (45, 45))
    f2 = lesion_features(_img(two), two)
    assert f2["n_components"] == 2
    assert f2["circularity"] == pytest.approx(1.0, abs=0.08)   # shape features of the largest component
    assert lesion_features(_img(two), np.zeros_like(two)) is None


def test_contrast_sign():
    m = _disk()
    bright = lesion_features(_img(m, inside=200, outside=100), m)
    assert bright["contrast"] < 0                  # hyperechoic lesion
    assert lesion_features(_img(m), m)["contrast"] > 0


@pytest.fixture(scope="module")
def populations():
    real = draw_pairs(300, seed=11)
    other = draw_pairs(200, seed=12)
    bad_i, bad_m = degrade(other[0], other[1], seed=1)
    held = np.zeros(300, bool)
    held[200:] = True
    return real, other, (bad_i, bad_m, other[2]), held


def _run(real, syn, held):
    groups = np.array([f"g{i}" for i in range(len(real[0]))])
    return evaluate_morphology(syn[0], syn[1], syn[2], real[0], real[1], real[2], groups, held, draws=5, seed=0)[0]


def test_independent_draw_within_floor_degraded_above(populations):
    real, other, bad, held = populations
    good, worse = _run(real, other, held), _run(real, bad, held)
    for lab in ("benign", "malignant"):
        g, b = good["per_class"][lab], worse["per_class"][lab]
        assert set(g["features"]) == set(FEATURES)
        assert g["mean_wasserstein"]["verdict"] == "within floor", (lab, g["mean_wasserstein"])
        assert b["mean_wasserstein"]["verdict"].startswith("above floor"), (lab, b["mean_wasserstein"])
        assert b["mean_wasserstein"]["synthetic"]["mean"] > 2 * g["mean_wasserstein"]["synthetic"]["mean"]
        for feat in ("solidity", "irregularity", "contrast"):
            assert b["features"][feat]["wasserstein"]["verdict"].startswith("above floor"), (lab, feat)
        assert g["n"] == min(g["n_synthetic"], g["n_heldout"])
    assert good["empty_masks"]["normal"]["synthetic"] == 1.0
    # malignant lesions of this generator are mostly taller than wide, benign ones wide
    assert good["per_class"]["malignant"]["taller_than_wide"]["real_train"] > \
        good["per_class"]["benign"]["taller_than_wide"]["real_train"]


def test_few_lesions_warn_and_skip(populations):
    real, other, _, held = populations
    few = tuple(a[:12] for a in other)
    res = _run(real, few, held)
    assert any("few lesions" in w for w in res["warnings"])
    tiny = tuple(a[:3] for a in other)
    res = _run(real, tiny, held)
    assert any("skipped" in blk and "at least" in blk["skipped"] for blk in res["per_class"].values())
