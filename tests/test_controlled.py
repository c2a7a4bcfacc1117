"""Controlled generation and segmentation by the joint diffusion model (issue 9): known-channel sampling reproduces
the given channel exactly, mask transforms do what they say, generate_synthetic.py --condition_masks writes the
transformed masks with provenance, and segment_with_diffusion.py writes train_segmentation.py's metrics schema.
The slow test trains a small model on the phantom and checks that the images honour their masks and that the
diffusion segmenter beats chance (make test-slow)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import generate_synthetic
import segment_with_diffusion
from common.errors import UserError
from sampling.conditioned import MaskConditionedSampler, MaskTransform, load_condition_masks
from data.pairs import PairDatasetWriter, open_pair_dataset

from conftest import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("controlled"))


def ellipse(size, cy, cx, ry, rx):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


@pytest.fixture(scope="module")
def pairs16(tmp_path_factory):
    """12 labelled 16-px pairs in every split (train masks are the condition masks)."""
    path = tmp_path_factory.mktemp("p16") / "pairs"
    rng = np.random.default_rng(1)
    with PairDatasetWriter(path, 16) as w:
        for i in range(12):
            m = ellipse(16, 5 + i % 6, 6 + i % 5, 2 + i % 3, 3)
            img = np.clip(rng.normal(150, 20, (16, 16)) - 80 * m, 0, 255).astype(np.uint8)
            w.add(f"p{i:02d}", img, m, label=("benign", "malignant")[i % 2],
                  split=("train", "train", "val", "test")[i % 4], source="real")
        w.commit("test")
    return str(path)


# ============================================================================ mask transforms
def test_transform_spec_parsing_and_errors():
    t = MaskTransform.parse("scale=1.2:1.5,rotate=30,elastic=2,shift=0.1,place=0.1:0.3,flip=0.5")
    assert t.scale == (1.2, 1.5) and t.rotate == 30 and t.place == (0.1, 0.3) and t.flip == 0.5
    assert MaskTransform.parse("scale=2").scale == (2.0, 2.0) and MaskTransform.parse(None) == MaskTransform()
    for bad, msg in (("scale", "not key=value"), ("size=2", "unknown key 'size'"), ("scale=a", "not a number"),
                     ("scale=2:1", "range"), ("place=0.5:1.5", "range"), ("rotate=200", "range")):
        with pytest.raises(UserError, match=msg):
            MaskTransform.parse(bad)


def test_transforms_change_size_and_depth_as_asked():
    m = ellipse(64, 40, 32, 6, 9)
    same, _ = MaskTransform().apply(m, np.random.default_rng(0))
    assert np.array_equal(same, m)
    big, params = MaskTransform.parse("scale=1.5").apply(m, np.random.default_rng(0))
    assert params["scale"] == 1.5 and 2.0 < big.sum() / m.sum() < 2.5          # area x 1.5^2
    for seed in range(5):
        moved, _ = MaskTransform.parse("place=0.1:0.2").apply(m, np.random.default_rng(seed))
        cy = np.nonzero(moved)[0].mean() / 64
        assert 0.09 <= cy <= 0.21 and abs(moved.sum() - m.sum()) <= 0.05 * m.sum()
    a, _ = MaskTransform.parse("rotate=40,elastic=3").apply(m, np.random.default_rng(7))
    b, _ = MaskTransform.parse("rotate=40,elastic=3").apply(m, np.random.default_rng(7))
    assert np.array_equal(a, b) and not np.array_equal(a, m)                   # seeded, and it does change
    flipped, p = MaskTransform.parse("flip=1").apply(ellipse(64, 20, 10, 4, 4), np.random.default_rng(0))
    assert p["flip"] and np.nonzero(flipped)[1].mean() > 50


def test_condition_masks_from_train_split_only(pairs16, tmp_path):
    cond = load_condition_masks(pairs16, 16, ["benign", "malignant"])
    ds = open_pair_dataset(pairs16)
    train = {r["id"] for r in ds.select(split="train")}
    assert cond.labelled and all(set(ids) <= train for ids in cond.ids.values())
    assert all(ds.row(i)["label"] == "benign" for i in cond.ids["benign"])
    anyl = load_condition_masks(pairs16, 16, ["benign"], "any")
    assert len(anyl.ids["benign"]) == len(train)
    folder = tmp_path / "masks"
    folder.mkdir()
    from common.io import write_png
    write_png(folder / "a.png", ellipse(40, 20, 20, 8, 12).astype(np.uint8) * 255)
    f = load_condition_masks(folder, 16, ["malignant"])
    assert not f.labelled and f.masks["malignant"][0].shape == (16, 16) and f.masks["malignant"][0].any()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a pair dataset nor a folder with mask PNGs"):
        load_condition_masks(tmp_path / "empty", 16, ["benign"])
    with pytest.raises(UserError, match="no such folder"):
        load_condition_masks(tmp_path / "nope", 16, ["benign"])


# ============================================================================ known-channel sampling
def test_known_channel_is_reproduced_exactly(ckpt):
    from models.diffusion import images_to_model_space, model_space_to_images
    from models.loading import load_diffusion_checkpoint
    model, diffusion, _ = load_diffusion_checkpoint(ckpt)
    masks = torch.from_numpy(np.stack([ellipse(16, 8, 8, 3, 5), ellipse(16, 4, 10, 2, 2)]))[:, None]
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x0 = images_to_model_space(images, masks.to(torch.uint8))
    for sampler, resample in (("dpmsolver++", 1), ("ddim", 3), ("ddpm", 2)):
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        x = diffusion.sample(model, torch.tensor([0, 1]), gens, 16, sampler=sampler, steps=3, guidance_scale=2.0,
                             null_class=2, known=x0[:, 1:], known_channels=[1], resample=resample)
        assert torch.equal(model_space_to_images(x)[1], masks)
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        x = diffusion.sample(model, torch.tensor([2, 2]), gens, 16, sampler=sampler, steps=3, known=x0[:, :1],
                             known_channels=[0], resample=resample)
        assert torch.equal(model_space_to_images(x)[0], images)
    with pytest.raises(ValueError, match="resample > 1 needs"):
        diffusion.sample(model, torch.tensor([0]), [torch.Generator()], 16, sampler="dpmsolver++", steps=2,
                         known=x0[:1, 1:], known_channels=[1], resample=2)


# ============================================================================ generate_synthetic.py --condition_masks
def test_condition_masks_generation(ckpt, pairs16, tmp_path, capsys):
    out = tmp_path / "cond"
    spec = "scale=1.2:1.4,shift=0.1"
    generate_synthetic.main(["--checkpoint_path", ckpt, "--condition_masks", pairs16, "--mask_transform", spec,
                             "--output_dir", str(out), "--device", "cpu", "--steps", "3", "--min_lesion_area", "2"])
    ds = open_pair_dataset(out)
    cond = load_condition_masks(pairs16, 16, ["benign", "malignant"])
    # default count: one pair per condition mask of each class
    assert {lab: len(ds.select(labels=lab)) for lab in ("benign", "malignant")} == \
        {lab: len(ids) for lab, ids in cond.ids.items()}
    gen = json.loads((out / "generation.json").read_text())["identity"]
    assert gen["mode"] == "mask_conditioned" and gen["condition_fingerprint"] == cond.fingerprint()
    sampler = MaskConditionedSampler(None, ["benign", "malignant"], cond, MaskTransform.parse(spec), 2)
    _, masks = ds.load()
    for row, mask in zip(ds.rows, masks):
        expected, info = sampler.condition_mask(row["label"], int(row["candidate"]), int(row["seed"]))
        assert np.array_equal(mask > 0, expected), row["id"]                   # the given mask, exactly
        assert row["condition_id"] == info["condition_id"] and json.loads(row["mask_transform"])["scale"] >= 1.2
    # a batch of 1 draws the same pairs
    out1 = tmp_path / "cond1"
    generate_synthetic.main(["--checkpoint_path", ckpt, "--condition_masks", pairs16, "--mask_transform", spec,
                             "--output_dir", str(out1), "--device", "cpu", "--steps", "3", "--min_lesion_area", "2",
                             "--batch_size", "1"])
    for r in ds.rows:
        assert (out / "images" / f"{r['id']}.png").read_bytes() == (out1 / "images" / f"{r['id']}.png").read_bytes()
    # another transform is another run: refused in the same folder
    with pytest.raises(UserError, match="holds samples of a different run"):
        generate_synthetic.main(["--checkpoint_path", ckpt, "--condition_masks", pairs16, "--mask_transform",
                                 "scale=2", "--output_dir", str(out), "--device", "cpu", "--steps", "3",
                                 "--min_lesion_area", "2"])


@pytest.mark.parametrize("encoding,scale", [("binary", 1.0), ("binary", 0.5), ("sdf", 1.0)])
def test_condition_masks_enter_in_the_models_mask_encoding(pairs16, encoding, scale):
    """The given mask is handed to the sampler as the model was trained to see it: +-mask_scale, or the signed
    distance map (fractional near the boundary), never a bare +-1 whatever the checkpoint's encoding."""
    from models.diffusion import DiffusionConfig, JointDiffusion

    class Joint:   # records what the conditioned sampler passes on
        diffusion = JointDiffusion(DiffusionConfig(mask_encoding=encoding, mask_scale=scale, sdf_width=3.0))

        def draw(self, class_indices, seeds, candidates, known=None):
            self.known = known
            return None, None

    joint = Joint()
    cond = load_condition_masks(pairs16, 16, ["benign", "malignant"])
    sampler = MaskConditionedSampler(joint, ["benign", "malignant"], cond, MaskTransform(), 2)
    sampler.draw([0, 1], [3, 4], [0, 1])
    given = np.stack([sampler.condition_mask(lab, j, s)[0] for lab, j, s in (("benign", 0, 3), ("malignant", 1, 4))])
    assert joint.known.shape == (2, 1, 16, 16) and joint.known.dtype == torch.float32
    assert torch.equal(joint.known > 0, torch.from_numpy(given)[:, None])        # positive exactly inside
    assert float(joint.known.abs().max()) == pytest.approx(scale)
    values = set(joint.known.unique().tolist())
    if encoding == "sdf":   # distances: more levels than two, fractional next to the boundary
        assert len(values) > 2 and any(0 < abs(v) < 1 for v in values)
    else:
        assert values == {-scale, scale}


