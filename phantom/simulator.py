"""A generated breast-ultrasound phantom written in the exact raw BUSI layout, quirks included.

BUSI cannot be shipped, so this is the project's embedded default dataset. Every case is a B-mode image of a
linear-probe breast scan rendered from a tissue echogenicity map (skin line, subcutaneous fat with septa and
Cooper's ligaments, fibroglandular tissue, retromammary fat, striated pectoral muscle) turned into fully
developed speckle (dense random complex scatterers x echogenicity, convolved with a laterally elongated,
depth-dependent PSF, so the field is complex Gaussian and its envelope Rayleigh; depth attenuation with
imperfect TGC; log compression), placed on a scanner capture with dark margins and burned-in overlays (text,
calipers, body marker, depth ticks).

Lesions follow the radiological descriptions of the classes:

* benign: oval/round, circumscribed smooth margins, wider than tall (parallel), near-homogeneous low echoes
  (or anechoic cysts), usually posterior acoustic enhancement, sometimes a thin echogenic capsule and
  lateral edge shadows;
* malignant: irregular, microlobulated and often spiculated margins, often taller than wide
  (non-parallel), heterogeneous echoes with occasional microcalcifications, usually posterior acoustic
  shadowing, sometimes an echogenic halo;
* normal: no lesion, empty mask.

The mask is the lesion region exactly (spicules included); overlays never enter it.

File layout and quirks (``quirks=True``, the default; see REFERENCE.md, BUSI)::

    <output_dir>/Dataset_BUSI_with_GT/{benign,malignant,normal}/<cls> (<n>).png, <cls> (<n>)_mask.png

* every image is 8-bit RGB with the grey value replicated; about 2 % carry real colour (a Doppler-like colour
  box with a colour bar, or coloured markers);
* lesion masks are 1-bit PNGs (PIL mode '1'); every normal mask is an empty 8-bit RGB PNG;
* about 2.6 % of tumour cases have extra masks ``_mask_1`` (and, from ~300 cases, one ``_mask_2``), each
  covering a separate further lesion, so that the full lesion is the OR of all masks; at least one extra mask
  is RGBA (like ``benign (4)_mask_1``);
* one cross-label pixel-identical duplicate (an image saved as malignant and as benign, like
  ``malignant (145)`` == ``benign (433)``) and a couple of same-label duplicates under different numbers;
* near-duplicates (from 50 cases, :mod:`phantom.copies`): one case in 20 is a copy of another case of its class
  saved again cropped, shifted, with other overlays, rescaled or JPEG re-encoded, and one in 300 (at least 2) a
  copy of a case of the other tumour class (like ``benign (399)`` / ``malignant (93)``); ``phantom.json`` lists
  them under ``near_duplicates``.

With ``quirks=False`` the files are plain: 8-bit grayscale ('L') images, 8-bit 0/255 grayscale masks for every
class, one lesion and one mask per image, no colour, no duplicates or near-duplicates (burned-in overlays are
image content and stay).

The dataset is written to ``Dataset_BUSI_with_GT.partial`` and renamed when complete; ``phantom.json`` beside it
records the parameters and the summary. Every case has its own RNG derived from ``(seed, class, number)``, so
the output is byte-identical whatever the number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from common.errors import UserError
from common.io import atomic_write_json
from common.workers import die_with_parent
from phantom.copies import plan_near_duplicates, resave

BUSI_ROOT = "Dataset_BUSI_with_GT"
CLASSES = ("benign", "malignant", "normal")
BUSI_RATIO = (437, 210, 133)
WIDTH_RANGE = (190, 1048)
HEIGHT_RANGE = (310, 719)
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
_PLAN_KEY = 7  # spawn key of the dataset-level RNG (case keys are (class index, number) pairs)
F32 = np.float32


# ----------------------------------------------------------------------------------------------- helpers
def case_rng(seed: int, label: str, number: int) -> np.random.Generator:
    """The RNG of one case, derived from (seed, class, number) only."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(CLASSES.index(label), number)))


def class_counts(n_cases: int, ratio=BUSI_RATIO) -> dict[str, int]:
    """Split ``n_cases`` by ``ratio`` (largest remainder); each class with a non-zero ratio gets >= 1 case when
    ``n_cases`` allows (so every class when ``n_cases >= 3`` with BUSI's ratio)."""
    if n_cases < 0 or len(ratio) != 3 or min(ratio) < 0 or sum(ratio) <= 0:
        raise ValueError(f"need n_cases >= 0 and three non-negative ratio parts, got {n_cases}, {ratio}")
    exact = [n_cases * r / sum(ratio) for r in ratio]
    counts = [int(e) for e in exact]
    for i in sorted(range(3), key=lambda i: (counts[i] - exact[i], i))[: n_cases - sum(counts)]:
        counts[i] += 1
    if n_cases >= sum(r > 0 for r in ratio):
        for i in range(3):
            while counts[i] == 0 and ratio[i] > 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return dict(zip(CLASSES, counts))


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a capture: mostly ~450-550 x 500-600, now and then anywhere in BUSI's range."""
    if rng.random() < 0.08:
        h, w = rng.uniform(*HEIGHT_RANGE), rng.uniform(*WIDTH_RANGE)
    else:
        h, w = rng.normal(495, 40), rng.normal(555, 50)
    return (int(np.clip(round(h), *HEIGHT_RANGE)), int(np.clip(round(w), *WIDTH_RANGE)))


def _noise(rng, h, w, cell_y, cell_x):
    """Smooth Gaussian-like noise (about unit std) with feature size ~cell_y x cell_x pixels."""
    small = rng.standard_normal((max(2, int(h / cell_y) + 2), max(2, int(w / cell_x) + 2)), dtype=F32)
    return cv2.resize(small * (1.0 / (small.std() + 1e-6)), (w, h), interpolation=cv2.INTER_CUBIC)


