"""Sample grids: each cell is a generated (or real) image beside the same image with its mask's outline."""
from __future__ import annotations

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
