"""Performance and control-quality benchmarks; prints Markdown tables (`make bench`).

1. The 30-minute procedure in virtual time: wall time, speed-up and control quality.
2. Tick timing over real Modbus TCP (simulator in another process) at 10 Hz and 50 Hz.
3. CPU and peak RSS of the `ilup run` process at 10 Hz.
4. The plant family (sim/family.py): one closed-loop run per variant in virtual time.
5. `ilup tune` on four plant variants, before/after figures (benchmarks/tune.py, ~4 min).
6. The reference plant under cart settings it was not tuned on (benchmarks/configs.py).

Usage: python -m benchmarks.run [--seconds 60] [--only virtual,tick,resources,family,tune,configs]
       python -m benchmarks.run --family [--minutes 40] [--workers 2] [--random N [--seed S]]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from benchmarks.tables import table as _table
from ilup_controller.broker import MosquittoProcess, free_port
from ilup_controller.config import CartConfig, load_config
from ilup_controller.runtime.daemon import Daemon
from ilup_controller.tuning.identify import IdentificationError
from sim import family, virtual_tune
from sim.metrics import RunMetrics, physical_bound_s, run_metrics
from sim.virtual import Sample, VirtualCart

SIM_CONFIG = Path("config/sim.yaml")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100.0 * (len(s) - 1)))]


# ------------------------------------------------------------------ 1. virtual time


# Times the harness alone: the same script runs against this checkout and, with --baseline,
# against an earlier commit checked out beside it, so both figures come from one run.
_SPEED_SCRIPT = """
import time
from ilup_controller.config import load_config
from sim.virtual import VirtualCart
best = 0.0
for _ in range(3):
    cart = VirtualCart(load_config("config/sim.yaml"))
    t0 = time.perf_counter()
    cart.run_for(1800.0)
    best = max(best, 1800.0 / (time.perf_counter() - t0))
