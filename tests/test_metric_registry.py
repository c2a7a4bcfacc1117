"""The evaluation's stage registry (metrics/registry.py): one --skip vocabulary, stage names and the metric names
inside them, and the runner that records a stage that cannot be computed instead of stopping."""
from __future__ import annotations

import pytest

from metrics import registry as R
from metrics.floors import MetricUnavailable


def test_skip_vocabulary_is_the_stage_names_plus_the_old_metric_names():
    assert list(R.STAGES) == ["generation", "similarity", "morphology", "memorisation", "downstream"]
    old = {"fid", "kid", "is", "ssim", "diversity", "morphology", "memorisation", "downstream"}
    assert old | set(R.STAGES) == set(R.skip_names()) and len(R.skip_names()) == len(set(R.skip_names()))


def test_resolve_skip_expands_stage_names():
    assert R.resolve_skip(["generation"]) == R.resolve_skip(["fid", "kid", "is"]) == {"fid", "kid", "is"}
    assert R.resolve_skip(["similarity", "downstream"]) == {"ssim", "diversity", "downstream"}
    assert R.stage_enabled("generation", R.resolve_skip(["fid", "kid"]))           # IS still wanted
    assert not R.stage_enabled("generation", R.resolve_skip(["fid", "kid", "is"]))
    with pytest.raises(ValueError, match="unknown stage.*colour"):
        R.resolve_skip(["fid", "colour"])


def test_options_from_flags():
    o = R.EvalOptions.from_mapping({"seed": 3, "baseline_run": ["a", "b"], "combined_run": None, "other": 1})
    assert (o.seed, o.baseline_run, o.combined_run, o.floor_draws) == (3, ("a", "b"), (), 5)


def test_run_stages_records_skips_and_timings(monkeypatch):
    calls = []

    def fake(name, raises=False):
        def fn(ctx):
            calls.append(name)
            if raises:
                raise MetricUnavailable("too few images")
            return ({"value": 1, "warnings": [f"{name} warns"]}, {"raw": name})
        return fn

    stages = {n: R.Stage(n, fake(n, raises=n == "morphology"), s.metrics, s.needs_floor, s.applies)
              for n, s in R.STAGES.items()}
    monkeypatch.setattr(R, "STAGES", stages)
    metrics, raw = {"warnings": [], "timings_s": {}}, {}
    ctx = R.EvalContext({}, skipped=R.resolve_skip(["similarity"]))
    ran = R.run_stages(ctx, metrics, raw)
    assert calls == ["generation", "morphology", "memorisation"]       # downstream: no segmentation runs given
    assert ran == ["generation", "memorisation"] and set(raw) == {"generation", "memorisation"}
    assert metrics["morphology"] == {"skipped": "too few images"}
    assert "morphology: skipped — too few images" in metrics["warnings"] and "generation warns" in metrics["warnings"]
    assert set(metrics["timings_s"]) == {"generation", "morphology", "memorisation"}
    calls.clear()
    metrics = {"warnings": [], "timings_s": {}}
    ran = R.run_stages(R.EvalContext({}), metrics, {}, no_floor="2 held-out images")
    assert calls == ["memorisation"] and ran == ["memorisation"]       # the others need the floor
    assert metrics["generation"] == {"skipped": "2 held-out images"}
