"""Plausibility of one safety sensor: missing, stale, not finite, out of range, implausible rate
of change (spikes, noise) and stuck. A reading that fails any check is *unusable*: the loops never
see it, and the sensor alarm says why.

Stuck is decided from evidence, never from silence: a healthy digital sensor often reads a steady
or quantised value for minutes. Two kinds of evidence count. Here, the loss of a noise signature
this sensor has shown: after ``SIGNATURE_MIN_TRANSITIONS`` fresh readings in which consecutive
values were rarely equal (share p <= ``SIGNATURE_MAX_SAME``, i.e. noise of about 1 LSB or more)
and went back and forth (at least ``SIGNATURE_MIN_REVERSALS`` of their movement against the
direction of the change before: noise does, about 2/3; a process ramp read by a noise-free sensor
moves one way and then settles, which is no noise to lose), a run of n identical readings has
probability p**n; at n with p**n < ``SIGNATURE_FALSE_ALARM`` it is a frozen sensor. In
core/diagnostics.py, the process: the reading did not move when the pump, the flow or the heat
input says it must have (analytical redundancy).
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from ilup_controller.config.models import SensorLimits
from ilup_controller.core.types import Reading, value_type

RATE_WINDOW_S = 5.0
RATE_VIOLATIONS = 3  # this many implausible jumps within RATE_WINDOW_S = a faulty sensor
NOISE_WINDOW_S = 2.0
# For white noise of std sigma, the second difference has std sigma*sqrt(6), and the median of
# its absolute value is 0.6745 of that: sigma ~ median(|d2|) / 1.652. The median ignores steps
# and spikes; the second difference ignores ramps: only noise remains.
_MEDIAN_ABS_D2_PER_SIGMA = 0.6745 * 6**0.5
SIGNATURE_WINDOW_S = 60.0
SIGNATURE_MIN_TRANSITIONS = 200
SIGNATURE_MAX_SAME = 0.35  # above this the noise is under ~1 LSB: no signature to lose
# Below this share of the movement reversing the change before, the values moved with the
# process, not with noise: a noise-free flow meter or pressure sensor read a 3-minute flow ramp
# changing at every reading (6 % and 25 % equal), then the settled flow read steady and was
# declared stuck, pump held. Weighted by size: the ramp's own wiggles (0.001 mL/min against
# steps of 0.34) turned 2 changes in 5.
SIGNATURE_MIN_REVERSALS = 1.0 / 3.0
SIGNATURE_FALSE_ALARM = 1e-7  # chance that a healthy noisy sensor repeats itself this long
_SIGNATURE_P_FLOOR = 0.02  # never trust a learned p below this (few samples, correlated noise)


def resolution_of(scale: float, data_type: str) -> float:
    """One least significant bit of a register in engineering units (0 for a float)."""
    return 0.0 if data_type == "float32" else abs(scale)


@value_type
class Run:
    """The current run of identical fresh readings: ``value`` since ``since_s`` (the first
    reading of the run), repeated ``repeats`` times after it."""

    value: float
    since_s: float
    repeats: int


class SensorCheck:
    def __init__(
        self,
        label: str,
        limits: SensorLimits,
        value_range: tuple[float, float] | None,
        stale_after_s: float,
        resolution: float = 0.0,
    ) -> None:
        self.label = label
        self.resolution = resolution
        self._limits = limits
        # A jump is a change beyond max_rate x dt plus what noise and one LSB allow.
        self._max_rate_per_s = limits.max_rate_per_s
        self._jump_slack = 3.0 * limits.max_noise + resolution
        self._range = value_range
        self._stale_after_s = stale_after_s
        self._prev: Reading | None = None
        self._run_since_s: float | None = None
        self._repeats = 0
        self._same: deque[tuple[float, bool]] = deque()  # (reading time, equal to previous)
        self._same_count = 0
        # (reading time, size of a change, the part of it against the change before)
        self._moves: deque[tuple[float, float, float]] = deque()
        self._moved = self._turned = 0.0
        self._last_rise: bool | None = None  # direction and size of the last change
        self._last_size = 0.0
        self._violations: deque[float] = deque()
        self._d2: deque[tuple[float, float]] = deque()  # (reading time, |second difference|)
        self._d2_sorted: list[float] = []  # the same values, kept sorted for the median
        self._prev2: Reading | None = None
        self.fault = ""  # why the last reading was unusable ("" = usable)

    @property
    def run(self) -> Run | None:
        if self._prev is None or self._run_since_s is None:
            return None
        return Run(self._prev.value, self._run_since_s, self._repeats)

    def relearn(self) -> None:
        """Forget the noise signature: the operating point changed (a flow meter with a low-flow
        cut-off is noisy at 500 mL/min and reads exactly 0.0 at rest)."""
        self._same.clear()
        self._same_count = 0
        self._moves.clear()
        self._moved = self._turned = 0.0

    def declare(self, fault: str) -> None:
        """A fault found by a cross-check (core/diagnostics.py): this reading is unusable."""
        self.fault = fault

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
            # One least significant bit of change is never a jump.
            jump = abs(v - self._prev.value) > self._max_rate_per_s * dt + self._jump_slack
            if jump:
                self._violations.append(t_s)
            if self._prev2 is not None:
                d2 = abs(v - 2.0 * self._prev.value + self._prev2.value)
                self._d2.append((r.t, d2))
                bisect.insort(self._d2_sorted, d2)
            same = v == self._prev.value
            self._same.append((r.t, same))
            self._same_count += same
            if same:
                self._repeats += 1
            else:
                self._run_since_s, self._repeats = r.t, 0
                rise, size = v > self._prev.value, abs(v - self._prev.value)
                if self._last_rise is not None:
                    # Back and forth by the smaller of the two changes: a ramp's tiny wiggle
                    # followed by its next full step turned only by the wiggle.
                    turned = min(size, self._last_size) if rise != self._last_rise else 0.0
                    self._moves.append((r.t, size, turned))
                    self._moved += size
                    self._turned += turned
                self._last_rise, self._last_size = rise, size
        elif self._prev is None:
            self._run_since_s, self._repeats = r.t, 0
        while self._same and r.t - self._same[0][0] > SIGNATURE_WINDOW_S:
            self._same_count -= self._same.popleft()[1]
        while self._moves and r.t - self._moves[0][0] > SIGNATURE_WINDOW_S:
            _, size, turned = self._moves.popleft()
            self._moved -= size
            self._turned -= turned
        if not self._moves:
            self._moved = self._turned = 0.0  # no float residue from the running sums
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
        d2s = self._d2_sorted
        while self._d2 and r.t - self._d2[0][0] > NOISE_WINDOW_S:
            del d2s[bisect.bisect_left(d2s, self._d2.popleft()[1])]
        n = len(d2s)
        if n >= 8:
            # The median, kept sorted incrementally: this runs for every sensor every tick.
            mid = n // 2
            median = d2s[mid] if n % 2 else 0.5 * (d2s[mid - 1] + d2s[mid])
            sigma = median / _MEDIAN_ABS_D2_PER_SIGMA
            # A value flipping by one LSB shows as ~1.2 LSB of "noise": that is quantisation.
            if sigma > self._limits.max_noise + 1.25 * self.resolution:
                return f"noisy: noise {sigma:.2f} (limit {self._limits.max_noise:g})"
        return self._signature_lost(r.t, v)

    def _signature_lost(self, t_s: float, v: float) -> str:
        if self._run_since_s is None or t_s - self._run_since_s < self._limits.stuck_s:
            return ""
        n = self._repeats
        # The signature is learned from the readings before this run.
        before = len(self._same) - min(n, len(self._same))
        same_before = self._same_count - min(n, len(self._same))
        if before < SIGNATURE_MIN_TRANSITIONS:
            return ""
        p_same = (same_before + 1.0) / (before + 2.0)  # Laplace: never 0 from few samples
        if p_same > SIGNATURE_MAX_SAME:
            return ""
        if self._turned < SIGNATURE_MIN_REVERSALS * self._moved:
            return ""  # the values moved one way: the process, not noise
        needed = math.ceil(
            math.log(SIGNATURE_FALSE_ALARM) / math.log(max(p_same, _SIGNATURE_P_FLOOR))
        )
        if n < needed:
            return ""
        return (
            f"stuck at {v:.2f}: {n} identical readings in {t_s - self._run_since_s:.1f} s "
            f"where its noise repeated a value {p_same * 100.0:.0f} % of the time"
        )
