"""Synthetic pair generation from a trained joint diffusion checkpoint (generate_synthetic.py is its CLI).

How a synthetic dataset is defined, so that it is reproducible and resumable:

* **Candidates.** Class ``c`` (its index in the checkpoint) has candidates ``j = 0, 1, 2, ...``; candidate
  ``j`` is drawn from its own generator seeded with ``seed + SEED_STRIDE * c + j`` (:func:`sampling.plan.sample_seed`).
  Its pixels depend on nothing else: not the batch it was drawn in, not the process that drew it.
* **Rejection.** The mask is binarised and components smaller than ``min_lesion_area`` pixels removed
  (:func:`clean_mask`, deterministic). A tumour-class candidate whose mask is then empty, or a 'normal'
  candidate whose mask is not, is rejected; the next candidate takes its place.
* **Selection.** The dataset holds, per class, the first N accepted candidates in candidate order
  (:func:`sampling.plan.plan_class`). Batch size, number of processes and interruptions cannot change that set.
* **On disk** (resumable in place): ``images/<id>.png`` and ``masks/<id>.png`` written atomically (the mask
  last: a pair is done when its mask exists), ``rejected*.jsonl`` (append-only, one line per rejected
  candidate, so a resumed run does not redraw them), ``generation.json`` (the run's settings: a folder
  holding a different run is refused), then ``metadata.csv`` + ``dataset.json`` rebuilt from what is on
  disk when every class is complete, and ``preview.png``.
* **Several processes** (torchrun): every round, the still-needed candidates are dealt out round-robin
  (:func:`sampling.plan.shard`); the ranks exchange their accept/reject results so all of them plan the next round
  identically; rank 0 writes the index and removes accepted files beyond the first N.

The candidate bookkeeping (seeds, ids, the accept rule, counts, rounds and shards) is :mod:`sampling.plan`.
The sampler is behind :class:`JointSampler` (``draw(class_indices, seeds) -> images, masks``), so another
generation mode (e.g. mask-conditioned) can plug in its own sampler and identity fields.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.errors import UserError
from common.io import atomic_write_json, read_png_gray, write_png
from common.outputs import OutputLock, check_separate, check_writable
from data.masks import clean_mask
from data.pairs import write_index
from sampling.plan import accept, next_round, pair_id, parse_pair_id, sample_seed, selection, shard

# The default sampler and guidance, to be chosen on a trained checkpoint (one place to change them).
DEFAULT_SAMPLER = "dpmsolver++"
DEFAULT_GUIDANCE = 1.5
DEFAULT_MIN_LESION_AREA = 16
DEFAULT_MAX_CANDIDATES_PER_SAMPLE = 10

CPU_MODEL_ROWS = 16              # the denoiser always sees this many rows on the CPU (see FixedRows)
GENERATION_FORMAT = 1            # bump when the meaning of a seed or of the mask post-processing changes
RUN_FILE = "generation.json"
REJECTED_FILE = "rejected.jsonl"
PREVIEW_FILE = "preview.png"
PREVIEW_PER_CLASS = 8


# ---------------------------------------------------------------------------- the run and its folder
@dataclass
class GenerationRequest:
    checkpoint_path: str
    output_dir: str
    classes: list[str]
    counts: dict[str, int]
    sampler: str = DEFAULT_SAMPLER
    steps: int = 0
    guidance_scale: float = DEFAULT_GUIDANCE
    batch_size: int = 16
    seed: int = 0
    min_lesion_area: int = DEFAULT_MIN_LESION_AREA
    max_candidates_per_sample: int = DEFAULT_MAX_CANDIDATES_PER_SAMPLE
    device: str = "auto"
    precision: str = "auto"
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. balance_to / total, recorded only
    condition_masks: str | None = None                     # mask-conditioned mode (sampling/conditioned.py)
    mask_transform: str | None = None
    condition_labels: str = "same"


def run_identity(req: GenerationRequest, ckpt: dict[str, Any], checkpoint_sha256: str, steps: int,
                 device_type: str, precision: str) -> dict[str, Any]:
    """Everything that decides the pixels of candidate j: a folder holding another identity is refused."""
    return {"generation_format": GENERATION_FORMAT, "mode": "joint" if req.condition_masks is None else
            "mask_conditioned", "checkpoint_sha256": checkpoint_sha256,
            "img_size": int(ckpt["img_size"]), "classes": list(req.classes), "sampler": req.sampler,
            "steps": int(steps), "guidance_scale": float(req.guidance_scale), "seed": int(req.seed),
            "min_lesion_area": int(req.min_lesion_area), "device_type": device_type, "precision": precision,
            "model_rows": CPU_MODEL_ROWS if device_type == "cpu" else None}


def check_output_dir(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a folder that holds anything but an earlier run with the same identity."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --output_dir exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise UserError(f"{out}: --output_dir is not empty and holds no {RUN_FILE} (not a generate_synthetic.py "
                        "output); choose another --output_dir")
    try:
        old = json.loads(run_file.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{run_file}: unreadable ({type(exc).__name__}); remove the folder or choose another "
                        "--output_dir") from None
    diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    if diffs:
        detail = ", ".join(f"{k}: {_short(old.get(k))} here vs {_short(identity.get(k))} now" for k in diffs[:5])
        raise UserError(f"{out}: holds samples of a different run ({detail}); use another --output_dir, or "
                        "rerun with that run's settings to resume it")


def _short(v: Any) -> str:
    return repr(v[:12] + "...") if isinstance(v, str) and len(v) > 40 else repr(v)


def _rejected_file(out: Path, rank: int) -> Path:
    return out / (REJECTED_FILE if rank == 0 else f"rejected.rank{rank}.jsonl")


def scan_output(out: Path, classes: Sequence[str]) -> dict[str, dict[int, bool]]:
    """Decided candidates on disk: pairs whose mask and image exist (accepted) and rejection records."""
    statuses: dict[str, dict[int, bool]] = {c: {} for c in classes}
    for sub in ("images", "masks"):
        folder = out / sub
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith("."):     # a temp file of an interrupted atomic write
                continue
            parsed = parse_pair_id(p.stem) if p.suffix == ".png" else None
            if parsed is None or parsed[0] not in statuses:
                raise UserError(f"{p}: a file this run did not write in {out}; remove it or choose another "
                                "--output_dir")
    mask_dir, img_dir = out / "masks", out / "images"
    if mask_dir.is_dir():
        for p in mask_dir.glob("syn_*.png"):
            label, j = parse_pair_id(p.stem)
            if (img_dir / p.name).is_file():
                statuses[label][j] = True
    for path in sorted(out.glob("rejected*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                label, j = rec["label"], int(rec["candidate"])
            except (ValueError, KeyError, TypeError):
                continue   # a line cut short by an interruption: that candidate is simply drawn again
            if label in statuses:
                statuses[label].setdefault(j, False)
    return statuses


def clean_temp_files(out: Path) -> None:
    for sub in ("images", "masks", "."):
        folder = out / sub
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- drawing samples
class JointSampler:
    """Draws joint image+mask samples from the checkpoint's EMA model, batch-invariantly (see
    :class:`FixedRows` and :func:`batch_invariant_kernels`)."""

    def __init__(self, model, diffusion, ckpt: dict[str, Any], device, precision: str, sampler: str, steps: int,
                 guidance_scale: float, resample: int = 1):
        rows = model_rows(device)
        self.model = FixedRows(model, rows) if rows else model
        self.diffusion, self.device, self.precision = diffusion, device, precision
        self.sampler, self.steps, self.guidance_scale, self.resample = sampler, steps, guidance_scale, resample
        self.img_size = int(ckpt["img_size"])
        self.null_class = len(ckpt["class_names"])

    def draw(self, class_indices: Sequence[int], seeds: Sequence[int], candidates: Sequence[int] | None = None,
             known=None, known_channels: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [B,H,W] and bool masks [B,H,W]; sample i depends only on seeds[i] and its class (and
        ``known[i]``: given channels in model space, [B,k,H,W], by default the mask channel (mask-conditioned
        sampling); ``known_channels=[0]`` gives the image instead (segmentation by the diffusion model))."""
        import torch

        from models.diffusion import model_space_to_images
        from common.precision import autocast
        labels = torch.tensor(list(class_indices), dtype=torch.long, device=self.device)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with batch_invariant_kernels(self.device):
            x = self.diffusion.sample(self.model, labels, gens, self.img_size, sampler=self.sampler,
                                      steps=self.steps, guidance_scale=self.guidance_scale,
                                      null_class=self.null_class,
                                      autocast=lambda: autocast(self.device, self.precision),
                                      known=known, known_channels=None if known is None else
                                      list(known_channels or range(1, 1 + known.shape[1])),
                                      resample=self.resample)
        images, masks = model_space_to_images(x)
        return images[:, 0].cpu().numpy(), masks[:, 0].cpu().numpy()


