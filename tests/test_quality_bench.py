"""bench/quality.py --quick: the whole time-to-realism path (train recipes on a CPU-minute budget with snapshots,
draw, KID/FID beside the real-vs-real floor, morphology, nearest SSIM, grids, report, scaling fit) on a phantom."""
import json
import os
import subprocess
import sys
import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench/quality.py", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_quick_path_writes_the_promised_json(tmp_path):
    """Trained and drawn in one invocation (as on a GPU machine without the Inception weights), measured and
    reported in another that draws nothing again."""
    work = tmp_path / "q"
    res = run("--quick", "--work_dir", str(work), "--phases", "train,draw")
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    drawn = work / "eval" / "edm" / "min0.04_ema0.999"
    assert (drawn / "draw.json").is_file() and not (drawn / "metrics.json").exists()
    draw = json.loads((drawn / "draw.json").read_text())
    assert sum(draw["counts"].values()) == 24 and draw["steps"] > 0 and draw["device"] == "cpu"
    samples = sorted((drawn / "samples" / "images").glob("*.png"))
    assert len(samples) == 24
    stamps = [p.stat().st_mtime_ns for p in samples]
    res = run("--quick", "--work_dir", str(work), "--phases", "evaluate,report")
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    assert [p.stat().st_mtime_ns for p in sorted((drawn / "samples" / "images").glob("*.png"))] == stamps
    assert json.loads((drawn / "metrics.json").read_text())["steps"] == draw["steps"]
    q = json.loads((work / "quality.json").read_text())
    for key in ("budget_minutes", "n_samples", "kid_floor", "recipes", "kid_ratio_winner_vs_current",
                "kid_ratio_winner_vs_peer", "scaling"):
        assert key in q, key
    assert set(q["recipes"]) == {"current", "peer", "edm"}
    for name, rec in q["recipes"].items():
        for key in ("kid", "kid_std", "fid", "fid_floor", "morphology_w1", "steps", "flops"):
            assert rec[key] is not None, (name, key)
        assert rec["steps"] > 0 and rec["flops"] == rec["steps"] * rec["step_flops"] > 0
        assert 0 < rec["kid"] < 1 and rec["fid"] > rec["fid_floor"] > 0   # an untrained model is far from real
        assert set(rec["by_budget"]) == {"0.02", "0.04"}
    assert q["kid_floor"] < min(r["kid"] for r in q["recipes"].values())
    sc = q["scaling"]
    assert [p["minutes"] for p in sc["points"]] == [0.02, 0.04] and sc["fit"]["n_points"] == 2
    # a line through two points fits exactly: no extrapolation is made from it
    assert sc["predicted_flops_to_floor"] is None and "fewer than three points" in sc["note"]
    assert (work / "quality_kid.png").is_file()
    assert (work / "eval" / "edm" / "min0.04_ema0.999" / "grid.png").is_file()
    # snapshots at each budget, the budget clock in the checkpoint, nothing retrained on a rerun
    snap = work / "runs" / "current" / "snapshots"
    assert sorted(p.name for p in snap.glob("*.pth")) == ["min0.02.pth", "min0.04.pth"]
    before = (work / "runs" / "current" / "stats.jsonl").read_text()
    again = run("--quick", "--work_dir", str(work), "--phases", "train,evaluate")
    assert again.returncode == 0 and "start train" not in again.stdout and "start evaluate" not in again.stdout
    assert (work / "runs" / "current" / "stats.jsonl").read_text() == before


def test_bad_input_is_one_line(tmp_path):
    res = run("--recipes", "nonsense", "--work_dir", str(tmp_path))
    assert res.returncode == 2 and res.stderr.startswith("error: --recipes: unknown nonsense")
    res = run("--device", "tpu", "--work_dir", str(tmp_path))
    assert res.returncode == 2 and "--device: cpu, cuda or cuda:N" in res.stderr
    data = tmp_path / "d128"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"img_size": 128}))
    res = run("--data_dir", str(data), "--work_dir", str(tmp_path), "--phases", "evaluate")
    assert res.returncode == 2 and "prepared at 128 px, but --img_size is 64" in res.stderr
    res = run("--samplers", "dpm:x", "--work_dir", str(tmp_path), "--phases", "samplers")
    assert res.returncode == 2 and "SAMPLER:STEPS:GUIDANCE" in res.stderr


