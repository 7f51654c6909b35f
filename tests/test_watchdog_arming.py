"""Arming the devices' watchdogs at start-up against the simulator's real Modbus TCP servers.

Issue 8, defect 3: a watchdog that reads back 0 (or not what was written) is not armed.
Defect 7: a device that never answered is reported as such, with where to look, not as a
watchdog that needs enabling.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from procs import Proc, processes, write_cart_config

from ilup_controller.broker import free_port
from ilup_controller.config import load_config
from ilup_controller.config.models import CartConfig
from ilup_controller.core.types import Reading
from ilup_controller.modbus.link import DeviceLink
from ilup_controller.runtime.watchdog import ARM_DEADLINE_S, WatchdogError, arm_watchdogs
from sim.server import SimModbusServers

HOST = "127.0.0.1"
OnWrite = Callable[[str, float | bool], None]


def config_with(**pump_watchdog: Any) -> CartConfig:
    """sim.yaml on loopback, devices.pump.watchdog changed. Built with the model only: the
    loader's encodability check would refuse some of these, and the daemon must not rely on
    it alone (a device may hold a different value than the one written)."""
    data: dict[str, Any] = load_config("config/sim.yaml").model_dump(mode="json")
    data["devices"]["pump"]["watchdog"].update(pump_watchdog)
    return CartConfig.model_validate(data)


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Rig:
    def __init__(self, cfg: CartConfig, on_write: OnWrite | None = None) -> None:
        self.cfg = cfg
        self.writes: list[tuple[str, float | bool]] = []
        self._on_write = on_write
        self.sim = SimModbusServers(
            cfg, self._record, host_override=HOST, port_override=dict.fromkeys(cfg.devices, 0)
        )

    def _record(self, name: str, value: float | bool) -> None:
        self.writes.append((name, value))
        if self._on_write is not None:
            self._on_write(name, value)

    def links(self, port_of: dict[str, int] | None = None) -> dict[str, DeviceLink]:
        """One DeviceLink per device, pointed at the simulator (or at ``port_of``); ``cfg``
        is updated to the same endpoints, as the daemon builds its links from its config."""
        ports = {**self.sim.ports(), **(port_of or {})}
        data = self.cfg.model_dump(mode="json")
        for name, dev in data["devices"].items():
            dev.update(host=HOST, port=ports[name])
        self.cfg = CartConfig.model_validate(data)
        store: dict[str, Reading] = {}
        return {
            name: DeviceLink(
                name, dev, {n: s for n, s in self.cfg.signals.items() if s.device == name}, store
            )
            for name, dev in self.cfg.devices.items()
        }

    async def arm(self, deadline_s: float, port_of: dict[str, int] | None = None) -> None:
        links = self.links(port_of)
        await arm_watchdogs(self.cfg, links, deadline_s=deadline_s)


@pytest.fixture
async def started() -> AsyncIterator[list[Rig]]:
    rigs: list[Rig] = []
    try:
        yield rigs
    finally:
        for r in rigs:
            await r.sim.stop()


async def start(rigs: list[Rig], cfg: CartConfig, on_write: OnWrite | None = None) -> Rig:
    r = Rig(cfg, on_write)
    rigs.append(r)
    await r.sim.start()
    return r


async def test_sim_config_arms_both_watchdogs(started: list[Rig]) -> None:
    rig = await start(started, config_with())
    await rig.arm(deadline_s=5.0)
    assert ("pump_watchdog", pytest.approx(1.0)) in rig.writes
    assert ("heater_watchdog", pytest.approx(1.0)) in rig.writes


async def test_timeout_that_reads_back_0_is_refused(started: list[Rig]) -> None:
    """0.001 s at 0.01 s per count is written as raw 0: before the fix this counted as armed."""
    rig = await start(started, config_with(timeout_s=0.001))
    with pytest.raises(WatchdogError) as exc:
        await rig.arm(deadline_s=5.0)
    msg = str(exc.value)
    assert (
        "device 'pump' watchdog register 'pump_watchdog' (holding 10) reads back 0 s after "
        "writing 0.001 s: the watchdog is off"
    ) in msg, msg
    assert ("pump_watchdog", 0.0) in rig.writes  # what the drive really holds


async def test_read_back_more_than_one_step_off_is_refused(started: list[Rig]) -> None:
    """A drive that clamps its watchdog to 0.5 s answers the write, then reads 0.5 s."""
    rig: Rig | None = None

    def clamp(name: str, value: float | bool) -> None:
        if name == "pump_watchdog" and float(value) > 0.5:
            assert rig is not None
            asyncio.get_running_loop().create_task(rig.sim.set_inputs({name: 0.5}))

    rig = await start(started, config_with(timeout_s=1.0), clamp)
    # Slow replies: the read-back waits 0.1 s in the device, so the clamp has landed by then.
    rig.sim.set_delay("pump", 0.1)
    with pytest.raises(WatchdogError) as exc:
        await rig.arm(deadline_s=5.0)
    msg = str(exc.value)
    assert (
        "device 'pump' watchdog register 'pump_watchdog' (holding 10) reads back 0.5 s after "
        "writing 1 s, more than one register step (0.01 s) apart"
    ) in msg, msg


async def test_read_back_within_one_step_is_armed(started: list[Rig]) -> None:
    """0.006 s is held as raw 1 = 0.01 s: 0.004 s off, within the 0.01 s step, and not 0."""
    rig = await start(started, config_with(timeout_s=0.006))
    await rig.arm(deadline_s=5.0)
    assert ("pump_watchdog", pytest.approx(0.01)) in rig.writes


async def test_device_that_never_answers_is_named_with_where_to_look(
    started: list[Rig],
) -> None:
    rig = await start(started, config_with())
    port = closed_port()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(WatchdogError) as exc:
        await rig.arm(deadline_s=1.5, port_of={"pump": port})
    took_s = loop.time() - t0
    msg = str(exc.value)
    assert f"device 'pump' at {HOST}:{port} unit id 1 did not answer within 1.5 s" in msg, msg
    assert "ConnectionRefused" in msg or "connect to" in msg, msg
    assert "check the cabling, host, port and unit_id in devices.pump" in msg, msg
    assert "enable its communication watchdog" not in msg
    assert 1.5 <= took_s < 4.0, took_s


async def test_device_that_accepts_tcp_but_never_replies_did_not_answer(
    started: list[Rig],
) -> None:
    """A gateway with a wrong unit id behind it: TCP connects, Modbus requests time out."""
    rig = await start(started, config_with())
    rig.sim.set_unresponsive("pump", True)
    with pytest.raises(WatchdogError) as exc:
        await rig.arm(deadline_s=1.5)
    msg = str(exc.value)
    port = rig.sim.ports()["pump"]
    assert f"device 'pump' at {HOST}:{port} unit id 1 did not answer within 1.5 s" in msg, msg
    timeouts = ("no result within", "No response received", "no reply within")
    assert any(s in msg for s in timeouts), msg
    assert "enable its communication watchdog" not in msg


async def test_device_that_refuses_the_write_is_told_apart(started: list[Rig]) -> None:
    """The device answers with Modbus exception 2: it is there, the register map is wrong."""
    rig = await start(started, config_with())
    rig.sim.set_exception("pump", 2)
    with pytest.raises(WatchdogError) as exc:
        await rig.arm(deadline_s=1.5)
    msg = str(exc.value)
    assert "device 'pump' answered but its watchdog register 'pump_watchdog' (holding 10)" in msg
    assert "Modbus exception 2" in msg, msg
    assert "check signals.pump_watchdog against the device manual" in msg, msg
    assert "did not answer" not in msg


def test_run_without_devices_exits_3_saying_they_did_not_answer(tmp_path: Path) -> None:
    """`ilup run` with no simulator: exit 3 after the arming deadline, naming where to look.

    Before: "... no answer; ...: enable its communication watchdog" for one device only."""
    cfg_path, cfg = write_cart_config(tmp_path, free_port())  # nothing listens on any port
    with processes() as procs:
        procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        rc = daemon.wait(ARM_DEADLINE_S + 30.0)
        log = daemon.log()
    assert rc == 3, log
    for name in ("pump", "heater"):  # every device that failed, in one start attempt
        dev = cfg.devices[name]
        assert (
            f"device {name!r} at 127.0.0.1:{dev.port} unit id 1 did not answer within 15 s"
        ) in log, log
        assert f"check the cabling, host, port and unit_id in devices.{name}" in log
    assert "enable its communication watchdog" not in log
    assert "Traceback" not in log
