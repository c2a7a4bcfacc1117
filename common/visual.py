"""Sample grids: each cell is a generated (or real) image beside the same image with its mask's outline."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.io import atomic_write_bytes


def mask_outline(masks: torch.Tensor) -> torch.Tensor:
    """Boolean outline (inner boundary, 1 px) of boolean masks [B,1,H,W]."""
    m = masks.float()
    eroded = -F.max_pool2d(-m, kernel_size=3, stride=1, padding=1)
    return (m - eroded) > 0


def overlay_cells(images_u8: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] uint8 images + bool masks -> [B,3,H,2W] uint8: plain image | image with red outline."""
    img = images_u8.expand(-1, 3, -1, -1).clone()
    outline = mask_outline(masks.bool())[:, 0]
    over = img.clone()
    over[:, 0][outline] = 255
    over[:, 1][outline] = 40
    over[:, 2][outline] = 40
    return torch.cat([img, over], dim=3)


def save_grid(path: str | Path, images_u8: torch.Tensor, masks: torch.Tensor, rows: int,
              pad: int = 2) -> None:
    """Save cells in a grid of ``rows`` rows (e.g. one row per class) as an RGB PNG, atomically."""
    import cv2
    cells = overlay_cells(images_u8.cpu(), masks.cpu())
    b, _, h, w = cells.shape
    cols = int(np.ceil(b / rows))
    canvas = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y:y + h, x:x + w] = cells[i]
    rgb = canvas.permute(1, 2, 0).numpy()
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def grid_from_arrays(path: str | Path, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     rows: int) -> None:
    """numpy convenience wrapper: lists of uint8 [H,W] images and {0,1}/bool masks."""
    imgs = torch.from_numpy(np.stack(images))[:, None]
    msks = torch.from_numpy(np.stack(masks).astype(bool))[:, None]
    save_grid(path, imgs, msks, rows)


def labelled_grid(path: str | Path, images: np.ndarray, masks: np.ndarray, labels: Sequence[str], title: str,
                  per_class: int = 8) -> None:
    """A PNG of one row per class (named at the left), each pair as the image and the image with its mask outline,
    under ``title`` (e.g. the run, step and class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = np.asarray(labels)
    classes = list(dict.fromkeys(labels.tolist()))
    fig, axes = plt.subplots(len(classes), 1, figsize=(max(4.0, 2.4 * per_class), 1.35 * len(classes) + 0.5),
                             squeeze=False)
    for ax, lab in zip(axes[:, 0], classes):
        idx = np.flatnonzero(labels == lab)[:per_class]
        cells = overlay_cells(torch.from_numpy(np.asarray(images)[idx])[:, None],
                              torch.from_numpy(np.asarray(masks)[idx])[:, None] > 0)
        ax.imshow(torch.cat(list(cells), dim=2).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(lab, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_training_curves(stats_path: str | Path, out_path: str | Path) -> None:
    """loss.png from a run's stats.jsonl: the training loss, its parts and (diffusion) its value per noise-level
    quartile, the validation score and the learning rate, each against the optimiser step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in Path(stats_path).read_text().splitlines() if line.strip()]
    train = [r for r in recs if "loss" in r]
    if not train:
        raise ValueError(f"{stats_path}: no training records yet")
    val_key = next((k for k in ("val_loss", "val_dice") if any(k in r and r[k] is not None for r in recs)), None)
    steps = [r["step"] for r in train]
    quart = sorted(k for k in train[-1] if k.startswith("loss_t_q"))
    parts = sorted(k for k in train[-1] if k.startswith("loss_") and k not in quart)
    fig, axes = plt.subplots(1, 4 if quart else 3, figsize=(16 if quart else 12, 3.4))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in train], label="loss", lw=2)
    for k in parts:
        ax.plot(steps, [r.get(k) for r in train], label=k[5:], lw=1)
    ax.set_title("training loss")
    i = 1
    if quart:
        for k in quart:
            axes[1].plot(steps, [r.get(k) for r in train], label=f"noise quartile {k[-1]}")
        axes[1].set_title("loss per noise-level quartile (1 = least noise)")
        i = 2
    if val_key:
        vr = [r for r in recs if r.get(val_key) is not None]
        axes[i].plot([r["step"] for r in vr], [r[val_key] for r in vr], marker="o", ms=3, color="C3")
    axes[i].set_title(f"validation ({val_key.replace('_', ' ') if val_key else 'none yet'})")
    axes[i + 1].plot(steps, [r["lr"] for r in train], color="C2")
    axes[i + 1].set_title("learning rate")
    for a in axes:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    for a in axes[:i]:
        if all(r["loss"] > 0 for r in train):
            a.set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buf.getvalue())
