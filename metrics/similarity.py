"""Pixel-level similarity: SSIM / MS-SSIM (vectorised torch), nearest-real SSIM, MS-SSIM diversity, and the
mask-image alignment of synthetic pairs (Dice between a synthetic mask and a segmenter's prediction).

SSIM is Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 255, averaged over
the positions where the whole window fits — numerically what ``skimage.metrics.structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)`` returns (its reflect padding only
touches the border it then crops away). Filtering is separable, done as two batched matrix products with a banded window matrix.

MS-SSIM (Wang et al. 2003) needs the 11-px window to fit at the coarsest scale, so the number of scales is
``min(5, 1 + floor(log2(S / 11)))``: 3 at 64 px, 2 at 32 px, 5 at 256 px; the standard weights of the scales used
are renormalised to sum 1, contrast-structure terms are clamped at 0 before the fractional powers.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metrics.floors import MetricUnavailable, subsets, summarise, verdict
from metrics.segmentation import dice

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WIN, SIGMA = 11, 1.5


def _kernel(device=None) -> torch.Tensor:
    x = torch.arange(WIN, dtype=torch.float32, device=device) - WIN // 2
    k = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return k / k.sum()


_BANDS: dict[tuple[int, str], torch.Tensor] = {}


def _band(size: int, device) -> torch.Tensor:
    """[size-WIN+1, size] matrix whose rows are the Gaussian window at each valid position."""
    key = (size, str(device))
    if key not in _BANDS:
        k = _kernel(device)
        band = torch.zeros(size - WIN + 1, size, device=device)
        for i in range(size - WIN + 1):
            band[i, i:i + WIN] = k
        _BANDS[key] = band
    return _BANDS[key]


def _filter(x: torch.Tensor) -> torch.Tensor:
    """Valid separable Gaussian filter of [B,H,W] as two batched matrix products (faster than conv2d on CPU)."""
    return _band(x.shape[-2], x.device) @ x @ _band(x.shape[-1], x.device).T


def _as_float(a) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a)
    return torch.as_tensor(a).to(torch.float32)


def ssim_and_cs(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term of each pair x[i], y[i] ([B,H,W] float)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    b = x.shape[0]
    mx, my, xx, yy, xy = _filter(torch.cat([x, y, x * x, y * y, x * y])).split(b)
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    ssim = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(x, y, data_range: float = 255.0, batch: int = 512) -> torch.Tensor:
    """SSIM of each pair (x[i], y[i]); inputs [B,H,W] (uint8 or float) or a single [H,W] pair."""
    x, y = _as_float(x), _as_float(y)
    single = x.dim() == 2
    if single:
        x, y = x[None], y[None]
    if min(x.shape[-2:]) < WIN:
        raise ValueError(f"SSIM needs images of at least {WIN}x{WIN} px, got {tuple(x.shape[-2:])}")
    out = torch.cat([ssim_and_cs(x[i:i + batch], y[i:i + batch], data_range)[0] for i in range(0, len(x), batch)])
    return out[0] if single else out


def ms_ssim_scales(size: int) -> int:
    return max(1, min(len(MS_SSIM_WEIGHTS), 1 + int(math.floor(math.log2(size / WIN)))))


def ms_ssim(x, y, data_range: float = 255.0, scales: int | None = None, batch: int = 256) -> torch.Tensor:
    """MS-SSIM of each pair; ``scales`` defaults to :func:`ms_ssim_scales` of the image size."""
    x, y = _as_float(x), _as_float(y)
    if x.dim() == 2:
        return ms_ssim(x[None], y[None], data_range, scales, batch)[0]
    scales = scales or ms_ssim_scales(min(x.shape[-2:]))
    w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32)
    w = w / w.sum()
    outs = []
    for i in range(0, len(x), batch):
        a, b = x[i:i + batch], y[i:i + batch]
        terms = []
        for s in range(scales):
            sim, cs = ssim_and_cs(a, b, data_range)
            terms.append((sim if s == scales - 1 else cs).clamp_min(0))
            if s < scales - 1:
                a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        outs.append(torch.prod(torch.stack(terms, 1) ** w, dim=1))
    return torch.cat(outs)


# ============================================================================ nearest neighbours
def downsampled(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """[N,S,S] uint8 -> area-downsampled [N, s*s] float rows, z-normalised (for correlation pre-filters)."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    if t.shape[-1] > size:
        t = F.interpolate(t, size=(size, size), mode="area")
    t = t.flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def candidates(query: np.ndarray, ref: np.ndarray, k: int, size: int = 32, chunk: int = 4096) -> torch.Tensor:
    """Indices [Q, k] of the ``k`` reference images most correlated with each query at ``size`` px."""
    q, r = downsampled(query, size), downsampled(ref, size)
    k = min(k, len(ref))
    return torch.cat([(q[i:i + chunk] @ r.T).topk(k, dim=1).indices for i in range(0, len(q), chunk)])


def nearest_ssim(query: np.ndarray, ref: np.ndarray, top_k: int = 16, batch: int = 1024
                 ) -> tuple[np.ndarray, np.ndarray]:
    """For each query image its highest SSIM against ``ref`` and that image's index.

    Exhaustive when ``len(ref) <= top_k``; otherwise SSIM is computed for the ``top_k`` reference images with the
    highest downsampled (32 px) correlation, a cheap pre-filter.
    """
    cand = candidates(query, ref, top_k)
    k = cand.shape[1]
    qi = torch.arange(len(query)).repeat_interleave(k)
    ri = cand.flatten()
    q, r = torch.from_numpy(np.ascontiguousarray(query)), torch.from_numpy(np.ascontiguousarray(ref))
    vals = torch.cat([ssim(q[qi[i:i + batch]], r[ri[i:i + batch]]) for i in range(0, len(qi), batch)])
    vals = vals.view(len(query), k)
    best, pos = vals.max(1)
    return best.numpy().astype(np.float64), cand[torch.arange(len(query)), pos].numpy()


