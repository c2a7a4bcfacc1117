"""Batched seeded augmentation: shapes, ranges, determinism, image/mask alignment."""

import pytest
import torch

from training.augment import LEVELS, augment, augment_geometry, augment_intensity


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def batch(b=8, h=48, w=64, seed=0):
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy = torch.randint(16, h - 16, (b, 1, 1), generator=g)
    cx = torch.randint(16, w - 16, (b, 1, 1), generator=g)
    masks = (((yy - cy) ** 2 + (xx - cx) ** 2) < 100).float().unsqueeze(1)
    images = (0.2 + 0.5 * masks + 0.2 * torch.rand(b, 1, h, w, generator=g)).clamp(0, 1)
    return images, masks


@pytest.mark.parametrize("level", LEVELS)
def test_shapes_ranges_binary_masks(level):
    images, masks = batch()
    out_i, out_m = augment(images, masks, level, gen())
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    assert out_i.dtype == images.dtype and out_m.dtype == masks.dtype
    assert out_i.min() >= 0 and out_i.max() <= 1
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(out_i).all()


def test_none_is_identity():
    images, masks = batch()
    out_i, out_m = augment(images, masks, "none", gen())
    assert torch.equal(out_i, images) and torch.equal(out_m, masks)


@pytest.mark.parametrize("level", ["standard", "strong"])
def test_deterministic_given_generator_and_random_per_image(level):
    images, masks = batch()
    a = augment(images, masks, level, gen(5))
    b = augment(images, masks, level, gen(5))
    c = augment(images, masks, level, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], images)
    # the same image repeated in a batch gets different transforms (per-image parameters)
    same_i, same_m = images[:1].expand(4, -1, -1, -1), masks[:1].expand(4, -1, -1, -1)
    out, _ = augment(same_i, same_m, level, gen(7))
    assert not torch.equal(out[0], out[1])


def test_generator_state_advances():
    images, masks = batch()
    g = gen(0)
    first = augment(images, masks, "strong", g)[0]
    second = augment(images, masks, "strong", g)[0]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("level", ["standard", "strong"])
def test_geometry_keeps_image_and_mask_aligned(level):
    _, masks = batch(b=16)
    warped_image, warped_mask = augment_geometry(masks.clone(), masks, level, gen(3))
    # the image channel went through exactly the same resampling as the mask
    assert torch.equal((warped_image > 0.5).float(), warped_mask)
    # and the lesion moved (this is not a no-op) but kept a plausible area
    assert not torch.equal(warped_mask, masks)
    ratio = warped_mask.sum(dim=(1, 2, 3)) / masks.sum(dim=(1, 2, 3))
    assert ratio.min() > 0.5 and ratio.max() < 1.8


def test_full_standard_pipeline_keeps_alignment():
    # image == mask; 'standard' intensity changes are monotone per image, so after the full pipeline
    # every lesion pixel is still brighter than every background pixel of the same image
    _, masks = batch(b=16)
    out_i, out_m = augment(masks.clone(), masks, "standard", gen(11))
    for img, m in zip(out_i, out_m):  # per-image check in the test only
        inside, outside = img[m > 0], img[m == 0]
        assert inside.numel() > 0
        assert inside.min() > outside.max()


def test_strong_intensity_changes_statistics_but_not_masks():
    images, masks = batch(b=32)
    out = augment_intensity(images, "strong", gen(2))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 0.01
    # lesions (brighter in the input) stay brighter on average
    assert (out * masks).sum() / masks.sum() > (out * (1 - masks)).sum() / (1 - masks).sum()


def test_bad_arguments():
    images, masks = batch(b=2)
    with pytest.raises(ValueError, match="level"):
        augment(images, masks, "heavy", gen())
    with pytest.raises(ValueError):
        augment(images, masks[:, :, :10], "standard", gen())
    with pytest.raises(TypeError):
        augment(images, masks, "standard", 0)
