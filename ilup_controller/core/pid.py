"""A PI(D) term with anti-windup by tracking, around simple-pid.

simple-pid only clamps its integral to the output limits (libraries.md, fact 10). Our loops need
more: the applied output is often not the PID's own output (the other loop of an override pair
won, a slew limit or an interlock held the actuator, the operator drives it by hand). After every
tick :meth:`Pid.track` tells the loop what was really applied, and how it came about:

- ``bumpless`` (held, stopped, driven by hand): the integral is re-seeded so that P + I + D
  equals the applied output. It cannot wind up in the held direction, and the hand-over back
  to this loop is bumpless.
- ``limited`` (its own demand, cut by a rate limit): a cut within ``tolerance`` (a tick of the
  rate limit: a noisy P poking over it) leaves the integral alone; a larger one stops it
  growing past the cut (conditional integration), so a limit that binds for long cannot wind
  it up. Re-seeded to ``applied - P`` instead, every upward step of a noisy P beyond the limit
  was taken out of the integral while every downward one passed: the flow settled 18 mL/min
  under its target at 50 Hz. Frozen at every cut, the integral still missed the positive
  errors the cuts came with: 2.7 mL/min under with a 10 mL/min-noise meter.
- ``headroom`` (the other loop of an override pair won): the integral is set to the applied
  output, so this loop's next demand is that plus its own P (external reset feedback). It
  takes over only as its own error nears 0, and never clips the winner's noise.

Time is always passed explicitly (``dt_s``): simple-pid's own clock and ``sample_time`` gating
misbehave under virtual time and float jitter (libraries.md, facts 11-12).
"""

from __future__ import annotations

import math
from typing import Literal

from simple_pid import PID

from ilup_controller.config.models import PidGains

Tracking = Literal["bumpless", "limited", "headroom"]


class Pid:
    def __init__(self, gains: PidGains, output_min: float, output_max: float) -> None:
        self._pid = PID(
            Kp=gains.kp,
            Ki=gains.ki,
            Kd=gains.kd,
            setpoint=0.0,
            sample_time=None,
            # Limits are ours: simple-pid would also clamp the integral to them, which breaks
            # tracking (the integral must be able to sit at applied - P - D).
            output_limits=(None, None),
            time_fn=lambda: 0.0,  # never used for dt: every call passes dt explicitly
        )
        self._min, self._max = output_min, output_max
        self._output = 0.0
        self._integral_before = 0.0  # the integral before the last update's step

    @property
    def output(self) -> float:
        return self._output

    def update(self, setpoint: float, measured: float, dt_s: float) -> float:
        """One step; the output is within the limits. ``dt_s`` must be > 0."""
        self._pid.setpoint = setpoint
        _, integral_before, _ = self._pid.components
        self._integral_before = integral_before
        out = self._pid(measured, dt=dt_s)
        if out is None or not math.isfinite(out):  # defensive: never hand on a NaN
            raise ArithmeticError(f"PID produced {out!r}")
        clamped = min(max(float(out), self._min), self._max)
        if clamped != out:
            # At its own limit the integral neither grows further into the limit nor is pushed
            # past it: back-calculating it to (limit - P) would wind it the other way whenever
            # P alone exceeds the limit, and the output would then sag far below the limit
            # as the error shrinks (a heater at 10 % with its water 0.6 degC short).
            p, integral, d = self._pid.components
            if out > self._max:
                integral = min(integral, max(integral_before, self._max - p - d))
            else:
                integral = max(integral, min(integral_before, self._min - p - d))
            self._pid.set_auto_mode(False)
            self._pid.set_auto_mode(True, last_output=integral)
        self._output = clamped
        return clamped

    def track(self, applied: float, how: Tracking = "bumpless", tolerance: float = 0.0) -> None:
        """The output really applied this tick, and why it differs (module docstring)."""
        if abs(applied - self._output) < 1e-12:
            return
        p, integral, d = self._pid.components
        if how == "limited":
            if abs(applied - self._output) <= tolerance:
                seed = integral
            elif applied < self._output:
                seed = min(integral, max(self._integral_before, applied - p - d))
            else:
                seed = max(integral, min(self._integral_before, applied - p - d))
        elif how == "headroom":
            seed = applied
        else:
            seed = applied - p - d
        self._pid.set_auto_mode(False)
        self._pid.set_auto_mode(True, last_output=seed)
        self._output = applied

    def reset(self, output: float) -> None:
        """Start afresh (no derivative history) from ``output``."""
        self._pid.set_auto_mode(False)
        self._pid.set_auto_mode(True, last_output=output)
        self._output = output
