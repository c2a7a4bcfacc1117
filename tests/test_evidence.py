"""bench/evidence.py --quick: the issue-12 recipe (prepare BUS-BRA by official folds, diffusion, balanced generation,
combine, four segmentation arms x seeds, evaluation, summary) runs end to end on the committed 12-image BUS-BRA
fixture at a tiny budget. Slow (about two minutes): run with `make test-slow`."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "busbra"
sys.path.insert(0, str(ROOT / "bench"))
import evidence  # noqa: E402
from metrics.downstream import compare_runs  # noqa: E402
from common.errors import UserError  # noqa: E402
from metrics.seg_eval import auc as seg_auc  # noqa: E402


@pytest.mark.slow
def test_quick_evidence_runs_every_phase(tmp_path):
    work, runs, res = tmp_path / "data", tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, "bench/evidence.py", "--quick", "--input_dir", str(FIXTURE), "--work_dir", str(work),
           "--runs_dir", str(runs), "--results_dir", str(res), "--seeds", "0,1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((res / "summary.json").read_text())
    assert set(s["arms"]) == {"real", "real_strong", "synthetic", "synthetic_strong", "conditioned", "real50",
                              "real50_strong", "real50_synthetic"}
    assert s["arm_definitions"]["real50_synthetic"]["regime"] == "50%"
    for arm in s["arms"].values():
        assert arm["n_runs"] == 2 and arm["n_test_images"] == 4      # the fixture's official test fold
        assert 0.0 <= arm["dice"]["ci_low"] <= arm["dice"]["mean"] <= arm["dice"]["ci_high"] <= 1.0
    assert s["best_non_synthetic_arm_by_validation_dice"] in ("real", "real_strong")
    # the declared generator: the evidence preset's signed-distance mask, recorded with the run
    assert all(g["config"]["mask_encoding"] == "sdf" and g["config"]["sdf_width"] == 8.0
               for g in s["generators"].values()) and len(s["generators"]) == 2
    assert len(s["comparisons"]) == 6     # 4 full-data arms and 2 half-data arms against their regime's best
    # issue 17's fields: per comparison ci_method, primary, p_holm and per-class Dice; a plan_targets table
    assert s["primary_endpoint"]["comparison"] == f"synthetic - {s['best_non_synthetic_arm_by_validation_dice']}"
    for comp in s["comparisons"].values():
        assert "two-level bootstrap" in comp["ci_method"] and isinstance(comp["primary"], bool)
        assert {"dice_malignant", "dice_benign", "hd95_malignant", "hd95_benign"} <= set(comp["metrics"])
        assert all("p_holm" in v for v in comp["metrics"].values() if "skipped" not in v)
    assert sum(c["primary"] for c in s["comparisons"].values()) == 1
    assert len(s["plan_targets"]["rows"]) == 5 and "PRIMARY endpoint" in (res / "summary.txt").read_text()
    for name in ("report.html", "evaluation_metrics.json", "synthetic_preview.png", "real_samples.png",
                 "summary.txt", "BUSBRA_LICENSE.txt", "segmentation/synthetic_seed1_per_image_test.csv"):
        assert (res / name).is_file(), name
    # the synthetic pairs sit in the training split only; the combined set keeps the real val/test
    comb = json.loads((work / "combined" / "dataset.json").read_text())
    assert comb["combined"]["n_synthetic"] > 0
    ev = json.loads((res / "evaluation_metrics.json").read_text())
    assert ev["downstream"]["comparison"]["n_baseline_runs"] == 2
    # rerunning resumes: every phase is recognised as done and the summary is rebuilt
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "exists, kept" in again.stdout


def test_bad_input_dir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "bench/evidence.py", "--input_dir", str(tmp_path), "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a BUS-BRA folder" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run_lists_every_task_once(tmp_path):
    proc = subprocess.run([sys.executable, "bench/evidence.py", "--input_dir", str(FIXTURE), "--dry-run",
                           "--work_dir", str(tmp_path / "d"), "--runs_dir", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = [line.split(":")[0] for line in proc.stdout.splitlines()]
    assert names[:4] == ["prepare", "diffusion", "generate", "combine"] and "evaluate" in names
    assert {"generate_cond", "combine_cond", "subset25", "diffusion25", "generate25", "combine25"} <= set(names)
    segs = [n for n in names if n.startswith("seg_")]
    # 5 full-data arms + 3 arms of the 25% regime, 3 seeds each; every seg task after the data it trains on
    assert len(segs) == 24 and len(set(names)) == len(names)
    assert {f"seg_{a}_seed{k}" for a in ("conditioned", "real25", "real25_strong", "real25_synthetic")
            for k in range(3)} <= set(segs)
    assert names.index("combine25") < names.index("seg_real25_synthetic_seed0")
    assert all(n.startswith("evaluate") for n in names[names.index("evaluate"):])
    # every synthetic pair is drawn with the sampler the declared run names (DDIM 50), none with the script default
    draws = [line for line in proc.stdout.splitlines() if line.startswith("generate")]
    assert len(draws) == 3 and all("--sampler ddim --steps 50" in line for line in draws)
    assert not (tmp_path / "d").exists()                        # a dry run writes nothing


def _fake_run(folder: Path, labels, preds, probs, dice, val_dice=0.8):
    folder.mkdir(parents=True)
    rows = ["id,label,source,dice,iou,hd95,pred_label,prob_malignant,false_positive,pred_area,gt_area"]
    for k, (lab, pred, p, d) in enumerate(zip(labels, preds, probs, dice)):
        rows.append(f"img{k},{lab},real,{d},{d / 2},1.0,{pred},{p},,10,10")
    (folder / "per_image_test.csv").write_text("\n".join(rows) + "\n")
    # the run's own AUC, computed as train_segmentation.py computes it
    auc = seg_auc(probs, [lab == "malignant" for lab in labels])
    (folder / "metrics.json").write_text(json.dumps({
        "best_val_dice": val_dice, "test": {"overall": {"dice": {"mean": sum(dice) / len(dice)}},
                                            "classification": {"auc_malignant": auc}}}))


def test_arm_summary_class_rates_auc_and_paired_differences(tmp_path):
    """Malignant recall / benign recall are the per-class hit rates, AUC is the Mann-Whitney statistic, and
    the paired differences (metrics.downstream.compare_runs, as evaluate.py reports them) are arm minus baseline
    on the same images."""
    labels = ["malignant"] * 4 + ["benign"] * 6
    probs = [0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.7, 0.4, 0.05, 0.35]
    base = ["malignant", "malignant", "benign", "benign"] + ["benign"] * 5 + ["malignant"]
    arm = ["malignant"] * 4 + ["benign"] * 4 + ["malignant"] * 2
    _fake_run(tmp_path / "b", labels, base, probs, [0.8] * 10)
    _fake_run(tmp_path / "a", labels, arm, probs, [0.9] * 10)
    s = evidence.arm_summary([tmp_path / "b"])
    assert s["malignant_recall"]["mean"] == pytest.approx(0.5)
    assert s["benign_recall"]["mean"] == pytest.approx(5 / 6)
    # (malignant, benign) pairs ranked correctly, of 24: 0.9 and 0.8 beat all 6, 0.3 beats 3, 0.6 beats 5
    assert s["malignant_auc"]["mean"] == pytest.approx(20 / 24)
    assert s["balanced_accuracy"]["mean"] == pytest.approx((0.5 + 5 / 6) / 2)
    diff = compare_runs([tmp_path / "b"], [tmp_path / "a"])["metrics"]
    assert diff["malignant_recall"]["mean_diff"] == pytest.approx(0.5)
    assert diff["benign_recall"]["mean_diff"] == pytest.approx(4 / 6 - 5 / 6)


def test_arm_summary_without_one_class_does_not_crash(tmp_path):
    """A tiny test split may hold no malignant image: its rates are NaN with n 0, the AUC is absent."""
    _fake_run(tmp_path / "b", ["benign"] * 3, ["benign", "malignant", "benign"], [0.1, 0.6, 0.2], [0.7] * 3)
    s = evidence.arm_summary([tmp_path / "b"])
    assert s["malignant_recall"]["n"] == 0 and s["malignant_recall"]["mean"] != s["malignant_recall"]["mean"]
    assert s["benign_recall"]["mean"] == pytest.approx(2 / 3)
    assert s["malignant_auc"]["mean"] is None
    diff = compare_runs([tmp_path / "b"], [tmp_path / "b"])["metrics"]
    assert diff["malignant_recall"]["n"] == 0 and math.isnan(diff["malignant_recall"]["mean_diff"])
    assert diff["dice_malignant"]["n"] == 0 and "skipped" in diff["dice_malignant"]
    assert diff["benign_recall"]["mean_diff"] == 0.0 and diff["dice_benign"]["n"] == 3


def test_diffusion_history_over_resumed_invocations(tmp_path):
    """Wall-clock sums each record's s/step over the steps it covers, steps redone after a resume count once, and a
    rerun of the finished run is not a resumption."""
    recs = [(100, 1.0), (200, 2.0), (100, 1.5), (200, 1.5), (300, 1.0)]   # killed after 200, resumed from 0
    (tmp_path / "stats.jsonl").write_text("".join(
        json.dumps({"step": st, "s_per_step": sps, "img_per_s": 16 / sps}) + "\n" for st, sps in recs)
        + json.dumps({"step": 300, "val_loss": 0.2}) + "\n")
    (tmp_path / "log.txt").write_text("resumed from x/last.pth at step 0 (epoch 0)\n"
                                      "resumed from x/last.pth at step 300 (epoch 3)\nnothing to do\n")
    h = evidence.diffusion_history(tmp_path)
    assert h["steps"] == 300 and h["resumes"] == 1
    assert h["train_wallclock_s"] == pytest.approx(100 * 1.5 + 100 * 1.5 + 100 * 1.0)
    assert h["img_per_s_median"] == pytest.approx(16 / 1.5)


def _study(tmp_path, arms: dict[str, tuple[float, float]], seeds=(0, 1), results=False):
    """Fake runs: arm -> (Dice level, validation Dice); 8 test images, 4 per class. With ``results`` they are laid
    out like a results folder's segmentation/ copies instead of run folders."""
    labels = ["malignant"] * 4 + ["benign"] * 4
    runs = {}
    for k, (arm, (level, val)) in enumerate(arms.items()):
        for s in seeds:
            dice = [round(level + 0.01 * ((i * 7 + s * 3 + k) % 5), 4) for i in range(8)]
            preds = [lab if (i + s + k) % 3 else "benign" for i, lab in enumerate(labels)]
            _fake_run(tmp_path / f"seg_{arm}_seed{s}", labels, preds, [0.5] * 8, dice, val_dice=val)
            runs.setdefault(arm, []).append(tmp_path / f"seg_{arm}_seed{s}")
            if results:
                seg = tmp_path / "res" / "segmentation"
                seg.mkdir(parents=True, exist_ok=True)
                for f in ("per_image_test.csv", "metrics.json"):
                    (seg / f"{arm}_seed{s}_{f}").write_bytes((tmp_path / f"seg_{arm}_seed{s}" / f).read_bytes())
    return runs


