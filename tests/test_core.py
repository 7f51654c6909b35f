"""The core alone, with hand-made readings: interlocks, stale data, latching, PID wrapper."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from ilup_controller.config import CartConfig, load_config
from ilup_controller.config.models import PidGains
from ilup_controller.core.cart import CartCore, TickResult
from ilup_controller.core.pid import Pid
from ilup_controller.core.procedure import Phase
from ilup_controller.core.types import Reading
from sim.faults import parse_runtime_fault
from sim.virtual import VirtualCart

PERIOD = 0.1


@pytest.fixture
def cfg() -> CartConfig:
    return load_config("config/sim.yaml")


def running(cfg: CartConfig, seconds: float = 300.0) -> VirtualCart:
    """A cart that has ramped up and is perfusing normally, with no alarm."""
    cart = VirtualCart(cfg)
    cart.run_for(seconds)
    r = cart.tick().decision
    assert r.phase is Phase.perfusion
    assert r.loop.pump_speed_rpm > 14.0
    assert r.alarms == []
    return cart


Override = float | Callable[[float], float] | None


def step_with(cart: VirtualCart, seconds: float, **override: Override) -> list[TickResult]:
    """Advance the real plant but hand the core readings with some signals replaced (a value,
    or a function of time) or frozen at their last reading (None)."""
    frozen = {k: cart.readings[k] for k, v in override.items() if v is None}

    def tamper(t_s: float, readings: dict[str, Reading]) -> dict[str, Reading]:
        for k, v in override.items():
            if v is None:
                readings[k] = frozen[k]
            else:
                readings[k] = Reading(v(t_s) if callable(v) else v, t_s - PERIOD)
        return readings

    return [cart.tick(tamper).decision for _ in range(round(seconds / PERIOD))]


def ids(r: TickResult) -> set[str]:
    return {a.alarm_id for a in r.alarms}


def test_stale_pressure_stops_the_pump_within_budget(cfg: CartConfig) -> None:
    cart = running(cfg)
    frozen_at = cart.readings["pa_pressure"].t
    results = step_with(cart, 3.0, pa_pressure=None)
    first = next(r for r in results if "sensor_pressure" in ids(r))
    stale_after = cfg.control.stale_after_s
    delay = 0.5
    assert first.t_s - frozen_at <= stale_after + delay + PERIOD + 1e-6
    assert first.loop.pump_speed_rpm == 0.0  # the safe action in the same tick
    assert first.measured.pressure_mmhg is None  # missing, never 0
    assert all(r.loop.pump_speed_rpm > 0 for r in results if r.t_s - frozen_at <= stale_after)


@pytest.mark.parametrize("bad", [float("nan"), 151.0, -21.0])
def test_implausible_pressure_is_unusable(cfg: CartConfig, bad: float) -> None:
    cart = running(cfg)
    results = step_with(cart, 1.0, pa_pressure=bad)
    assert results[0].measured.pressure_mmhg is None
    assert "sensor_pressure" in ids(results[-1])
    assert results[-1].loop.pump_speed_rpm == 0.0


def test_pressure_high_latches_and_reset_is_refused_while_present(cfg: CartConfig) -> None:
    cart = running(cfg)
    stop = cfg.control.pressure.stop_mmhg
    cart.injector.apply(parse_runtime_fault(b'{"kind": "occlusion", "complete": true}'))
    clamped = [cart.tick() for _ in range(20)]
    onset = next(s for s in clamped if "pressure_high" in ids(s.decision))
    crossed = next((s.decision.t_s for s in clamped if s.truth.pa_pressure_mmhg >= stop), None)
    assert crossed is None or onset.decision.t_s - crossed <= 0.5
    assert onset.decision.loop.pump_speed_rpm == 0.0
    assert max(s.truth.pa_pressure_mmhg for s in clamped) <= stop + 2.0
    core = cart.core
    # Clamped line, pump stopped: the pressure stays trapped above the alert limit, so a reset
    # of the alert is refused while its condition persists.
    cart.run_for(2.0)
    assert cart.readings["pa_pressure"].value >= cfg.control.pressure.limit_mmhg
    verdict = core.reset("pressure_alert", cart.t_s, "op1")
    assert not verdict.ok
    assert "condition still present" in verdict.reason
    cart.injector.clear("occlusion")
    back = [cart.tick().decision for _ in range(50)]
    assert all(r.loop.pump_speed_rpm == 0.0 for r in back)  # latched: still stopped
    alarm = next(a for a in back[-1].alarms if a.alarm_id == "pressure_high")
    assert alarm.presence == "latched"
    assert core.reset("pressure_high", cart.t_s, "op1").ok
    assert core.reset("pressure_alert", cart.t_s, "op1").ok
    after = [cart.tick().decision for _ in range(50)]
    assert "pressure_high" not in ids(after[-1])
    # The flow ramp starts again from zero: no jump back to full speed.
    ramp = cfg.control.flow.target_ml_min / cfg.control.flow.ramp_s
    assert after[0].loop.flow_setpoint_ml_min <= ramp * PERIOD + 1e-9
    assert after[-1].loop.pump_speed_rpm > 0.0
    speeds = [r.loop.pump_speed_rpm for r in after]
    assert max(b - a for a, b in itertools.pairwise(speeds)) <= (
        cfg.control.flow.slew_rpm_per_s * PERIOD + 1e-9
    )


def test_heater_fault_does_not_stop_the_pump(cfg: CartConfig) -> None:
    cart = running(cfg)
    t0 = cart.t_s
    start = cart.readings["heater_water_temp"].value
    cap = cfg.control.temperature.water_cap_c
    # Water climbing at 1 degC/s (plausible) past its cap.
    results = step_with(
        cart,
        8.0,
        heater_water_temp=lambda t: min(start + (t - t0), cap + 0.1) + 0.01 * ((t * 10) % 3),
    )
    capped = [
        r
        for r in results
        if r.measured.water_temperature_c is not None and r.measured.water_temperature_c >= cap
    ]
    assert capped
    assert all(r.loop.heater_pct == 0.0 for r in capped)
    assert "water_cap" in ids(results[-1])
    assert all(r.loop.pump_speed_rpm > 14.0 for r in results)


def test_missing_flow_holds_the_pump(cfg: CartConfig) -> None:
    cart = running(cfg)
    before = cart.tick().decision.loop.pump_speed_rpm
    results = step_with(cart, 10.0, flow=float("nan"))
    assert "sensor_flow" in ids(results[-1])
    assert all(abs(r.loop.pump_speed_rpm - before) < 0.5 for r in results)
    assert results[-1].loop.heater_pct == 0.0  # cannot prove flow through the exchanger


def test_pressure_stop_holds_even_if_pid_output_is_corrupted(cfg: CartConfig) -> None:
    cart = running(cfg)
    # Simulated bug: the flow loop's integrator at its maximum every tick.
    ctl = cart.core.controller
    results: list[TickResult] = []
    stop = cfg.control.pressure.stop_mmhg
    for k in range(10):
        ctl._flow_pid.reset(cfg.control.flow.trim_limit_rpm * 10)
        results += step_with(cart, PERIOD, pa_pressure=stop + 1 + 0.01 * (k % 3))
    assert results[-1].loop.pump_speed_rpm == 0.0


def test_step_rejects_repeated_time(cfg: CartConfig) -> None:
    core = CartCore(cfg, t0_s=0.0)
    core.step(0.1, {})
    with pytest.raises(ValueError, match="not after the previous step"):
        core.step(0.1, {})


def test_idle_cart_does_not_pump_or_heat(cfg: CartConfig) -> None:
    manual = cfg.model_copy(update={"control": cfg.control.model_copy(update={"autostart": False})})
    cart = VirtualCart(manual)
    samples = []
    cart.run_for(30.0, samples.append)
    assert all(s.decision.phase is Phase.idle for s in samples)
    assert all(s.decision.loop.pump_speed_rpm == 0.0 for s in samples)
    assert all(s.decision.loop.heater_pct == 0.0 for s in samples)
    assert all(s.decision.alarms == [] for s in samples)


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


def test_a_rate_limited_pid_stops_its_integral_without_giving_up_its_p() -> None:
    pid = Pid(PidGains(kp=2.0, ki=0.5), -100.0, 100.0)
    for _ in range(10):
        out = pid.update(10.0, 9.0, 0.1)
    assert out == pytest.approx(2.0 + 0.5)  # P 2.0, I 0.5
    pid.track(2.3, "limited", tolerance=0.1)  # a slew limit of 0.1 per tick cut it to 2.3
    # The integral stays where it was before the cut tick (0.45): P is not taken out of it
    # (bumpless would leave 0.3 and the next output 2.35).
    assert pid.update(10.0, 9.0, 0.1) == pytest.approx(2.0 + 0.45 + 0.05)
    pid.track(2.45, "limited", tolerance=0.1)  # cut by 0.05: noise poking over the limit
    assert pid.update(10.0, 9.0, 0.1) == pytest.approx(2.0 + 0.5 + 0.05)  # integral kept


def test_the_losing_loop_of_an_override_pair_keeps_its_p_as_headroom() -> None:
    pid = Pid(PidGains(kp=2.0, ki=0.5), -100.0, 100.0)
    for _ in range(10):
        pid.update(10.0, 9.0, 0.1)
    pid.track(1.0, "headroom")  # the other loop's lower demand won at 1.0
    # Its next demand is the applied 1.0 plus its own P and one tick of integral.
    assert pid.update(10.0, 9.0, 0.1) == pytest.approx(1.0 + 2.0 + 0.05)


def test_manual_output_is_bumpless_both_ways(cfg: CartConfig) -> None:
    cart = running(cfg)
    ctl = cart.core.controller
    auto_rpm = cart.tick().decision.loop.pump_speed_rpm
    ctl.set_mode("flow", "manual", auto_rpm)  # take over at the current speed
    manual = [cart.tick().decision for _ in range(50)]
    assert all(abs(r.loop.pump_speed_rpm - auto_rpm) < 1e-9 for r in manual)
    assert manual[-1].loop.pump_limited_by == "manual"
    assert "flow_deviation" not in ids(manual[-1])
    ctl.set_mode("flow", "manual", auto_rpm - 3.0)  # lower by hand: applied at once
    assert cart.tick().decision.loop.pump_speed_rpm == pytest.approx(auto_rpm - 3.0)
    ctl.set_mode("flow", "auto")
    back = [cart.tick().decision.loop.pump_speed_rpm for _ in range(100)]
    # Back to auto without a jump: the first step is within one tick of slew and trim.
    assert abs(back[0] - (auto_rpm - 3.0)) <= cfg.control.flow.slew_rpm_per_s * PERIOD + 0.2
    assert abs(back[-1] - auto_rpm) < 0.5  # and the flow loop brings it back


def test_constant_pressure_holds_the_pressure_under_a_flow_ceiling(cfg: CartConfig) -> None:
    cart = running(cfg)
    ctl = cart.core.controller
    ctl.set_mode("pressure", "auto")
    ctl.flow_target_ml_min = 1200.0  # the ceiling, well above what the pressure allows
    samples = [cart.tick() for _ in range(4000)]  # the flow ramps up until pressure caps it
    tail = samples[-300:]
    regulate_at = cfg.control.pressure.limit_mmhg - cfg.control.pressure.margin_mmhg
    mean_p = sum(s.decision.measured.pressure_mmhg or 0.0 for s in tail) / len(tail)
    assert mean_p == pytest.approx(regulate_at, abs=0.5)
    assert all(s.decision.loop.pump_limited_by == "pressure" for s in tail)
    assert max(s.truth.pa_pressure_mmhg for s in samples) <= cfg.control.pressure.limit_mmhg
    assert all(s.decision.alarms == [] for s in tail)  # no flow deviation in this mode