def _curve(rng, w, knots):
    """A smooth random 1-D function of x (about unit std): up to ``knots`` half-waves across, shape (w,)."""
    x = np.arange(w, dtype=F32) * F32(np.pi / w)
    k = np.arange(1, knots + 1)
    amp = rng.standard_normal(knots) / k
    out = (amp[:, None] * np.sin(k[:, None] * x[None, :] + rng.uniform(0, 2 * np.pi, knots)[:, None])).sum(0)
    return (out * (np.sqrt(2) / np.sqrt((amp ** 2).sum()) + 1e-6)).astype(F32)


def _step(d, width):
    """Soft 0 -> 1 step as d crosses 0 over ~2*width pixels."""
    return np.clip(d * (0.5 / width) + 0.5, 0.0, 1.0)


def _soft_floor(v, low):
    """A smooth max(v, low) (no kinks in layer boundaries)."""
    k = 0.5 * low
    return low + k * np.logaddexp(0, (v - low) / k)


def _ridge(e, boundary, sigma, gain, offset=0.0):
    """Add a bright line ``gain * exp(-((y - boundary(x) - offset) / sigma)^2)`` in the rows it touches."""
    h = e.shape[0]
    lo = max(0, int(boundary.min() + offset - 3 * sigma))
    hi = min(h, int(boundary.max() + offset + 3 * sigma) + 2)
    if lo < hi:
        yy = np.arange(lo, hi, dtype=F32)[:, None]
        e[lo:hi] += gain * np.exp(-(((yy - boundary[None, :] - offset) / sigma) ** 2))


# ----------------------------------------------------------------------------------------------- tissue
def _tissue(rng, h, w):
    """Echogenicity (scatterer amplitude) map of the normal breast and the layer boundaries.

    The smooth part (layers, their texture, muscle fibres) is built on a half-resolution grid, each layer only
    over the rows it can occupy and blended in with a soft step, then upsampled; the thin bright lines (skin,
    fascia, septa, ligaments) are drawn at full resolution."""
    u = h / 100.0
    skin = rng.uniform(0.0, 2.5) * u + 1.2 * u + 0.5 * u * _curve(rng, w, 3)
    skin_th = max(1.2, rng.uniform(0.5, 0.9) * u)
    fat_bot = skin + _soft_floor(rng.uniform(8, 26) * u + 3.0 * u * _curve(rng, w, 5), 3 * u)
    gland_bot = fat_bot + _soft_floor(rng.uniform(22, 45) * u + 3.0 * u * _curve(rng, w, 3), 6 * u)
    muscle_top = gland_bot + _soft_floor(rng.uniform(2.0, 6.0) * u + 0.8 * u * _curve(rng, w, 3), 1 * u)
    muscle_bot = muscle_top + _soft_floor(rng.uniform(8, 18) * u + 2.0 * u * _curve(rng, w, 3), 4 * u)
    fat_level, dense = rng.uniform(0.14, 0.22), rng.uniform(0.75, 1.1)
    angle, period = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(1.6, 2.8) * u
    islands_thr, deep_level = rng.uniform(0.8, 1.6), rng.uniform(0.05, 0.15)
    hc, wc = (h + 1) // 2, (w + 1) // 2          # the coarse grid; below, u and w are in its units
    full_u, full_w, u, w = u, w, u / 2, wc
    period /= 2

    def fat(n):
        return fat_level * np.exp(0.25 * _noise(rng, n, w, 8 * u, 0.1 * w))

    def gland(n):
        g = dense * np.exp(0.35 * _noise(rng, n, w, 2.5 * u, 0.09 * w) + 0.2 * _noise(rng, n, w, 10 * u, 0.2 * w)
                           + 0.25 * _noise(rng, n, w, 1.0 * u, 0.04 * w))
        islands = np.clip((_noise(rng, n, w, 6 * u, 0.14 * w) - islands_thr) * 2.5, 0, 1)
        return g + (fat(n) - g) * islands

    def muscle(n, lo):
        yy = np.arange(lo, lo + n, dtype=F32)[:, None]
        xx = np.arange(w, dtype=F32)[None, :]
        phase = (yy * np.cos(angle) + xx * np.sin(angle)) * F32(2 * np.pi / period) \
            + 2.5 * _noise(rng, n, w, 5 * u, 0.12 * w) + 0.02 * xx * _noise(rng, n, w, 8 * u, 0.3 * w)
        broken = np.clip(0.6 + 0.6 * _noise(rng, n, w, 3 * u, 0.12 * w), 0, 1)  # discontinuous septa
        return 0.1 + 0.5 * broken * (0.5 + 0.5 * np.cos(phase)) ** 6

    def deep(n):
        return deep_level * np.exp(0.3 * _noise(rng, n, w, 6 * u, 0.1 * w))

    e = np.full((hc, wc), rng.uniform(0.01, 0.04), F32)  # coupling gel above the skin
    width = 1.0 + 0.5 * u
    bounds = [b[::2] / 2 for b in (skin + skin_th, fat_bot, gland_bot, muscle_top, muscle_bot)]
    makers = [lambda n, lo: fat(n), lambda n, lo: gland(n), lambda n, lo: 1.1 * fat(n), muscle, lambda n, lo: deep(n)]
    for i, (top, make) in enumerate(zip(bounds, makers)):
        lo = max(0, int(top.min() - width) - 1)
        hi = hc if i + 1 == len(bounds) else min(hc, int(bounds[i + 1].max() + width) + 2)
        if lo >= hi:
            continue
        layer = make(hi - lo, lo).astype(F32)
        yy = np.arange(lo, hi, dtype=F32)[:, None]
        e[lo:hi] += (layer - e[lo:hi]) * _step(yy - top[None, :], width)
    u, w = full_u, full_w
    e = cv2.resize(e, (w, h), interpolation=cv2.INTER_LINEAR)
    _ridge(e, skin, skin_th, 2.2)                               # skin line
    _ridge(e, skin, 1.5 * skin_th, 0.4, 2.2 * skin_th)           # dermis
    _ridge(e, muscle_top, max(1.0, 0.5 * u), 1.1)              # pectoral fascia

    # septa between fat lobules and Cooper's ligaments: thin bright curvilinear lines, drawn then blurred
    rows = min(h, int(fat_bot.max() + 3 * u) + 4)
    lines = np.zeros((rows, w), np.uint8)
    for _ in range(rng.integers(1, 7)):
        i = int(rng.uniform(0, w - 1))
        cy = rng.uniform(skin[i] + skin_th, fat_bot[i])
        ax = (int(rng.uniform(0.05, 0.18) * w), int(max(2, rng.uniform(0.25, 0.55) * (fat_bot[i] - skin[i]) / 2)))
        a0 = rng.uniform(0, 360)
        cv2.ellipse(lines, (i, int(cy)), ax, rng.uniform(-15, 15), a0, a0 + rng.uniform(90, 250),
                    int(rng.integers(90, 230)), 1 + int(rng.random() < 0.3), cv2.LINE_AA)
    for _ in range(rng.integers(0, 5)):
        x0 = rng.uniform(0, w)
        x1 = x0 + rng.uniform(-0.25, 0.25) * w
        i0, i1 = int(np.clip(x0, 0, w - 1)), int(np.clip(x1, 0, w - 1))
        p0, p2 = np.array([x0, fat_bot[i0] + 2 * u]), np.array([x1, skin[i1] + 2 * skin_th])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.06 * w, 2)
        t = np.linspace(0, 1, 40)[:, None]
        pts = ((1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2).astype(np.int32)
        cv2.polylines(lines, [pts], False, int(rng.integers(120, 256)), 1 + int(rng.random() < 0.3), cv2.LINE_AA)
    e[:rows] += F32(rng.uniform(0.5, 1.0) / 255) * cv2.GaussianBlur(lines.astype(F32), (0, 0), 0.8)
    return e, {"skin": skin, "fat_bot": fat_bot, "gland_bot": gland_bot, "muscle_top": muscle_top}


# ----------------------------------------------------------------------------------------------- lesions
def _lesion_polygon(rng, label, n_pts=1440):
    """Unit-scale lesion outline (x, y) around (0, 0), radiologically shaped for the class."""
    theta = np.linspace(0, 2 * np.pi, n_pts, endpoint=False)
    if label == "benign":
        aspect = rng.uniform(1.2, 2.1)                       # width / height: parallel orientation
        rot = np.deg2rad(rng.normal(0, 7))
        harmonics = [(k, rng.uniform(0.0, 0.04)) for k in (2, 3, 4)]
        if rng.random() < 0.3:                               # gentle macrolobulation (2-4 lobes)
            harmonics.append((int(rng.integers(2, 5)), rng.uniform(0.04, 0.08)))
        spikes = 0
    else:
        aspect = rng.uniform(0.55, 0.95) if rng.random() < 0.6 else rng.uniform(0.95, 1.5)
        rot = np.deg2rad(rng.normal(0, 15))
        harmonics = [(k, rng.uniform(0.03, 0.11)) for k in (2, 3, 4, 5)]      # irregular / angular
        harmonics += [(int(k), rng.uniform(0.015, 0.045)) for k in rng.integers(9, 26, 4)]  # microlobulated
        spikes = int(rng.integers(6, 16)) if rng.random() < 0.65 else 0
    a, b = np.sqrt(aspect), 1 / np.sqrt(aspect)
    r = a * b / np.sqrt((b * np.cos(theta - rot)) ** 2 + (a * np.sin(theta - rot)) ** 2)
    r = r * (1 + sum(amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k, amp in harmonics))
    for _ in range(spikes):                                  # spicules: tapered radial extensions
        centre, half = rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.09)
        d = np.abs((theta - centre + np.pi) % (2 * np.pi) - np.pi)
        r = r + rng.uniform(0.15, 0.5) * np.clip(1 - d / half, 0, None) ** 2
    return np.stack([r * np.cos(theta), r * np.sin(theta)], 1)


