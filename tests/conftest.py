"""Shared test setup: the repository root on sys.path, few threads (CI has 2 cores), fixed seeds."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TQDM_DISABLE", "1")


TINY_DIFFUSION = ["--img_size", "16", "--model_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
                  "--transformer_depth", "1", "--num_heads", "2", "--batch_size", "4", "--max_steps", "1",
                  "--sample_every", "0", "--val_timesteps", "1", "--device", "cpu", "--precision", "fp32"]


def make_tiny_checkpoint(root: Path) -> str:
    """A tiny 16-px MedSegDiffV2 checkpoint trained for one step on a few generated pairs, its EMA weights then
    randomised so that every layer shapes the samples (after one step the zero-initialised output layers still
    silence the network, and batch-dependent arithmetic would not show). Returns the best_model.pth path."""
    import numpy as np
    import torch

    import train_medsegdiff
    from data.pairs import PairDatasetWriter
    from common.checkpoint import load_checkpoint, save_checkpoint
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    with PairDatasetWriter(root / "pairs", 16) as w:
        for i in range(10):
            m = (yy - 8) ** 2 + (xx - 8) ** 2 < (3 + i % 3) ** 2
            img = np.clip(rng.normal(150, 25, (16, 16)) - 90 * m, 0, 255).astype(np.uint8)
            w.add(f"c{i:02d}", img, m, label=("benign", "malignant")[i % 2], split="val" if i >= 8 else "train",
                  source="real")
        w.commit("test")
    train_medsegdiff.main(["--data_dir", str(root / "pairs"), "--output_dir", str(root / "run"), *TINY_DIFFUSION])
    ckpt = load_checkpoint(root / "run" / "best_model.pth")
    g = torch.Generator().manual_seed(0)
    ckpt["ema"] = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in ckpt["ema"].items()}
    save_checkpoint(root / "run" / "best_model.pth", {k: v for k, v in ckpt.items() if k != "format"})
    return str(root / "run" / "best_model.pth")