def test_a_failed_task_does_not_stop_the_others(tmp_path):
    """Recipes are independent: one that fails (as the peer did on a lent GPU, at import) must not cost the others
    their run; the failures are returned for main to report after the later phases."""
    sys.path.insert(0, str(ROOT))
    from bench import quality

    ok = [sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'a').write('x')"]
    bad = [sys.executable, "-c", "raise SystemExit(1)"]
    failed = quality.run_tasks([("bad", bad, tmp_path / "bad.log"), ("ok 1", ok, tmp_path / "ok1.log"),
                                ("ok 2", ok, tmp_path / "ok2.log")], jobs=1, threads=1)
    assert failed == ["bad"] and (tmp_path / "ran").read_text() == "xx"


def test_a_gpu_benchmark_trains_on_the_wall_clock_of_its_device(tmp_path):
    """On a GPU the CPU-minute clock does not see the work, so the budget is wall minutes there; the CPU benchmark
    keeps its CPU minutes; FLOPs are counted at the benchmark's image size."""
    sys.path.insert(0, str(ROOT))
    from bench import quality
    from bench.quality_report import recipe_step_flops

    cpu = quality.Setup(tmp_path, tmp_path, 500, False, 1)
    gpu = quality.Setup(tmp_path, tmp_path, 500, False, 1, img_size=128, device="cuda")
    argv = quality.train_argv(gpu, "current", [1.5, 3])
    assert argv[argv.index("--budget_clock") + 1] == "wall" and argv[argv.index("--device") + 1] == "cuda"
    argv = quality.train_argv(cpu, "current", [15, 30])
    assert argv[argv.index("--budget_clock") + 1] == "cpu" and argv[argv.index("--device") + 1] == "cpu"
    # 4x the pixels: ~4x the FLOPs (the per-sample parts that do not grow with the image keep it just under 4)
    assert 3.9 < recipe_step_flops(gpu, "current") / recipe_step_flops(cpu, "current") < 4.1


def test_recipes_resolve_to_the_benchmarked_baseline_whatever_the_preset_became(tmp_path):
    """The preset has since taken the signed-distance mask; the committed rows were trained with the binary mask, so
    rerunning `current` (or any recipe that does not name the mask) must still train the binary one."""
    sys.path.insert(0, str(ROOT))
    from bench.quality_recipes import PRESET, RECIPES, Setup
    from common.cli import config_from_flags
    from training.config import DiffusionTrainConfig

    s = Setup(tmp_path, tmp_path, 500, False, 1)

    def resolved(*flags):
        return config_from_flags(DiffusionTrainConfig, ["--config", str(ROOT / PRESET), *flags]).diffusion

    assert resolved().mask_encoding == "sdf"                        # the preset itself
    for name in ("current", "current_seed1", "current_seed2", "attn_none", "peer", "mask_scaled", "lr1e-3"):
        d = resolved(*s.recipe_flags(name))
        assert d.mask_encoding == "binary", name
    assert resolved(*s.recipe_flags("mask_scaled")).mask_scale == 0.5
    for name in ("mask_sdf", "mask_sdf_seed1", "mask_sdf_seed2", "lr1e-3_sdf"):
        d = resolved(*s.recipe_flags(name))
        assert d.mask_encoding == "sdf" and d.sdf_width == 8.0, name
    assert set(RECIPES) >= {"current_seed2", "mask_sdf_seed2"}


