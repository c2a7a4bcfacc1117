"""bench/evidence.py --quick: the issue-12 recipe (prepare BUS-BRA by official folds, diffusion, balanced generation,
combine, four segmentation arms x seeds, evaluation, summary) runs end to end on the committed 12-image BUS-BRA
fixture at a tiny budget. Slow (about two minutes): run with `make test-slow`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "busbra"


@pytest.mark.slow
def test_quick_evidence_runs_every_phase(tmp_path):
    work, runs, res = tmp_path / "data", tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, "bench/evidence.py", "--quick", "--input_dir", str(FIXTURE), "--work_dir", str(work),
           "--runs_dir", str(runs), "--results_dir", str(res), "--seeds", "0,1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((res / "summary.json").read_text())
    assert set(s["arms"]) == {"real", "real_strong", "synthetic", "synthetic_strong"}
    for arm in s["arms"].values():
        assert arm["n_runs"] == 2 and arm["n_test_images"] == 4      # the fixture's official test fold
        assert 0.0 <= arm["dice"]["ci_low"] <= arm["dice"]["mean"] <= arm["dice"]["ci_high"] <= 1.0
    assert s["best_non_synthetic_arm_by_validation_dice"] in ("real", "real_strong")
    assert len(s["comparisons"]) == 3
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
    assert names[:4] == ["prepare", "diffusion", "generate", "combine"] and names[-1] == "evaluate"
    assert len([n for n in names if n.startswith("seg_")]) == 12 and len(set(names)) == len(names)
    assert not (tmp_path / "d").exists()                        # a dry run writes nothing
