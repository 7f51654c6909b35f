"""The whole deterministic core of one cart, stepped once per tick.

sense (plausibility) -> monitor (alarm conditions) -> alarm engine (delay, latch) -> procedure
(phase, drug timer) -> loops with the safe actions applied. A pure function of time, readings
and what the operator asked; the runtime and the virtual-time harness call the same ``step``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ilup_controller.config.models import CartConfig
from ilup_controller.core.alarms import ActiveAlarm, AlarmEngine, AlarmEvent, Verdict
from ilup_controller.core.calibration import Calibration, PressureZeroing, zeroed
from ilup_controller.core.catalogue import CATALOGUE, PumpAction
from ilup_controller.core.continuity import Continuity
from ilup_controller.core.control import (
    ControlEvent,
    Controller,
    LoopOutput,
    detuned_event,
    rate_integral_event,
)
from ilup_controller.core.monitor import Context, Measured, Monitor
from ilup_controller.core.procedure import RUNNING, Phase, PhaseEvent, Procedure, Refusal
from ilup_controller.core.types import Readings, value_type


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restart takes back from the procedure record."""

    phase: Phase
    flow_target_ml_min: float
    pressure_limit_mmhg: float
    temperature_target_c: float
    drug_elapsed_s: float
    latched_alarms: tuple[str, ...]
    outage_s: float
    rate_integral_scale: float = 1.0  # the rewarming rate loop's, slowed by bursts


# What a tick reports happened: alarms, phase changes, and the controller changing how it controls.
CoreEvent = AlarmEvent | PhaseEvent | ControlEvent


@value_type
class TickResult:
    t_s: float
    phase: Phase
    measured: Measured
    loop: LoopOutput
    outputs: dict[str, float]  # command signal -> value, for the Modbus edge
    alarms: list[ActiveAlarm]
    events: list[CoreEvent] = field(default_factory=list)
    drug_elapsed_s: float = 0.0
    drug_remaining_s: float = 0.0
    drug_counting: bool = False  # the drug timer ran this tick (paused off target)
    audio_paused_until_s: float | None = None
    flow_target_ml_min: float = 0.0
    pressure_limit_mmhg: float = 0.0
    temperature_target_c: float = 0.0


