"""FID / KID / IS with torch-fidelity, the offline Inception, the feature cache, FID-infinity and the floors.

Issue 6/10 acceptance: two independent draws of one generator sit within their real-data floors; a degraded copy
(blurred, lesion shapes changed and shifted) is clearly worse and above its floor.

The helpers at the top (shared phantom pair datasets and feature cache in the session's base temp folder, and a
cheap procedural ultrasound-like generator) are imported by the other evaluation tests, so features are computed
once per session.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import ndimage

from data.pairs import PairDatasetWriter, open_pair_dataset
from metrics import floors as Fl
from metrics import generation as G
from metrics import inception as IN

SIZE = 64
N_PHANTOM_REAL = 84   # -> about 58 train + 26 held-out (val + test) pairs after prepare's splits
N_PHANTOM_SYN = 48


# ============================================================================ data
def draw_pairs(n: int, seed: int, size: int = SIZE, probs=(0.5, 0.3, 0.2)):
    """``n`` procedural ultrasound-like pairs (cheap, for unit tests): speckled layered background; benign = smooth wide oval dark lesion,
    malignant = irregular, often taller-than-wide dark lesion with a shadow, normal = no lesion."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["benign", "malignant", "normal"], n, p=probs)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    images, masks = [], []
    for lab in labels:
        field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 10)
        layers = 0.5 + 0.25 * np.sin(yy / size * rng.uniform(4, 9) + rng.uniform(0, 6) + 3 * field)
        echo = layers * (1.0 - 0.4 * yy / size)
        mask = np.zeros((size, size), bool)
        if lab != "normal":
            cy, cx = rng.uniform(0.35, 0.65) * size, rng.uniform(0.3, 0.7) * size
            t = np.arctan2(yy - cy, xx - cx)
            r = np.hypot((yy - cy), (xx - cx))
            if lab == "benign":
                a, b = rng.uniform(0.13, 0.2) * size, rng.uniform(0.07, 0.11) * size  # wider than tall
                rad = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
            else:
                base = rng.uniform(0.09, 0.14) * size
                rad = base * (1 - 0.25 * np.cos(2 * t))  # taller than wide on average
                for k in range(3, 8):
                    rad = rad * (1 + rng.uniform(0.03, 0.12) * np.sin(k * t + rng.uniform(0, 6)))
            mask = r <= rad
            echo = np.where(mask, echo * rng.uniform(0.15, 0.35), echo)
            if lab == "malignant":
                shadow = (xx > cx - 0.5 * rad.mean()) & (xx < cx + 0.5 * rad.mean()) & (yy > cy) & ~mask
                echo = np.where(shadow, echo * 0.6, echo)
        speckle = rng.rayleigh(1.0, (size, size)) / 1.25
        img = np.clip(255 * echo * speckle, 0, 255).astype(np.uint8)
        images.append(img)
        masks.append(mask.astype(np.uint8))
    return np.stack(images), np.stack(masks), labels


def degrade(images: np.ndarray, masks: np.ndarray, seed: int = 0):
    """Blur the images and replace each lesion mask by its bounding box shifted by ~12% of the image."""
    rng = np.random.default_rng(seed)
    out_i = np.stack([ndimage.gaussian_filter(i.astype(float), 2.0) for i in images]).astype(np.uint8)
    out_m = np.zeros_like(masks)
    s = masks.shape[-1]
    for k, m in enumerate(masks):
        if m.any():
            ys, xs = np.nonzero(m)
            dy, dx = rng.choice([-1, 1], 2) * int(0.12 * s)
            y0, y1 = np.clip([ys.min() + dy, ys.max() + 1 + dy], 0, s)
            x0, x1 = np.clip([xs.min() + dx, xs.max() + 1 + dx], 0, s)
            out_m[k, y0:y1, x0:x1] = 1
    return out_i, out_m


def write_pairs(path, images, masks, labels, source="real", splits=None, groups=None, prefix="p"):
    with PairDatasetWriter(path, images.shape[-1]) as w:
        for i in range(len(images)):
            w.add(f"{prefix}{i:04d}", images[i], masks[i], label=str(labels[i]),
                  split="train" if splits is None else splits[i], source=source,
                  group=None if groups is None else groups[i])
        w.commit("tests")
    return open_pair_dataset(path)


