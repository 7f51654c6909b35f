"""The guard's pure decision (ilup_controller/guard/decide.py), stepped with explicit time.

Every branch is exercised here (100 % branch coverage of decide.py, measured with coverage).
"""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ilup_controller.config import load_config
from ilup_controller.config.loader import ConfigError, config_from_data, parse_yaml
from ilup_controller.guard.decide import Inputs, Limits, State, decide, hazards, reset
from ilup_controller.guard.runner import limits_of

LIM = Limits(
    pressure_stop_mmhg=30.0,
    perfusate_max_c=39.0,
    water_max_c=42.0,
    reservoir_low_ml=300.0,
    air=True,
    budget_s=0.2,
    unreadable_s=1.5,
    heartbeat_s=1.0,
)
OK = Inputs(
    t_s=0.0,
    pressure_mmhg=15.0,
    perfusate_c=37.0,
    water_c=38.0,
    air=False,
    reservoir_ml=800.0,
    pump_on=True,
    heater_on=True,
    heartbeat=0,
)


def run(
    inputs: list[Inputs], lim: Limits = LIM, state: State | None = None
) -> tuple[State, list[str]]:
    s, events = state or State(), []
    for x in inputs:
        d = decide(s, x, lim)
        s = d.state
        events += d.events
    return s, events


def ticks(t0: float, t1: float, dt: float = 0.05, **changes: object) -> list[Inputs]:
    """Inputs every ``dt`` from t0 to t1 with a heartbeat that moves every cycle."""
    n = round((t1 - t0) / dt)
    return [
        replace(OK, t_s=round(t0 + i * dt, 6), heartbeat=i, **changes)  # type: ignore[arg-type]
        for i in range(n + 1)
    ]


def test_healthy_circuit_never_acts() -> None:
    s, events = run(ticks(0.0, 10.0))
    assert events == []
    assert s.latched == {}
    d = decide(s, replace(OK, t_s=10.05, heartbeat=999), LIM)
    assert d.enabled == {"pump": True, "heater": True}
    assert d.hazards == {}


@pytest.mark.parametrize(
    ("change", "actuator", "word"),
    [
        ({"pressure_mmhg": 30.0}, "pump", "PA pressure 30.0 >= 30"),
        ({"air": True}, "pump", "air in the inflow line"),
        ({"reservoir_ml": 300.0}, "pump", "reservoir 300 <= 300"),
        ({"perfusate_c": 39.0}, "heater", "perfusate 39.00 >= 39"),
        ({"water_c": 42.5}, "heater", "water 42.50 >= 42"),
    ],
)
def test_a_hazard_latches_its_actuator_after_the_budget(
    change: dict[str, object], actuator: str, word: str
) -> None:
    # 0.15 s with the hazard: within the budget (the controller acts first), nothing yet.
    s, events = run(ticks(0.0, 0.15, **change))
    assert events == []
    assert s.latched == {}
    d = decide(s, replace(OK, t_s=0.2, heartbeat=9, **change), LIM)  # type: ignore[arg-type]
    assert list(d.state.latched) == [actuator]
    assert word in d.state.latched[actuator]
    assert d.enabled[actuator] is False
    other = "heater" if actuator == "pump" else "pump"
    assert d.enabled[other] is True
    assert len(d.events) == 1
    assert "0.20 s after the guard saw it (budget 0.2 s)" in d.events[0]


def test_the_controller_acting_within_the_budget_means_the_guard_does_not() -> None:
    high = ticks(0.0, 0.1, pressure_mmhg=31.0)
    stopped = ticks(0.15, 1.0, pressure_mmhg=31.0, pump_on=False)  # line holds its pressure
    s, events = run(high + stopped)
    assert events == []
    assert s.latched == {}
    # The pump on again against the same pressure: the budget starts afresh.
    s, events = run(ticks(1.05, 1.2, pressure_mmhg=31.0), state=s)
    assert events == []
    s, events = run(ticks(1.3, 1.3, pressure_mmhg=31.0), state=s)
    assert list(s.latched) == ["pump"]


def test_a_hazard_that_clears_within_the_budget_restarts_it() -> None:
    blip = ticks(0.0, 0.15, pressure_mmhg=31.0) + ticks(0.2, 0.2)
    s, events = run(blip + ticks(0.25, 0.4, pressure_mmhg=31.0))
    assert events == []
    assert s.latched == {}


