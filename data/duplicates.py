"""Near-duplicate images: one acquisition saved more than once (cropped or shifted a little, rescaled, re-encoded,
with other burned-in overlays), found by content rather than by identical pixels.

The score (:func:`similarity_pairs`, :func:`nearest`) is the normalised cross-correlation (NCC) of the image
*centres* under the best alignment:

1. **signature** (:func:`signature`, once per image, from the original pixels): a 5 x 5 median filter for images
   of at least 128 px (burned-in text strokes, caliper crosses and dotted lines, 1-2 px wide, go; tissue stays),
   then an area resize to 64 x 64 (the image is stretched, as the datasets are, so a uniform rescale of a copy
   cancels out).
2. **coarse search, every pair** (chunked matrix products): 24 px versions, the centre 16 x 16 window of one
   image (the outer sixth of each side, where text, body markers and depth scales sit, is left out) against
   windows of the other at 5 zooms from 0.75x to 1.33x and shifts of up to 2 px (8 %) in y and x, each window
   standardised (zero mean, unit norm) so that brightness and contrast do not count. Each image's
   :data:`TOP_K` best partners, and every pair at or above :data:`COARSE_FLOOR`, are candidates.
3. **fine score, candidate pairs**: the centre 40 x 40 window of one 64 px signature against the other, aligned
   by Gauss-Newton maximisation of the NCC over a zoom and a shift per axis (the ECC update of Evangelidis &
   Psarakis, 2008), started from the coarse alignment, first on a smooth band-pass (a wide basin) and then on a
   detailed one, which is scored: a difference of Gaussians (sigma 0.7 and 3 px: the layered anatomy every
   breast scan shares is removed, the texture of this one acquisition stays) divided by its local RMS (so that
   the strong edges of a large dark lesion do not outweigh the texture). The score is the best NCC reached, in
   [-1, 1]; 1 = the same pixels up to brightness and contrast.

**Rule**: two images whose score reaches the threshold (:data:`THRESHOLD`, 0.86) are near-duplicates.
Chosen on the 1875 BUS-BRA images (1064 patients): two different views of one patient's lesion scored at most
0.84, images of different patients at most 0.72, except three pairs of patients whose left and right images are
the same scans saved twice (with and without calipers or text, cropped differently: 0.87-0.96); copies of 60 of
its images re-saved with a crop of up to 12 %, a shift, a 0.7x or 1.4x rescale, JPEG quality 60, added text and
calipers, or added margins scored 0.94-1.00. Distinct phantom cases (780) scored at most 0.67. Two different
views of one lesion are the closest distinct images; in a dataset without patient ids (BUSI) grouping such a pair
would be no mistake. Near-duplicates are unioned (with pixel-identical copies) into sets that share a split;
:func:`data.splits.resolve_duplicates` says what is dropped.

Cost on one CPU thread: a few seconds for BUSI's 780 images, about 10 s for BUS-BRA's 1875 (the coarse search
grows with the square of the number of images and is done :data:`CHUNK` rows at a time).
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD = 0.86
SIG_SIZE = 64                 # signature side; the fine score works on it
FINE_WINDOW = 40              # centre window of the fine score (12 px = the outer 19 % left out on each side)
COARSE_SIZE = 24
COARSE_WINDOW = 16            # centre window of the coarse search (4 px = the outer 17 % left out)
COARSE_SHIFT = 2              # coarse shifts -2..2 px at 24 px in y and x
COARSE_ZOOMS = tuple(float(z) for z in np.exp(np.linspace(np.log(0.75), np.log(4 / 3), 5)))
COARSE_FLOOR = 0.95           # every pair at or above this coarse score is a candidate ...
TOP_K = 4                     # ... and every image's TOP_K best coarse partners
LCN = 4.0                     # the detailed band is divided by its local RMS (Gaussian, sigma 4 px)
BANDS = ((2.0, 6.0), (0.7, 3.0))    # difference-of-Gaussian bands (sigmas in px at 64 px): smooth, detailed
SMOOTH_STEPS, DETAIL_STEPS = 4, 6   # Gauss-Newton steps of the fine alignment on each band
PRUNE_AFTER, PRUNE_BELOW = 2, 0.6   # pairs still below 0.6 after 2 steps on the detailed band stop there
MEDIAN_MIN_SIDE = 128         # the median filter is applied only to images at least this large
MEDIAN_KSIZE = 5
CHUNK = 2048                  # rows of the coarse score matrix computed at a time
RULE = (f"near-duplicates: centre NCC >= {{threshold}} after the best zoom/shift alignment (64 px signatures, "
        f"band-passed, outer ~1/6 of each side left out; see data/duplicates.py)")


def rule(threshold: float = THRESHOLD) -> str:
    return RULE.format(threshold=threshold)


# --------------------------------------------------------------------------------------------------- signature
def signature(gray: np.ndarray) -> np.ndarray:
    """The 64 x 64 uint8 signature of an 8-bit grayscale image of any size (see the module docstring)."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    if min(gray.shape) >= MEDIAN_MIN_SIDE:
        gray = cv2.medianBlur(gray, MEDIAN_KSIZE)
    return cv2.resize(gray, (SIG_SIZE, SIG_SIZE), interpolation=cv2.INTER_AREA)


