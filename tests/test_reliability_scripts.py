"""The bad-input sweep's defect classes (issue 18) for the scripts other than the trainers' own flags: prepare,
evaluate, combine, segmentation's external test and depth, checkpoints that could run code, presets, leftovers.
Each class: one line and exit 2, nothing lost, nothing stale, no leak; with variations beyond the issue's commands."""
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import create_combined_dataset
import evaluate
import generate_synthetic
import prepare_busi_dataset
import train_segmentation
from common.checkpoint import load_checkpoint
from common.cli import parse_config
from common.errors import UserError
from common.outputs import MARKER, OutputLock
from data.pairs import PairDatasetWriter, open_pair_dataset, write_png

from refusals import cli, one_line_refusal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = ["--model", "unet", "--base_width", "4", "--depth", "2", "--norm", "group", "--batch_size", "4",
       "--epochs", "1", "--warmup_steps", "0", "--device", "cpu", "--precision", "fp32"]


def pairs(path, seed=0, n=20, size=16, source="real", all_train=False):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    with PairDatasetWriter(path, size) as w:
        for i in range(n):
            m = (yy - 8) ** 2 + (xx - 8) ** 2 < (2 + i % 4) ** 2
            img = np.clip(rng.normal(150, 25, (size, size)) - 90 * m, 0, 255).astype(np.uint8)
            split = "train" if all_train or i % 5 != 4 else ("val", "test")[i % 2]
            w.add(f"{source[0]}{i:02d}", img, m, label=("benign", "malignant")[i % 2], split=split, source=source)
        w.commit("test")
    return str(path)


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``: what 'nothing lost, nothing changed' compares."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("relscripts")
    phantom = root / "phantom"
    prepare_busi_dataset.main(["--phantom", "24", "--img_size", "16", "--workers", "1", "--output_dir", str(phantom)])
    real, syn = pairs(root / "real"), pairs(root / "syn", seed=5, n=12, source="synthetic", all_train=True)
    create_combined_dataset.main(["--real_data", real, "--synthetic_data", syn, "--output_dir", str(root / "comb")])
    return {"root": root, "phantom": str(phantom), "real": real, "syn": syn, "comb": str(root / "comb")}


@pytest.fixture(scope="module")
def seg_runs(data):
    """A segmenter trained on real pairs only and one on synthetic + real (one epoch each)."""
    runs = {}
    for name in ("real", "comb"):
        out = data["root"] / f"seg_{name}"
        train_segmentation.main(["--data_dir", data[name], "--output_dir", str(out), *SEG])
        runs[name] = str(out)
    return runs


# ------------------------------------------------------------------ 1: an output folder around or inside the input
def test_prepare_into_a_folder_holding_its_input_is_refused_and_nothing_is_deleted(data, tmp_path):
    q = tmp_path / "q"
    shutil.copytree(data["phantom"], q)
    before = snapshot(q)
    res = cli("prepare_busi_dataset.py", "--input_dir", q / "raw", "--img_size", "32", "--output_dir", q)
    one_line_refusal(res, "contains --input_dir")
    assert snapshot(q) == before and sorted(os.listdir(tmp_path)) == ["q"]
    # variations: the input reached through a symbolic link, and an output inside the input
    (tmp_path / "alias").symlink_to(q)
    with pytest.raises(UserError, match="contains --input_dir"):
        prepare_busi_dataset.main(["--input_dir", str(tmp_path / "alias" / "raw"), "--img_size", "16",
                                   "--output_dir", str(q)])
    with pytest.raises(UserError, match="lies inside --input_dir"):
        prepare_busi_dataset.main(["--input_dir", str(q / "raw"), "--img_size", "16",
                                   "--output_dir", str(q / "raw" / "Dataset_BUSI_with_GT" / "out")])
    assert snapshot(q) == before and sorted(os.listdir(tmp_path)) == ["alias", "q"]


@pytest.mark.parametrize("size, needle", [("33", "multiple of 4"), ("1", ">= 16"), ("100", "multiple of 8"),
                                          ("272", "multiple of 32"), ("24.0", "must be an integer")])
