"""`ilup tune` on four plant variants, and the control figures before/after its gains.

For each variant of sim/family.py (reference; 25 s probe delay; 300 W heater; 20 W/K exchanger)
the simulator runs as `ilup sim --speed N` and `ilup tune` runs against it over Modbus TCP for
the water, perfusate and flow loops (a fresh simulator per loop, so each test starts from the
same circuit). The three overlays are then loaded over the variant's cart file and the 30-minute
procedure is run in virtual time (sim/metrics.py, the family table's figures) with the default
gains and with the tuned ones.

Usage: python -m benchmarks.tune   (or python -m benchmarks.run --only tune)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ilup_controller.broker import free_port
from ilup_controller.config import CartConfig, load_config
from sim import family
from sim.metrics import RunMetrics, run_metrics

SIM_CONFIG = Path("config/sim.yaml")
# Plant variants (sim/family.py): the reference, a long probe delay, a weak heater and a weak
# exchanger (three times the default exchanger time constant).
VARIANTS = ("reference", "probe_delay_25s", "heater_300w", "hx_20")
# Loop -> simulator speed: temperature tests are long (minutes of plant time), the flow test
# short but fast (0.4 s lag), which a sample every 0.02 s wall must still resolve.
LOOP_SPEED = {"water": 30.0, "perfusate": 30.0, "flow": 5.0}


def _variant_config(tmp: Path, name: str) -> Path:
    cfg = family.apply(family.by_name(name), load_config(SIM_CONFIG))
    data = cfg.model_dump(mode="json")
    for dev in data["devices"].values():
        dev["port"] = free_port()
    data["mqtt"]["port"] = free_port()  # no broker: ilup tune is told --assume-no-daemon
    data["record"] = {"directory": str(tmp / "records")}
    path = tmp / f"{name}.yaml"
    family.write_config(CartConfig.model_validate(data), path)
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


def _figures(cfg: CartConfig) -> RunMetrics:
    return run_metrics(cfg, 1800.0)


def bench_tune() -> str:
    rows: list[list[str]] = []
    models: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in VARIANTS:
            what = family.by_name(name).description
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
                        "-" if f.rewarm_s is None else f"{f.rewarm_s:.0f}",
                        "-" if f.rewarm_ratio is None else f"{f.rewarm_ratio:.2f}",
                        f"{f.max_rate_c_per_min:.2f}",
                        f"{f.overshoot_c:.2f}",
                        "-" if f.flow_rms_ml_min is None else f"{f.flow_rms_ml_min:.2f}",
                        f"{f.peak_water_c:.2f}",
                        str(f.onsets),
                    ]
                )
    headers = [
        "variant",
        "gains",
        "rewarm to 36.7 degC (s)",
        "ratio to 1.25 x guideline",
        "max rate (degC/min over 2 min)",
        "overshoot (degC)",
        "flow RMS (mL/min)",
        "peak water (degC)",
        "alarm onsets",
    ]
    table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    return (
        "#### `ilup tune` over Modbus on four plant variants (water, perfusate and flow loops), "
        "then the 30-minute procedure in virtual time\n\n"
        + "\n".join(table)
        + "\n\n```\n"
        + "\n\n".join(models)
        + "\n```\n"
    )


if __name__ == "__main__":
    print(bench_tune())