def _place_lesion(rng, label, h, w, layers, area, occupied):
    """Fill one lesion of about ``area`` px into a new mask avoiding ``occupied``; None if it does not fit."""
    poly = _lesion_polygon(rng, label)
    x, y = poly[:, 0], poly[:, 1]
    unit_area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    scale = np.sqrt(area / unit_area)
    span_x, span_y = (x.max() - x.min()) * scale, (y.max() - y.min()) * scale
    scale *= min(1.0, 0.8 * w / span_x, 0.62 * h / span_y)
    lo_x, hi_x = -x.min() * scale + 3, w - x.max() * scale - 3
    top_min = float(np.median(layers["skin"])) + 0.06 * h
    lo_y, hi_y = max(-y.min() * scale + top_min, 0.22 * h), min(h - y.max() * scale - 0.12 * h, 0.72 * h)
    hi_y = max(hi_y, lo_y)
    fat_bot, gland_bot = float(np.median(layers["fat_bot"])), float(np.median(layers["gland_bot"]))
    for _ in range(25):
        cx = rng.uniform(lo_x, hi_x) if rng.random() < 0.3 else np.clip(rng.normal(w / 2, w / 7), lo_x, hi_x)
        cy = np.clip(rng.uniform(fat_bot, max(fat_bot, gland_bot)), lo_y, hi_y)
        mask = np.zeros((h, w), np.uint8)
        pts = np.round(np.stack([cx + x * scale, cy + y * scale], 1) * 16).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, shift=4)
        if occupied is None or not np.any(mask & occupied):
            return mask.astype(bool)
    return None


