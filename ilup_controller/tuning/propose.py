"""From an identified model to the config's PID gains and an overlay file (pure, no I/O but the
final write)."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ilup_controller.config.models import CartConfig
from ilup_controller.tuning.identify import (
    Fopdt,
    IdentificationError,
    PiGains,
    add_lag,
    simc_pi,
)
from ilup_controller.tuning.steptest import Loop

# Where each loop's gains live in the config, and the units of its model (output per input).
WATER_TAU_C_S = 30.0  # closed-loop time of the water loop asked by default (see propose)
# A fit whose RMS error is more than this share of the response does not describe the loop.
# Family and 40 random plants, virtual time: 0.1-3.8 % on all 158 fits. 11.6 % on a 0.1 degC
# probe's perfusate loop before its baseline was long enough (steptest._drift_baseline_s): one
# LSB of drift, extrapolated over the test, had halved the gain (K 0.34 against about 0.6).
MAX_FIT_ERROR_SHARE = 0.08
FLOW_NOISE_GAIN = 0.5  # most of the flow meter's noise the flow loop may pass to the pump
FLOW_NOISE_RULE = (
    f"tau_c >= tau/{FLOW_NOISE_GAIN:g} - theta, so K kc <= {FLOW_NOISE_GAIN:g} (the meter's noise "
    "reaches the pump at most halved)"
)

GAIN_PATH: dict[Loop, tuple[str, ...]] = {
    "flow": ("control", "flow", "pid"),
    "pressure": ("control", "pressure", "pid"),
    "water": ("control", "temperature", "inner_pid"),
    "perfusate": ("control", "temperature", "gradient_pid"),
}
MODEL_UNITS: dict[Loop, str] = {
    "flow": "mL/min per rpm (pump speed -> measured flow)",
    "pressure": "mmHg per rpm (pump speed -> PA pressure)",
    "water": "degC per % (heater power -> water temperature)",
    "perfusate": "degC per degC (measured water -> perfusate temperature)",
}


@dataclass(frozen=True, slots=True)
class Proposal:
    loop: Loop
    identified: Fopdt
    tuned_on: Fopdt  # the identified model plus what the controller adds (the limiter filter)
    gains: PiGains
    current: tuple[float, float, float]  # kp, ki, kd in the config now
    # Other settings of the same loop the model gives (key beside the gains -> value).
    extra: dict[str, float] | None = None

    @property
    def key_path(self) -> str:
        return ".".join(GAIN_PATH[self.loop])

    def overlay(self) -> dict[str, Any]:
        node: dict[str, Any] = {
            "kp": round(self.gains.kp, 6),
            "ki": round(self.gains.ki, 6),
            "kd": round(self.gains.kd, 6),
        }
        path = GAIN_PATH[self.loop]
        node = {path[-1]: node, **(self.extra or {})}
        for key in reversed(path[:-1]):
            node = {key: node}
        return node

    def describe(self) -> str:
        m, t, g = self.identified, self.tuned_on, self.gains
        lines = [
            f"loop {self.loop}: FOPDT model, K in {MODEL_UNITS[self.loop]}",
            f"  K = {m.gain:.5g}   tau = {m.time_constant_s:.4g} s   theta = "
            f"{m.dead_time_s:.4g} s   (fit RMS error {m.rms_error:.3g}, "
            f"{m.error_share:.1%} of the response)",
        ]
        if t != m:
            lines.append(
                f"  with the controller's input filter (half rule): tau = "
                f"{t.time_constant_s:.4g} s, theta = {t.dead_time_s:.4g} s"
            )
        lines += [
            f"  rule: {g.rule}",
            f"  tau_c = {g.tau_c_s:.4g} s, tau_i = {g.tau_i_s:.4g} s",
            f"  {self.key_path}: kp = {g.kp:.5g}, ki = {g.ki:.5g} /s, kd = {g.kd:g} "
            f"(now kp = {self.current[0]:g}, ki = {self.current[1]:g}, kd = {self.current[2]:g})",
        ]
        lines += [f"  {k} = {v:.4g}" for k, v in (self.extra or {}).items()]
        return "\n".join(lines)


def check_fit(loop: Loop, model: Fopdt) -> None:
    """Refuse a model that does not describe its own test: gains from it would be guesses."""
    share = model.error_share
    if share > MAX_FIT_ERROR_SHARE:
        raise IdentificationError(
            f"the {loop} model does not fit its step response: fit RMS error "
            f"{model.rms_error:.3g} is {share:.0%} of the response ({model.response_span:.3g}; "
            f"at most {MAX_FIT_ERROR_SHARE:.0%}). The output moved by more than the step (a "
            "drift that is not a straight line, a disturbance during the test). No gains "
            "proposed, nothing written: let the readings settle and run the test again"
        )


def propose(cfg: CartConfig, loop: Loop, model: Fopdt, *, tau_c_s: float | None = None) -> Proposal:
    check_fit(loop, model)
    c = cfg.control
    if loop == "perfusate":
        return _propose_gradient(cfg, model, tau_c_s)
    tuned_on = add_lag(model, c.pressure.filter_s) if loop == "pressure" else model
    # Never ask for a closed loop faster than the control tick can follow, nor (when the dead
    # time is below what the samples resolve, as on the water loop) faster than a tenth of the
    # process lag: that bounds the loop gain kc K to 10 instead of running bang-bang.
    floor_s = max(2.0 * c.tick_period_s, tuned_on.time_constant_s / 10.0)
    if loop == "water":
        # The inner loop of the rewarming cascade: it must follow the gradient the rate loop
        # asks for within a fraction of that loop's minute, whatever the bath's own (slow,
        # ~15 min) time constant; a tenth of that would leave the rate loop waiting.
        floor_s = max(2.0 * c.tick_period_s, min(floor_s, WATER_TAU_C_S))
    if loop == "flow" and tuned_on.time_constant_s > 0.0:
        # The meter's noise reaches the pump through kp. SIMC's tight tau_c = theta on a loop as
        # fast as the pump gives a high-frequency loop gain K kc = tau / (tau_c + theta) near 1,
        # and the noise then moves the true flow almost as much as the meter shows it (on the
        # reference plant: flow RMS 5.05 mL/min against 3.35 with the default gains). Asking
        # K kc <= FLOW_NOISE_GAIN passes at most half of it.
        noise_floor_s = tuned_on.time_constant_s / FLOW_NOISE_GAIN - tuned_on.dead_time_s
        floor_s = max(floor_s, noise_floor_s)
    gains = simc_pi(tuned_on, tau_c_s, min_tau_c_s=floor_s)
    if loop == "flow":
        gains = dataclasses.replace(gains, rule=f"{gains.rule}; {FLOW_NOISE_RULE}")
    current = {
        "flow": c.flow.pid,
        "pressure": c.pressure.pid,
        "water": c.temperature.inner_pid,
    }[loop]
    return Proposal(loop, model, tuned_on, gains, (current.kp, current.ki, current.kd))


GRADIENT_RULE = (
    "rate loop (core/rewarm.py), from the exchanger model (measured water -> perfusate, K tau "
    "theta): feed-forward time C/UA = tau/K; kp = C/UA in minutes (a rate error asks the "
    "gradient the feed-forward would), integral time = the loop's dead time theta + "
    "rate_window_s/2 (tau_c = theta, as SIMC's 'tight')"
)


def _propose_gradient(cfg: CartConfig, model: Fopdt, tau_c_s: float | None) -> Proposal:
    """The exchanger model (water -> perfusate, K tau theta) gives the rewarming loop: the
    exchanger time constant C/UA = tau/K for the feed-forward, and the rate loop's gains."""
    t = cfg.control.temperature
    if model.gain <= 0.0 or model.time_constant_s <= 0.0:
        raise IdentificationError(
            f"perfusate model K={model.gain:g}, tau={model.time_constant_s:g} s: not a lag the "
            "rewarming loop can use"
        )
    exchanger_s = model.time_constant_s / model.gain
    dead_s = model.dead_time_s + t.rate_window_s / 2.0
    tau_c = max(dead_s if tau_c_s is None else tau_c_s, 2.0 * cfg.control.tick_period_s)
    kp = exchanger_s / 60.0  # degC of gradient per degC/min of rate error
    ki = kp / tau_c
    gains = PiGains(kp=kp, ki=ki, kd=0.0, tau_c_s=tau_c, tau_i_s=tau_c, rule=GRADIENT_RULE)
    g = t.gradient_pid
    return Proposal(
        "perfusate",
        model,
        model,
        gains,
        (g.kp, g.ki, g.kd),
        extra={"exchanger_time_constant_s": round(exchanger_s, 3)},
    )


def write_overlay(path: str | Path, proposals: list[Proposal]) -> None:
    """A config overlay holding only the proposed gains, with the models as comments."""
    data: dict[str, Any] = {}
    for p in proposals:
        merge(data, p.overlay())
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buf = io.StringIO()
    yaml.dump(data, buf)
    header = ["# Gains proposed by `ilup tune`; load with --overlay (README: Autotune)."]
    for p in proposals:
        header += [f"# {line}" for line in p.describe().splitlines()]
    Path(path).write_text("\n".join(header) + "\n" + buf.getvalue(), encoding="utf-8")


def merge(into: dict[str, Any], add: dict[str, Any]) -> None:
    for k, v in add.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
