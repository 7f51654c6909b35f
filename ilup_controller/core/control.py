"""The control core: a deterministic step function of (time, targets, readings).

Nothing here awaits, sleeps, reads a clock or touches a socket. The runtime calls
:meth:`Controller.step` once per tick with the tick's monotonic time and the latest readings, and
writes the returned commands; a test calls the same method against the plant model in virtual
time. Order inside one step:

1. sense: each reading is usable only if present, fresh, finite and inside its plausible range;
2. regulate: flow loop (feed-forward from stroke volume + PI trim) and pressure limiter, the lower
   demand wins (override control); perfusate -> water -> heater cascade;
3. interlocks: checked every tick on the measurements themselves, after and independent of the
   PID outputs; they can only lower a command, never raise it;
4. rate limits, then every loop tracks the command really applied (anti-windup, bumpless).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from ilup_controller.config.models import CartConfig
from ilup_controller.core.pid import Pid
from ilup_controller.core.ramp import approach
from ilup_controller.core.types import Readings


class Phase(StrEnum):
    idle = "idle"
    perfusion = "perfusion"
    safe_stop = "safe_stop"


class Fault(StrEnum):
    """Interlock conditions that hold an actuator in its safe state."""

    pressure_sensor = "pressure_sensor_unusable"
    pressure_stop = "pressure_above_stop_limit"
    flow_sensor = "flow_sensor_unusable"
    temperature_sensor = "temperature_sensor_unusable"
    water_sensor = "water_sensor_unusable"
    water_cap = "water_at_cap"
    perfusate_high = "perfusate_above_max"


RAMP_LEAD_C = 0.2

# Faults that stay set after their condition clears, until the operator resets them.
LATCHING = frozenset({Fault.pressure_stop, Fault.perfusate_high})


@dataclass(frozen=True, slots=True)
class Measured:
    flow_ml_min: float | None
    pressure_mmhg: float | None
    temperature_c: float | None
    water_temperature_c: float | None


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything one tick decided; the runtime writes ``outputs`` and publishes the rest."""

    t_s: float
    phase: Phase
    measured: Measured
    flow_target_ml_min: float
    flow_setpoint_ml_min: float
    pressure_limit_mmhg: float
    temperature_target_c: float
    temperature_setpoint_c: float
    water_setpoint_c: float | None
    pump_speed_rpm: float
    heater_pct: float
    pump_limited_by: str
    heater_limited_by: str
    faults: tuple[str, ...]
    outputs: dict[str, float]