def test_an_unreadable_sensor_is_a_hazard_after_its_time() -> None:
    s, events = run(ticks(0.0, 1.6, pressure_mmhg=None))
    assert events == []  # unreadable 1.6 s, a hazard since 1.5 s, budget not yet over
    s, events = run(ticks(1.75, 1.75, pressure_mmhg=None), state=s)
    assert list(s.latched) == ["pump"]
    assert "pressure unreadable for 1.8 s" in s.latched["pump"]
    # Only the sensors the cart has count: no air detector, no reservoir sensor.
    lim = replace(LIM, air=False, reservoir_low_ml=None)
    s, events = run(ticks(0.0, 5.0, air=None, reservoir_ml=None), lim)
    assert events == []
    s, _ = run(ticks(0.0, 1.8, perfusate_c=None))
    assert list(s.latched) == ["heater"]


def test_a_stopped_heartbeat_latches_both_actuators_that_are_on() -> None:
    moving = ticks(0.0, 1.0)
    frozen = [replace(x, heartbeat=20) for x in ticks(1.05, 2.15)]
    s, events = run(moving + frozen)
    assert events == []  # unchanged since 1.0 s: hazard at 2.0 s, budget runs to 2.2 s
    s, events = run([replace(OK, t_s=2.25, heartbeat=20, pump_on=False)], state=s)
    assert list(s.latched) == ["heater"]  # the pump was off: nothing to stop
    assert "heartbeat unchanged for 1.2 s" in s.latched["heater"]
    # An unreadable heartbeat does not move it either.
    s, events = run(moving + [replace(x, heartbeat=None) for x in ticks(1.05, 2.3)])
    assert sorted(s.latched) == ["heater", "pump"]


def test_a_stopped_heartbeat_with_everything_off_blocks_no_reset() -> None:
    s, _ = run(ticks(0.0, 0.3, pressure_mmhg=35.0))
    frozen = [replace(x, heartbeat=6) for x in ticks(0.35, 2.0)]
    s, _ = run(frozen, state=s)
    hung = replace(OK, t_s=2.05, heartbeat=6)  # the command still reads "on"
    assert reset(s, hung, LIM)[1].startswith("refused: controller heartbeat unchanged for 1.7")
    # The commands read 0 now (a device watchdog zeroed them), but the heater read on after
    # the controller fell silent: an element stuck on would not show, so it stays held...
    zeroed = replace(hung, pump_on=False, heater_on=False)
    assert reset(s, zeroed, LIM)[1].startswith("refused: controller heartbeat unchanged")
    # ... until the controller is alive again.
    assert reset(s, replace(zeroed, heartbeat=7), LIM)[1] == ""
    # A controller that fell silent with both off (it wrote its safe values) leaves nothing
    # to hold: the reset goes through while it is still silent.
    off = {"pump_on": False, "heater_on": False}
    s, _ = run(ticks(0.0, 0.3, pressure_mmhg=35.0, heater_on=False))
    s, _ = run([replace(x, heartbeat=6) for x in ticks(0.35, 2.0, **off)], state=s)
    assert reset(s, replace(OK, t_s=2.05, heartbeat=6, **off), LIM)[1] == ""


def test_a_silent_controller_that_was_heating_holds_a_heater_whose_command_reads_0() -> None:
    """The controller falls silent at 1.0 s while heating; the heater's own watchdog zeroes its
    command register at 1.3 s, and an element stuck on would go on heating unseen: the guard
    opens the contactor when the heartbeat hazard has lasted its budget (2.2 s). A heater that
    read 0 since before the controller fell silent is left alone."""
    moving = ticks(0.0, 1.0)
    frozen = [replace(x, heartbeat=20) for x in ticks(1.05, 1.25)]
    zeroed = [replace(x, heartbeat=20, heater_on=False) for x in ticks(1.3, 2.3)]
    s, events = run(moving + frozen + zeroed)
    assert sorted(s.latched) == ["heater", "pump"]
    assert "heartbeat unchanged for 1.2 s" in s.latched["heater"]
    assert sum(e.startswith("heater held off") for e in events) == 1
    s, _ = run(ticks(0.0, 0.9) + [replace(x, heater_on=False) for x in ticks(0.95, 1.0)])
    silent = [replace(x, heartbeat=20, heater_on=False) for x in ticks(1.05, 2.5)]
    s, _ = run(silent, state=s)
    assert list(s.latched) == ["pump"]


