"""Commissioning without processes: the pure evaluations, the gate and the calibrate command."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ilup_controller.commands.models import CalibrateCommand
from ilup_controller.commands.processor import CommandProcessor, ParsedCommand
from ilup_controller.commissioning import evaluate as ev
from ilup_controller.commissioning.gate import apply, evaluate
from ilup_controller.commissioning.results import CommissioningRun, config_hash, save
from ilup_controller.config import ConfigError, load_config
from ilup_controller.core.cart import CartCore
from ilup_controller.core.procedure import Phase
from ilup_controller.core.types import Reading

SIM = Path("config/sim.yaml")
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _real(tmp_path: Path) -> Path:
    text = SIM.read_text().replace("simulated: true", "simulated: false")
    text = text.replace("waive: true", "waive: false")
    text = text.replace('"*": operator', "op1: operator")
    path = tmp_path / "cart.yaml"
    path.write_text(text)
    return path


def _run(cfg_hash: str, *, passed: bool = True, hours_ago: float = 1.0) -> CommissioningRun:
    t = NOW - timedelta(hours=hours_ago)
    return CommissioningRun(
        cart_id="sim_cart_1",
        config_sha256=cfg_hash,
        started=t,
        finished=t,
        operator="alice",
        passed=passed,
        pressure_zero_mmhg=2.1,
        stroke_volume_ml_per_rev=29.8,
        steps=[],
    )


def test_waiver_only_on_a_simulated_cart(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SIM.read_text().replace("simulated: true", "simulated: false"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "commissioning.waive" in e.value.report()


def test_gate_needs_a_recent_passing_run_for_this_configuration(tmp_path: Path) -> None:
    cfg = load_config(_real(tmp_path))
    f = tmp_path / "cart.commissioning.json"
    assert evaluate(cfg, f, NOW).status == "not_commissioned"
    save(_run(config_hash(cfg)), f)
    gate = evaluate(cfg, f, NOW)
    assert gate.status == "commissioned"
    assert gate.valid_until == NOW + timedelta(hours=23)
    for run, why in (
        (_run("0" * 64), "another configuration"),
        (_run(config_hash(cfg), passed=False), "failed"),
        (_run(config_hash(cfg), hours_ago=25.0), "25.0 h old"),
    ):
        save(run, f)
        gate = evaluate(cfg, f, NOW)
        assert gate.status == "not_commissioned"
        assert why in gate.detail


def test_core_refuses_priming_and_applies_the_calibration(tmp_path: Path) -> None:
    cfg = load_config(_real(tmp_path))
    f = tmp_path / "cart.commissioning.json"
    core = CartCore(cfg, 0.0)
    apply(core, evaluate(cfg, f, NOW), 0.0, NOW)
    refused = core.request_phase(Phase.priming, 1.0, "test")
    assert getattr(refused, "reason", "").startswith("not_commissioned")
    save(_run(config_hash(cfg), hours_ago=23.5), f)
    core = CartCore(cfg, 0.0)
    apply(core, evaluate(cfg, f, NOW), 0.0, NOW)
    assert core.controller.stroke_volume_ml_per_rev == 29.8
    # 0.5 h left: refused after it, as the age is judged when priming is asked for.
    assert core.request_phase(Phase.priming, 1900.0, "late").reason.startswith(  # type: ignore[union-attr]
        "not_commissioned"
    )
    r = core.step(1.0, {cfg.control.pressure.measured: Reading(5.1, 1.0)})
    assert r.measured.pressure_mmhg == pytest.approx(3.0)  # 5.1 - 2.1


_IDS = iter(range(1000))


def _cmd(action: str, sv: float | None = None) -> ParsedCommand:
    c = CalibrateCommand(
        command_id=f"c{next(_IDS)}",
        issued_at=NOW,
        action=action,  # type: ignore[arg-type]
        stroke_volume_ml_per_rev=sv,
    )
    return ParsedCommand("calibrate", "op1", c, NOW)


def test_calibrate_command_zeroes_and_sets_stroke_volume_in_idle_only() -> None:
    cfg = load_config(SIM)
    core = CartCore(cfg, 0.0)
    proc = CommandProcessor(cfg)
    early = proc.apply(_cmd("zero_pressure"), core, 0.5, "op1")
    assert early.reason == "refused"
    assert "need 5 s" in early.detail
    t = 0.0
    for _ in range(60):  # 6 s at rest: 3 mmHg line + 0.4 offset
        t += 0.1
        core.step(t, {cfg.control.pressure.measured: Reading(3.4, t)})
    ok = proc.apply(_cmd("zero_pressure"), core, t, "op1")
    assert ok.status == "ok", ok
    assert core.calibration.pressure_zero_mmhg == pytest.approx(0.4)
    assert proc.apply(_cmd("stroke_volume", 50.0), core, t, "op1").reason == "out_of_range"
    assert proc.apply(_cmd("stroke_volume", 30.0), core, t, "op1").status == "ok"
    assert core.controller.stroke_volume_ml_per_rev == 30.0
    core.procedure.phase = Phase.priming  # (the sensors here would block a real request)
    moved = proc.apply(_cmd("stroke_volume", 31.0), core, t, "op1")
    assert moved.reason == "not_allowed_in_phase"


def test_evaluations_name_the_fix() -> None:
    cfg = load_config(SIM)
    flow = cfg.signals["flow"]
    v = ev.in_range("flow", flow, [1.2e8, 3.0])
    assert not v.ok
    assert "word_order: little" in v.fix
    v = ev.in_range("pa_pressure", cfg.signals["pa_pressure"], [-62.5])
    assert "broken loop" in v.fix
    v, sv = ev.stroke_volume(33.0, [(4.5, 133.6), (9.1, 270.3)])
    assert sv == pytest.approx(29.7, abs=0.05)
    assert v.ok
    assert v.warn
    trip = ev.watchdog_trip("pump", "pump_speed", 1.0, 0.1, 4.0, 3.9, [(0.5, 3.9), (1.5, 3.9)])
    assert not trip.ok
    assert "does not stop it" in trip.fix
    assert ev.watchdog_trip("pump", "pump_speed", 1.0, 0.1, 4.0, 3.9, [(0.5, 3.9), (1.05, 0.0)]).ok
    assert ev.zero_reference_mmhg(cfg) == 3.0


def test_a_register_without_a_reply_is_not_called_a_register_map_error() -> None:
    """The devices step: a refused register points at the map, a read that timed out at the
    device's timeout (it answered for its other signals); both are named with what was seen."""
    v = ev.unread(
        "heater",
        {
            "heater_power_setpoint": ("no_reply", "timed out after 2.00 s"),
            "heater_water_temp": ("refused", "Modbus exception 2 (ILLEGAL_ADDRESS)"),
        },
    )
    assert not v.ok
    assert "heater_power_setpoint (timed out after 2.00 s)" in v.measured
    map_fix, late_fix = v.fix.split("; ")
    assert map_fix == (
        "check table, address and data_type of signals.heater_water_temp against the device manual"
    )
    assert late_fix.startswith("signals.heater_power_setpoint: no reply in time")
    assert "devices.heater.timeout_s" in late_fix
    only_late = ev.unread("pump", {"pump_speed": ("no_reply", "timed out after 2.00 s")})
    assert "table" not in only_late.fix
    # The same for the read-back after a write.
    cfg = load_config(SIM)
    sig = cfg.signals["heater_power_setpoint"]
    late = ev.readback("heater_power_setpoint", sig, 0.0, None, ("no_reply", "timed out"))
    assert late.measured == "heater_power_setpoint: wrote 0, read nothing back (timed out)"
    assert "devices.heater.timeout_s" in late.fix
    assert "table" not in late.fix
    refused = ev.readback("heater_power_setpoint", sig, 0.0, None, ("refused", "exception 2"))
    assert "check table and address" in refused.fix
