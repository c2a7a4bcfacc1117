"""train_segmentation.py (+ training/seg_trainer.py, metrics/seg_eval.py) on a small phantom, CPU, one thread.

Covers: U-Net and MADGNet runs with every metrics.json field, Dice above chance, the best_model.pth contract,
--test_data, --include_normal, bit-exact resume, --seeds, the leakage guard and bad input."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import prepare_busi_dataset
import train_segmentation
from common.errors import UserError
from data.combine import combine
from data.pairs import PairDatasetWriter, open_pair_dataset
from metrics.segmentation import dice_iou
from common.checkpoint import load_checkpoint
from metrics.seg_eval import CSV_COLUMNS, evaluate_predictions

TINY_UNET = ["--model", "unet", "--base_width", "8", "--depth", "3", "--norm", "group", "--lr", "3e-3",
             "--batch_size", "8", "--warmup_steps", "10", "--device", "cpu", "--precision", "fp32"]
METRIC_KEYS = {"model", "model_kwargs", "parameters", "class_names", "include_normal", "img_size", "augment", "seed",
               "epochs", "epochs_trained", "best_epoch", "best_val_dice", "training_time_s", "s_per_epoch",
               "rules", "dataset", "n_test_images", "test", "val", "test_data", "model_selection"}
SECTION_KEYS = {"n_images", "counts", "sources", "overall", "per_label", "false_positive_rate_normal",
                "classification"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subset(src, dst, per_split, size=None):
    """A small pair dataset from ``src``: per_split = {split: (n_tumour, n_normal)}."""
    with PairDatasetWriter(dst, src.img_size) as w:
        for split, (n_tumour, n_normal) in per_split.items():
            rows = src.select(split=split, labels=("benign", "malignant"))
            rows = rows[::2][:n_tumour // 2] + rows[1::2][:n_tumour - n_tumour // 2]
            rows += src.select(split=split, labels="normal")[:n_normal]
            for r in rows:
                w.add_files(r["id"], src.image_path(r["id"]), src.mask_path(r["id"]), label=r["label"], split=split,
                            source="real", group=r["group"])
        w.commit("test subset")
    return str(dst)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    real = root / "phantom"
    prepare_busi_dataset.main(["--phantom", "100", "--img_size", "64", "--output_dir", str(real)])
    ds = open_pair_dataset(real)
    # a "synthetic" set: the phantom's training tumour pairs relabelled (same format as generate_synthetic.py's)
    with PairDatasetWriter(root / "syn", 64) as w:
        for r in ds.select(split="train", labels=("benign", "malignant")):
            w.add_files("gen_" + r["id"], ds.image_path(r["id"]), ds.mask_path(r["id"]), label=r["label"],
                        split="train", source="synthetic", seed=0)
        w.commit("relabelled phantom")
    combined = combine(real, root / "syn", root / "combined", log=lambda s: None)
    small = subset(ds, root / "small", {"train": (10, 2), "val": (3, 1), "test": (4, 2)})
    return {"root": root, "real": str(real), "combined": str(combined.root), "small": small, "ds": ds}


@pytest.fixture(scope="module")
def unet_run(data):
    out = data["root"] / "unet"
    train_segmentation.main(["--data_dir", data["combined"], "--output_dir", str(out), "--epochs", "5",
                             "--test_data", data["small"], *TINY_UNET])
    return out


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def chance_dice(ds, test_masks):
    """The best a prediction that ignores the image can do: empty, full, random, or the training masks' mean
    map thresholded at the level that is best *on the test set* (generous)."""
    _, train_masks = ds.load(ds.select(split="train", labels=("benign", "malignant")))
    prior = train_masks.mean(0)
    cands = [np.zeros_like(test_masks), np.ones_like(test_masks),
             np.random.default_rng(0).random(test_masks.shape) < 0.5]
    cands += [np.broadcast_to(prior > t, test_masks.shape) for t in np.quantile(prior, np.linspace(0, 0.99, 40))]
    return max(np.nan_to_num(np.nanmean(dice_iou(c, test_masks)[0])) for c in cands)


def test_unet_run_artifacts_metrics_and_dice_above_chance(data, unet_run):
    out = unet_run
    for name in ("config.json", "log.txt", "stats.jsonl", "last.pth", "best_model.pth", "metrics.json",
                 "per_image_test.csv", "per_image_small.csv"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m) and SECTION_KEYS <= set(m["test"])
    test = m["test"]
    for stat in ("dice", "iou", "hd95"):
        assert set(test["overall"][stat]) == {"mean", "std", "median"}
        assert set(test["per_label"]) == {"benign", "malignant"} and test["per_label"]["malignant"][stat]["mean"] >= 0
    cls = test["classification"]
    assert np.array(cls["confusion_matrix"]).shape == (2, 2) and 0 <= cls["balanced_accuracy"] <= 1
    assert m["parameters"] > 0 and m["training_time_s"] > 0 and m["epochs_trained"] == 5
    assert m["dataset"]["n_synthetic_train"] > 0 and m["dataset"]["combined"]["n_synthetic"] > 0
    assert m["dataset"]["counts"]["malignant"]["train"]["synthetic"] == m["dataset"]["n_synthetic_train"]
    assert "empty_ground_truth" in m["rules"] and "pixels" in m["rules"]["hd95"]
    # one CSV row per real test image (benign + malignant), the contract's columns
    ds = open_pair_dataset(data["combined"])
    test_rows = ds.select(split="test", labels=("benign", "malignant"))
    rows = read_csv(out / "per_image_test.csv")
    assert tuple(rows[0].keys()) == CSV_COLUMNS and [r["id"] for r in rows] == [r["id"] for r in test_rows]
    assert m["n_test_images"] == len(rows) and all(r["source"] == "real" for r in rows)
    # Dice clearly above what any image-blind prediction reaches
    _, gt = ds.load(test_rows)
    chance = chance_dice(ds, gt)
    dice = test["overall"]["dice"]["mean"]
    assert dice > chance + 0.2, (dice, chance)
    assert abs(np.mean([float(r["dice"]) for r in rows]) - dice) < 1e-5
    # --test_data: every pair of the external set, reported separately, except those the segmenter trained or was
    # selected on (the subset's 10 train + 3 val tumour pairs are the run's own): its 4 test tumour pairs remain
    ext = m["test_data"]["small"]
    assert ext["n_images"] == len(read_csv(out / "per_image_small.csv")) == 4 and ext["overlap_dropped"] == 13
    # stats.jsonl: one line per epoch; the status line in log.txt
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in stats] == [1, 2, 3, 4, 5]
    assert {"loss", "loss_dice", "loss_bce", "loss_cls", "val_dice", "s_per_epoch", "img_per_s"} <= set(stats[0])
    assert "s/epoch" in (out / "log.txt").read_text()


def test_best_model_contract(data, unet_run):
    from models.segmenters import build_segmenter
    ckpt = load_checkpoint(unet_run / "best_model.pth", expect_kind="segmenter")
    assert ckpt["config"]["img_size"] == 64 and ckpt["class_names"] == ["benign", "malignant"]
    assert ckpt["epoch"] >= 1 and ckpt["best_val_dice"] > 0
    model = build_segmenter(ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    out = model.eval()(torch.rand(2, 1, 64, 64))
    assert out["mask_logits"].shape == (2, 1, 64, 64) and out["class_logits"].shape == (2, 2)


def test_madgnet_include_normal(data):
    out = data["root"] / "madgnet"
    train_segmentation.main(["--data_dir", data["small"], "--output_dir", str(out), "--model", "madgnet",
                             "--encoder_weights", "none", "--epochs", "2", "--batch_size", "6", "--include_normal",
                             "--device", "cpu", "--precision", "fp32", "--warmup_steps", "1", "--lr", "1e-3"])
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m) and m["class_names"] == ["benign", "malignant", "normal"]
    assert m["model"] == "madgnet" and 30e6 < m["parameters"] < 36e6
    test = m["test"]
    assert test["n_images"] == 6 and test["per_label"]["normal"]["n_empty_gt"] == 2
    assert test["false_positive_rate_normal"] is not None and np.array(
        test["classification"]["confusion_matrix"]).shape == (3, 3)
    rows = read_csv(out / "per_image_test.csv")
    normal = [r for r in rows if r["label"] == "normal"]
    assert len(normal) == 2 and all(r["dice"] == r["iou"] == r["hd95"] == "" for r in normal)
    stats = json.loads((out / "stats.jsonl").read_text().splitlines()[0])
    assert {"loss_structure", "loss_distance", "loss_boundary", "loss_cls"} <= set(stats)


def test_resume_is_bit_exact_and_rerun_only_evaluates(data, tmp_path):
    common = ["--data_dir", data["small"], "--epochs", "3", *TINY_UNET, "--batch_size", "4"]
    train_segmentation.main(["--output_dir", str(tmp_path / "a"), *common])
    train_segmentation.main(["--output_dir", str(tmp_path / "b"), *common, "--stop_after_epochs", "1"])
    assert load_checkpoint(tmp_path / "b" / "last.pth")["epoch"] == 1
    assert not (tmp_path / "b" / "metrics.json").exists()
    train_segmentation.main(["--output_dir", str(tmp_path / "b"), *common])
    a, b = load_checkpoint(tmp_path / "a" / "last.pth"), load_checkpoint(tmp_path / "b" / "last.pth")
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resume"
    assert (tmp_path / "a" / "per_image_test.csv").read_text() == (tmp_path / "b" / "per_image_test.csv").read_text()
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()
    # the finished run again: no training, the same evaluation
    train_segmentation.main(["--output_dir", str(tmp_path / "b"), *common])
    assert "already trained" in (tmp_path / "b" / "log.txt").read_text()
    assert load_checkpoint(tmp_path / "b" / "last.pth")["epoch"] == 3
    with pytest.raises(UserError, match="cannot resume.*learning_rate"):
        train_segmentation.main(["--output_dir", str(tmp_path / "b"), *common, "--lr", "1e-2"])


def test_seeds_shortcut(data, tmp_path, capsys):
    train_segmentation.main(["--data_dir", data["small"], "--epochs", "1", *TINY_UNET, "--seeds", "1,2",
                             "--output_dir", str(tmp_path / "ms")])
    for k in (1, 2):
        m = json.loads((tmp_path / f"ms_seed{k}" / "metrics.json").read_text())
        assert m["seed"] == k
    assert "test Dice over 2 seeds" in capsys.readouterr().out


def test_a_segmenter_that_predicts_nothing_is_loud(data, tmp_path, monkeypatch, capsys):
    """Every test image predicted empty: a WARNING in metrics.json, printed last and in log.txt."""
    import training.seg_trainer as trainer
    real_predict = trainer.predict

    def nothing(*args, **kwargs):
        prob, cls = real_predict(*args, **kwargs)
        return torch.zeros_like(prob), cls

    monkeypatch.setattr(trainer, "predict", nothing)
    train_segmentation.main(["--data_dir", data["small"], "--epochs", "1", *TINY_UNET, "--output_dir",
                             str(tmp_path / "empty")])
    m = json.loads((tmp_path / "empty" / "metrics.json").read_text())
    assert len(m["warnings"]) == 1
    assert f"EMPTY mask on every one of its {m['n_test_images']} test images" in m["warnings"][0]
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-2].endswith(m["warnings"][0])
    assert m["warnings"][0] in (tmp_path / "empty" / "log.txt").read_text()


def test_evaluate_predictions_rules():
    gt = np.zeros((4, 8, 8), bool)
    gt[0, 2:5, 2:5] = gt[1, 2:5, 2:5] = gt[2, 1:3, 1:3] = True
    pred = gt.copy()
    pred[1] = False                # empty prediction on a lesion: Dice 0, HD95 = diagonal
    pred[3, 0, 0] = True           # any pixel on an empty ground truth: a false positive
    section, rows = evaluate_predictions(pred, gt, ["benign", "malignant", "malignant", "normal"], list("abcd"),
                                         ["real"] * 4, ["benign", "normal", "malignant", "normal"],
                                         [0.1, 0.4, 0.9, 0.2], ["benign", "malignant", "normal"])
    assert [r["dice"] for r in rows] == [1.0, 0.0, 1.0, None]
    assert rows[1]["hd95"] == pytest.approx(np.hypot(8, 8)) and rows[3]["false_positive"] == 1.0
    assert section["false_positive_rate_normal"] == 1.0 and section["overall"]["n_lesion"] == 3
    cls = section["classification"]
    assert cls["balanced_accuracy"] == pytest.approx(0.75)  # benign 1/1, malignant 1/2 (the 'normal' is a miss)
    assert cls["auc_malignant"] == 1.0 and cls["confusion_matrix"][1] == [0, 1, 1]
    # a segmenter without a class head
    section, rows = evaluate_predictions(pred, gt, ["benign"] * 4, list("abcd"), ["real"] * 4)
    assert section["classification"] is None and rows[0]["pred_label"] is None


def _leaky_copy(small, dst):
    shutil.copytree(small, dst)
    meta = dst / "metadata.csv"
    lines = meta.read_text().splitlines()
    header = lines[0].split(",")
    for i, line in enumerate(lines[1:], 1):
        cells = line.split(",")
        if cells[header.index("split")] == "val":
            cells[header.index("source")] = "synthetic"
            lines[i] = ",".join(cells)
            break
    meta.write_text("\n".join(lines) + "\n")
    return str(dst)


@pytest.mark.parametrize("case, match", [
    ("size", "images are 64 px but --img_size is 32"),
    ("empty_test", "test split has no benign/malignant pairs"),
    ("synthetic_in_val", "refusing to train on it: 1 synthetic pair"),
    ("not_dataset", "not a pair dataset"),
    ("offline_imagenet", "Offline\\? Pass --encoder_checkpoint PATH .* or --encoder_weights none"),
    ("missing_encoder_checkpoint", "--encoder_checkpoint: .*does not exist"),
    ("test_data_size", "--test_data .*images are 32 px"),
])
def test_bad_input(data, tmp_path, monkeypatch, case, match):
    args = {"--data_dir": data["small"], "--output_dir": str(tmp_path / "x"), "--epochs": "1"}
    extra = []
    if case == "size":
        args["--img_size"] = "32"
    elif case == "empty_test":
        args["--data_dir"] = subset(data["ds"], tmp_path / "notest", {"train": (8, 0), "val": (2, 0)})
    elif case == "synthetic_in_val":
        args["--data_dir"] = _leaky_copy(data["small"], tmp_path / "leaky")
    elif case == "not_dataset":
        (tmp_path / "empty").mkdir()
        args["--data_dir"] = str(tmp_path / "empty")
    elif case == "offline_imagenet":
        import timm
        real_create = timm.create_model

        def offline(name, pretrained=False, **kw):
            if pretrained:
                raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
            return real_create(name, pretrained=False, **kw)
        monkeypatch.setattr(timm, "create_model", offline)
        extra = ["--model", "madgnet"]
    elif case == "missing_encoder_checkpoint":
        extra = ["--model", "madgnet", "--encoder_checkpoint", str(tmp_path / "nope.pth")]
    else:
        with PairDatasetWriter(tmp_path / "ext32", 32) as w:
            w.add("e0", np.zeros((32, 32), np.uint8), np.ones((32, 32), bool), label="benign", split="test",
                  source="real")
            w.commit("x")
        extra = ["--test_data", str(tmp_path / "ext32")]
    argv = [x for kv in args.items() for x in kv] + (extra or TINY_UNET[:2]) + ["--device", "cpu"]
    with pytest.raises(UserError, match=match) as exc:
        train_segmentation.main(argv)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "x").exists()  # nothing written for a refused run


def test_unknown_model_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train_segmentation.main(["--model", "segformer"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "must be one of madgnet, unet, got 'segformer'" in err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err


def test_parser_choices_match_registries():
    from models.segmenters import SEGMENTERS
    from training.augment import LEVELS
    from common.options import option_specs
    from training.config import SegTrainConfig
    specs = option_specs(SegTrainConfig)
    assert set(specs["model"][1].choices) == set(SEGMENTERS) and tuple(specs["augment"][1].choices) == LEVELS