def test_a_heater_whose_water_warms_against_its_0_is_held_off() -> None:
    """A welded relay with a failed thermostat: the controller, alive, commands 0 and the water
    goes on warming at 3.8 degC/min (800 W into 3 kg) to the cap. Its rise since the command
    read 0 (1 degC by then, HEATER_RISE_C 0.5) counts as on: the guard opens the contactor when
    the water hazard has lasted its budget. A heater that obeys leaves the water cooling, after
    its element's stored heat has added a few tenths, and nothing is latched however long the
    hazard lasts."""
    welded = [replace(x, heater_on=False, water_c=41.0 + 0.063 * x.t_s) for x in ticks(0.0, 20.0)]
    s, events = run(welded)
    assert list(s.latched) == ["heater"]
    assert s.latched["heater"].startswith("water 42.")
    assert len(events) == 1
    assert "still on 0.20 s" in events[0]  # the cap crossed at 15.9 s, held off at 16.1 s
    # Switched off at the cap: +0.3 degC over 6 s from the element's stored heat, then cooling.
    coasting = [
        replace(x, heater_on=False, water_c=42.0 + min(0.05 * x.t_s, 0.6 - 0.05 * x.t_s))
        for x in ticks(0.0, 8.0)
    ]
    s, events = run(coasting)
    assert events == []
    assert "water" in hazards(s, coasting[-1], LIM)


def test_a_noisy_water_probe_is_not_a_heater_warming_against_its_0() -> None:
    """A water probe with 0.1 degC of noise on a steady water, the heater commanded 0 and the
    controller silent: at 20 Hz its raw extremes are 0.5 degC apart within a minute, which
    counted as a rise and latched the heater, 'controller heartbeat unchanged'. The rise is
    taken on the water smoothed over WATER_SMOOTH_S."""
    rng = random.Random(7)
    noisy = [
        replace(x, heartbeat=0, water_c=38.0 + rng.gauss(0.0, 0.15))
        for x in ticks(0.0, 600.0, heater_on=False, pump_on=False)
    ]
    raw = [x.water_c for x in noisy if x.water_c is not None]
    assert max(raw) - min(raw) > 1.0
    s, events = run(noisy)
    assert "heartbeat" in hazards(s, noisy[-1], LIM)
    assert events == []
    assert s.latched == {}


def test_a_water_warmed_by_the_perfusate_is_not_a_heater_on() -> None:
    """The heater off and no controller (a tune just ended): the water, under the perfusate,
    warms 1 degC toward it through the exchanger. The heartbeat hazard concerns nothing then:
    the heater stays enabled (it latched, 'controller heartbeat unchanged', in a clean-clone
    run of the tune test before the water had to lead the perfusate)."""
    moving = ticks(0.0, 1.0, heater_on=False, pump_on=False, water_c=34.0, perfusate_c=36.0)
    silent = [
        replace(x, heartbeat=20, water_c=34.0 + 0.1 * (x.t_s - 1.0))
        for x in ticks(1.05, 11.0, heater_on=False, pump_on=False, perfusate_c=36.0)
    ]
    s, events = run(moving + silent)
    assert "heartbeat" in hazards(s, silent[-1], LIM)
    assert events == []
    assert s.latched == {}


def test_heartbeat_clock_starts_at_the_first_cycle() -> None:
    s, _ = run([replace(OK, t_s=5.0, heartbeat=None)])
    assert s.heartbeat_t_s == 5.0
    assert hazards(s, replace(OK, t_s=5.9), LIM) == {}
    assert "heartbeat" in hazards(s, replace(OK, t_s=6.0), LIM)


def test_a_latch_holds_until_reset_and_reset_is_refused_while_the_hazard_persists() -> None:
    s, _ = run(ticks(0.0, 0.3, pressure_mmhg=35.0))
    assert list(s.latched) == ["pump"]
    # Pressure back to normal, the pump commanded on again: still held off.
    d = decide(s, replace(OK, t_s=0.35, heartbeat=100), LIM)
    assert d.enabled["pump"] is False
    assert d.events == ()
    # Reset while the pressure is still high: refused, naming why; the latch stays.
    s2, why = reset(d.state, replace(OK, t_s=0.4, pressure_mmhg=33.0, heartbeat=101), LIM)
    assert why.startswith("refused: PA pressure 33.0 >= 30")
    assert list(s2.latched) == ["pump"]
    # A hazard of the other actuator does not block the reset.
    s3, why = reset(s2, replace(OK, t_s=0.45, water_c=43.0, heartbeat=102), LIM)
    assert why == ""
    assert s3.latched == {}
    assert s3.since == {}
    assert decide(s3, replace(OK, t_s=0.5, heartbeat=103), LIM).enabled["pump"] is True


