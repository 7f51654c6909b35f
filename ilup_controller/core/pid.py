"""A PI(D) term with anti-windup by tracking, around simple-pid.

simple-pid only clamps its integral to the output limits (libraries.md, fact 10). Our loops need
more: the applied output is often not the PID's own output (the other loop of an override pair
won, a slew limit or an interlock held the actuator, the operator drives it by hand). After every
tick :meth:`Pid.track` re-seeds the integral so that P + I + D equals what was really applied.
While the actuator is held, the integral therefore cannot wind up in the held direction
(conditional integration in effect), and any hand-over back to this loop is bumpless.

Time is always passed explicitly (``dt_s``): simple-pid's own clock and ``sample_time`` gating
misbehave under virtual time and float jitter (libraries.md, facts 11-12).
"""

from __future__ import annotations

import math

from simple_pid import PID

from ilup_controller.config.models import PidGains


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

    @property
    def output(self) -> float:
        return self._output

    def update(self, setpoint: float, measured: float, dt_s: float) -> float:
        """One step; the output is within the limits. ``dt_s`` must be > 0."""
        self._pid.setpoint = setpoint
        _, integral_before, _ = self._pid.components
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

    def track(self, applied: float) -> None:
        """Re-seed the integral so that the next output continues from ``applied``."""
        if abs(applied - self._output) < 1e-12:
            return
        p, _, d = self._pid.components
        self._pid.set_auto_mode(False)
        self._pid.set_auto_mode(True, last_output=applied - p - d)
        self._output = applied

    def reset(self, output: float) -> None:
        """Start afresh (no derivative history) from ``output``."""
        self._pid.set_auto_mode(False)
        self._pid.set_auto_mode(True, last_output=output)
        self._output = output
