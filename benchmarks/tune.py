"""`ilup tune` on three plant variants, and the control figures before/after its gains.

For each variant (reference; long probe delay; weak heater) the simulator runs as `ilup sim
--speed N` and `ilup tune` runs against it over Modbus TCP for the water, perfusate and flow
loops (a fresh simulator per loop, so each test starts from the same circuit). The three
overlays are then loaded over the variant's cart file and the 30-minute procedure is run in
virtual time (sim/virtual.py) with the default gains and with the tuned ones.

Usage: python -m benchmarks.tune   (or python -m benchmarks.run --only tune)
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ilup_controller.broker import free_port
from ilup_controller.config import CartConfig, load_config
from sim.virtual import Sample, VirtualCart

SIM_CONFIG = Path("config/sim.yaml")
# Variants of simulator.plant (until sim/family.py lands): name -> (changes, what it is).
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "reference": ({}, "config/sim.yaml as it is"),
    "long_probe_delay": (
        {"tubing_volume_ml": 208.0},
        "25 s transport delay to the arterial probe at 500 mL/min",
    ),
    "weak_heater": ({"heater_power_w": 400.0}, "400 W heater instead of 800 W"),
}
# Loop -> simulator speed: temperature tests are long (minutes of plant time), the flow test
# short but fast (0.4 s lag), which a sample every 0.02 s wall must still resolve.
LOOP_SPEED = {"water": 30.0, "perfusate": 30.0, "flow": 5.0}


def _variant_config(tmp: Path, name: str) -> Path:
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(SIM_CONFIG.read_text(encoding="utf-8"))
    for dev in data["devices"].values():
        dev["port"] = free_port()
    data["mqtt"]["port"] = free_port()  # no broker: ilup tune is told --assume-no-daemon
    data["record"] = {"directory": str(tmp / "records")}
    data["simulator"].setdefault("plant", {}).update(VARIANTS[name][0])
    path = tmp / f"{name}.yaml"
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(data, f)
    return path


def _tune(cfg_path: Path, loop: str, out: Path, log: Path) -> str:
    speed = LOOP_SPEED[loop]
    py = [sys.executable, "-m", "ilup_controller"]
    with log.open("ab") as f:
        sim = subprocess.Popen(
            [*py, "sim", "-c", str(cfg_path), "--speed", str(speed)], stdout=f, stderr=f
        )
        try:
            time.sleep(1.0)
            r = subprocess.run(
                [
                    *py,
                    "--log-level",
                    "warning",
                    "tune",
                    "-c",
                    str(cfg_path),
                    "--loop",
                    loop,
                    "--time-scale",
                    str(speed),
                    "--assume-no-daemon",
                    "-o",
                    str(out),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            sim.terminate()
            sim.wait(10)
    if r.returncode != 0:
        raise RuntimeError(f"ilup tune --loop {loop} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def _figures(cfg: CartConfig) -> dict[str, float]:
    samples: list[Sample] = []
    VirtualCart(cfg).run_for(1800.0, samples.append)
    tc, fc = cfg.control.temperature, cfg.control.flow
    start = next(s.decision.t_s for s in samples if s.truth.flow_ml_min >= tc.min_flow_ml_min)
    temps = [(s.decision.t_s, s.truth.arterial_c) for s in samples]
    warm = next((t for t, c in temps if c >= tc.target_c - 0.3), float("nan"))
    flows = [s.truth.flow_ml_min for s in samples if s.decision.t_s >= fc.ramp_s + 30.0]
    return {
        "rewarm_s": warm - start,
        "overshoot_c": max(c for _, c in temps) - tc.target_c,
        "flow_rms": statistics.fmean([(f - fc.target_ml_min) ** 2 for f in flows]) ** 0.5,
        "peak_water_c": max(s.truth.water_c for s in samples),
        "alarm_onsets": float(
            sum(
                len(
                    {x.alarm_id for x in b.decision.alarms}
                    - {x.alarm_id for x in a.decision.alarms}
                )
                for a, b in itertools.pairwise(samples)
            )
        ),
    }


def bench_tune() -> str:
    rows: list[list[str]] = []
    models: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name, (_, what) in VARIANTS.items():
            cfg_path = _variant_config(tmp, name)
            overlays: list[Path] = []
            for loop in LOOP_SPEED:
                out = tmp / f"{name}-{loop}.yaml"
                text = _tune(cfg_path, loop, out, tmp / f"{name}-{loop}.log")
                overlays.append(out)
                models.append(f"{name} ({what}):\n{text.strip()}")
            before = _figures(load_config(cfg_path))
            after = _figures(load_config(cfg_path, overlays))
            for label, f in (("default gains", before), ("tuned gains", after)):
                rows.append(
                    [
                        name,
                        label,
                        f"{f['rewarm_s']:.0f}",
                        f"{f['overshoot_c']:+.2f}",
                        f"{f['flow_rms']:.2f}",
                        f"{f['peak_water_c']:.2f}",
                        f"{f['alarm_onsets']:.0f}",
                    ]
                )
    headers = [
        "variant",
        "gains",
        "rewarm 34 -> 36.7 degC (s)",
        "overshoot (degC)",
        "flow RMS (mL/min)",
        "peak water (degC)",
        "alarm onsets",
    ]
    table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    return (
        "#### `ilup tune` on three plant variants (water, perfusate and flow loops), then the "
        "30-minute procedure in virtual time\n\n"
        + "\n".join(table)
        + "\n\n```\n"
        + "\n\n".join(models)
        + "\n```\n"
    )


if __name__ == "__main__":
    print(bench_tune())