def _apply_lesion(rng, e, label, mask):
    """Darken the lesion, add its margin/internal features and its posterior acoustic feature into ``e``.

    Works in place on a window around the lesion (and the columns below it); returns the posterior kind."""
    h, w = e.shape
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    lh, lw = y1 - y0 + 1, x1 - x0 + 1
    cyst = label == "benign" and rng.random() < 0.25
    if cyst:
        level, het, edge, cell = rng.uniform(0.005, 0.02), 0.3, 0.8, 6
    elif label == "benign":
        level = float(np.exp(rng.uniform(np.log(0.035), np.log(0.22))))   # from clearly to mildly hypoechoic
        het, edge, cell = rng.uniform(0.2, 0.5), rng.uniform(0.8, 1.6), 5
    else:
        level, het, edge, cell = rng.uniform(0.03, 0.1), rng.uniform(0.45, 0.8), rng.uniform(1.2, 2.5), 6
    halo = rng.uniform(3, 10) * max(h, w) / 550 if label == "malignant" and rng.random() < 0.4 else 0.0
    lat_sigma = max(1.0, 0.04 * lw)
    pad = int(3 * edge + 2.5 * halo + 3 * lat_sigma + 10)
    wy0, wy1, wx0, wx1 = max(0, y0 - pad), min(h, y1 + pad + 1), max(0, x0 - pad), min(w, x1 + pad + 1)
    near, m8 = e[wy0:wy1, wx0:wx1], mask[wy0:wy1, wx0:wx1].astype(np.uint8)
    m = m8.astype(F32)
    hn, wn = m.shape
    level = min(level, 0.4 * float(np.percentile(near[m8 == 0], 75)))   # hypoechoic where it sits (e.g. in fat)
    inner = level * np.exp(het * _noise(rng, hn, wn, cell + 0.04 * lh, cell + 0.05 * lw))
    if label == "malignant" and rng.random() < 0.35:         # microcalcifications
        dots = np.zeros((hn, wn), np.uint8)
        for k in rng.integers(0, len(ys), int(rng.integers(3, 14))):
            cv2.circle(dots, (int(xs[k] - wx0), int(ys[k] - wy0)), 1, 255, -1)
        inner += F32(2.0 / 255) * dots
    soft = cv2.GaussianBlur(m, (0, 0), edge)
    near += (inner - near) * soft
    outside = cv2.distanceTransform(1 - m8, cv2.DIST_L2, 3)
    if halo:                                                   # echogenic halo
        near *= 1 + rng.uniform(0.6, 1.4) * np.exp(-((outside - 0.5 * halo) / halo) ** 2) * (outside > 0)
    if label == "benign" and rng.random() < 0.45:            # thin echogenic capsule (specular top/bottom)
        g = np.abs(cv2.Sobel(cv2.GaussianBlur(m, (0, 0), 1.0), cv2.CV_32F, 0, 1, ksize=3))
        near += rng.uniform(1.0, 2.5) * g / (g.max() + 1e-6) * (outside > 0)
    # posterior acoustic feature: by the lesion thickness above each pixel, smoothed laterally
    below = e[wy0:, wx0:wx1]
    mb = mask[wy0:, wx0:wx1].astype(F32)
    cover = np.minimum(np.cumsum(mb, axis=0) * F32(1 / lh), 1.0)
    cover = cv2.GaussianBlur(cover, (0, 0), sigmaX=lat_sigma, sigmaY=1.0)
    yy = np.arange(wy0, h, dtype=F32)[:, None]
    xx = np.arange(wx0, wx1, dtype=F32)[None, :]
    u = rng.random()
    kind = ("enhance" if u < 0.75 else "none" if u < 0.92 else "shadow") if label == "benign" else \
           ("shadow" if u < 0.72 else "none" if u < 0.9 else "enhance")
    if kind == "enhance":
        decay = np.exp(-np.maximum(yy - y1, 0) / (rng.uniform(0.8, 2.0) * lh))
        below *= 1 + rng.uniform(0.6, 1.2) * (2.0 if cyst else 1.0) * cover * decay * (1 - mb)  # beneath only
        if rng.random() < 0.4:                                # refraction shadows at the lateral edges
            sides = np.exp(-((xx - x0) / 3) ** 2) + np.exp(-((xx - x1) / 3) ** 2)
            below *= 1 - 0.6 * np.clip(sides, 0, 1) * (yy > y0 + 0.5 * lh)
    elif kind == "shadow":
        below *= np.exp(-rng.uniform(1.0, 2.6) * cover)
    return kind


# ----------------------------------------------------------------------------------------------- B-mode
_INT8_STD = float(np.sqrt((256 ** 2 - 1) / 12))


def _bmode(rng, e):
    """Speckle, PSF, attenuation, TGC and log compression of an echogenicity map -> uint8 B-mode image.

    Scatterers are i.i.d. uniform bytes times the echogenicity; after the PSF (many scatterers per resolution
    cell) the field is complex Gaussian, its envelope Rayleigh: fully developed speckle."""
    h, w = e.shape
    yy = (np.arange(h, dtype=F32) / h)[:, None]
    xx = (np.arange(w, dtype=F32) / w)[None, :]
    att_db = rng.uniform(18, 32)
    amp = e * (10 ** (-att_db * yy / 20)) + F32(rng.uniform(0.004, 0.012))  # signal attenuates, noise does not
    scat = np.frombuffer(rng.bytes(2 * h * w), np.int8).reshape(2, h, w).astype(F32)
    sx, sy = rng.uniform(1.4, 2.4) * h / 500, rng.uniform(0.7, 1.1) * h / 500
    far = np.clip(np.abs(yy - rng.uniform(0.3, 0.6)) / 0.45, 0, 1)          # lateral PSF widens off focus
    k1 = (1 - far) * F32(np.sqrt(4 * np.pi * sx * sy) / _INT8_STD)
    k2 = far * F32(np.sqrt(4 * np.pi * 1.5 * sx * sy) / _INT8_STD)
    env2 = np.zeros((h, w), F32)
    for c in (0, 1):
        s = amp * scat[c]
        f = cv2.GaussianBlur(s, (0, 0), sigmaX=sx, sigmaY=sy) * k1 + cv2.GaussianBlur(s, (0, 0), 1.5 * sx, sy) * k2
        env2 += f * f
    looks = rng.uniform(0.5, 1.1)                              # compounding / incoherent averaging
    env2 = cv2.GaussianBlur(env2, (0, 0), sigmaX=1.3 * looks, sigmaY=looks)
    env2 += (cv2.GaussianBlur(env2, (0, 0), sigmaX=1.6 * looks, sigmaY=1.2 * looks) - env2) * far   # far field
    tgc = att_db * yy + 2.5 * _curve(rng, h, 4)[:, None] - rng.uniform(0, 8) * np.clip(yy - 0.8, 0, None) / 0.2
    lateral = -rng.uniform(1, 4) * np.abs(2 * xx - 1) ** 6
    db = cv2.log(env2 + F32(1e-9)) * F32(10 / np.log(10)) + (tgc + lateral).astype(F32)
    top, dr = rng.uniform(17, 23), rng.uniform(48, 58)
    idx = np.clip((db - (top - dr)) * F32(1023 / dr), 0, 1023).astype(np.uint16)
    lut = np.round((np.arange(1024) / 1023) ** rng.uniform(1.1, 1.5) * 255).astype(np.uint8)
    return lut[idx]


