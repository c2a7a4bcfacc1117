"""Every preset in configs/ is a valid flag set of its script (same checks as typed flags), and the networks they
describe can be built."""
from pathlib import Path

import pytest
import torch

from models.denoisers import build_denoiser
from common.cli import config_from_flags
from training.config import DiffusionTrainConfig, SegTrainConfig
from training.diffusion_trainer import denoiser_kwargs

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def config_class(path: Path):
    return SegTrainConfig if "segmentation" in path.stem else DiffusionTrainConfig


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_preset_parses_and_builds(path):
    cfg = config_from_flags(config_class(path), ["--config", str(path)])
    if isinstance(cfg, DiffusionTrainConfig):
        assert cfg.img_size > 0, "a diffusion preset names its image size"
        with torch.device("meta"):   # shapes only: the 512-px preset's network is 138M parameters
            model = build_denoiser(cfg.model.arch, denoiser_kwargs(cfg))
        c = 4 if cfg.diffusion.self_condition else 2
        x = torch.zeros(1, c, cfg.img_size, cfg.img_size, device="meta")
        out = model(x, torch.zeros(1, dtype=torch.long, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
        assert out.shape == (1, 2, cfg.img_size, cfg.img_size)


def test_the_plan_presets_say_what_the_plan_says():
    cfg = config_from_flags(DiffusionTrainConfig, ["--config", str(CONFIGS[0].parent / "busi256.yaml")])
    assert (cfg.img_size, cfg.optim.train_batch_size, cfg.run.num_epochs, cfg.optim.learning_rate) == (256, 8, 100, 1e-4)
    m = cfg.model
    assert (m.model_channels, m.transformer_depth, m.num_heads, m.use_transformer) == (128, 6, 8, True)
    d = cfg.diffusion
    assert (d.num_train_timesteps, d.beta_schedule, d.prediction_type) == (1000, "linear", "epsilon")
    big = config_from_flags(DiffusionTrainConfig, ["--config", str(CONFIGS[0].parent / "busi512.yaml")])
    assert big.img_size == 512 and big.model.patch_size == 2