def model_rows(device) -> int | None:
    """Rows per denoiser call: fixed on the CPU (byte-identity across batch sizes); the batch as is on GPUs."""
    return CPU_MODEL_ROWS if device.type == "cpu" else None


class FixedRows:
    """Calls the denoiser on chunks of exactly ``rows`` rows (the last one padded with copies of its last row).

    Matrix kernels choose their code path by shape: on this CPU a [B, C] linear layer computes a row
    differently for B = 1, 2, 3, 5, 6 than for multiples of 4, and the native conv2d switches algorithm
    between 8 and 16 images. With every call the same shape, a sample's arithmetic no longer depends on
    how many samples share its batch or where it sits in it (checked by tests/test_generate.py).
    """

    def __init__(self, model, rows: int):
        self.model, self.rows = model, rows

    def __call__(self, x, timesteps, class_labels):
        import torch
        n, r = x.shape[0], self.rows
        outs = []
        for s in range(0, n, r):
            xs, ts, ys = x[s:s + r], timesteps[s:s + r], class_labels[s:s + r]
            k = xs.shape[0]
            if k < r:
                xs, ts, ys = (torch.cat([a, a[-1:].expand(r - k, *a.shape[1:])]) for a in (xs, ts, ys))
            outs.append(self.model(xs, ts, ys)[:k])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def batch_invariant_kernels(device):
    """Kernels whose per-sample results do not depend on the batch size.

    CPU: oneDNN's conv2d changes its arithmetic with the batch size (~5e-5 per conv), but not with a row's
    position or its neighbours at a fixed batch size: with :class:`FixedRows` every call has 16 rows, so oneDNN
    stays on (3-4x faster than the native kernels on the demo model; bit-identity across batch sizes, batch
    composition and positions is checked by tests/test_generate.py). CUDA: cuDNN deterministic, no autotuning,
    the batch as given: identity across batch sizes is likely there but neither guaranteed nor tested
    (cuBLAS/cuDNN choose kernels by shape).
    """
    import torch
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- the generation loop
def generate(req: GenerationRequest, after_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Generate (or resume, or extend) the synthetic pair dataset described by ``req``; returns a summary."""
    from models.loading import checkpoint_sha256, load_diffusion_checkpoint
    from common.distributed import cleanup, init_distributed
    from common.precision import resolve_device, resolve_precision
    from models.diffusion import DEFAULT_STEPS

    t0 = time.time()
    check_separate(req.output_dir, {"--checkpoint_path": req.checkpoint_path, "--condition_masks": req.condition_masks,
                                    "--balance_to": req.extra.get("balance_to")})
    check_writable(req.output_dir)
    dist = init_distributed(req.device)
    lock = OutputLock(req.output_dir, active=dist.is_main)
    try:
        lock.__enter__()
        device = resolve_device(req.device, dist.local_rank if dist.enabled else None)
        precision = resolve_precision(req.precision, device)
        if device.type == "cpu" and precision != "fp32":
            raise UserError(f"--precision {req.precision}: on the CPU generation runs in fp32 (mixed precision is "
                            "for CUDA); use --precision fp32 or auto")
        model, diffusion, ckpt = load_diffusion_checkpoint(req.checkpoint_path, device)
        trained = list(ckpt["class_names"])
        unknown = [c for c in req.classes if c not in trained]
        if unknown:
            raise UserError(f"{req.checkpoint_path}: class {', '.join(unknown)} is not one the checkpoint was trained "
                            f"on ({', '.join(trained)}); pass --classes with some of these")
        steps = req.steps or DEFAULT_STEPS[req.sampler]
        condition = transform = None
        if req.condition_masks is not None:
            from sampling.conditioned import MaskTransform, load_condition_masks
            transform = MaskTransform.parse(req.mask_transform)
            condition = load_condition_masks(req.condition_masks, int(ckpt["img_size"]), req.classes,
                                             req.condition_labels)
            if req.counts is None:   # one pair per condition mask
                req.counts = {c: len(condition.ids[c]) for c in req.classes}
        identity = run_identity(req, ckpt, checkpoint_sha256(req.checkpoint_path), steps, device.type, precision)
        if condition is not None:
            identity.update(condition_fingerprint=condition.fingerprint(), mask_transform=transform.spec(),
                            condition_labels=req.condition_labels if condition.labelled else "unlabelled")
        out = Path(req.output_dir)
        check_output_dir(out, identity)
        statuses = scan_output(out, req.classes)   # on every rank, so a bad folder stops them all alike
        _barrier(dist)   # every rank has checked the folder before rank 0 changes it
        if dist.is_main:
            _start_folder(out, identity, req, ckpt)
            (out / "dataset.json").unlink(missing_ok=True)   # never a stale index beside a changing folder
        statuses = _broadcast(statuses, dist)
        sampler = JointSampler(model, diffusion, ckpt, device, precision, req.sampler, steps, req.guidance_scale)
        describe = None
        if condition is not None:
            from sampling.conditioned import MaskConditionedSampler
            sampler = MaskConditionedSampler(sampler, trained, condition, transform, req.min_lesion_area)
            describe = lambda c, j, seed: sampler.condition_mask(c, j, seed)[1]  # noqa: E731
        state = _Loop(req, out, sampler, trained, dist, statuses)
        t_loop = time.time()
        state.run(after_batch)
        loop_seconds = time.time() - t_loop
        tallies = _all_gather([(state.drawn, state.written, state.rejected)], dist)
        summed = [{c: sum(t[k][c] for t in tallies) for c in req.classes} for k in range(3)]
        summary = {"output_dir": str(out), "sampler": req.sampler, "steps": steps, "world_size": dist.world_size,
                   "drawn_this_run": summed[0], "written_this_run": summed[1], "rejected_this_run": summed[2],
                   "sampling_seconds": loop_seconds}
        if dist.is_main:
            summary.update(finalize(out, req, ckpt, identity, state.statuses, describe))
            summary["total_seconds"] = time.time() - t0
        _barrier(dist)
        return summary
    finally:
        lock.__exit__()
        cleanup()


def _start_folder(out: Path, identity: dict[str, Any], req: GenerationRequest, ckpt: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out)
    run_file = out / RUN_FILE   # first: a folder holding samples always says which run they belong to
    history = []
    if run_file.is_file():
        history = json.loads(run_file.read_text()).get("runs", [])
    history.append({"command": req.command, "counts": req.counts, "checkpoint_path": str(req.checkpoint_path),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **req.extra})
    atomic_write_json(run_file, {"identity": identity, "checkpoint_step": int(ckpt.get("step", -1)),
                                 "class_names_in_checkpoint": list(ckpt["class_names"]), "runs": history})
    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)


class _Loop:
    """Rounds of candidates until every class has its first N accepted ones decided."""

    def __init__(self, req: GenerationRequest, out: Path, sampler: JointSampler, trained: list[str], dist,
                 statuses: dict[str, dict[int, bool]]):
        self.req, self.out, self.sampler, self.dist, self.statuses = req, out, sampler, dist, statuses
        self.class_index = {c: trained.index(c) for c in req.classes}
        self.caps = {c: req.max_candidates_per_sample * req.counts[c] for c in req.classes}
        self.drawn = {c: 0 for c in req.classes}
        self.written = {c: 0 for c in req.classes}
        self.rejected = {c: 0 for c in req.classes}

    def accepted_total(self) -> int:
        total = 0
        for c in self.req.classes:
            chosen, k = selection(self.req.counts[c], self.statuses[c], self.caps[c])
            total += len(chosen) if chosen is not None else min(
                self.req.counts[c], sum(1 for v in self.statuses[c].values() if v))
        return total

    def run(self, after_batch: Callable[[int], None] | None) -> None:
        from common.progress import progress_bar
        need = sum(self.req.counts.values())
        bar = progress_bar(total=need, initial=min(need, self.accepted_total()), desc="generate", unit="pair",
                           disable=not self.dist.is_main)
        batches = 0
        rej_path = _rejected_file(self.out, self.dist.rank)
        try:
            while True:
                items = next_round(self.req.counts, self.statuses, self.caps)
                if not items:
                    break
                mine = shard(items, self.dist.rank, self.dist.world_size)
                results: list[tuple[str, int, bool]] = []
                bs = self.req.batch_size
                for start in range(0, len(mine), bs):
                    batch = mine[start:start + bs]
                    got = self._draw_batch(batch, rej_path)
                    results += got
                    batches += 1
                    bar.update(sum(1 for _, _, ok in got if ok))
                    bar.set_postfix(rejected=sum(self.rejected.values()))
                    if after_batch is not None:
                        after_batch(batches)
                for label, j, ok in _all_gather(results, self.dist):
                    self.statuses[label][j] = ok
                bar.n = min(need, self.accepted_total())
                bar.refresh()
        finally:
            bar.close()
        for c in self.req.classes:
            chosen, _ = selection(self.req.counts[c], self.statuses[c], self.caps[c])
            if chosen is None:
                n_rej = sum(1 for v in self.statuses[c].values() if not v)
                raise UserError(
                    f"class {c}: gave up after {self.caps[c]} candidates for {self.req.counts[c]} samples "
                    f"({n_rej} rejected: {accept(c, 0)[1]} after removing components < "
                    f"{self.req.min_lesion_area} px); rerun with a higher --max_candidates_per_sample to keep trying, "
                    "or check the checkpoint's samples and use a lower --min_lesion_area with a new --output_dir")

    def _draw_batch(self, batch: list[tuple[str, int]], rej_path: Path) -> list[tuple[str, int, bool]]:
        seeds = [sample_seed(self.req.seed, self.class_index[c], j) for c, j in batch]
        images, masks = self.sampler.draw([self.class_index[c] for c, _ in batch], seeds, [j for _, j in batch])
        results, lines = [], []
        for (label, j), seed, image, raw in zip(batch, seeds, images, masks):
            mask, area = clean_mask(raw, self.req.min_lesion_area)
            ok, reason = accept(label, area)
            self.drawn[label] += 1
            if ok:
                pid = pair_id(label, j)
                write_png(self.out / "images" / f"{pid}.png", image, atomic=True)
                write_png(self.out / "masks" / f"{pid}.png", mask, atomic=True)   # last: the pair is done
                self.written[label] += 1
            else:
                self.rejected[label] += 1
                lines.append(json.dumps({"label": label, "candidate": j, "seed": seed, "reason": reason,
                                         "raw_mask_area": int(raw.sum()), "area": area}))
            results.append((label, j, ok))
        if lines:
            with open(rej_path, "ab+") as fh:   # append-only; start a new line after a line cut short
                cut = False
                if fh.seek(0, 2) > 0:
                    fh.seek(-1, 2)
                    cut = fh.read(1) != b"\n"
                fh.write((("\n" if cut else "") + "\n".join(lines) + "\n").encode())
        return results


def finalize(out: Path, req: GenerationRequest, ckpt: dict[str, Any], identity: dict[str, Any],
             statuses: dict[str, dict[int, bool]], describe: Callable | None = None) -> dict[str, Any]:
    """Rank 0: drop accepted pairs beyond the first N, merge rejection records, write index and preview.
    ``describe(label, candidate, seed)`` adds provenance columns (the condition mask of mask-conditioned runs)."""
    chosen: dict[str, list[int]] = {}
    prefix: dict[str, int] = {}
    caps = {c: req.max_candidates_per_sample * req.counts[c] for c in req.classes}
    for c in req.classes:
        chosen[c], prefix[c] = selection(req.counts[c], statuses[c], caps[c])
    keep = {pair_id(c, j) for c in req.classes for j in chosen[c]}
    removed = 0
    for sub in ("images", "masks"):
        for p in (out / sub).glob("syn_*.png"):
            if p.stem not in keep:
                p.unlink()
                removed += sub == "masks"
    _merge_rejections(out)
    rows, previews = [], {c: [] for c in req.classes}
    sha = identity["checkpoint_sha256"]
    for c in req.classes:
        ci = list(ckpt["class_names"]).index(c)
        for j in chosen[c]:
            pid = pair_id(c, j)
            try:
                mask = read_png_gray(out / "masks" / f"{pid}.png")
            except OSError as exc:
                raise UserError(f"{out / 'masks' / (pid + '.png')}: {exc}; delete it and rerun to redraw it") from None
            rows.append({"id": pid, "label": c, "split": "train", "source": "synthetic", "group": pid,
                         "checkpoint": Path(req.checkpoint_path).name, "checkpoint_sha256": sha,
                         "checkpoint_step": int(ckpt.get("step", -1)), "seed": sample_seed(req.seed, ci, j),
                         "candidate": j, "sampler": identity["sampler"], "steps": identity["steps"],
                         "guidance_scale": identity["guidance_scale"], "min_lesion_area": identity["min_lesion_area"],
                         "lesion_area": int(np.count_nonzero(mask)),
                         **(describe(c, j, sample_seed(req.seed, ci, j)) if describe else {})})
            if len(previews[c]) < PREVIEW_PER_CLASS:
                previews[c].append(pid)
    info = write_index(out, rows, identity["img_size"], req.command,
                       {"generation": identity, "checkpoint_path": str(req.checkpoint_path),
                        # what the generator was trained on, by content (create_combined_dataset.py checks it)
                        "generator_training": ckpt.get("training_data")})
    _write_preview(out, previews, identity["img_size"])
    per_class = {}
    for c in req.classes:
        k = prefix[c]
        n_rej = sum(1 for j, v in statuses[c].items() if not v and j < k)
        per_class[c] = {"pairs": len(chosen[c]), "candidates": k, "rejected": n_rej,
                        "rejection_rate": (n_rej / k) if k else 0.0}
    return {"per_class": per_class, "n_pairs": info["n_pairs"], "removed_surplus": removed}


def _merge_rejections(out: Path) -> None:
    """Fold the other ranks' rejection files into rejected.jsonl (sorted, one line per candidate)."""
    files = sorted(out.glob("rejected.rank*.jsonl"))
    if not files:
        return
    recs = {}
    for path in [out / REJECTED_FILE, *files]:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    recs[(rec["label"], int(rec["candidate"]))] = line
                except (ValueError, KeyError, TypeError):
                    continue
    from common.io import atomic_write_text
    atomic_write_text(out / REJECTED_FILE, "".join(recs[k] + "\n" for k in sorted(recs)))
    for path in files:
        path.unlink()


def _write_preview(out: Path, previews: dict[str, list[str]], size: int) -> None:
    """preview.png: one row per class that has pairs, its first pairs (image | image with the mask's outline)."""
    import torch

    from common.visual import save_grid
    previews = {c: ids for c, ids in previews.items() if ids}
    cols = max((len(v) for v in previews.values()), default=0)
    if cols == 0:
        (out / PREVIEW_FILE).unlink(missing_ok=True)
        return
    images = torch.zeros((len(previews) * cols, 1, size, size), dtype=torch.uint8)
    masks = torch.zeros_like(images, dtype=torch.bool)
    for r, ids in enumerate(previews.values()):
        for k, pid in enumerate(ids):
            images[r * cols + k, 0] = torch.from_numpy(read_png_gray(out / "images" / f"{pid}.png"))
            masks[r * cols + k, 0] = torch.from_numpy(read_png_gray(out / "masks" / f"{pid}.png") > 0)
    save_grid(out / PREVIEW_FILE, images, masks, rows=len(previews))


def format_summary(summary: dict[str, Any]) -> str:
    written = summary["written_this_run"]
    n = sum(written.values())
    secs = summary["sampling_seconds"]
    rate = n / secs if secs > 0 else 0.0
    drawn = sum(summary["drawn_this_run"].values())
    lines = [f"this run: drew {drawn} candidates, wrote {n} pairs "
             f"({', '.join(f'{c} {k}' for c, k in written.items())}), rejected "
             f"{sum(summary['rejected_this_run'].values())}; {rate:.3f} samples/s "
             f"({summary['sampler']}-{summary['steps']}); sampling {secs:.1f} s, "
             f"total {summary['total_seconds']:.1f} s"]
    parts = [f"{c} {v['pairs']} (rejected {v['rejected']} of {v['candidates']} candidates, "
             f"{100 * v['rejection_rate']:.1f}%)" for c, v in summary["per_class"].items()]
    lines.append(f"dataset: {summary['n_pairs']} pairs: " + "; ".join(parts))
    if summary.get("removed_surplus"):
        lines.append(f"removed {summary['removed_surplus']} accepted pairs beyond the requested count")
    out = Path(summary["output_dir"])
    lines.append(f"output: {out} (index {out / 'metadata.csv'}, preview {out / PREVIEW_FILE})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- collectives (no-ops alone)
def _barrier(dist) -> None:
    from common.distributed import barrier
    barrier(dist)


def _broadcast(obj: Any, dist) -> Any:
    if not dist.enabled:
        return obj
    import torch.distributed as tdist
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(results: list, dist) -> list:
    if not dist.enabled:
        return results
    import torch.distributed as tdist
    parts: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(parts, results)
    return [r for part in parts for r in part]
