"""metrics.plan_targets: each of the plan's targets met / missed / ill-posed / not measured, on hand-built
evaluation metrics and comparisons."""
from __future__ import annotations

from metrics.plan_targets import BALANCE_TOLERANCE, PLAN, format_plan_targets, score_plan_targets


def _evaluation(syn_fid=90.0, floor_fid=52.0, syn_counts=None, all_fid=(74.6, 29.9)):
    fid = lambda s, f, n: {"synthetic": {"mean": s, "std": 1.0}, "floor": {"mean": f, "std": 0.5}, "n": n}  # noqa
    return {"inputs": {"per_class": {"real_train": {"benign": 887, "malignant": 425},
                                     "synthetic": syn_counts if syn_counts is not None else {"malignant": 462}}},
            "generation": {"all": {"fid": fid(*all_fid, 462)}, "per_class": {"malignant": {"fid": fid(syn_fid, floor_fid,
                                                                                                      182)}}},
            "similarity": {"nearest_ssim": {"synthetic": {"mean": 0.333}, "floor": {"mean": 0.300},
                                            "heldout_distribution": {"mean": 0.3, "max": 0.55}}}}


def _comparison(base, diff, lo, hi, metric="dice"):
    return {"metrics": {metric: {"baseline": base, "combined": base + diff, "mean_diff": diff, "ci_low": lo,
                                 "ci_high": hi}}}


def _verdict(table, key):
    return next(r for r in table["rows"] if r["key"] == key)


def test_plan_target_verdicts():
    t = score_plan_targets(_evaluation(), _comparison(0.80, 0.06, 0.01, 0.11))
    fid = _verdict(t, "fid")
    assert fid["verdict"] == "ill-posed" and "N=182" in fid["value"] and "52.0" in fid["reason"]
    assert "not like-for-like" in fid["reason"]           # the all-class FID of a malignant-only set: context only
    assert _verdict(t, "ssim")["verdict"] == "ill-posed" and "copying" in _verdict(t, "ssim")["reason"]
    assert _verdict(t, "dice_gain")["verdict"] == "met"                    # +7.5% with a CI above zero
    assert _verdict(t, "malignant_gain")["verdict"] == "not measured"      # no malignant Dice given
    assert _verdict(t, "balance")["verdict"] == "met" and "67.6%/32.4% -> 50.0%/50.0%" in _verdict(t, "balance")["value"]
    assert t["counts"] == {"met": 2, "missed": 0, "ill-posed": 2, "not measured": 1}
    assert score_plan_targets(_evaluation(syn_fid=45.0, floor_fid=30.0), None)["rows"][0]["verdict"] == "met"
    assert score_plan_targets(_evaluation(syn_fid=60.0, floor_fid=30.0), None)["rows"][0]["verdict"] == "missed"
    both = _evaluation(syn_counts={"benign": 10, "malignant": 472}, all_fid=(45.0, 20.0))
    fid = score_plan_targets(both, None)["rows"][0]                           # like-for-like: all classes
    assert "all classes: 45.0" in fid["value"] and "per class, for reference" in fid["reason"]


def test_plan_target_gains_and_balance_edges():
    lo = PLAN["dice_gain"]["gain"][0]
    assert _verdict(score_plan_targets(None, _comparison(0.80, 0.06, -0.01, 0.12)), "dice_gain")["verdict"] == "missed"
    small = _verdict(score_plan_targets(None, _comparison(0.859, 0.002, -0.010, 0.014)), "dice_gain")
    assert small["verdict"] == "missed" and f"{0.859 * (1 + lo):.3f}" in small["reason"]
    high = _verdict(score_plan_targets(None, _comparison(0.97, 0.01, 0.0, 0.02)), "dice_gain")
    assert high["verdict"] == "ill-posed" and "above the maximum of 1" in high["reason"]
    mal = score_plan_targets(None, _comparison(0.8, 0.09, 0.02, 0.16, metric="dice_malignant"))
    assert _verdict(mal, "malignant_gain")["verdict"] == "met"
    short = _evaluation(syn_counts={"malignant": 100})
    assert _verdict(score_plan_targets(short, None), "balance")["verdict"] == "missed"
    near = {"benign": 1000, "malignant": int(1000 * (1 - 2 * BALANCE_TOLERANCE))}   # 50.25/49.75
    assert _verdict(score_plan_targets(short, None, training_counts=near), "balance")["verdict"] == "met"
    zero = _verdict(score_plan_targets(None, _comparison(0.0, 0.0, 0.0, 0.0)), "dice_gain")
    assert zero["verdict"] == "not measured" and "undefined" in zero["reason"]
    empty = score_plan_targets(None, None)
    assert [r["verdict"] for r in empty["rows"]] == ["not measured", "ill-posed", "not measured", "not measured",
                                                      "not measured"]
    text = format_plan_targets(score_plan_targets(_evaluation(), _comparison(0.8, 0.0, -0.01, 0.01)))
    reasons = [line for line in text.splitlines() if line.startswith("    ")]
    assert reasons and all(len(line) <= 110 for line in reasons) and reasons[0].lstrip().startswith("why:")
