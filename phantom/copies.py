"""Re-saved copies of a phantom case: BUSI's near-duplicates (the same acquisition saved again cropped or shifted a
little, with other burned-in overlays, rescaled or re-encoded; a few under the other tumour label).

:func:`plan_near_duplicates` turns some planned cases of :mod:`phantom.simulator` into copies of others;
:func:`resave` makes a copy's pixels and masks from its source's rendering (the ``overlay`` variant is rendered
again with another overlay RNG by the simulator and needs nothing here).
"""
from __future__ import annotations

import cv2
import numpy as np

NEAR_VARIANTS = ("crop", "shift", "overlay", "scale", "jpeg")


def plan_near_duplicates(rng, tasks, counts, taken, classes):
    """Turn some planned cases into re-saved copies of another case (BUSI holds about 235 duplicated images of 780,
    Pawłowska et al. 2023): one case in 20 copies a case of its own class, and one in 300 (at least 2) copies a
    case of the other tumour class, the variants in NEAR_VARIANTS order. A copy's task gets ``copy_of`` (the
    source key), ``variant`` and its ``params``; sources and copies are plain one-lesion grey cases that are no
    other quirk's. ``classes``: the class names, benign and malignant among them."""
    free = {c: [k for k in tasks if k[0] == c and k not in taken and not tasks[k]["colour"]] for c in classes}
    for c in classes:
        free[c] = [free[c][int(i)] for i in rng.permutation(len(free[c]))]
    n = sum(counts.values())
    plans = [(c, c) for c in rng.choice(classes, size=max(len(NEAR_VARIANTS), int(round(n / 20))),
                                         p=np.array([counts[c] for c in classes]) / n)]
    plans += [(("benign", "malignant") if k % 2 else ("malignant", "benign")) for k in range(max(2, round(n / 300)))]
    for k, (src_label, dst_label) in enumerate(plans):
        if len(free[src_label]) < 1 + (src_label == dst_label) or not free[dst_label]:
            continue
        src, dst = free[src_label].pop(), free[dst_label].pop()
        variant = NEAR_VARIANTS[k % len(NEAR_VARIANTS)]
        if variant == "crop":
            params = [float(v) for v in rng.uniform(0.02, 0.09, 4) * (rng.random(4) < 0.7)]
        elif variant == "shift":
            params = [float(v) for v in rng.uniform(0.02, 0.06, 2) * rng.choice([-1, 1], 2)]
        elif variant == "scale":
            params = float(rng.uniform(0.72, 0.88) if rng.random() < 0.5 else rng.uniform(1.12, 1.3))
        elif variant == "jpeg":
            params = int(rng.integers(60, 91))
        else:
            params = None
        tasks[dst] = {**tasks[dst], "copy_of": src, "variant": variant, "params": params}


def resave(image, masks, variant, params, height_range=(1, 1 << 16), width_range=(1, 1 << 16)):
    """A re-saved copy of a capture (RGB, grey replicated) and its masks: ``crop`` (fractions off top, bottom,
    left, right), ``shift`` (the content moved by fractions of the height and width, the rest black), ``scale``
    (a factor), ``jpeg`` (re-encoded at a quality, to be stored as PNG again). Crops and rescales keep the size
    within ``height_range`` / ``width_range``."""
    h, w = image.shape[:2]
    if variant == "crop":
        t, b, l, r = params
        fy = min(1.0, (h - height_range[0]) / max(1, (t + b) * h))       # no smaller than the ranges allow
        fx = min(1.0, (w - width_range[0]) / max(1, (l + r) * w))
        t, b, l, r = int(t * fy * h), int(b * fy * h), int(l * fx * w), int(r * fx * w)
        return image[t:h - b, l:w - r], [m[t:h - b, l:w - r] for m in masks]
    if variant == "shift":
        dy, dx = int(params[0] * h), int(params[1] * w)
        ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
        xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
        out, out_masks = np.zeros_like(image), [np.zeros_like(m) for m in masks]
        out[yd, xd] = image[ys, xs]
        for m, o in zip(masks, out_masks):
            o[yd, xd] = m[ys, xs]
        return out, out_masks
    if variant == "scale":
        size = (int(np.clip(round(w * params), *width_range)), int(np.clip(round(h * params), *height_range)))
        inter = cv2.INTER_AREA if params < 1 else cv2.INTER_CUBIC
        return cv2.resize(image, size, interpolation=inter), \
            [cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool) for m in masks]
    if variant == "jpeg":
        ok, buf = cv2.imencode(".jpg", image[..., 0], [cv2.IMWRITE_JPEG_QUALITY, int(params)])
        grey = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
        return np.repeat(grey[..., None], 3, axis=2), list(masks)
    return image, list(masks)
