"""Modbus RTU over RS-485, end to end over a pseudo-terminal pair (issue 10, deliverable 3).

socat makes the serial pair; a real ``ilup sim`` process serves one end as an RTU line with
io, pump and heater as unit ids 1, 2 and 3; the daemon's links (``build_links``, as the daemon
builds them: one shared bus for the line) open the other end. A pty ignores the baud rate, so
these runs test framing, the shared bus and its schedule, not line timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from helpers import wait_until
from procs import Proc, processes
from ruamel.yaml import YAML

from ilup_controller.broker import MosquittoProcess
from ilup_controller.config import ConfigError, load_config
from ilup_controller.config.models import CartConfig
from ilup_controller.core.monitor import silent_devices
from ilup_controller.core.types import Reading
from ilup_controller.modbus.link import DeviceLink, build_links

SIM = Path("config/sim.yaml")
UNITS = {"io": 1, "pump": 2, "heater": 3}
PLANT_SIGNALS = ("perfusate_temp", "heater_water_temp", "reservoir_volume")  # io, heater


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked serial device paths (controller end, simulator end), made by socat."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed: apt-get install socat", pytrace=False)
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):  # up to 5 s
            if a.exists() and b.exists():
                break
            if proc.poll() is not None:
                pytest.fail(f"socat exited with {proc.returncode}", pytrace=False)
            subprocess.run(["sleep", "0.01"], check=True)
        else:
            pytest.fail("socat made no pty pair within 5 s", pytrace=False)
        yield str(a), str(b)
    finally:
        proc.terminate()
        proc.wait(5)


def rtu_data(ctrl_end: str, sim_end: str, **line: Any) -> dict[str, Any]:
    """config/sim.yaml with its three devices as unit ids 1-3 on one RTU line.

    8N2, not the usual 8E1: the Linux pty driver refuses parity (tcsetattr: EINVAL). 115200
    baud: at 19200 this register map at 10 Hz does not fit on one line (test below).
    """
    data: dict[str, Any] = YAML(typ="safe", pure=True).load(SIM.read_text(encoding="utf-8"))
    for name, dev in data["devices"].items():
        del dev["host"], dev["port"]
        dev.update(
            transport="rtu",
            unit_id=UNITS[name],
            serial={"port": ctrl_end, "baudrate": 115200, "parity": "N", "stopbits": 2, **line},
        )
    data["simulator"]["serial_ports"] = {ctrl_end: sim_end}
    return data


def write_config(tmp_path: Path, data: dict[str, Any]) -> tuple[Path, CartConfig]:
    path = tmp_path / "rtu.yaml"
    with path.open("w", encoding="utf-8") as f:
        YAML(typ="safe", pure=True).dump(data, f)
    return path, load_config(path)


class Links:
    """The daemon's links on the controller end of the line, all running."""

    def __init__(self, cfg: CartConfig) -> None:
        self.store: dict[str, Reading] = {}
        self.cfg = cfg
        self.links: dict[str, DeviceLink] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.links = build_links(self.cfg, self.store, asyncio.get_running_loop().time)
        self.tasks = [asyncio.create_task(link.run()) for link in self.links.values()]

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results

    def signals_of(self, device: str) -> list[str]:
        return [n for n, s in self.cfg.signals.items() if s.device == device]


@contextlib.asynccontextmanager
async def rtu_cart(tmp_path: Path, data: dict[str, Any]) -> AsyncIterator[tuple[Proc, Links]]:
    path, cfg = write_config(tmp_path, data)
    with processes() as procs:
        sim = Proc(["sim", "-c", str(path)], tmp_path / "sim.log")
        procs.append(sim)
        links = Links(cfg)
        try:
            await wait_until(lambda: "sim RTU line" in sim.log(), 20.0, 0.05, "sim serving RTU")
            links.start()
            yield sim, links
        except BaseException:
            print(f"---- sim.log ----\n{sim.log()[-4000:]}")
            raise
        finally:
            await links.close()


# --------------------------------------------------------------------------- (a) reads, writes


