"""Plausibility of one safety sensor: missing, stale, not finite, out of range, implausible rate
of change (spikes, noise) and stuck (identical fresh readings). A reading that fails any check is
*unusable*: the loops never see it, and the sensor alarm says why."""

from __future__ import annotations

import math
import statistics
from collections import deque

from ilup_controller.config.models import SensorLimits
from ilup_controller.core.types import Reading

RATE_WINDOW_S = 5.0
RATE_VIOLATIONS = 3  # this many implausible jumps within RATE_WINDOW_S = a faulty sensor
NOISE_WINDOW_S = 2.0
# For white noise of std sigma, the second difference has std sigma*sqrt(6), and the median of
# its absolute value is 0.6745 of that: sigma ~ median(|d2|) / 1.652. The median ignores steps
# and spikes; the second difference ignores ramps: only noise remains.
_MEDIAN_ABS_D2_PER_SIGMA = 0.6745 * 6**0.5


class SensorCheck:
    def __init__(
        self,
        label: str,
        limits: SensorLimits,
        value_range: tuple[float, float] | None,
        stale_after_s: float,
    ) -> None:
        self.label = label
        self._limits = limits
        self._range = value_range
        self._stale_after_s = stale_after_s
        self._prev: Reading | None = None
        self._same_since_s: float | None = None
        self._violations: deque[float] = deque()
        self._d2: deque[tuple[float, float]] = deque()  # (reading time, |second difference|)
        self._prev2: Reading | None = None
        self.fault = ""  # why the last reading was unusable ("" = usable)

    def check(self, t_s: float, reading: Reading | None) -> float | None:
        """The usable value of ``reading`` at time ``t_s``, or None (and ``fault`` says why)."""
        self.fault = self._fault(t_s, reading)
        return None if self.fault or reading is None else reading.value

    def _fault(self, t_s: float, r: Reading | None) -> str:
        if r is None:
            return "missing: no reading yet"
        age_s = t_s - r.t
        if age_s > self._stale_after_s:
            return f"stale: last reading {age_s:.1f} s old"
        v = r.value
        if not math.isfinite(v):
            return f"not a number ({v})"
        if self._range is not None and not self._range[0] <= v <= self._range[1]:
            return f"out of range: {v:.2f} outside [{self._range[0]:g}, {self._range[1]:g}]"
        fresh = self._prev is None or r.t > self._prev.t
        jump = False
        if fresh and self._prev is not None:
            dt = r.t - self._prev.t
            # Reads can come close together (a link cycle on request right after its own), so
            # the allowance includes the noise a good sensor shows between any two readings.
            allowed = self._limits.max_rate_per_s * dt + 3.0 * self._limits.max_noise
            jump = abs(v - self._prev.value) > allowed
            if jump:
                self._violations.append(t_s)
            if self._prev2 is not None:
                self._d2.append((r.t, abs(v - 2.0 * self._prev.value + self._prev2.value)))
            if v == self._prev.value:
                if self._same_since_s is None:
                    self._same_since_s = self._prev.t
            else:
                self._same_since_s = None
        if fresh:
            self._prev2, self._prev = self._prev, r
        while self._violations and t_s - self._violations[0] > RATE_WINDOW_S:
            self._violations.popleft()
        if len(self._violations) >= RATE_VIOLATIONS:
            return (
                f"implausible rate of change ({len(self._violations)} jumps in {RATE_WINDOW_S:g} s)"
            )
        if jump:
            return "implausible jump"
        while self._d2 and r.t - self._d2[0][0] > NOISE_WINDOW_S:
            self._d2.popleft()
        if len(self._d2) >= 8:
            sigma = statistics.median(d for _, d in self._d2) / _MEDIAN_ABS_D2_PER_SIGMA
            if sigma > self._limits.max_noise:
                return f"noisy: noise {sigma:.2f} (limit {self._limits.max_noise:g})"
        if self._same_since_s is not None and r.t - self._same_since_s >= self._limits.stuck_s:
            return f"stuck at {v:.2f} for {r.t - self._same_since_s:.1f} s"
        return ""
