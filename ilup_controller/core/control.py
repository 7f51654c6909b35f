"""The control loops: a deterministic step of (time, measurements, phase, safe actions).

Nothing here awaits, sleeps, reads a clock or touches a socket. Order inside one step:

1. regulate: flow loop (feed-forward from stroke volume + PI trim) and pressure limiter, the
   lower demand wins (override control); perfusate -> water -> heater cascade;
2. apply the safe actions the alarm system asks for (pump stop/hold, heater off), and the
   phase (no pumping outside priming/perfusion/washout): they can only lower a command;
3. rate limits, then every loop tracks the command really applied (anti-windup, bumpless).
"""

from __future__ import annotations

import math
from typing import Literal

from ilup_controller.config.models import CartConfig
from ilup_controller.core.catalogue import HeaterAction, PumpAction
from ilup_controller.core.monitor import SERVO_STOP, Measured
from ilup_controller.core.pid import Pid, Tracking
from ilup_controller.core.procedure import RUNNING, Phase
from ilup_controller.core.ramp import approach
from ilup_controller.core.rewarm import GradientLoop
from ilup_controller.core.types import value_type

ControlMode = Literal["flow", "pressure"]
OutputMode = Literal["auto", "manual"]
SERVO_LOOKAHEAD_TICKS = 2  # reading age + time for a stop command to take effect


@value_type
class LoopOutput:
    pump_speed_rpm: float
    heater_pct: float
    flow_setpoint_ml_min: float
    temperature_setpoint_c: float
    water_setpoint_c: float | None
    pump_limited_by: str
    heater_limited_by: str
    heater_enabled: bool  # the temperature loop, not a block, decided the heater power
    rate_integral_scale: float  # the rewarming rate loop's ki over the configured (core/rewarm.py)


REWARM_INTEGRAL = "rewarm_integral"  # the event kind; its value is the new integral scale


@value_type
class ControlEvent:
    """The controller changed how it controls (not an alarm): for the events topic and the
    procedure record, so that a reader of the record sees why the loop behaved differently,
    and a restarted daemon continues with what this plant taught it (runtime/recovery.py)."""

    t_s: float
    kind: str
    message: str
    value: float


def detuned_event(t_s: float, before: LoopOutput | None, now: LoopOutput) -> ControlEvent | None:
    """The rewarming rate loop slowed its integral this tick (a warming burst, core/rewarm.py)."""
    if before is None or now.rate_integral_scale >= before.rate_integral_scale:
        return None
    return rate_integral_event(t_s, now.rate_integral_scale, "the warming came in a burst")


def rate_integral_event(t_s: float, scale: float, why: str) -> ControlEvent:
    return ControlEvent(
        t_s,
        REWARM_INTEGRAL,
        f"rewarming: {why}; the rate loop's integral gain is now {scale:g} x "
        "control.temperature.gradient_pid.ki (kept from now on)",
        scale,
    )


