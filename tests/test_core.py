"""The control core alone: interlocks, stale data, latching, and the PID wrapper."""

from __future__ import annotations

import pytest

from ilup_controller.config import CartConfig, load_config
from ilup_controller.config.models import PidGains
from ilup_controller.core.control import Controller, Fault, Phase
from ilup_controller.core.pid import Pid
from ilup_controller.core.types import Reading
from sim.virtual import VirtualCart

PERIOD = 0.1


@pytest.fixture
def cfg() -> CartConfig:
    return load_config("config/sim.yaml")


def healthy(t: float, **override: float) -> dict[str, Reading]:
    values = {
        "flow": 500.0,
        "pa_pressure": 15.0,
        "perfusate_temp": 36.0,
        "heater_water_temp": 37.0,
        "pump_speed": 15.0,
    }
    values.update(override)
    return {k: Reading(v, t) for k, v in values.items()}


def running(cfg: CartConfig, seconds: float = 240.0) -> VirtualCart:
    """A cart that has ramped up and is perfusing normally."""
    cart = VirtualCart(cfg)
    cart.run_for(seconds)
    assert cart.controller.phase is Phase.perfusion
    assert cart.tick().decision.pump_speed_rpm > 14.0
    return cart


def test_stale_pressure_stops_the_pump_within_one_tick(cfg: CartConfig) -> None:
    cart = running(cfg)
    c = cart.controller
    t = cart.t_s
    frozen = dict(cart.readings)
    frozen_at = frozen["pa_pressure"].t
    # The pressure module stops answering: its last reading stays, and only ages.
    stale_after = cfg.control.stale_after_s
    k = 0
    while True:
        k += 1
        now = t + k * PERIOD
        readings = {**healthy(now), "pa_pressure": frozen["pa_pressure"]}
        d = c.step(now, readings)
        if now - frozen_at <= stale_after:
            assert d.pump_speed_rpm > 0.0
            assert Fault.pressure_sensor not in d.faults
        else:
            assert d.pump_speed_rpm == 0.0
            assert d.pump_limited_by == Fault.pressure_sensor
            assert d.measured.pressure_mmhg is None  # missing, never 0
            break
    assert now - frozen_at <= stale_after + PERIOD


@pytest.mark.parametrize("bad", [float("nan"), 151.0, -21.0])
def test_implausible_pressure_is_unusable(cfg: CartConfig, bad: float) -> None:
    cart = running(cfg)
    t = cart.t_s + PERIOD
    d = cart.controller.step(t, healthy(t, pa_pressure=bad))
    assert d.pump_speed_rpm == 0.0
    assert d.measured.pressure_mmhg is None
    assert Fault.pressure_sensor in d.faults


def test_pressure_stop_latches_until_reset_after_it_clears(cfg: CartConfig) -> None:
    cart = running(cfg)
    c = cart.controller
    t = cart.t_s
    stop = cfg.control.pressure.stop_mmhg
    t += PERIOD
    d = c.step(t, healthy(t, pa_pressure=stop + 0.5))
    assert d.pump_speed_rpm == 0.0
    assert d.pump_limited_by == Fault.pressure_stop
    # Pressure falls back: the pump stays stopped, the fault stays latched.
    for _ in range(50):
        t += PERIOD
        d = c.step(t, healthy(t, pa_pressure=12.0))
        assert d.pump_speed_rpm == 0.0
        assert Fault.pressure_stop in d.faults
    # A reset while the condition persists is refused; once clear, it is accepted.
    assert c.reset_latched(d.measured.__class__(500.0, stop + 1.0, 37.0, 38.0)) == {
        Fault.pressure_stop
    }
    assert c.reset_latched(d.measured) == set()
    t += PERIOD
    d = c.step(t, healthy(t, pa_pressure=12.0))
    assert Fault.pressure_stop not in d.faults
    assert 0.0 < d.pump_speed_rpm <= cfg.control.flow.slew_rpm_per_s * PERIOD + 1e-9


