"""The rewarming loop's parts, stepped by hand (core/rewarm.py): the slope estimate on a
quantised, noisy or delayed probe, and the gradient law's limits."""

from __future__ import annotations

import random

import pytest

from ilup_controller.config import load_config
from ilup_controller.core.rewarm import GradientLoop, RateEstimator

RAMP_C_PER_S = 0.47 / 60.0


@pytest.mark.parametrize(("lsb_c", "noise_c"), [(0.0, 0.0), (0.01, 0.01), (0.1, 0.0), (0.1, 0.03)])
def test_slope_of_a_ramp_on_a_coarse_or_noisy_probe(lsb_c: float, noise_c: float) -> None:
    """A 0.47 degC/min ramp read at 10 Hz: the 30-s line's slope within 0.05 degC/min, and its
    value now within one LSB + 3 sigma of the truth, after the window has filled."""
    rng = random.Random(7)
    est = RateEstimator(30.0)
    worst_rate, worst_value = 0.0, 0.0
    for k in range(3000):
        t = k * 0.1
        true_c = 34.0 + RAMP_C_PER_S * t
        v = true_c + rng.gauss(0.0, noise_c) if noise_c else true_c
        if lsb_c:
            v = round(v / lsb_c) * lsb_c
        est.add(t, v)
        if t >= 35.0:
            assert est.slope_c_per_s is not None
            assert est.value_c is not None
            worst_rate = max(worst_rate, abs(est.slope_c_per_s - RAMP_C_PER_S) * 60.0)
            worst_value = max(worst_value, abs(est.value_c - true_c))
    assert worst_rate <= 0.05, worst_rate
    assert worst_value <= lsb_c + 3.0 * noise_c + 0.02, worst_value


def test_gradient_is_capped_and_never_heats_past_the_water_cap() -> None:
    t = load_config("config/sim.yaml").control.temperature
    loop = GradientLoop(t)
    loop.reset(water_c=30.0, perfusate_c=30.0)
    # Perfusate stuck far below target: the rate error stays, the gradient may not exceed
    # max_gradient_c, and the water setpoint never reaches the cap.
    for _ in range(6000):
        d = loop.step(0.1, 30.0, 30.0 + t.max_gradient_c, t.target_c)
        assert d.water_setpoint_c <= 30.0 + t.max_gradient_c + 1e-9
        assert d.water_setpoint_c <= t.water_cap_c - 0.5
        assert d.rate_target_c_per_min == pytest.approx(t.ramp_c_per_min)
    hot = GradientLoop(t)
    hot.reset(water_c=40.0, perfusate_c=40.5)
    d = hot.step(0.1, 40.5, 41.0, t.target_c)
    # Above the target the asked rate is negative: the water is asked below the perfusate.
    assert d.rate_target_c_per_min < 0.0
    assert d.water_setpoint_c <= 40.5
