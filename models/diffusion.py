"""The diffusion process around the joint image+mask denoiser, built on diffusers schedulers.

Two parameterisations (``DiffusionConfig.parameterization``):

* ``ddpm``: a discrete ``DDPMScheduler`` schedule; ``add_noise`` noises the stacked [image, mask] tensor and the
  network predicts the noise (epsilon), the velocity or the clean sample (``prediction_type``), optionally
  Min-SNR-weighted. Sampled with diffusers' DDPM, DDIM or DPM-Solver++.
* ``edm`` (Karras et al. 2022): continuous noise levels sigma drawn log-normally (``p_mean``, ``p_std``), the
  preconditioning ``D(x) = c_skip x + c_out F(c_in x, c_noise)`` and EDM's loss weighting (which is exactly an
  unweighted MSE on ``F``'s effective target). Sampled with diffusers' ``EDMDPMSolverMultistepScheduler``
  (``dpmsolver++``) or ``EDMEulerScheduler`` (``ddim``: the deterministic first-order step of the same ODE).

Options shared by both:

* **Self-conditioning** (Chen et al., "Analog Bits", 2023): the network also sees its previous estimate of the
  clean sample (zeros half of the training batches, a no-grad estimate the other half; the previous step's
  estimate when sampling).
* **Mask encoding**: the mask channel is the binary mask at +-``mask_scale`` ("scaled analog bits"), or a
  signed distance map (``sdf``: distance to the boundary in pixels / ``sdf_width``, clipped to +-1, times
  ``mask_scale``; positive inside). A mask is always recovered by thresholding its channel at 0.

The anchor's auxiliary mask loss (BCE + soft Dice) is added when the model returns anchor logits. Sampling uses
classifier-free guidance (conditional and null-class passes in one batch) and per-sample generators, so a sample is
a function of its own seed, not of the batch it was drawn in. Images live in [-1, 1].
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler,
                       EDMEulerScheduler)
from diffusers.utils.torch_utils import randn_tensor

from common.options import option

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PARAMETERIZATIONS = ("ddpm", "edm")
MASK_ENCODINGS = ("binary", "sdf")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmsolver++": 20}
# the diffusers scheduler classes each parameterisation samples with, and the sampler name each one implements
DDPM_SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmsolver++"}
EDM_SCHEDULERS = {"EDMEulerScheduler": "ddim", "EDMDPMSolverMultistepScheduler": "dpmsolver++"}
# EDM's c_noise = ln(sigma)/4 spans about [-1.6, 1.1]; the sinusoidal timestep embedding of the networks is built
# for DDPM's 0..999, so the network sees EDM_TIME_SCALE * c_noise (about -390..275) instead.
EDM_TIME_SCALE = 250.0


@dataclass
class DiffusionConfig:
    """The noise process and training objective (the ``diffusion`` flags of train_medsegdiff.py)."""

    parameterization: str = option("ddpm", "ddpm: discrete schedule (--beta_*, --prediction_type, --snr_gamma); edm: "
                                   "Karras et al. 2022 preconditioning, log-normal noise levels and loss weighting "
                                   "(--sigma_data, --p_mean, --p_std)", choices=PARAMETERIZATIONS)
    num_train_timesteps: int = option(1000, "diffusion steps of the discrete schedule", low=2, high=100000)
    beta_schedule: str = option("linear", "noise schedule (diffusers name)",
                                choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    beta_start: float = option(1e-4, "first beta of the schedule", low=0, low_open=True, high=1, high_open=True)
    beta_end: float = option(0.02, "last beta of the schedule", low=0, low_open=True, high=1, high_open=True)
    prediction_type: str = option("epsilon", "what the network predicts (ddpm parameterisation)",
                                  choices=PREDICTION_TYPES)
    snr_gamma: float | None = option(0.0, "Min-SNR loss weighting gamma (0 = off; 5 is usual; ddpm only)", low=0)
    sigma_data: float = option(0.5, "EDM: standard deviation of the data", low=0, low_open=True)
    p_mean: float = option(-1.2, "EDM: mean of log(sigma) in training", low=-10, high=10)
    p_std: float = option(1.2, "EDM: standard deviation of log(sigma) in training", low=0, low_open=True, high=10)
    sigma_min: float = option(0.002, "EDM: smallest sampling noise level", low=0, low_open=True)
    sigma_max: float = option(80.0, "EDM: largest sampling noise level", low=0, low_open=True)
    self_condition: bool = option(False, "self-conditioning (Analog Bits): the network also sees its previous "
                                  "clean-sample estimate")
    mask_encoding: str = option("binary", "the mask channel: binary (+-mask_scale) or a signed distance map (+-1 at "
                                "sdf_width px from the boundary, times mask_scale); positive inside the lesion either "
                                "way", choices=MASK_ENCODINGS)
    mask_scale: float = option(1.0, "amplitude of the mask channel (scaled analog bits: < 1 lets noise hide it "
                               "sooner)", low=0, low_open=True, high=1)
    sdf_width: float = option(8.0, "pixels at which the signed distance map saturates", low=0, low_open=True)
    mask_loss_weight: float = option(1.0, "weight of the mask channel's loss", low=0)
    anchor_loss_weight: float = option(1.0, "weight of the anchor's auxiliary mask loss (BCE + Dice)", low=0)
    image_channels: int = 1
    mask_channels: int = 1

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.mask_encoding not in MASK_ENCODINGS:
            raise ValueError(f"mask_encoding must be one of {MASK_ENCODINGS}, got {self.mask_encoding!r}")
        if not 0.0 < float(self.mask_scale) <= 1.0:
            raise ValueError(f"mask_scale must be in (0, 1], got {self.mask_scale}")
        if not float(self.sdf_width) > 0.0:
            raise ValueError(f"sdf_width must be > 0, got {self.sdf_width}")
        if not 0.0 < float(self.sigma_min) < float(self.sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not float(self.sigma_data) > 0.0 or not float(self.p_std) > 0.0:
            raise ValueError("sigma_data and p_std must be > 0")
        if not float(self.beta_start) < float(self.beta_end):
            raise ValueError(f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end})")

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusionConfig":
        """From a checkpoint's record; keys this version does not know are refused by the constructor."""
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def channels(self) -> int:
        return self.image_channels + self.mask_channels