print(best)
"""


def _harness_speed_up(tree: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _SPEED_SCRIPT],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip())


def _alternating_speed_ups(rev: str, rounds: int) -> tuple[float, float]:
    """Median speed-up of this checkout and of ``rev`` (checked out beside it), alternating."""
    with tempfile.TemporaryDirectory(prefix="ilup-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), rev], check=True)
        try:
            now, then = [], []
            for _ in range(rounds):
                now.append(_harness_speed_up(Path.cwd()))
                then.append(_harness_speed_up(tree))
            return statistics.median(now), statistics.median(then)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=True)


def bench_virtual(baseline: str | None = None, rounds: int = 3) -> str:
    """The speed-up is the median over ``rounds`` processes (this VM's speed drifts by a third
    between processes); with a baseline the two trees alternate, so both see the same drift."""
    cfg = load_config(SIM_CONFIG)
    if baseline is None:
        speed_up = statistics.median(_harness_speed_up(Path.cwd()) for _ in range(rounds))
        base_speed_up = None
    else:
        speed_up, base_speed_up = _alternating_speed_ups(baseline, rounds)
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
        ["wall time, keeping every sample for the figures below", f"{wall:.2f} s"],
        ["speed-up over real time, harness alone (median of 3 processes)", f"{speed_up:.0f}x"],
        *(
            []
            if base_speed_up is None
            else [[f"... the same at {baseline} (same run)", f"{base_speed_up:.0f}x"]]
        ),
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


# ------------------------------------------------------------------ 4. plant family


def _variant_cfg(name: str) -> CartConfig:
    return family.apply(family.by_name(name), load_config(SIM_CONFIG))


def _family_run(name: str, duration_s: float) -> tuple[str, RunMetrics, float | None]:
    cfg = _variant_cfg(name)
    m = run_metrics(cfg, duration_s)
    bound = None if m.bound_start is None else physical_bound_s(cfg, *m.bound_start)
    return name, m, bound


def _family_tuned_run(name: str, duration_s: float) -> tuple[str, RunMetrics | str]:
    """The same variant after `ilup tune --loop water` then `--loop perfusate` (in virtual
    time, sim/virtual_tune.py): the gains a commissioning engineer would load as an overlay.
    Tuned on the cart at the base start temperature (commissioning, saline near 34 degC; a
    cold prime warming by itself would give no model), then run from the variant's start.
    A tune that stops or refuses (a cap reached, a model that does not fit) proposes no gains:
    its reason comes back instead of figures, as `ilup tune` would print it."""
    variant = family.by_name(name)
    base = load_config(SIM_CONFIG)
    try:
        commissioned = virtual_tune.tuned(
            family.apply(dataclasses.replace(variant, start_c=None), base)
        )
    except (RuntimeError, IdentificationError) as e:
        return name, str(e)
    # The variant again on the tuned cart: the same plant, now from its own start.
    return name, run_metrics(family.apply(variant, commissioned), duration_s)


def _tuned_cells(mt: RunMetrics | None) -> list[str]:
    """Ratio, fastest rate, overshoot and onsets after `ilup tune`; "-" where it gave no gains."""
    if mt is None:
        return ["no gains", "-", "-", "-"]
    return [
        "-" if mt.rewarm_ratio is None else f"{mt.rewarm_ratio:.2f}",
        f"{mt.max_rate_c_per_min:.2f}",
        f"{mt.overshoot_c:.2f}",
        str(mt.onsets),
    ]


def _min(value_s: float | None) -> str:
    return "-" if value_s is None else f"{value_s / 60.0:.1f}"


def _plug_cell(m: RunMetrics) -> str:
    """The cold plug's bottom, its time after the heater's start, and the guideline pace from
    it over the limit (RunMetrics.plug_pace_s)."""
    if m.plug_low_c is None or m.plug_low_s is None or m.plug_pace_s is None:
        return "-"
    pace = f"{m.plug_pace_s / m.rewarm_limit_s:.2f}" if m.rewarm_limit_s else "-"
    return f"{m.plug_low_c:.2f} at {m.plug_low_s / 60.0:.1f}, {pace}"


def _fastest(ms: Iterable[RunMetrics], *, heater_only: bool) -> float:
    """Fastest 2-minute arterial warming; heater_only leaves out the primes colder than 33 degC,
    which the body warms through the lung faster than the guideline with the heater off (the
    controller cannot cool: the advisory warming_uncontrolled says so)."""
    return max(
        m.max_rate_c_per_min
        for m in ms
        if not heater_only or (m.rewarm_start_c is not None and m.rewarm_start_c >= 33.0)
    )


def bench_family(minutes: float, workers: int, random_n: int = 0, seed: int = 1) -> str:
    names = [v.name for v in family.VARIANTS]
    names += [v.name for v in family.random_variants(seed, random_n)]
    duration_s = minutes * 60.0
    t0 = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            runs = list(pool.map(_family_run, names, [duration_s] * len(names)))
    else:
        runs = [_family_run(n, duration_s) for n in names]
    results = {name: m for name, m, _ in runs}
    bounds = {name: b for name, _, b in runs}
    wall = time.perf_counter() - t0
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            tuned_runs = list(pool.map(_family_tuned_run, names, [duration_s] * len(names)))
    else:
        tuned_runs = [_family_tuned_run(n, duration_s) for n in names]
    tuned = {n: r for n, r in tuned_runs if isinstance(r, RunMetrics)}
    refused = {n: r for n, r in tuned_runs if isinstance(r, str)}
    rows = []
    for name in names:
        m, mt = results[name], tuned.get(name)
        ratio, bound = m.rewarm_ratio, bounds[name]
        rows.append(
            [
                f"`{name}`",
                str(m.onsets),
                ", ".join(f"{a} x{k}" for a, k in m.alarm_onsets.items()) or "-",
                _min(m.drug_phase_done_s),
                "-" if m.rewarm_start_c is None else f"{m.rewarm_start_c:.1f}",
                _min(m.rewarm_s),
                _min(m.rewarm_limit_s),
                "-" if ratio is None else f"{ratio:.2f}",
                _min(bound),
                "-" if bound is None or not m.rewarm_limit_s else f"{bound / m.rewarm_limit_s:.2f}",
                _plug_cell(m),
                f"{m.overshoot_c:.2f}",
                f"{m.max_rate_c_per_min:.2f}",
                f"{m.max_gradient_c:.1f}",
                *_tuned_cells(mt),
                "-" if m.flow_rms_ml_min is None else f"{m.flow_rms_ml_min:.1f}",
                f"{m.peak_pressure_mmhg:.1f}",
                f"{m.speed_up:.0f}x / {m.cpu_speed_up:.0f}x",
            ]
        )
    ms = list(results.values())
    ratios = [r for m in ms if (r := m.rewarm_ratio) is not None]
    tuned_ratios = [r for m in tuned.values() if (r := m.rewarm_ratio) is not None]
    # The time bar applies where the plant allows it: its bound within the limit.
    possible = [
        n for n in names if (b := bounds[n]) is not None and b < (results[n].rewarm_limit_s or 0)
    ]
    # ... and where a steady guideline pace from the cold plug's bottom arrives within it too.
    paced = [
        n
        for n in possible
        if (results[n].plug_pace_s or math.inf) < (results[n].rewarm_limit_s or 0.0)
    ]
    cpu = sum(m.cpu_s for m in ms)
    totals = [
        ["variants", str(len(ms))],
        ["variants with zero alarm onsets", str(sum(m.onsets == 0 for m in ms))],
        ["alarm onsets, all variants", str(sum(m.onsets for m in ms))],
        [
            f"drug phase completed within {minutes:g} min",
            str(sum(m.drug_phase_done_s is not None for m in ms)),
        ],
        ["rewarmed within the guideline limit", f"{sum(r <= 1.0 for r in ratios)}"],
        [
            "... where the plant's bound allows it",
            f"{sum((results[n].rewarm_ratio or 9.0) <= 1.0 for n in possible)} of {len(possible)}",
        ],
        [
            "... where the plug's pace allows it too",
            f"{sum((results[n].rewarm_ratio or 9.0) <= 1.0 for n in paced)} of {len(paced)}",
        ],
        ["... after `ilup tune` (water, perfusate)", f"{sum(r <= 1.0 for r in tuned_ratios)}"],
        [
            "... after `ilup tune`, where the bound allows it",
            f"{sum((tuned[n].rewarm_ratio or 9.0) <= 1.0 for n in possible if n in tuned)} "
            f"of {len(possible)}",
        ],
        [
            "... after `ilup tune`, where the plug's pace allows it too",
            f"{sum((tuned[n].rewarm_ratio or 9.0) <= 1.0 for n in paced if n in tuned)} "
            f"of {len(paced)}",
        ],
        [
            "`ilup tune` stopped or refused (no gains)",
            "; ".join(f"`{n}`: {why}" for n, why in refused.items()) or "0",
        ],
        [
            "worst ratio, default / tuned",
            f"{max(ratios, default=math.nan):.2f} / {max(tuned_ratios, default=math.nan):.2f}",
        ],
        [
            "alarm onsets after `ilup tune`, all variants",
            str(sum(m.onsets for m in tuned.values())),
        ],
        [
            "fastest arterial warming over 2 min after `ilup tune`, heater-warmed / all",
            f"{_fastest(tuned.values(), heater_only=True):.2f} / "
            f"{_fastest(tuned.values(), heater_only=False):.2f} degC/min",
        ],
        ["never rewarmed", str(sum(m.rewarm_s is None for m in ms))],
        ["worst overshoot", f"{max(m.overshoot_c for m in ms):.2f} degC"],
        [
            "fastest arterial warming over 2 min, heater-warmed / all",
            f"{_fastest(ms, heater_only=True):.2f} / "
            f"{_fastest(ms, heater_only=False):.2f} degC/min",
        ],
        ["largest water-to-arterial gradient", f"{max(m.max_gradient_c for m in ms):.1f} degC"],
        ["highest peak pressure", f"{max(m.peak_pressure_mmhg for m in ms):.1f} mmHg"],
        ["virtual time", f"{len(ms) * minutes:g} min"],
        [
            f"wall time ({workers} worker{'s' if workers > 1 else ''})",
            f"{wall:.1f} s ({len(ms) * duration_s / wall:.0f}x real time overall)",
        ],
        [
            "CPU time, all variants",
            f"{cpu:.1f} s ({len(ms) * duration_s / cpu:.0f}x real time per core)",
        ],
    ]
    return (
        f"### Plant family: {len(ms)} variants, {minutes:g} virtual minutes each\n\n"
        "Rewarm: from the first tick the temperature loop drives the heater to the true arterial"
        " temperature within 0.3 degC of target; limit = 1.25 x (target - start) / 0.5 degC/min."
        " Bound: the fastest the plant allows within the guideline from where it stands when"
        " the heater may first run (true perfusate and water then; the plant's two thermal"
        " nodes with an ideal controller: full heater power until the water stands where the"
        " perfusate warms at 0.5 degC/min, never more than max_gradient_c above it or over a"
        " cap, plus the tubing transit to the probe; a lower bound, sim/metrics.py);"
        " bound/limit at or above 1: the guideline time is out of the plant's reach."
        " Plug: the lowest true arterial temperature after the heater starts (the tubing"
        " contents cooled at priming flow pass the probe as the flow ramps), when, and the time"
        " a steady 0.5 degC/min from it takes to the band over the limit: the 2-minute window"
        " counts the rise from that bottom, which the bound leaves out."
        " Max rate: fastest true arterial warming over any 2 minutes."
        " Tuned: the same run after `ilup tune --loop water` and `--loop perfusate` on that"
        " variant (virtual time). Times in minutes; overshoot, rate, gradient and flow RMS on the"
        " true plant values.\n\n"
        + _table(
            [
                "variant",
                "onsets",
                "alarms",
                "drug done",
                "start degC",
                "rewarm",
                "limit",
                "ratio",
                "bound",
                "bound / limit",
                "plug: low degC at min, pace / limit",
                "overshoot degC",
                "max rate degC/min",
                "max gradient degC",
                "tuned ratio",
                "tuned max rate",
                "tuned overshoot",
                "tuned onsets",
                "flow RMS mL/min",
                "peak mmHg",
                "speed-up wall / CPU",
            ],
            rows,
        )
        + "\n\n"
        + _table(["total", "value"], totals)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--only", default="virtual,tick,resources,family,tune,configs")
    ap.add_argument("--family", action="store_true", help="only the plant-family table")
    ap.add_argument("--minutes", type=float, default=40.0, help="virtual minutes per variant")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--random", type=int, default=0, help="also N seeded random variants")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random variants")
    ap.add_argument(
        "--baseline", default=None, help="also time the virtual-time harness at this git revision"
    )
    args = ap.parse_args()
    which = {"family"} if args.family else set(args.only.split(","))
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    if "virtual" in which:
        print(bench_virtual(args.baseline) + "\n", flush=True)
    if which & {"tick", "resources"}:
        tmp = Path(tempfile.mkdtemp(prefix="ilup-bench-"))
        with MosquittoProcess() as broker:
            if "tick" in which:
                print(bench_ticks(tmp, broker, args.seconds) + "\n", flush=True)
            if "resources" in which:
                print(bench_resources(tmp, broker, args.seconds) + "\n", flush=True)
    if "family" in which:
        print(bench_family(args.minutes, args.workers, args.random, args.seed) + "\n", flush=True)
    if "tune" in which:
        from benchmarks.tune import bench_tune

        print(bench_tune() + "\n", flush=True)
    if "configs" in which:
        from benchmarks.configs import bench_configs

        print(bench_configs(args.minutes, args.workers), flush=True)


if __name__ == "__main__":
    main()
