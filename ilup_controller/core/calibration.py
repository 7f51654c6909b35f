"""Calibration applied by the core: the pressure transducer's zero and the pump's stroke volume.

Both start from the configuration (zero 0 mmHg, ``control.flow.stroke_volume_ml_per_rev``); the
daemon replaces them with the figures of a passing ``ilup commission`` run for this exact
configuration, and an operator may zero the pressure or set the stroke volume in idle with the
pump stopped (commands/calibration.py). The zero is subtracted from every pressure reading
before the plausibility checks, so every consumer (loops, alarms, state, record) sees the
zeroed value. Pure: explicit time, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ilup_controller.core.types import Reading, Readings

ZERO_WINDOW_S = 5.0  # pressure zero: mean over this long, pump stopped, line open
ZERO_MIN_READINGS = 10


@dataclass(frozen=True, slots=True)
class Calibration:
    pressure_zero_mmhg: float
    stroke_volume_ml_per_rev: float
    source: str  # "configuration", "commissioning <when> by <who>", "operator <who>"


class PressureZeroing:
    """Raw (not zeroed) pressure readings of the last ``ZERO_WINDOW_S``, for a zero command."""

    def __init__(self) -> None:
        self._raw: deque[Reading] = deque()

    def add(self, r: Reading | None) -> None:
        if r is None or (self._raw and r.t <= self._raw[-1].t):
            return
        self._raw.append(r)
        while self._raw and r.t - self._raw[0].t > ZERO_WINDOW_S:
            self._raw.popleft()

    def mean_over_window(self, t_s: float, stale_after_s: float) -> tuple[float, int] | str:
        """(mean raw pressure, readings) over the last window, or why there is none."""
        fresh = [r.value for r in self._raw if t_s - r.t <= ZERO_WINDOW_S + stale_after_s]
        span = (self._raw[-1].t - self._raw[0].t) if self._raw else 0.0
        if len(fresh) < ZERO_MIN_READINGS or span < 0.8 * ZERO_WINDOW_S:
            return (
                f"only {len(fresh)} pressure readings over {span:.1f} s: need "
                f"{ZERO_WINDOW_S:g} s of steady readings"
            )
        if self._raw and t_s - self._raw[-1].t > stale_after_s:
            return "the pressure reading is stale"
        return sum(fresh) / len(fresh), len(fresh)


def zeroed(readings: Readings, pressure_signal: str, zero_mmhg: float) -> Readings:
    """``readings`` with ``zero_mmhg`` subtracted from the pressure reading (a new mapping)."""
    r = readings.get(pressure_signal)
    if r is None or zero_mmhg == 0.0:
        return readings
    out = dict(readings)
    out[pressure_signal] = Reading(r.value - zero_mmhg, r.t)
    return out