def test_a_recipe_whose_rate_decays_over_the_budget_is_a_point_at_the_largest_budget_only(tmp_path):
    """lr_cosine's snapshot at 15 of a 60-minute run is mid-decay, not a 15-minute cosine run: it trains to the
    largest budget with that one snapshot, its schedule reaches the run's flags, and a run started for another
    budget is refused rather than continued with a restarted decay."""
    sys.path.insert(0, str(ROOT))
    from bench import quality
    from bench.quality_recipes import PRESET
    from common.cli import config_from_flags
    from training.config import DiffusionTrainConfig

    s = quality.Setup(tmp_path / "data", tmp_path / "work", 500, False, 1)
    assert s.recipe_budgets("lr_cosine", [15, 30, 60]) == [60] and s.recipe_budgets("current", [15, 60]) == [15, 60]
    argv = quality.train_argv(s, "lr_wsd", s.recipe_budgets("lr_wsd", [15, 30, 60]))
    assert argv[argv.index("--snapshot_minutes") + 1] == "60" and argv[argv.index("--budget_minutes") + 1] == "60"
    optim = config_from_flags(DiffusionTrainConfig, ["--config", str(ROOT / PRESET), *argv[2:]]).optim
    assert (optim.lr_scheduler, optim.lr_decay_fraction) == ("warmup_stable_decay", 0.25)
    run = s.run_dir("lr_cosine")
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"budget_minutes": 30.0}))
    args = quality.build_parser().parse_args(["--jobs", "1"])
    with pytest.raises(quality.UserError, match="started for 30 minutes, not 60"):
        quality.train(args, s, ["lr_cosine"], [15, 30, 60])
    with pytest.raises(quality.UserError, match="started for 30 minutes, not 60"):   # one budget asked: the same
        quality.train(args, s, ["lr_cosine"], [60])


def test_an_extra_ema_equal_to_the_preset_ema_is_not_a_second_result(tmp_path):
    """Under the warm-up cap, decays 0.999 and 0.998 are the same weights until step 4490: the benchmark must not
    evaluate and report them as two EMA lengths; a decay the cap lets through (0.99 after 890 steps) differs."""
    import torch
    from torch import nn
    sys.path.insert(0, str(ROOT))
    from bench import quality
    from common.checkpoint import save_checkpoint
    from training.ema import EMA

    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    emas = {d: EMA(model, decay=d) for d in (0.999, 0.998, 0.99)}
    for _ in range(1200):
        with torch.no_grad():
            model.weight.add_(0.01 * torch.randn_like(model.weight))
        for e in emas.values():
            e.update(model)
    ckpt = {"kind": "diffusion", "step": 1200, "ema": emas[0.999].module.state_dict(),
            "extra_emas": {"0.998": emas[0.998].module.state_dict(), "0.99": emas[0.99].module.state_dict()}}
    why = quality.same_as_primary(ckpt, "0.998")
    assert why and "step 1200" in why and "0.99256" in why   # (1 + 1200) / (10 + 1200)
    assert quality.same_as_primary(ckpt, "0.99") is None
    snap = tmp_path / "min1.pth"
    save_checkpoint(snap, ckpt)
    assert quality.extra_ema_skip(snap, "0.998") == why
    assert "not in the snapshot" in quality.extra_ema_skip(snap, "0.995")
    assert quality.extra_ema_skip(snap, "0.99") is None


def metrics(path, minutes, kid, n, steps, sampler=None, ema="0.999", w1=0.5, wall_s=None, machine=None):
    """One evaluation's metrics.json as the evaluate phase writes it."""
    path.mkdir(parents=True)
    rec = {"minutes": minutes, "ema": ema, "kid": kid, "kid_std": 0.002, "kid_floor": 0.0003,
           "kid_floor_std": 0.0005, "fid": 90.0, "fid_floor": 28.5, "morphology_w1": w1,
           "morphology_w1_floor": 0.09, "nearest_train_ssim": 0.3, "nearest_train_ssim_floor": 0.3,
           "steps": steps, "train_cpu_s": 60.0 * minutes, "n": n, "per_class": {}, "sampling_seconds": 0.5 * n,
           "s_per_sample": 0.5, "train_wall_s": wall_s, "train_machine": machine}
    if sampler:
        rec["sampler"] = sampler
    (path / "metrics.json").write_text(json.dumps(rec))