def shared_data(tmp_path_factory) -> dict:
    """Session-wide datasets (built once, whichever test module asks first) and feature cache folder.

    Two independent phantom draws prepared at 64 px exactly as a user would (prepare_busi_dataset.py --phantom):
    ``real`` (train/val/test) and ``draw2``; ``synthetic`` is draw2 rewritten as a synthetic set and ``degraded``
    that set blurred with its lesion masks replaced by shifted bounding boxes.
    """
    import prepare_busi_dataset
    root = tmp_path_factory.getbasetemp() / "busdiff_eval_shared"
    paths = {"real": root / "real", "draw2": root / "draw2", "synthetic": root / "synthetic",
             "degraded": root / "degraded", "cache": root / "features", "root": root}
    if not (paths["degraded"] / "dataset.json").exists():
        for key, n, seed in (("real", N_PHANTOM_REAL, 1), ("draw2", N_PHANTOM_SYN, 2)):
            prepare_busi_dataset.main(["--phantom", str(n), "--phantom_seed", str(seed), "--img_size", str(SIZE),
                                       "--output_dir", str(paths[key]), "--workers", "2"])
        draw2 = open_pair_dataset(paths["draw2"])
        si, sm = draw2.load()
        labels = [r["label"] for r in draw2.rows]
        write_pairs(paths["synthetic"], si, sm, labels, "synthetic", prefix="s")
        di, dm = degrade(si, sm)
        write_pairs(paths["degraded"], di, dm, labels, "synthetic", prefix="d")
    return paths


def load_sets(paths: dict, which: str) -> dict:
    real, syn = open_pair_dataset(paths["real"]), open_pair_dataset(paths[which])
    train, held = real.select(split="train"), real.select(split=("val", "test"))
    ri, rm = real.load(train + held)
    si, sm = syn.load()
    return {"real_images": ri, "real_masks": rm, "real_labels": np.array([r["label"] for r in train + held]),
            "real_groups": np.array([r["group"] for r in train + held]),
            "real_heldout": np.array([False] * len(train) + [True] * len(held)),
            "syn_images": si, "syn_masks": sm, "syn_labels": np.array([r["label"] for r in syn.rows])}


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = shared_data(tmp_path_factory)
    return paths, {k: load_sets(paths, k) for k in ("synthetic", "degraded")}


@pytest.fixture(scope="module")
def offline():
    weights = IN.resolve_inception_weights("offline")
    return weights, IN.create_extractor(weights)


@pytest.fixture(scope="module")
def feats(data, offline):
    paths, sets = data
    weights, extractor = offline
    cache = IN.FeatureCache(paths["cache"], weights, [IN.FEATURE])
    out = {}
    for name, key in (("real", "real_images"), ("synthetic", None), ("degraded", None)):
        images = sets["synthetic"]["real_images"] if key else sets[name]["syn_images"]
        out[name], _ = cache.get_or_compute(images, lambda: IN.extract_features(images, extractor, progress=False))
    return out


# ============================================================================ offline Inception
def test_offline_weights_map_onto_torch_fidelity(offline):
    weights, extractor = offline
    assert weights.mode == "offline" and not weights.has_logits and len(weights.sha256) == 64
    # the fid-helper TorchScript network and torch-fidelity's InceptionV3 carrying the mapped weights
    assert IN.offline_forward_check(extractor, n=2, seed=3) < 1e-4
    sd = IN.map_fidhelper_weights()
    assert torch.isnan(sd["fc.weight"]).all()  # no classifier: never offered as a feature
    assert "logits_unbiased" not in extractor.get_provided_features_list()


