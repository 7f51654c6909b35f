"""The reference plant under cart settings the controller was not tuned on: tick periods, flow
targets across the human range, constant pressure, coarse command registers. Each row is one
40-minute procedure in virtual time (sim/metrics.py), the cart file changed only as named."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks.tables import table
from ilup_controller.config import load_config
from ilup_controller.core.control import ControlMode
from sim.family import changed
from sim.metrics import RunCollector, RunMetrics
from sim.virtual import VirtualCart

SIM_CONFIG = "config/sim.yaml"

# label -> (changes to the cart file by dotted key, pump control mode)
CASES: Mapping[str, tuple[Mapping[str, Any], ControlMode]] = {
    "as shipped (10 Hz, 500 mL/min)": ({}, "flow"),
    "50 Hz tick": ({"control.tick_period_s": 0.02}, "flow"),
    "5 Hz tick": ({"control.tick_period_s": 0.2}, "flow"),
    "2 Hz tick, flow ki 0.02 (0.04 is refused)": (
        {"control.tick_period_s": 0.5, "control.flow.pid.ki": 0.02},
        "flow",
    ),
    "flow target 300 mL/min": ({"control.flow.target_ml_min": 300.0}, "flow"),
    "flow target 1000 mL/min, constant flow": ({"control.flow.target_ml_min": 1000.0}, "flow"),
    "flow ceiling 1000 mL/min, constant pressure": (
        {"control.flow.target_ml_min": 1000.0},
        "pressure",
    ),
    "pump command in whole rpm (33 mL/min steps)": (
        {"signals.pump_speed_setpoint.scale": 1.0, "signals.pump_speed.scale": 1.0},
        "flow",
    ),
    "heater command in whole %": ({"signals.heater_power_setpoint.scale": 1.0}, "flow"),
    "flow meter noise 10 mL/min": ({"simulator.plant.flow_noise_ml_min": 10.0}, "flow"),
    "target 38.5 degC": ({"control.temperature.target_c": 38.5}, "flow"),
}


def _run(label: str, minutes: float) -> tuple[str, RunMetrics, float]:
    changes, mode = CASES[label]
    cfg = changed(load_config(SIM_CONFIG), changes)
    cart = VirtualCart(cfg)
    cart.core.controller.set_mode(mode, "auto")
    collect = RunCollector(cfg)
    last = cart.run_for(minutes * 60.0, collect)
    return label, collect.result(minutes * 60.0, 0.0, 0.0), last.truth.flow_ml_min


def bench_configs(minutes: float = 40.0, workers: int = 2) -> str:
    labels = list(CASES)
    with ProcessPoolExecutor(workers) as pool:
        runs = list(pool.map(_run, labels, [minutes] * len(labels)))
    rows = []
    for label, m, flow_end in runs:
        mean = m.flow_mean_error_ml_min
        rows.append(
            [
                label,
                ", ".join(f"{a} x{k}" for a, k in m.alarm_onsets.items()) or "-",
                "-" if m.drug_phase_done_s is None else f"{m.drug_phase_done_s / 60.0:.1f}",
                f"{flow_end:.0f}",
                "-" if mean is None else f"{round(mean, 1) + 0.0:+.1f}",  # no "-0.0"
                "-" if m.flow_rms_ml_min is None else f"{m.flow_rms_ml_min:.1f}",
                f"{m.peak_pressure_mmhg:.1f}",
                "-" if m.rewarm_ratio is None else f"{m.rewarm_ratio:.2f}",
                f"{m.max_rate_c_per_min:.2f}",
                f"{m.overshoot_c:.2f}",
            ]
        )
    headers = [
        "cart setting (reference plant)",
        "alarm onsets",
        "drug done (min)",
        "true flow at 40 min (mL/min)",
        "mean flow error (mL/min)",
        "flow RMS (mL/min)",
        "peak mmHg",
        "rewarm ratio",
        "max rate degC/min",
        "overshoot degC",
    ]
    return (
        f"### Cart settings the controller was not tuned on: {minutes:g} virtual minutes each\n\n"
        "The reference plant; only the named setting changed. Flow figures after the ramp "
        "settles, against the target (at constant pressure and when the pressure limiter "
        "holds the flow, the deviation is the lung's, not the loop's).\n\n" + table(headers, rows)
    )