def test_report_puts_the_default_draw_beside_the_sampler_variants_and_extrapolates_in_cpu_minutes(tmp_path, capsys):
    """The samplers table compares draws at the same N only, takes the evaluate phase's draw as the default sampler's
    row (not drawn twice), and the scaling block states its extrapolation in FLOPs and in this machine's minutes."""
    import argparse
    sys.path.insert(0, str(ROOT))
    from bench import quality

    work = tmp_path / "w"
    ev = work / "eval" / "current"
    metrics(ev / "min15_ema0.999", 15, 0.096, 500, 1000)
    metrics(ev / "min30_ema0.999", 30, 0.090, 500, 2000)
    metrics(ev / "min60_ema0.999", 60, 0.080, 500, 4000)
    metrics(ev / "min60_ema0.999_ddim-50-1.5", 60, 0.075, 500, 4000, {"name": "ddim", "steps": 50, "guidance": 1.5})
    args = argparse.Namespace(headline_budget=60.0, winner="current", output=str(tmp_path / "q.json"))
    s = quality.Setup(tmp_path / "data", work, 500, False, 1)
    res = quality.report(args, s, ["current"])
    group = res["samplers"]["current 60 min"]
    assert set(group) == {"ddim-50 guidance 1.5", "dpmsolver++-20 guidance 1.5 (default)"}
    assert group["dpmsolver++-20 guidance 1.5 (default)"]["kid"] == 0.080 and all(v["n"] == 500 for v in group.values())
    sc = res["scaling"]
    assert [p["minutes"] for p in sc["points"]] == [15, 30, 60] and sc["fit"]["slope"] < 0
    per_min = sc["points"][-1]["flops"] / 60
    assert abs(sc["predicted_cpu_minutes_to_kid_0.01"] * per_min - sc["predicted_flops_to_kid_0.01"]) < 1e-6 * \
        sc["predicted_flops_to_kid_0.01"]
    assert sc["kid_0.01_within_a_2_core_day"] is False   # a slope this shallow needs far more than 2880 minutes
    out = capsys.readouterr().out
    assert "| sampler (current 60 min, N = 500)" in out and "| current | 0.0960 (1000 steps)" in out
    assert quality.is_default_sampler("dpmsolver++:20:1.5") and not quality.is_default_sampler("dpmsolver++:50:1.5")