def test_study_primary_endpoint_holm_and_per_class(tmp_path):
    from metrics.study import format_statistics, statistics
    runs = _study(tmp_path, {"real": (0.80, 0.85), "real_strong": (0.78, 0.86), "synthetic": (0.82, 0.84),
                             "synthetic_strong": (0.81, 0.83)})
    s = statistics(runs, {a: evidence.ARMS[a][0] for a in runs}, None, "synthetic", None)
    assert s["best_non_synthetic_arm_by_validation_dice"] == "real_strong"      # chosen on validation, not test
    assert set(s["comparisons"]) == {"real - real_strong", "synthetic - real_strong", "synthetic_strong - real_strong"}
    primary = s["comparisons"]["synthetic - real_strong"]
    assert primary["primary"] and primary["metrics"]["dice"]["role"] == "primary"
    assert s["primary_endpoint"]["comparison"] == "synthetic - real_strong"
    assert "two-level bootstrap" in primary["ci_method"]
    n_secondary = sum(1 for c in s["comparisons"].values() for m, v in c["metrics"].items()
                      if "skipped" not in v and v["role"] == "secondary")
    assert s["multiplicity"]["m"] == n_secondary == 3 * 10 - 1
    for comp in s["comparisons"].values():
        for name in ("dice_malignant", "dice_benign", "hd95_malignant", "hd95_benign"):
            v = comp["metrics"][name]
            assert v["n"] == 4 and v["p_holm"] >= v["p_value"]
    assert s["arms"]["real"]["dice_malignant"]["n"] == 4 and len(s["arms"]["real"]["dice"]["per_seed"]) == 2
    assert [r["key"] for r in s["plan_targets"]["rows"]] == ["fid", "ssim", "dice_gain", "malignant_gain", "balance"]
    text = format_statistics(s)
    assert "PRIMARY endpoint: Dice, synthetic - real_strong" in text and "p_holm" in text and "plan target" in text