def test_fid_kid_equal_torch_fidelity_pipeline(data, feats):
    """Our numbers from cached features == torch-fidelity's calculate_metrics with the registered extractor."""
    import torch_fidelity
    _, sets = data
    a, b = sets["synthetic"]["real_images"][:12], sets["synthetic"]["syn_images"][:12]
    tf = torch_fidelity.calculate_metrics(input1=IN._GrayAs3(a), input2=IN._GrayAs3(b), fid=True, kid=True,
                                          kid_subset_size=12, kid_subsets=20, feature_extractor=IN.OFFLINE_EXTRACTOR,
                                          cuda=False, cache=False, verbose=False, save_cpu_ram=True, rng_seed=7)
    fa, fb = feats["real"][IN.FEATURE][:12], feats["synthetic"][IN.FEATURE][:12]
    ours = G.fid(fa, fb)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-3)
    assert G.kid(fa, fb, subsets=20, seed=7)[0] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-3,
                                                                   abs=1e-6)


def test_lowrank_fid_is_torch_fidelity_fid(feats):
    f1, f2 = feats["real"][IN.FEATURE], feats["degraded"][IN.FEATURE]
    assert G.fid_lowrank(f1, f2) == pytest.approx(G.fid_torch_fidelity(f1, f2), rel=1e-4)


def test_auto_falls_back_to_offline_without_network(capsys):
    w = IN.resolve_inception_weights("auto", probe=lambda: (False, "URLError: no network"))
    if IN.torch_fidelity_cached_weights().is_file():
        pytest.skip("torch-fidelity weights are cached on this machine")
    assert w.mode == "offline" and "not downloadable (URLError: no network)" in w.note


def test_missing_weights_file_is_a_user_error(tmp_path):
    from common.errors import UserError
    with pytest.raises(UserError, match="not found"):
        IN.resolve_inception_weights(str(tmp_path / "nope.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pth"):
        IN.resolve_inception_weights(str(tmp_path / "bad.pth"))


def test_feature_cache_hit(tmp_path, offline):
    weights, _ = offline
    cache = IN.FeatureCache(tmp_path, weights, [IN.FEATURE])
    images = np.zeros((3, 16, 16), np.uint8)
    calls = []
    fake = lambda: (calls.append(1), {IN.FEATURE: torch.ones(3, 4)})[1]
    first, hit1 = cache.get_or_compute(images, fake)
    second, hit2 = cache.get_or_compute(images, fake)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and torch.equal(first[IN.FEATURE], second[IN.FEATURE])
    images[0, 0, 0] = 1  # different bytes: different key
    assert not cache.get_or_compute(images, fake)[1]
    other = IN.FeatureCache(tmp_path, IN.InceptionWeights("file", "x", "p", "n", "f" * 64, True, ""), [IN.FEATURE])
    assert other.path(images) != cache.path(images)


# ============================================================================ maths
def test_kid_subset_size_and_is():
    rng = np.random.default_rng(0)
    f1, f2 = torch.from_numpy(rng.normal(size=(30, 64))), torch.from_numpy(rng.normal(size=(25, 64)))
    assert G.kid(f1, f2, subsets=5)[2] == 25
    with pytest.raises(Fl.MetricUnavailable, match="IS unavailable"):
        G.inception_score(None)
    logits = torch.from_numpy(rng.normal(size=(40, 10)) * 3)
    mean, _ = G.inception_score(logits, splits=4)
    assert 1.0 < mean < 10.0


def test_fid_infinity_removes_small_sample_bias():
    rng = np.random.default_rng(0)
    d = 64
    ref = rng.normal(size=(4000, d))
    same = rng.normal(size=(400, d))
    shifted = rng.normal(size=(400, d)) + 0.3
    inf_same = G.fid_infinity(same, ref, seed=1)
    assert inf_same["value"] < 0.35 * G.fid(same, ref)        # the finite-N FID is mostly bias
    inf_shift = G.fid_infinity(shifted, ref, seed=1)
    assert inf_shift["value"] == pytest.approx(d * 0.09, rel=0.35)  # true FID = |mu diff|^2 = 5.76
    assert inf_shift["sizes"][-1] == 400 and inf_shift["slope"] > 0


def test_resplits_keep_groups_together():
    rng = np.random.default_rng(0)
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"])
    held = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 0], bool)
    splits = Fl.real_resplits(groups, held, 6, rng)
    assert np.array_equal(splits[0][1], np.flatnonzero(held))
    for ref, he in splits:
        assert len(he) == 3 and not set(groups[ref]) & set(groups[he])


