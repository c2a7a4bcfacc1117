"""Tests of the MedSegDiffV2 denoiser (CPU, small configs, deterministic)."""

import json

import pytest
import torch

from models.blocks import TransformerBlock
from models.medsegdiff_v2 import MedSegDiffV2

TINY = dict(img_size=32, model_channels=16, transformer_depth=1, num_heads=2)


def perturb_(model: MedSegDiffV2, seed: int = 0, std: float = 0.05) -> MedSegDiffV2:
    """Add noise to every parameter: the zero-initialised layers (output conv, residual outputs,
    adaLN, anchor injections) would otherwise hide the conditioning paths from the tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(model: MedSegDiffV2, batch: int, size: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = size or model.img_size
    x = torch.randn(batch, model.in_channels + model.out_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.arange(batch) % (model.num_classes + 1)  # includes the null class
    return x, t, y


def build(seed: int = 0, **kw) -> MedSegDiffV2:
    torch.manual_seed(seed)
    return MedSegDiffV2(**{**TINY, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(patch_size=2),
        dict(use_transformer=False),
        dict(use_anchor=False, num_classes=3),
        dict(img_size=64, channel_mult=(1, 2, 2), patch_size=2, num_classes=3),
        dict(img_size=64, patch_size=1, use_transformer=False, use_anchor=False),
        dict(in_channels=1, out_channels=1, transformer_depth=2, num_res_blocks=1),
    ],
)
def test_output_shapes(kw):
    model = build(**kw).eval()
    x, t, y = inputs(model, 2)
    with torch.no_grad():
        out, anchor = model(x, t, y, return_anchor=True)
        plain = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, plain)
    if model.use_anchor:
        assert anchor.shape == (2, model.out_channels, x.shape[2], x.shape[3])
        assert torch.isfinite(anchor).all()
    else:
        assert anchor is None
        assert not any("anchor" in k for k in model.state_dict())
    if not model.use_transformer:
        assert not any(isinstance(m, TransformerBlock) for m in model.modules())
    assert torch.isfinite(out).all()
    assert model.null_class == model.num_classes


def test_default_config_parameter_count():
    model = MedSegDiffV2()
    n = sum(p.numel() for p in model.parameters())
    print(f"MedSegDiffV2 default (256 px) parameters: {n / 1e6:.1f}M")
    assert 30e6 < n < 150e6  # MedSegDiff-B is ~129M
    assert model.init_kwargs["channel_mult"] == [1, 1, 2, 2, 4, 4]
    assert model.null_class == 2


def test_default_channel_mult_by_size():
    assert MedSegDiffV2(**{**TINY, "img_size": 64}).channel_mult == (1, 2, 3, 4)
    assert MedSegDiffV2(**{**TINY, "img_size": 32}).channel_mult == (1, 2, 2)
    assert MedSegDiffV2(**{**TINY, "img_size": 16}).channel_mult == (1, 2, 2)


def test_untrained_output_is_zero():
    model = build().eval()
    x, t, y = inputs(model, 2)
    with torch.no_grad():
        assert model(x, t, y).abs().max() == 0  # zero-initialised output conv


@pytest.mark.parametrize("kw", [dict(), dict(use_transformer=False, use_anchor=False)])
def test_class_label_changes_output(kw):
    model = perturb_(build(**kw)).eval()
    x, t, _ = inputs(model, 2)
    with torch.no_grad():
        outs = [model(x, t, torch.full((2,), c)) for c in range(model.num_classes + 1)]
        null_default = model(x, t, None)
    assert torch.equal(outs[-1], null_default)  # class_labels=None is the null class
    for i in range(len(outs)):
        assert torch.isfinite(outs[i]).all()
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-4, (i, j)
    # both the image and the mask channels see the class
    diff = (outs[0] - outs[1]).abs().amax(dim=(0, 2, 3))
    assert (diff > 1e-4).all()


def test_timesteps_change_output_and_accept_scalars():
    model = perturb_(build()).eval()
    x, _, y = inputs(model, 2)
    with torch.no_grad():
        a = model(x, torch.tensor([10, 10]), y)
        b = model(x, torch.tensor([900, 900]), y)
        c = model(x, 10, y)
        d = model(x, torch.tensor([10.0, 10.0]), y)
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, c)
    assert torch.allclose(a, d)


@pytest.mark.parametrize("kw", [dict(), dict(use_transformer=False, patch_size=2)])
def test_gradients_reach_every_parameter(kw):
    model = perturb_(build(**kw)).train()
    x, t, y = inputs(model, 3)  # labels 0, 1, 2 (null): every class-embedding row is used
    out, anchor = model(x, t, y, return_anchor=True)
    loss = out.square().mean() + anchor.square().mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def test_grad_checkpointing_identical():
    ref = perturb_(build(dropout=0.1)).train()
    ck = MedSegDiffV2(**{**ref.init_kwargs, "grad_checkpointing": True}).train()
    ck.load_state_dict(ref.state_dict())
    x, t, y = inputs(ref, 2)
    results = []
    for model in (ref, ck):
        torch.manual_seed(123)  # same dropout masks
        out, anchor = model(x, t, y, return_anchor=True)
        (out.square().mean() + anchor.abs().mean()).backward()
        results.append((out.detach(), anchor.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (o1, a1, g1), (o2, a2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(a1, a2)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-5, atol=1e-7), n


def test_sample_independent_of_batch():
    model = perturb_(build(use_transformer=True, patch_size=2)).eval()
    x, t, y = inputs(model, 4)
    with torch.no_grad():
        full, anchor_full = model(x, t, y, return_anchor=True)
        for i in (0, 3):
            one, anchor_one = model(x[i : i + 1], t[i : i + 1], y[i : i + 1], return_anchor=True)
            assert torch.allclose(one[0], full[i], rtol=1e-5, atol=1e-5)
            assert torch.allclose(anchor_one[0], anchor_full[i], rtol=1e-5, atol=1e-5)


def test_init_kwargs_roundtrip():
    model = perturb_(build(channel_mult=None, patch_size=2, num_classes=3))
    kwargs = json.loads(json.dumps(model.init_kwargs))  # JSON-serialisable
    assert set(kwargs) >= {"img_size", "in_channels", "out_channels", "num_classes", "model_channels",
                           "transformer_depth", "num_heads", "use_transformer", "channel_mult",
                           "num_res_blocks", "dropout", "patch_size", "use_anchor", "grad_checkpointing"}
    clone = MedSegDiffV2(**kwargs)
    assert list(clone.state_dict()) == list(model.state_dict())
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x, t, y = inputs(model, 2)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), clone(x, t, y))


def test_channels_last_and_bf16_autocast():
    model = perturb_(build()).eval()
    x, t, y = inputs(model, 2)
    with torch.no_grad():
        ref = model(x, t, y)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last), t, y)
        assert torch.allclose(out_cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf, anchor_bf = model_cl(x, t, y, return_anchor=True)
    assert out_bf.shape == ref.shape and torch.isfinite(out_bf.float()).all()
    assert (out_bf.float() - ref).abs().mean() < 0.1 * ref.abs().mean() + 1e-3


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(img_size=100), "divisible by 2\\^\\(levels-1\\)"),
        (dict(img_size=32, patch_size=3), "not divisible by patch_size"),
        (dict(img_size=32, patch_size=4, channel_mult=(1, 2, 2, 2, 2)), "divisible by 2\\^\\(levels-1\\)"),
        (dict(num_heads=3), "num_heads"),
        (dict(channel_mult=()), "at least one level"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(dropout=1.5), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(img_size=32.0), "img_size must be an integer"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        MedSegDiffV2(**{**TINY, **kw})


def test_bad_input_raises():
    model = build().eval()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 2, 30, 30), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.zeros(2, 2, 32, 32), torch.zeros(3), torch.zeros(2, dtype=torch.long))


def test_a_broken_diffusers_install_is_one_line_not_a_traceback(monkeypatch):
    """With peft and an older transformers beside a newer huggingface-hub (a lent GPU machine), importing diffusers'
    UNet2DModel raises a RuntimeError deep in diffusers; the peer network says so in one line (UserError)."""
    import sys
    import types

    import pytest

    from common.errors import UserError
    from models.denoisers import UNet2DPeer

    broken = types.ModuleType("diffusers")

    def missing(name):
        raise RuntimeError("Failed to import diffusers.models.unets.unet_2d because of the following error:\n"
                           "huggingface-hub>=1.5.0,<2.0 is required for a normal functioning of this module, but "
                           "found huggingface-hub==2.4.0.\nTry: `pip install transformers -U`")
    broken.__getattr__ = missing
    monkeypatch.setitem(sys.modules, "diffusers", broken)
    with pytest.raises(UserError) as err:
        UNet2DPeer(img_size=32, block_out_channels=(8, 16))
    msg = str(err.value)
    assert "\n" not in msg and "huggingface-hub>=1.5.0,<2.0 is required" in msg and "requirements.txt" in msg