def test_heater_fault_does_not_stop_the_pump(cfg: CartConfig) -> None:
    cart = running(cfg)
    c = cart.controller
    t = cart.t_s
    cap = cfg.control.temperature.water_cap_c
    for reading in ({"heater_water_temp": cap}, {"perfusate_temp": float("inf")}):
        t += PERIOD
        d = c.step(t, healthy(t, **reading))
        assert d.heater_pct == 0.0
        assert d.pump_speed_rpm > 14.0
        assert d.pump_limited_by == "flow"


def test_missing_temperature_turns_heater_off_and_keeps_pumping(cfg: CartConfig) -> None:
    cart = running(cfg)
    c = cart.controller
    t = cart.t_s + PERIOD
    readings = healthy(t)
    del readings["perfusate_temp"]
    d = c.step(t, readings)
    assert d.heater_pct == 0.0
    assert d.heater_limited_by == Fault.temperature_sensor
    assert d.pump_speed_rpm > 14.0


def test_missing_flow_runs_open_loop_on_feed_forward(cfg: CartConfig) -> None:
    cart = running(cfg)
    c = cart.controller
    t = cart.t_s
    before = cart.tick().decision.pump_speed_rpm
    t = cart.t_s
    for _ in range(100):
        t += PERIOD
        readings = healthy(t)
        del readings["flow"]
        d = c.step(t, readings)
    # Feed-forward 500/33 = 15.15 rpm plus the frozen trim; no drift without a measurement.
    assert abs(d.pump_speed_rpm - before) < 0.5
    assert Fault.flow_sensor in d.faults
    assert d.heater_pct == 0.0  # no flow measurement: cannot prove flow through the exchanger


def test_pressure_interlock_holds_even_if_pid_output_is_corrupted(cfg: CartConfig) -> None:
    cart = running(cfg)
    c = cart.controller
    # Simulated bug: the flow loop's integrator is at its maximum.
    c._flow_pid.reset(cfg.control.flow.trim_limit_rpm)
    t = cart.t_s + PERIOD
    d = c.step(t, healthy(t, pa_pressure=cfg.control.pressure.stop_mmhg))
    assert d.pump_speed_rpm == 0.0


def test_step_rejects_repeated_time(cfg: CartConfig) -> None:
    c = Controller(cfg, t0_s=0.0)
    c.step(0.1, healthy(0.1))
    with pytest.raises(ValueError, match="not after the previous step"):
        c.step(0.1, healthy(0.1))


def test_idle_cart_does_not_pump_or_heat(cfg: CartConfig) -> None:
    manual = cfg.model_copy(update={"control": cfg.control.model_copy(update={"autostart": False})})
    c = Controller(manual, t0_s=0.0)
    for k in range(1, 50):
        d = c.step(k * PERIOD, healthy(k * PERIOD))
        assert d.phase is Phase.idle
        assert d.pump_speed_rpm == 0.0
        assert d.heater_pct == 0.0


def test_pid_tracking_is_bumpless() -> None:
    pid = Pid(PidGains(kp=2.0, ki=0.5), -100.0, 100.0)
    for _ in range(10):
        pid.update(10.0, 9.0, 0.1)
    pid.track(4.2)  # the actuator was really at 4.2 (held by something else)
    out = pid.update(10.0, 9.0, 0.1)
    # Same error as before: only one tick of integral separates the output from 4.2.
    assert out == pytest.approx(4.2 + 0.5 * 1.0 * 0.1)


def test_pid_never_winds_up_while_held() -> None:
    pid = Pid(PidGains(kp=1.0, ki=1.0), 0.0, 50.0)
    for _ in range(1000):  # 100 s held at 0 with a large error
        pid.update(10.0, 0.0, 0.1)
        pid.track(0.0)
    out = pid.update(10.0, 0.0, 0.1)
    assert out == pytest.approx(1.0)  # 0 + one tick of ki * e * dt, not 50
