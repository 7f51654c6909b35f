"""Rewarming by the water-to-perfusate gradient: the outer loop of the temperature cascade.

Why a gradient, not a perfusate setpoint: the heat the exchanger gives the perfusate is
UA (T_water - T_perfusate), so with the water held at ``perfusate + G`` the perfusate warms at
(UA G - losses) / C whatever its own temperature. The perfusate's own time constant drops out of
the loop; what is left from G to the warming rate is a static gain with the water's and the
probe's lags. So the outer loop controls the *rate* of the measured perfusate temperature:

- the rate it asks for is ``min(ramp, (target - T) / landing_s)``: the guideline's rewarming
  rate (kept under 0.5 degC/min), then a first-order landing with no overshoot;
- G = feed-forward (the asked rate times the exchanger's time constant C/UA: the heat the ramp
  needs) + PI on the rate error (the losses, and what the feed-forward does not know) + a
  second integral while the ramp runs. The losses (tubing to the room, lung to the body) grow
  with the perfusate temperature, so along a ramp they are a ramp too, and a PI trails it with
  a constant rate error (0.43 instead of 0.48 degC/min in tests/test_rewarm.py); integrating
  the integral's own growth (``ramp_integral_per_s``) learns that slope, only while the
  warming trails the ramp (ahead of it, the second integral would wind past the loss), and
  until the landing, also where the window limit below holds the asked rate under the ramp
  (the loss grows all the same);
- G rises at most ``gradient_slew_c_per_s``: at the start of rewarming the feed-forward, the
  proportional kick and the integral would otherwise all land at once, and on an exchanger
  stronger than ``exchanger_time_constant_s`` says they overshoot the guideline rate;
- the water setpoint is ``T + G``, capped by the gradient limit and the water cap;
- the guideline's limit is a rise over any 2-minute window (the heating_rate alarm's window),
  and a ramp can meet its rate and still break it: as the flow ramps, the cooler tubing
  contents pass the probe (a dip of 0.3 degC), and the ramp that follows, measured from the
  bottom of that dip, rose 0.55 degC/min over 2 minutes on a strong exchanger with a 17 s probe
  delay (heating_rate: heater off, latched, the drug phase never done). So the asked rate is
  also at most what keeps every window still open, from its lowest reading, within
  ``window_rate_c_per_min`` (:func:`window_rate_limit_c_per_s`). The readings of ticks
  without heating join that window too (:meth:`GradientLoop.observe`), at their true age.

A probe that sees the perfusate late (a long arterial line, 15-25 s; a 0.1 degC register that
stays flat while the perfusate crosses a step) lets the integral wind up before the warming
it asked for shows, and the warming then comes in bursts (0.8-1.3 degC/min at the probe, the
heating_rate alarm latched on a 30 degC prime with a 21 s delay and a 0.1 degC probe). Each
burst halves the integral gain (``integral_scale``, down to 1/4), so the integral time kp/ki
goes from 20 s to 40 s, then 80 s (``ilup tune --loop perfusate`` sets the loop's dead time
plus half the rate window: 35 s for a 20 s probe delay); a plant without bursts keeps the
configured gains. A strong exchanger (146 W/K, a 30 degC prime) bursts the same way with a
9 s delay, its water back within 0.5 degC of the perfusate by the time the slope shows the
burst: the heater counts as the source if the water led within the last rate window
(:meth:`GradientLoop._watch_bursts`).

While the water stands above its setpoint (it can only cool by its losses) the rate loop does
not integrate a too-fast warming down: the integral would end far under what the ramp needs,
and the warming trail for a minute after each burst (a ~110 s cycle on a 150 W/K exchanger).

A falling reading on the ramp counts as no warming (not chased, not integrated) for
``FALL_IS_COOLING_S``: cooler perfusate from the tubing passing the probe as the flow ramps.
A fall that lasts longer is the circuit losing more heat than the gradient gives, and is chased.

The rate and T come from a least-squares line through the last ``rate_window_s`` of readings
(one-second means): a quantised probe (0.1 degC) or a noisy one still gives a usable slope, and
its transport delay only shifts that line in time. The estimate is pure code: explicit time,
no clock, no I/O.
"""

