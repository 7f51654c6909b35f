"""Stuck sensors found by analytical redundancy: a reading that did not move while the rest of
the process says it must have. Pure code: explicit time, fed each tick with the usable values,
the current run of identical readings of each sensor (core/sensors.py) and the commands of the
previous tick.

A healthy sensor whose reading stays identical keeps its true value within about one least
significant bit (its register resolution) of that reading: the rules below ask for a move of the
process well beyond that, with a margin for its noise and for what the model does not know.

- **Flow against the pump.** A roller pump delivers speed x stroke volume, within
  ``FLOW_GAIN_LOW``-``FLOW_GAIN_HIGH`` of it (stroke volume +-10 %, slip under afterload). A flow
  reading held at v is stuck once the pump speed (tacho, else command) has been at a speed where
  v is out of that band by more than 2 LSB + ``FLOW_MARGIN_ML_MIN`` (+ ``FLOW_CUTOFF_ML_MIN`` below:
  a meter with a low-flow cut-off reads 0.0 at a few mL/min).
- **Pressure against flow.** PA pressure rises with flow through the cannula and the lung. A
  pressure reading held while the flow moved by dQ is stuck once ``PRESSURE_R_SHARE`` x the
  identified resistance (the pressure/flow ratio last seen while the reading moved, floored at
  ``PRESSURE_R_FLOOR``) x dQ exceeds 2 LSB + ``PRESSURE_MARGIN_MMHG``. Not above the pressure
  limit: a line trapped by an occlusion holds its pressure with the pump stopped.
- **Perfusate against water.** C dTp/dt = UA (Tw - Tp) - losses. While the perfusate reading is
  held at v (and the flow is steady, so the losses are too), the integral of (Tw - v) over time
  must grow linearly; a water temperature that moved for long enough bends it by more than
  (2 LSB + ``TEMPERATURE_MARGIN_C``) / k_min, with k_min = 1 / ``PERFUSATE_TAU_MAX_S`` (the slowest
  exchanger against the largest perfusate volume), plus the probe's transport delay. Slow by
  nature: minutes of a moving water temperature.

The water temperature and the reservoir have no process redundancy here: they rely on the loss
of their noise signature (core/sensors.py), on heater supervision (a water reading stuck low) and
on the leak and level alarms.
"""

from __future__ import annotations

from collections import deque

from ilup_controller.core.procedure import Phase
from ilup_controller.core.sensors import Run
from ilup_controller.core.types import value_type

FLOW_GAIN_LOW = 0.75
FLOW_GAIN_HIGH = 1.15
FLOW_MARGIN_ML_MIN = 10.0
FLOW_CUTOFF_ML_MIN = 30.0
FLOW_LAG_S = 1.0  # pump slew and the meter's own averaging
PRESSURE_R_SHARE = 0.3  # incremental resistance of a distensible bed vs its pressure/flow ratio
PRESSURE_R_FLOOR = 0.001  # mmHg per mL/min (1 Wood unit)
PRESSURE_MARGIN_MMHG = 0.5
PRESSURE_LAG_S = 3.0  # several compliance time constants
PRESSURE_MIN_FLOW_ML_MIN = 100.0  # below this the pressure/flow ratio is mostly the offset
PERFUSATE_TAU_MAX_S = 600.0  # 3 L of perfusate on a 20 W/K exchanger
TEMPERATURE_MARGIN_C = 0.05
TRANSPORT_DELAY_MAX_S = 60.0
_J_PERIOD_S = 1.0


@value_type
class Inputs:
    """One tick's view for the cross-checks (usable values; None = unusable)."""

    flow_ml_min: float | None
    pressure_mmhg: float | None
    temperature_c: float | None
    water_temperature_c: float | None
    pump_speed_rpm: float | None  # tacho
    pump_command_rpm: float  # previous tick's command
    pressure_limit_mmhg: float
    phase: Phase
    # When these values were read: runs start at a reading's time, so the process samples that
    # go with them carry the same clock (a tick decides on readings taken a tick earlier).
    read_t_s: float


class _RunRange:
    """Min and max of a driving quantity over a sensor's current run, each sample counted
    ``lag_s`` after it was taken (the sensor needs that long to show it)."""

    def __init__(self, lag_s: float) -> None:
        self._lag_s = lag_s
        self._pending: deque[tuple[float, float]] = deque()
        self._since_s: float | None = None
        self.lo = self.hi = 0.0
        self.empty = True

    def update(self, t_s: float, x: float | None, since_s: float | None) -> None:
        if since_s != self._since_s:
            self._since_s, self.empty = since_s, True
        if x is not None:
            self._pending.append((t_s, x))
        while self._pending and self._pending[0][0] <= t_s - self._lag_s:
            t, v = self._pending.popleft()
            if since_s is None or t < since_s:
                continue
            if self.empty:
                self.lo = self.hi = v
                self.empty = False
            else:
                self.lo, self.hi = min(self.lo, v), max(self.hi, v)