# ----------------------------------------------------------------------------------------------- overlays
_PROBES = ("L12-5", "L14-5", "ML6-15", "L11-3", "14L5", "L12-3", "LA523", "9L4", "L15-7io")
_VIEWS = ("RAD", "ARAD", "TRANS", "SAG", "LONG", "OBL")


def _texts(rng, depth_cm):
    side = rng.choice(["RT", "LT", "RIGHT", "LEFT"])
    lines = [str(rng.choice(_PROBES)), f"{rng.uniform(7, 15):.1f}MHz", f"D {depth_cm:.1f}cm",
             f"G{rng.integers(40, 80)}", f"DR{rng.integers(50, 80)}", f"FR {rng.integers(10, 40)}Hz",
             f"{side} BREAST", f"{rng.integers(1, 13)}:00 {rng.integers(1, 10)}CM FN {rng.choice(_VIEWS)}",
             f"MI {rng.uniform(0.6, 1.4):.1f}", f"TIs {rng.uniform(0.1, 0.9):.1f}"]
    keep = rng.random(len(lines)) < 0.55
    return [t for t, k in zip(lines, keep) if k] or lines[:1]


def _put_lines(img, rng, lines, x, y, scale, colour, step):
    for t in lines:
        cv2.putText(img, t, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
        y += step
    return y


def _cross(img, p, s, colour):
    x, y = int(p[0]), int(p[1])
    cv2.line(img, (x - s, y), (x + s, y), colour, 1)
    cv2.line(img, (x, y - s), (x, y + s), colour, 1)


def _calipers(rng, img, mask, colour):
    """Caliper crosses at the lesion's extreme points (horizontal, sometimes vertical), maybe dotted lines.

    Returns the caliper distances in pixels."""
    ys, xs = np.nonzero(mask)
    s = int(rng.integers(3, 7))
    pairs = [((xs.min() - 2, ys[xs.argmin()]), (xs.max() + 2, ys[xs.argmax()]))]
    if rng.random() < 0.6:
        pairs.append(((xs[ys.argmin()], ys.min() - 2), (xs[ys.argmax()], ys.max() + 2)))
    for a, b in pairs:
        _cross(img, a, s, colour)
        _cross(img, b, s, colour)
        if rng.random() < 0.5:
            n = int(np.hypot(b[0] - a[0], b[1] - a[1]) // 7)
            for t in np.linspace(0, 1, max(n, 2))[1:-1]:
                cv2.circle(img, (int(a[0] + t * (b[0] - a[0])), int(a[1] + t * (b[1] - a[1]))), 1, colour, -1)
    return [float(np.hypot(b[0] - a[0], b[1] - a[1])) for a, b in pairs]


def _body_marker(img, rng, x, y, r, colour):
    cv2.circle(img, (int(x), int(y)), int(r), colour, 1, cv2.LINE_AA)
    cv2.circle(img, (int(x), int(y)), max(1, int(r / 6)), colour, -1)
    a = rng.uniform(0, 2 * np.pi)
    px, py, d = x + 0.6 * r * np.cos(a), y + 0.6 * r * np.sin(a), rng.uniform(0, np.pi)
    cv2.line(img, (int(px - 0.45 * r * np.cos(d)), int(py - 0.45 * r * np.sin(d))),
             (int(px + 0.45 * r * np.cos(d)), int(py + 0.45 * r * np.sin(d))), colour, max(2, int(r / 5)))


def _doppler(rng, rgb, box):
    """A colour-flow box: outline, worm-like red/blue flow and a colour bar."""
    x0, y0, x1, y1 = box
    bh, bw = y1 - y0, x1 - x0
    if bh < 8 or bw < 8:
        return
    roi = rgb[y0:y1, x0:x1]
    vessel = np.abs(_noise(rng, bh, bw, 10, 10)) < rng.uniform(0.06, 0.14)
    vessel &= (_noise(rng, bh, bw, 25, 25) > 0.6) & (roi[..., 0] > 25)       # no flow in anechoic regions
    toward = _noise(rng, bh, bw, 30, 30) > 0
    speed = np.clip(0.5 + 0.5 * _noise(rng, bh, bw, 6, 6), 0, 1)
    red = np.stack([160 + 95 * speed, 60 * speed + 20, np.zeros_like(speed) + 10], -1)
    blue = np.stack([np.zeros_like(speed) + 10, 60 * speed + 40, 160 + 95 * speed], -1)
    roi[vessel] = np.where(toward[..., None], red, blue)[vessel].astype(np.uint8)
    cv2.rectangle(rgb, (x0, y0), (x1, y1), (190, 190, 190), 1)
    cx = max(0, x0 - 14)
    bar = np.linspace(0, 1, max(2, bh // 2))[:, None]
    colours = np.where(bar < 0.5, [255, 0, 0] * (1 - 2 * bar) + [60, 0, 0], [0, 0, 255] * (2 * bar - 1) + [0, 0, 60])
    rgb[y0:y0 + len(bar), cx:cx + 6] = np.clip(colours, 0, 255).astype(np.uint8)[:, None, :]


def _overlays(rng, canvas, masks, margins, colour):
    """Burned-in scanner annotations: text, calipers (+ measurements), body marker, depth ticks."""
    H, W = canvas.shape[:2]
    t, b, l, r = margins
    white = (int(rng.integers(200, 256)),) * (3 if colour else 1)
    fs = float(np.clip(H / 1000 * rng.uniform(0.75, 1.15), 0.3, 0.7))
    step = int(30 * fs) + 4
    marker = (255, 230, 0) if colour and rng.random() < 0.6 else white
    h = H - t - b
    depth_cm = rng.uniform(2.5, 5.5)                          # the depth the FOV spans: text, ticks, calipers agree
    if rng.random() < 0.75:
        x = 4 if l < 40 else int(rng.uniform(3, max(4, l - 30)))
        _put_lines(canvas, rng, _texts(rng, depth_cm), x, t + step if t < step else int(0.5 * t) + 5, fs,
                   marker if colour and rng.random() < 0.4 else white, step)
    if masks and rng.random() < 0.45:
        dists = _calipers(rng, canvas, masks[0], marker)
        if rng.random() < 0.6:
            meas = [f"{i + 1} D {d * depth_cm / h:.2f}cm" for i, d in enumerate(dists)]
            _put_lines(canvas, rng, meas, W - int(130 * fs / 0.5), H - b - step * len(meas) - 4, fs, white, step)
    if rng.random() < 0.35:
        rad = max(8, 0.035 * H)
        _body_marker(canvas, rng, l + rad + 6 if rng.random() < 0.5 else W - r - rad - 6, H - b - rad - 6, rad, marker)
    if rng.random() < 0.5:                                    # depth ticks (1 cm) along the FOV's right edge
        cm = h / depth_cm
        for k in range(1, int(h / cm) + 1):
            cv2.circle(canvas, (min(W - 3, W - r - 4), int(t + k * cm)), 1 + int(k % 5 == 0), white, -1)


# ----------------------------------------------------------------------------------------------- a case
@dataclass
class Case:
    """One rendered case: the capture (uint8 H x W x 3, grey replicated unless colour) and its lesion masks."""
    image: np.ndarray
    masks: list = field(default_factory=list)      # one bool H x W mask per lesion (first = main), [] if normal
    colour: bool = False
    posterior: list = field(default_factory=list)  # 'enhance' | 'shadow' | 'none' per lesion

    @property
    def gray(self) -> np.ndarray:
        return self.image[..., 0] if not self.colour else cv2.cvtColor(self.image, cv2.COLOR_RGB2GRAY)

    @property
    def mask(self) -> np.ndarray:
        out = np.zeros(self.image.shape[:2], bool)
        for m in self.masks:
            out |= m
        return out


def render_full(rng: np.random.Generator, label: str, height: int, width: int, n_lesions: int = 1,
                colour: bool = False, overlays: bool = True, overlay_rng: np.random.Generator | None = None) -> Case:
    """Render one capture of ``height`` x ``width``; ``n_lesions`` separate lesions unless ``label == 'normal'``.

    ``overlay_rng`` draws the burned-in overlays instead of ``rng``: the same scan with other annotations (for a
    grey capture every other pixel is as ``rng`` alone gives it)."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    H, W = int(height), int(width)
    if rng.random() < 0.35:                                   # tight crop: the FOV fills the capture
        t = b = l = r = 0
    else:
        t, b = int(rng.uniform(0.03, 0.12) * H), int(rng.uniform(0.0, 0.05) * H)
        l, r = int(rng.uniform(0.0, 0.1) * W), int(rng.uniform(0.0, 0.1) * W)
    h, w = H - t - b, W - l - r
    e, layers = _tissue(rng, h, w)
    masks, kinds = [], []
    if label != "normal":
        frac = float(np.clip(rng.lognormal(np.log(0.072 if label == "benign" else 0.088), 0.6), 0.012, 0.25))
        occupied = None
        for k in range(max(1, n_lesions)):
            area = frac * H * W * (1.0 if k == 0 else rng.uniform(0.15, 0.4))
            m = None
            for _ in range(8):
                m = _place_lesion(rng, label, h, w, layers, area,
                                  None if occupied is None else cv2.dilate(occupied, np.ones((9, 9), np.uint8)))
                if m is not None and m.sum() >= 30:
                    break
                m, area = None, area * 0.7
            if m is None:       # no room left for a further lesion
                break
            occupied = m.astype(np.uint8) if occupied is None else occupied | m.astype(np.uint8)
            kind = _apply_lesion(rng, e, label, m)
            masks.append(m)
            kinds.append(kind)
    fov = _bmode(rng, e)
    gray = np.zeros((H, W), np.uint8)
    gray[t:t + h, l:l + w] = fov
    full_masks = []
    for m in masks:
        full_masks.append(np.zeros((H, W), bool))
        full_masks[-1][t:t + h, l:l + w] = m
    canvas = np.repeat(gray[..., None], 3, axis=2) if colour else gray
    if overlays:
        _overlays(rng if overlay_rng is None else overlay_rng, canvas, full_masks, (t, b, l, r), colour)
    if colour:
        if full_masks and rng.random() < 0.7:                 # Doppler box around the lesion
            ys, xs = np.nonzero(full_masks[0])
            pad = int(0.06 * W)
            box = (max(l, xs.min() - pad), max(t, ys.min() - pad), min(l + w - 1, xs.max() + pad),
                   min(t + h - 1, ys.max() + pad))
        else:
            bw, bh = int(rng.uniform(0.25, 0.5) * w), int(rng.uniform(0.2, 0.4) * h)
            bx, by = l + int(rng.uniform(0, w - bw)), t + int(rng.uniform(0.1 * h, h - bh))
            box = (bx, by, bx + bw, by + bh)
        _doppler(rng, canvas, tuple(int(v) for v in box))
        colour = bool((canvas[..., 0] != canvas[..., 1]).any() or (canvas[..., 0] != canvas[..., 2]).any())
    rgb = canvas if canvas.ndim == 3 else np.repeat(gray[..., None], 3, axis=2)
    return Case(rgb, full_masks, colour, kinds)


def render_case(rng: np.random.Generator, label: str, height: int, width: int,
                n_lesions: int = 1, overlays: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(grey image uint8 H x W, lesion mask bool H x W) of one case; the mask is empty for ``normal``."""
    case = render_full(rng, label, height, width, n_lesions=n_lesions, overlays=overlays)
    return case.gray, case.mask


# ----------------------------------------------------------------------------------------------- dataset
def _stem(label, number):
    return f"{label} ({number})"


def _plan(seed, counts, quirks):
    """Dataset-level choices (duplicates, extra masks, RGBA masks, colour images), from their own RNG.

    Returns ``tasks`` ({(label, number): task dict, or None for a duplicate that is copied, not rendered})
    and ``duplicates`` ([(kind, source key, copy key)])."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(_PLAN_KEY,)))
    n = sum(counts.values())
    tasks = {(c, i): {"n_lesions": 1, "rgba": False, "colour": False} for c in CLASSES
             for i in range(1, counts[c] + 1)}
    duplicates = []
    if not quirks:
        return tasks, duplicates
    taken = set()

    def pick(label, k):
        free = [i for i in range(1, counts[label] + 1) if (label, i) not in taken]
        chosen = sorted(int(i) for i in rng.choice(free, size=min(k, len(free)), replace=False)) if free else []
        taken.update((label, i) for i in chosen)
        return chosen

    if n >= 50 and counts["benign"] >= 3 and counts["malignant"] >= 3:
        # cross-label duplicate at BUSI's position: malignant (145) == benign (433)
        src = ("malignant", int(np.clip(round(counts["malignant"] * 145 / 210), 1, counts["malignant"])))
        dst = ("benign", int(np.clip(round(counts["benign"] * 433 / 437), 1, counts["benign"])))
        taken.update((src, dst))
        duplicates.append(("cross-label", src, dst))
        # same-label duplicates under different numbers: two, plus one per further 400 cases
        for _ in range(2 + (n - 50) // 400):
            label = CLASSES[int(rng.choice(3, p=np.array([counts[c] for c in CLASSES]) / n))]
            pair = pick(label, 2)
            if len(pair) == 2:
                a, b = pair if rng.random() < 0.5 else pair[::-1]
                duplicates.append(("same-label", (label, a), (label, b)))
    # extra masks: BUSI has 16 benign cases with 17 extra masks and one malignant case with one
    n_b = max(int(round(counts["benign"] * 16 / 437)), 1 if n >= 50 and counts["benign"] else 0)
    n_m = int(round(counts["malignant"] * 1 / 210))
    extra = [("benign", i) for i in pick("benign", n_b)] + [("malignant", i) for i in pick("malignant", n_m)]
    for key in extra:
        tasks[key]["n_lesions"] = 2
    if n >= 300 and extra:
        tasks[extra[int(rng.integers(len(extra)))]]["n_lesions"] = 3
    for j in rng.choice(len(extra), size=min(len(extra), max(1, int(round(len(extra) * 2 / 17)))), replace=False):
        tasks[extra[int(j)]]["rgba"] = True
    # real colour: 16 of 780
    n_col = max(int(round(n * 16 / 780)), 1 if n >= 50 else 0)
    pool = [k for k in tasks if k not in taken]
    for j in sorted(rng.choice(len(pool), size=min(n_col, len(pool)), replace=False)):
        tasks[pool[int(j)]]["colour"] = True
    if n >= 50 and counts["benign"] >= 6 and counts["malignant"] >= 6:
        plan_near_duplicates(rng, tasks, counts, taken | set(extra), CLASSES)
    for _, _, key in duplicates:
        tasks[key] = None        # not rendered: copied from its source
    return tasks, duplicates


def _save_rgb(path, rgb, grey=False):
    if not cv2.imwrite(str(path), rgb if grey else np.ascontiguousarray(rgb[..., ::-1]), PNG_PARAMS):
        raise OSError(f"could not write {path}")


def _render_and_write(job):
    """Worker: render one case from its own RNG and write its files. Returns a small record.

    A near-duplicate copy (``copy_of`` in its task) renders its source case again from the source's RNG (with
    its own overlay RNG for the ``overlay`` variant) and re-saves it (:func:`phantom.copies.resave`) under its own
    name."""
    root, seed, label, number, task, quirks = job
    source = task.get("copy_of")
    src_label, src_number = source if source else (label, number)
    rng = case_rng(seed, src_label, src_number)
    height, width = draw_size(rng)
    overlay_rng = case_rng(seed + 1, label, number) if task.get("variant") == "overlay" else None
    case = render_full(rng, src_label, height, width, n_lesions=task["n_lesions"], colour=task["colour"] and quirks,
                       overlay_rng=overlay_rng)
    if source:
        image, masks = resave(case.image, case.masks, task["variant"], task["params"], HEIGHT_RANGE, WIDTH_RANGE)
        if masks and masks[0].sum() < 0.5 * case.masks[0].sum() * (task["params"] if task["variant"] == "scale"
                                                                      else 1.0) ** 2:
            image, masks = resave(case.image, case.masks, "jpeg", 85)     # the crop would cut the lesion off
        case = Case(image, masks, False, case.posterior)
        height, width = image.shape[:2]
    folder = Path(root) / label
    stem = _stem(label, number)
    if quirks:
        _save_rgb(folder / f"{stem}.png", case.image, grey=not case.colour)
    else:
        cv2.imwrite(str(folder / f"{stem}.png"), case.gray, PNG_PARAMS)
    written = []
    if label == "normal":
        if quirks:
            _save_rgb(folder / f"{stem}_mask.png", np.zeros((height, width, 3), np.uint8), grey=True)
        else:
            cv2.imwrite(str(folder / f"{stem}_mask.png"), np.zeros((height, width), np.uint8), PNG_PARAMS)
    elif not quirks:
        cv2.imwrite(str(folder / f"{stem}_mask.png"), case.mask.astype(np.uint8) * 255, PNG_PARAMS)
    else:
        for k, m in enumerate(case.masks):
            name = f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"
            if k == 1 and task["rgba"]:
                v = m.astype(np.uint8) * 255
                Image.fromarray(np.dstack([v, v, v, np.full_like(v, 255)]), "RGBA").save(folder / name)
                written.append((name, "RGBA"))
            else:
                Image.fromarray(m).save(folder / name)        # bool array -> mode '1', a 1-bit PNG
                if k:
                    written.append((name, "1"))
    return {"label": label, "number": number, "size": (height, width), "extra": written,
            "copy_of": f"{src_label}/{_stem(src_label, src_number)}.png" if source else None,
            "variant": task.get("variant"),
            "colour": bool(case.colour), "posterior": case.posterior,
            "lesion_fraction": float(case.mask.mean()) if case.masks else 0.0}


def _worker_init(parent_pid: int | None = None):
    die_with_parent(parent_pid)   # a killed run takes its workers with it
    cv2.setNumThreads(1)


def generate_phantom(output_dir: str | Path, n_cases: int, seed: int = 0,
                     ratio: tuple[int, int, int] = BUSI_RATIO, workers: int | None = None,
                     quirks: bool = True, progress: bool = False) -> dict:
    """Write ``n_cases`` phantom cases as ``<output_dir>/Dataset_BUSI_with_GT/{benign,malignant,normal}/``.

    Counts follow ``ratio``; numbering is 1..count per class. The folder is built as
    ``Dataset_BUSI_with_GT.partial`` and renamed when complete; an existing ``Dataset_BUSI_with_GT`` is replaced
    only if ``phantom.json`` beside it shows that it is a phantom (real data is never overwritten).
    Returns the summary (also written to ``<output_dir>/phantom.json``).
    """
    start = time.perf_counter()
    out = Path(output_dir)
    final, partial, record = out / BUSI_ROOT, out / f"{BUSI_ROOT}.partial", out / "phantom.json"
    if final.exists() and not record.exists():
        raise UserError(f"{final} exists and is not a generated phantom (no {record.name} beside it); "
                        "choose another --output_dir or remove it yourself")
    counts = class_counts(int(n_cases), tuple(ratio))
    tasks, duplicates = _plan(seed, counts, quirks)
    if partial.exists():
        shutil.rmtree(partial)
    for c in CLASSES:
        (partial / c).mkdir(parents=True)
    jobs = [(str(partial), int(seed), c, i, t, bool(quirks)) for (c, i), t in tasks.items() if t is not None]
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="phantom", unit="case")
    records = []
    if workers == 1 or len(jobs) < 8:
        for job in jobs:
            records.append(_render_and_write(job))
            bar is not None and bar.update()
    else:
        # spawn, not fork: a child forked after the parent used OpenCV's thread pool can hang for ever in
        # cv2 (seen in the test suite); the workers only use numpy/OpenCV/PIL, with OpenCV's own pool off
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            for rec in pool.map(_render_and_write, jobs, chunksize=4):
                records.append(rec)
                bar is not None and bar.update()
    if bar is not None:
        bar.close()
    dup_summary = []
    for kind, (sl, si), (dl, di) in duplicates:
        for suffix in (".png", "_mask.png"):
            shutil.copyfile(partial / sl / f"{_stem(sl, si)}{suffix}", partial / dl / f"{_stem(dl, di)}{suffix}")
        dup_summary.append({"kind": kind, "files": [f"{sl}/{_stem(sl, si)}.png", f"{dl}/{_stem(dl, di)}.png"]})
    extra = [f"{r['label']}/{name}" for r in records for name, _ in r["extra"]]
    summary = {
        "root": str(final), "seed": int(seed), "n_cases": int(n_cases), "ratio": list(ratio), "quirks": bool(quirks),
        "counts": counts, "extra_masks": len(extra), "extra_mask_files": extra,
        "rgba_masks": [f"{r['label']}/{name}" for r in records for name, mode in r["extra"] if mode == "RGBA"],
        "duplicates": dup_summary,
        "near_duplicates": [{"kind": "cross-label" if r["copy_of"].split("/")[0] != r["label"] else "same-label",
                             "variant": r["variant"],
                             "files": [r["copy_of"], f"{r['label']}/{_stem(r['label'], r['number'])}.png"]}
                            for r in records if r["copy_of"]],
        "colour_images": [f"{r['label']}/{_stem(r['label'], r['number'])}.png" for r in records if r["colour"]],
        "mean_lesion_fraction": {c: float(np.mean([r["lesion_fraction"] for r in records if r["label"] == c] or [0]))
                                 for c in CLASSES[:2]},
    }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(record, summary)     # first: a Dataset_BUSI_with_GT beside it is always known as ours
    if final.exists():
        trash = out / f"{BUSI_ROOT}.old"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        shutil.rmtree(trash)
    partial.rename(final)
    return summary


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Write a BUSI-layout ultrasound phantom.")
    p.add_argument("output_dir")
    p.add_argument("--n_cases", type=int, default=780)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no_quirks", action="store_true")
    a = p.parse_args(argv)
    s = generate_phantom(a.output_dir, a.n_cases, seed=a.seed, workers=a.workers, quirks=not a.no_quirks,
                         progress=True)
    print(json.dumps({k: s[k] for k in ("root", "counts", "extra_masks", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
