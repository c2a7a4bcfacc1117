"""metrics/report.py and metrics/figures.py on small hand-built metrics and per-image CSVs: the verdict box first,
the forest plot and the ROC figure in report.html (parsed here, and rendered in headless Chromium when one is
installed), printed lines within 100 columns, verdicts read in each quantity's good direction, one name per
quantity, and the loud warning for a segmenter that predicts nothing."""
from __future__ import annotations

import csv
import html.parser
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from metrics import report as R
from metrics.downstream import METRICS, compare_runs, finalise_family
from metrics.figures import downstream_figures, read_arm, roc_points
from metrics.plan_targets import format_plan_targets, score_plan_targets
from metrics.seg_eval import CSV_COLUMNS, empty_prediction_warning, evaluate_predictions, run_warnings

N_BENIGN, N_MALIGNANT, N_NORMAL = 8, 6, 2


def write_run(path: Path, seed: int, boost: float, empty: bool = False) -> Path:
    """A segmentation run folder holding only per_image_test.csv (the columns train_segmentation.py writes)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = ["benign"] * N_BENIGN + ["malignant"] * N_MALIGNANT + ["normal"] * N_NORMAL
    with open(path / "per_image_test.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for i, lab in enumerate(labels):
            lesion = lab != "normal"
            dice = 0.0 if empty else float(np.clip(0.55 + boost + rng.normal(0, 0.05), 0, 1))
            prob = float(np.clip((0.7 if lab == "malignant" else 0.3) + boost + rng.normal(0, 0.2), 0, 1))
            w.writerow({"id": f"t{i:02d}", "label": lab, "source": "real",
                        "dice": f"{dice:.6f}" if lesion else "", "iou": f"{dice / 1.5:.6f}" if lesion else "",
                        "hd95": f"{90 if empty else 10 - 8 * dice:.6f}" if lesion else "",
                        "pred_label": "malignant" if prob > 0.5 else "benign", "prob_malignant": f"{prob:.6f}",
                        "false_positive": "" if lesion else "0", "pred_area": "0" if empty else ("50" if lesion
                                                                                                 else "0"),
                        "gt_area": "60" if lesion else "0"})
    return path


def _measure(mean, std=0.0):
    return {"mean": mean, "std": std, "draws": [mean]}


def quality(syn, floor, verdict, n=40, std=0.001):
    return {"synthetic": _measure(syn, std), "floor": _measure(floor, std), "n": n, "verdict": verdict}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_runs")
    return {"baseline": [write_run(tmp / f"base{s}", s, 0.0) for s in (0, 1)],
            "combined": [write_run(tmp / f"comb{s}", 10 + s, 0.12) for s in (0, 1)]}


@pytest.fixture(scope="module")
def metrics(runs):
    comp = compare_runs(runs["baseline"], runs["combined"], n_boot=199, seed=0)
    multiplicity = finalise_family({"combined - baseline": comp}, "combined - baseline")
    m = {"command": "python evaluate.py --real_data r --synthetic_data s", "inputs": {"real_data": "r",
                                                                                    "synthetic_data": "s"},
         "config": {"skip": [], "baseline_run": [str(r) for r in runs["baseline"]],
                    "combined_run": [str(r) for r in runs["combined"]]},
         "generation": {"headline": "kid", "all": {
             "kid": quality(0.0577, 0.0004, "above floor (+0.0573)"),
             "fid": quality(74.6, 29.9, "above floor (2.5x)"),
             "is": {"skipped": "IS unavailable: the offline FID Inception has no classifier (logits); use "
                               "--inception_weights download or a torch-fidelity weights file for IS, which is long"},
             "fid_infinity": {"synthetic": {"value": 70.1}, "floor": {"value": 25.2}}},
             "per_class": {"malignant": {"kid": quality(0.06, 0.001, "above floor (+0.059)")}}},
         "similarity": {"nearest_ssim": quality(0.41, 0.40, "within floor"),
                        "ms_ssim_diversity": quality(0.21, 0.30, "below floor (-0.09)")},
         "morphology": {"per_class": {"malignant": {"mean_wasserstein": quality(0.5, 0.2, "above floor (2.5x)"),
                                                    "n": 30, "n_synthetic": 30, "features": {"area": {
                                                        "synthetic_mean": 0.1, "real_train_mean": 0.12,
                                                        "wasserstein": quality(0.3, 0.1, "above floor (3.0x)"),
                                                        "ks": quality(0.2, 0.1, "")}},
                                                    "n_real_train": 30, "n_heldout": 10}}},
         "memorisation": {"threshold": 0.95, "n_flagged": 2, "n_synthetic": 120, "heldout_above_threshold": 0,
                          "heldout_nearest_ncc": {"n": 40}, "similarity": "NCC"},
         "downstream": {"comparison": comp, "multiplicity": multiplicity},
         "warnings": ["KID for class 'malignant' rests on few images (synthetic 6, real train 8, held-out 4; < 50): "
                      "read it as indicative only"]}
    m["plan_targets"] = score_plan_targets(m, comp)
    m["summary"] = R.summary_rows(m)
    m["answer"] = R.answer(m)
    return m


@pytest.fixture(scope="module")
def report_html(metrics, runs):
    return R.render_html(metrics, downstream_figures(metrics, runs))


class Tags(html.parser.HTMLParser):
    """Start tags in document order: (tag, attrs)."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(text: str) -> list[tuple[str, dict[str, str]]]:
    p = Tags()
    p.feed(text)
    return p.tags


