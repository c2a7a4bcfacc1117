"""Controlled generation with the joint model: images drawn for given tumour masks.

The joint model draws an image and its mask together; holding the mask channel fixed while sampling
(replacement conditioning, :meth:`models.diffusion.JointDiffusion.sample` with ``known``) makes the same
checkpoint draw an image *for a given mask*. ``generate_synthetic.py --condition_masks SOURCE`` uses it:

* **Condition masks** (:func:`load_condition_masks`): a pair dataset (the masks of its TRAINING split: masks of
  validation or test lesions would carry held-out patients' lesion shapes into synthetic training data), or a
  folder of mask PNGs of any size (resized, binarised at > 0; used for every class). With a labelled source,
  class ``c`` draws on the masks labelled ``c`` (``--condition_labels same``) or on all of them (``any``).
* **New masks from real ones** (:class:`MaskTransform`, ``--mask_transform``): ``scale=A:B`` (area-preserving
  shape, linear size factor uniform in [A, B]), ``rotate=D`` (uniform in [-D, D] degrees), ``elastic=P``
  (smooth random displacement of about P pixels), ``shift=F`` (translation uniform in [-F, F] x the image size),
  ``place=Y0:Y1`` (the lesion's centroid moved to a depth uniform in [Y0, Y1] x the image height; 0 = skin),
  ``flip=P`` (horizontal flip with probability P). E.g. ``scale=1.3:1.6,place=0.15:0.35`` asks for larger lesions
  near the skin.
* **Candidates.** Candidate ``j`` of class ``c`` uses condition mask ``j mod M_c`` (the class's masks in id order)
  and draws its transform from its own sample seed, so a pair is still a function of its seed. The transformed
  mask is cleaned like a generated one (components < ``--min_lesion_area`` removed) *before* sampling and is then
  reproduced exactly in the mask channel; a mask that the transform pushed out of the image is rejected and the
  next candidate takes its place.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.errors import UserError
from common.io import pixel_hash
from data.pairs import LABELS, is_pair_dataset, open_pair_dataset

CONDITION_LABEL_MODES = ("same", "any")


# ---------------------------------------------------------------------------- mask transforms
def _range(key: str, text: str, low: float, high: float) -> tuple[float, float]:
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise UserError(f"--mask_transform {key}={text}: not a number or a range A:B") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] < low or parts[1] > high:
        raise UserError(f"--mask_transform {key}={text}: give a value or a range A:B with {low} <= A <= B <= {high}")
    return parts[0], parts[1]


@dataclass(frozen=True)
class MaskTransform:
    scale: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0
    elastic: float = 0.0
    shift: float = 0.0
    place: tuple[float, float] | None = None
    flip: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> "MaskTransform":
        if not text:
            return cls()
        kw: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise UserError(f"--mask_transform: '{item}' is not key=value (keys: scale, rotate, elastic, shift, "
                                "place, flip)")
            if key == "scale":
                kw[key] = _range(key, value, 0.05, 10.0)
            elif key == "place":
                kw[key] = _range(key, value, 0.0, 1.0)
            elif key in ("rotate", "elastic", "shift", "flip"):
                kw[key] = _range(key, value, 0.0, {"rotate": 180.0, "elastic": 1e3, "shift": 1.0, "flip": 1.0}[key])[0]
            else:
                raise UserError(f"--mask_transform: unknown key '{key}' (keys: scale, rotate, elastic, shift, place, "
                                "flip)")
        return cls(**kw)

    def spec(self) -> str:
        return json.dumps({"scale": list(self.scale), "rotate": self.rotate, "elastic": self.elastic,
                           "shift": self.shift, "place": list(self.place) if self.place else None, "flip": self.flip},
                          sort_keys=True)

    def apply(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
        """Bool mask [H,W] -> (transformed bool mask, the drawn parameters). Draws the same numbers in the same
        order whatever the options, so one option does not change the others' draws."""
        import cv2
        h, w = mask.shape
        draws = rng.random(7)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * draws[0]
        angle = self.rotate * (2 * draws[1] - 1)
        dx, dy = self.shift * (2 * draws[2] - 1) * w, self.shift * (2 * draws[3] - 1) * h
        flip = draws[5] < self.flip
        params = {"scale": round(float(s), 4), "rotate": round(float(angle), 3), "flip": bool(flip)}
        if not mask.any():
            return mask.copy(), params
        ys, xs = np.nonzero(mask)
        cy, cx = float(ys.mean()), float(xs.mean())
        if self.place is not None:
            target = (self.place[0] + (self.place[1] - self.place[0]) * draws[4]) * h
            dy += target - cy
        m = cv2.getRotationMatrix2D((cx, cy), angle, s)
        m[:, 2] += (dx, dy)
        out = cv2.warpAffine(mask.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)
        if self.elastic > 0:
            field_rng = np.random.default_rng(int(draws[6] * 2**62))
            sigma = max(h, w) / 8
            disp = [cv2.GaussianBlur(field_rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
                    for _ in range(2)]
            disp = [d * (self.elastic / (d.std() + 1e-8)) for d in disp]
            gy, gx = np.mgrid[:h, :w].astype(np.float32)
            out = cv2.remap(out, gx + disp[0], gy + disp[1], cv2.INTER_LINEAR, borderValue=0.0)
        out = out > 0.5
        if flip:
            out = out[:, ::-1]
        params.update(shift_x=round(float(dx), 2), shift_y=round(float(dy), 2))
        return np.ascontiguousarray(out), params


# ---------------------------------------------------------------------------- condition masks
@dataclass
class ConditionMasks:
    """Condition masks per class: ids and bool masks [H,W] at the checkpoint's image size."""

    source: str
    ids: dict[str, list[str]]
    masks: dict[str, list[np.ndarray]]
    labelled: bool

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for label in sorted(self.ids):
            for pid, m in zip(self.ids[label], self.masks[label]):
                h.update(f"{label}/{pid}:".encode())
                h.update(np.packbits(m).tobytes())
        return h.hexdigest()


def load_condition_masks(source: str | Path, img_size: int, classes: Sequence[str], label_mode: str = "same"
                         ) -> ConditionMasks:
    import cv2

    from common.io import read_png_gray
    if label_mode not in CONDITION_LABEL_MODES:
        raise UserError(f"--condition_labels must be one of {', '.join(CONDITION_LABEL_MODES)}, got {label_mode}")
    src = Path(source)
    pool: list[tuple[str, str | None, np.ndarray]] = []
    if src.name in ("masks", "images") and is_pair_dataset(src.parent):
        raise UserError(f"--condition_masks {src}: this is the {src.name} folder of the pair dataset {src.parent}, "
                        "which holds its validation and test masks too; pass the pair dataset itself "
                        f"(--condition_masks {src.parent}): only its training split is used")
    if is_pair_dataset(src):
        ds = open_pair_dataset(src)
        rows = [r for r in ds.select(split="train") if r["label"] in LABELS]
        _, masks = ds.load(rows)
        pool = [(r["id"], r["label"], m > 0) for r, m in zip(rows, masks)]
        labelled = True
    elif src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
        if not files:
            raise UserError(f"--condition_masks {src}: neither a pair dataset nor a folder with mask PNGs")
        for p in files:
            try:
                arr = read_png_gray(p) > 0
            except OSError as exc:
                raise UserError(f"--condition_masks: {p}: {exc}") from None
            pool.append((p.stem, None, arr))
        labelled = False
    else:
        raise UserError(f"--condition_masks {src}: no such folder")
    ids: dict[str, list[str]] = {}
    out: dict[str, list[np.ndarray]] = {}
    for label in classes:
        chosen = [(pid, m) for pid, lab, m in pool
                  if not labelled or label_mode == "any" or lab == label]
        chosen = [(pid, m) for pid, m in chosen if m.any()]
        if not chosen:
            raise UserError(f"--condition_masks {src}: no non-empty {label} mask in its training split"
                            if labelled and label_mode == "same" else
                            f"--condition_masks {src}: no non-empty mask")
        chosen.sort(key=lambda t: t[0])
        ids[label] = [pid for pid, _ in chosen]
        out[label] = [m if m.shape == (img_size, img_size) else
                      cv2.resize(m.astype(np.float32), (img_size, img_size), interpolation=cv2.INTER_AREA) >= 0.5
                      for _, m in chosen]
    return ConditionMasks(str(src), ids, out, labelled)


# ---------------------------------------------------------------------------- the sampler
class MaskConditionedSampler:
    """``draw(class_indices, seeds, candidates)`` like :class:`sampling.generation.JointSampler`, with the mask channel
    given: candidate j of a class uses that class's condition mask j mod M, transformed with the sample's seed."""

    def __init__(self, joint, class_names: Sequence[str], condition: ConditionMasks, transform: MaskTransform,
                 min_lesion_area: int):
        self.joint, self.class_names = joint, list(class_names)
        self.condition, self.transform, self.min_lesion_area = condition, transform, min_lesion_area

    def condition_mask(self, label: str, candidate: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        from data.masks import clean_mask
        k = candidate % len(self.condition.ids[label])
        source = self.condition.masks[label][k]
        mask, params = self.transform.apply(source, np.random.default_rng(int(seed)))
        cleaned, _ = clean_mask(mask, self.min_lesion_area)
        # the condition mask by content: create_combined_dataset.py refuses one that is a val/test mask
        return cleaned > 0, {"condition_id": self.condition.ids[label][k], "mask_transform": json.dumps(params),
                             "condition_sha": pixel_hash(source.astype(np.uint8))}

    def draw(self, class_indices: Sequence[int], seeds: Sequence[int], candidates: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray]:
        import torch
        masks = np.stack([self.condition_mask(self.class_names[c], j, s)[0]
                          for c, s, j in zip(class_indices, seeds, candidates)])
        # the given masks in the model's own mask encoding (+-mask_scale, or its signed distance map): a model
        # trained on one encoding denoises a mask channel in that encoding, not a bare +-1
        known = self.joint.diffusion.encode_masks(torch.from_numpy(masks)[:, None])
        images, drawn = self.joint.draw(class_indices, seeds, candidates, known=known)
        return images, drawn
