"""The step test of one loop as a pure state machine: (time, measurements) -> actuator commands.

No I/O and no clock: ``tuning/driver.py`` feeds it readings from the real devices, and a test can
feed it a plant model. Every sample it re-checks the safe bounds, after deciding the step:

* the pump only under the pressure limit: PA pressure at or above ``limit - margin`` aborts the
  test (pump 0, heater 0); the pump speed never exceeds ``speed_max_rpm`` and speeds up no
  faster than ``slew_rpm_per_s``. A thermal test on a stiff lung, whose pressure nears
  ``limit - margin`` (within ``PRESSURE_HEADROOM_MMHG``) before its baseline, backs the pump off
  10 % at a time and settles again, and runs at that flow if it still proves flow with the
  margin of ``default_plan``; the exchanger's model does not depend on the flow;
* the heater only with flow proven (``flow >= min_flow_ml_min``) and under every cap: water
  below ``water_cap_c - 0.5`` (the controller's own margin), perfusate below ``max_c - 0.5``,
  water-to-perfusate gradient below ``max_gradient_c``, power at most ``heater_max_pct``. A cap
  reached during the step ends the test early (heater off) with the data so far; lost flow, a
  missing or stale reading, or a pressure over its bound aborts it without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from ilup_controller.config.models import CartConfig
from ilup_controller.core.sensors import resolution_of
from ilup_controller.tuning.identify import Fopdt, IdentificationError, fit_lag, fit_step

Loop = Literal["water", "perfusate", "flow", "pressure"]
LOOPS: tuple[Loop, ...] = ("water", "perfusate", "flow", "pressure")
CAP_MARGIN_C = 0.5
# Most of the perfusate step that an unresolved drift (one LSB over the baseline) may fake.
DRIFT_SHARE = 0.05
# Before its baseline, a thermal test whose PA pressure comes this far under limit - margin cuts
# the pump's speed by BACK_OFF_FACTOR, at most once per BACK_OFF_WAIT_S: the lung's pressure lags
# the flow by a few of its R x C seconds, and at the drive's own slew (3 s to 500 mL/min) a stiff
# lung (37 WU, random_2026_38) went on from 15.7 mmHg at the end of the ramp to 23.0 mmHg, limit -
# margin, 7 s later. (A 60 s ramp instead moved every other plant's model: hx_20's C/UA 191 ->
# 169 s against 190 true.)
PRESSURE_HEADROOM_MMHG = 3.0
BACK_OFF_FACTOR = 0.9
BACK_OFF_WAIT_S = 5.0
# The flow of a thermal test is at least this many times min_flow_ml_min (flow proven, with room).
THERMAL_FLOW_MARGIN = 1.5


class Stage(StrEnum):
    ramp = "ramp"  # pump up to the operating point
    settle = "settle"  # let the circuit settle at the operating point
    baseline = "baseline"  # record before the step
    step = "step"  # record the response
    done = "done"
    aborted = "aborted"


@dataclass(frozen=True, slots=True)
class Measured:
    flow_ml_min: float | None
    pressure_mmhg: float | None
    temperature_c: float | None
    water_c: float | None


@dataclass(frozen=True, slots=True)
class Command:
    pump_rpm: float
    heater_pct: float


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Operating point, step and durations (plant seconds) of one loop's test."""

    loop: Loop
    base_flow_ml_min: float
    step_size: float  # rpm (flow, pressure), heater % (water) or water degC (perfusate)
    settle_s: float
    baseline_s: float
    hold_s: float


def default_plan(cfg: CartConfig, loop: Loop, step_size: float | None = None) -> StepPlan:
    c = cfg.control
    target = c.flow.target_ml_min
    if loop in ("flow", "pressure"):
        # From 70 % of the flow target up to the target: the range where the loops work.
        rpm = 0.3 * target / c.flow.stroke_volume_ml_per_rev
        return StepPlan(loop, 0.7 * target, step_size or rpm, 5.0, 5.0, 15.0)
    base = max(target, c.temperature.min_flow_ml_min * THERMAL_FLOW_MARGIN)
    if loop == "water":
        return StepPlan(loop, base, step_size or 30.0, 60.0, 60.0, 900.0)
    step_c, hold_s = step_size or 3.0, 600.0
    return StepPlan(loop, base, step_c, 60.0, _drift_baseline_s(cfg, step_c, hold_s), hold_s)


def _drift_baseline_s(cfg: CartConfig, step_c: float, hold_s: float) -> float:
    """Long enough that one LSB of the perfusate register over the baseline, taken as drift
    and extrapolated over the hold, is at most DRIFT_SHARE of the step. A 0.1 degC probe that
    ticked once in a 60 s baseline was read as 0.1 degC/min of drift and left a model at half
    the perfusate's gain (random_2026_31: K 0.34 against about 0.6); 400 s gave 0.57."""
    sig = cfg.signals[cfg.control.temperature.measured]
    lsb_c = resolution_of(sig.scale, str(sig.data_type))
    return max(60.0, lsb_c * hold_s / (DRIFT_SHARE * abs(step_c)))