def first_in_body(text: str) -> str | None:
    """The id of the body's first element."""
    t = tags(text)
    body = next(k for k, (tag, _) in enumerate(t) if tag == "body")
    return t[body + 1][1].get("id")


# ============================================================================ the report's structure (no browser)
def test_verdict_box_is_the_first_element_of_the_body(report_html, metrics):
    assert first_in_body(report_html) == "verdict" and "<section id='verdict' class='verdict'>" in report_html
    box = report_html[report_html.index("<section id='verdict'"):report_html.index("</section>")]
    assert "Realism" in box and "Memorisation" in box and "Downstream" in box
    assert "KID (headline) 0.0577 vs real-vs-real floor 0.0004" in box and "x the floor" in box
    assert "FID 74.60 vs real-vs-real floor 29.90 (2.5x the floor" in box
    assert "2 of 120 synthetic images flagged" in box
    dice = metrics["downstream"]["comparison"]["metrics"]["dice"]
    assert f"{dice['mean_diff']:+.3f} [95% CI {dice['ci_low']:+.3f}, {dice['ci_high']:+.3f}]" in box
    assert re.search(r"the CI (excludes|includes) zero", box) and "Holm-adjusted p" in box
    assert report_html.index("id='verdict'") < report_html.index("Image quality beside the real-data floor")


def test_forest_roc_paired_and_confusion_figures(report_html):
    t = tags(report_html)
    figures = {a["id"]: k for k, (tag, a) in enumerate(t) if tag == "figure"}
    assert {"forest-plot", "roc-curve", "paired-dice", "confusion-matrix"} <= set(figures)
    for fig_id, words in (("forest-plot", "forest plot"), ("roc-curve", "ROC")):
        tag, img = t[figures[fig_id] + 1]
        assert tag == "img" and words in img["alt"] and img["src"].startswith("data:image/png;base64,")
    assert report_html.count("<figure") == 4 and report_html.count("forest plot:") == 1


def test_missing_parts_say_so_in_words():
    parts = {p["part"]: p for p in R.answer({"config": {"skip": ["fid", "kid", "is", "memorisation"]}})}
    assert parts["realism"]["text"] == "not measured: FID/KID skipped with --skip"
    assert parts["memorisation"]["text"] == "not measured: skipped with --skip memorisation"
    assert parts["downstream"]["text"].startswith("not measured: no segmentation runs given")
    assert {p["tone"] for p in parts.values()} == {"missing"}
    parts = {p["part"]: p for p in R.answer({"generation": {"skipped": "needs at least 10 held-out images"},
                                             "downstream": {"comparison": {"skipped": "no shared test image"}}})}
    assert parts["realism"]["text"] == "not measured: needs at least 10 held-out images"
    assert parts["downstream"]["text"] == "not measured: no shared test image"
    page = R.render_html({"config": {"skip": ["downstream"]}, "similarity": {"skipped": "too few"}}, {})
    assert "not measured: skipped with --skip downstream" in page and first_in_body(page) == "verdict"