def test_study_compares_within_a_regime(tmp_path):
    from metrics.study import statistics
    runs = _study(tmp_path, {"real": (0.80, 0.85), "synthetic": (0.82, 0.84), "real_25": (0.70, 0.75),
                             "synthetic_25": (0.74, 0.76)}, seeds=(0,))
    syn = {"real": False, "synthetic": True, "real_25": False, "synthetic_25": True}
    s = statistics(runs, syn, {"real_25": "25%", "synthetic_25": "25%"}, "synthetic", None)
    assert set(s["comparisons"]) == {"synthetic - real", "synthetic_25 - real_25"}
    assert s["best_non_synthetic_arm_by_regime"] == {"full": "real", "25%": "real_25"}
    assert "NOT in the interval" in s["comparisons"]["synthetic_25 - real_25"]["ci_method"]   # one seed


def test_reanalyse_a_results_folder(tmp_path, capsys):
    _study(tmp_path, {"real": (0.80, 0.85), "synthetic": (0.82, 0.84)}, results=True)
    res = tmp_path / "res"
    old = {"comparisons": {"synthetic - real": {"metrics": {"dice": {"mean_diff": 0.02, "ci_low": 0.015,
                                                                     "ci_high": 0.025, "p_value": 0.001}}}}}
    (res / "summary.json").write_text(json.dumps(old))
    assert evidence.main(["--reanalyse", str(res)]) == 0
    r = json.loads((res / "reanalysis.json").read_text())
    row = next(x for x in r["old_vs_new"] if x["comparison"] == "synthetic - real" and x["metric"] == "dice")
    assert row["old"]["ci_low"] == 0.015 and row["role"] == "primary"
    assert row["two_level"]["ci_low"] <= row["estimate"] <= row["two_level"]["ci_high"]
    assert row["image_only"]["ci_high"] - row["image_only"]["ci_low"] <= (row["two_level"]["ci_high"]
                                                                           - row["two_level"]["ci_low"]) + 1e-12
    assert next(x for x in r["old_vs_new"] if x["metric"] == "dice_malignant")["old"] is None
    assert r["primary_endpoint"]["comparison"] == "synthetic - real" and len(r["runs"]["real"]) == 2
    assert "old (summary.json)" in (res / "reanalysis.txt").read_text() and "PRIMARY" in capsys.readouterr().out
    (res / "segmentation" / "mystery_seed0_per_image_test.csv").write_text("id\n")
    with pytest.raises(UserError, match="unknown arm 'mystery'"):
        evidence.main(["--reanalyse", str(res)])
    with pytest.raises(UserError, match="no <arm>_seed<k>_per_image_test.csv"):
        evidence.main(["--reanalyse", str(tmp_path / "empty")])