def test_an_actuator_already_latched_gets_no_second_event() -> None:
    s, events = run(ticks(0.0, 0.3, pressure_mmhg=35.0) + ticks(0.35, 0.6, air=True))
    assert len(events) == 1
    assert "PA pressure" in s.latched["pump"]


def test_a_latch_found_at_start_up_is_kept() -> None:
    s = State(latched={"pump": "held off when the guard started (enable found off)"})
    d = decide(s, OK, LIM)
    assert d.enabled == {"pump": False, "heater": True}


# --------------------------------------------------------------------------- config


def _sim_with_guard(**guard: object) -> object:
    data = parse_yaml(Path("config/sim.yaml").read_text(encoding="utf-8"), "sim.yaml")
    overlay = parse_yaml(Path("config/guard.yaml").read_text(encoding="utf-8"), "guard.yaml")
    for key in ("devices", "signals"):
        data[key].update(overlay[key])
    data["simulator"]["bindings"].update(overlay["simulator"]["bindings"])
    data["guard"] = {**overlay["guard"], **guard}
    return data


def test_limits_default_to_the_control_limits() -> None:
    cfg = load_config("config/sim.yaml", ["config/guard.yaml"])
    lim = limits_of(cfg)
    assert lim.pressure_stop_mmhg == cfg.control.pressure.stop_mmhg == 30.0
    assert lim.perfusate_max_c == cfg.control.temperature.max_c
    assert lim.water_max_c == cfg.control.temperature.water_cap_c
    assert lim.reservoir_low_ml == cfg.alarms.reservoir_low_ml
    assert lim.budget_s == pytest.approx(cfg.control.tick_period_s + 0.1)
    loose = config_from_data(_sim_with_guard(pressure_stop_mmhg=35, budget_s=0.3))
    assert limits_of(loose).pressure_stop_mmhg == 35.0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("guard", "message"),
    [
        ({"pressure_stop_mmhg": 28}, "guard.pressure_stop_mmhg: 28 is below control.pressure."),
        ({"perfusate_max_c": 38.5}, "guard.perfusate_max_c: 38.5 is below control.temperature."),
        ({"water_max_c": 41}, "guard.water_max_c: 41 is below control.temperature.water_cap_c"),
        ({"reservoir_low_ml": 400}, "guard.reservoir_low_ml: 400 is above alarms.reservoir_low"),
        ({"budget_s": 0.05}, "guard.budget_s: 0.05 s is shorter than control.tick_period_s"),
        ({"heartbeat_signal": None}, "guard.heartbeat_signal: required when guard.heartbeat is"),
        ({"pump_enable": "nope"}, "guard.pump_enable: no signal named 'nope'"),
        ({"pump_enable": "pa_pressure"}, "guard.pump_enable: signal 'pa_pressure' is not writ"),
        ({"pump_enable": "pump_speed_setpoint"}, "guard.pump_enable: 'pump_speed_setpoint' is a"),
        ({"heater_enable": "pump_run_enable"}, "guard.heater_enable: the pump and the heater ne"),
        ({"heartbeat_signal": "pump_watchdog"}, "guard.heartbeat_signal: 'pump_watchdog' must b"),
        ({"cycle_s": 0.2}, "guard.cycle_s: Input should be less than or equal to 0.1"),
    ],
)
def test_guard_config_errors_name_the_key_path(guard: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_data(_sim_with_guard(**guard))
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems


def test_the_guard_refuses_an_rs485_device() -> None:
    data = _sim_with_guard()
    data["devices"]["safety_io"] = {  # type: ignore[index]
        "transport": "rtu",
        "unit_id": 3,
        "serial": {"port": "/dev/ttyX", "parity": "N", "stopbits": 2},
    }
    data["simulator"]["serial_ports"] = {"/dev/ttyX": "/tmp/ttyY"}  # type: ignore[index]
    with pytest.raises(ConfigError) as e:
        config_from_data(data)
    assert any("guard: device 'safety_io' is on an RS-485 line" in p for p in e.value.problems)


def test_the_guard_package_does_not_import_the_control_core() -> None:
    code = (
        "import sys; import ilup_controller.guard.runner; "
        "from ilup_controller.config import load_config; "
        "load_config('config/sim.yaml', ['config/guard.yaml']); "
        "bad = sorted(m for m in sys.modules if m.startswith(('ilup_controller.core', "
        "'ilup_controller.runtime', 'ilup_controller.commands', 'ilup_controller.record'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