class Controller:
    def __init__(self, cfg: CartConfig, t0_s: float) -> None:
        c = cfg.control
        self._cfg = cfg
        self.flow_target_ml_min = c.flow.target_ml_min
        self.pressure_limit_mmhg = c.pressure.limit_mmhg
        self.temperature_target_c = c.temperature.target_c
        # Feed-forward: the configured stroke volume, or a calibrated one (core/calibration.py).
        self.stroke_volume_ml_per_rev = c.flow.stroke_volume_ml_per_rev
        self._flow_ramp_ml_min_per_s = (
            c.flow.target_ml_min / c.flow.ramp_s if c.flow.ramp_s else math.inf
        )
        self.control_mode: ControlMode = "flow"
        self.output_mode: OutputMode = "auto"
        self.manual_speed_rpm = 0.0
        self._flow_sp = 0.0
        self._temp_sp: float | None = None
        self._pump_rpm = 0.0
        self._held_rpm: float | None = None
        self._heater_pct = 0.0
        self._pressure_filtered: float | None = None
        self._last_pressure: float | None = None
        self._flow_pid = Pid(c.flow.pid, -c.flow.trim_limit_rpm, c.flow.trim_limit_rpm)
        self._pressure_pid = Pid(c.pressure.pid, 0.0, c.flow.speed_max_rpm)
        t = c.temperature
        # Outer loop: the water-to-perfusate gradient from the warming rate (core/rewarm.py).
        self._gradient = GradientLoop(t, cfg.alarms.heating_rate_window_s)
        self._heating = False
        self._inner_pid = Pid(t.inner_pid, 0.0, t.heater_max_pct)

    def keep_rate_integral_scale(self, scale: float) -> None:
        """After a restart: the rate loop's integral as slowed earlier in this procedure."""
        self._gradient.integral_scale = min(self._gradient.integral_scale, scale)

    def set_mode(
        self, control: ControlMode, output: OutputMode, manual_speed_rpm: float | None = None
    ) -> None:
        """Constant flow: the flow loop leads and the pressure limiter caps it. Constant
        pressure: the same override pair, with the flow target a ceiling under which the
        pressure loop holds limit - margin. Manual: the operator sets the pump speed; the
        pressure cap and every safe action still apply. Changes are bumpless: every loop
        tracks the speed really applied."""
        if output == "manual":
            if manual_speed_rpm is None:
                raise ValueError("manual output needs a pump speed")
            self.manual_speed_rpm = min(
                max(manual_speed_rpm, 0.0), self._cfg.control.flow.speed_max_rpm
            )
        self.control_mode, self.output_mode = control, output

    @property
    def flow_leads(self) -> bool:
        """Whether a flow below its setpoint is a deviation (not in pressure or manual mode)."""
        return self.control_mode == "flow" and self.output_mode == "auto"

    def phase_target_ml_min(self, phase: Phase) -> float:
        if phase is Phase.priming:
            return min(self._cfg.procedure.priming_flow_ml_min, self.flow_target_ml_min)
        if phase in (Phase.perfusion, Phase.washout):
            return self.flow_target_ml_min
        return 0.0

    # ------------------------------------------------------------------ the step

    def step(
        self,
        dt_s: float,
        m: Measured,
        phase: Phase,
        pump_action: PumpAction,
        heater_action: HeaterAction,
        pump_reason: str | None = None,
        heater_reason: str | None = None,
    ) -> LoopOutput:
        if not dt_s > 0.0:
            # Twice at one time would make the derivative explode (libraries.md, fact 11).
            raise ValueError(f"dt_s must be > 0, got {dt_s}")
        pump_rpm, pump_by = self._pump(dt_s, m, phase, pump_action, pump_reason)
        heater_pct, water_sp, heater_by = self._heater(dt_s, m, phase, heater_action, heater_reason)
        return LoopOutput(
            pump_speed_rpm=pump_rpm,
            heater_pct=heater_pct,
            flow_setpoint_ml_min=self._flow_sp,
            temperature_setpoint_c=(
                self._temp_sp if self._temp_sp is not None else self.temperature_target_c
            ),
            water_setpoint_c=water_sp,
            pump_limited_by=pump_by,
            heater_limited_by=heater_by,
            heater_enabled=heater_by == "temperature",
            rate_integral_scale=self._gradient.integral_scale,
        )

    # ------------------------------------------------------------------ pump

    def _pump(
        self, dt_s: float, m: Measured, phase: Phase, action: PumpAction, reason: str | None
    ) -> tuple[float, str]:
        c = self._cfg.control
        fc = c.flow
        stopped = phase not in RUNNING or action is PumpAction.stop
        if stopped:
            # The ramp starts again from zero once the pump may run again.
            self._flow_sp = 0.0
        else:
            step = self._flow_ramp_ml_min_per_s * dt_s
            self._flow_sp = approach(self._flow_sp, self.phase_target_ml_min(phase), step, step)
        ff_rpm = self._flow_sp / self.stroke_volume_ml_per_rev
        if m.flow_ml_min is not None:
            trim_rpm = self._flow_pid.update(self._flow_sp, m.flow_ml_min, dt_s)
        else:
            trim_rpm = self._flow_pid.output  # open loop on feed-forward, trim frozen
        flow_demand = ff_rpm + trim_rpm

        pressure_demand = math.inf
        if m.pressure_mmhg is not None:
            alpha = 1.0 if c.pressure.filter_s <= 0 else min(1.0, dt_s / c.pressure.filter_s)
            prev = self._pressure_filtered
            self._pressure_filtered = (
                m.pressure_mmhg if prev is None else prev + alpha * (m.pressure_mmhg - prev)
            )
            regulate_at = self.pressure_limit_mmhg - c.pressure.margin_mmhg
            pressure_demand = self._pressure_pid.update(regulate_at, self._pressure_filtered, dt_s)

        lead, lead_by = (
            (self.manual_speed_rpm, "manual")
            if self.output_mode == "manual"
            else (flow_demand, "flow")
        )
        demand, by = (lead, lead_by) if lead <= pressure_demand else (pressure_demand, "pressure")
        demand = min(max(demand, 0.0), fc.speed_max_rpm)
        # Safe actions: on measurements, after the PID, whatever the PID said.
        if phase not in RUNNING:
            demand, by = 0.0, str(phase)
        elif action is PumpAction.stop:
            demand, by = 0.0, reason or "stop"
        elif self._servo_stop(dt_s, m.pressure_mmhg):
            demand, by = 0.0, SERVO_STOP
        elif m.pressure_mmhg is None and demand > self._pump_rpm:
            # No usable pressure (missing, stale, implausible): the limiter is blind, so the
            # speed may not rise; the sensor alarm decides about stopping after its delay.
            demand, by = self._pump_rpm, "pressure_unmeasured"
        if action is PumpAction.hold:
            if self._held_rpm is None:
                self._held_rpm = self._pump_rpm
            if demand > self._held_rpm:
                demand, by = self._held_rpm, reason or "hold"
        else:
            self._held_rpm = None
        # Speeding up is slew-limited; slowing down is always allowed at once.
        slew_rpm = fc.slew_rpm_per_s * dt_s
        self._pump_rpm = approach(self._pump_rpm, demand, slew_rpm, math.inf)
        self._flow_pid.track(self._pump_rpm - ff_rpm, _tracking("flow", by), slew_rpm)
        self._pressure_pid.track(self._pump_rpm, _tracking("pressure", by), slew_rpm)
        return self._pump_rpm, by

    def _servo_stop(self, dt_s: float, pressure_mmhg: float | None) -> bool:
        """Stop at once (before the alarm's condition delay) when the pressure is, or will be by
        the time a stop takes effect, at the stop limit. The reading is a tick old and the stop
        lands a tick later: against a clamped line rising tens of mmHg/s, waiting for the
        crossing itself would overshoot by several mmHg."""
        prev, self._last_pressure = self._last_pressure, pressure_mmhg
        if pressure_mmhg is None:
            return False
        rising_mmhg_s = 0.0 if prev is None else max(0.0, (pressure_mmhg - prev) / dt_s)
        expected = pressure_mmhg + rising_mmhg_s * SERVO_LOOKAHEAD_TICKS * dt_s
        return expected >= self._cfg.control.pressure.stop_mmhg

    # ------------------------------------------------------------------ heater

    def _heater(
        self, dt_s: float, m: Measured, phase: Phase, action: HeaterAction, reason: str | None
    ) -> tuple[float, float | None, str]:
        tc = self._cfg.control.temperature
        temp_c, water_c = m.temperature_c, m.water_temperature_c
        blocked = self._heater_block(m, phase, action, reason)
        if blocked is not None or temp_c is None or water_c is None:
            self._heater_pct = 0.0
            # Restarted from nothing when heating resumes: tracking 0 against the last P would
            # leave the integral at -P, and a flow flickering at min_flow_ml_min would wind it
            # down further on every flicker.
            self._inner_pid.reset(0.0)
            self._heating = False
            self._gradient.observe(dt_s, temp_c)
            if temp_c is not None:
                self._temp_sp = min(temp_c, self.temperature_target_c)
            return 0.0, None, blocked or "temperature_unmeasured"
        if not self._heating:
            self._gradient.reset(water_c, temp_c)
            self._heating = True
        demand = self._gradient.step(dt_s, temp_c, water_c, self.temperature_target_c)
        # Shown as the setpoint: where the asked rate is heading (the target once landing).
        self._temp_sp = min(
            self.temperature_target_c,
            demand.perfusate_c + demand.rate_target_c_per_min / 60.0 * tc.landing_s,
        )
        water_sp = demand.water_setpoint_c
        heater = self._inner_pid.update(water_sp, water_c, dt_s)
        self._heater_pct = min(max(heater, 0.0), tc.heater_max_pct)
        self._inner_pid.track(self._heater_pct)
        return self._heater_pct, water_sp, "temperature"

    def _heater_block(
        self, m: Measured, phase: Phase, action: HeaterAction, reason: str | None
    ) -> str | None:
        if action is HeaterAction.off:
            return reason or "off"
        if phase not in RUNNING:
            return str(phase)
        if m.temperature_c is None or m.water_temperature_c is None:
            return "temperature_unmeasured"
        flow = m.flow_ml_min
        if flow is None or flow < self._cfg.control.temperature.min_flow_ml_min:
            return "no_flow"
        # Independent of any alarm: water at its cap or perfusate at its maximum is off now.
        tc = self._cfg.control.temperature
        if m.water_temperature_c >= tc.water_cap_c:
            return "water_cap"
        if m.temperature_c >= tc.max_c:
            return "perfusate_max"
        return None


def _tracking(loop: str, by: str) -> Tracking:
    """How a loop of the flow/pressure override pair follows the speed applied (core/pid.py)."""
    if by == loop:
        return "limited"  # its own demand, at most cut by the slew limit
    if by in ("flow", "pressure"):
        return "headroom"  # the other loop of the pair won
    return "bumpless"  # held, stopped, manual
