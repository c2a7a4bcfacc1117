"""metrics.downstream (two-level bootstrap, Holm, the primary endpoint) on hand-built per-image tables whose answers
are known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import UserError
from metrics.downstream import (METRICS, Arm, arm_statistics, bootstrap_p_value, compare_arms, finalise_family,
                                holm, load_arm, read_per_image, seeds_pooled)


def arm(labels, dice, correct=None, hd95=None) -> Arm:
    """An arm from [seeds, images] arrays (IoU = Dice / 2, HD95 = 10 - 10 Dice unless given)."""
    dice = np.atleast_2d(np.asarray(dice, dtype=float))
    correct = np.ones_like(dice) if correct is None else np.atleast_2d(np.asarray(correct, dtype=float))
    hd95 = 10 - 10 * dice if hd95 is None else np.atleast_2d(np.asarray(hd95, dtype=float))
    ids = [f"img{i}" for i in range(dice.shape[1])]
    return Arm([f"run{s}" for s in range(dice.shape[0])], ids, np.array(labels, dtype=object),
               {"dice": dice, "iou": dice / 2, "hd95": hd95, "correct": correct}, frozenset(ids))


def width(v):
    return v["ci_high"] - v["ci_low"]


# ============================================================================ estimates
def test_estimates_by_hand():
    labels = ["malignant"] * 2 + ["benign"] * 3
    b = arm(labels, [[0.6, 0.8, 0.9, 0.9, 0.9], [0.8, 0.8, 0.7, 0.9, 0.9]],
            correct=[[1, 0, 1, 1, 0], [1, 1, 1, 1, 0]])
    c = arm(labels, [[0.9, 0.9, 0.9, 0.9, 0.9], [0.7, 0.9, 0.9, 0.9, 0.9]],
            correct=[[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    comp = compare_arms(b, c, n_boot=199)
    m = comp["metrics"]
    # per-image seed means: baseline Dice (0.7, 0.8, 0.8, 0.9, 0.9), combined (0.8, 0.9, 0.9, 0.9, 0.9)
    assert m["dice"]["baseline"] == pytest.approx(4.1 / 5) and m["dice"]["combined"] == pytest.approx(4.4 / 5)
    assert m["dice"]["mean_diff"] == pytest.approx(0.3 / 5)
    assert m["dice_malignant"]["mean_diff"] == pytest.approx(0.1) and m["dice_malignant"]["n"] == 2
    assert m["dice_benign"]["mean_diff"] == pytest.approx(0.1 / 3) and m["dice_benign"]["n"] == 3
    assert m["hd95_malignant"]["mean_diff"] == pytest.approx(-1.0) and m["hd95"]["better"] == "lower"
    # malignant recall: baseline (1, 0.5) -> 0.75; benign recall: baseline (1, 1, 0) -> 2/3
    assert m["malignant_recall"]["baseline"] == pytest.approx(0.75)
    assert m["benign_recall"]["baseline"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"]["baseline"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert m["balanced_accuracy"]["combined"] == pytest.approx(1.0)
    for v in m.values():
        assert v["ci_low"] <= v["mean_diff"] <= v["ci_high"] and 0 < v["p_value"] <= 1
    assert "two-level bootstrap" in comp["ci_method"] and "2 and 2 runs" in comp["ci_method"]
    s = arm_statistics(b, n_boot=199)
    assert s["dice"]["mean"] == pytest.approx(4.1 / 5)
    assert s["dice"]["per_seed"] == pytest.approx([4.1 / 5, 4.1 / 5])
    assert s["malignant_recall"]["per_seed"] == pytest.approx([0.5, 1.0])


def test_seed_variance_widens_the_interval():
    """Per-image values = image effect (shared by the arms) + a large per-seed offset: averaging the seeds first and
    resampling images only sees an almost constant difference; resampling the seeds too shows the seed spread."""
    rng = np.random.default_rng(0)
    n = 60
    labels = ["benign"] * 40 + ["malignant"] * 20
    u = rng.uniform(0.5, 0.9, n)
    noise = rng.normal(0, 0.002, n)
    b = arm(labels, [u + off for off in (-0.05, 0.0, 0.05)])
    c = arm(labels, [u + noise + off for off in (-0.04, 0.0, 0.04)])
    two = compare_arms(b, c, n_boot=1999)["metrics"]["dice"]
    one = compare_arms(seeds_pooled(b), seeds_pooled(c), n_boot=1999)
    assert "NOT in the interval" in one["ci_method"]
    one = one["metrics"]["dice"]
    assert two["mean_diff"] == pytest.approx(one["mean_diff"]) == pytest.approx(noise.mean())
    assert width(one) < 0.002 and width(two) > 0.05
    assert one["p_value"] < two["p_value"]


def test_images_are_paired_across_arms():
    """Huge image-to-image spread, seeds identical, combined = baseline + 0.01 on every image: a paired resampling
    of the images sees 0.01 in every replicate (an unpaired one would see the image spread)."""
    u = np.linspace(0.1, 0.9, 30)
    labels = ["benign", "malignant"] * 15
    comp = compare_arms(arm(labels, [u, u]), arm(labels, [u + 0.01] * 3), n_boot=999)["metrics"]["dice"]
    assert comp["ci_low"] == pytest.approx(0.01) and comp["ci_high"] == pytest.approx(0.01)
    assert comp["p_value"] == pytest.approx(2 / 1000)          # no replicate at or below zero


def test_images_are_resampled_within_class():
    """Benign Dice 1, malignant Dice 0: with the class counts fixed by stratification, every replicate has the same
    overall Dice (an unstratified resampling would move it with the drawn class mix)."""
    labels = ["benign"] * 30 + ["malignant"] * 10
    s = arm_statistics(arm(labels, [[1.0] * 30 + [0.0] * 10] * 2), n_boot=999)["dice"]
    assert s["mean"] == s["ci_low"] == s["ci_high"] == pytest.approx(0.75)


def test_absent_class_is_nan_with_n_0():
    labels = ["benign"] * 4
    b = arm(labels, [[0.8, 0.7, 0.9, 0.6]], correct=[[1, 0, 1, 1]])
    s = arm_statistics(b, n_boot=99)
    for name in ("dice_malignant", "hd95_malignant", "malignant_recall"):
        assert s[name]["n"] == 0 and math.isnan(s[name]["mean"]) and "skipped" in s[name]
    assert s["balanced_accuracy"]["mean"] == pytest.approx(0.75)   # over the tumour classes present
    comp = compare_arms(b, b, n_boot=99)
    assert comp["metrics"]["dice_malignant"]["n"] == 0 and math.isnan(comp["metrics"]["dice_malignant"]["p_value"])
    info = finalise_family({"x": comp}, "x")
    assert info["holm"]["m"] == len([v for v in comp["metrics"].values() if "skipped" not in v]) - 1


def test_one_image_per_class_and_one_run_still_answer():
    s = arm_statistics(arm(["benign", "malignant"], [[0.5, 0.7]]), n_boot=99)
    assert s["ci_method"].startswith("none") and s["dice"]["mean"] == pytest.approx(0.6)
    assert math.isnan(s["dice"]["ci_low"])


def test_same_seed_same_answer_and_bca():
    rng = np.random.default_rng(1)
    labels = ["benign"] * 20 + ["malignant"] * 10
    b, c = (arm(labels, rng.uniform(0.5, 1, (3, 30)), correct=rng.random((3, 30)) < 0.8) for _ in range(2))
    assert compare_arms(b, c, n_boot=499, seed=4) == compare_arms(b, c, n_boot=499, seed=4)
    bca = compare_arms(b, c, n_boot=499, method="BCa")
    assert "BCa" in bca["ci_method"] and bca["metrics"]["dice"]["ci_low"] < bca["metrics"]["dice"]["ci_high"]
    with pytest.raises(UserError, match="percentile, BCa or basic"):
        compare_arms(b, c, method="studentized")


# ============================================================================ reading runs
def _csv(path, rows):
    path.write_text("id,label,dice,iou,hd95,pred_label,source,prob_malignant\n"
                    + "".join(f"{r},real,0.5\n" for r in rows))
    return path


def test_read_per_image_and_bad_input(tmp_path):
    a = _csv(tmp_path / "a.csv", ["i0,benign,0.8,0.6,2.0,benign", "i1,malignant,0.7,0.5,3.0,", "i2,normal,,,,normal"])
    r = read_per_image(a)
    assert r["i0"]["correct"] == 1.0 and math.isnan(r["i1"]["correct"]) and math.isnan(r["i2"]["dice"])
    b = _csv(tmp_path / "b.csv", ["i0,benign,0.8,0.6,2.0,malignant", "i1,malignant,0.7,0.5,3.0,malignant"])
    comp = compare_arms(load_arm([a]), load_arm([b]), n_boot=99)
    assert comp["n_images"] == 2 and "only 2 of 3" in comp["warning"]
    assert comp["metrics"]["malignant_recall"]["n"] == 0            # the baseline predicted no class for i1
    (tmp_path / "bad.csv").write_text("id,label,dice\nx,benign,1\n")
    with pytest.raises(UserError, match=r"bad\.csv: missing column\(s\) iou, hd95, pred_label"):
        read_per_image(tmp_path / "bad.csv")
    with pytest.raises(UserError, match="not found"):
        read_per_image(tmp_path / "nowhere")
    c = _csv(tmp_path / "c.csv", ["i0,malignant,0.8,0.6,2.0,benign"])
    with pytest.raises(UserError, match="i0 is labelled 'malignant' there"):
        load_arm([a, c])


# ============================================================================ p-values and Holm
def test_bootstrap_p_value():
    assert bootstrap_p_value(np.full(999, 0.3)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.linspace(-1, 1, 1001)) == pytest.approx(1.0)
    assert bootstrap_p_value(np.r_[np.full(90, 1.0), np.full(9, -1.0)]) == pytest.approx(2 * 10 / 100)
    assert math.isnan(bootstrap_p_value([np.nan]))


def test_holm_known_values():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, np.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])
    # the committed run's two smallest "significant" secondary p-values among 18 tests do not survive
    assert (holm([0.03, 0.04] + [0.5] * 16)[:2] > 0.05).all()
    with pytest.raises(ValueError):
        holm([0.2, 1.5])


def test_holm_matches_its_definition():
    p = np.random.default_rng(3).uniform(0, 0.2, 12)
    m, order = len(p), np.argsort(p)
    want = np.empty(m)
    for k, i in enumerate(order):
        want[i] = min(1.0, max((m - j) * p[order[j]] for j in range(k + 1)))
    np.testing.assert_allclose(holm(p), want)
    assert (holm(p) >= p).all()


def test_finalise_family_marks_one_primary():
    comps = {"syn - real": {"metrics": {"dice": {"p_value": 0.04}, "iou": {"p_value": 0.01},
                                        "dice_malignant": {"p_value": float("nan"), "skipped": "none"}}},
             "strong - real": {"metrics": {"dice": {"p_value": 0.02}}}}
    info = finalise_family(comps, "syn - real")
    d = comps["syn - real"]["metrics"]["dice"]
    assert comps["syn - real"]["primary"] and not comps["strong - real"]["primary"]
    assert d["role"] == "primary" and d["p_holm"] == 0.04                    # tested alone
    assert comps["syn - real"]["metrics"]["iou"]["p_holm"] == pytest.approx(0.02)   # 2 secondary tests
    assert comps["strong - real"]["metrics"]["dice"]["p_holm"] == pytest.approx(0.02)
    assert comps["strong - real"]["metrics"]["dice"]["role"] == "secondary"
    assert info["holm"]["m"] == 2 and info["primary"]["metric"] == "dice"
    with pytest.raises(UserError, match="primary comparison 'nope'"):
        finalise_family(comps, "nope")


def test_metric_names_are_unique():
    names = [m.name for m in METRICS.values()]
    assert len(set(names)) == len(names) and METRICS["benign_recall"].name == "benign recall"