def test_verdicts():
    floor = {"mean": 80.0, "std": 1.5}
    assert Fl.verdict({"mean": 81.0, "std": 1.0}, floor) == "within floor"
    assert Fl.verdict({"mean": 160.0, "std": 1.0}, floor) == "above floor (2.0x)"
    assert Fl.verdict({"mean": 0.01, "std": 0.001}, {"mean": 0.0002, "std": 0.0003}, ratio_ok=False).startswith(
        "above floor (+")
    assert Fl.verdict({"mean": 0.5, "std": 0.01}, {"mean": 0.7, "std": 0.01}, kind="level").startswith("below floor")


# ============================================================================ acceptance (issues 6 and 10)
def _generation(sets, feats, name):
    s = sets[name]
    return G.evaluate_generation({"real": feats["real"], "synthetic": feats[name]},
                                 {"real": s["real_labels"], "synthetic": s["syn_labels"]}, s["real_groups"],
                                 s["real_heldout"], draws=5, seed=0, kid_subsets=50)


def test_independent_draw_within_floor_degraded_above(data, feats):
    """Issue 6/10 on the phantom: a second phantom draw sits within the real-vs-real floors; a degraded copy of it
    (blurred, lesion masks replaced by shifted boxes) is clearly worse on FID, KID and morphology."""
    from metrics.morphology import evaluate_morphology
    _, sets = data
    good = _generation(sets, feats, "synthetic")
    bad = _generation(sets, feats, "degraded")
    n_held = int(sets["synthetic"]["real_heldout"].sum())
    assert n_held >= 20 and good["all"]["n"] == min(n_held, len(sets["synthetic"]["syn_images"]))
    assert good["headline"] == "kid"
    for metric in ("fid", "kid"):
        g, b = good["all"][metric], bad["all"][metric]
        assert g["verdict"] == "within floor", (metric, g)
        assert b["verdict"].startswith("above floor"), (metric, b)
        assert len(g["synthetic"]["draws"]) == 5 and len(g["floor"]["draws"]) == 5
    assert bad["all"]["fid"]["synthetic"]["mean"] > 1.5 * good["all"]["fid"]["synthetic"]["mean"]
    assert bad["all"]["kid"]["synthetic"]["mean"] > good["all"]["kid"]["synthetic"]["mean"] + \
        4 * max(good["all"]["kid"]["floor"]["std"], 1e-4)
    # the floor does not depend on the synthetic set
    assert good["all"]["fid"]["floor"] == bad["all"]["fid"]["floor"]
    assert good["all"]["is"]["skipped"].startswith("IS unavailable")
    inf = good["all"]["fid_infinity"]
    assert inf["synthetic"]["value"] < good["all"]["fid"]["synthetic"]["mean"]
    # per class: classes with enough images are reported with a few-images warning line, the others say why not
    assert "benign" in good["per_class"] and any("'benign'" in w and "few images" in w for w in good["warnings"])
    for lab, blk in good["per_class"].items():
        assert "verdict" in blk["fid"] or "needs at least 10 images" in blk["fid"]["skipped"]

    def morph(name):
        s = sets[name]
        return evaluate_morphology(s["syn_images"], s["syn_masks"], s["syn_labels"], s["real_images"],
                                   s["real_masks"], s["real_labels"], s["real_groups"], s["real_heldout"])[0]
    mg, mb = morph("synthetic"), morph("degraded")
    assert mg["per_class"]["benign"]["mean_wasserstein"]["verdict"] == "within floor", mg["per_class"]["benign"]
    for lab, blk in mb["per_class"].items():
        if "skipped" not in blk:
            assert blk["mean_wasserstein"]["verdict"].startswith("above floor"), (lab, blk["mean_wasserstein"])
            assert blk["mean_wasserstein"]["synthetic"]["mean"] > \
                2 * mg["per_class"][lab]["mean_wasserstein"]["synthetic"]["mean"]