def signed_distance(masks01: np.ndarray, width: float) -> np.ndarray:
    """[B,H,W] {0,1} masks -> signed distance to the boundary / ``width``, clipped to [-1, 1] (positive inside).

    Inside pixels get their distance to the nearest background pixel (>= 1), outside pixels minus their distance to
    the nearest lesion pixel, so the sign is exactly the mask and 0 never occurs. An empty mask is -1 everywhere."""
    from scipy.ndimage import distance_transform_edt
    out = np.empty(masks01.shape, np.float32)
    for i, m in enumerate(np.asarray(masks01) > 0):
        if not m.any():
            out[i] = -1.0
        elif m.all():
            out[i] = 1.0
        else:
            out[i] = (distance_transform_edt(m) - distance_transform_edt(~m)) / width
    return np.clip(out, -1.0, 1.0)


def images_to_model_space(images_u8: torch.Tensor, masks_01: torch.Tensor,
                          config: DiffusionConfig | None = None) -> torch.Tensor:
    """uint8 images [B,1,H,W] and {0,1} masks [B,1,H,W] -> one float tensor [B,2,H,W]: the image in [-1,1] and the
    mask channel as ``config`` encodes it (default: the binary mask at +-1)."""
    img = images_u8.float().div(127.5).sub(1.0)
    return torch.cat([img, encode_masks(masks_01, config)], dim=1)


def encode_masks(masks_01: torch.Tensor, config: DiffusionConfig | None = None) -> torch.Tensor:
    """{0,1} masks [B,C,H,W] -> the mask channels in model space (see the module docstring)."""
    c = config or DiffusionConfig()
    if c.mask_encoding == "sdf":
        m = masks_01.detach().to("cpu", torch.uint8).numpy()
        sdf = signed_distance(m.reshape(-1, *m.shape[-2:]), c.sdf_width).reshape(m.shape)
        return torch.from_numpy(sdf).to(masks_01.device).mul_(c.mask_scale)
    return masks_01.float().mul(2.0).sub(1.0).mul_(c.mask_scale)