# ============================================================================ the terminal
def test_printed_lines_fit_100_columns(metrics):
    text = R.terminal_report(metrics, format_plan_targets(metrics["plan_targets"], width=R.WIDTH))
    lines = text.splitlines()
    assert max(len(x) for x in lines) <= 100, max(lines, key=len)
    assert lines[1].strip() == "THE ANSWER" and "KID (headline)" in text
    assert "…" in text                                   # the long IS reason is cut, and says so
    assert "Holm p" in text and "primary" in text and "change [95% CI]" in text


def test_format_table_cuts_with_an_ellipsis():
    rows = [{"result": "r" * 60, "value": "v" * 30, "detail": "d" * 200}]
    lines = R.format_table(rows, R.OUTCOME_COLUMNS, width=80).splitlines()
    assert max(len(x) for x in lines) <= 80 and len(lines) == 4            # the last column wraps onto 2 lines
    assert lines[2].startswith("r" * 10) and "…" in lines[2] and lines[3].endswith("d…")
    assert R.fit("abcdef", 4) == "abc…" and R.fit("abc", 4) == "abc"


# ============================================================================ directions and names
@pytest.mark.parametrize("raw, better, text, tone", [
    ("above floor (2.3x)", "lower", "worse than floor (2.3x)", "bad"),          # FID / KID: lower is better
    ("below floor (-0.09)", "lower", "better than floor (-0.09)", "good"),      # MS-SSIM: more diverse than real
    ("above floor (+0.1)", "higher", "better than floor (+0.1)", "good"),
    ("below floor (-0.1)", "higher", "worse than floor (-0.1)", "bad"),
    ("below floor (-0.1)", "floor", "worse than floor (-0.1)", "bad"),          # IS / nearest SSIM: at the floor
    ("above floor (+0.1)", "floor", "worse than floor (+0.1)", "bad"),
    ("within floor", "lower", "within floor", "good"),
    ("n/a", "lower", "n/a", "neutral")])
def test_directed_verdict(raw, better, text, tone):
    assert R.directed_verdict(raw, better) == (text, tone)


def test_summary_and_comparison_verdicts_carry_their_direction(metrics, report_html):
    rows = {r["key"]: r for r in metrics["summary"]}
    assert rows["kid"]["tone"] == "bad" and rows["kid"]["verdict"].startswith("worse than floor")
    assert rows["ms_ssim_diversity"]["tone"] == "good" and rows["ms_ssim_diversity"]["better"] == "lower"
    assert rows["ms_ssim_diversity"]["verdict"] == "better than floor (-0.09): more diverse than real"
    assert rows["nearest_ssim"]["verdict"] == "within floor" and rows["nearest_ssim"]["better"] == "at floor"
    assert '<td class="v-good">better than floor (-0.09): more diverse than real</td>' in report_html
    # downstream: a Dice gain (higher is better) and an HD95 drop (lower is better) are both good
    comp = {r["key"]: r for r in R.comparison_rows({"downstream": {"comparison": {"metrics": {
        "dice": {"mean_diff": 0.05, "ci_low": 0.02, "ci_high": 0.08, "baseline": 0.6, "combined": 0.65,
                 "p_value": 0.01, "better": "higher", "role": "primary", "n": 9},
        "hd95": {"mean_diff": -1.0, "ci_low": -1.5, "ci_high": -0.5, "baseline": 5.0, "combined": 4.0,
                 "p_value": 0.01, "p_holm": 0.02, "better": "lower", "n": 9},
        "iou": {"mean_diff": -0.05, "ci_low": -0.08, "ci_high": -0.01, "baseline": 0.5, "combined": 0.45,
                "p_value": 0.01, "p_holm": 0.02, "better": "higher", "n": 9},
        "dice_benign": {"mean_diff": 0.01, "ci_low": -0.02, "ci_high": 0.03, "baseline": 0.6, "combined": 0.61,
                        "p_value": 0.5, "p_holm": 0.5, "better": "higher", "n": 9}}}}})}
    assert (comp["dice"]["tone"], comp["hd95"]["tone"], comp["iou"]["tone"]) == ("good", "good", "bad")
    assert comp["dice_benign"]["tone"] == "neutral" and comp["dice"]["holm"] == "primary"


def test_one_name_per_quantity(metrics, report_html):
    text = R.terminal_report(metrics)
    comp = metrics["downstream"]["comparison"]["metrics"]
    for key in comp:
        name = METRICS[key].name
        assert re.search(rf"(^|\n){re.escape(name)} ", text), name
        assert f"<td>{name}</td>" in report_html, name
        if "_" in key:
            assert f"<td>{key}</td>" not in report_html and f"\n{key} " not in text
    assert "benign recall" in text and "specificity" not in text + report_html


