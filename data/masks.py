"""Mask utilities shared by every phase that writes masks."""
from __future__ import annotations

import numpy as np


def clean_mask(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, int]:
    """Bool mask [H,W] -> (uint8 mask in {0,255} without components smaller than ``min_area``, area)."""
    import cv2
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if min_area > 1 and m.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        keep = np.zeros(n, np.uint8)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        m = keep[labels]
    return m * np.uint8(255), int(np.count_nonzero(m))
