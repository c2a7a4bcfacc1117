"""train_medsegdiff.py: artifacts, resume equivalence, DDP (gloo, 2 processes), checkpoints, bad input."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_medsegdiff
from common.errors import UserError
from data.pairs import PairDatasetWriter
from common.checkpoint import load_checkpoint
from models.loading import load_diffusion_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--img_size", "16", "--model_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
              "--transformer_depth", "1", "--num_heads", "2", "--batch_size", "4", "--log_every", "2",
              "--sample_every", "0", "--val_timesteps", "2", "--device", "cpu", "--precision", "fp32"]


def make_dataset(path, n=24, size=16, labels=("benign", "malignant")):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    with PairDatasetWriter(path, size) as w:
        for i in range(n):
            lab = labels[i % len(labels)]
            cy, cx = rng.uniform(0.35, 0.65, 2) * size
            ry, rx = (size * 0.15, size * 0.25) if lab == "benign" else (size * 0.25, size * 0.15)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 if lab != "normal" else np.zeros((size, size), bool)
            img = np.clip(rng.normal(150, 25, (size, size)) - 90 * m, 0, 255).astype(np.uint8)
            split = "val" if i % 6 == 5 else "train"
            w.add(f"c{i:03d}", img, m, label=lab, split=split, source="real")
        w.commit("test")
    return str(path)


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d") / "pairs16")


def train(argv):
    return train_medsegdiff.main(argv)


def test_artifacts_and_checkpoint_roundtrip(data16, tmp_path):
    out = tmp_path / "run"
    train(["--data_dir", data16, "--output_dir", str(out), "--max_steps", "6", "--save_every", "3", *TINY_MODEL,
           "--sample_every", "6", "--samples_per_class", "1", "--sample_steps", "2"])
    for name in ("config.json", "log.txt", "stats.jsonl", "last.pth", "best_model.pth", "samples/step_0000006.png"):
        assert (out / name).exists(), name
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    train_recs = [s for s in stats if "loss" in s]
    assert [s["step"] for s in train_recs] == [2, 3, 4, 6]  # every log_every and at each save
    for key in ("loss_t_q1", "loss_t_q4", "lr", "s_per_step", "img_per_s", "loss_mask", "loss_anchor", "load_1min",
                "probe_gflops"):
        assert key in train_recs[0]
    assert any("val_loss" in s for s in stats)
    # 6 steps never reach the default EMA decay: the start line says what the run's EMA really is
    assert "EMA decay 0.9999 takes effect after 89990 updates, beyond this run's 6 steps" in (out / "log.txt").read_text()
    # weights_only round trip rebuilds the EMA model from the checkpoint alone
    model, diffusion, ckpt = load_diffusion_checkpoint(out / "best_model.pth")
    raw = torch.load(out / "best_model.pth", weights_only=True)
    assert ckpt["model_class"] == "MedSegDiffV2" and ckpt["class_names"] == ["benign", "malignant"]
    # the machine's state over the run: one sample per log record, averaged (best_model.pth is written by the last
    # step's validation, before that step's record; last.pth after it)
    assert load_checkpoint(out / "last.pth")["machine"]["counts"]["probe_gflops"] == len(train_recs)
    machine = raw["train_machine"]
    assert machine["samples"] == len(train_recs) - 1
    assert machine["probe_gflops_mean"] == pytest.approx(sum(r["probe_gflops"] for r in train_recs[:-1]) / 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["ema"][k])
    assert diffusion.config.prediction_type == "epsilon"
    x = torch.randn(2, 2, 16, 16)
    out1 = model(x, torch.tensor([10, 500]), torch.tensor([0, 1]))
    assert out1.shape == (2, 2, 16, 16) and torch.isfinite(out1).all()


def test_resume_equals_uninterrupted(data16, tmp_path):
    common = ["--data_dir", data16, "--max_steps", "8", "--save_every", "4", *TINY_MODEL,
              "--extra_ema_decays", "0.5", "--extra_ema_stds", "0.1"]
    train(["--output_dir", str(tmp_path / "a"), *common])
    train(["--output_dir", str(tmp_path / "b"), *common, "--stop_after_steps", "3"])
    mid = load_checkpoint(tmp_path / "b" / "last.pth")
    assert mid["step"] == 3
    train(["--output_dir", str(tmp_path / "b"), *common, "--stop_after_steps", "3"])
    train(["--output_dir", str(tmp_path / "b"), *common, "--stop_after_steps", "3"])
    a = load_checkpoint(tmp_path / "a" / "last.pth")
    b = load_checkpoint(tmp_path / "b" / "last.pth")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    # the extra EMAs (a fixed decay and a power-function one) continue too: their update counts travel
    assert set(a["extra_emas"]) == {"0.5", "std0.1"}
    for k, state in a["extra_emas"].items():
        assert state["num_updates"] == b["extra_emas"][k]["num_updates"] == 8
        for name, tensor in state["module"].items():
            assert torch.equal(tensor, b["extra_emas"][k]["module"][name]), f"EMA {k}.{name} differs after resume"
    assert not torch.equal(a["extra_emas"]["std0.1"]["module"][name], a["ema"][name])
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()


def test_resume_refuses_changed_model(data16, tmp_path):
    common = ["--data_dir", data16, "--output_dir", str(tmp_path / "r"), "--max_steps", "4", *TINY_MODEL]
    train([*common, "--stop_after_steps", "2"])
    with pytest.raises(UserError, match="cannot resume.*model_channels"):
        train([*common, "--model_channels", "8"])


@pytest.mark.parametrize("case, match", [
    ("not_dataset", "not a pair dataset"),
    ("size", "images are 16 px but --img_size is 32"),
    ("missing_class", "no training pairs of class normal"),
])
def test_bad_input(data16, tmp_path, case, match):
    args = ["--data_dir", data16, "--output_dir", str(tmp_path / "x"), "--max_steps", "2", *TINY_MODEL]
    if case == "not_dataset":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "size":
        args[args.index("--img_size") + 1] = "32"
    else:
        args += ["--num_classes", "3"]
    with pytest.raises(UserError, match=match):
        train(args)


def test_nan_loss_stops_with_hint(data16, tmp_path):
    with pytest.raises(UserError, match="NaN/inf between steps 0 and 2.*lower --learning_rate"):
        train(["--data_dir", data16, "--output_dir", str(tmp_path / "n"), "--max_steps", "4", "--lr", "1e30",
               "--grad_clip", "1e30", "--warmup_steps", "0", *TINY_MODEL])
    assert not (tmp_path / "n" / "last.pth").exists()


def test_incompatible_checkpoint(tmp_path):
    from common.checkpoint import save_checkpoint
    bad = tmp_path / "bad.pth"
    save_checkpoint(bad, {"kind": "diffusion", "model_class": "MedSegDiffV2", "model_kwargs": {"img_size": 16,
                          "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                          "transformer_depth": 1, "num_heads": 2},
                          "ema": {"not.a.weight": torch.zeros(1)}, "diffusion": {}})
    with pytest.raises(UserError, match="does not match"):
        load_diffusion_checkpoint(bad)
    torch.save({"hello": 1}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match="not a checkpoint written by this project"):
        load_diffusion_checkpoint(tmp_path / "foreign.pth")


def test_preset_and_dry_run(data16, tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("img_size: 16\nbatch_size: 3\nlr: 2.0e-4\nmodel_channels: 16\nchannel_mult: 1,2\n"
                      "transformer_depth: 1\nnum_heads: 2\nnum_epochs: 3\n")
    assert train(["--config", str(preset), "--data_dir", data16, "--dry-run", "--batch_size", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg, plan = out["config"], out["plan"]
    assert cfg["img_size"] == 16 and cfg["train_batch_size"] == 5 and cfg["learning_rate"] == 2e-4
    assert plan["train_pairs"] == 20 and plan["steps_per_epoch"] == 4 and plan["total_steps"] == 12
    assert plan["step_tflop"] > 0 and plan["parameters"] > 0
    assert not (tmp_path / "checkpoints").exists()
    # the dry run performs the input checks of a real start
    with pytest.raises(UserError, match="pair dataset folder not found"):
        train(["--config", str(preset), "--data_dir", str(tmp_path / "nowhere"), "--dry-run"])
    with pytest.raises(UserError, match="images are 16 px but --img_size is 32"):
        train(["--config", str(preset), "--data_dir", data16, "--dry-run", "--img_size", "32"])
    preset.write_text("imgsize: 16\n")
    with pytest.raises(UserError, match="unknown key 'imgsize'"):
        train(["--config", str(preset), "--dry-run"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(data16, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), os.path.join(ROOT, "train_medsegdiff.py"), "--data_dir", data16, "--output_dir",
           str(out), "--max_steps", "4", "--save_every", "2", *TINY_MODEL,
           # a time budget under a decaying schedule: rank 0's spent fraction is broadcast (the ranks' clocks differ)
           "--budget_minutes", "10", "--budget_clock", "wall", "--lr_scheduler", "cosine"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert all(s["world_size"] == 2 for s in stats if "loss" in s)
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["step"] == 4 and json.loads((out / "config.json").read_text())["world_size"] == 2
    assert ckpt["optimizer"]["param_groups"][0]["lr"] < 1e-4           # decayed (4 steps: the steps end it)