from __future__ import annotations

import math
from collections import deque

from ilup_controller.config.models import TemperatureLoop
from ilup_controller.core.types import value_type

_BUCKET_S = 1.0
# The water is within these of its setpoint: the gradient asked is in effect, and the rate
# loop integrates (module docstring). Both were 0.3: hx_150 rewarmed at 1.03 x the guideline
# time (0.96 now), water_8kg at 1.02 (1.01); below 0.2 the integral held too long and the
# warming overshot 0.5 degC/min; below, 0.2 held the integral while a 300 W heater's water
# still caught up (1.09).
WATER_ABOVE_C = 0.2
WATER_BELOW_C = 0.25
_MIN_POINTS = 5
# A cold plug passes the probe in about a minute as the flow ramps. Unbounded, the rule froze
# the gradient at 1 degC for 10 minutes on a 21 W/K exchanger from a 36 degC prime: the circuit
# lost more heat than that gave and the reading fell 0.01-0.4 degC/min the whole time.
FALL_IS_COOLING_S = 90.0
# A burst: on the ramp, with the heater driving (the water this far above the perfusate, so
# not a circuit warmed by the body), the reading rises this much faster than asked.
# 0.3 let a noise-free plant with a 24 s probe delay cycle at 0.68-0.75 degC/min at the probe,
# never counted, until heating_rate latched (noise_free_delay_24s_cool_prime). At 0.2 the other
# variants rewarm as fast or faster (late_flat_probe 1.023 -> 1.016 of the limit), and of 360
# random plants 178 rewarm within the limit (176) and 2 latch heating_rate (3).
BURST_C_PER_S = 0.2 / 60.0
HEATER_DRIVES_C = 0.5
MIN_INTEGRAL_SCALE = 0.25


class RateEstimator:
    """Slope (degC/s) and current value of a reading, from a line fitted through one-second
    means over the last ``window_s``; the means of the last ``history_s`` are kept in
    ``history`` (``closed`` counts them)."""

    def __init__(self, window_s: float, history_s: float = 0.0) -> None:
        self._window_s = window_s
        self._history_s = history_s
        self._points: deque[tuple[float, float]] = deque()
        self.history: deque[tuple[float, float]] = deque()
        self.closed = 0
        self._bucket_t0: float | None = None
        self._bucket_sum = 0.0
        self._bucket_n = 0
        self.slope_c_per_s: float | None = None
        self.slope_se_c_per_s = 0.0
        self.value_c: float | None = None
        self.low_c: float | None = None  # the lowest one-second mean the slope is fitted on

    def clear(self) -> None:
        # ``history`` stays: what the probe read before a restart still counts in the window.
        self._points.clear()
        self._bucket_t0 = None
        self._bucket_sum, self._bucket_n = 0.0, 0
        self.slope_c_per_s = self.value_c = self.low_c = None

    def add(self, t_s: float, value_c: float) -> None:
        if self._bucket_t0 is None:
            self._bucket_t0 = t_s
        if t_s - self._bucket_t0 >= _BUCKET_S - 1e-9:
            self._close_bucket()
            self._bucket_t0 = t_s
        self._bucket_sum += value_c
        self._bucket_n += 1
        if self.value_c is None:
            self.value_c = value_c

    def _close_bucket(self) -> None:
        assert self._bucket_t0 is not None
        if self._bucket_n == 0:
            return
        t_mid = self._bucket_t0 + 0.5 * _BUCKET_S
        point = (t_mid, self._bucket_sum / self._bucket_n)
        self._points.append(point)
        self._bucket_sum, self._bucket_n = 0.0, 0
        while self._points and t_mid - self._points[0][0] > self._window_s:
            self._points.popleft()
        self.closed += 1
        if self._history_s > 0.0:
            self.history.append(point)
            while t_mid - self.history[0][0] > self._history_s:
                self.history.popleft()
        self._fit()

    def _fit(self) -> None:
        pts = self._points
        n = len(pts)
        if n < _MIN_POINTS:
            self.value_c = pts[-1][1]
            self.slope_c_per_s = None
            return
        t_mean = sum(t for t, _ in pts) / n
        y_mean = sum(y for _, y in pts) / n
        stt = sum((t - t_mean) ** 2 for t, _ in pts)
        sty = sum((t - t_mean) * (y - y_mean) for t, y in pts)
        slope = sty / stt if stt > 0.0 else 0.0
        self.slope_c_per_s = slope
        # The slope's standard error from the scatter about the line: how far noise alone
        # tilts it (a check on the slope allows for it).
        syy = sum((y - y_mean) ** 2 for _, y in pts)
        scatter = max(syy - slope * sty, 0.0) / (n - 2)
        self.slope_se_c_per_s = math.sqrt(scatter / stt) if stt > 0.0 else 0.0
        self.low_c = min(y for _, y in pts)
        # The line's value now: its newest point is half a bucket old.
        self.value_c = y_mean + slope * (pts[-1][0] + 0.5 * _BUCKET_S - t_mean)


