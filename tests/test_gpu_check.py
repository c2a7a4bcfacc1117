"""bench/gpu_check.py on a CPU machine: it refuses with one line, and its stage runner keeps what a stage measured
when another stage fails (the GPU itself is exercised only where one is lent)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_refuses_without_cuda(tmp_path):
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--output", str(tmp_path / "g.json")], cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here)"]
    assert not (tmp_path / "g.json").exists()


def test_a_failed_stage_is_recorded_and_the_rest_still_run(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import gpu_check

    out = tmp_path / "g.json"
    res = {"complete": False}
    gpu_check.run_stage(res, "train_eager", str(out), lambda: {"s_per_step": 0.1})
    assert json.loads(out.read_text())["train_eager"] == {"s_per_step": 0.1}   # written after every stage

    def broken():
        raise RuntimeError("exit 2: no Inception weights")
    gpu_check.run_stage(res, "evaluate_s", str(out), broken)
    gpu_check.run_stage(res, "generate", str(out), lambda: {"pairs": 64})
    saved = json.loads(out.read_text())
    assert saved["failed"] == {"evaluate_s": "RuntimeError: exit 2: no Inception weights"}
    assert "evaluate_s" not in saved and saved["generate"] == {"pairs": 64} and saved["train_eager"]