@dataclass
class StepTest:
    cfg: CartConfig
    plan: StepPlan
    stage: Stage = Stage.ramp
    reason: str = ""  # why the test ended early or was aborted
    t_step_s: float | None = None
    du: float = 0.0
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (t, u, y)
    water_c: list[float] = field(default_factory=list)  # measured water at each sample
    _stage_t0: float | None = None
    _pump_rpm: float = 0.0
    _water_sp_c: float | None = None
    _inner_i: float = 0.0
    # The flow a stiff lung's back-off left a thermal test at (module docstring), else None.
    held_flow_ml_min: float | None = None
    _cut_at_s: float | None = None  # the last back-off; from then on the pump holds its speed

    @property
    def finished(self) -> bool:
        return self.stage in (Stage.done, Stage.aborted)

    def _rpm_of(self, flow_ml_min: float) -> float:
        return flow_ml_min / self.cfg.control.flow.stroke_volume_ml_per_rev

    def _abort(self, why: str) -> Command:
        self.stage, self.reason = Stage.aborted, why
        self._pump_rpm = 0.0
        return Command(0.0, 0.0)

    def _end_early(self, why: str) -> None:
        self.stage, self.reason = Stage.done, why

    def _next(self, stage: Stage, t_s: float) -> None:
        self.stage, self._stage_t0 = stage, t_s

    def step(self, t_s: float, dt_s: float, m: Measured) -> Command:
        """The commands for this sample; after the test ends, always pump 0 and heater 0."""
        if self.finished:
            return Command(0.0, 0.0)
        c = self.cfg.control
        p = self.plan
        if m.pressure_mmhg is None or m.flow_ml_min is None:
            return self._abort("flow or pressure reading missing or stale")
        bound = c.pressure.limit_mmhg - c.pressure.margin_mmhg
        if m.pressure_mmhg >= bound:
            return self._abort(
                f"PA pressure {m.pressure_mmhg:.1f} mmHg reached limit - margin {bound:.1f} mmHg"
            )
        thermal = p.loop in ("water", "perfusate")
        if thermal and (m.temperature_c is None or m.water_c is None):
            return self._abort("temperature reading missing or stale")
        if self._stage_t0 is None:
            self._stage_t0 = t_s
        elapsed = t_s - self._stage_t0

        # 1. pump demand of this stage
        target_rpm = self._rpm_of(p.base_flow_ml_min) if self._cut_at_s is None else self._pump_rpm
        if self.stage is Stage.step and p.loop in ("flow", "pressure"):
            target_rpm += self.du
        near_bound = m.pressure_mmhg >= bound - PRESSURE_HEADROOM_MMHG
        waited = self._cut_at_s is None or t_s - self._cut_at_s >= BACK_OFF_WAIT_S
        if thermal and self.stage in (Stage.ramp, Stage.settle) and near_bound and waited:
            # Slowing the pump is always safe; the settling starts again at the lower flow.
            cut_ml_min = m.flow_ml_min * BACK_OFF_FACTOR
            least_ml_min = c.temperature.min_flow_ml_min * THERMAL_FLOW_MARGIN
            if cut_ml_min < least_ml_min:
                return self._abort(
                    f"PA pressure {m.pressure_mmhg:.1f} mmHg at {m.flow_ml_min:.0f} mL/min, within "
                    f"{PRESSURE_HEADROOM_MMHG:g} of limit - margin {bound:.1f} mmHg, before the "
                    f"flow reached {least_ml_min:.0f} mL/min: too little flow to heat"
                )
            target_rpm = self._pump_rpm = self._pump_rpm * BACK_OFF_FACTOR
            self._cut_at_s = t_s
            self._next(Stage.settle, t_s)
            elapsed = 0.0
        if self.stage is Stage.ramp and abs(self._pump_rpm - target_rpm) < 1e-9:
            self._next(Stage.settle, t_s)
        elif self.stage is Stage.settle and elapsed >= p.settle_s:
            if thermal and m.flow_ml_min < c.temperature.min_flow_ml_min:
                return self._abort(
                    f"flow {m.flow_ml_min:.0f} mL/min not proven "
                    f"(>= {c.temperature.min_flow_ml_min:.0f}): no heating"
                )
            if self._cut_at_s is not None:
                self.held_flow_ml_min = m.flow_ml_min
            self._next(Stage.baseline, t_s)
        elif self.stage is Stage.baseline and elapsed >= p.baseline_s:
            self._next(Stage.step, t_s)
            self.t_step_s = t_s
            self.du = self._step_size(m)
            if p.loop in ("flow", "pressure"):
                target_rpm += self.du
        elif self.stage is Stage.step and elapsed >= p.hold_s:
            self._end_early("")
        target_rpm = min(target_rpm, c.flow.speed_max_rpm)
        self._pump_rpm = min(target_rpm, self._pump_rpm + c.flow.slew_rpm_per_s * dt_s)

        # 2. heater demand, then every bound on it
        heater = self._heater(dt_s, m) if thermal else 0.0
        if heater > 0.0:
            assert m.temperature_c is not None
            assert m.water_c is not None
            if m.flow_ml_min < c.temperature.min_flow_ml_min:
                return self._abort(f"flow {m.flow_ml_min:.0f} mL/min lost while heating")
            cap = self._cap_reached(m.temperature_c, m.water_c)
            if cap:
                heater = 0.0
                if self.stage is Stage.step:
                    self._end_early(cap)
        heater = min(max(heater, 0.0), c.temperature.heater_max_pct)

        # 3. record
        if self.stage in (Stage.baseline, Stage.step):
            u, y = self._record(m)
            self.samples.append((t_s, u, y))
            if m.water_c is not None:
                self.water_c.append(m.water_c)
        if self.finished:
            return Command(0.0, 0.0)
        return Command(self._pump_rpm, heater)

    def _step_size(self, m: Measured) -> float:
        p, tc = self.plan, self.cfg.control.temperature
        if p.loop != "perfusate":
            return p.step_size
        assert m.water_c is not None
        assert m.temperature_c is not None
        sp = self._water_sp_c if self._water_sp_c is not None else m.water_c
        # The water setpoint step stays clear of the water cap and of the gradient limit.
        room = min(
            tc.water_cap_c - CAP_MARGIN_C - sp,
            m.temperature_c + tc.max_gradient_c - CAP_MARGIN_C - sp,
        )
        return max(0.0, min(p.step_size, room))

    def _cap_reached(self, temperature_c: float, water_c: float) -> str:
        tc = self.cfg.control.temperature
        if water_c >= tc.water_cap_c - CAP_MARGIN_C:
            return f"water {water_c:.2f} degC at its cap - {CAP_MARGIN_C}"
        if temperature_c >= tc.max_c - CAP_MARGIN_C:
            return f"perfusate {temperature_c:.2f} degC at max_c - {CAP_MARGIN_C}"
        if water_c - temperature_c >= tc.max_gradient_c:
            return f"gradient {water_c - temperature_c:.2f} degC at its limit"
        return ""

    def _heater(self, dt_s: float, m: Measured) -> float:
        p = self.plan
        if self.stage not in (Stage.baseline, Stage.step):
            return 0.0
        if p.loop == "water":
            return self.du if self.stage is Stage.step else 0.0
        # Perfusate loop: the input is the water setpoint, held by the configured inner PI.
        assert m.water_c is not None
        if self._water_sp_c is None:
            self._water_sp_c = m.water_c
        sp = self._water_sp_c + (self.du if self.stage is Stage.step else 0.0)
        g = self.cfg.control.temperature.inner_pid
        err = sp - m.water_c
        out = g.kp * err + self._inner_i + g.ki * err * dt_s
        hi = self.cfg.control.temperature.heater_max_pct
        if 0.0 <= out <= hi or (out > hi and err < 0) or (out < 0 and err > 0):
            self._inner_i += g.ki * err * dt_s  # conditional integration: no wind-up
        return min(max(out, 0.0), hi)

    def _record(self, m: Measured) -> tuple[float, float]:
        p = self.plan
        on = self.stage is not Stage.baseline
        if p.loop == "flow":
            assert m.flow_ml_min is not None
            return self._rpm_of(p.base_flow_ml_min) + (self.du if on else 0.0), m.flow_ml_min
        if p.loop == "pressure":
            assert m.pressure_mmhg is not None
            return self._rpm_of(p.base_flow_ml_min) + (self.du if on else 0.0), m.pressure_mmhg
        if p.loop == "water":
            assert m.water_c is not None
            return (self.du if on else 0.0), m.water_c
        assert m.temperature_c is not None
        base = self._water_sp_c if self._water_sp_c is not None else math.nan
        return base + (self.du if on else 0.0), m.temperature_c


def fit_test(test: StepTest) -> Fopdt:
    """The model of a finished test's step response (raises IdentificationError).

    The perfusate loop's model is from the measured water, not from its setpoint, to the
    perfusate: the exchanger alone, without the water loop's own lag, whose time constant over
    gain is the exchanger's C/UA that the rewarming feed-forward needs."""
    if test.t_step_s is None or test.du == 0.0:
        raise IdentificationError("no step was applied (no room under the caps?)")
    ts = [s[0] for s in test.samples]
    ys = [s[2] for s in test.samples]
    if test.plan.loop == "perfusate" and len(test.water_c) == len(ts):
        return fit_lag(ts, test.water_c, ys, t_step_s=test.t_step_s)
    # Temperature tests start from a circuit that drifts; flow and pressure sit at rest.
    return fit_step(
        ts, ys, t_step_s=test.t_step_s, du=test.du, detrend=test.plan.loop in ("water", "perfusate")
    )
