"""common/machine.py: the machine-state samples a training run records beside its step counts."""
import pytest
import torch

from common.machine import MachineLog, machine_stats, matmul_gflops


def test_the_probe_measures_a_positive_speed_without_touching_the_random_stream():
    before = torch.get_rng_state()
    speed = matmul_gflops(n=64, reps=3)
    assert speed > 0 and torch.equal(before, torch.get_rng_state())


def test_a_cpu_sample_has_the_load_and_the_probe():
    s = machine_stats(torch.device("cpu"))
    assert s["probe_gflops"] > 0 and s["load_1min"] >= 0


def test_the_log_averages_each_quantity_over_its_own_samples_and_resumes():
    log = MachineLog()
    assert log.summary() == {"load_1min_mean": None, "probe_gflops_mean": None, "samples": 0}
    log.add({"load_1min": 2.0, "probe_gflops": 100.0})
    log.add({"load_1min": 4.0})                     # a GPU run samples only the load
    again = MachineLog()
    again.load_state_dict(log.state_dict())
    again.add({"load_1min": 3.0, "probe_gflops": 200.0})
    assert again.summary() == {"load_1min_mean": pytest.approx(3.0), "probe_gflops_mean": pytest.approx(150.0),
                               "samples": 3}
    old = MachineLog()
    old.load_state_dict({})                         # a checkpoint from before the log existed
    assert old.summary()["samples"] == 0
