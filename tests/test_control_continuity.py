"""The pump never restarts by itself (issue 8, defect 1), in virtual time against the plant:
after a control stall longer than the device watchdog, and after a pump drive that stopped
acknowledging writes, the pump stays stopped in safe_stop with a high-priority alarm until the
operator resets and resumes; then the flow ramps up again from zero."""

from __future__ import annotations

import copy
import json

import pytest

from ilup_controller.config import load_config
from ilup_controller.core.procedure import Phase
from sim.faults import parse_runtime_fault
from sim.virtual import Sample, VirtualCart


@pytest.fixture(scope="module")
def perfusing() -> VirtualCart:
    cart = VirtualCart(load_config("config/sim.yaml"))
    cart.run_for(300.0)
    assert cart.core.procedure.phase is Phase.perfusion
    assert cart.plant.truth().pump_speed_rpm > 10.0
    return cart


def _alarm(s: Sample, alarm_id: str) -> tuple[str, str] | None:
    a = next((a for a in s.decision.alarms if a.alarm_id == alarm_id), None)
    return None if a is None else (str(a.priority), a.message)


def test_a_stalled_controller_does_not_restart_the_pump(perfusing: VirtualCart) -> None:
    cart = copy.deepcopy(perfusing)
    wd = cart.cfg.devices["pump"].watchdog
    assert wd is not None
    cart.stall(2.0)  # SIGSTOP for 2 s: the drive's watchdog (1 s) stops the pump meanwhile
    assert cart.plant.truth().pump_speed_rpm == 0.0
    first = cart.tick()
    # The first tick after the stall commands nothing: its readings are 2 s old.
    assert first.decision.loop.pump_speed_rpm == 0.0
    assert first.decision.loop.heater_pct == 0.0
    assert first.decision.phase is Phase.safe_stop
    found = _alarm(first, "control_interrupted")
    assert found is not None
    assert found[0] == "high"
    assert "no control for 2.00 s" in found[1]
    after: list[Sample] = []
    cart.run_for(60.0, after.append)
    assert max(s.truth.pump_speed_rpm for s in after) == 0.0
    assert max(s.decision.loop.pump_speed_rpm for s in after) == 0.0
    assert {s.decision.phase for s in after} == {Phase.safe_stop}

    # Resume is refused while the alarm is latched; after reset it ramps from zero.
    t = cart.t_s
    assert not hasattr(cart.core.resume(t, "op"), "to_phase")
    assert cart.core.reset("control_interrupted", t, "op").ok
    resumed = cart.core.resume(t, "op")
    assert getattr(resumed, "to_phase", None) is Phase.perfusion
    ramp: list[Sample] = []
    cart.run_for(10.0, ramp.append)
    assert ramp[0].decision.loop.flow_setpoint_ml_min < 5.0
    assert ramp[-1].decision.loop.pump_speed_rpm > 0.0


def test_a_short_stall_is_not_an_interruption(perfusing: VirtualCart) -> None:
    cart = copy.deepcopy(perfusing)
    cart.stall(0.5)  # under GAP_FRACTION x the 1 s watchdog: the drive never stopped
    after: list[Sample] = []
    cart.run_for(10.0, after.append)
    assert all(s.decision.alarms == [] for s in after)
    assert min(s.truth.pump_speed_rpm for s in after) > 10.0


def test_a_pump_drive_that_stops_answering_is_not_restarted(perfusing: VirtualCart) -> None:
    """Modbus exception 6 (busy) for 5 s: the drive's watchdog stops the pump; when it answers
    again the pump stays stopped."""
    cart = copy.deepcopy(perfusing)
    t0 = cart.t_s
    fault = {"kind": "device_exception", "device": "pump", "exception_code": 6, "duration_s": 5}
    cart.injector.apply(parse_runtime_fault(json.dumps(fault).encode()))
    samples: list[Sample] = []
    cart.run_for(30.0, samples.append)
    onset = next(s for s in samples if _alarm(s, "pump_link_lost"))
    # Latched within 0.75 x the 1 s watchdog (+ one tick), before the drive stops itself.
    assert onset.decision.t_s - t0 <= 0.75 + 0.11
    assert onset.decision.loop.pump_speed_rpm == 0.0
    assert onset.decision.phase is Phase.safe_stop
    found = _alarm(onset, "pump_link_lost")
    assert found is not None
    assert found[0] == "high"
    back = [s for s in samples if s.decision.t_s >= t0 + 6.0]
    assert back
    assert max(s.truth.pump_speed_rpm for s in back) == 0.0
    assert max(s.decision.loop.pump_speed_rpm for s in back) == 0.0
    # The condition is gone but the alarm stays latched: the operator decides.
    assert _alarm(back[-1], "pump_link_lost") is not None


def test_a_heater_that_stops_answering_leaves_the_pump_running(perfusing: VirtualCart) -> None:
    cart = copy.deepcopy(perfusing)
    fault = {"kind": "device_exception", "device": "heater", "exception_code": 6, "duration_s": 5}
    cart.injector.apply(parse_runtime_fault(json.dumps(fault).encode()))
    samples: list[Sample] = []
    cart.run_for(30.0, samples.append)
    assert any(_alarm(s, "heater_link_lost") for s in samples)
    assert all(s.decision.phase is Phase.perfusion for s in samples)
    late = [s for s in samples if s.decision.t_s >= samples[0].decision.t_s + 6.0]
    assert max(s.decision.loop.heater_pct for s in late) == 0.0  # held off until reset
    assert min(s.truth.pump_speed_rpm for s in samples) > 10.0


def test_no_rise_in_pump_speed_without_a_usable_pressure(perfusing: VirtualCart) -> None:
    """A tick never commands more pump from readings that are stale: pressure missing means
    the limiter is blind, so the speed may not rise (the sensor alarm then stops it)."""
    cart = VirtualCart(load_config("config/sim.yaml"))
    samples: list[Sample] = []
    cart.run_for(40.0, samples.append)  # priming: the flow ramps up
    rising = samples[-1].decision.loop.pump_speed_rpm
    pressure = cart.cfg.control.pressure.measured

    def blind(t_s: float, readings: dict[str, object]) -> dict[str, object]:
        readings.pop(pressure, None)
        return readings

    blind_samples = [cart.tick(blind) for _ in range(5)]  # type: ignore[arg-type]
    assert max(s.decision.loop.pump_speed_rpm for s in blind_samples) <= rising