def test_report_states_the_seed_spread_and_the_ema_lengths(tmp_path, capsys):
    """The baseline trained at more seeds gives the yardstick (KID's range over the seeds) per budget; extra EMA
    lengths evaluated on one snapshot are tabulated side by side; budgets where one seed is missing are left out."""
    import argparse
    sys.path.insert(0, str(ROOT))
    from bench import quality

    work = tmp_path / "w"
    metrics(work / "eval" / "current" / "min30_ema0.999", 30, 0.0913, 500, 2200)
    metrics(work / "eval" / "current" / "min15_ema0.999", 15, 0.0966, 500, 1100)
    metrics(work / "eval" / "current_seed1" / "min30_ema0.999", 30, 0.0950, 500, 2180, w1=0.45)
    metrics(work / "eval" / "current_seed1" / "min30_ema0.99", 30, 0.0990, 500, 2180, ema="0.99")
    metrics(work / "eval" / "current_seed1" / "min30_emastd0.15", 30, 0.0890, 500, 2180, ema="std0.15")
    metrics(work / "eval" / "current_seed2" / "min30_ema0.999", 30, 0.0930, 500, 2190, w1=0.48)
    metrics(work / "eval" / "attn_none" / "min30_ema0.999", 30, 0.0900, 500, 2200, wall_s=3600.0,
            machine={"load_1min_mean": 2.1, "probe_gflops_mean": 160.0, "samples": 44})
    args = argparse.Namespace(headline_budget=30.0, winner="", output=str(tmp_path / "q.json"))
    res = quality.report(args, quality.Setup(tmp_path / "data", work, 500, False, 1),
                         ["current", "current_seed1", "current_seed2", "attn_none"])
    spread = res["seed_spread"]["current"]
    assert list(spread) == ["30"]                      # 15 min: no second seed there
    assert spread["30"]["recipes"] == ["current", "current_seed1", "current_seed2"]   # all three seeds, once
    assert abs(spread["30"]["kid_range"] - 0.0037) < 1e-9 and spread["30"]["steps"] == [2200, 2180, 2190]
    mean = (0.0913 + 0.0950 + 0.0930) / 3
    sd = (sum((k - mean) ** 2 for k in (0.0913, 0.0950, 0.0930)) / 2) ** 0.5
    assert abs(spread["30"]["seed_sd_estimate"] - sd) < 1e-9 and abs(spread["30"]["kid_mean"] - mean) < 1e-12
    assert spread["30"]["morphology_w1"] == [0.5, 0.45, 0.48]  # the lesion-shape yardstick beside KID's
    best = res["best_at_headline_budget"]         # the lowest KID at 30 min leads current by 0.0013 < 0.0037
    assert best["recipe"] == "attn_none" and abs(best["kid_ratio_vs_current"] - 0.0900 / 0.0913) < 1e-12
    assert best["kid_ratio_vs_peer"] is None and best["lead_over_current_exceeds_seed_spread"] is False
    assert abs(best["kid_ratio_vs_current_seed_mean"] - 0.0900 / mean) < 1e-12   # against all three seeds
    # the conditions each evaluation trained under: CPU seconds per step, share of the wall clock, recorded load
    head = res["recipes"]["attn_none"]
    assert head["cpu_s_per_step"] == pytest.approx(1800.0 / 2200) and head["cpu_share"] == pytest.approx(0.5)
    assert head["train_load_1min_mean"] == 2.1 and head["train_probe_gflops_mean"] == 160.0
    old_run = res["recipes"]["current"]             # runs from before the machine log: the share is unknown, not 0
    assert old_run["cpu_share"] is None and old_run["train_load_1min_mean"] is None
    out = capsys.readouterr().out
    # a column for each EMA length evaluated anywhere (a power-function EMA here), none for the others
    assert "| recipe, budget | EMA 0.999 | EMA 0.99 | EMA std0.15 |" in out
    assert "| current_seed1, 30 min | 0.0950 ± 0.0020 | 0.0990 ± 0.0020 | 0.0890 ± 0.0020 |" in out
    assert "range 0.0037" in out and "lesion-shape W1 0.500, 0.450, 0.480" in out
    assert f"Lowest KID at 30 min: attn_none 0.0900 (0.99x current, {0.0900 / mean:.2f}x current seed mean)" in out
    assert "| attn_none | 30 | 2200 | 0.0900 ± 0.0020 |" in out and "| 0.818 (0.50) |" in out