def test_prepare_image_sizes_the_models_cannot_take_are_one_line(tmp_path, capsys, size, needle):
    with pytest.raises(SystemExit) as exc:
        prepare_busi_dataset.main(["--phantom", "20", "--img_size", size, "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 12: leftovers of killed runs, workers
def test_stale_staging_of_dead_runs_is_cleaned_and_the_phantom_gets_workers(data, tmp_path, monkeypatch):
    out = tmp_path / "p"
    gone, alive = dead_pid(), os.getppid()   # (not this process: its own staging folder is its to replace)
    for name in (f".p.partial-{gone}", f".p.old-{gone}", f".p.partial-{alive}"):
        (tmp_path / name / "images").mkdir(parents=True)
        (tmp_path / name / "images" / "x.png").write_bytes(b"half")
    os.chmod(tmp_path / f".p.old-{gone}" / "images", stat.S_IRUSR | stat.S_IXUSR)   # a read-only old dataset
    import data.prepare as prep
    seen, real_generate = [], prep.generate_phantom
    monkeypatch.setattr(prep, "generate_phantom", lambda *a, **k: seen.append(k.get("workers")) or real_generate(*a, **k))
    prepare_busi_dataset.main(["--phantom", "20", "--img_size", "16", "--workers", "1", "--output_dir", str(out)])
    assert seen == [1], "--workers is passed to the phantom generator"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".p.partial-{alive}", "p"], left      # a live process's staging folder is not touched
    assert len(open_pair_dataset(out)) == 20


def test_pool_workers_end_with_their_parent(tmp_path):
    assert not worker_outlives_killed_parent(tmp_path, "die_with_parent, initargs=(os.getpid(),)")


def worker_outlives_killed_parent(tmp_path, init: str) -> bool:
    """Kill -9 a process whose pool worker (``initializer=init``) is busy in a task; does the worker live on?
    (With ``init="None"`` it does: that is what the test guards against.)"""
    busy = tmp_path / "busy"
    code = ("import os, sys, time, multiprocessing as mp; from concurrent.futures import ProcessPoolExecutor\n"
            f"sys.path.insert(0, {ROOT!r}); from common.workers import die_with_parent\n"
            f"pool = ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'), initializer={init})\n"
            "print(pool.submit(os.getpid).result(), flush=True)\n"
            f"pool.submit(exec, {f'import time; open({str(busy)!r}, mode=chr(119)).close(); time.sleep(60)'!r})\n"
            "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        worker = int(parent.stdout.readline())
        for _ in range(300):       # the worker is busy in a task (a worker waiting for work ends by itself)
            if busy.exists():
                break
            time.sleep(0.05)
        os.kill(parent.pid, 9)
        parent.wait()
        for _ in range(100):
            try:
                with open(f"/proc/{worker}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return False   # ended, waiting to be reaped
            except FileNotFoundError:
                return False
            time.sleep(0.1)
        os.kill(worker, 9)
        return True
    finally:
        if parent.poll() is None:
            parent.kill()


# ------------------------------------------------------------------ 7 and 10: evaluate's inputs and output
def test_evaluate_refuses_inverted_repeated_and_two_sided_runs_before_any_compute(data, seg_runs, tmp_path):
    base = ["--real_data", data["real"], "--synthetic_data", data["syn"], "--output_dir", str(tmp_path / "ev")]
    res = cli("evaluate.py", *base, "--baseline_run", seg_runs["comb"], "--combined_run", seg_runs["real"])
    one_line_refusal(res, "--baseline_run", "trained on", "synthetic", "real data only", "swapped")
    with pytest.raises(UserError, match="--combined_run .* must be trained on synthetic \\+ real"):
        evaluate.main([*base, "--combined_run", seg_runs["real"]])
    # the same run twice on one side (another spelling of its path, or its per-image CSV), and on both sides
    twice = os.path.join(os.path.dirname(seg_runs["real"]), ".", os.path.basename(seg_runs["real"]))
    with pytest.raises(UserError, match="is the same run as --baseline_run .*give each run"):
        evaluate.main([*base, "--baseline_run", seg_runs["real"], "--baseline_run", twice])
    with pytest.raises(UserError, match="is the same run as --baseline_run .*both sides"):
        evaluate.main([*base, "--combined_run", seg_runs["comb"], "--baseline_run",
                       os.path.join(seg_runs["comb"], "per_image_test.csv")])
    # a copied run folder is the same run too (its per-image results and weights are identical)
    copy = tmp_path / "copy_of_real"
    shutil.copytree(seg_runs["real"], copy)
    with pytest.raises(UserError, match="same results and weights as \\(a copy of\\)"):
        evaluate.main([*base, "--baseline_run", seg_runs["real"], "--baseline_run", str(copy)])
    assert not (tmp_path / "ev").exists(), "a refused evaluation writes nothing"


def test_evaluate_output_is_checked_and_locked_before_any_compute(data, seg_runs, tmp_path):
    base = ["--real_data", data["real"], "--synthetic_data", data["syn"]]
    before = snapshot(seg_runs["real"])
    with pytest.raises(UserError, match="holds a segmentation-run output, not a evaluation"):
        evaluate.main([*base, "--output_dir", seg_runs["real"]])
    with pytest.raises(UserError, match="lies inside --real_data"):
        evaluate.main([*base, "--output_dir", os.path.join(data["real"], "eval")])
    with pytest.raises(UserError, match="lies inside run"):
        evaluate.main([*base, "--baseline_run", seg_runs["real"], "--output_dir",
                       os.path.join(seg_runs["real"], "samples", "ev")])
    assert snapshot(seg_runs["real"]) == before
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if not os.access(ro, os.W_OK):   # (root can write anywhere)
            t0 = time.time()
            res = cli("evaluate.py", *base, "--output_dir", ro / "ev", "--inception_weights", "offline")
            one_line_refusal(res, "is not writable")
            assert time.time() - t0 < 60
    finally:
        ro.chmod(stat.S_IRWXU)
    with OutputLock(tmp_path / "locked"):
        with pytest.raises(UserError, match=f"another run is writing this folder \\(process {os.getpid()}\\)"):
            evaluate.main([*base, "--output_dir", str(tmp_path / "locked")])
    # the reader study's folder likewise
    with pytest.raises(UserError, match="holds a segmentation-run output, not a reader-study"):
        evaluate.main([*base, "--reader_study", "4", "--output_dir", seg_runs["real"]])
    with pytest.raises(UserError, match="contains --real_data"):
        evaluate.main([*base, "--reader_study", "4", "--output_dir", str(data["root"])])
    assert sorted(os.listdir(tmp_path)) == ["ro"]


def test_reader_study_folder_is_marked_and_refused_to_other_scripts(data, tmp_path):
    out = tmp_path / "study"
    evaluate.main(["--real_data", data["real"], "--synthetic_data", data["syn"], "--reader_study", "4",
                   "--output_dir", str(out)])
    assert json.loads((out / MARKER).read_text())["kind"] == "reader-study"
    with pytest.raises(UserError, match="holds a reader-study output, not a evaluation"):
        evaluate.main(["--real_data", data["real"], "--synthetic_data", data["syn"], "--output_dir", str(out)])
    with pytest.raises(UserError, match="holds a reader-study output, not a segmentation-run"):
        train_segmentation.main(["--data_dir", data["real"], "--output_dir", str(out), *SEG])


# ------------------------------------------------------------------ 6c: an external test set holding training images
def test_external_test_images_the_segmenter_trained_on_are_dropped_or_refused(data, seg_runs, tmp_path, capsys):
    real = open_pair_dataset(data["real"])
    # the segmenter's own data under another name: its train + val images are dropped, its test images stay
    own = tmp_path / "renamed"
    with PairDatasetWriter(own, 16) as w:
        for r in real.rows:
            img, mask = real.load_one(r["id"])
            w.add(f"other_{r['id']}", img, mask, label=r["label"], split="test", source="real")
        w.commit("test")
    out = tmp_path / "seg"
    train_segmentation.main(["--data_dir", data["real"], "--test_data", str(own), "--output_dir", str(out), *SEG])
    assert "left out of its external test" in capsys.readouterr().err
    ext = json.loads((out / "metrics.json").read_text())["test_data"]["renamed"]
    n_seen = len(real.select(split=("train", "val")))
    assert ext["overlap_dropped"] == n_seen and ext["n_images"] == len(real.select(split="test"))
    # only training images: nothing left to test on
    only = tmp_path / "only_train"
    with PairDatasetWriter(only, 16) as w:
        for r in real.select(split="train")[:5]:
            img, mask = real.load_one(r["id"])
            w.add(f"x{r['id']}", img, mask, label=r["label"], split="val", source="real")
        w.commit("test")
    res = cli("train_segmentation.py", "--data_dir", data["real"], "--test_data", only, "--output_dir",
              tmp_path / "seg2", *SEG)
    one_line_refusal(res, "all 5 of its images are training or validation images")
    assert not (tmp_path / "seg2").exists()


# ------------------------------------------------------------------ 9: a segmenter deeper than the images allow
def test_segmenters_too_deep_for_the_images_are_one_line(data, tmp_path):
    res = cli("train_segmentation.py", "--data_dir", data["real"], "--output_dir", tmp_path / "s", *SEG,
              "--depth", "5")
    one_line_refusal(res, "--depth 5", "at least 32 px", "use --depth 4 or less")
    with pytest.raises(UserError, match="--model madgnet needs images of at least 32 px"):
        train_segmentation.main(["--data_dir", data["real"], "--output_dir", str(tmp_path / "m"), "--model",
                                 "madgnet", "--encoder_weights", "none", "--dry-run"])
    with pytest.raises(SystemExit) as exc:
        train_segmentation.main(["--data_dir", data["real"], "--output_dir", str(tmp_path / "d"), "--depth", "9"])
    assert exc.value.code == 2
    assert not any((tmp_path / n).exists() for n in ("s", "m", "d"))


# ------------------------------------------------------------------ 12: files that could run code
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_could_run_code_is_refused_in_plain_words(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"format": "busdiff-checkpoint-v1", "kind": "diffusion", "x": _RunsCode(marker)}, evil)
    res = cli("generate_synthetic.py", "--checkpoint_path", evil, "--output_dir", tmp_path / "o", "--device", "cpu")
    one_line_refusal(res, "refused", "could run code", "system")
    assert "Re-running" not in res.stderr and "weights_only set to False" not in res.stderr
    # the same words wherever a file is loaded: a run's checkpoint, the Inception weights, a MADGNet encoder
    for load in (lambda: load_checkpoint(evil), lambda: __import__("metrics.inception").inception.check_local_weights(evil)):
        with pytest.raises(UserError, match="refused, because it holds the Python object .*system and loading it "
                                            "could run code"):
            load()
    from models.madgnet import load_encoder_checkpoint
    with pytest.raises(ValueError, match="could run code"):
        load_encoder_checkpoint(None, str(evil))
    # a damaged file is called damaged, not dangerous
    good = tmp_path / "good.pth"
    torch.save({"format": "busdiff-checkpoint-v1", "w": torch.zeros(100)}, good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="corrupt, truncated or not a torch file") as exc:
        load_checkpoint(tmp_path / "cut.pth")
    assert "could run code" not in str(exc.value)
    assert not marker.exists()


# ------------------------------------------------------------------ 12: combine copies only what decodes
@pytest.mark.parametrize("which", ["synthetic_corrupt", "real_wrong_size"])
def test_combine_refuses_pngs_that_do_not_decode(data, tmp_path, which):
    real, syn = tmp_path / "real", tmp_path / "syn"
    shutil.copytree(data["real"], real)
    shutil.copytree(data["syn"], syn)
    if which == "synthetic_corrupt":
        bad = syn / "images" / "s03.png"
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad = real / "masks" / "r00.png"
        write_png(bad, np.zeros((20, 20), np.uint8))
    before = snapshot(tmp_path)
    res = cli("create_combined_dataset.py", "--real_data", real, "--synthetic_data", syn, "--output_dir",
              tmp_path / "out")
    one_line_refusal(res, str(bad))
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["real", "syn"]


# ------------------------------------------------------------------ 8: presets get the flags' checks
@pytest.mark.parametrize("module, text, needle", [
    (generate_synthetic, "num_samples_per_class: -5", "must be >= 1"),
    (generate_synthetic, "guidance_scale: .inf", "finite"),
    (generate_synthetic, "steps: 2.5", "must be an integer"),
    (train_segmentation, "epochs: 0", "must be >= 1"),
    (train_segmentation, "base_width: [4, 8]", "must be an integer"),
    (train_segmentation, "include_normal: \"yes\"", "must be true or false"),
    (prepare_busi_dataset, "img_size: 33", "multiple of 4"),
    (prepare_busi_dataset, "phantom_seed: -1", ">= 0"),
    (evaluate, "floor_draws: 0", "positive integer"),
    (evaluate, "output_dir: [a, b]", "single value"),
    (evaluate, "seed: -1", ">= 0"),
    (evaluate, "baseline_run: {a: 1}", "single value"),
    (create_combined_dataset, "max_synthetic_ratio: -1", ">= 0"),
    (create_combined_dataset, "link: 1", "true or false"),
])
def test_preset_values_pass_the_flag_checks(tmp_path, module, text, needle):
    preset = tmp_path / "p.yaml"
    preset.write_text(text + "\n")
    with pytest.raises(UserError, match="bad value") as exc:
        module.main(["--config", str(preset), "--dry-run"])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_preset_repeatable_flags_take_one_value_or_a_list(tmp_path):
    preset = tmp_path / "p.yaml"
    for text, want in (("baseline_run: runs/a", ["runs/a"]), ("baseline_run: [a, b]", ["a", "b"])):
        preset.write_text(text + "\n")
        assert parse_config(evaluate.build_parser(), ["--config", str(preset)]).baseline_run == want
    res = cli("evaluate.py", "--config", tmp_path / "bad.yaml")
    one_line_refusal(res, "config file not found")
    (tmp_path / "bad.yaml").write_text("baseline_run: [[a]]\n")
    one_line_refusal(cli("evaluate.py", "--config", tmp_path / "bad.yaml"), "bad value for 'baseline_run'")
