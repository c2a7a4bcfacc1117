"""Memorisation flags exactly the planted copies; SSIM / MS-SSIM against skimage; nearest-real SSIM."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from metrics.memorisation import carlini_ratio, evaluate_memorisation, meehan_test, shifted_ncc
from metrics.similarity import (evaluate_similarity, ms_ssim, ms_ssim_scales, nearest_ssim, pair_ms_ssim, ssim)
from test_generation_metrics import draw_pairs


@pytest.fixture(scope="module")
def sets():
    train = draw_pairs(120, seed=21)[0]
    held = draw_pairs(40, seed=22)[0]
    syn = draw_pairs(60, seed=23)[0]
    return train, held, syn


def test_ssim_matches_skimage():
    rng = np.random.default_rng(0)
    a = draw_pairs(6, seed=5)[0]
    b = np.clip(a.astype(int) + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    c = np.roll(a, 3, axis=2)
    for x, y in ((a, b), (a, c), (a, a[::-1])):
        ours = ssim(x, y).numpy()
        ref = [structural_similarity(x[i], y[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255) for i in range(len(x))]
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert float(ssim(a[0], a[0])) == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_properties():
    a = draw_pairs(8, seed=6)[0]
    assert ms_ssim_scales(64) == 3 and ms_ssim_scales(32) == 2 and ms_ssim_scales(256) == 5
    np.testing.assert_allclose(ms_ssim(a, a).numpy(), 1.0, atol=1e-5)
    rng = np.random.default_rng(1)
    noisy = np.clip(a.astype(int) + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    v = ms_ssim(a, noisy).numpy()
    assert ((v > 0) & (v < 1)).all()
    # a set of identical images has zero diversity; a varied set does not
    same = np.repeat(a[:1], 10, axis=0)
    assert pair_ms_ssim(same, 50, rng).mean() == pytest.approx(1.0, abs=1e-5)
    assert pair_ms_ssim(a, 50, rng).mean() < 0.9


def test_nearest_ssim_identical_images(sets):
    train, _, _ = sets
    query = train[[5, 17, 90]]
    best, idx = nearest_ssim(query, train, top_k=8)
    np.testing.assert_allclose(best, 1.0, atol=1e-6)
    assert list(idx) == [5, 17, 90]


def test_nearest_ssim_prefilter_finds_exhaustive_best(sets):
    train, held, _ = sets
    best, _ = nearest_ssim(held[:10], train, top_k=16)
    exhaustive = np.array([ssim(np.repeat(h[None], len(train), 0), train).max().item() for h in held[:10]])
    assert (best <= exhaustive + 1e-6).all()
    assert np.mean(np.isclose(best, exhaustive, atol=1e-6)) >= 0.8


def test_shifted_ncc_sees_through_small_shifts():
    import torch
    a = torch.from_numpy(draw_pairs(4, seed=8)[0]).float()
    shifted = torch.roll(a, shifts=(2, -1), dims=(1, 2))
    plain = shifted_ncc(a, shifted, max_shift=0)[0]
    tolerant, shift = shifted_ncc(a, shifted, max_shift=2)
    assert (tolerant > 0.97).all() and (plain < tolerant - 0.1).all()
    assert shift[0].tolist() == [-2, 1] or shift[0].tolist() == [2, -1]


def test_planted_copies_are_exactly_the_flagged_ones(sets):
    train, held, syn = sets
    rng = np.random.default_rng(3)
    salted = syn.copy()
    plants = {4: 10, 11: 33, 25: 71, 40: 100, 52: 7}       # synthetic index -> copied training index
    salted[4] = train[10]                                   # exact copy
    salted[11] = np.clip(train[33] + rng.normal(0, 4, train[33].shape), 0, 255).astype(np.uint8)  # noise
    salted[25] = np.roll(train[71], 2, axis=1)              # shifted 2 px
    salted[40] = np.roll(np.clip(train[100] + rng.normal(0, 3, train[100].shape), 0, 255), (1, -1), (0, 1)
                         ).astype(np.uint8)                 # noise + shift
    salted[52] = np.clip(train[7].astype(int) + 6, 0, 255).astype(np.uint8)  # brightness change
    syn_ids = [f"s{i}" for i in range(len(salted))]
    train_ids = [f"t{i}" for i in range(len(train))]
    res, raw = evaluate_memorisation(salted, train, held, syn_ids, train_ids, threshold=0.95)
    flagged = {f["synthetic_id"]: f["train_id"] for f in res["flagged"]}
    assert flagged == {f"s{s}": f"t{t}" for s, t in plants.items()}
    assert res["n_flagged"] == 5
    # the reference: held-out real images are far below the threshold on this data
    assert res["heldout_above_threshold"] == 0 and res["heldout_nearest_ncc"]["max"] < 0.95
    assert {c["synthetic_id"] for c in res["closest"][:5]} == set(flagged)
    # Carlini ratio: copies stand out from their neighbours
    ratio = carlini_ratio(salted, train)
    assert ratio[4] < 1e-3 and np.median(ratio) > 0.8
    # Meehan: the salted set is not as a whole closer than held-out (5 copies in 60)
    clean, _ = evaluate_memorisation(syn, train, held, syn_ids, train_ids)
    assert clean["n_flagged"] == 0 and clean["meehan"]["p_value"] > 0.01


def test_meehan_detects_a_set_of_copies():
    rng = np.random.default_rng(0)
    res = meehan_test(rng.uniform(0, 0.05, 50), rng.uniform(0.3, 0.6, 40))
    assert res["p_value"] < 1e-6 and res["prob_synthetic_closer"] == pytest.approx(1.0)
    res = meehan_test(rng.uniform(0.3, 0.6, 50), rng.uniform(0.3, 0.6, 40))
    assert res["p_value"] > 0.01


def test_similarity_floors(sets):
    train, held, syn = sets
    real = np.concatenate([train, held])
    is_held = np.array([False] * len(train) + [True] * len(held))
    labels = np.array(["benign"] * len(real))
    res, raw = evaluate_similarity(syn, real, is_held, np.array(["benign"] * len(syn)), labels, draws=4, seed=0,
                                   n_pairs=200)
    assert res["nearest_ssim"]["verdict"] == "within floor", res["nearest_ssim"]
    assert res["ms_ssim_diversity"]["verdict"] == "within floor", res["ms_ssim_diversity"]
    assert res["ms_ssim_diversity"]["scales"] == 3 and res["n"] == len(held)
    # a collapsed generator (one image repeated with noise) is far less diverse than real data
    rng = np.random.default_rng(0)
    collapsed = np.clip(syn[:1].astype(int) + rng.normal(0, 5, (60, 64, 64)), 0, 255).astype(np.uint8)
    res2, _ = evaluate_similarity(collapsed, real, is_held, np.array(["benign"] * 60), labels, draws=4, seed=0,
                                  n_pairs=200, do_nearest=False)
    assert res2["ms_ssim_diversity"]["verdict"].startswith("above floor")
    assert "nearest_ssim" not in res2