def signatures(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """:func:`signature` of every image, stacked: N x 64 x 64 uint8."""
    return np.stack([signature(np.asarray(im)) for im in images]) if len(images) else \
        np.zeros((0, SIG_SIZE, SIG_SIZE), np.uint8)


def _coarse(sig: np.ndarray) -> torch.Tensor:
    small = [cv2.GaussianBlur(cv2.resize(s.astype(np.float32), (COARSE_SIZE, COARSE_SIZE),
                                         interpolation=cv2.INTER_AREA), (0, 0), 0.7) for s in sig]
    return torch.from_numpy(np.stack(small))[:, None]


def _fine(sig: np.ndarray) -> torch.Tensor:
    """N x 2 x 64 x 64: a smooth band (difference of Gaussians, sigma 2 and 6 px) to align from afar, and the
    detailed band (sigma 0.7 and 3 px) that is scored."""
    bands = []
    for s in np.asarray(sig, np.float32):
        b = [cv2.GaussianBlur(s, (0, 0), lo) - cv2.GaussianBlur(s, (0, 0), hi) for lo, hi in BANDS]
        if LCN:
            b[1] = b[1] / np.sqrt(cv2.GaussianBlur(b[1] * b[1], (0, 0), LCN) + 1.0)
        bands.append(np.stack(b))
    return torch.from_numpy(np.stack(bands))


# ------------------------------------------------------------------------------------------------- the search
def _standardise(w: torch.Tensor) -> torch.Tensor:
    w = w.flatten(1)
    w = w - w.mean(1, keepdim=True)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _centre(x: torch.Tensor, window: int) -> torch.Tensor:
    c = (x.shape[-1] - window) // 2
    return _standardise(x[..., c:c + window, c:c + window])


def _grid(size: int, window: int, sy: torch.Tensor, sx: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor
          ) -> torch.Tensor:
    """grid_sample grids (P, window, window, 2) of windows centred at the image centre + (ty, tx) px, sample
    spacing (sy, sx) px (1 / zoom), one per row."""
    lin = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    gy = (2 * ((size - 1) / 2 + ty[:, None] + sy[:, None] * lin) + 1) / size - 1
    gx = (2 * ((size - 1) / 2 + tx[:, None] + sx[:, None] * lin) + 1) / size - 1
    grid = torch.empty(len(sy), window, window, 2)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    return grid


def _transforms() -> list[tuple[float, int, int]]:
    r = range(-COARSE_SHIFT, COARSE_SHIFT + 1)
    return [(z, dy, dx) for z in COARSE_ZOOMS for dy in r for dx in r]


def _windows(x: torch.Tensor, z: float, dy: int, dx: int) -> torch.Tensor:
    """The standardised coarse window of every image of ``x`` (N x 1 x S x S) at one transform: N x D. The images
    are sampled as the channels of one batch item, so one small grid serves them all."""
    one = torch.ones(1)
    g = _grid(COARSE_SIZE, COARSE_WINDOW, one / z, one / z, one * dy, one * dx)
    return _standardise(F.grid_sample(x.transpose(0, 1), g, mode="bilinear", padding_mode="border",
                                      align_corners=False)[0])


def _coarse_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Best coarse score of every (a centre, b window) pair over all coarse transforms: len(a) x len(b)."""
    out = torch.full((len(a), len(b)), -1.0)
    if not len(a) or not len(b):
        return out
    q = _centre(a[:, 0], COARSE_WINDOW)
    for z, dy, dx in _transforms():
        w = _windows(b, z, dy, dx).T.contiguous()
        for i in range(0, len(a), CHUNK):
            torch.maximum(out[i:i + CHUNK], q[i:i + CHUNK] @ w, out=out[i:i + CHUNK])
    return out


def _coarse_best(ca: torch.Tensor, cb: torch.Tensor, same: bool, ia: torch.Tensor, ib: torch.Tensor,
                 fwd: torch.Tensor) -> torch.Tensor:
    """The best coarse transform (z, dy, dx) of each candidate pair, in the direction ``fwd`` says (True: the
    centre of a[ia] against windows of b[ib]; False: the centre of b[ib] against windows of a[ia])."""
    trans = _transforms()
    qa, qb = _centre(ca[:, 0], COARSE_WINDOW), _centre(cb[:, 0], COARSE_WINDOW)
    t_rows = torch.where(fwd[:, None], qa[ia], qb[ib])
    best, arg = torch.full((len(ia),), -2.0), torch.zeros(len(ia), dtype=torch.long)
    for t, (z, dy, dx) in enumerate(trans):
        wb = _windows(cb, z, dy, dx)
        wa = wb if same else _windows(ca, z, dy, dx)
        cur = (t_rows * torch.where(fwd[:, None], wb[ib], wa[ia])).sum(1)
        arg = torch.where(cur > best, t, arg)
        best = torch.maximum(best, cur)
    return torch.tensor(trans, dtype=torch.float32)[arg]


def _fine_scores(fa: torch.Tensor, fb: torch.Tensor, it: torch.Tensor, js: torch.Tensor, init: torch.Tensor,
                 chunk: int = 512) -> torch.Tensor:
    """Fine score of the centres of ``fa[it]`` against ``fb[js]`` (each N x 2 x 64 x 64: the smooth and the
    detailed band), aligned from the coarse transforms ``init``: a few steps on the smooth band (a wide basin),
    then on the detailed band, which gives the score."""
    scale = SIG_SIZE / COARSE_SIZE
    theta = torch.stack([1 / init[:, 0], 1 / init[:, 0], init[:, 1] * scale, init[:, 2] * scale], 1)
    out = torch.empty(len(it))
    for i in range(0, len(it), chunk):     # chunks keep the Jacobians (chunk x 4 x 1600) small
        sl = slice(i, i + chunk)
        a, b = fa[it[sl]], fb[js[sl]]
        _, th = _gauss_newton(_centre(a[:, 0], FINE_WINDOW), b[:, :1], theta[sl], SMOOTH_STEPS)
        out[sl], _ = _gauss_newton(_centre(a[:, 1], FINE_WINDOW), b[:, 1:], th, DETAIL_STEPS, PRUNE_AFTER)
    return out


def _gauss_newton(q: torch.Tensor, img: torch.Tensor, theta: torch.Tensor, steps: int, prune_after: int = -1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise NCC(q, window of img at theta) over theta = (sy, sx, ty, tx) per row: ``steps`` updates; returns
    the best NCC seen and the theta where it was seen.

    ECC update: with the standardised template q, the centred warped window w, its centred Jacobian G and
    P = G (G'G)^-1 G', the maximising step is (G'G)^-1 G' (lambda q - w), lambda = (|w|^2 - w'Pw) / (q'w - q'Pw),
    damped to at most 2 px of shift and 5 % of zoom. Rows still below :data:`PRUNE_BELOW` after ``prune_after``
    updates stop there (no copy is that far off by then)."""
    gx, gy = torch.zeros_like(img), torch.zeros_like(img)
    gx[..., 1:-1] = (img[..., 2:] - img[..., :-2]) / 2
    gy[..., 1:-1, :] = (img[..., 2:, :] - img[..., :-2, :]) / 2
    stack = torch.cat([img, gy, gx], 1)
    lin = torch.arange(FINE_WINDOW, dtype=torch.float32) - (FINE_WINDOW - 1) / 2
    ly, lx = lin.repeat_interleave(FINE_WINDOW), lin.repeat(FINE_WINDOW)
    limit, max_step = SIG_SIZE / 4, torch.tensor([0.05, 0.05, 2.0, 2.0])
    best, best_theta = torch.full((len(q),), -1.0), theta.clone()
    rows = torch.arange(len(q))
    for step in range(steps + 1):
        if step == prune_after:
            keep = best[rows] >= PRUNE_BELOW
            rows, q, stack, theta = rows[keep], q[keep], stack[keep], theta[keep]
            if not len(rows):
                break
        grid = _grid(SIG_SIZE, FINE_WINDOW, theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3])
        w, wy, wx = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border",
                                  align_corners=False).flatten(2).unbind(1)
        w = w - w.mean(1, keepdim=True)
        rho = (q * w).sum(1) / w.norm(dim=1).clamp_min(1e-6)
        better = rho > best[rows]
        best[rows[better]], best_theta[rows[better]] = rho[better], theta[better]
        if step == steps:
            break
        g = torch.stack([wy * ly, wx * lx, wy, wx], 1)          # d w / d (sy, sx, ty, tx): P x 4 x D
        g = g - g.mean(2, keepdim=True)
        h = g @ g.transpose(1, 2) + 1e-4 * torch.eye(4)
        gw, gq = g @ w[..., None], g @ q[..., None]
        hinv = torch.linalg.inv(h)
        hw, hq = hinv @ gw, hinv @ gq
        num = (w * w).sum(1) - (gw * hw).sum((1, 2))
        den = (q * w).sum(1) - (gq * hw).sum((1, 2))
        ok = den > 1e-6
        lam = torch.where(ok, num / den.clamp_min(1e-6), torch.zeros_like(num))
        delta = torch.where(ok[:, None], (lam[:, None, None] * hq - hw)[..., 0], torch.zeros(len(q), 4))
        theta = theta + torch.maximum(torch.minimum(delta, max_step), -max_step)
        theta[:, :2] = theta[:, :2].clamp(0.6, 1.6)
        theta[:, 2:] = theta[:, 2:].clamp(-limit, limit)
    return best, best_theta