def random_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n  # j != i
    return i, j


def pair_ms_ssim(images: np.ndarray, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """MS-SSIM of ``n_pairs`` random pairs of distinct images of one set (diversity: lower = more diverse)."""
    if len(images) < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 images")
    i, j = random_pairs(len(images), n_pairs, rng)
    t = torch.from_numpy(np.ascontiguousarray(images))
    return ms_ssim(t[i], t[j]).numpy().astype(np.float64)


def _quantiles(v: np.ndarray) -> dict[str, float]:
    qs = np.percentile(v, [5, 25, 50, 75, 95]) if len(v) else [float("nan")] * 5
    return {"mean": float(np.mean(v)), "p5": float(qs[0]), "p25": float(qs[1]), "median": float(qs[2]),
            "p75": float(qs[3]), "p95": float(qs[4]), "max": float(np.max(v)), "n": int(len(v))}


def evaluate_similarity(syn: np.ndarray, real: np.ndarray, real_is_heldout: np.ndarray, syn_labels: np.ndarray,
                        real_labels: np.ndarray, draws: int = 5, seed: int = 0, top_k: int = 16,
                        n_pairs: int = 500, do_nearest: bool = True, do_diversity: bool = True
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Nearest-real SSIM and MS-SSIM diversity, each beside its real-vs-real floor. Returns (metrics, raw arrays)."""
    rng = np.random.default_rng(seed)
    held = np.asarray(real_is_heldout, bool)
    train, heldout = real[~held], real[held]
    n = min(len(syn), len(heldout))
    out: dict[str, Any] = {"n": int(n)}
    raw: dict[str, Any] = {}
    if n < 2:
        raise MetricUnavailable(f"similarity floors need at least 2 held-out real images, got {len(heldout)}")
    if do_nearest:
        s_best, s_idx = nearest_ssim(syn, train, top_k)
        h_best, h_idx = nearest_ssim(heldout, train, top_k)
        s = summarise([s_best[sub].mean() for sub in subsets(len(syn), n, draws, rng)])
        f = summarise([h_best.mean()] + [h_best[rng.integers(0, len(h_best), len(h_best))].mean()
                                         for _ in range(draws - 1)])
        out["nearest_ssim"] = {
            "synthetic": s, "floor": f, "n": int(n), "verdict": verdict(s, f, kind="level"),
            "synthetic_distribution": _quantiles(s_best), "heldout_distribution": _quantiles(h_best),
            "per_class": {lab: {"synthetic": float(s_best[syn_labels == lab].mean()),
                                "n_synthetic": int((syn_labels == lab).sum()),
                                "heldout": (float(h_best[real_labels[held] == lab].mean())
                                            if (real_labels[held] == lab).any() else None)}
                          for lab in sorted(set(syn_labels))},
            "method": (f"max SSIM over the top {top_k} training images by 32-px correlation (exhaustive when the "
                       "training set is no larger); floor spread: bootstrap of the held-out mean"),
            "above_heldout_max": int((s_best > h_best.max()).sum())}
        raw.update(nearest_syn=s_best, nearest_syn_idx=s_idx, nearest_held=h_best, nearest_held_idx=h_idx)
    if do_diversity:
        s = summarise([pair_ms_ssim(syn[sub], n_pairs, rng).mean() for sub in subsets(len(syn), n, draws, rng)])
        f = summarise([pair_ms_ssim(heldout, n_pairs, rng).mean() for _ in range(draws)])
        out["ms_ssim_diversity"] = {
            "synthetic": s, "floor": f, "n": int(n), "verdict": verdict(s, f, kind="level"),
            "real_train": float(pair_ms_ssim(train, n_pairs, rng).mean()),
            "scales": ms_ssim_scales(syn.shape[-1]), "pairs_per_draw": int(n_pairs),
            "note": "mean MS-SSIM of random pairs within a set; higher than real = less diverse (mode collapse)"}
    return out, raw


# ============================================================================ mask-image alignment
@torch.no_grad()
def predict_masks(model, images: np.ndarray, model_size: int = 0, batch: int = 32, device: str = "cpu"
                  ) -> np.ndarray:
    """Binary masks (mask_logits > 0) predicted for uint8 [N,S,S] images, resized to and from the model's size."""
    model = model.to(device)
    size = images.shape[-1]
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).float().div(255).unsqueeze(1).to(device)
        if model_size and model_size != size:
            x = F.interpolate(x, size=(model_size, model_size), mode="bilinear", align_corners=False)
        logits = model(x)["mask_logits"]
        if logits.shape[-1] != size:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        out.append((logits[:, 0] > 0).cpu().numpy())
    return np.concatenate(out).astype(np.uint8)


def mask_alignment(masks: np.ndarray, predicted: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Dice between each synthetic mask and the segmenter's prediction on its image, overall and per class."""
    d = dice(masks, predicted)
    labels = np.asarray(labels)
    res: dict[str, Any] = {"all": {"mean": float(d.mean()), "n": int(len(d))}, "per_class": {}}
    for lab in sorted(set(labels)):
        sel = labels == lab
        res["per_class"][lab] = {"mean": float(d[sel].mean()), "n": int(sel.sum()),
                                 "empty_mask_fraction": float((masks[sel].reshape(sel.sum(), -1).sum(1) == 0).mean()),
                                 "empty_prediction_fraction":
                                     float((predicted[sel].reshape(sel.sum(), -1).sum(1) == 0).mean())}
    res["note"] = "Dice(generated mask, baseline segmenter's prediction on the generated image); 1 when both empty"
    return res
