"""training/schedules.py: diffusers' shapes step for step, the same shapes over a time budget, warm-up-stable-decay,
and a budget-ended training run whose rate reaches zero at the budget."""
import json

import pytest
import torch
from diffusers.optimization import get_scheduler

import train_medsegdiff
from training.schedules import make_lr_schedule
from test_train_medsegdiff import TINY_MODEL, make_dataset

PEAK = 1e-3


def rates(sched, steps):
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def optimiser():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)


@pytest.mark.parametrize("shape", ["cosine", "linear", "constant_with_warmup"])
def test_step_limited_schedules_equal_diffusers(shape):
    ours = rates(make_lr_schedule(optimiser(), shape, warmup_steps=10, total_steps=100), 100)
    theirs = rates(get_scheduler(shape, optimiser(), num_warmup_steps=10, num_training_steps=100), 100)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert ours[5] == pytest.approx(PEAK * 0.5)            # half-way through the warm-up


def test_budget_drives_the_decay_when_it_ends_the_run_first():
    clock = {"spent": 0.0}
    sched = make_lr_schedule(optimiser(), "cosine", warmup_steps=0, total_steps=10**7,
                             budget_fraction=lambda: clock["spent"])
    seen = []
    for spent in (0.0, 0.25, 0.5, 0.75, 1.0):
        clock["spent"] = spent
        sched.optimizer.step()
        sched.step()
        seen.append(sched.get_last_lr()[0] / PEAK)
    # by steps alone 10^7 steps would keep the rate at its peak; the budget fraction wins
    assert seen == pytest.approx([1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5), 0.0], abs=1e-6)
    # and the step fraction wins when the steps end the run first
    sched = make_lr_schedule(optimiser(), "linear", warmup_steps=0, total_steps=4, budget_fraction=lambda: 0.0)
    assert [r / PEAK for r in rates(sched, 4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly_to_zero():
    sched = make_lr_schedule(optimiser(), "warmup_stable_decay", warmup_steps=5, total_steps=105, decay_fraction=0.2)
    r = [x / PEAK for x in rates(sched, 106)]
    assert r[:5] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert all(x == 1.0 for x in r[5:85])                  # progress (step - 5) / 100 below 0.8: the peak
    assert r[95] == pytest.approx(0.5) and r[105] == 0.0   # then linear: half-way, and zero at the last step
    assert all(a >= b for a, b in zip(r[85:], r[86:]))
    with pytest.raises(ValueError, match="decay_fraction"):
        make_lr_schedule(optimiser(), "warmup_stable_decay", 0, 10, decay_fraction=0.0)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        make_lr_schedule(optimiser(), "step", 0, 10)


def test_budget_ended_run_decays_to_zero_at_its_budget(tmp_path):
    data16, out = make_dataset(tmp_path / "pairs16"), tmp_path / "run"
    train_medsegdiff.main(["--data_dir", data16, "--output_dir", str(out), *TINY_MODEL, "--log_every", "1",
                           "--max_steps", "100000", "--warmup_steps", "0", "--budget_minutes", "0.02",
                           "--budget_clock", "cpu", "--lr_scheduler", "cosine", "--lr", "1e-3"])
    recs = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "lr" in r]
    assert len(lrs) >= 5 and lrs[0] > 0.9e-3                # the first steps at the peak
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))        # falling with the clock
    assert lrs[-1] < 0.1e-3                                 # near zero when the budget ends the run
    assert "training budget of 0.02 minutes reached" in (out / "log.txt").read_text()


def test_a_resumed_run_with_a_longer_budget_says_where_its_decay_continues_from(tmp_path):
    data16, out = make_dataset(tmp_path / "pairs16"), tmp_path / "run"
    common = ["--data_dir", data16, "--output_dir", str(out), *TINY_MODEL, "--max_steps", "100000",
              "--warmup_steps", "0", "--budget_clock", "cpu", "--lr_scheduler", "cosine", "--lr", "1e-3"]
    train_medsegdiff.main([*common, "--budget_minutes", "0.01"])
    train_medsegdiff.main([*common, "--budget_minutes", "0.02"])
    log = (out / "log.txt").read_text()
    # half of the new budget was spent: cosine continues from about half its peak, not from where it had ended
    line = next(s for s in log.splitlines() if "note: the budget changed from 0.01 to 0.02 minutes" in s)
    assert 0.3 < float(line.split("continues from ")[1].split(" of its peak")[0]) < 0.7
    recs = [json.loads(s) for s in (out / "stats.jsonl").read_text().splitlines()]
    assert recs[-1]["lr"] < 0.1e-3                         # and reaches zero again at the new budget's end
