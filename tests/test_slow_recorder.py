"""The recorder never delays the tick: with the disk writer slowed artificially, the control
tick keeps its period and the recorder alarm is raised (daemon in-process, simulator and
broker as real processes, Modbus over TCP)."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import pytest
from helpers import wait_until
from procs import Proc, processes, write_cart_config
from ruamel.yaml import YAML

from ilup_controller.broker import MosquittoProcess
from ilup_controller.config import load_config
from ilup_controller.runtime.daemon import Daemon

pytestmark = pytest.mark.integration

WRITE_DELAY_S = 0.2  # 5 rows a second against 10 samples a second: the queue must overflow


async def test_slow_disk_raises_the_recorder_alarm_and_the_tick_keeps_time(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, _ = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(cfg_path.read_text())
    data["record"]["queue_size"] = 20
    with cfg_path.open("w") as f:
        yaml.dump(data, f)
    cfg = load_config(cfg_path)
    ticks: list[tuple[float, float, float]] = []
    daemon = Daemon(cfg, on_tick=lambda d, s, e: ticks.append((d, s, e)))
    stop = asyncio.Event()
    with processes() as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        run = asyncio.create_task(daemon.run(stop))
        try:
            await wait_until(lambda: len(ticks) > 10, 20, what="daemon ticking")
            assert daemon.recorder is not None
            daemon.recorder.write_delay_s = WRITE_DELAY_S
            slowed_from = len(ticks)

            def alarm() -> bool:
                assert daemon.core is not None
                return daemon.core.alarms.is_present("recorder")

            await wait_until(alarm, 15, what="recorder alarm")
            await asyncio.sleep(3.0)  # keep ticking with the writer slow and the queue full
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)
    slow = ticks[slowed_from:]
    assert len(slow) >= 30
    lateness_ms = sorted((s - d) * 1e3 for d, s, _ in slow)
    p99 = lateness_ms[round(0.99 * (len(lateness_ms) - 1))]
    assert p99 < 10.0, p99  # budget: a tenth of the 100 ms period
    assert daemon.ticker.stats.overruns == 0
    work_ms = [(e - s) * 1e3 for _, s, e in slow]
    assert statistics.median(work_ms) < 5.0
    assert daemon.recorder is not None
    assert daemon.recorder.dropped > 0
