"""evaluate.py end to end: metrics.json keys, a self-contained report.html, the downstream comparison, bad inputs."""
from __future__ import annotations

import csv
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import evaluate
from models import loading
from common.errors import UserError
from data.pairs import open_pair_dataset
from common.checkpoint import save_checkpoint
from test_generation_metrics import draw_pairs, shared_data, write_pairs

ROOT = Path(__file__).resolve().parents[1]


class DarkSegmenter(nn.Module):
    """Stand-in segmenter: lesion = locally dark (a smoothed image below a learnable level)."""

    def __init__(self, level: float = 0.25):
        super().__init__()
        self.level = nn.Parameter(torch.tensor(level))

    def forward(self, x):
        smooth = nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
        logits = (self.level - smooth) * 40
        return {"mask_logits": logits, "class_logits": torch.zeros(len(x), 3)}


def _standin_builder(name, **kwargs):
    assert name == "dark"
    return DarkSegmenter(**kwargs)


def _fake_run(path: Path, real_ds, seed: int, boost: float) -> Path:
    """A segmentation run folder: best_model.pth (stand-in) + per_image_test.csv over the real test images."""
    path.mkdir(parents=True)
    save_checkpoint(path / "best_model.pth", {"kind": "segmenter", "model_name": "dark", "model_kwargs": {},
                                              "model": DarkSegmenter().state_dict(), "config": {"img_size": 64}})
    rng = np.random.default_rng(seed)
    with open(path / "per_image_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "source", "dice", "iou", "hd95", "pred_label", "prob_malignant"])
        for i, row in enumerate(real_ds.select(split="test")):
            lesion = row["label"] != "normal"
            d = min(1.0, 0.6 + boost + rng.normal(0, 0.05)) if lesion else None
            pred = row["label"] if rng.random() < 0.6 + boost else "benign"
            w.writerow([row["id"], row["label"], "real", "" if d is None else d, "" if d is None else d * 0.8,
                        "" if d is None else 10 - 10 * d, pred, 0.5])
    (path / "metrics.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def run_outputs(tmp_path_factory):
    paths = shared_data(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("evaluate")
    real = open_pair_dataset(paths["real"])
    base = [_fake_run(tmp / f"base{s}", real, s, 0.0) for s in (0, 1)]
    comb = [_fake_run(tmp / f"comb{s}", real, 10 + s, 0.15) for s in (0, 1)]
    out = tmp / "report"
    # the second phantom draw as it comes (no synthetic-source rows: evaluated whole as the synthetic side)
    argv = [sys.executable, str(ROOT / "evaluate.py"), "--real_data", str(paths["real"]), "--synthetic_data",
            str(paths["draw2"]), "--output_dir", str(out), "--inception_weights", "offline", "--cache_dir",
            str(paths["cache"]), "--floor_draws", "3", "--kid_subsets", "30", "--diversity_pairs", "100"]
    for b in base:
        argv += ["--baseline_run", str(b)]
    for c in comb:
        argv += ["--combined_run", str(c)]
    # the stand-in segmenter goes in through the module hook, so run main() in this process
    old = loading.SEGMENTER_BUILDER
    loading.SEGMENTER_BUILDER = _standin_builder
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            evaluate.main(argv[2:])
    finally:
        loading.SEGMENTER_BUILDER = old
    (tmp / "printed.txt").write_text(printed.getvalue())
    return out, paths


def test_end_to_end_metrics_and_report(run_outputs):
    out, paths = run_outputs
    m = json.loads((out / "metrics.json").read_text())
    for key in ("command", "config", "inputs", "generation", "similarity", "morphology", "memorisation",
                "downstream", "summary", "warnings", "timings_s"):
        assert key in m, key
    real = open_pair_dataset(paths["real"])
    n_train, n_held = len(real.select(split="train")), len(real.select(split=("val", "test")))
    assert (m["inputs"]["n_real_train"], m["inputs"]["n_heldout"]) == (n_train, n_held)
    assert m["inputs"]["n_synthetic"] == len(open_pair_dataset(paths["draw2"]))
    assert "no synthetic-source pairs" in m["inputs"]["synthetic_selection"]
    leak = m["leak_check"]                                 # near-duplicates across the real splits: none
    assert (leak["n_heldout"], leak["n_train"], leak["n_above"], leak["ok"]) == (n_held, n_train, 0, True)
    gen = m["generation"]
    assert gen["weights"]["mode"] == "offline" and len(gen["weights"]["sha256"]) == 64
    assert gen["offline_check_max_abs_diff"] < 1e-4
    assert gen["headline"] == "kid"
    for name in ("fid", "kid"):
        blk = gen["all"][name]
        assert {"synthetic", "floor", "verdict", "n", "full_sets"} <= set(blk)
        assert blk["n"] == min(n_held, m["inputs"]["n_synthetic"]) and len(blk["synthetic"]["draws"]) == 3
    assert "IS unavailable" in gen["all"]["is"]["skipped"]
    assert "value" in gen["all"]["fid_infinity"]["synthetic"]
    assert {"nearest_ssim", "ms_ssim_diversity"} <= set(m["similarity"])
    assert "benign" in m["morphology"]["per_class"]
    assert m["memorisation"]["n_flagged"] == 0 and "heldout_nearest_ncc" in m["memorisation"]
    align = m["downstream"]["alignment"]
    assert set(align["per_class"]) <= {"benign", "malignant", "normal"} and 0 <= align["all"]["mean"] <= 1
    comp = m["downstream"]["comparison"]
    assert comp["n_baseline_runs"] == 2 and comp["n_images"] == len(real.select(split="test"))
    dice = comp["metrics"]["dice"]
    assert dice["ci_low"] <= dice["mean_diff"] <= dice["ci_high"] and dice["mean_diff"] > 0.05
    assert comp["metrics"]["balanced_accuracy"]["better"] == "higher"
    assert m["summary"][0]["metric"].startswith("KID")
    assert any("few images" in w for w in m["warnings"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6
    assert html.index("real vs real (floor)") < html.index("Samples per class")
    assert "Closest pairs" in html and "Baseline vs combined" in html
    assert html.index("Privacy and downstream at a glance") < html.index("Samples per class")
    # the printed summary: the quality table, then memorisation flags and baseline vs combined with CIs
    printed = (out.parent / "printed.txt").read_text()
    assert "real vs real (floor)" in printed and f"leak check: 0 of {n_held} held-out" in printed
    n_syn = m["inputs"]["n_synthetic"]
    assert re.search(rf"copies \(NCC >= 0\.95 to a train image\) +{m['memorisation']['n_flagged']} of {n_syn}", printed)
    assert "change = combined − baseline" in printed and "change [95% CI]" in printed
    for name in ("Dice", "IoU", "HD95 (px)", "balanced accuracy"):
        assert re.search(rf"^{re.escape(name)} +[0-9.]+ +[0-9.]+ +[-+][0-9.]+ \[[-+][0-9.]+, [-+][0-9.]+\] +[0-9.]",
                         printed, re.M), name
    diff = re.escape(f"{dice['mean_diff']:+.3f}")
    assert re.search(rf"^Dice +{dice['baseline']:.3f} +{dice['combined']:.3f} +{diff} \[", printed, re.M)
    # the answer first: the verdict box opens the printed summary and the report; nothing printed is wider than 100
    lines = printed.splitlines()
    top = next(k for k, ln in enumerate(lines) if ln.strip() == "THE ANSWER")
    end = next(k for k, ln in enumerate(lines) if ln.startswith("wrote "))
    assert lines[top - 1] == "=" * 100 and "realism" in lines[top + 2]
    assert max(len(ln) for ln in lines[top - 1:end]) <= 100
    assert [p["part"] for p in m["answer"]][:3] == ["realism", "memorisation", "downstream"]
    assert "KID (headline)" in m["answer"][0]["text"] and "the primary endpoint" in m["answer"][2]["text"]
    body = html[html.index("<body>") + len("<body>"):]
    assert body.startswith("<section id='verdict'")
    for fig_id in ("forest-plot", "roc-curve", "paired-dice", "confusion-matrix"):
        assert f'<figure id="{fig_id}">' in html, fig_id
    # tumour Dice is the primary endpoint; the other metrics carry a Holm-adjusted p; the plan's targets are scored
    assert dice["role"] == "primary" and comp["primary"] and "two-level bootstrap" in comp["ci_method"]
    assert m["downstream"]["multiplicity"]["holm"]["m"] == sum(
        1 for v in comp["metrics"].values() if "skipped" not in v) - 1
    assert all(v["p_holm"] >= v["p_value"] for v in comp["metrics"].values() if "skipped" not in v)
    assert comp["metrics"]["dice_malignant"]["n"] > 0 and "Holm p" in html
    rows = {r["key"]: r for r in m["plan_targets"]["rows"]}
    assert rows["ssim"]["verdict"] == "ill-posed" and rows["dice_gain"]["verdict"] in ("met", "missed")
    assert "plan target" in printed and "primary" in printed and "Holm p" in printed


def test_summary_printed(run_outputs, tmp_path_factory, capsys):
    out, paths = run_outputs
    res = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--real_data", str(paths["real"]),
                          "--synthetic_data", str(paths["degraded"]), "--output_dir", str(out.parent / "deg"),
                          "--inception_weights", "offline", "--cache_dir", str(paths["cache"]), "--floor_draws", "3",
                          "--kid_subsets", "30", "--skip", "ssim,diversity,memorisation"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "real vs real (floor)" in res.stdout and "worse than floor" in res.stdout
    assert "not measured: skipped with --skip memorisation" in res.stdout.replace("\n" + " " * 24, " ")
    assert "features from cache" in res.stdout
    m = json.loads((out.parent / "deg" / "metrics.json").read_text())
    assert "similarity" not in m and "memorisation" not in m


# ============================================================================ bad inputs
def _run(argv):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_not_a_pair_dataset_exits_2(tmp_path, tmp_path_factory):
    paths = shared_data(tmp_path_factory)
    (tmp_path / "empty").mkdir()
    res = _run(["--real_data", str(paths["real"]), "--synthetic_data", str(tmp_path / "empty"),
                "--output_dir", str(tmp_path / "o")])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and str(tmp_path / "empty") in res.stderr
    assert "not a pair dataset" in res.stderr and "Traceback" not in res.stderr


def test_mismatched_sizes(tmp_path, tmp_path_factory):
    paths = shared_data(tmp_path_factory)
    i, m, l = draw_pairs(12, seed=5, size=32)
    write_pairs(tmp_path / "small", i, m, l, "synthetic")
    with pytest.raises(UserError, match=r"image sizes differ: .*real is 64 px, .*small is 32 px"):
        evaluate.main(["--real_data", str(paths["real"]), "--synthetic_data", str(tmp_path / "small"),
                       "--output_dir", str(tmp_path / "o")])


def test_missing_weights_file(tmp_path, tmp_path_factory):
    paths = shared_data(tmp_path_factory)
    with pytest.raises(UserError, match=r"nope\.pth: Inception weights file not found"):
        evaluate.main(["--real_data", str(paths["real"]), "--synthetic_data", str(paths["synthetic"]),
                       "--output_dir", str(tmp_path / "o"), "--inception_weights", str(tmp_path / "nope.pth")])


def test_unknown_skip_and_missing_args(tmp_path):
    with pytest.raises(UserError, match="required"):
        evaluate.main(["--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="unknown stage"):
        evaluate.main(["--real_data", "a", "--synthetic_data", "b", "--skip", "fid,colour"])


def test_too_few_images_are_reported_per_metric(tmp_path, tmp_path_factory):
    """3 synthetic images: FID/KID/morphology say why they were skipped (and how many), the rest still runs."""
    paths = shared_data(tmp_path_factory)
    syn = open_pair_dataset(paths["synthetic"])
    i, m = syn.load(syn.rows[:3])
    write_pairs(tmp_path / "three", i, m, [r["label"] for r in syn.rows[:3]], "synthetic")
    evaluate.main(["--real_data", str(paths["real"]), "--synthetic_data", str(tmp_path / "three"), "--output_dir",
                   str(tmp_path / "o"), "--inception_weights", "offline", "--cache_dir", str(paths["cache"]),
                   "--floor_draws", "2", "--skip", "is"])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "needs at least 10" in m["generation"]["all"]["fid"]["skipped"]
    assert "synthetic 3" in m["generation"]["all"]["fid"]["skipped"]
    assert all("skipped" in blk for blk in m["morphology"]["per_class"].values())
    assert m["similarity"]["nearest_ssim"]["n"] == 3 and m["memorisation"]["n_synthetic"] == 3


def test_no_heldout_split(tmp_path, tmp_path_factory):
    paths = shared_data(tmp_path_factory)
    i, m, l = draw_pairs(20, seed=9)
    write_pairs(tmp_path / "trainonly", i, m, l, "real")
    with pytest.raises(UserError, match=r"no metric could be computed .*0 held-out .*at least 10"):
        evaluate.main(["--real_data", str(tmp_path / "trainonly"), "--synthetic_data", str(paths["synthetic"]),
                       "--output_dir", str(tmp_path / "o"), "--skip", "fid,kid,is,memorisation"])


def test_leak_check_flags_a_copy_across_the_splits(tmp_path, tmp_path_factory, capsys):
    """A held-out real image that is a copy (shifted, re-encoded) of a training image: printed loudly, a warning,
    and the pair named in metrics.json."""
    import cv2
    paths = shared_data(tmp_path_factory)
    i, m, l = draw_pairs(24, seed=5)
    i[20] = np.roll(i[3], (2, -1), (0, 1))
    i[21] = cv2.imdecode(cv2.imencode(".jpg", i[7], [cv2.IMWRITE_JPEG_QUALITY, 70])[1], cv2.IMREAD_GRAYSCALE)
    splits = ["train"] * 14 + ["val"] * 4 + ["test"] * 6
    write_pairs(tmp_path / "leaky", i, m, l, "real", splits=splits)
    evaluate.main(["--real_data", str(tmp_path / "leaky"), "--synthetic_data", str(paths["synthetic"]),
                   "--output_dir", str(tmp_path / "o"), "--skip", "fid,kid,is,ssim,diversity,morphology"])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    leak = m["leak_check"]
    assert leak["n_above"] == 2 and not leak["ok"] and leak["n_heldout"] == 10
    assert {(p["heldout"], p["train"]) for p in leak["pairs"]} == {("p0020", "p0003"), ("p0021", "p0007")}
    assert any(w.startswith("WARNING leak check: 2 of 10 held-out") for w in m["warnings"])
    assert "WARNING leak check: 2 of 10" in capsys.readouterr().out
