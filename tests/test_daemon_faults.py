"""Whatever ends the daemon, the actuators are driven safe and the record says why; an
unreadable record starts the cart held in safe_stop (issue 8, defects 2 and 8). The simulator
and broker are real processes, Modbus over TCP."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from procs import Proc, Subscriber, read_signal, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.core.cart import CartCore, TickResult
from ilup_controller.record.chain import verify_record
from ilup_controller.record.recorder import Recorder
from ilup_controller.record.store import open_record
from ilup_controller.runtime.daemon import Daemon

pytestmark = pytest.mark.integration


class InjectedBug(Exception):
    pass


def _crash_once_pumping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the control task while the pump runs (the issue's was a CodecError from a pump
    command scale that check-config now refuses): the tick raises once the pump is commanded."""
    step = CartCore.step

    def buggy(self: CartCore, *args: Any, **kwargs: Any) -> TickResult:
        result = step(self, *args, **kwargs)
        if result.loop.pump_speed_rpm > 5.0:
            raise InjectedBug(f"bug at {result.loop.pump_speed_rpm:.1f} rpm")
        return result

    monkeypatch.setattr(CartCore, "step", buggy)


async def test_a_crash_in_the_control_task_still_drives_safe_and_is_recorded(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    wd = cfg.devices["pump"].watchdog
    assert wd is not None
    _crash_once_pumping(monkeypatch)
    daemon = Daemon(cfg)
    caplog.set_level(logging.INFO, logger="ilup")
    loop = asyncio.get_running_loop()
    sub = Subscriber(mosquitto.port, f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/events")
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        run = asyncio.create_task(daemon.run(asyncio.Event()))
        with pytest.raises(InjectedBug):
            await asyncio.wait_for(run, 30)
        ended = loop.time()
        # The safe state was written and acknowledged, not left to the device watchdog.
        assert "safe state written device=pump" in caplog.text
        assert "safe state written device=heater" in caplog.text
        assert await read_signal(cfg, ports, cfg.control.flow.command) == 0.0
        assert await read_signal(cfg, ports, cfg.control.temperature.command) == 0.0

        async def stopped() -> bool:
            return await read_signal(cfg, ports, "pump_speed") < 0.1

        await wait_until(stopped, 5, interval_s=0.05, what="pump stopped")
        # Sooner than the watchdog could have done it (the pump coasts down in ~0.1 s).
        assert loop.time() - ended < wd.timeout_s
        await wait_until(
            lambda: any(m.payload.get("kind") == "record" for m in sub.messages),
            5,
            what="the record's seal published",
        )
    assert daemon.recorder is not None
    events = open_record(daemon.recorder.path).events
    crashed = [e for e in events if e["kind"] == "daemon" and "crashed" in e["message"]]
    assert len(crashed) == 1, [e["message"] for e in events if e["kind"] == "daemon"]
    assert "InjectedBug" in crashed[0]["message"]
    # The crash was handled: the record was closed, so its hash chain is sealed, and the seal's
    # head went out on the events topic too (a copy outside the record).
    chain = verify_record(daemon.recorder.path)
    assert chain.status == "intact", chain.summary()
    sealed = [m.payload for m in sub.messages if m.payload.get("kind") == "record"]
    assert len(sealed) == 1, [m.payload for m in sub.messages][-5:]
    assert f"{chain.head_rows} rows, chain head {chain.head_hash}" in sealed[0]["message"]


async def test_an_unreadable_record_starts_held_in_safe_stop(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    # A record of an earlier procedure whose first 100 bytes were overwritten.
    old = Recorder.from_config(cfg)
    old.start()
    old.close()
    with old.path.open("r+b") as f:
        f.write(b"\xff" * 100)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    loop = asyncio.get_running_loop()
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))

        def held() -> bool:
            alarms = sub.of("/alarms")
            return bool(alarms) and any(
                a["id"] == "record_unreadable"
                and a["priority"] == "high"
                and old.path.name in a["message"]
                for a in alarms[-1].payload["alarms"]
            )

        await wait_until(held, 30, what="record_unreadable naming the file")
        t0 = loop.time()
        # The simulator config autostarts from idle: held in safe_stop it must not.
        speeds = []
        while loop.time() - t0 < 3.0:
            speeds.append(await read_signal(cfg, ports, "pump_speed"))
            await asyncio.sleep(0.2)
        assert max(speeds) < 0.5, speeds  # tacho noise around 0
        states = sub.of("/state")
        assert states
        assert {m.payload["phase"] for m in states} == {"safe_stop"}
        assert max(m.payload["outputs"]["pump_speed_rpm"] for m in states) == 0.0