class Controller:
    def __init__(self, cfg: CartConfig, t0_s: float) -> None:
        c = cfg.control
        self._cfg = cfg
        self._ranges = {name: sig.range for name, sig in cfg.signals.items()}
        self.phase = Phase.idle
        self.flow_target_ml_min = c.flow.target_ml_min
        self.pressure_limit_mmhg = c.pressure.limit_mmhg
        self.temperature_target_c = c.temperature.target_c
        self._flow_ramp_ml_min_per_s = c.flow.target_ml_min / c.flow.ramp_s if c.flow.ramp_s else math.inf
        self._flow_sp = 0.0
        self._temp_sp: float | None = None
        self._pump_rpm = 0.0
        self._heater_pct = 0.0
        self._pressure_filtered: float | None = None
        self._latched: set[Fault] = set()
        self._flow_pid = Pid(c.flow.pid, -c.flow.trim_limit_rpm, c.flow.trim_limit_rpm)
        self._pressure_pid = Pid(c.pressure.pid, 0.0, c.flow.speed_max_rpm)
        t = c.temperature
        # Outer loop output: water setpoint relative to the perfusate setpoint.
        self._outer_pid = Pid(t.outer_pid, -10.0, t.max_gradient_c)
        self._inner_pid = Pid(t.inner_pid, 0.0, t.heater_max_pct)
        self._last_t_s = t0_s

    # ------------------------------------------------------------------ operator-facing API

    def start(self) -> None:
        """Begin perfusion: the flow setpoint ramps up from zero."""
        self.phase = Phase.perfusion
        self._flow_sp = 0.0

    def safe_stop(self) -> None:
        """Pump to zero, heater off, until started again."""
        self.phase = Phase.safe_stop

    @property
    def latched_faults(self) -> frozenset[Fault]:
        return frozenset(self._latched)

    def reset_latched(self, measured: Measured) -> set[Fault]:
        """Clear latched faults whose condition has cleared; returns those that remain."""
        still = {f for f in self._latched if self._condition_present(f, measured)}
        self._latched = still
        return set(still)

    # ------------------------------------------------------------------ the step

    def step(self, t_s: float, readings: Readings) -> Decision:
        dt_s = t_s - self._last_t_s
        if not dt_s > 0.0:
            # Twice at one time would make the derivative explode (libraries.md, fact 11).
            raise ValueError(f"step at t={t_s} is not after the previous step at {self._last_t_s}")
        self._last_t_s = t_s
        m = self._sense(t_s, readings)
        faults = self._faults(m)
        if self._cfg.control.autostart and self.phase is Phase.idle and _all_present(m):
            self.start()
        pump_rpm, pump_by = self._pump(dt_s, m, faults)
        heater_pct, water_sp, heater_by = self._heater(dt_s, m, faults)
        c = self._cfg.control
        return Decision(
            t_s=t_s,
            phase=self.phase,
            measured=m,
            flow_target_ml_min=self.flow_target_ml_min,
            flow_setpoint_ml_min=self._flow_sp,
            pressure_limit_mmhg=self.pressure_limit_mmhg,
            temperature_target_c=self.temperature_target_c,
            temperature_setpoint_c=(
                self._temp_sp if self._temp_sp is not None else self.temperature_target_c
            ),
            water_setpoint_c=water_sp,
            pump_speed_rpm=pump_rpm,
            heater_pct=heater_pct,
            pump_limited_by=pump_by,
            heater_limited_by=heater_by,
            faults=tuple(sorted(str(f) for f in faults)),
            outputs={c.flow.command: pump_rpm, c.temperature.command: heater_pct},
        )

    # ------------------------------------------------------------------ sensing and interlocks

    def _usable(self, t_s: float, readings: Readings, name: str) -> float | None:
        r = readings.get(name)
        if r is None or t_s - r.t > self._cfg.control.stale_after_s or not math.isfinite(r.value):
            return None
        rng = self._ranges.get(name)
        if rng is not None and not rng[0] <= r.value <= rng[1]:
            return None
        return r.value

    def _sense(self, t_s: float, readings: Readings) -> Measured:
        c = self._cfg.control
        return Measured(
            flow_ml_min=self._usable(t_s, readings, c.flow.measured),
            pressure_mmhg=self._usable(t_s, readings, c.pressure.measured),
            temperature_c=self._usable(t_s, readings, c.temperature.measured),
            water_temperature_c=self._usable(t_s, readings, c.temperature.water_measured),
        )

    def _condition_present(self, fault: Fault, m: Measured) -> bool:
        c = self._cfg.control
        match fault:
            case Fault.pressure_sensor:
                return m.pressure_mmhg is None
            case Fault.pressure_stop:
                return m.pressure_mmhg is not None and m.pressure_mmhg >= c.pressure.stop_mmhg
            case Fault.flow_sensor:
                return m.flow_ml_min is None
            case Fault.temperature_sensor:
                return m.temperature_c is None
            case Fault.water_sensor:
                return m.water_temperature_c is None
            case Fault.water_cap:
                w = m.water_temperature_c
                return w is not None and w >= c.temperature.water_cap_c
            case Fault.perfusate_high:
                return m.temperature_c is not None and m.temperature_c >= c.temperature.max_c
        raise AssertionError(fault)  # pragma: no cover - exhaustive

    def _faults(self, m: Measured) -> set[Fault]:
        present = {f for f in Fault if self._condition_present(f, m)}
        self._latched |= present & LATCHING
        return present | self._latched

    # ------------------------------------------------------------------ pump

    def _pump(self, dt_s: float, m: Measured, faults: set[Fault]) -> tuple[float, str]:
        c = self._cfg.control
        fc = c.flow
        if self.phase is Phase.perfusion:
            step = self._flow_ramp_ml_min_per_s * dt_s
            self._flow_sp = approach(self._flow_sp, self.flow_target_ml_min, step, step)
        else:
            self._flow_sp = 0.0
        ff_rpm = self._flow_sp / fc.stroke_volume_ml_per_rev
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
            pressure_demand = self._pressure_pid.update(
                regulate_at, self._pressure_filtered, dt_s
            )

        demand, by = (
            (flow_demand, "flow") if flow_demand <= pressure_demand else (pressure_demand, "pressure")
        )
        demand = min(max(demand, 0.0), fc.speed_max_rpm)
        # Interlocks: on measurements, after the PID, whatever the PID said.
        if self.phase is not Phase.perfusion:
            demand, by = 0.0, str(self.phase)
        elif Fault.pressure_stop in faults:
            demand, by = 0.0, str(Fault.pressure_stop)
        elif Fault.pressure_sensor in faults:
            demand, by = 0.0, str(Fault.pressure_sensor)
        # Speeding up is slew-limited; slowing down is always allowed at once.
        self._pump_rpm = approach(self._pump_rpm, demand, fc.slew_rpm_per_s * dt_s, math.inf)
        self._flow_pid.track(self._pump_rpm - ff_rpm)
        self._pressure_pid.track(self._pump_rpm)
        return self._pump_rpm, by

    # ------------------------------------------------------------------ heater

    def _heater(
        self, dt_s: float, m: Measured, faults: set[Fault]
    ) -> tuple[float, float | None, str]:
        tc = self._cfg.control.temperature
        temp_c, water_c = m.temperature_c, m.water_temperature_c
        blocked = self._heater_block(m, faults)
        if temp_c is not None:
            if self._temp_sp is None or blocked is not None:
                # The rewarming ramp starts from where the perfusate is when heating may begin.
                self._temp_sp = min(temp_c, self.temperature_target_c)
            # Rewarming is rate-limited (<= 0.5 degC/min) and may lead the perfusate by only
            # RAMP_LEAD_C, so a lagging circuit is not then rewarmed at full power.
            self._temp_sp = approach(
                self._temp_sp,
                min(self.temperature_target_c, max(temp_c + RAMP_LEAD_C, self._temp_sp - 1e-9)),
                tc.ramp_c_per_min / 60.0 * dt_s,
                math.inf,
            )
        if blocked is not None or temp_c is None or water_c is None or self._temp_sp is None:
            self._heater_pct = 0.0
            self._inner_pid.track(0.0)
            if temp_c is not None and water_c is not None and self._temp_sp is not None:
                self._outer_pid.track(water_c - self._temp_sp)
            return 0.0, None, blocked or "temperature"
        offset_c = self._outer_pid.update(self._temp_sp, temp_c, dt_s)
        water_sp = min(
            self._temp_sp + offset_c, temp_c + tc.max_gradient_c, tc.water_cap_c - 0.5
        )
        self._outer_pid.track(water_sp - self._temp_sp)
        heater = self._inner_pid.update(water_sp, water_c, dt_s)
        self._heater_pct = min(max(heater, 0.0), tc.heater_max_pct)
        self._inner_pid.track(self._heater_pct)
        return self._heater_pct, water_sp, "temperature"

    def _heater_block(self, m: Measured, faults: set[Fault]) -> str | None:
        for f in (
            Fault.temperature_sensor,
            Fault.water_sensor,
            Fault.perfusate_high,
            Fault.water_cap,
        ):
            if f in faults:
                return str(f)
        if self.phase is not Phase.perfusion:
            return str(self.phase)
        flow = m.flow_ml_min
        if flow is None or flow < self._cfg.control.temperature.min_flow_ml_min:
            return "no_flow"
        return None


def _all_present(m: Measured) -> bool:
    return None not in (m.flow_ml_min, m.pressure_mmhg, m.temperature_c, m.water_temperature_c)