def test_report_carries_over_an_earlier_reports_evaluations_only_when_they_compare(tmp_path, capsys):
    """A work folder lost (a new machine): the report regenerated with --carry_over keeps the earlier report's
    evaluations of the recipes asked for (marked) that the work folder has not evaluated, whole recipes only (a
    recipe the work folder has is its own run, never mixed with an older run's budgets), keeps their sampler
    groups, and refuses an earlier report measured against another real-data floor."""
    import argparse
    sys.path.insert(0, str(ROOT))
    from bench import quality
    from common.errors import UserError

    old = tmp_path / "old"
    metrics(old / "eval" / "current" / "min30_ema0.999", 30, 0.0913, 500, 2200)
    metrics(old / "eval" / "current" / "min60_ema0.999", 60, 0.0759, 500, 4383)
    metrics(old / "eval" / "current" / "min60_ema0.999_ddim-50-1.5", 60, 0.075, 500, 4383,
            {"name": "ddim", "steps": 50, "guidance": 1.5})
    metrics(old / "eval" / "peer" / "min60_ema0.999", 60, 0.0800, 500, 4000, wall_s=4000.0,
            machine={"load_1min_mean": 2.0, "probe_gflops_mean": 150.0, "samples": 9})
    metrics(old / "eval" / "small" / "min60_ema0.999", 60, 0.0700, 500, 9000)   # an older run of small: the
    metrics(old / "eval" / "small" / "min30_ema0.999", 30, 0.0800, 500, 4500)   # new run below replaces it whole
    first = str(tmp_path / "first.json")
    before = quality.report(argparse.Namespace(headline_budget=60.0, winner="current", output=first),
                            quality.Setup(tmp_path / "data", old, 500, False, 1), ["current", "peer", "small"])
    new = tmp_path / "new"                     # a new machine: only the new runs' evaluations are here
    metrics(new / "eval" / "small" / "min60_ema0.999", 60, 0.0650, 500, 9500)
    metrics(new / "eval" / "current_seed4" / "min60_ema0.999", 60, 0.0850, 500, 3000)
    s = quality.Setup(tmp_path / "data", new, 500, False, 1)
    args = argparse.Namespace(headline_budget=60.0, winner="current", output=str(tmp_path / "second.json"),
                              carry_over=first)
    res = quality.report(args, s, ["current", "current_seed4", "peer", "small"])
    assert set(res["recipes"]) == {"current", "current_seed4", "peer", "small"}
    assert res["recipes"]["small"]["kid"] == 0.0650 and "carried_over" not in res["recipes"]["small"]   # own wins
    assert list(res["recipes"]["small"]["by_budget"]) == ["60"]          # not the older run's 30 minutes
    cur = res["recipes"]["current"]["by_budget"]
    assert cur["30"]["0.999"]["kid"] == 0.0913 and cur["60"]["0.999"]["carried_over"] is True
    for key in ("kid", "steps", "flops", "cpu_s_per_step", "fid", "morphology_w1"):    # carried unchanged
        assert cur["60"]["0.999"][key] == before["recipes"]["current"]["by_budget"]["60"]["0.999"][key]
    assert res["recipes"]["peer"]["train_probe_gflops_mean"] == 150.0
    assert res["carried_over"]["evaluations"] == 3 and res["carried_over"]["from"] == first
    assert res["carried_over"]["recipes"] == ["current", "peer"]
    assert res["samplers"] == before["samplers"]
    assert res["seed_spread"]["current"]["60"]["recipes"] == ["current", "current_seed4"]
    assert res["kid_ratio_winner_vs_peer"] == pytest.approx(0.0759 / 0.0800)
    # only the recipes asked for are carried
    only = quality.report(argparse.Namespace(headline_budget=60.0, winner="", output=str(tmp_path / "third.json"),
                                             carry_over=first), s, ["small"])
    assert set(only["recipes"]) == {"small"} and only["carried_over"]["evaluations"] == 0
    # another real-data floor (another preparation of the data): refused, nothing written
    other = json.loads(Path(first).read_text())
    other["kid_floor"] = 0.0009
    Path(first).write_text(json.dumps(other))
    args.output = str(tmp_path / "fourth.json")
    with pytest.raises(UserError, match="real-data KID floor 0.0009"):
        quality.report(args, s, ["current", "small"])
    assert not Path(args.output).exists()
    args.carry_over = str(tmp_path / "missing.json")
    with pytest.raises(UserError, match="not a report JSON"):
        quality.report(args, s, ["current"])
    capsys.readouterr()