def window_rate_limit_c_per_s(
    history: deque[tuple[float, float]],
    now_c: float,
    t_s: float,
    window_s: float,
    budget_c: float,
    min_horizon_s: float,
) -> float | None:
    """The fastest warming from ``now_c`` that keeps every ``window_s`` window's rise (over its
    lowest reading) within ``budget_c``, given the readings of the last ``window_s``.

    A point of ``history`` (time, value) leaves the window ``h`` seconds from now; until then
    the window's low is at most the lowest of it and the newer points, so warming at ``r`` for
    ``h`` seconds must keep ``now + r h <= low + budget``. Horizons shorter than
    ``min_horizon_s`` are left out: the loop cannot act faster, and over a few seconds one
    reading's noise would set the rate."""
    limit: float | None = None
    low_c = now_c
    for point_t_s, value_c in reversed(history):
        low_c = min(low_c, value_c)
        horizon_s = point_t_s + window_s - t_s
        if horizon_s >= min_horizon_s:
            rate = (low_c + budget_c - now_c) / horizon_s
            if limit is None or rate < limit:
                limit = rate
    return limit


@value_type
class GradientDemand:
    water_setpoint_c: float
    rate_target_c_per_min: float
    rate_c_per_min: float | None
    perfusate_c: float  # the fitted perfusate temperature the demand was computed from


