"""The diffusion process around the joint image+mask denoiser, built on diffusers schedulers.

* Training (:meth:`JointDiffusion.loss`): ``DDPMScheduler.add_noise`` noises the stacked [image, mask]
  tensor; the target is the noise (epsilon), the velocity (``get_velocity``) or the clean sample, as the
  scheduler's ``prediction_type`` says. Loss = image MSE + ``mask_loss_weight`` x mask MSE, optionally
  Min-SNR-weighted, plus the anchor's auxiliary mask loss (BCE + soft Dice) when the model has an anchor.
* Sampling (:meth:`JointDiffusion.sample`): DDPM, DDIM or DPM-Solver++ from diffusers, with
  classifier-free guidance (conditional and null-class passes in one batch) and per-sample generators,
  so a sample is a function of its own seed, not of the batch it was drawn in.

Images live in [-1, 1]; masks in {-1, 1} (a mask is recovered by thresholding its channel at 0).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmsolver++": 20}


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    image_channels: int = 1
    mask_channels: int = 1
    mask_loss_weight: float = 1.0
    anchor_loss_weight: float = 1.0
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def images_to_model_space(images_u8: torch.Tensor, masks_01: torch.Tensor) -> torch.Tensor:
    """uint8 images [B,1,H,W] and {0,1} masks [B,1,H,W] -> one float tensor [B,2,H,W] in [-1,1]."""
    img = images_u8.float().div_(127.5).sub_(1.0)
    msk = masks_01.float().mul_(2.0).sub_(1.0)
    return torch.cat([img, msk], dim=1)


def model_space_to_images(x: torch.Tensor, image_channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,C,H,W] in [-1,1] -> (uint8 images [B,ci,H,W], bool masks [B,cm,H,W])."""
    img = ((x[:, :image_channels].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    msk = x[:, image_channels:].float() > 0
    return img, msk


class JointDiffusion:
    """Noise schedule, training objective and samplers for a model ``f(x_t, t, y) -> prediction``."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()
        c = self.config
        self.scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                                       beta_start=c.beta_start, beta_end=c.beta_end,
                                       prediction_type=c.prediction_type, clip_sample=False)
        self._snr = None

    # ------------------------------------------------------------------ training
    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self._snr is None or self._snr.device != timesteps.device:
            ac = self.scheduler.alphas_cumprod.to(timesteps.device)
            self._snr = ac / (1.0 - ac)
        return self._snr[timesteps]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0

    def loss(self, model: Callable, x0: torch.Tensor, class_labels: torch.Tensor,
             generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean training loss and per-sample parts (no host synchronisation).

        Returns ``(loss, parts)`` with ``parts['per_sample']`` [B] (denoising loss per sample),
        ``parts['timesteps']`` [B], ``parts['image']``, ``parts['mask']`` and ``parts['anchor']`` (scalars).
        """
        c = self.config
        b = x0.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, c.num_train_timesteps, (b,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        target = self.target(x0, noise, timesteps)
        out = model(x_t, timesteps, class_labels, return_anchor=True)
        pred, anchor = out if isinstance(out, tuple) else (out, None)
        err = (pred.float() - target.float()).pow(2)
        img_loss = err[:, :c.image_channels].mean(dim=(1, 2, 3))
        mask_loss = err[:, c.image_channels:].mean(dim=(1, 2, 3))
        per_sample = img_loss + c.mask_loss_weight * mask_loss
        weights = self.loss_weights(timesteps)
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        anchor_loss = torch.zeros((), device=x0.device)
        if anchor is not None and c.anchor_loss_weight > 0:
            anchor_loss = mask_aux_loss(anchor.float(), (x0[:, c.image_channels:] > 0).float())
            loss = loss + c.anchor_loss_weight * anchor_loss
        parts = {"per_sample": per_sample.detach(), "timesteps": timesteps, "image": img_loss.detach().mean(),
                 "mask": mask_loss.detach().mean(), "anchor": anchor_loss.detach()}
        return loss, parts

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights (Hang et al. 2023), expressed for the chosen prediction type."""
        gamma = self.config.snr_gamma
        if not gamma:
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

    @torch.inference_mode()
    def sample(self, model: Callable, class_labels: torch.Tensor, generators: Sequence[torch.Generator],
               img_size: int, sampler: str = "dpmsolver++", steps: int | None = None,
               guidance_scale: float = 1.0, null_class: int | None = None,
               autocast: Callable | None = None, progress: Callable | None = None,
               known: torch.Tensor | None = None, known_channels: Sequence[int] | None = None,
               resample: int = 1) -> torch.Tensor:
        """Draw a batch of joint samples [B, C, H, W] in [-1, 1].

        ``generators`` holds one CPU ``torch.Generator`` per sample: the sample's initial noise and every
        stochastic step draw only from its own generator, so a sample does not depend on its batch.
        ``guidance_scale`` > 1 uses classifier-free guidance against ``null_class``.

        ``known`` ([B, len(known_channels), H, W], model space) holds channels that are given rather than drawn
        (replacement conditioning, as in RePaint without resampling): after every step those channels of
        ``x_t`` are replaced by the known values noised to the next timestep with ``add_noise`` (fresh noise
        from each sample's generator), and the result carries the known values exactly. With the mask channel
        known the model draws an image for a given mask; with the image channel known it segments.
        ``resample`` > 1 (DDIM / DDPM only: their steps keep no history) repeats every step that many times,
        re-noising the result back to the step's timestep in between (RePaint's resampling, jump length 1), so
        the drawn channels can agree with the known ones at every noise level.
        """
        steps = steps or DEFAULT_STEPS[sampler]
        device = class_labels.device
        b = class_labels.shape[0]
        if len(generators) != b:
            raise ValueError(f"need one generator per sample ({b}), got {len(generators)}")
        c = self.config
        shape = (b, c.image_channels + c.mask_channels, img_size, img_size)
        kc = list(known_channels or [])
        if (known is None) != (not kc):
            raise ValueError("known and known_channels go together")
        if known is not None and tuple(known.shape) != (b, len(kc), img_size, img_size):
            raise ValueError(f"known must be [{b}, {len(kc)}, {img_size}, {img_size}], got {tuple(known.shape)}")
        if resample < 1 or (resample > 1 and (known is None or sampler == "dpmsolver++")):
            raise ValueError("resample > 1 needs known channels and the ddim or ddpm sampler")
        sched = self.make_scheduler(sampler, steps)
        gens = list(generators)
        x = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32)
        x = x * sched.init_noise_sigma
        use_cfg = guidance_scale != 1.0
        if use_cfg and null_class is None:
            raise ValueError("classifier-free guidance needs null_class")
        labels_in = torch.cat([class_labels, torch.full_like(class_labels, null_class)]) if use_cfg else class_labels
        ctx = autocast if autocast is not None else _nullcontext
        timesteps = sched.timesteps
        if known is not None:
            known = known.to(device=device, dtype=torch.float32)
            x[:, kc] = self._noised_known(known, timesteps[0], gens)
        ac = self.scheduler.alphas_cumprod.to(device)
        for i, t in enumerate(timesteps):
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            for r in range(resample if t_next is not None else 1):
                if r:   # RePaint: back from t_next to t with fresh noise, then the step again
                    keep = (ac[int(t)] / ac[int(t_next)]).float()
                    noise = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32)
                    x = keep.sqrt() * x + (1 - keep).sqrt() * noise
                x_in = torch.cat([x, x]) if use_cfg else x
                x_in = sched.scale_model_input(x_in, t)
                t_in = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
                with ctx():
                    out = model(x_in, t_in, labels_in)
                out = out.float()
                if use_cfg:
                    cond, uncond = out.chunk(2)
                    out = uncond + guidance_scale * (cond - uncond)
                step_kwargs = {"generator": gens} if sampler == "ddpm" else {}
                x = sched.step(out, t, x, **step_kwargs).prev_sample
                if known is not None:
                    x[:, kc] = self._noised_known(known, t_next, gens) if t_next is not None else known
            if progress is not None:
                progress(i + 1, len(timesteps))
        return x.clamp(-1.0, 1.0)

    def _noised_known(self, known: torch.Tensor, t, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """``known`` noised to timestep ``t`` (q(x_t | x_0)), the noise drawn from each sample's own generator."""
        noise = randn_tensor(tuple(known.shape), generator=list(gens), device=known.device, dtype=torch.float32)
        ts = torch.full((known.shape[0],), int(t), device=known.device, dtype=torch.long)
        return self.scheduler.add_noise(known, noise, ts)

    @torch.inference_mode()
    def class_errors(self, model: Callable, x0: torch.Tensor, num_classes: int, n_timesteps: int = 16,
                     seed: int = 0) -> torch.Tensor:
        """Denoising error of ``x0`` [B,C,H,W] under each class label, [B, num_classes] (lower = more likely).

        The "diffusion classifier" (Li et al. 2023): the same fixed timesteps (evenly spaced) and noise for every
        class, so the classes are compared on equal terms; the noise of image i comes from a generator seeded with
        ``seed + i``. Each image is one batch of ``n_timesteps x num_classes`` rows."""
        b = x0.shape[0]
        t_grid = ((torch.arange(n_timesteps) + 0.5) / n_timesteps * self.config.num_train_timesteps).long()
        ts = t_grid.repeat_interleave(num_classes).to(x0.device)                  # [T*K]: t0 t0 t1 t1 ...
        labels = torch.arange(num_classes, device=x0.device).repeat(n_timesteps)  # [T*K]: 0 1 0 1 ...
        errors = torch.zeros(b, num_classes)
        for i in range(b):
            gen = torch.Generator().manual_seed(int(seed) + i)
            noise = torch.randn((n_timesteps, *x0.shape[1:]), generator=gen).to(x0.device)
            noise = noise.repeat_interleave(num_classes, dim=0)                     # the same noise for each class
            xi = x0[i:i + 1].expand(len(ts), -1, -1, -1)
            x_t = self.scheduler.add_noise(xi, noise, ts)
            err = (model(x_t, ts, labels).float() - self.target(xi, noise, ts).float()).pow(2).mean(dim=(1, 2, 3))
            errors[i] = err.view(n_timesteps, num_classes).sum(0).cpu()
        return errors / n_timesteps


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def mask_aux_loss(logits: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice between mask logits and a {0,1} target (the anchor's auxiliary loss)."""
    bce = F.binary_cross_entropy_with_logits(logits, target01)
    prob = torch.sigmoid(logits)
    inter = (prob * target01).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + target01.sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return bce + dice.mean()