def test_the_train_phase_warns_when_the_jobs_oversubscribe_the_cores():
    """The CPU-minute clock buys fewer steps when more threads run than there are cores: the train phase says so."""
    sys.path.insert(0, str(ROOT))
    from bench import quality
    assert quality.oversubscription(2, 1, 2) == "" and quality.oversubscription(1, 2, 2) == ""
    assert quality.oversubscription(4, 1, None) == ""          # unknown core count: nothing to say
    warning = quality.oversubscription(4, 1, 2)
    assert warning.startswith("warning: 4 jobs x 1 threads on 2 cores") and "fewer" in warning


def test_report_fits_the_scaling_curve_again_for_every_run_with_four_budgets_and_pools_the_seeds(tmp_path, capsys):
    """The headline scaling fit is one run's curve; every run evaluated at four or more budgets gets its own fit
    (with its FLOPs to KID 0.01 in its own minutes), every seed of the winner one pooled fit, and the range of the
    seeds' FLOPs to KID 0.01 is stated."""
    import argparse
    sys.path.insert(0, str(ROOT))
    from bench import quality

    work = tmp_path / "w"
    for m, k, n in ((15, 0.096, 1000), (30, 0.090, 2000), (60, 0.080, 4000), (120, 0.066, 8000)):
        metrics(work / "eval" / "current" / f"min{m}_ema0.999", m, k, 500, n)
    for m, k, n in ((15, 0.100, 800), (30, 0.091, 1600), (60, 0.077, 3200), (120, 0.060, 6400)):
        metrics(work / "eval" / "current_seed5" / f"min{m}_ema0.999", m, k, 500, n)
    for m, k, n in ((15, 0.097, 790), (30, 0.085, 1600), (60, 0.091, 3180)):   # three budgets: pooled only
        metrics(work / "eval" / "current_seed4" / f"min{m}_ema0.999", m, k, 500, n)
    for m, k, n in ((15, 0.098, 2000), (30, 0.095, 4000), (60, 0.074, 8000), (120, 0.056, 16000)):
        metrics(work / "eval" / "small_seed5" / f"min{m}_ema0.999", m, k, 500, n)
    args = argparse.Namespace(headline_budget=60.0, winner="current", output=str(tmp_path / "q.json"))
    setup = quality.Setup(tmp_path / "data", work, 500, False, 1)
    res = quality.report(args, setup, ["current", "current_seed4", "current_seed5", "small_seed5"])
    sc = res["scaling"]
    assert list(sc["by_recipe"]) == ["current", "current_seed5", "small_seed5"]   # seed 4: three budgets only
    assert sc["pooled_seeds"]["n_points"] == 11 and sc["pooled_seeds"]["recipes"] == ["current", "current_seed4",
                                                                                       "current_seed5"]
    head = sc["predicted_flops_to_kid_0.01"]
    assert sc["by_recipe"]["current"]["predicted_flops_to_kid_0.01"] == head   # the headline fit, again
    other = sc["by_recipe"]["current_seed5"]["predicted_flops_to_kid_0.01"]
    assert sc["predicted_flops_to_kid_0.01_range_over_seeds"] == [min(head, other), max(head, other)] and head != other
    # seed 5's curve falls faster (0.100 -> 0.060 over 8x the steps) than seed 0's (0.096 -> 0.066)
    assert sc["by_recipe"]["current_seed5"]["fit"]["slope"] < sc["by_recipe"]["current"]["fit"]["slope"] < 0
    small = sc["by_recipe"]["small_seed5"]   # in its own minutes: its FLOPs per minute at 120
    per_min = res["recipes"]["small_seed5"]["by_budget"]["120"]["0.999"]["flops"] / 120
    assert abs(small["predicted_cpu_minutes_to_kid_0.01"] * per_min - small["predicted_flops_to_kid_0.01"]) < \
        1e-6 * small["predicted_flops_to_kid_0.01"]
    out = capsys.readouterr().out
    assert "Scaling (KID ~ FLOPs^slope, an extrapolation): current: slope" in out and "pooled over current, " in out
    # the winner alone: nothing beyond the headline fit
    alone = quality.report(args, setup, ["current"])
    assert not {"by_recipe", "pooled_seeds"} & set(alone["scaling"])
