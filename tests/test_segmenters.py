"""Segmenter registry, U-Net and MADGNet shapes, losses, specs and encoder checkpoints (CPU, small)."""

import json

import numpy as np
import pytest
import timm
import torch
from scipy import ndimage

from models.madgnet import EncoderWeightsError, MADGNet, dct_basis
from models.segmenters import (
    boundary_target,
    build_segmenter,
    build_segmenter_from_spec,
    count_parameters,
    distance_target,
    segmentation_loss,
    segmenter_spec,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared, oversubscribed 2-core machine, two OpenMP threads spin against
    each other and a MADGNet step gets ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def madgnet():
    torch.manual_seed(0)
    return build_segmenter("madgnet", num_labels=3, encoder_weights="none")


def blobs(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy = torch.randint(h // 4, 3 * h // 4, (b, 1, 1), generator=g)
    cx = torch.randint(w // 4, 3 * w // 4, (b, 1, 1), generator=g)
    masks = (((yy - cy) ** 2 + (xx - cx) ** 2) < (h // 5) ** 2).float().unsqueeze(1)
    images = (0.3 + 0.4 * masks + 0.1 * torch.rand(b, 1, h, w, generator=g)).clamp(0, 1)
    return images, masks


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="madgnet.*unet|unet.*madgnet"):
        build_segmenter("segformer", 2)


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (64, 96), (50, 70)])
def test_unet_shapes(size):
    model = build_segmenter("unet", num_labels=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, *size))
    assert out["mask_logits"].shape == (2, 1, *size)
    assert out["class_logits"].shape == (2, 3)


def test_unet_variants():
    for kw in (dict(norm="group", up="transpose"), dict(depth=3, base_width=16)):
        model = build_segmenter("unet", num_labels=2, **kw).eval()
        with torch.no_grad():
            out = model(torch.rand(1, 1, 48, 40))
        assert out["mask_logits"].shape == (1, 1, 48, 40) and out["class_logits"].shape == (1, 2)


def test_madgnet_parameter_count(madgnet):
    n = count_parameters(madgnet)
    assert 32e6 < n < 35e6, n  # ~33M with resnest50d (paper: ~33M)
    assert 25e6 < count_parameters(madgnet.encoder) < 26e6


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_madgnet_shapes(madgnet, size):
    madgnet.eval()
    with torch.no_grad():
        out = madgnet(torch.rand(2, 1, *size))
    assert out["mask_logits"].shape == (2, 1, *size)
    assert out["class_logits"].shape == (2, 3)
    for key in ("maps", "distances", "boundaries"):
        assert len(out[key]) == 4 and all(t.shape == (2, 1, *size) for t in out[key])
    assert out["maps"][-1] is out["mask_logits"]


def test_specs_rebuild_the_same_network(madgnet):
    for model in (build_segmenter("unet", 2, norm="group"), madgnet):
        spec = segmenter_spec(model)
        spec = json.loads(json.dumps(spec))  # JSON-serialisable
        rebuilt = build_segmenter_from_spec(spec)
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        model.eval(), rebuilt.eval()
        x = torch.rand(1, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x)["mask_logits"], model(x)["mask_logits"])
    # rebuilding never re-downloads encoder weights
    assert segmenter_spec(madgnet)["kwargs"]["encoder_weights"] == "none"


def test_distance_and_boundary_targets():
    masks = torch.zeros(3, 1, 20, 24)
    masks[0, 0, 4:15, 3:12] = 1
    masks[1, 0, :, :] = 1
    masks[1, 0, 8:10, 10:13] = 0  # a hole
    # masks[2] empty
    dist = distance_target(masks, row_chunk_elems=500)
    for i in range(3):
        ref = ndimage.distance_transform_edt(np.pad(masks[i, 0].numpy(), 1))[1:-1, 1:-1]
        ref = ref / max(ref.max(), 1.0)
        np.testing.assert_allclose(dist[i, 0].numpy(), ref, atol=1e-6)
    assert dist[2].abs().sum() == 0
    bnd = boundary_target(masks)
    assert set(bnd.unique().tolist()) <= {0.0, 1.0}
    assert bnd[2].sum() == 0 and bnd[0, 0, 9, 7] == 0 and bnd[0, 0, 4, 7] == 1 and bnd[0, 0, 3, 7] == 1


def test_dct_basis_is_orthonormal():
    b = dct_basis(7, 16).reshape(16, -1).double()
    torch.testing.assert_close(b @ b.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)


def test_loss_parts():
    images, masks = blobs(2, 32, 32)
    labels = torch.tensor([0, 1])
    unet = build_segmenter("unet", 2)
    loss, parts = segmentation_loss(unet(images), masks, labels)
    assert set(parts) == {"dice", "bce", "cls", "total"} and torch.isfinite(loss)
    _, parts = segmentation_loss(unet(images), masks[:, 0], None)  # [B,H,W] masks, no class loss
    assert set(parts) == {"dice", "bce", "total"}
    # -100 = no class label (e.g. a normal image with num_labels=2): skipped; all skipped -> 0, not NaN
    out = unet(images)
    _, parts = segmentation_loss(out, masks, torch.tensor([-100, -100]))
    assert parts["cls"] == 0
    _, p1 = segmentation_loss(out, masks, torch.tensor([1, -100]))
    ref = torch.nn.functional.cross_entropy(out["class_logits"][:1], torch.tensor([1]))
    torch.testing.assert_close(p1["cls"], ref.detach())
    w = torch.tensor([1.0, 3.0])
    _, p2 = segmentation_loss(out, masks, labels, label_weights=w)
    torch.testing.assert_close(p2["cls"], torch.nn.functional.cross_entropy(out["class_logits"], labels, weight=w).detach())


def _fit(model, images, masks, labels, steps, lr):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss, parts = segmentation_loss(model(images), masks, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert all(torch.isfinite(v) for v in parts.values())
    return losses


def test_unet_loss_decreases():
    torch.manual_seed(0)
    images, masks = blobs(4, 32, 32)
    model = build_segmenter("unet", 2, base_width=16)
    losses = _fit(model, images, masks, torch.tensor([0, 1, 0, 1]), steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses


def test_madgnet_loss_decreases():
    torch.manual_seed(0)
    images, masks = blobs(4, 32, 32)
    model = build_segmenter("madgnet", 2, encoder_weights="none")
    out = model(images)
    _, parts = segmentation_loss(out, masks, torch.tensor([0, 1, 0, 1]))
    assert set(parts) == {"structure", "distance", "boundary", "cls", "total"}
    losses = _fit(model, images, masks, torch.tensor([0, 1, 0, 1]), steps=4, lr=3e-3)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses


@pytest.fixture(scope="module")
def resnest_state():
    """A randomly initialised timm resnest50d classifier's state dict (stands in for ImageNet weights)."""
    torch.manual_seed(1)
    return timm.create_model("resnest50d", pretrained=False).state_dict()


def test_local_encoder_checkpoint_loads(tmp_path, resnest_state):
    ref = resnest_state
    path = tmp_path / "resnest50d.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.items()}}, path)  # DDP-style wrapper
    model = MADGNet(num_labels=2, encoder_checkpoint=str(path))
    got = model.encoder.state_dict()
    assert set(got) == {k for k in ref if not k.startswith("fc.")}
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k
    assert model.encoder_source == f"file:{path}"
    assert segmenter_spec(model)["kwargs"]["encoder_checkpoint"] is None


def test_local_safetensors_checkpoint_one_channel(tmp_path, resnest_state):
    from safetensors.torch import save_file

    ref = resnest_state
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    model = MADGNet(num_labels=2, encoder_checkpoint=str(path), in_chans=1)
    w = model.encoder.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(w, ref["conv1.0.weight"].sum(dim=1, keepdim=True))  # timm's adapt_input_conv
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 32, 32))["mask_logits"].shape == (1, 1, 32, 32)


def test_bad_encoder_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="wrong.pth"):
        MADGNet(num_labels=2, encoder_checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        MADGNet(num_labels=2, encoder_checkpoint=str(tmp_path / "missing.pth"))


def test_offline_imagenet_weights_say_what_to_do(monkeypatch):
    real = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(EncoderWeightsError) as err:
        MADGNet(num_labels=2, encoder_weights="imagenet")
    msg = str(err.value)
    assert "encoder_checkpoint=PATH" in msg and "encoder_weights='none'" in msg
    with pytest.raises(ValueError):
        MADGNet(num_labels=2, encoder_weights="random")
