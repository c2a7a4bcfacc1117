"""The bad-input sweep's defect classes, for the two trainers: nothing lost, nothing stale left looking finished,
refusals change nothing, one line and exit 2 for bad flags and preset values, one run per folder."""
import json
import os
import stat

import numpy as np
import pytest

import train_medsegdiff
import train_segmentation
from common.checkpoint import load_checkpoint
from common.errors import UserError
from common.outputs import OutputLock
from data.pairs import PairDatasetWriter

from refusals import cli, one_line_refusal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model_channels", "8", "--channel_mult", "1,2", "--num_res_blocks", "1", "--transformer_depth", "1",
        "--num_heads", "2", "--batch_size", "4", "--log_every", "2", "--save_every", "2", "--sample_every", "0",
        "--val_timesteps", "1", "--device", "cpu", "--precision", "fp32"]
TINY_UNET = ["--model", "unet", "--base_width", "4", "--depth", "2", "--norm", "group", "--batch_size", "4",
             "--device", "cpu", "--precision", "fp32"]


def pairs(path, seed=0, n=20, size=16):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with PairDatasetWriter(path, size) as w:
        for i in range(n):
            m = (yy - 8) ** 2 + (xx - 8) ** 2 < (2 + i % 4) ** 2
            img = np.clip(rng.normal(150, 25, (size, size)) - 90 * m, 0, 255).astype(np.uint8)
            split = ("val", "test")[i % 2] if i % 5 == 4 else "train"
            w.add(f"c{i:02d}", img, m, label=("benign", "malignant")[i % 2], split=split, source="real")
        w.commit("test")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    return {"a": pairs(root / "a"), "b": pairs(root / "b", seed=1), "root": root}


# ---------------------------------------------------------------------------------------------- flags and presets
@pytest.mark.parametrize("flags, needle", [
    (["--lr", "-1"], "must be > 0"), (["--lr", "nan"], "finite"), (["--ema_decay", "2"], "must be >= 0 and < 1"),
    (["--channel_mult", "1,x"], "must be an integer"), (["--seed", "99999999999999999999"], "<= 2147483647"),
    (["--beta_start", "0.03"], "beta_start (0.03) must be below beta_end"), (["--img_size", "33"], "images are 16 px"),
    (["--learning_rate"], "expected one argument"), (["--cfg_dropout", "5"], "must be >= 0 and < 1"),
    (["--batch_size", "0"], "must be >= 1"), (["--device", "gpu7"], "device must be"),
])
def test_bad_training_flags_are_one_line(data, tmp_path, flags, needle):
    res = cli("train_medsegdiff.py", "--data_dir", data["a"], "--output_dir", tmp_path / "run", *TINY, *flags)
    one_line_refusal(res, needle)
    assert not (tmp_path / "run").exists(), "a refused run leaves no folder"


@pytest.mark.parametrize("text, needle", [
    ("batch_size: 0", "'batch_size'"), ("batch_size: 4.7", "must be an integer"), ("lr: [1, 2]", "must be a number"),
    ("cfg_dropout: 5", "must be >= 0 and < 1"), ("use_transformer: \"no\"", "must be true or false"),
    ("snapshot_minutes: [1, -2]", "every entry must be > 0"),
])
def test_preset_values_get_the_flag_checks(data, tmp_path, text, needle):
    preset = tmp_path / "p.yaml"
    preset.write_text(text + "\n")
    with pytest.raises(UserError, match="bad value") as exc:
        train_medsegdiff.main(["--config", str(preset), "--data_dir", data["a"], "--output_dir", str(tmp_path / "r")])
    assert needle in str(exc.value)


def test_segmentation_preset_epochs_zero_is_refused(data, tmp_path):
    preset = tmp_path / "s.yaml"
    preset.write_text("epochs: 0\n")
    with pytest.raises(UserError, match="'epochs'.*must be >= 1"):
        train_segmentation.main(["--config", str(preset), "--data_dir", data["a"], "--output_dir", str(tmp_path / "s")])


