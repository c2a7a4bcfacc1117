"""The evaluation's stages by name, in NVlabs/edm's ``metric_main`` manner: each stage is a function of one uniform
signature ``fn(ctx: EvalContext) -> result`` (or ``(result, raw arrays for the report figures)``), registered with
its name, the metrics inside it and whether it needs the real-data floor.

``--skip`` takes one vocabulary (:data:`SKIP_NAMES`): a stage name skips the whole stage, a metric name only that
metric (``fid``, ``kid``, ``is`` in ``generation``; ``ssim``, ``diversity`` in ``similarity``). A stage runs while
any of its metrics is wanted.

The stage functions import their metric modules when called: this module is imported by ``evaluate.py`` at the
top (its ``--skip`` help lists :data:`SKIP_NAMES`), and ``--help`` should not import torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from metrics.floors import MetricUnavailable


@dataclass(frozen=True)
class EvalOptions:
    """What the stages read from evaluate.py's flags (same names)."""

    inception_weights: str = "auto"
    cache_dir: str | None = None
    batch_size: int = 32
    floor_draws: int = 5
    seed: int = 0
    kid_subsets: int = 100
    ssim_top_k: int = 16
    diversity_pairs: int = 500
    memorisation_threshold: float = 0.95
    baseline_run: tuple[str, ...] = ()
    combined_run: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "EvalOptions":
        """The options out of a flat mapping (e.g. ``vars(args)``); other keys are ignored."""
        kw = {f.name: values[f.name] for f in fields(cls) if f.name in values and values[f.name] is not None}
        for key in ("baseline_run", "combined_run"):
            kw[key] = tuple(kw.get(key) or ())
        return cls(**kw)


@dataclass
class EvalContext:
    """Everything a stage may read: the loaded sets (evaluate.py's ``_load_sets``), the device, the options and
    the metric names skipped (already expanded by :func:`resolve_skip`)."""

    data: dict[str, Any]
    device: str = "cpu"
    options: EvalOptions = field(default_factory=EvalOptions)
    skipped: frozenset[str] = frozenset()

    def wants(self, metric: str) -> bool:
        return metric not in self.skipped


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[EvalContext], Any]
    metrics: tuple[str, ...]                 # the --skip names inside the stage (the stage's own name if none)
    needs_floor: bool                        # skipped with the reason when there are too few held-out images
    applies: Callable[[EvalContext], bool]   # False: the stage has nothing to do (no segmentation runs given)


STAGES: dict[str, Stage] = {}


def register_stage(name: str, metrics: Iterable[str] = (), needs_floor: bool = True,
                   applies: Callable[[EvalContext], bool] = lambda ctx: True):
    def deco(fn: Callable[[EvalContext], Any]) -> Callable[[EvalContext], Any]:
        STAGES[name] = Stage(name, fn, tuple(metrics) or (name,), needs_floor, applies)
        return fn
    return deco


def skip_names() -> tuple[str, ...]:
    """Every name ``--skip`` accepts: the stage names in running order, then the metric names inside stages."""
    inner = [m for s in STAGES.values() for m in s.metrics if m not in STAGES]
    return (*STAGES, *inner)


def resolve_skip(names: Iterable[str]) -> frozenset[str]:
    """``--skip`` names -> the metric names skipped (a stage name stands for all its metrics). Unknown: ValueError."""
    names = list(names)
    unknown = [n for n in names if n not in skip_names()]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(skip_names())}")
    out = set()
    for n in names:
        out.update(STAGES[n].metrics if n in STAGES else (n,))
    return frozenset(out)


def stage_enabled(name: str, skipped: Iterable[str]) -> bool:
    """Does ``--skip`` leave any metric of stage ``name`` to compute?"""
    return any(m not in set(skipped) for m in STAGES[name].metrics)


def run_stages(ctx: EvalContext, metrics: dict[str, Any], raw: dict[str, Any], no_floor: str | None = None
               ) -> list[str]:
    """Run every registered stage that ``--skip`` leaves and that applies, in order, into ``metrics[name]``
    (``{"skipped": reason}`` when it cannot be computed, with a warning); raw arrays go to ``raw[name]``.
    ``no_floor``: why the real-data floors cannot be computed (stages that need them are skipped with it).
    Returns the names of the stages that produced results."""
    for stage in STAGES.values():
        if not stage_enabled(stage.name, ctx.skipped) or not stage.applies(ctx):
            continue
        t0 = time.time()
        print(f"[{stage.name}] ...", flush=True)
        try:
            if stage.needs_floor and no_floor:
                raise MetricUnavailable(no_floor)
            result = stage.fn(ctx)
        except MetricUnavailable as exc:
            result = {"skipped": str(exc)}
            metrics["warnings"].append(f"{stage.name}: skipped — {exc}")
        if isinstance(result, tuple):
            result, raw[stage.name] = result
        metrics[stage.name] = result
        metrics["warnings"].extend(result.get("warnings", []) if isinstance(result, dict) else [])
        metrics["timings_s"][stage.name] = round(time.time() - t0, 2)
        print(f"[{stage.name}] done in {time.time() - t0:.1f} s", flush=True)
    return [k for k in STAGES if isinstance(metrics.get(k), dict) and "skipped" not in metrics[k]]