class GradientLoop:
    """Water setpoint from the perfusate readings (module docstring)."""

    def __init__(self, cfg: TemperatureLoop, limit_window_s: float = 0.0) -> None:
        self._cfg = cfg
        # The guideline's limit is a rise over any ``limit_window_s`` (the heating_rate alarm's
        # window): the asked rate keeps every such window within window_rate_c_per_min.
        self._limit_window_s = limit_window_s
        self._rate = RateEstimator(cfg.rate_window_s, history_s=limit_window_s)
        self._window_limit_c_per_s: float | None = None
        self._window_limit_at = -1
        self._integral_c = 0.0
        self._integral_start_c = 0.0
        self._start_c: float | None = None  # the reading when heating first started (step)
        self._ramp_integral_c = 0.0
        self._last_gradient_c: float | None = None
        self._t_s = 0.0
        # Kept through a restart of heating: it is the plant's delay, not the moment's.
        self.integral_scale = 1.0
        self._in_burst = False
        self._heater_drove_s: float | None = None  # last tick the water led by HEATER_DRIVES_C
        self._below_start_s: float | None = None  # last reading under the start (a cold plug)
        self._falling_since_s: float | None = None

    def reset(self, water_c: float | None, perfusate_c: float | None) -> None:
        """Heating (re)starts: forget the slope and start the integral at the present gradient
        (within 0 .. max_gradient_c), so the first demand continues from where the water is."""
        self._rate.clear()
        self._integral_c = 0.0
        self._ramp_integral_c = 0.0
        self._last_gradient_c = None
        self._falling_since_s = None
        if water_c is not None and perfusate_c is not None:
            self._integral_c = min(max(water_c - perfusate_c, 0.0), self._cfg.max_gradient_c)
        self._integral_start_c = self._integral_c
        # Kept from the first start: the prime circulated at low flow through priming, and the
        # cooler tubing contents reach the probe as the flow ramps (the heater may flicker on
        # and off at min_flow_ml_min meanwhile). Taken again at a restart in mid-rewarming,
        # holding the gradient against a fast reading let the warming reach 0.504 degC/min on
        # the strongest exchanger (hx_150, 400 s at 50 mL/min).
        if self._start_c is None:
            self._start_c = perfusate_c

    def observe(self, dt_s: float, perfusate_c: float | None) -> None:
        """A tick without heating (blocked, no flow, no reading): the clock runs on and the
        reading joins the window's history, so the window limit sees what the probe read
        while the heater was off (the line cooling in a flow interruption) at its true age."""
        self._t_s += dt_s
        if perfusate_c is not None:
            self._rate.add(self._t_s, perfusate_c)

    def _watch_bursts(
        self, perfusate_c: float, temp_c: float, water_c: float, slope: float, ramping: bool
    ) -> None:
        """Halve the rate loop's integral gain at the start of each burst, down to
        MIN_INTEGRAL_SCALE (module docstring). A burst: on the ramp, the reading rising
        BURST_C_PER_S faster than the ramp, with the water led the perfusate by HEATER_DRIVES_C
        within the last rate window (the heat of a burst went in before the slope shows it; on
        a strong exchanger the water is back near the perfusate by then), and no reading under
        the start within two (a cold plug leaving the probe is the probe catching up with a bulk
        the exchanger warmed meanwhile, and the slope's line carries that rise for a window). It
        lasts until the warming is back on the ramp: a slope hovering at the threshold is one
        burst, not one per crossing."""
        window_s = self._cfg.rate_window_s
        if water_c - temp_c > HEATER_DRIVES_C:
            self._heater_drove_s = self._t_s
        if self._start_c is not None and perfusate_c < self._start_c:
            self._below_start_s = self._t_s
        heater_drove = (
            self._heater_drove_s is not None and self._t_s - self._heater_drove_s <= window_s
        )
        plug_left = self._below_start_s is None or self._t_s - self._below_start_s > 2 * window_s
        ramp_c_per_s = self._cfg.ramp_c_per_min / 60.0
        starts = ramping and heater_drove and plug_left and slope - ramp_c_per_s > BURST_C_PER_S
        if starts and not self._in_burst:
            self.integral_scale = max(self.integral_scale * 0.5, MIN_INTEGRAL_SCALE)
        self._in_burst = starts or (self._in_burst and slope > ramp_c_per_s)

    def step(
        self,
        dt_s: float,
        perfusate_c: float,
        water_c: float,
        target_c: float,
    ) -> GradientDemand:
        c = self._cfg
        self._t_s += dt_s
        self._rate.add(self._t_s, perfusate_c)
        temp_c = self._rate.value_c if self._rate.value_c is not None else perfusate_c
        slope = self._rate.slope_c_per_s
        ramp_c_per_s = c.ramp_c_per_min / 60.0
        landing_c_per_s = (target_c - temp_c) / c.landing_s
        ramping = landing_c_per_s >= ramp_c_per_s  # not yet landing (the window may still bind)
        rate_target = min(max(landing_c_per_s, -ramp_c_per_s), ramp_c_per_s)
        if self._limit_window_s > 0.0 and rate_target > 0.0:
            if self._window_limit_at != self._rate.closed:  # once a second, as a mean closes
                self._window_limit_at = self._rate.closed
                self._window_limit_c_per_s = window_rate_limit_c_per_s(
                    self._rate.history,
                    temp_c,
                    self._t_s,
                    self._limit_window_s,
                    c.window_rate_c_per_min / 60.0 * self._limit_window_s,
                    c.rate_window_s,
                )
            if self._window_limit_c_per_s is not None:
                rate_target = max(min(rate_target, self._window_limit_c_per_s), -ramp_c_per_s)
        ff_c = max(rate_target, 0.0) * c.exchanger_time_constant_s
        g = c.gradient_pid
        if slope is None or slope >= 0.0:
            self._falling_since_s = None
        elif self._falling_since_s is None:
            self._falling_since_s = self._t_s
        # A fall is a passing cold plug until it has lasted FALL_IS_COOLING_S on the ramp:
        # then the circuit is cooling and must be chased. Landing, a fall stays unchased (the
        # integral would wind against a reading settling onto the target: 0.12 degC overshoot).
        fall_is_plug = (
            self._falling_since_s is None
            or self._t_s - self._falling_since_s < FALL_IS_COOLING_S
            or not ramping
        )
        window_low_c = self._rate.low_c if self._rate.low_c is not None else temp_c
        plug_in_window = (
            rate_target > 0.0 and self._start_c is not None and window_low_c < self._start_c
        )
        if slope is None:
            p_c, error = 0.0, 0.0
        else:
            # A falling reading as heating starts is mostly the cooler perfusate still in the
            # tubing reaching the probe: counted as no warming (not chased, not integrated).
            seen = max(slope, min(rate_target, 0.0)) if fall_is_plug else slope
            if plug_in_window:
                # The slope's window still holds readings below the one heating first started
                # from: a rise faster than asked is that cooler perfusate leaving the probe, not
                # warming; taken as on the ramp, or the gradient would collapse just as the bulk
                # needs it. (Tested on the reading itself, the 30-s line still carried the
                # plug's exit for up to 30 s after: the gradient was cut, the bulk stalled for
                # a minute with a 25 s probe delay, ratio 1.17 -> 1.11.)
                seen = min(seen, rate_target)
            error = rate_target - seen
            self._watch_bursts(perfusate_c, temp_c, water_c, slope, ramping)
            p_c = g.kp * error * 60.0  # gains per degC/min of rate error
        gradient_c = ff_c + p_c + self._integral_c + self._ramp_integral_c
        low_c = -c.max_gradient_c  # below the perfusate: the heater is off, the water cools
        high_c = c.max_gradient_c
        applied_c = min(max(gradient_c, low_c), high_c)
        if self._last_gradient_c is not None:
            # Only heating is slewed: back from below the perfusate (heater off) to 0 at once.
            rise_from_c = max(self._last_gradient_c, 0.0)
            applied_c = min(applied_c, rise_from_c + c.gradient_slew_c_per_s * dt_s)
        self._last_gradient_c = applied_c
        water_sp = min(temp_c + applied_c, c.water_cap_c - 0.5)
        # Integrate only where the water can follow: not past a clamp, and not while the water
        # is still away from its setpoint. Above it, it can only cool by its losses; below it
        # (a weak heater, a big bath), its own loop is still catching up, and asking more of
        # the same would only overshoot later.
        stuck_high = water_c > water_sp + WATER_ABOVE_C and error < 0.0
        stuck_low = water_c < water_sp - WATER_BELOW_C and error > 0.0
        clamped = (gradient_c > high_c and error > 0.0) or (gradient_c < low_c and error < 0.0)
        falling = fall_is_plug and slope is not None and slope < 0.0 < rate_target
        if slope is not None and not (stuck_high or stuck_low or clamped or falling):
            self._integral_c += g.ki * self.integral_scale * error * 60.0 * dt_s
            if ramping and error > 0.0:
                # The ramp runs and the warming trails it: what the integral has had to add
                # since heating started is a loss growing with the temperature; integrate it so
                # the rate error goes to 0. Not while the warming is ahead of the ramp: the
                # second integral would wind past the loss and overshoot the guideline rate
                # (the first integral alone takes the excess back).
                growth_c = self._integral_c - self._integral_start_c
                self._ramp_integral_c += c.ramp_integral_per_s * growth_c * dt_s
        return GradientDemand(
            water_setpoint_c=water_sp,
            rate_target_c_per_min=rate_target * 60.0,
            rate_c_per_min=None if slope is None else slope * 60.0,
            perfusate_c=temp_c,
        )