# ---------------------------------------------------------------------------------------------- runs and folders
def test_refused_resume_changes_nothing_and_other_data_is_refused(data, tmp_path):
    out = tmp_path / "run"
    train_medsegdiff.main(["--data_dir", data["a"], "--output_dir", str(out), "--max_steps", "2", *TINY])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="cannot resume.*learning_rate"):
        train_medsegdiff.main(["--data_dir", data["a"], "--output_dir", str(out), "--max_steps", "4", *TINY,
                               "--lr", "5e-4"])
    with pytest.raises(UserError, match="cannot resume.*dataset_fingerprint"):
        train_medsegdiff.main(["--data_dir", data["b"], "--output_dir", str(out), "--max_steps", "4", *TINY])
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before, "a refused resume rewrote " + ", ".join(k for k in after if after[k] != before.get(k))
    # outputs keep the usual permissions (checkpoints are not private 0600)
    assert stat.S_IMODE(os.stat(out / "last.pth").st_mode) == stat.S_IMODE(os.stat(out / "config.json").st_mode)


def test_extended_segmentation_run_leaves_no_stale_results(data, tmp_path):
    out = tmp_path / "seg"
    base = ["--data_dir", data["a"], "--output_dir", str(out), *TINY_UNET]
    train_segmentation.main([*base, "--epochs", "2"])
    assert (out / "metrics.json").is_file()
    # extended, and stopped part-way (as a kill would): the old results must not sit beside newer weights
    train_segmentation.main([*base, "--epochs", "6", "--stop_after_epochs", "1"])
    assert load_checkpoint(out / "last.pth")["epoch"] == 3
    assert not (out / "metrics.json").exists() and not list(out.glob("per_image_*.csv"))
    train_segmentation.main([*base, "--epochs", "6"])
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 6


def test_second_run_into_a_locked_folder_is_refused(data, tmp_path):
    out = tmp_path / "locked"
    with OutputLock(out):
        res = cli("train_medsegdiff.py", "--data_dir", data["a"], "--output_dir", out, "--max_steps", "2", *TINY)
    one_line_refusal(res, "another run is writing this folder", f"process {os.getpid()}")
    assert not out.exists()


def test_output_inside_or_around_the_input_is_refused(data, tmp_path):
    res = cli("train_medsegdiff.py", "--data_dir", data["a"], "--output_dir", os.path.join(data["a"], "run"), *TINY)
    one_line_refusal(res, "lies inside --data_dir")
    res = cli("train_segmentation.py", "--data_dir", data["a"], "--output_dir", data["root"], *TINY_UNET)
    one_line_refusal(res, "contains --data_dir")


def test_a_folder_of_another_kind_is_refused(data, tmp_path):
    diff = tmp_path / "diff"
    train_medsegdiff.main(["--data_dir", data["a"], "--output_dir", str(diff), "--max_steps", "2", *TINY])
    with pytest.raises(UserError, match="holds a diffusion-run output, not a segmentation-run"):
        train_segmentation.main(["--data_dir", data["a"], "--output_dir", str(diff), *TINY_UNET, "--epochs", "1"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="files that no busdiff run wrote"):
        train_segmentation.main(["--data_dir", data["a"], "--output_dir", str(tmp_path / "junk"), *TINY_UNET])
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_unusable_cuda_warns_with_the_cpu_time(data, tmp_path, monkeypatch, capsys):
    """--device auto on a machine with an NVIDIA driver that torch cannot use: loud, with the run's CPU cost."""
    import training.plan as plan
    from common import precision
    why = "an NVIDIA GPU seems present (driver: test) but torch cannot use it"
    monkeypatch.setattr(precision, "gpu_present_but_unusable", lambda: why)
    monkeypatch.setattr(plan, "gpu_present_but_unusable", lambda: why)
    monkeypatch.setattr(plan.DiffusionTrainer, "fit", lambda self: {"stopped": "test"})
    argv = ["--data_dir", data["a"], "--output_dir", tmp_path / "run", "--img_size", "16", "--max_steps", "7",
            *TINY]
    argv[argv.index("--device") + 1] = "auto"
    assert train_medsegdiff.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: --device auto falls back to the CPU: {why}" in err
    assert "this run (7 steps) would take about" in err and "hours on this CPU" in err