def _scores(sig_a: np.ndarray, sig_b: np.ndarray | None, top_k: int, floor: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine scores of the candidate pairs (i in a, j in b; i < j when ``sig_b`` is None, the pairs within a)."""
    same = sig_b is None
    ca = _coarse(sig_a) if len(sig_a) else torch.zeros(0, 1, COARSE_SIZE, COARSE_SIZE)
    cb = ca if same else (_coarse(sig_b) if len(sig_b) else torch.zeros(0, 1, COARSE_SIZE, COARSE_SIZE))
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if not len(ca) or not len(cb) or (same and len(ca) < 2):
        return empty
    ab = _coarse_matrix(ca, cb)
    ba = ab.T if same else _coarse_matrix(cb, ca).T
    sym = torch.maximum(ab, ba)
    forward = ab >= ba                                         # which image's centre is the template
    if same:
        sym.fill_diagonal_(-2.0)
    cand = sym >= floor
    k = min(top_k, sym.shape[1] - same)
    if k > 0:
        cand[torch.arange(len(sym))[:, None], sym.topk(k, dim=1).indices] = True
    k = min(top_k, sym.shape[0] - same)
    if k > 0:
        cand[sym.topk(k, dim=0).indices, torch.arange(sym.shape[1])[None, :]] = True
    if same:
        cand = torch.triu(cand | cand.T, diagonal=1)
    ia, ib = torch.nonzero(cand, as_tuple=True)
    fwd = forward[ia, ib]
    init = _coarse_best(ca, cb, same, ia, ib, fwd)
    fa = _fine(sig_a)
    fb = fa if same else _fine(sig_b)
    score = torch.empty(len(ia))
    score[fwd] = _fine_scores(fa, fb, ia[fwd], ib[fwd], init[fwd])
    score[~fwd] = _fine_scores(fb, fa, ib[~fwd], ia[~fwd], init[~fwd])
    return ia.numpy(), ib.numpy(), score.numpy()


@contextlib.contextmanager
def _one_thread():
    """No autograd, one intra-op thread (restored after): the search is thousands of small tensor operations,
    where OpenMP threads cost more than they give, and far more when other processes share the cores (a 780-image
    search took 2.7 s on one thread and 19 s on two on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def similarity_pairs(sigs: np.ndarray, threshold: float = THRESHOLD, top_k: int = TOP_K,
                     floor: float = COARSE_FLOOR) -> list[tuple[int, int, float]]:
    """Every pair (i, j, score), i < j, of ``sigs`` (N x 64 x 64 from :func:`signatures`) whose score reaches
    ``threshold``, highest first."""
    with _one_thread():
        ia, ib, score = _scores(np.asarray(sigs), None, top_k, floor)
    keep = np.flatnonzero(score >= threshold)
    keep = keep[np.argsort(-score[keep], kind="stable")]
    return [(int(ia[k]), int(ib[k]), float(score[k])) for k in keep]


def nearest(query: np.ndarray, ref: np.ndarray, top_k: int = TOP_K, floor: float = COARSE_FLOOR
            ) -> tuple[np.ndarray, np.ndarray]:
    """For each query signature its best score against ``ref`` and that reference's index (-1 / -1.0 when
    ``ref`` is empty)."""
    best, idx = np.full(len(query), -1.0), np.full(len(query), -1, np.int64)
    with _one_thread():
        ia, ib, score = _scores(np.asarray(query), np.asarray(ref), top_k, floor)
    for i, j, s in zip(ia, ib, score):
        if s > best[i]:
            best[i], idx[i] = s, j
    return best, idx


# ------------------------------------------------------------------------------------------------ leak check
def leak_check(train_sigs: np.ndarray, heldout_sigs: np.ndarray, heldout_ids: Sequence[str],
               train_ids: Sequence[str], threshold: float = THRESHOLD, tolerance: float = 0.02,
               n_listed: int = 10) -> dict[str, Any]:
    """How many held-out (val + test) images have a training image at or above ``threshold``: a near-duplicate
    that crosses the split. ``ok`` is False when more than ``tolerance`` of the held-out images do."""
    score, idx = nearest(heldout_sigs, train_sigs)
    above = np.flatnonzero(score >= threshold)
    above = above[np.argsort(-score[above], kind="stable")]
    n = len(heldout_sigs)
    out = {"threshold": float(threshold), "n_heldout": int(n), "n_train": int(len(train_sigs)),
           "n_above": int(len(above)), "share": float(len(above) / n) if n else 0.0, "tolerance": float(tolerance),
           "ok": bool(len(above) <= tolerance * n),
           "max_score": float(score.max()) if n and len(train_sigs) else None,
           "pairs": [{"heldout": heldout_ids[i], "train": train_ids[idx[i]], "score": round(float(score[i]), 4)}
                     for i in above[:n_listed]],
           "rule": rule(threshold)}
    return out


def leak_line(leak: dict[str, Any]) -> str:
    """One summary line of :func:`leak_check`; loud (starts with WARNING) when the check fails."""
    text = (f"{leak['n_above']} of {leak['n_heldout']} held-out (val+test) images have a training image with "
            f"near-duplicate score >= {leak['threshold']:.2f}")
    if leak["ok"]:
        return f"leak check: {text}" + (" (within the tolerance of "
                                        f"{leak['tolerance']:.0%})" if leak["n_above"] else "")
    pairs = ", ".join(f"{p['heldout']} ~ {p['train']} ({p['score']:.3f})" for p in leak["pairs"][:3])
    return (f"WARNING leak check: {text} ({leak['share']:.1%}, over the {leak['tolerance']:.0%} tolerance): the "
            f"splits leak near-duplicate images, e.g. {pairs}")


def split_leak_check(images: np.ndarray, heldout: np.ndarray, ids: Sequence[str], threshold: float = THRESHOLD
                     ) -> dict[str, Any]:
    """:func:`leak_check` of a pair dataset's loaded images (N x S x S uint8; ``heldout`` True for val + test)."""
    heldout = np.asarray(heldout, bool)
    sig = signatures(images)
    held, train = np.flatnonzero(heldout), np.flatnonzero(~heldout)
    return leak_check(sig[train], sig[held], [ids[i] for i in held], [ids[i] for i in train], threshold)