async def test_three_devices_on_one_line_read_and_write(
    tmp_path: Path, pty_pair: tuple[str, str]
) -> None:
    async with rtu_cart(tmp_path, rtu_data(*pty_pair)) as (_, rig):
        loop = asyncio.get_running_loop()
        took_s = await wait_until(lambda: set(rig.store) >= set(rig.cfg.signals), 10.0)
        print(f"all {len(rig.cfg.signals)} signals of 3 unit ids read after {took_s:.2f} s")
        # The simulator's first plant values land 20 ms after it starts serving.
        await wait_until(lambda: min(float(rig.store[s].value) for s in PLANT_SIGNALS) > 30.0, 3.0)
        # Plausible plant values from the simulator process (sim.yaml: 34 degC at the start).
        assert rig.store["perfusate_temp"].value == pytest.approx(34.0, abs=1.0)
        assert rig.store["heater_water_temp"].value == pytest.approx(34.0, abs=1.0)
        assert rig.store["reservoir_volume"].value == pytest.approx(800.0, abs=20.0)
        assert rig.store["air_detected"].value is False
        # One client for the line: the three links share one bus object.
        buses = {id(link._bus) for link in rig.links.values()}
        assert len(buses) == 1

        # Writes land on the right unit id: read back from the holding registers.
        rig.links["pump"].set_output("pump_speed_setpoint", 12.5)
        rig.links["heater"].set_output("heater_power_setpoint", 20.0)
        t_write = loop.time()
        await wait_until(
            lambda: (
                rig.store["pump_speed_setpoint"].value == pytest.approx(12.5)
                and rig.store["heater_power_setpoint"].value == pytest.approx(20.0)
            ),
            5.0,
            what="written setpoints read back",
        )
        # ... and reached the plant: the simulated pump's tacho follows the command.
        follow_s = await wait_until(
            lambda: float(rig.store["pump_speed"].value) > 12.0, 10.0, what="pump tacho"
        )
        print(f"pump tacho at 12 rpm {follow_s:.2f} s after the write")
        assert await rig.links["pump"].read_now("pump_speed_setpoint", 2.0) == pytest.approx(12.5)
        assert await rig.links["heater"].write_now({"heater_power_setpoint": 0.0}, 2.0)
        assert await rig.links["heater"].read_now("heater_power_setpoint", 2.0) == 0.0
        for name, link in rig.links.items():
            h = link.health
            print(
                f"{name}: {h.reads_ok} reads, {h.writes_ok} writes ok, max cycle "
                f"{h.max_cycle_s * 1000:.1f} ms"
            )
            assert h.reads_failed == 0, (name, h)
            assert h.writes_failed == 0, (name, h)
            assert h.bad_replies == 0, (name, h)
        assert loop.time() - t_write < 20.0


# --------------------------------------------------------------------------- (b) a dead device


async def test_dead_device_does_not_starve_the_others(
    tmp_path: Path, pty_pair: tuple[str, str], mosquitto: MosquittoProcess
) -> None:
    data = rtu_data(*pty_pair)
    data["mqtt"].update({"host": "127.0.0.1", "port": mosquitto.port})
    fault_s = 5.0
    async with rtu_cart(tmp_path, data) as (sim, rig):
        cfg = rig.cfg
        loop = asyncio.get_running_loop()
        stale_s = cfg.control.stale_after_s  # 1.0 s
        poll_s = cfg.control.tick_period_s  # links poll at the tick period: 0.1 s
        timeout_s = cfg.devices["pump"].timeout_s  # 0.25 s, 0 retries
        await wait_until(lambda: set(rig.store) >= set(cfg.signals), 10.0)
        await wait_until(lambda: "listening for faults" in sim.log(), 10.0, 0.05)

        def down() -> tuple[str, ...]:
            health = {n: link.health for n, link in rig.links.items()}
            last_ok = {n: (h.last_ok_t, h.last_error) for n, h in health.items()}
            return silent_devices(loop.time(), last_ok, stale_s)

        assert down() == ()
        healthy = ("io", "heater")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(
                f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/sim/fault",
                json.dumps(
                    {"kind": "device_unresponsive", "device": "pump", "duration_s": fault_s}
                ),
                qos=1,
            )
        t_fault = loop.time()
        detect_s: float | None = None
        max_age_s = dict.fromkeys(healthy, 0.0)
        max_gap_s = dict.fromkeys(healthy, 0.0)
        last_ok = {n: rig.links[n].health.last_ok_t or 0.0 for n in healthy}
        while loop.time() - t_fault < fault_s - 0.2:
            now = loop.time()
            if detect_s is None and any(d.startswith("pump:") for d in down()):
                detect_s = now - t_fault
            for n in healthy:
                age = max(now - rig.store[s].t for s in rig.signals_of(n))
                max_age_s[n] = max(max_age_s[n], age)
                ok_t = rig.links[n].health.last_ok_t or 0.0
                if ok_t != last_ok[n]:
                    max_gap_s[n] = max(max_gap_s[n], ok_t - last_ok[n])
                    last_ok[n] = ok_t
                max_gap_s[n] = max(max_gap_s[n], now - last_ok[n])
            assert not [d for d in down() if not d.startswith("pump:")], down()
            await asyncio.sleep(0.01)
        print(
            f"pump down after {detect_s} s; healthy devices over {fault_s - 0.2:.1f} s: "
            f"max reading age {max_age_s}, max interval between good replies {max_gap_s}"
        )
        assert detect_s is not None
        # Down within stale_after_s + one cycle (+ 0.3 s for a loaded 2-core machine).
        assert detect_s <= stale_s + poll_s + 0.3
        # The others: never stale, and a good reply at least every poll + one dead turn
        # (its timeout) + turns of the others; 0.25 s margin for the load.
        bound_s = poll_s + timeout_s + 0.25
        for n in healthy:
            assert max_age_s[n] < stale_s, (n, max_age_s)
            assert max_gap_s[n] < bound_s, (n, max_gap_s, bound_s)
        h = rig.links["pump"].health
        assert h.last_error is not None
        assert "no reply within 0.25 s" in h.last_error

        # The fault ends: the pump answers again after its back-off (reconnect_max_s 5 s).
        back_s = await wait_until(lambda: down() == (), 10.0, 0.02, "pump back")
        print(f"pump back {loop.time() - t_fault:.2f} s after the fault began ({back_s:.2f})")
        for n in healthy:
            assert rig.links[n].health.reads_failed == 0, n


