"""The trained joint model as a diffusers pipeline folder: save it, load it, draw image + mask pairs from it.

Layout of an exported folder (export_model.py writes it; :func:`save_export`):

    model_index.json            the pipeline: JointImageMaskPipeline with its two components
    denoiser/config.json        JointDenoiser's constructor arguments: the network (arch, arch_kwargs), its classes,
                                image size and the DiffusionConfig of its noise process
    denoiser/diffusion_pytorch_model.safetensors   the EMA weights (fp32)
    scheduler/scheduler_config.json                 the diffusers scheduler of the exported sampler
    pipeline_busdiff.py         a two-line shim for DiffusionPipeline's custom-pipeline loading (below)
    busdiff.json                provenance (source checkpoint, its sha256, training step, training config); written
                                last: a folder without it is not a finished export
    README.md                   the model card

**Loading locally** (no network, no remote code): the component classes live in this module, so the busdiff code must
be importable (run Python from a busdiff checkout, or put it on ``PYTHONPATH``)::

    from models.hub import JointImageMaskPipeline
    pipe = JointImageMaskPipeline.from_pretrained("exports/busbra64")   # diffusers' DiffusionPipeline.from_pretrained
    out = pipe(class_labels="malignant", num_per_class=4, generator=torch.Generator().manual_seed(0))
    out.images, out.masks       # uint8 [4, H, W], bool [4, H, W]

model_index.json names the denoiser's module ``models.hub`` (what ``save_pretrained`` records for a class outside
diffusers), which diffusers imports with importlib. ``DiffusionPipeline.from_pretrained(folder)`` alone cannot load
it: without ``custom_pipeline`` diffusers looks the pipeline class up among its own classes. Its custom-pipeline route
works with the shim written into the folder:
``DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_busdiff", trust_remote_code=True)``: diffusers
copies ``pipeline_busdiff.py`` into its modules cache (``HF_MODULES_CACHE``) and imports it, and the shim imports
this class.

**From the Hub** (``export_model.py --push_to_hub``): diffusers' Hub download (0.42) accepts a component class from
outside diffusers only as remote code shipped in the repository (``<component>/<module>.py``, run with
``trust_remote_code=True``); these exports ship no model code (the network is the busdiff code), so download the
files and load the local copy::

    from huggingface_hub import snapshot_download
    pipe = JointImageMaskPipeline.from_pretrained(snapshot_download("you/busdiff-busbra64"))

A user needs: a busdiff checkout on ``PYTHONPATH`` (the network and the noise process are its code), its
requirements, and acceptance of the dataset terms stated on the model card.

Samples equal :meth:`models.diffusion.JointDiffusion.sample`'s for the same generators, batch and steps (the
pipeline calls it, with its scheduler). A sample depends on its own generator only, except that on the CPU the
arithmetic of some kernels depends on the batch shape (generate_synthetic.py pins the batch shape for byte
identity; the pipeline runs ``batch_size`` samples per call as given).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, is_accelerate_available

from common.errors import UserError
from models.denoisers import build_denoiser
from models.diffusion import DEFAULT_STEPS, DiffusionConfig, JointDiffusion, model_space_to_images

EXPORT_FORMAT = "busdiff-diffusers-export-v1"
INFO_FILE = "busdiff.json"
SHIM_FILE = "pipeline_busdiff.py"
DEFAULT_GUIDANCE = 1.5          # generate_synthetic.py's default (sampling.generation.DEFAULT_GUIDANCE; tested equal)
SHIM = '''"""For DiffusionPipeline.from_pretrained(this_folder, custom_pipeline="pipeline_busdiff", trust_remote_code=True):
the pipeline class is busdiff's own (models/hub.py), so the busdiff code must be importable (PYTHONPATH).
Written by busdiff's export_model.py; it defines nothing itself."""
from models.hub import JointImageMaskPipeline  # noqa: F401
'''


class JointDenoiser(ModelMixin, ConfigMixin):
    """The project's denoiser (``MedSegDiffV2`` or ``UNet2DPeer``, built by name) as a diffusers model.

    The config holds everything needed to rebuild it and its noise process: ``arch`` and ``arch_kwargs`` (the
    network's class and constructor arguments, as in a .pth checkpoint), ``class_names`` (index i = class i; index
    ``len(class_names)`` is the null class of classifier-free guidance), ``img_size`` and ``diffusion_config``
    (:class:`DiffusionConfig` as a dict). ``forward`` is the wrapped network's: ``(x, timesteps, class_labels,
    return_anchor=False)``. ``from_pretrained`` is strict: a weights file whose keys do not match the network is
    refused (diffusers itself would only warn and leave layers randomly initialised).
    """

    @register_to_config
    def __init__(self, arch: str = "MedSegDiffV2", arch_kwargs: dict | None = None,
                 class_names: Sequence[str] = ("benign", "malignant"), img_size: int = 64,
                 diffusion_config: dict | None = None):
        super().__init__()
        kwargs = dict(arch_kwargs or {})
        n = int(kwargs.get("num_classes", len(class_names)))
        if n != len(class_names):
            raise ValueError(f"arch_kwargs num_classes={n} but {len(class_names)} class_names {list(class_names)}")
        if int(kwargs.get("img_size", img_size)) != int(img_size):
            raise ValueError(f"arch_kwargs img_size={kwargs['img_size']} but img_size={img_size}")
        DiffusionConfig.from_dict(dict(diffusion_config or {}))   # refuses unknown keys and bad values now
        self.net = build_denoiser(arch, kwargs)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_anchor: bool = False):
        return self.net(x, timesteps, class_labels, return_anchor=return_anchor)

    def make_diffusion(self) -> JointDiffusion:
        return JointDiffusion(DiffusionConfig.from_dict(dict(self.config.diffusion_config or {})))

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> "JointDenoiser":
        """From a loaded .pth diffusion checkpoint (``common.checkpoint.load_checkpoint``): its EMA weights."""
        model = cls(arch=ckpt["model_class"], arch_kwargs=dict(ckpt["model_kwargs"]),
                    class_names=list(ckpt["class_names"]), img_size=int(ckpt["img_size"]),
                    diffusion_config=dict(ckpt["diffusion"]))
        model.net.load_state_dict(ckpt["ema"])
        return model.eval()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        if not is_accelerate_available():   # what diffusers falls back to anyway, without its warning
            kwargs["low_cpu_mem_usage"] = False
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            detail = "; ".join(f"{k}: {', '.join(map(str, v))[:160]}" for k, v in bad.items())
            raise ValueError(f"the weights do not match the network its config describes ({detail})")
        return (model, info) if want_info else model


@dataclass
class JointImageMaskPipelineOutput(BaseOutput):
    """``images``: uint8 [N, H, W] (``output_type="np"``) or N grayscale PIL images; ``masks``: bool [N, H, W] or N
    PIL images with 0 / 255; ``class_labels``: the class name of each sample."""

    images: np.ndarray | list
    masks: np.ndarray | list
    class_labels: list[str]


class JointImageMaskPipeline(DiffusionPipeline):
    """Class-conditioned joint generation of a breast-ultrasound image and its tumour mask.

    Components: ``denoiser`` (:class:`JointDenoiser`) and ``scheduler`` (a diffusers scheduler the model's noise
    process can sample with: DDPM, DDIM or DPM-Solver++ for a ddpm-parameterised model, EDMEuler or EDMDPMSolver++
    for an edm one). Swap samplers the diffusers way, e.g. ``pipe.scheduler = pipe.diffusion.make_scheduler("ddim",
    50)`` (the project's settings for that sampler) or ``DDIMScheduler.from_config(pipe.scheduler.config)``.
    Loaded with ``dtype=torch.bfloat16`` (or float16) the denoiser runs under autocast in that precision; the
    noise process stays in fp32. See the module docstring for loading.
    """

    model_cpu_offload_seq = "denoiser"

    def __init__(self, denoiser: JointDenoiser, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if not is_accelerate_available():   # what diffusers falls back to anyway, without its warning
            kwargs["low_cpu_mem_usage"] = False
        return super().from_pretrained(*args, **kwargs)

    @property
    def class_names(self) -> list[str]:
        return list(self.denoiser.config.class_names)

    @property
    def diffusion(self) -> JointDiffusion:
        """The noise process of the denoiser (parameterisation, mask encoding, self-conditioning)."""
        return self.denoiser.make_diffusion()

    @torch.no_grad()
    def __call__(self, class_labels: str | int | Sequence[str | int] | None = None, num_per_class: int = 1,
                 guidance_scale: float = DEFAULT_GUIDANCE, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, batch_size: int | None = None,
                 output_type: str = "np", return_dict: bool = True):
        """Draw ``num_per_class`` pairs for each entry of ``class_labels``.

        Args:
            class_labels: class names (``"malignant"``) or indices into ``pipe.class_names``, one or a list; None =
                every class. Samples come in that order, ``num_per_class`` consecutive ones per entry.
            num_per_class: pairs per entry of ``class_labels``.
            guidance_scale: classifier-free guidance against the null class; 1 = none (default: generate_synthetic's).
            num_inference_steps: denoising steps; None = the sampler's default (DDPM 1000, DDIM 50, DPM-Solver++ 20).
            generator: one ``torch.Generator`` per sample (a list: sample i draws only from generator i, as in
                generate_synthetic.py), or one generator from which a seed per sample is drawn, or None (those
                seeds come from torch's global generator).
            batch_size: samples per denoising batch (memory); None = all at once.
            output_type: ``"np"`` (uint8 images, bool masks, [N, H, W]) or ``"pil"`` (lists of PIL images).
            return_dict: False returns ``(images, masks)``.

        Masks are the thresholded mask channel as drawn: no small-component removal and no rejection of empty
        tumour masks (generate_synthetic.py does both).
        """
        if output_type not in ("np", "pil"):
            raise ValueError(f"output_type must be 'np' or 'pil', got {output_type!r}")
        if isinstance(num_per_class, bool) or not isinstance(num_per_class, int) or num_per_class < 1:
            raise ValueError(f"num_per_class must be a positive integer, got {num_per_class!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        labels = [c for c in self._class_indices(class_labels) for _ in range(num_per_class)]
        gens = _per_sample_generators(generator, len(labels))
        diffusion, device = self.diffusion, self._execution_device
        steps = num_inference_steps or DEFAULT_STEPS[diffusion.sampler_of(self.scheduler)]
        dtype = self.denoiser.dtype
        autocast = None if dtype == torch.float32 else (lambda: torch.autocast(device.type, dtype=dtype))
        chunk = batch_size or len(labels)
        images, masks = [], []
        with self.progress_bar(total=steps * -(-len(labels) // chunk)) as bar:
            for s in range(0, len(labels), chunk):
                y = torch.tensor(labels[s:s + chunk], dtype=torch.long, device=device)
                x = diffusion.sample(self.denoiser, y, gens[s:s + chunk], int(self.denoiser.config.img_size),
                                     steps=steps, guidance_scale=float(guidance_scale),
                                     null_class=len(self.class_names), autocast=autocast,
                                     progress=lambda i, n: bar.update(), scheduler=self.scheduler)
                img, msk = model_space_to_images(x)
                images.append(img[:, 0].cpu().numpy())
                masks.append(msk[:, 0].cpu().numpy())
        images, masks = np.concatenate(images), np.concatenate(masks)
        if output_type == "pil":
            from PIL import Image
            images = [Image.fromarray(a) for a in images]
            masks = [Image.fromarray(m.astype(np.uint8) * 255) for m in masks]
        names = [self.class_names[c] for c in labels]
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, masks
        return JointImageMaskPipelineOutput(images=images, masks=masks, class_labels=names)

    def _class_indices(self, class_labels) -> list[int]:
        names = self.class_names
        if class_labels is None:
            return list(range(len(names)))
        if torch.is_tensor(class_labels):
            class_labels = class_labels.tolist()
        items = [class_labels] if isinstance(class_labels, (str, int, np.integer)) else list(class_labels)
        if not items:
            raise ValueError("class_labels is empty")
        out = []
        for c in items:
            if isinstance(c, str):
                if c not in names:
                    raise ValueError(f"unknown class {c!r}: this model draws {', '.join(names)}")
                out.append(names.index(c))
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) < len(names):
                out.append(int(c))
            else:
                raise ValueError(f"class label {c!r} is neither a class name nor an index 0..{len(names) - 1} "
                                 f"({', '.join(names)})")
        return out


def _per_sample_generators(generator, n: int) -> list[torch.Generator]:
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} samples: pass one per sample "
                             "(len(class_labels) x num_per_class), or a single generator")
        return list(generator)
    if generator is None:
        seeds = torch.randint(0, 2 ** 62, (n,))
    else:
        seeds = torch.randint(0, 2 ** 62, (n,), generator=generator, device=generator.device)
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


# ---------------------------------------------------------------------------- export and load
def pipeline_from_checkpoint(ckpt: dict[str, Any], sampler: str = "dpmsolver++") -> JointImageMaskPipeline:
    """A pipeline holding a loaded .pth checkpoint's EMA model and the scheduler of ``sampler`` (the project's
    settings for it, ``JointDiffusion.make_scheduler``)."""
    denoiser = JointDenoiser.from_checkpoint(ckpt)
    scheduler = denoiser.make_diffusion().make_scheduler(sampler, DEFAULT_STEPS[sampler])
    return JointImageMaskPipeline(denoiser=denoiser, scheduler=type(scheduler).from_config(scheduler.config))


def save_export(pipe: JointImageMaskPipeline, out_dir: str | Path, info: dict[str, Any], card: str | None = None,
                extra_files: dict[str, str | Path] | None = None, overwrite: bool = False) -> Path:
    """Write ``pipe`` as an exported folder, staged: everything goes to a hidden sibling folder that is renamed into
    place at the end, so an interrupted export leaves no folder that looks complete. ``info`` goes into
    busdiff.json (with the format marker), ``card`` into README.md, ``extra_files`` (name -> source) are copied.
    An existing non-empty ``out_dir`` is replaced only with ``overwrite`` and only if it is itself an export."""
    out = Path(os.path.abspath(check_export_target(out_dir, overwrite)))   # a name even for "."
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)   # mkdtemp's 0700 would otherwise stay on the finished folder
        pipe.save_pretrained(stage, safe_serialization=True)
        (stage / SHIM_FILE).write_text(SHIM)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, stage / name)
        if card is not None:
            (stage / "README.md").write_text(card)
        record = {"format": EXPORT_FORMAT, "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        (stage / INFO_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def check_export_target(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output folder that holds anything but (with ``overwrite``) an earlier export."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: folder exists and is not empty; choose another --output_dir or pass --overwrite")
        if not is_export(out):
            raise UserError(f"{out}: not an exported model folder (no {INFO_FILE}); it is not replaced")
    return out


def is_export(path: str | Path) -> bool:
    return (Path(path) / INFO_FILE).is_file()


def export_fingerprint(path: str | Path) -> str:
    """sha256 over the files that decide a folder's samples (denoiser/: network, noise process, weights)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in (Path(path) / "denoiser").rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def load_export(path: str | Path, device: torch.device | str = "cpu"
                ) -> tuple[torch.nn.Module, JointDiffusion, dict[str, Any]]:
    """An exported folder -> (the network in eval mode, its JointDiffusion, a checkpoint-like record with
    ``model_class``, ``model_kwargs``, ``diffusion``, ``class_names``, ``img_size``, ``step``, ``config``); the
    same triple as ``models.loading.load_diffusion_checkpoint`` gives for the .pth it was exported from."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: exported model folder not found")
    info_file = path / INFO_FILE
    try:
        info = json.loads(info_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not a model folder written by export_model.py (no {INFO_FILE}; an interrupted "
                        "export leaves none)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{info_file}: unreadable ({type(exc).__name__})") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{info_file}: not a busdiff export record (no '{EXPORT_FORMAT}' marker)")
    try:
        denoiser = JointDenoiser.from_pretrained(path, subfolder="denoiser")
        diffusion = denoiser.make_diffusion()
    except Exception as exc:   # missing or corrupt file, foreign config, weights of another network
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: cannot load the denoiser ({first[:200]})") from None
    cfg = denoiser.config
    ckpt = {"kind": "diffusion", "model_class": cfg.arch, "model_kwargs": dict(cfg.arch_kwargs),
            "diffusion": dict(cfg.diffusion_config), "class_names": list(cfg.class_names),
            "img_size": int(cfg.img_size), "step": int(info.get("step", -1)), "epoch": int(info.get("epoch", -1)),
            "config": dict(info.get("config") or {}), "export": info}
    return denoiser.net.to(device).eval(), diffusion, ckpt
