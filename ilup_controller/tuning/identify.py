"""Identify a first-order-plus-dead-time (FOPDT) model from a step test and tune a PI by SIMC.

Pure: lists of numbers in, numbers out; no clock, no I/O. The model of the loop is

    y(t) = y0 + s (t - t_step) + K du (1 - exp(-(t - t_step - theta) / tau))  for t > t_step + theta

with ``s`` the pre-step drift (a thermal plant is rarely at rest when the test starts; the drift
is estimated from the samples before the step and extrapolated). K, tau and theta are fitted by
least squares: for each (theta, tau) on a grid K is linear and solved in closed form, then the
grid is refined around the best point.

Tuning rule: SIMC (Skogestad 2003, "Simple analytic rules for model reduction and PID controller
tuning", J. Process Control 13:291-309): kc = tau / (K (tau_c + theta)),
tau_i = min(tau, 4 (tau_c + theta)), with tau_c = theta by default ("tight" control).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SIMC_RULE = "SIMC (Skogestad 2003): kc = tau/(K(tau_c+theta)), tau_i = min(tau, 4(tau_c+theta))"
_MAX_POINTS = 400  # the fit is on at most this many (evenly thinned) post-step samples


@dataclass(frozen=True, slots=True)
class Fopdt:
    """K (output units per input unit), tau and theta in seconds, fit residual RMS."""

    gain: float
    time_constant_s: float
    dead_time_s: float
    rms_error: float = 0.0
    # Largest output deviation from the baseline after the step, in output units: the size
    # of the response the fit error is measured against.
    response_span: float = 0.0

    @property
    def error_share(self) -> float:
        """Fit RMS error over the response's size (0 when the size is unknown)."""
        return self.rms_error / self.response_span if self.response_span > 0.0 else 0.0

    def response(self, t_s: float, du: float) -> float:
        """Deviation of the output ``t_s`` after a step of size ``du``."""
        t = t_s - self.dead_time_s
        if t <= 0.0:
            return 0.0
        if self.time_constant_s <= 0.0:
            return self.gain * du
        return self.gain * du * (1.0 - math.exp(-t / self.time_constant_s))


@dataclass(frozen=True, slots=True)
class PiGains:
    """Gains in simple-pid's convention: out = kp e + ki integral(e dt) + kd de/dt."""

    kp: float
    ki: float
    kd: float
    tau_c_s: float
    tau_i_s: float
    rule: str = SIMC_RULE


class IdentificationError(ValueError):
    """The data cannot give a model (no step, no response, too few samples)."""


def _baseline(t_s: Sequence[float], y: Sequence[float], t_step_s: float) -> tuple[float, float]:
    """(y at the step, drift per second) from a straight line through the pre-step samples."""
    pre = [(t, v) for t, v in zip(t_s, y, strict=True) if t <= t_step_s]
    if not pre:
        raise IdentificationError("no sample before the step: the baseline is unknown")
    if len(pre) < 3 or pre[-1][0] - pre[0][0] <= 0.0:
        return sum(v for _, v in pre) / len(pre), 0.0
    n = len(pre)
    mt = sum(t for t, _ in pre) / n
    mv = sum(v for _, v in pre) / n
    stt = sum((t - mt) ** 2 for t, _ in pre)
    slope = sum((t - mt) * (v - mv) for t, v in pre) / stt
    return mv + slope * (t_step_s - mt), slope


def _fit_k(
    ts: Sequence[float], dev: Sequence[float], du: float, theta: float, tau: float
) -> tuple[float, float]:
    """Least-squares K for fixed (theta, tau) and the residual sum of squares."""
    basis = [
        0.0 if t <= theta else du * (1.0 - math.exp(-(t - theta) / tau)) if tau > 0 else du
        for t in ts
    ]
    bb = sum(b * b for b in basis)
    if bb <= 0.0:
        return 0.0, sum(d * d for d in dev)
    k = sum(b * d for b, d in zip(basis, dev, strict=True)) / bb
    sse = sum((d - k * b) ** 2 for b, d in zip(basis, dev, strict=True))
    return k, sse


