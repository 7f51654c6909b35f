"""The PI wrapper's anti-windup (core/pid.py) and what it means for the heater's inner loop."""

from __future__ import annotations

from ilup_controller.config import load_config
from ilup_controller.config.models import PidGains
from ilup_controller.core.catalogue import HeaterAction, PumpAction
from ilup_controller.core.control import Controller
from ilup_controller.core.monitor import Measured
from ilup_controller.core.pid import Pid
from ilup_controller.core.procedure import Phase


def test_saturation_does_not_wind_the_integral_the_other_way() -> None:
    """kp 200 %/degC on a 1 degC error saturates at 100 % from P alone. Back-calculating the
    integral to 100 - 200 = -100 made the output sag to 0 % once the error shrank to 0.3 degC
    (the water lagging its setpoint for minutes); now it continues from P with no negative
    integral: at least kp x 0.3 = 60 %."""
    pid = Pid(PidGains(kp=200.0, ki=1.0), 0.0, 100.0)
    for _ in range(20):
        assert pid.update(1.0, 0.0, 0.1) == 100.0
    out = pid.update(0.3, 0.0, 0.1)
    assert out >= 60.0, out
    # ... and the integral did not grow while saturated either: once the error is gone the
    # output is close to 0, not held up by a wound-up integral.
    assert pid.update(0.0, 0.0, 0.1) <= 1.0


def test_low_saturation_is_symmetric() -> None:
    pid = Pid(PidGains(kp=200.0, ki=1.0), 0.0, 100.0)
    for _ in range(20):
        assert pid.update(0.0, 1.0, 0.1) == 0.0  # far too hot: off
    # Cold again: P acts at once, without an integral wound up to +200 behind it.
    assert 59.0 <= pid.update(0.3, 0.0, 0.1) <= 61.0


def test_reset_then_update_is_p_plus_a_fresh_integral() -> None:
    """What the heater does after a block (no flow, a flicker at min_flow_ml_min): the inner
    loop restarts from nothing, so its first output is kp x error, not kp x error minus the
    P of the last tick before the block."""
    pid = Pid(PidGains(kp=50.0, ki=1.0), 0.0, 100.0)
    pid.update(1.0, 0.0, 0.1)  # heating: P = 50
    pid.reset(0.0)  # blocked
    out = pid.update(1.0, 0.0, 0.1)
    assert 50.0 <= out <= 50.2, out


def test_flow_flickering_at_min_flow_does_not_leave_the_heater_wound_down() -> None:
    """The controller's heater path: flow crossing min_flow_ml_min tick by tick (heating,
    blocked, heating, ...) while the water is 1 degC short. Each block used to track the inner
    PI to 0 against the last P, leaving its integral at about -P; the first steady tick then
    asked ~0 %. Now a block restarts the loop, so the heater starts at kp x error or more."""
    cfg = load_config("config/sim.yaml")
    tc = cfg.control.temperature
    ctl = Controller(cfg, 0.0)
    low, high = tc.min_flow_ml_min - 1.0, tc.min_flow_ml_min + 50.0
    for k in range(40):
        flow = high if k % 2 == 0 else low
        m = Measured(flow, 10.0, 34.0, 33.0)
        ctl.step(0.1, m, Phase.perfusion, PumpAction.none, HeaterAction.none)
    out = ctl.step(
        0.1, Measured(high, 10.0, 34.0, 33.0), Phase.perfusion, PumpAction.none, HeaterAction.none
    )
    assert out.water_setpoint_c is not None
    error_c = out.water_setpoint_c - 33.0
    assert error_c > 0.5
    assert out.heater_pct >= 0.9 * min(tc.inner_pid.kp * error_c, tc.heater_max_pct), (
        out.heater_pct,
        error_c,
    )