# ============================================================================ figures' inputs
def test_roc_points_and_auc_match_mann_whitney():
    from metrics.seg_eval import auc
    scores, positive = [0.9, 0.8, 0.8, 0.3, 0.2, 0.8], [True, True, False, False, False, True]
    fpr, tpr, area = roc_points(scores, positive)
    assert area == pytest.approx(auc(scores, positive))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(fpr) >= 0)


def test_read_arm_averages_nothing_and_keeps_shared_images(runs):
    arm = read_arm(runs["baseline"])
    assert arm["dice"].shape == (2, N_BENIGN + N_MALIGNANT + N_NORMAL) and len(arm["pred"]) == 2
    assert np.isnan(arm["dice"][:, -1]).all() and not np.isnan(arm["prob"]).any()
    assert read_arm([]) is None


# ============================================================================ a segmenter that predicts nothing
def test_empty_prediction_warning(tmp_path, runs, metrics):
    empty = write_run(tmp_path / "empty", 0, 0.0, empty=True)
    warns = run_warnings([*runs["baseline"], empty])
    assert len(warns) == 1 and str(empty) in warns[0] and "EMPTY mask on every one of its 16 test images" in warns[0]
    # Dice 0 on every lesion image with something predicted somewhere: still loud
    rows = [{"dice": 0.0, "pred_area": 5}, {"dice": None, "pred_area": 0}, {"dice": "0.0", "pred_area": "3"}]
    assert "Dice 0 on every one of its 2 lesion test images" in empty_prediction_warning(rows, "run x")
    assert empty_prediction_warning([{"dice": 0.3, "pred_area": 5}, {"dice": 0.0, "pred_area": 0}], "x") is None
    # the rows the segmentation trainer scores (metrics/seg_eval.py), an all-empty prediction
    gt = np.zeros((3, 8, 8), bool)
    gt[:2, 2:5, 2:5] = True
    _, scored = evaluate_predictions(np.zeros_like(gt), gt, ["benign", "malignant", "normal"], ["a", "b", "c"],
                                     ["real"] * 3)
    assert "EMPTY mask on every one of its 3" in empty_prediction_warning(scored, "this run, on the test split,")
    # in the verdict box, the terminal and the report
    loud = {**metrics, "warnings": metrics["warnings"] + warns}
    loud["answer"] = R.answer(loud)
    assert loud["answer"][-1]["part"] == "warning" and loud["answer"][-1]["tone"] == "bad"
    assert "[BAD]" in R.terminal_report(loud).split("THE ANSWER")[1].split("synthetic vs real")[0]
    box = R.render_html(loud, {}).split("</section>")[0]
    assert "EMPTY mask" in box and "class='bad warning'" in box


# ============================================================================ headless Chromium (where installed)
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                if shutil.which(b)), None)
PROBE = """<script>window.addEventListener('load', () => {
  const b = document.body, v = document.getElementById('verdict');
  b.setAttribute('data-first', b.firstElementChild.id);
  b.setAttribute('data-verdict-top', Math.round(v.getBoundingClientRect().top));
  for (const f of document.querySelectorAll('figure')) {
    const img = f.querySelector('img');
    f.setAttribute('data-drawn', img.complete && img.naturalWidth > 0 ? img.naturalWidth : 0);
    f.setAttribute('data-top', Math.round(f.getBoundingClientRect().top));
  }
});</script>"""


@pytest.mark.skipif(BROWSER is None, reason="no chromium / chromium-browser / google-chrome on PATH")
def test_report_in_headless_chromium(report_html, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report_html.replace("</body>", PROBE + "</body>"))
    res = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    t = tags(res.stdout)
    body = next(a for tag, a in t if tag == "body")
    assert body["data-first"] == "verdict"
    figs = {a["id"]: a for tag, a in t if tag == "figure"}
    for fig_id in ("forest-plot", "roc-curve"):
        assert int(figs[fig_id]["data-drawn"]) > 100, (fig_id, figs[fig_id])   # the PNG decoded and drawn
        assert int(figs[fig_id]["data-top"]) > int(body["data-verdict-top"])
    assert "the answer" in res.stdout and "Realism" in res.stdout