# ============================================================================ the stages, in running order
@register_stage("generation", metrics=("fid", "kid", "is"))
def generation(ctx: EvalContext) -> dict[str, Any]:
    """FID / KID / IS (+ FID-infinity) on Inception features, each beside its floor."""
    from metrics import inception as inc
    from metrics.generation import evaluate_generation
    d, o = ctx.data, ctx.options
    want = [m for m in STAGES["generation"].metrics if ctx.wants(m)]
    weights = inc.resolve_inception_weights(o.inception_weights)
    print(f"inception: {weights.note}")
    extractor = inc.create_extractor(weights, ctx.device)
    info: dict[str, Any] = {"weights": weights.as_dict()}
    if weights.mode == "offline":
        info["offline_check_max_abs_diff"] = inc.offline_forward_check(extractor)
    names = [inc.FEATURE, inc.LOGITS] if weights.has_logits else [inc.FEATURE]
    cache = inc.FeatureCache(o.cache_dir, weights, names)
    feats = {}
    for key, images in (("real", d["real_images"]), ("synthetic", d["syn_images"])):
        feats[key], hit = cache.get_or_compute(images, lambda: inc.extract_features(images, extractor, o.batch_size,
                                                                                    key))
        print(f"  {key}: {len(images)} images, features {'from cache' if hit else 'computed'} ({cache.path(images)})")
    if not weights.has_logits and "is" in want:
        info["is_unavailable"] = "the offline FID Inception has no classifier (logits): IS unavailable"
    res = evaluate_generation(feats, {"synthetic": d["syn_labels"], "real": d["real_labels"]}, d["real_groups"],
                              d["real_heldout"], o.floor_draws, o.seed, o.kid_subsets, want)
    return {**info, **res, "fid_method": "exact low-rank identity when N <= 2048 (equal to torch-fidelity's "
            "fid_statistics_to_metric, see tests), torch-fidelity's own function otherwise"}


@register_stage("similarity", metrics=("ssim", "diversity"))
def similarity(ctx: EvalContext):
    """Nearest-real SSIM and MS-SSIM diversity."""
    from metrics.similarity import evaluate_similarity
    d, o = ctx.data, ctx.options
    return evaluate_similarity(d["syn_images"], d["real_images"], d["real_heldout"], d["syn_labels"],
                               d["real_labels"], o.floor_draws, o.seed, o.ssim_top_k, o.diversity_pairs,
                               ctx.wants("ssim"), ctx.wants("diversity"))


@register_stage("morphology")
def morphology(ctx: EvalContext):
    """Tumour shape and contrast distributions per class."""
    from metrics.morphology import evaluate_morphology
    d, o = ctx.data, ctx.options
    return evaluate_morphology(d["syn_images"], d["syn_masks"], d["syn_labels"], d["real_images"], d["real_masks"],
                               d["real_labels"], d["real_groups"], d["real_heldout"], o.floor_draws, o.seed)


@register_stage("memorisation", needs_floor=False)
def memorisation(ctx: EvalContext):
    """Synthetic images too close to a training image (held-out images give the reference distances)."""
    from metrics.memorisation import evaluate_memorisation
    d = ctx.data
    real, held = d["real_images"], d["real_heldout"]
    return evaluate_memorisation(d["syn_images"], real[~held], real[held], d["syn_ids"], d["train_ids"],
                                 ctx.options.memorisation_threshold)


@register_stage("downstream", needs_floor=False,
                applies=lambda ctx: bool(ctx.options.baseline_run or ctx.options.combined_run))
def downstream(ctx: EvalContext) -> dict[str, Any]:
    """Mask-image alignment of the synthetic pairs (baseline segmenters) and the paired baseline-vs-combined
    comparison of segmentation runs."""
    from metrics.downstream import compare_runs, finalise_family
    from metrics.similarity import mask_alignment, predict_masks
    from models.loading import load_segmenter
    d, o = ctx.data, ctx.options
    out: dict[str, Any] = {}
    if o.baseline_run:
        preds = []
        for run in o.baseline_run:
            model, size = load_segmenter(run)
            preds.append(predict_masks(model, d["syn_images"], size, device=ctx.device))
        # several seeds: a pixel is predicted lesion when most seeds say so
        pred = (np.mean(preds, axis=0) > 0.5).astype(np.uint8)
        out["alignment"] = mask_alignment(d["syn_masks"], pred, d["syn_labels"])
    if o.baseline_run and o.combined_run:
        comp = compare_runs(list(o.baseline_run), list(o.combined_run), seed=o.seed)
        if "metrics" in comp:   # tumour Dice is the primary endpoint; the other metrics are Holm-adjusted
            out["multiplicity"] = finalise_family({"combined - baseline": comp}, "combined - baseline")
        out["comparison"] = comp
    elif o.combined_run:
        out["comparison"] = {"skipped": "--combined_run needs --baseline_run to compare against"}
    from metrics.seg_eval import run_warnings
    out["warnings"] = run_warnings([*(o.baseline_run or []), *(o.combined_run or [])])   # a run that predicts nothing
    for w in out["warnings"]:
        print(w)
    return out