# --------------------------------------------------------------------------- (c) configuration


def _problems(data: dict[str, Any]) -> list[str]:
    from ilup_controller.config.loader import config_from_data

    with pytest.raises(ConfigError) as exc:
        config_from_data(data)
    return exc.value.problems


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda d: d["devices"]["pump"].pop("serial"),
            "devices.pump.serial: required when transport is rtu",
        ),
        (
            lambda d: d["devices"]["pump"].update(host="10.0.0.5"),
            "devices.pump.host: a TCP setting; an rtu device is reached through serial.port",
        ),
        (
            lambda d: d["devices"]["pump"].update(transport="tcp"),
            "devices.pump.serial: only for transport: rtu",
        ),
        (
            lambda d: d["devices"]["pump"]["serial"].update(parity="X"),
            "devices.pump.serial.parity: Input should be 'N', 'E' or 'O'",
        ),
        (
            lambda d: d["devices"]["pump"]["serial"].update(stopbits=3),
            "devices.pump.serial.stopbits: Input should be 1 or 2",
        ),
        (
            lambda d: d["devices"]["pump"]["serial"].update(bytesize=7),
            "devices.pump.serial.bytesize: Input should be 8",
        ),
        (
            lambda d: d["devices"]["pump"].update(unit_id=0),
            "devices.pump: unit_id 0 is the RTU broadcast address",
        ),
        (
            lambda d: d["devices"]["heater"]["serial"].update(baudrate=57600),
            "devices.heater.serial: differs from devices.io.serial on the same port /dev/A "
            "(baudrate 57600 vs 115200)",
        ),
        (
            lambda d: d["devices"]["heater"].update(unit_id=2),
            "devices.heater.unit_id: 2 is also used by devices.pump on serial port /dev/A",
        ),
        (
            lambda d: d["simulator"].update(serial_ports={}),
            "simulator.serial_ports: no entry for '/dev/A' (devices.io.serial.port)",
        ),
        (
            lambda d: d["devices"]["io"].update(transport="udp"),
            "devices.io.transport: Input should be 'tcp' or 'rtu'",
        ),
        (
            # 3 devices, 12 requests a cycle, 191 bytes: 109 ms of characters + 24 silences
            # of 2.0 ms = 158 ms of line time per 100 ms tick.
            lambda d: [dev["serial"].update(baudrate=19200) for dev in d["devices"].values()],
            "devices.io.serial.baudrate: line /dev/A at 19200 baud would be busy 158% of the "
            "time (io 29.2 ms every 100 ms, pump 64.2 ms every 100 ms, heater 64.2 ms every "
            "100 ms)",
        ),
    ],
)
def test_rtu_config_errors_name_the_key_path(edit: Any, expected: str) -> None:
    data = rtu_data("/dev/A", "/dev/B")
    edit(data)
    problems = _problems(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_rtu_config_loads_and_tcp_stays_the_default() -> None:
    from ilup_controller.config.loader import config_from_data

    cfg = config_from_data(rtu_data("/dev/A", "/dev/B"))
    line = cfg.devices["pump"].serial
    assert line is not None
    assert cfg.devices["pump"].transport == "rtu"
    # 8N2: 11 bits a character; above 19200 baud the silence is a fixed 1.75 ms.
    assert line.char_s == pytest.approx(11 / 115200)
    assert line.frame_gap_s == 0.00175
    slow = line.model_copy(update={"baudrate": 19200})
    assert slow.frame_gap_s == pytest.approx(3.5 * 11 / 19200)  # 2.005 ms
    assert line.model_copy(update={"inter_frame_delay_s": 0.01}).frame_gap_s == 0.01
    # Slower polling makes 19200 baud fit: 158% of 100 ms is 79% of 200 ms.
    data = rtu_data("/dev/A", "/dev/B", baudrate=19200)
    for dev in data["devices"].values():
        dev["poll_period_s"] = 0.2
    assert config_from_data(data).devices["io"].serial is not None
    # The shipped TCP configuration is unchanged: host/port, transport tcp by default.
    tcp = load_config(SIM)
    assert {d.transport for d in tcp.devices.values()} == {"tcp"}
    assert all(d.serial is None for d in tcp.devices.values())
