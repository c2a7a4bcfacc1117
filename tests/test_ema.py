"""training/ema.py: the warm-up EMA and the power-function EMA (EDM2) average the weights they are said to."""
import math

import pytest
import torch
from torch import nn

from training.ema import EMA, MAX_POWER_STD, PowerEMA, power_gamma, steps_until_decay, warmup_cap


def scalar_model(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def run(ema, values):
    model = scalar_model(0.0)
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
    return float(ema.module.weight)


@pytest.mark.parametrize("std", [0.05, 0.1, 0.2, MAX_POWER_STD])
def test_power_gamma_has_the_requested_width(std):
    g = power_gamma(std)
    assert g >= 0
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(std, rel=1e-9)


@pytest.mark.parametrize("std", [0.0, -0.1, 0.3, float("nan")])
def test_power_gamma_refuses_widths_without_a_profile(std):
    with pytest.raises(ValueError, match="sigma_rel"):
        power_gamma(std)


@pytest.mark.parametrize("std", [0.05, 0.15, 0.25])
def test_power_ema_is_the_power_weighted_average_of_the_trajectory(std):
    # after T updates the power EMA is sum_t w_t theta_t with w_t = (t^(g+1) - (t-1)^(g+1)) / T^(g+1): weights that
    # grow like t^g and sum to one, whatever the starting weights
    values = torch.linspace(-3, 5, 40, dtype=torch.float64).tolist()
    ema = PowerEMA(scalar_model(123.0), std=std)
    got = run(ema, values)
    g, T = ema.gamma, len(values)
    w = [(t ** (g + 1) - (t - 1) ** (g + 1)) / T ** (g + 1) for t in range(1, T + 1)]
    assert sum(w) == pytest.approx(1.0)
    assert got == pytest.approx(sum(wi * v for wi, v in zip(w, values)), rel=1e-5, abs=1e-5)
    assert ema.num_updates == T


def test_wider_power_emas_reach_further_back():
    values = [0.0] * 50 + [1.0] * 50   # the weights jump half way: a longer average remembers the first half more
    got = [run(PowerEMA(scalar_model(0.0), std=s), values) for s in (0.05, 0.1, 0.2)]
    assert 1.0 > got[0] > got[1] > got[2] > 0.5


def test_power_ema_state_round_trip_continues_the_average():
    values = [float(v) for v in range(1, 21)]
    whole = run(PowerEMA(scalar_model(0.0), std=0.1), values)
    first = PowerEMA(scalar_model(0.0), std=0.1)
    run(first, values[:7])
    second = PowerEMA(scalar_model(0.0), std=0.2)   # the loaded state's width wins
    second.load_state_dict(first.state_dict())
    assert second.std == 0.1 and second.num_updates == 7
    assert run(second, values[7:]) == pytest.approx(whole, rel=1e-6)


def test_warmup_ema_reaches_its_decay_when_the_cap_stops_binding():
    n = steps_until_decay(0.99)
    assert n == 890 and warmup_cap(n) >= 0.99 > warmup_cap(n - 1)
    ema = EMA(scalar_model(0.0), decay=0.99)
    ema.num_updates = n + 100
    assert ema.current_decay() == 0.99