class CartCore:
    def __init__(self, cfg: CartConfig, t0_s: float) -> None:
        self.cfg = cfg
        self.monitor = Monitor(cfg, t0_s)
        self.alarms = AlarmEngine(cfg.alarms.delays_s, audio_pause_s=cfg.alarms.audio_pause_s)
        self.procedure = Procedure(cfg.procedure, t0_s)
        self.controller = Controller(cfg, t0_s)
        self.continuity = Continuity(cfg, t0_s)
        self._last_t_s = t0_s
        self._last: LoopOutput | None = None
        self._pending: list[CoreEvent] = []
        self.calibration = Calibration(
            0.0, cfg.control.flow.stroke_volume_ml_per_rev, "configuration"
        )
        self.zeroing = PressureZeroing()
        self.last_measured: Measured | None = None
        # Why priming may not start ("" = it may): set by the daemon from the commissioning
        # gate (commissioning/gate.py); ``priming_allowed_until_s``: the passing run expires.
        self.priming_block = ""
        self.priming_allowed_until_s: float | None = None

    # ------------------------------------------------------------------ calibration

    @property
    def last_pump_command_rpm(self) -> float:
        return self._last.pump_speed_rpm if self._last is not None else 0.0

    def set_calibration(self, cal: Calibration) -> None:
        """Apply a pressure zero and stroke volume from now on (caller checked idle/pump)."""
        self.calibration = cal
        self.controller.stroke_volume_ml_per_rev = cal.stroke_volume_ml_per_rev

    def _commissioning_refusal(self, t_s: float) -> Refusal | None:
        if self.priming_block:
            return Refusal(f"not_commissioned: {self.priming_block}")
        until = self.priming_allowed_until_s
        if until is not None and t_s > until:
            return Refusal(
                "not_commissioned: the last passing commissioning run is older than "
                f"commissioning.max_age_h ({self.cfg.commissioning.max_age_h:g} h): run "
                "ilup commission again"
            )
        return None

    # ------------------------------------------------------------------ operator API

    def pump_blockers(self) -> tuple[str, ...]:
        """Active alarms whose safe action stops the pump: no pump start while any is present."""
        return tuple(
            a
            for a, d in CATALOGUE.items()
            if d.pump is PumpAction.stop and self.alarms.is_present(a)
        )

    def request_phase(
        self, to: Phase, t_s: float, reason: str, operator: str | None = None
    ) -> PhaseEvent | Refusal:
        if to is Phase.priming and self.procedure.phase is Phase.idle:
            refused = self._commissioning_refusal(t_s)
            if refused is not None:
                return refused
        result = self.procedure.request(
            to, t_s, reason, blockers=self.pump_blockers(), operator=operator
        )
        if isinstance(result, PhaseEvent):
            self._pending.append(result)
        return result

    def resume(self, t_s: float, operator: str | None = None) -> PhaseEvent | Refusal:
        result = self.procedure.resume(t_s, self.pump_blockers(), operator)
        if isinstance(result, PhaseEvent):
            self._pending.append(result)
        return result

    def acknowledge(self, alarm_id: str, t_s: float, operator: str) -> Verdict:
        verdict, events = self.alarms.acknowledge(alarm_id, t_s, operator)
        self._pending.extend(events)
        return verdict

    def pause_audio(self, t_s: float, operator: str) -> Verdict:
        verdict, events = self.alarms.pause_audio(t_s, operator)
        self._pending.extend(events)
        return verdict

    def reset(self, alarm_id: str, t_s: float, operator: str) -> Verdict:
        verdict, events = self.alarms.reset(alarm_id, t_s, operator)
        self._pending.extend(events)
        return verdict

    def restore(self, t_s: float, snapshot: Restored) -> None:
        """Start from what the record says after a crash: safe state, nothing resumes by
        itself (safety.md 5.3). Targets and the drug timer come back; latched alarms stay."""
        ctl = self.controller
        ctl.flow_target_ml_min = snapshot.flow_target_ml_min
        ctl.pressure_limit_mmhg = snapshot.pressure_limit_mmhg
        ctl.temperature_target_c = snapshot.temperature_target_c
        reason = f"restart after {snapshot.outage_s:.1f} s"
        if snapshot.rate_integral_scale < 1.0:
            # What this plant showed before the restart still holds: it warms in bursts.
            ctl.keep_rate_integral_scale(snapshot.rate_integral_scale)
            self._pending.append(
                rate_integral_event(t_s, snapshot.rate_integral_scale, "restored from the record")
            )
        if snapshot.phase is not Phase.idle:
            self._pending.append(
                self.procedure.restore(t_s, snapshot.phase, snapshot.drug_elapsed_s, reason)
            )
        for alarm_id in snapshot.latched_alarms:
            if alarm_id in CATALOGUE:
                self._pending.extend(
                    self.alarms.raise_latched(alarm_id, t_s, detail="restored from the record")
                )
        self._pending.extend(
            self.alarms.raise_latched(
                "controller_restarted",
                t_s,
                value=snapshot.outage_s,
                detail=f"last phase {snapshot.phase}",
            )
        )

    def hold_for_unreadable_record(self, t_s: float, path: str, why: str) -> None:
        """The last record could not be read, so an unfinished procedure cannot be ruled out:
        start held in safe_stop (resuming to idle) with a latched alarm naming the file."""
        self._pending.append(self.procedure.hold(t_s, f"last record unreadable: {path}"))
        self._pending.extend(
            self.alarms.raise_latched("record_unreadable", t_s, detail=f"{path} ({why})")
        )

    # ------------------------------------------------------------------ the tick

    def step(
        self,
        t_s: float,
        readings: Readings,
        *,
        devices_down: tuple[str, ...] = (),
        overruns_total: int = 0,
        remote_ok: bool = True,
        recorder_problem: str = "",
        last_write_ok_s: Mapping[str, float | None] | None = None,
        identity_clash: str = "",
        guard_problem: str = "",
    ) -> TickResult:
        """``last_write_ok_s``: per device, when its last write was acknowledged (the device
        links' view; None when there are none): an actuator that stopped hearing us is latched
        off before its own watchdog stops it (core/continuity.py)."""
        dt_s = t_s - self._last_t_s
        if not dt_s > 0.0:
            raise ValueError(f"step at t={t_s} is not after the previous step at {self._last_t_s}")
        self._last_t_s = t_s
        events, self._pending = self._pending, []
        ctl, proc = self.controller, self.procedure
        pressure_signal = self.cfg.control.pressure.measured
        self.zeroing.add(readings.get(pressure_signal))
        readings = zeroed(readings, pressure_signal, self.calibration.pressure_zero_mmhg)
        last = self._last
        ctx = Context(
            phase=proc.phase,
            flow_setpoint_ml_min=last.flow_setpoint_ml_min if last else 0.0,
            flow_target_ml_min=ctl.phase_target_ml_min(proc.phase),
            temperature_setpoint_c=last.temperature_setpoint_c
            if last
            else ctl.temperature_target_c,
            temperature_target_c=ctl.temperature_target_c,
            pressure_limit_mmhg=ctl.pressure_limit_mmhg,
            pump_command_rpm=last.pump_speed_rpm if last else 0.0,
            heater_pct=last.heater_pct if last else 0.0,
            heater_enabled=last.heater_enabled if last else False,
            water_setpoint_c=last.water_setpoint_c if last else None,
            pump_limited_by=last.pump_limited_by if last else "",
            flow_leads=ctl.flow_leads,
            devices_down=devices_down,
            overruns_total=overruns_total,
            remote_ok=remote_ok,
            recorder_problem=recorder_problem,
            identity_clash=identity_clash,
            guard_problem=guard_problem,
        )
        m, sensor_conditions = self.monitor.sense(t_s, readings, ctx)
        self.last_measured = m
        conditions = {
            **sensor_conditions,
            **self.monitor.evaluate(t_s, dt_s, m, ctx),
            **self.continuity.evaluate(
                t_s,
                dt_s,
                last_write_ok_s,
                pump_on=last is not None and last.pump_speed_rpm > 0.0,
                heater_on=last is not None and last.heater_pct > 0.0,
            ),
        }
        alarm_events = self.alarms.update(t_s, conditions)
        events.extend(alarm_events)
        events.extend(self._safe_stop_on(alarm_events, t_s))
        pump_action, heater_action, pump_by, heater_by = self.alarms.actions()

        if (
            self.cfg.control.autostart
            and proc.phase is Phase.idle
            and _all_present(m)
            and not self.pump_blockers()
            and self._commissioning_refusal(t_s) is None
        ):
            started = proc.request(Phase.priming, t_s, "autostart: all sensors reading")
            if isinstance(started, PhaseEvent):
                events.append(started)
        loop = ctl.step(dt_s, m, proc.phase, pump_action, heater_action, pump_by, heater_by)
        self._last = loop
        if (detuned := detuned_event(t_s, last, loop)) is not None:
            events.append(detuned)
        events.extend(proc.tick(t_s, dt_s, at_target=self._at_target(m, loop)))
        c = self.cfg.control
        return TickResult(
            t_s=t_s,
            phase=proc.phase,
            measured=m,
            loop=loop,
            outputs={c.flow.command: loop.pump_speed_rpm, c.temperature.command: loop.heater_pct},
            alarms=self.alarms.active(t_s),
            events=events,
            drug_elapsed_s=proc.drug_elapsed_s,
            drug_remaining_s=proc.drug_remaining_s,
            drug_counting=proc.drug_counting,
            audio_paused_until_s=self.alarms.audio_paused_until(),
            flow_target_ml_min=ctl.flow_target_ml_min,
            pressure_limit_mmhg=ctl.pressure_limit_mmhg,
            temperature_target_c=ctl.temperature_target_c,
        )

    def _safe_stop_on(self, alarm_events: list[AlarmEvent], t_s: float) -> list[PhaseEvent]:
        """A running procedure goes to safe_stop on the onset of an alarm that says control
        was lost: the operator, not the next tick, decides to resume."""
        if self.procedure.phase not in RUNNING:
            return []
        for e in alarm_events:
            if e.kind == "onset" and e.alarm_id is not None and CATALOGUE[e.alarm_id].safe_stop:
                stopped = self.procedure.request(Phase.safe_stop, t_s, f"alarm {e.alarm_id}")
                return [stopped] if isinstance(stopped, PhaseEvent) else []
        return []

    def _at_target(self, m: Measured, loop: LoopOutput) -> bool:
        """Whether the drug-phase timer runs: the lead variable of the pump's mode and the
        perfusate temperature on target, with the pump running."""
        p, ctl = self.cfg.procedure, self.controller
        target_q = ctl.flow_target_ml_min
        q, temp = m.flow_ml_min, m.temperature_c
        if q is None or temp is None or loop.pump_speed_rpm <= 0.0:
            return False
        flow_on = abs(q - target_q) <= p.at_target_flow_pct / 100.0 * target_q
        if ctl.control_mode == "pressure" and ctl.output_mode == "auto" and not flow_on:
            # Constant pressure: the flow target is a ceiling and a lower flow is the mode
            # working. Counting only at the ceiling stopped the timer for good (0 s in 40 min
            # on a lung taking 840 of 1000 mL/min at 22.7 mmHg), with no alarm.
            held_at = ctl.pressure_limit_mmhg - self.cfg.control.pressure.margin_mmhg
            flow_on = (
                loop.pump_limited_by == "pressure"
                and m.pressure_mmhg is not None
                and abs(m.pressure_mmhg - held_at) <= p.at_target_pressure_mmhg
            )
        return flow_on and abs(temp - ctl.temperature_target_c) <= p.at_target_temperature_c


def _all_present(m: Measured) -> bool:
    return None not in (m.flow_ml_min, m.pressure_mmhg, m.temperature_c, m.water_temperature_c)
