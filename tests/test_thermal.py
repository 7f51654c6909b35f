"""Rewarming against thermal variants of the plant, and alarms the controller cannot act on."""

from __future__ import annotations

from typing import Any

from ilup_controller.config import CartConfig, load_config
from sim.faults import parse_runtime_fault
from sim.virtual import Sample, VirtualCart


def variant(**plant: Any) -> CartConfig:
    """config/sim.yaml with ``simulator.plant`` parameters replaced."""
    cfg = load_config("config/sim.yaml")
    assert cfg.simulator is not None
    sim = cfg.simulator.model_copy(update={"plant": cfg.simulator.plant.model_copy(update=plant)})
    return cfg.model_copy(update={"simulator": sim})


def test_circuit_warming_by_itself_is_advisory_and_does_not_deadlock() -> None:
    # A cold prime (30 degC) warmed by the body (36 degC) through the lung: at 500 mL/min the
    # lung alone brings ~120 W, about 1.9 degC/min, more than the 0.5 degC/min limit, with
    # the heater off and its water colder than the perfusate. Switching the heater off
    # cannot slow it; latching it off would stop rewarming for good.
    cfg = variant(initial_perfusate_c=30.0, initial_water_c=30.0)
    target = cfg.control.temperature.target_c
    cart = VirtualCart(cfg)
    samples: list[Sample] = []
    cart.run_for(25 * 60.0, samples.append)

    ids = {a.alarm_id for s in samples for a in s.decision.alarms}
    assert "heating_rate" not in ids, ids  # never a latched heater-off
    advisory = [
        a for s in samples for a in s.decision.alarms if a.alarm_id == "warming_uncontrolled"
    ]
    assert advisory, "the operator is told the circuit warms by itself"
    assert all(a.presence == "on" for a in advisory)  # never latched
    assert "body through the lung" in advisory[0].message
    # The rise really was faster than the limit, and the heater was not the source.
    n = round(cfg.alarms.heating_rate_window_s / cfg.control.tick_period_s)
    temps = [s.truth.arterial_c for s in samples]
    worst = max((b - a) / 2.0 for a, b in zip(temps, temps[n:], strict=False))
    assert worst > cfg.alarms.heating_rate_c_per_min, worst
    # The procedure is not deadlocked: the perfusate reaches and holds its target.
    reached = next(s.decision.t_s for s in samples if s.truth.arterial_c >= target - 0.3)
    assert reached < 20 * 60.0, reached
    final = [s.truth.arterial_c for s in samples if s.decision.t_s >= reached + 120.0]
    assert min(final) >= target - 0.3, min(final)
    assert max(final) <= target + 0.3, max(final)
    assert samples[-1].decision.loop.heater_limited_by == "temperature"


def test_heater_driven_warming_still_latches_the_heater_off() -> None:
    # The heater is the source (stuck on, water far above the perfusate): the protective alarm
    # stays protective, and its message tells the operator how to resume.
    cfg = variant(initial_perfusate_c=37.0, initial_water_c=38.0)
    cart = VirtualCart(cfg)
    cart.run_for(240.0)
    cart.injector.apply(parse_runtime_fault(b'{"kind": "heater_stuck_on"}'))
    samples: list[Sample] = []
    cart.run_for(300.0, samples.append)
    onset = next(
        (s for s in samples for a in s.decision.alarms if a.alarm_id == "heating_rate"), None
    )
    assert onset is not None
    assert onset.decision.loop.heater_pct == 0.0
    alarm = next(a for a in onset.decision.alarms if a.alarm_id == "heating_rate")
    assert "Reset once the rate is back under the limit" in alarm.message
    assert all(a.alarm_id != "warming_uncontrolled" for s in samples for a in s.decision.alarms)
