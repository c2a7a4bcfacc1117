"""Every preset in configs/ is a valid flag set of its script, and the networks they describe can be built."""
from pathlib import Path

import pytest
import torch

import train_medsegdiff
import train_segmentation
from common.cli import parse_config
from models.denoisers import build_denoiser
from training.diffusion_trainer import model_kwargs_from_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def script_for(path: Path):
    return train_segmentation if "segmentation" in path.stem else train_medsegdiff


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_preset_parses_and_builds(path):
    script = script_for(path)
    args = parse_config(script.build_parser(), ["--config", str(path)])
    assert args.config == str(path)
    if script is train_medsegdiff:
        with torch.device("meta"):   # shapes only: the 512-px preset's network is 138M parameters
            model = build_denoiser(args.arch, model_kwargs_from_args(args))
        x = torch.zeros(1, 2, args.img_size, args.img_size, device="meta")
        out = model(x, torch.zeros(1, dtype=torch.long, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
        assert out.shape == x.shape


def test_the_plan_presets_say_what_the_plan_says():
    args = parse_config(train_medsegdiff.build_parser(), ["--config", str(CONFIGS[0].parent / "busi256.yaml")])
    assert (args.img_size, args.batch_size, args.num_epochs, args.lr) == (256, 8, 100, 1e-4)
    assert (args.model_channels, args.transformer_depth, args.num_heads, args.use_transformer) == (128, 6, 8, True)
    assert (args.num_train_timesteps, args.beta_schedule, args.prediction_type) == (1000, "linear", "epsilon")
    big = parse_config(train_medsegdiff.build_parser(), ["--config", str(CONFIGS[0].parent / "busi512.yaml")])
    assert big.img_size == 512 and big.patch_size == 2
