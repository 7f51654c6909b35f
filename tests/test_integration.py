"""Acceptance with real processes: `ilup sim` and `ilup run` as subprocesses, Modbus over TCP
loopback, and a Mosquitto started by the test on a free port. Runs in real time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from pathlib import Path

import pytest
from helpers import wait_until
from procs import Proc, Subscriber, processes, read_signal, write_cart_config

from ilup_controller.broker import MosquittoProcess

pytestmark = pytest.mark.integration

TARGET = 500.0
BAND = 0.05 * TARGET


async def test_daemon_perfuses_the_simulator_and_survives_the_broker(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=4.0, target_ml_min=TARGET)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    sub_task = asyncio.create_task(sub.run())
    loop = asyncio.get_running_loop()
    with processes() as procs:
        try:
            await asyncio.wait_for(sub.connected.wait(), 5)
            procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
            procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))

            def flow_in_band() -> bool:
                states = sub.of("/state")
                return bool(states) and _in_band(states[-1].payload["measured"]["flow_ml_min"])

            await wait_until(flow_in_band, 30, what="published flow within 5 % of 500 mL/min")
            status = sub.of("/status")[-1].payload
            assert status["online"] is True
            assert status["simulated"] is True

            # State at >= 1 Hz over a 3 s window, every one with the required fields.
            t0 = loop.time()
            await asyncio.sleep(3.0)
            window = sub.of("/state", since_s=t0)
            assert len(window) >= 3, len(window)
            gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(window)]
            assert max(gaps) <= 1.0, gaps
            last = window[-1].payload
            assert last["simulated"] is True
            assert last["phase"] == "perfusion"
            assert last["targets"]["flow_ml_min"] == TARGET
            assert {"flow_ml_min", "pressure_mmhg", "temperature_c"} <= last["measured"].keys()
            assert {"pump_speed_rpm", "heater_pct"} <= last["outputs"].keys()
            seqs = [m.payload["seq"] for m in window]
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)

            # Broker down for 3 s: control goes on (flow read straight from the simulator).
            mosquitto.stop()
            outage: list[float] = []
            for _ in range(15):
                outage.append(await read_signal(cfg, ports, "flow"))
                await asyncio.sleep(0.2)
            assert all(_in_band(f) for f in outage), outage
            mosquitto.start()
            t_back = loop.time()
            await wait_until(
                lambda: len(sub.of("/state", since_s=t_back)) >= 2,
                15,
                what="state resumes after the broker restarts",
            )
            resumed = sub.of("/state", since_s=t_back)
            assert resumed[-1].payload["seq"] > seqs[-1]
            assert _in_band(resumed[-1].payload["measured"]["flow_ml_min"])
            assert any(m.payload["online"] for m in sub.of("/status", since_s=t_back))

            # kill -9: the broker publishes the last will.
            t_kill = loop.time()
            daemon.signal(signal.SIGKILL)
            await wait_until(
                lambda: any(m.payload["online"] is False for m in sub.of("/status", t_kill)),
                1.5 * cfg.mqtt.keepalive_s + 2,
                what="last will {online: false}",
            )
        except BaseException:
            for p in procs:
                print(f"---- {p.args[0]} log ----\n{p.log()}")
            raise
        finally:
            sub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sub_task


async def test_sigterm_stops_the_pump_and_heater(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    sub = Subscriber(mosquitto.port, f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/status")
    sub_task = asyncio.create_task(sub.run())
    pump_cmd = cfg.control.flow.command
    heater_cmd = cfg.control.temperature.command
    with processes() as procs:
        try:
            await asyncio.wait_for(sub.connected.wait(), 5)
            procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
            procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))

            async def pumping() -> bool:
                try:
                    return await read_signal(cfg, ports, "pump_speed") > 10.0
                except ConnectionError:  # the simulator is still starting
                    return False

            await wait_until(pumping, 30, interval_s=0.2, what="pump running above 10 rpm")
            assert await read_signal(cfg, ports, pump_cmd) > 10.0
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 10) == 0
            # Read back from the simulator: commands are zero and the pump really stopped.
            assert await read_signal(cfg, ports, pump_cmd) == 0.0
            assert await read_signal(cfg, ports, heater_cmd) == 0.0

            async def stopped() -> bool:
                return await read_signal(cfg, ports, "pump_speed") < 0.1

            await wait_until(stopped, 5, interval_s=0.1, what="pump speed back to zero")
            await wait_until(
                lambda: any(m.payload["online"] is False for m in sub.of("/status")),
                5,
                what="offline status after SIGTERM",
            )
            assert "Traceback" not in daemon.log()
        except BaseException:
            for p in procs:
                print(f"---- {p.args[0]} log ----\n{p.log()}")
            raise
        finally:
            sub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sub_task


def _in_band(flow_ml_min: float | None) -> bool:
    return flow_ml_min is not None and abs(flow_ml_min - TARGET) <= BAND