def model_space_to_images(x: torch.Tensor, image_channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,C,H,W] in [-1,1] -> (uint8 images [B,ci,H,W], bool masks [B,cm,H,W]); every mask encoding is positive
    inside the lesion."""
    img = ((x[:, :image_channels].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    msk = x[:, image_channels:].float() > 0
    return img, msk


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


class JointDiffusion:
    """Noise process, training objective and samplers for a model ``f(x, t, y) -> output``.

    ``x`` is the noisy [image, mask] stack (with the self-conditioning estimate appended when enabled); ``t`` is the
    integer timestep (ddpm) or ``EDM_TIME_SCALE * c_noise`` (edm)."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()
        c = self.config
        self.edm = c.parameterization == "edm"
        # the discrete schedule also serves the ddpm samplers' configs (unused by edm)
        self.scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                                       beta_start=c.beta_start, beta_end=c.beta_end,
                                       prediction_type=c.prediction_type, clip_sample=False)
        self._alphas = self.scheduler.alphas_cumprod.clone()

    # ------------------------------------------------------------------ data encoding
    def to_model_space(self, images_u8: torch.Tensor, masks_01: torch.Tensor) -> torch.Tensor:
        return images_to_model_space(images_u8, masks_01, self.config)

    def encode_masks(self, masks_01: torch.Tensor) -> torch.Tensor:
        return encode_masks(masks_01, self.config)

    # ------------------------------------------------------------------ noise levels
    def alphas_cumprod(self, device) -> torch.Tensor:
        if self._alphas.device != torch.device(device):
            self._alphas = self._alphas.to(device)
        return self._alphas

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod(timesteps.device)[timesteps]
        return ac / (1.0 - ac)

    def draw_levels(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training noise levels: integer timesteps (ddpm) or sigmas from EDM's log-normal (edm)."""
        c = self.config
        if self.edm:
            z = torch.randn((batch,), device=device, generator=generator)
            return (z * c.p_std + c.p_mean).exp()
        return torch.randint(0, c.num_train_timesteps, (batch,), device=device, generator=generator)

    def level_grid(self, n: int, device) -> torch.Tensor:
        """``n`` fixed noise levels spread evenly over the training distribution (validation, classification)."""
        c = self.config
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        if self.edm:
            z = torch.special.ndtri(q)
            return (z * c.p_std + c.p_mean).exp().float().to(device)
        return (q * c.num_train_timesteps).long().to(device)

    def level_quartile(self, levels: torch.Tensor) -> torch.Tensor:
        """0..3: which quarter of the training noise distribution each level falls in (for the loss log)."""
        c = self.config
        if self.edm:
            z = (levels.float().log() - c.p_mean) / c.p_std
            return torch.bucketize(z, torch.tensor([-0.6745, 0.0, 0.6745], device=levels.device))
        return (levels * 4 // c.num_train_timesteps).clamp(max=3)

    def net_time(self, levels: torch.Tensor) -> torch.Tensor:
        """What the network's timestep input receives for these noise levels."""
        if self.edm:
            return EDM_TIME_SCALE * 0.25 * levels.float().log()
        return levels

    def _edm_coefs(self, sigma: torch.Tensor):
        sd = self.config.sigma_data
        s = _bcast(sigma.float())
        denom = s * s + sd * sd
        return 1.0 / denom.sqrt(), sd * sd / denom, s * sd / denom.sqrt()  # c_in, c_skip, c_out

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor):
        """(network input, network time, target of the network's output, x_t) for clean ``x0`` at ``levels``."""
        if self.edm:
            x_t = x0 + _bcast(levels) * noise
            c_in, c_skip, c_out = self._edm_coefs(levels)
            return c_in * x_t, self.net_time(levels), (x0 - c_skip * x_t) / c_out, x_t
        x_t = self.scheduler.add_noise(x0, noise, levels)
        kind = self.config.prediction_type
        target = noise if kind == "epsilon" else (
            self.scheduler.get_velocity(x0, noise, levels) if kind == "v_prediction" else x0)
        return x_t, levels, target, x_t

    def predict_x0(self, out: torch.Tensor, x_t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate behind a network output ``out`` at noisy ``x_t`` (unscaled) and ``levels``."""
        if self.edm:
            _, c_skip, c_out = self._edm_coefs(levels)
            return c_skip * x_t + c_out * out
        ac = _bcast(self.alphas_cumprod(out.device)[levels.long()].float())
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x_t - (1 - ac).sqrt() * out) / ac.sqrt()
        if kind == "v_prediction":
            return ac.sqrt() * x_t - (1 - ac).sqrt() * out
        return out

    # ------------------------------------------------------------------ training
    def loss(self, model: Callable, x0: torch.Tensor, class_labels: torch.Tensor,
             generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, self_cond: bool | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean training loss and per-sample parts (no host synchronisation).

        ``timesteps`` are noise levels (integer timesteps, or sigmas for edm); drawn when None. ``self_cond`` (with
        self-conditioning on) says whether this batch gets a no-grad estimate as its extra input; drawn from
        ``generator`` with probability 1/2 when None. Returns ``(loss, parts)`` with ``parts['per_sample']`` [B],
        ``parts['quartile']`` [B] (which quarter of the noise distribution), ``parts['image']``, ``parts['mask']``
        and ``parts['anchor']`` (scalars).
        """
        c = self.config
        b = x0.shape[0]
        levels = self.draw_levels(b, x0.device, generator) if timesteps is None else timesteps
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_in, t_in, target, x_t = self.corrupt(x0, noise, levels)
        if c.self_condition:
            if self_cond is None:
                self_cond = bool(torch.rand((), generator=generator, device=generator.device
                                            if generator is not None else "cpu") < 0.5)
            estimate = torch.zeros_like(x0)
            if self_cond:
                with torch.no_grad():
                    first = model(torch.cat([x_in, estimate], 1), t_in, class_labels)
                    first = first[0] if isinstance(first, tuple) else first
                    estimate = self.predict_x0(first.float(), x_t, levels).clamp(-1, 1).to(x0.dtype)
            x_in = torch.cat([x_in, estimate], 1)
        out = model(x_in, t_in, class_labels, return_anchor=True)
        pred, anchor = out if isinstance(out, tuple) else (out, None)
        err = (pred.float() - target.float()).pow(2)
        img_loss = err[:, :c.image_channels].mean(dim=(1, 2, 3))
        mask_loss = err[:, c.image_channels:].mean(dim=(1, 2, 3))
        per_sample = img_loss + c.mask_loss_weight * mask_loss
        weights = self.loss_weights(levels)
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        anchor_loss = torch.zeros((), device=x0.device)
        if anchor is not None and c.anchor_loss_weight > 0:
            anchor_loss = mask_aux_loss(anchor.float(), (x0[:, c.image_channels:] > 0).float())
            loss = loss + c.anchor_loss_weight * anchor_loss
        parts = {"per_sample": per_sample.detach(), "timesteps": levels, "quartile": self.level_quartile(levels),
                 "image": img_loss.detach().mean(), "mask": mask_loss.detach().mean(), "anchor": anchor_loss.detach()}
        return loss, parts

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights (Hang et al. 2023), expressed for the chosen prediction type (ddpm only: EDM's
        weighting is built into its preconditioned target)."""
        gamma = self.config.snr_gamma
        if not gamma or self.edm:
            return None
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=gamma)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return clipped / snr
        if kind == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped

    # ------------------------------------------------------------------ sampling
    def make_scheduler(self, sampler: str, steps: int):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        c = self.config
        if self.edm:
            edm = dict(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data)
            if sampler == "ddpm":
                raise ValueError("the ddpm sampler needs a ddpm-parameterised model; use ddim (Euler) or dpmsolver++")
            sched = (EDMEulerScheduler(**edm) if sampler == "ddim" else
                     EDMDPMSolverMultistepScheduler(**edm, algorithm_type="dpmsolver++", solver_order=2,
                                                    thresholding=True, sample_max_value=1.0, lower_order_final=True))
            sched.set_timesteps(steps)
            return sched
        base = dict(self.scheduler.config)
        if sampler == "ddpm":
            sched = DDPMScheduler.from_config(base, clip_sample=True, clip_sample_range=1.0,
                                              timestep_spacing="trailing")
        elif sampler == "ddim":
            sched = DDIMScheduler.from_config(base, clip_sample=True, clip_sample_range=1.0,
                                              timestep_spacing="trailing", set_alpha_to_one=False)
        else:
            # thresholding with sample_max_value=1 clips the predicted clean sample to [-1, 1] as above
            sched = DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2,
                                                            thresholding=True, sample_max_value=1.0,
                                                            lower_order_final=True)
        sched.set_timesteps(steps)
        return sched

    def sampler_of(self, scheduler) -> str:
        """The sampler name (``SAMPLERS``) that a diffusers scheduler instance implements for this process, so a
        scheduler saved with a pipeline (or swapped in by a user) drives :meth:`sample` as ``make_scheduler`` would.
        Raises ValueError for a scheduler class this process cannot sample with."""
        name = type(scheduler).__name__
        known = EDM_SCHEDULERS if self.edm else DDPM_SCHEDULERS
        if name not in known:
            raise ValueError(f"a {'edm' if self.edm else 'ddpm'}-parameterised model samples with "
                             f"{', '.join(known)}; got {name}")
        return known[name]

    def _sched_levels(self, sched, t, n: int, device) -> torch.Tensor:
        """The noise level of scheduler timestep ``t`` as ``n`` per-sample levels (sigma for edm)."""
        if self.edm:
            return torch.full((n,), math.exp(4.0 * float(t)), device=device)
        return torch.full((n,), int(t), device=device, dtype=torch.long)

    @torch.inference_mode()
    def sample(self, model: Callable, class_labels: torch.Tensor, generators: Sequence[torch.Generator],
               img_size: int, sampler: str = "dpmsolver++", steps: int | None = None,
               guidance_scale: float = 1.0, null_class: int | None = None,
               autocast: Callable | None = None, progress: Callable | None = None,
               known: torch.Tensor | None = None, known_channels: Sequence[int] | None = None,
               resample: int = 1, scheduler=None) -> torch.Tensor:
        """Draw a batch of joint samples [B, C, H, W] in [-1, 1].

        ``generators`` holds one CPU ``torch.Generator`` per sample: the sample's initial noise and every
        stochastic step draw only from its own generator, so a sample does not depend on its batch.
        ``guidance_scale`` > 1 uses classifier-free guidance against ``null_class``.

        ``known`` ([B, len(known_channels), H, W], model space) holds channels that are given rather than drawn
        (replacement conditioning, as in RePaint without resampling): after every step those channels of
        ``x_t`` are replaced by the known values noised to the next noise level (fresh noise from each sample's
        generator), and the result carries the known values exactly. With the mask channel known the model draws
        an image for a given mask; with the image channel known it segments. ``resample`` > 1 (DDIM / DDPM only:
        their steps keep no history) repeats every step that many times, re-noising the result back to the
        step's noise level in between (RePaint's resampling, jump length 1), so the drawn channels can agree with
        the known ones at every noise level.

        ``scheduler`` (a diffusers scheduler instance, e.g. a pipeline's) replaces ``sampler``: a fresh copy of it
        (``from_config``) is set to ``steps`` and stepped; ``sampler`` becomes the name it implements
        (:meth:`sampler_of`). The scheduler that ``make_scheduler(sampler, steps)`` builds gives the same samples.
        """
        if scheduler is not None:
            sampler = self.sampler_of(scheduler)
        steps = steps or DEFAULT_STEPS[sampler]
        device = class_labels.device
        b = class_labels.shape[0]
        if len(generators) != b:
            raise ValueError(f"need one generator per sample ({b}), got {len(generators)}")
        c = self.config
        shape = (b, c.channels, img_size, img_size)
        kc = list(known_channels or [])
        if (known is None) != (not kc):
            raise ValueError("known and known_channels go together")
        if known is not None and tuple(known.shape) != (b, len(kc), img_size, img_size):
            raise ValueError(f"known must be [{b}, {len(kc)}, {img_size}, {img_size}], got {tuple(known.shape)}")
        if resample < 1 or (resample > 1 and (known is None or sampler == "dpmsolver++")):
            raise ValueError("resample > 1 needs known channels and the ddim or ddpm sampler")
        if scheduler is None:
            sched = self.make_scheduler(sampler, steps)
        else:
            sched = type(scheduler).from_config(scheduler.config)
            sched.set_timesteps(steps)
        gens = list(generators)
        x = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32)
        x = x * sched.init_noise_sigma
        use_cfg = guidance_scale != 1.0
        if use_cfg and null_class is None:
            raise ValueError("classifier-free guidance needs null_class")
        labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_class)]) if use_cfg else class_labels
        ctx = autocast if autocast is not None else contextlib.nullcontext
        timesteps = sched.timesteps
        if known is not None:
            known = known.to(device=device, dtype=torch.float32)
            x[:, kc] = self._noised_known(known, timesteps[0], gens, sched)
        estimate = torch.zeros(shape, device=device) if c.self_condition else None
        for i, t in enumerate(timesteps):
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            for r in range(resample if t_next is not None else 1):
                if r:   # RePaint: back from t_next to t with fresh noise, then the step again
                    x = self._renoise(x, t, t_next, gens, sched, shape)
                    if self.edm:
                        sched._step_index -= 1
                levels = self._sched_levels(sched, t, b, device)
                x_in = sched.scale_model_input(x, t)
                if estimate is not None:
                    x_in = torch.cat([x_in, estimate], 1)
                x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
                t_in = self.net_time(self._sched_levels(sched, t, x_in.shape[0], device))
                with ctx():
                    out = model(x_in, t_in, labels_in)
                out = out.float()
                if use_cfg:
                    cond, uncond = out.chunk(2)
                    out = uncond + guidance_scale * (cond - uncond)
                if estimate is not None:
                    estimate = self.predict_x0(out, x, levels).clamp(-1, 1)
                step_kwargs = {"generator": gens} if sampler == "ddpm" else {}
                x = sched.step(out, t, x, **step_kwargs).prev_sample
                if known is not None:
                    x[:, kc] = self._noised_known(known, t_next, gens, sched) if t_next is not None else known
            if progress is not None:
                progress(i + 1, len(timesteps))
        return x.clamp(-1.0, 1.0)

    def _renoise(self, x, t, t_next, gens, sched, shape):
        noise = randn_tensor(shape, generator=gens, device=x.device, dtype=torch.float32)
        if self.edm:
            s_t, s_n = math.exp(4.0 * float(t)), math.exp(4.0 * float(t_next))
            return x + math.sqrt(max(s_t * s_t - s_n * s_n, 0.0)) * noise
        ac = self.alphas_cumprod(x.device)
        keep = (ac[int(t)] / ac[int(t_next)]).float()
        return keep.sqrt() * x + (1 - keep).sqrt() * noise

    def _noised_known(self, known: torch.Tensor, t, gens: Sequence[torch.Generator], sched=None) -> torch.Tensor:
        """``known`` noised to scheduler timestep ``t`` (q(x_t | x_0)), the noise drawn from each sample's own
        generator."""
        noise = randn_tensor(tuple(known.shape), generator=list(gens), device=known.device, dtype=torch.float32)
        if self.edm:
            return known + math.exp(4.0 * float(t)) * noise
        ts = torch.full((known.shape[0],), int(t), device=known.device, dtype=torch.long)
        return self.scheduler.add_noise(known, noise, ts)

    @torch.inference_mode()
    def class_errors(self, model: Callable, x0: torch.Tensor, num_classes: int, n_timesteps: int = 16,
                     seed: int = 0) -> torch.Tensor:
        """Denoising error of ``x0`` [B,C,H,W] under each class label, [B, num_classes] (lower = more likely).

        The "diffusion classifier" (Li et al. 2023): the same fixed noise levels (spread over the training
        distribution) and noise for every class, so the classes are compared on equal terms; the noise of image i
        comes from a generator seeded with ``seed + i``. Each image is one batch of ``n_timesteps x num_classes``
        rows."""
        b = x0.shape[0]
        grid = self.level_grid(n_timesteps, x0.device)
        levels = grid.repeat_interleave(num_classes)                              # [T*K]: t0 t0 t1 t1 ...
        labels = torch.arange(num_classes, device=x0.device).repeat(n_timesteps)  # [T*K]: 0 1 0 1 ...
        errors = torch.zeros(b, num_classes)
        for i in range(b):
            gen = torch.Generator().manual_seed(int(seed) + i)
            noise = torch.randn((n_timesteps, *x0.shape[1:]), generator=gen).to(x0.device)
            noise = noise.repeat_interleave(num_classes, dim=0)                     # the same noise for each class
            xi = x0[i:i + 1].expand(len(levels), -1, -1, -1)
            x_in, t_in, target, _ = self.corrupt(xi, noise, levels)
            if self.config.self_condition:
                x_in = torch.cat([x_in, torch.zeros_like(x_in)], 1)
            err = (model(x_in, t_in, labels).float() - target.float()).pow(2).mean(dim=(1, 2, 3))
            errors[i] = err.view(n_timesteps, num_classes).sum(0).cpu()
        return errors / n_timesteps


def mask_aux_loss(logits: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice between mask logits and a {0,1} target (the anchor's auxiliary loss)."""
    bce = F.binary_cross_entropy_with_logits(logits, target01)
    prob = torch.sigmoid(logits)
    inter = (prob * target01).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + target01.sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return bce + dice.mean()


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(DiffusionConfig))