def fit_step(
    t_s: Sequence[float],
    y: Sequence[float],
    *,
    t_step_s: float,
    du: float,
    detrend: bool = True,
) -> Fopdt:
    """FOPDT of the response ``y(t_s)`` to a step of ``du`` applied at ``t_step_s``.

    ``detrend`` removes the linear drift seen before the step (off: the pre-step mean is the
    baseline). Raises IdentificationError when the data cannot support a model.
    """
    if len(t_s) != len(y):
        raise IdentificationError("t_s and y differ in length")
    if du == 0.0 or not math.isfinite(du):
        raise IdentificationError("the step size must be finite and non-zero")
    y0, slope = _baseline(t_s, y, t_step_s)
    if not detrend:
        pre = [v for t, v in zip(t_s, y, strict=True) if t <= t_step_s]
        y0, slope = sum(pre) / len(pre), 0.0
    post = [(t - t_step_s, v) for t, v in zip(t_s, y, strict=True) if t > t_step_s]
    if len(post) < 10:
        raise IdentificationError(f"only {len(post)} samples after the step (need >= 10)")
    stride = max(1, len(post) // _MAX_POINTS)
    post = post[::stride]
    ts = [t for t, _ in post]
    dev = [v - y0 - slope * t for t, v in post]
    span = ts[-1]
    if span <= 0.0:
        raise IdentificationError("the test after the step has no duration")
    dt = max(span / len(ts), 1e-9)

    sse, k, theta, tau = _grid(lambda theta, tau: _fit_k(ts, dev, du, theta, tau), span, dt)
    if k == 0.0 or not math.isfinite(k):
        raise IdentificationError("the output did not respond to the step")
    return _model(k, tau, theta, sse, dev)


def fit_lag(
    t_s: Sequence[float], u: Sequence[float], y: Sequence[float], *, t_step_s: float
) -> Fopdt:
    """FOPDT from a measured input ``u`` (not a clean step) to ``y``: both detrended by their
    drift before ``t_step_s``, then y - y0 = K lag(u - u0) delayed by theta, fitted like
    :func:`fit_step` (K closed form on a (theta, tau) grid, refined). For a loop whose input is
    itself the output of another loop (the water under its own PI), this identifies the process
    alone, without that loop's lag."""
    if not len(t_s) == len(u) == len(y):
        raise IdentificationError("t_s, u and y differ in length")
    u0, u_slope = _baseline(t_s, u, t_step_s)
    y0, y_slope = _baseline(t_s, y, t_step_s)
    post = [
        (t - t_step_s, ui - u0 - u_slope * (t - t_step_s), yi - y0 - y_slope * (t - t_step_s))
        for t, ui, yi in zip(t_s, u, y, strict=True)
        if t > t_step_s
    ]
    if len(post) < 10:
        raise IdentificationError(f"only {len(post)} samples after the step (need >= 10)")
    post = post[:: max(1, len(post) // _MAX_POINTS)]
    ts = [t for t, _, _ in post]
    us = [v for _, v, _ in post]
    dev = [v for _, _, v in post]
    span = ts[-1]
    if span <= 0.0 or max(abs(v) for v in us) == 0.0:
        raise IdentificationError("the input did not move after the step")

    def fit(theta: float, tau: float) -> tuple[float, float]:
        basis, x, j, prev_t = [], 0.0, -1, 0.0
        for t in ts:
            # Input as it was theta ago (held between samples), through the lag from prev_t.
            while j + 1 < len(ts) and ts[j + 1] <= t - theta:
                j += 1
            u_then = us[j] if j >= 0 else 0.0
            x += (1.0 - math.exp(-(t - prev_t) / tau)) * (u_then - x) if tau > 0 else u_then - x
            prev_t = t
            basis.append(x)
        bb = sum(b * b for b in basis)
        if bb <= 0.0:
            return 0.0, sum(d * d for d in dev)
        k = sum(b * d for b, d in zip(basis, dev, strict=True)) / bb
        return k, sum((d - k * b) ** 2 for b, d in zip(basis, dev, strict=True))

    sse, k, theta, tau = _grid(fit, span, max(span / len(ts), 1e-9))
    if k == 0.0 or not math.isfinite(k):
        raise IdentificationError("the output did not respond to the input")
    return _model(k, tau, theta, sse, dev)


def _model(k: float, tau: float, theta: float, sse: float, dev: Sequence[float]) -> Fopdt:
    return Fopdt(
        gain=k,
        time_constant_s=tau,
        dead_time_s=theta,
        rms_error=math.sqrt(sse / len(dev)),
        response_span=max(abs(d) for d in dev),
    )


def _grid(
    fit: Callable[[float, float], tuple[float, float]], span: float, dt: float
) -> tuple[float, float, float, float]:
    """(sse, K, theta, tau) minimising ``fit``: a coarse grid (theta linear up to half the
    window, tau logarithmic from half a sample to 3 windows), then a shrinking box around the
    best point."""
    thetas = [span * 0.5 * i / 24 for i in range(25)]
    taus = [dt * 0.5 * (6.0 * span / (dt * 0.5)) ** (j / 29) for j in range(30)]
    best = (math.inf, 0.0, 0.0, 0.0)
    for theta in thetas:
        for tau in taus:
            k, sse = fit(theta, tau)
            if sse < best[0]:
                best = (sse, k, theta, tau)
    d_theta, r_tau = span * 0.5 / 24, (6.0 * span / (dt * 0.5)) ** (1 / 29)
    for _ in range(12):
        _, _, theta0, tau0 = best
        for i in (-1.0, -0.5, 0.0, 0.5, 1.0):
            for j in (-1.0, -0.5, 0.0, 0.5, 1.0):
                theta = max(0.0, theta0 + i * d_theta)
                tau = tau0 * r_tau**j
                k, sse = fit(theta, tau)
                if sse < best[0]:
                    best = (sse, k, theta, tau)
        d_theta *= 0.5
        r_tau = math.sqrt(r_tau)
    return best


def add_lag(model: Fopdt, lag_s: float) -> Fopdt:
    """The model seen through an extra first-order lag (e.g. a measurement filter), reduced to
    FOPDT by Skogestad's half rule: half the smaller lag goes to the dead time, half to tau."""
    if lag_s <= 0.0:
        return model
    big, small = max(model.time_constant_s, lag_s), min(model.time_constant_s, lag_s)
    return dataclasses.replace(
        model, time_constant_s=big + small / 2.0, dead_time_s=model.dead_time_s + small / 2.0
    )


def simc_pi(model: Fopdt, tau_c_s: float | None = None, *, min_tau_c_s: float = 0.0) -> PiGains:
    """SIMC PI gains for ``model``; ``tau_c_s`` defaults to theta (at least ``min_tau_c_s``).

    For a reverse-acting process (K < 0) the gains would be negative; the loops here are all
    direct-acting, so that is an error rather than a sign flip nobody expects.
    """
    if model.gain <= 0.0:
        raise IdentificationError(
            f"identified gain {model.gain:g} is not positive: the loop does not act as expected"
        )
    tau_c = max(model.dead_time_s if tau_c_s is None else tau_c_s, min_tau_c_s)
    if tau_c + model.dead_time_s <= 0.0:
        raise IdentificationError("tau_c + theta must be > 0 (give a closed-loop time tau_c)")
    kc = model.time_constant_s / (model.gain * (tau_c + model.dead_time_s))
    tau_i = min(model.time_constant_s, 4.0 * (tau_c + model.dead_time_s))
    if model.time_constant_s <= 0.0:
        # Pure dead time: SIMC's limit is integral-only control, ki = 1 / (K (tau_c + theta)).
        return PiGains(0.0, 1.0 / (model.gain * (tau_c + model.dead_time_s)), 0.0, tau_c, 0.0)
    return PiGains(kp=kc, ki=kc / tau_i, kd=0.0, tau_c_s=tau_c, tau_i_s=tau_i)