def test_condition_flags_bad_input(ckpt, pairs16, tmp_path):
    with pytest.raises(UserError, match="give --condition_masks as well"):
        generate_synthetic.main(["--checkpoint_path", ckpt, "--mask_transform", "scale=2", "--output_dir",
                                 str(tmp_path / "a")])
    with pytest.raises(UserError, match="unknown key"):
        generate_synthetic.main(["--checkpoint_path", ckpt, "--condition_masks", pairs16, "--mask_transform",
                                 "grow=2", "--output_dir", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()


# ============================================================================ segment_with_diffusion.py
def test_diffusion_segmentation_writes_the_segmenter_schema(ckpt, pairs16, tmp_path):
    out = tmp_path / "diffseg"
    segment_with_diffusion.main(["--checkpoint_path", ckpt, "--data_dir", pairs16, "--output_dir", str(out),
                                 "--ensemble", "3", "--steps", "2", "--resample", "2", "--classify_timesteps", "2",
                                 "--device", "cpu"])
    m = json.loads((out / "metrics.json").read_text())
    test_ids = [r["id"] for r in open_pair_dataset(pairs16).select(split="test")]
    assert m["n_test_images"] == len(test_ids) and m["ensemble"] == 3
    for key in ("n_images", "overall", "per_label", "classification"):
        assert key in m["test"], key
    assert {"dice", "iou", "hd95"} <= set(m["test"]["overall"])
    assert m["test"]["classification"]["balanced_accuracy"] is not None
    with open(out / "per_image_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["id"] for r in rows) == sorted(test_ids)
    for pid in test_ids:
        from common.io import read_png_gray
        assert set(np.unique(read_png_gray(out / "predictions" / f"{pid}.png"))) <= {0, 255}
        u = read_png_gray(out / "uncertainty" / f"{pid}.png")
        assert u.shape == (16, 16) and u.max() <= 255
    # evaluate.py's paired comparison reads it like a train_segmentation.py run
    from metrics.downstream import compare_runs
    comp = compare_runs([out], [out])
    assert comp["n_images"] == len(test_ids) and comp["metrics"]["dice"]["mean_diff"] == 0.0
    with pytest.raises(UserError, match="needs --sampler ddim or ddpm"):
        segment_with_diffusion.main(["--checkpoint_path", ckpt, "--data_dir", pairs16, "--output_dir",
                                     str(tmp_path / "x"), "--sampler", "dpmsolver++", "--resample", "2"])


# ============================================================================ on a trained model (slow)
@pytest.mark.slow
def test_trained_model_honours_masks_and_segments(tmp_path):
    import prepare_busi_dataset
    import train_medsegdiff
    from metrics.segmentation import dice_iou
    real = tmp_path / "phantom32"
    prepare_busi_dataset.main(["--phantom", "240", "--img_size", "32", "--output_dir", str(real), "--workers", "2"])
    train_medsegdiff.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--data_dir", str(real), "--output_dir",
                           str(tmp_path / "run"), "--img_size", "32", "--channel_mult", "1,2,2", "--max_steps", "600",
                           "--save_every", "300", "--sample_every", "0", "--device", "cpu"])
    ckpt = str(tmp_path / "run" / "best_model.pth")
    out = tmp_path / "cond"
    generate_synthetic.main(["--checkpoint_path", ckpt, "--condition_masks", str(real), "--num_samples_per_class",
                             "12", "--output_dir", str(out), "--device", "cpu"])
    images, masks = open_pair_dataset(out).load()
    import cv2
    darker = 0
    for img, m in zip(images, masks):
        ring = cv2.dilate(m, np.ones((5, 5), np.uint8)) - m
        darker += img[m > 0].mean() < img[ring > 0].mean() - 10
    assert darker >= 0.8 * len(images), f"only {darker} of {len(images)} lesions darker than their surroundings"
    seg = tmp_path / "diffseg"
    segment_with_diffusion.main(["--checkpoint_path", ckpt, "--data_dir", str(real), "--output_dir", str(seg),
                                 "--ensemble", "3", "--no-classify", "--device", "cpu"])
    ds = open_pair_dataset(real)
    rows = ds.select(split="test", labels=["benign", "malignant"])
    _, gt = ds.load(rows)
    from common.io import read_png_gray
    pred = np.stack([read_png_gray(seg / "predictions" / f"{r['id']}.png") > 0 for r in rows])
    dice = dice_iou(pred, gt > 0)[0].mean()
    # chance: the same predictions scored against other images' masks
    chance = np.mean([dice_iou(pred, np.roll(gt > 0, k, axis=0))[0].mean() for k in range(1, 6)])
    assert dice > chance + 0.15, (dice, chance)
