"""Alarm engine semantics (IEC 60601-1-8 vocabulary) and the catalogue as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from ilup_controller.core.alarms import AlarmEngine, AlarmEvent, Condition, Presence
from ilup_controller.core.catalogue import CATALOGUE, HeaterAction, PumpAction, render_markdown

ON = Condition(True, 31.0, 30.0)
OFF = Condition(False)


def run(
    engine: AlarmEngine,
    t0: float,
    seconds: float,
    events: list[AlarmEvent] | None = None,
    **conds: Condition,
) -> float:
    """Tick at 10 Hz for ``seconds``; the events go to ``events`` when given."""
    t = t0
    for _ in range(round(seconds / 0.1)):
        t += 0.1
        out = engine.update(t, conds)
        if events is not None:
            events += out
    return t


def present(engine: AlarmEngine, t: float) -> dict[str, str]:
    return {a.alarm_id: str(a.presence) for a in engine.active(t)}


def test_catalogue_entries_are_complete_and_protective_ones_latch() -> None:
    assert len(CATALOGUE) >= 20
    for d in CATALOGUE.values():
        assert d.priority in ("high", "medium", "low")
        assert d.hazard
        assert d.message
        assert d.title
        if d.pump is not PumpAction.none or d.heater is not HeaterAction.none:
            assert d.latching, d.id
    # Over-pressure, air, over-temperature and leak are high priority.
    for alarm_id in ("pressure_high", "air_detected", "perfusate_high", "leak", "reservoir_low"):
        assert CATALOGUE[alarm_id].priority == "high"


def test_docs_alarms_md_is_generated_from_the_catalogue() -> None:
    committed = Path("docs/alarms.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), (
        "docs/alarms.md is out of date: python -m ilup_controller.core.catalogue > docs/alarms.md"
    )


def test_condition_delay_debounces() -> None:
    e = AlarmEngine()  # pressure_high: 0.2 s delay
    t = run(e, 0.0, 0.1, pressure_high=ON)  # one tick only
    t = run(e, t, 0.5, pressure_high=OFF)
    assert present(e, t) == {}
    t = run(e, t, 0.3, pressure_high=ON)
    assert present(e, t) == {"pressure_high": "on"}


def test_protective_alarm_latches_and_reset_needs_the_condition_cleared() -> None:
    e = AlarmEngine()
    t = run(e, 0.0, 0.5, pressure_high=ON)
    assert e.actions()[0] is PumpAction.stop
    verdict, events = e.reset("pressure_high", t, "op1")
    assert not verdict.ok
    assert "condition still present" in verdict.reason
    assert events[0].kind == "refused"
    t = run(e, t, 0.5, pressure_high=OFF)
    assert present(e, t) == {"pressure_high": "latched"}
    assert e.actions()[0] is PumpAction.stop  # the action holds until reset
    verdict, events = e.reset("pressure_high", t, "op1")
    assert verdict.ok
    assert events[0].kind == "reset"
    assert events[0].operator == "op1"
    assert present(e, t) == {}
    assert e.actions()[0] is PumpAction.none


def test_non_latching_alarm_clears_by_itself() -> None:
    e = AlarmEngine()
    dev = Condition(True, 400.0, 50.0)
    t = run(e, 0.0, 11.0, flow_deviation=dev)
    assert present(e, t) == {"flow_deviation": "on"}
    t = run(e, t, 0.1, flow_deviation=OFF)
    assert present(e, t) == {}


def test_acknowledge_silences_only_the_current_occurrence() -> None:
    e = AlarmEngine(delays_s={"flow_deviation": 0.0})
    dev = Condition(True, 400.0, 50.0)
    t = run(e, 0.0, 0.2, flow_deviation=dev)
    assert e.acknowledge("flow_deviation", t, "op1")[0].ok
    assert not e.active(t)[0].audible
    t = run(e, t, 0.2, flow_deviation=OFF)
    t = run(e, t, 0.2, flow_deviation=dev)  # a new occurrence
    a = e.active(t)[0]
    assert a.audible
    assert not a.acknowledged


def test_ack_does_not_clear_a_latched_alarm_while_present() -> None:
    e = AlarmEngine()
    t = run(e, 0.0, 0.5, pressure_high=ON)
    assert e.acknowledge("pressure_high", t, "op1")[0].ok
    t = run(e, t, 1.0, pressure_high=ON)
    a = e.active(t)[0]
    assert a.presence is Presence.on
    assert a.acknowledged
    assert not a.audible
    assert e.actions()[0] is PumpAction.stop


def test_audio_pause_is_time_limited_and_new_alarms_annunciate() -> None:
    e = AlarmEngine(delays_s={"flow_deviation": 0.0}, audio_pause_s=120.0)
    dev = Condition(True, 400.0, 50.0)
    t = run(e, 0.0, 0.2, flow_deviation=dev)
    e.pause_audio(t, "op1")
    paused_at = t
    assert not e.active(t)[0].audible
    # A higher-priority alarm during the pause annunciates at once.
    t = run(e, t, 0.3, flow_deviation=dev, pressure_high=ON)
    by_id = {a.alarm_id: a for a in e.active(t)}
    assert by_id["pressure_high"].audible
    assert not by_id["flow_deviation"].audible
    # The pause ends by itself after 120 s (+/- one tick) and the paused alarm sounds again.
    t = run(e, t, 120.0 - (t - paused_at) - 0.2, flow_deviation=dev, pressure_high=ON)
    assert not {a.alarm_id: a for a in e.active(t)}["flow_deviation"].audible
    t = run(e, t, 0.3, flow_deviation=dev, pressure_high=ON)
    assert {a.alarm_id: a for a in e.active(t)}["flow_deviation"].audible
    assert e.audio_paused_until() is None


def test_pause_is_capped_at_120_s_by_configuration() -> None:
    from pydantic import ValidationError

    from ilup_controller.config.models import Alarms

    with pytest.raises(ValidationError, match="less than or equal to 120"):
        Alarms(audio_pause_s=600.0)


def test_there_is_no_way_to_switch_a_protective_alarm_off() -> None:
    from ilup_controller.config.models import Alarms

    fields = set(Alarms.model_fields)
    assert not {f for f in fields if "enable" in f or "disable" in f or f.endswith("_off")}
    e = AlarmEngine()
    assert not hasattr(e, "disable")
    assert not hasattr(e, "alarm_off")


def test_latched_alarm_whose_condition_toggles_is_one_onset() -> None:
    """A latched sensor alarm whose condition comes and goes 50 times is one occurrence: one
    onset and one end, still latched, and a reset afterwards clears it."""
    e = AlarmEngine()  # sensor_flow: latching, 0.5 s delay
    events: list[AlarmEvent] = []
    t = 0.0
    for _ in range(50):
        t = run(e, t, 1.0, events, sensor_flow=ON)
        t = run(e, t, 1.0, events, sensor_flow=OFF)
    kinds = [ev.kind for ev in events]
    assert kinds.count("onset") == 1
    assert kinds.count("end") == 1
    assert present(e, t) == {"sensor_flow": "latched"}
    assert e.reset("sensor_flow", t, "op1")[0].ok
    # After the reset a new occurrence announces itself again.
    t = run(e, t, 1.0, sensor_flow=ON)
    assert present(e, t) == {"sensor_flow": "on"}


def test_clear_delay_makes_a_rate_hovering_at_its_limit_one_occurrence() -> None:
    """warming_uncontrolled (5 s delay, 30 s clear delay): a rate crossing its limit for 6 s
    every 13 s for 5 minutes is one onset; it ends 30 s after the last crossing, not before."""
    e = AlarmEngine()
    rate = Condition(True, 0.6, 0.5)
    events: list[AlarmEvent] = []
    t = 0.0
    for _ in range(23):
        t = run(e, t, 6.0, events, warming_uncontrolled=rate)
        t = run(e, t, 7.0, events, warming_uncontrolled=OFF)
    assert [ev.kind for ev in events] == ["onset"]
    t = run(e, t, 23.0, warming_uncontrolled=OFF)  # 300 ticks absent: 29.9 s since the first
    assert present(e, t) == {"warming_uncontrolled": "on"}
    ends = e.update(t + 0.1, {"warming_uncontrolled": OFF})
    assert [ev.kind for ev in ends] == ["end"]
    assert present(e, t + 0.1) == {}


def test_an_advisory_is_suppressed_while_the_alarm_that_acts_on_it_is_present() -> None:
    """warming_uncontrolled counts as absent while heating_rate is on or latched (the heater
    already off, the water's warmth still raising the rate), and announces itself again once
    heating_rate has been reset. A protective alarm can never be suppressed."""
    e = AlarmEngine()
    rate = Condition(True, 0.54, 0.5)
    events: list[AlarmEvent] = []
    t = run(e, 0.0, 20.0, events, heating_rate=rate)
    t = run(e, t, 20.0, events, heating_rate=OFF, warming_uncontrolled=rate)
    assert [(ev.kind, ev.alarm_id) for ev in events] == [
        ("onset", "heating_rate"),
        ("end", "heating_rate"),
    ]
    assert present(e, t) == {"heating_rate": "latched"}
    assert e.reset("heating_rate", t, "op1")[0].ok
    t = run(e, t, 6.0, warming_uncontrolled=rate)
    assert present(e, t) == {"warming_uncontrolled": "on"}
    assert all(not d.suppressed_by for d in CATALOGUE.values() if d.protective)
    with pytest.raises(ValueError, match="never suppressed"):
        CATALOGUE["heating_rate"].model_validate(
            {**CATALOGUE["heating_rate"].model_dump(), "suppressed_by": ("gradient",)}
        )
