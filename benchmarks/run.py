"""Performance and control-quality benchmarks; prints Markdown tables (`make bench`).

1. The 30-minute procedure in virtual time: wall time, speed-up and control quality.
2. Tick timing over real Modbus TCP (simulator in another process) at 10 Hz and 50 Hz.
3. CPU and peak RSS of the `ilup run` process at 10 Hz.
4. `ilup tune` on three plant variants, before/after figures (benchmarks/tune.py, ~4 min).

Usage: python -m benchmarks.run [--seconds 60] [--only virtual,tick,resources,tune]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ilup_controller.broker import MosquittoProcess, free_port
from ilup_controller.config import CartConfig, load_config
from ilup_controller.runtime.daemon import Daemon
from sim.virtual import Sample, VirtualCart

SIM_CONFIG = Path("config/sim.yaml")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100.0 * (len(s) - 1)))]


# ------------------------------------------------------------------ 1. virtual time


def bench_virtual() -> str:
    cfg = load_config(SIM_CONFIG)
    samples: list[Sample] = []
    cart = VirtualCart(cfg)
    t0 = time.perf_counter()
    cart.run_for(1800.0, samples.append)
    wall = time.perf_counter() - t0
    target = cfg.control.flow.target_ml_min
    ramp_end = cfg.control.flow.ramp_s + 30.0
    flows = [s.truth.flow_ml_min for s in samples if s.decision.t_s >= ramp_end]
    temps = [(s.decision.t_s, s.truth.arterial_c) for s in samples]
    warm = next(t for t, c in temps if c >= cfg.control.temperature.target_c - 0.3)
    after = [c for t, c in temps if t >= warm]
    rows = [
        ["simulated time", "1800 s (18 000 ticks at 10 Hz)"],
        ["wall time", f"{wall:.2f} s"],
        ["speed-up over real time", f"{1800.0 / wall:.0f}x"],
        [
            "flow after ramp: mean / min / max",
            f"{statistics.fmean(flows):.1f} / {min(flows):.1f} "
            f"/ {max(flows):.1f} mL/min (target {target:.0f})",
        ],
        [
            "flow after ramp: RMS error",
            f"{statistics.fmean([(f - target) ** 2 for f in flows]) ** 0.5:.2f} mL/min",
        ],
        [
            "peak PA pressure",
            f"{max(s.truth.pa_pressure_mmhg for s in samples):.2f} mmHg "
            f"(limit {cfg.control.pressure.limit_mmhg:.0f})",
        ],
        ["perfusate within 0.3 degC of target from", f"{warm:.0f} s"],
        ["perfusate after warm-up: min / max", f"{min(after):.2f} / {max(after):.2f} degC"],
        ["peak heater water", f"{max(s.truth.water_c for s in samples):.2f} degC"],
    ]
    return "### 30-minute procedure in virtual time\n\n" + _table(["measure", "value"], rows)


# ------------------------------------------------------------------ helpers for real processes


def _cart_config(tmp: Path, broker_port: int, tick_period_s: float) -> tuple[Path, CartConfig]:
    yaml = YAML(typ="safe", pure=True)
    data: dict[str, Any] = yaml.load(SIM_CONFIG.read_text(encoding="utf-8"))
    for dev in data["devices"].values():
        dev["port"] = free_port()
    data["mqtt"]["port"] = broker_port
    data["control"]["tick_period_s"] = tick_period_s
    data["record"] = {"directory": str(tmp / f"records-{tick_period_s}")}
    path = tmp / f"cart-{tick_period_s}.yaml"
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(data, f)
    return path, load_config(path)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ilup_controller", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# ------------------------------------------------------------------ 2. tick timing


async def _tick_run(
    cfg: CartConfig, seconds: float
) -> tuple[list[tuple[float, float, float]], int]:
    ticks: list[tuple[float, float, float]] = []
    daemon = Daemon(cfg, on_tick=lambda d, s, e: ticks.append((d, s, e)))
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    await daemon.run(stop)
    assert daemon.core is not None
    return ticks, daemon.alarm_onsets


def bench_ticks(tmp: Path, broker: MosquittoProcess, seconds: float) -> str:
    rows = []
    for hz in (10, 50):
        path, cfg = _cart_config(tmp, broker.port, 1.0 / hz)
        sim = _spawn(["sim", "-c", str(path)], tmp / f"sim-{hz}.log")
        try:
            time.sleep(1.0)
            ticks, onsets = asyncio.run(_tick_run(cfg, seconds))
        finally:
            _stop(sim)
        ticks = ticks[hz:]  # first second: connections coming up
        period = 1.0 / hz
        dur_ms = [(e - s) * 1e3 for _, s, e in ticks]
        late_ms = [(s - d) * 1e3 for d, s, _ in ticks]
        starts = [s for _, s, _ in ticks]
        jitter_ms = [abs((b - a) - period) * 1e3 for a, b in itertools.pairwise(starts)]
        deadlines = [d for d, _, _ in ticks]
        missed = sum(round((b - a) / period) - 1 for a, b in itertools.pairwise(deadlines))
        rows.append(
            [
                f"{hz} Hz",
                str(len(ticks)),
                f"{statistics.median(dur_ms):.3f} / {_pct(dur_ms, 99):.3f}",
                f"{statistics.median(late_ms):.3f} / {_pct(late_ms, 99):.3f} / {max(late_ms):.2f}",
                f"{_pct(jitter_ms, 99):.3f}",
                str(missed),
                str(onsets),
            ]
        )
    return (
        f"### Tick timing over real Modbus TCP ({seconds:.0f} s each, simulator in another "
        "process, Mosquitto connected)\n\n"
        + _table(
            [
                "rate",
                "ticks",
                "tick work median / p99 (ms)",
                "start lateness median / p99 / max (ms)",
                "period jitter p99 (ms)",
                "overruns",
                "alarm onsets",
            ],
            rows,
        )
    )


# ------------------------------------------------------------------ 3. CPU and memory


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def bench_resources(tmp: Path, broker: MosquittoProcess, seconds: float) -> str:
    path, _ = _cart_config(tmp, broker.port, 0.1)
    sim = _spawn(["sim", "-c", str(path)], tmp / "sim-res.log")
    daemon = _spawn(["run", "-c", str(path)], tmp / "daemon-res.log")
    try:
        time.sleep(3.0)  # start-up (imports, connections) is not steady state
        cpu0, t0 = _proc_cpu_s(daemon.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = _proc_cpu_s(daemon.pid), time.monotonic()
        hwm = _proc_hwm_mb(daemon.pid)
        sim_cpu = _proc_cpu_s(sim.pid)
    finally:
        _stop(daemon)
        _stop(sim)
    share = (cpu1 - cpu0) / (t1 - t0) * 100.0
    rows = [
        ["daemon CPU (one core = 100 %)", f"{share:.2f} %"],
        ["daemon peak RSS (VmHWM)", f"{hwm:.1f} MB"],
        ["simulator CPU over the whole run", f"{sim_cpu:.1f} s"],
    ]
    return f"### `ilup run` at 10 Hz, {seconds:.0f} s steady state\n\n" + _table(
        ["measure", "value"], rows
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--only", default="virtual,tick,resources,tune")
    args = ap.parse_args()
    which = set(args.only.split(","))
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    if "virtual" in which:
        print(bench_virtual() + "\n", flush=True)
    if which & {"tick", "resources"}:
        tmp = Path(tempfile.mkdtemp(prefix="ilup-bench-"))
        with MosquittoProcess() as broker:
            if "tick" in which:
                print(bench_ticks(tmp, broker, args.seconds) + "\n", flush=True)
            if "resources" in which:
                print(bench_resources(tmp, broker, args.seconds) + "\n", flush=True)
    if "tune" in which:
        from benchmarks.tune import bench_tune

        print(bench_tune(), flush=True)


if __name__ == "__main__":
    main()