class _Bend:
    """Integral J of (Tw - v) over the run, and how far it strays from the straight line a held
    perfusate demands. The water is taken ``TRANSPORT_DELAY_MAX_S`` late: whatever the probe's
    transport delay d in [0, max], water over [t0, t - max] lies inside [t0 - d, t - d], the
    span over which a probe held at v says the perfusate was held."""

    def __init__(self) -> None:
        self._since_s: float | None = None
        self._water: deque[tuple[float, float]] = deque()
        self._j: list[tuple[float, float]] = []
        self._acc = 0.0
        self._last_t_s: float | None = None
        self.bend = 0.0

    def update(self, t_s: float, water_c: float | None, run: Run | None) -> float:
        if water_c is None:
            self._water.clear()
        else:
            self._water.append((t_s, water_c))
        since = None if run is None else run.since_s
        if since != self._since_s or run is None or water_c is None:
            self._since_s, self._j, self._acc, self._last_t_s = since, [], 0.0, None
            self.bend = 0.0
        while self._water and self._water[0][0] <= t_s - TRANSPORT_DELAY_MAX_S:
            t, w = self._water.popleft()
            if run is None or t < run.since_s:
                continue
            if self._last_t_s is not None:
                self._acc += (w - run.value) * (t - self._last_t_s)
            self._last_t_s = t
            if not self._j or t - self._j[-1][0] >= _J_PERIOD_S:
                self._j.append((t, self._acc))
                self.bend = self._spread()
        return self.bend

    def _spread(self) -> float:
        (t0, j0), (t1, j1) = self._j[0], self._j[-1]
        if t1 - t0 <= 0.0:
            return 0.0
        slope = (j1 - j0) / (t1 - t0)
        dev = [j - (j0 + slope * (t - t0)) for t, j in self._j]
        # Half the spread around the chord: a lower bound on the distance to any straight line.
        return (max(dev) - min(dev)) / 2.0


class ProcessDiagnostics:
    def __init__(
        self,
        stroke_volume_ml_per_rev: float,
        flow_resolution: float,
        pressure_resolution: float,
        temperature_resolution: float,
    ) -> None:
        self._sv = stroke_volume_ml_per_rev
        self._q_res, self._p_res, self._t_res = (
            flow_resolution,
            pressure_resolution,
            temperature_resolution,
        )
        self._pump = _RunRange(FLOW_LAG_S)
        self._flow_for_pressure = _RunRange(PRESSURE_LAG_S)
        self._bend = _Bend()
        self.resistance: float | None = None  # identified pressure/flow ratio, mmHg per mL/min
        self._ref_command_rpm = 0.0
        self._phase: Phase | None = None

    def operating_point_changed(self, x: Inputs) -> bool:
        """The pump moved to another operating point, or the phase changed: noise signatures
        learned before no longer hold."""
        changed = x.phase != self._phase or abs(x.pump_command_rpm - self._ref_command_rpm) > max(
            2.0, 0.2 * self._ref_command_rpm
        )
        if changed:
            self._phase, self._ref_command_rpm = x.phase, x.pump_command_rpm
        return changed

    def assess(
        self,
        x: Inputs,
        flow_run: Run | None,
        pressure_run: Run | None,
        temperature_run: Run | None,
    ) -> dict[str, str]:
        """Stuck verdicts by alarm id, with the evidence."""
        out: dict[str, str] = {}
        speed = x.pump_speed_rpm if x.pump_speed_rpm is not None else x.pump_command_rpm
        expected_q = speed * self._sv
        fr = flow_run if x.flow_ml_min is not None else None
        self._pump.update(x.read_t_s, expected_q, None if fr is None else fr.since_s)
        if fr is not None and not self._pump.empty:
            v, c = fr.value, 2.0 * self._q_res + FLOW_MARGIN_ML_MIN
            if v > FLOW_GAIN_HIGH * self._pump.lo + c or (
                v < FLOW_GAIN_LOW * self._pump.hi - c - FLOW_CUTOFF_ML_MIN
            ):
                out["sensor_flow"] = (
                    f"stuck at {v:.1f} mL/min while the pump ran at "
                    f"{self._pump.lo:.0f}-{self._pump.hi:.0f} mL/min (speed x stroke volume)"
                )

        q = x.flow_ml_min if x.flow_ml_min is not None else expected_q
        p, pr = x.pressure_mmhg, pressure_run if x.pressure_mmhg is not None else None
        moving = pr is None or x.read_t_s - pr.since_s < PRESSURE_LAG_S
        if p is not None and moving and q >= PRESSURE_MIN_FLOW_ML_MIN:
            self.resistance = p / q
        self._flow_for_pressure.update(x.read_t_s, q, None if pr is None else pr.since_s)
        trapped = pr is not None and pr.value >= x.pressure_limit_mmhg
        if pr is not None and not self._flow_for_pressure.empty and not trapped:
            r = max(PRESSURE_R_SHARE * (self.resistance or 0.0), PRESSURE_R_FLOOR)
            dq = self._flow_for_pressure.hi - self._flow_for_pressure.lo
            if r * dq > 2.0 * self._p_res + PRESSURE_MARGIN_MMHG:
                out["sensor_pressure"] = (
                    f"stuck at {pr.value:.2f} mmHg while the flow moved by {dq:.0f} mL/min "
                    f"(expected >= {r * dq:.1f} mmHg)"
                )

        tr = temperature_run if x.temperature_c is not None else None
        bend = self._bend.update(x.read_t_s, x.water_temperature_c, tr)
        if tr is not None and bend > 0.0:
            # The held perfusate may sit anywhere within its LSB: that term grows with time.
            allowed = (2.0 * self._t_res + TEMPERATURE_MARGIN_C) * PERFUSATE_TAU_MAX_S + (
                self._t_res + TEMPERATURE_MARGIN_C
            ) * (x.read_t_s - tr.since_s)
            if bend > allowed:
                out["sensor_temperature"] = (
                    f"stuck at {tr.value:.2f} degC while the water temperature moved "
                    f"(heat balance off by {bend:.0f} degC*s > {allowed:.0f})"
                )
        return out
