"""Simulator Modbus servers against a real pymodbus client over loopback TCP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import wait_until
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from ilup_controller.config import load_config
from ilup_controller.config.models import CartConfig
from ilup_controller.modbus.codec import encode
from sim.server import SimModbusServers

HOST = "127.0.0.1"


def sim_config() -> CartConfig:
    return load_config("config/sim.yaml")


def extended_config() -> CartConfig:
    """sim.yaml plus a read-only holding register, a float32 setpoint and a coil on the pump."""
    data: dict[str, Any] = sim_config().model_dump(mode="json")
    data["signals"]["pump_status"] = {
        "device": "pump",
        "table": "holding",
        "address": 1,
        "data_type": "uint16",
    }
    data["signals"]["pump_trim"] = {
        "device": "pump",
        "table": "holding",
        "address": 2,
        "data_type": "float32",
        "word_order": "little",
        "writable": True,
    }
    data["signals"]["pump_enable"] = {
        "device": "pump",
        "table": "coil",
        "address": 3,
        "data_type": "bool",
        "writable": True,
    }
    return CartConfig.model_validate(data)


class Rig:
    def __init__(self, config: CartConfig) -> None:
        self.config = config
        self.writes: list[tuple[str, float | bool]] = []
        self.sim = SimModbusServers(
            config,
            lambda name, value: self.writes.append((name, value)),
            host_override=HOST,
            port_override=dict.fromkeys(config.devices, 0),
        )
        self.clients: list[AsyncModbusTcpClient] = []

    async def client(self, device: str) -> AsyncModbusTcpClient:
        c = AsyncModbusTcpClient(HOST, port=self.sim.ports()[device], timeout=0.3, retries=0)
        self.clients.append(c)
        assert await c.connect()
        return c


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig(sim_config())
    await r.sim.start()
    try:
        yield r
    finally:
        for c in r.clients:
            c.close()
        await r.sim.stop()


@pytest.fixture
async def xrig() -> AsyncIterator[Rig]:
    r = Rig(extended_config())
    await r.sim.start()
    try:
        yield r
    finally:
        for c in r.clients:
            c.close()
        await r.sim.stop()


async def test_every_device_listens_on_its_own_ephemeral_port(rig: Rig) -> None:
    ports = rig.sim.ports()
    assert set(ports) == {"io", "pump", "heater"}
    assert len(set(ports.values())) == 3
    assert all(p > 0 for p in ports.values())


async def test_client_write_of_pump_speed_reaches_on_write(rig: Rig) -> None:
    pump = await rig.client("pump")
    rsp = await pump.write_register(0, 1234, device_id=1)  # 12.34 rpm at scale 0.01
    assert not rsp.isError()
    assert len(rig.writes) == 1
    assert rig.writes[0][0] == "pump_speed_setpoint"
    assert rig.writes[0][1] == pytest.approx(12.34)
    back = await pump.read_holding_registers(0, count=1, device_id=1)
    assert back.registers == [1234]


async def test_set_inputs_are_read_back_encoded(rig: Rig) -> None:
    await rig.sim.set_inputs(
        {
            "flow": 512.5,
            "pa_pressure": -5.0,
            "perfusate_temp": 36.5,
            "reservoir_volume": 800,
            "pump_speed": 15.5,
            "heater_water_temp": 38.0,
        }
    )
    io = await rig.client("io")
    rsp = await io.read_input_registers(0, count=5, device_id=1)
    assert rsp.registers == [17408, 8192, 65036, 3650, 800]
    pump = await rig.client("pump")
    assert (await pump.read_input_registers(0, count=1, device_id=1)).registers == [1550]
    heater = await rig.client("heater")
    assert (await heater.read_input_registers(0, count=1, device_id=1)).registers == [3800]
    # Inputs set by the plant are not client writes.
    assert rig.writes == []


async def test_set_inputs_is_all_or_nothing(rig: Rig) -> None:
    with pytest.raises(KeyError, match="nope"):
        await rig.sim.set_inputs({"flow": 1.0, "nope": 2.0})
    with pytest.raises(ValueError, match="uint16"):
        await rig.sim.set_inputs({"flow": 1.0, "reservoir_volume": -1.0})
    io = await rig.client("io")
    rsp = await io.read_input_registers(0, count=2, device_id=1)
    assert rsp.registers == [0, 0]  # flow was not applied by either call


async def test_writes_outside_writable_signals_are_refused(xrig: Rig) -> None:
    pump = await xrig.client("pump")
    io = await xrig.client("io")
    cases = [
        ("read-only holding register", pump.write_register(1, 7, device_id=1)),
        ("undefined holding register", pump.write_register(9, 7, device_id=1)),
        ("device without holding registers", io.write_register(0, 7, device_id=1)),
        ("span past a writable signal", pump.write_registers(0, [1, 2], device_id=1)),
        ("undefined coil", pump.write_coil(0, True, device_id=1)),
    ]
    for label, request in cases:
        rsp = await request
        assert rsp.isError(), label
        assert rsp.exception_code == 2, label  # ILLEGAL_ADDRESS
    assert xrig.writes == []
    # Nothing changed in the table either.
    assert (await pump.read_holding_registers(0, count=2, device_id=1)).registers == [0, 0]


async def test_write_that_does_not_decode_is_illegal_value(xrig: Rig) -> None:
    pump = await xrig.client("pump")
    nan_little = [0, 0x7FC0]
    rsp = await pump.write_registers(2, nan_little, device_id=1)
    assert rsp.isError()
    assert rsp.exception_code == 3  # ILLEGAL_VALUE
    assert xrig.writes == []


async def test_float32_and_coil_writes_are_decoded(xrig: Rig) -> None:
    pump = await xrig.client("pump")
    trim = xrig.config.signals["pump_trim"]
    assert not (await pump.write_registers(2, encode(trim, -2.25), device_id=1)).isError()
    assert not (await pump.write_coil(3, True, device_id=1)).isError()
    assert xrig.writes == [("pump_trim", -2.25), ("pump_enable", True)]
    assert (await pump.read_coils(3, count=1, device_id=1)).bits[0] is True


async def test_exception_hook(rig: Rig) -> None:
    io = await rig.client("io")
    rig.sim.set_exception("io", 4)
    rsp = await io.read_input_registers(0, count=5, device_id=1)
    assert rsp.isError()
    assert rsp.exception_code == 4
    rig.sim.set_exception("io", None)
    assert not (await io.read_input_registers(0, count=5, device_id=1)).isError()
    with pytest.raises(ValueError, match="99"):
        rig.sim.set_exception("io", 99)
    with pytest.raises(KeyError, match="nope"):
        rig.sim.set_exception("nope", 4)


async def test_delay_hook(rig: Rig) -> None:
    pump = await rig.client("pump")
    loop = asyncio.get_running_loop()
    rig.sim.set_delay("pump", 0.15)
    t0 = loop.time()
    rsp = await pump.read_input_registers(0, count=1, device_id=1)
    assert not rsp.isError()
    assert loop.time() - t0 >= 0.14
    with pytest.raises(ValueError, match="delay_s"):
        rig.sim.set_delay("pump", -1.0)


async def test_unresponsive_hook_keeps_tcp_but_never_replies(rig: Rig) -> None:
    pump = await rig.client("pump")
    rig.sim.set_unresponsive("pump", True)
    with pytest.raises(ModbusIOException):
        await pump.write_register(0, 500, device_id=1)
    assert rig.writes == []  # a frozen device does not apply writes either
    rig.sim.set_unresponsive("pump", False)
    rsp = await pump.read_holding_registers(0, count=1, device_id=1)
    assert rsp.registers == [0]


def port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((HOST, port)) == 0


async def test_stop_frees_the_ports_for_a_new_server() -> None:
    first = Rig(sim_config())
    await first.sim.start()
    ports = first.sim.ports()
    assert port_is_open(ports["io"])
    await first.sim.stop()
    assert first.sim.ports() == {}
    assert not any(port_is_open(p) for p in ports.values())

    second = SimModbusServers(sim_config(), lambda n, v: None, port_override=ports)
    await second.start()
    try:
        assert second.ports() == ports
        await second.set_inputs({"reservoir_volume": 42})
        c = AsyncModbusTcpClient(HOST, port=ports["io"], timeout=0.3, retries=0)
        assert await c.connect()
        assert (await c.read_input_registers(4, count=1, device_id=1)).registers == [42]
        c.close()
    finally:
        await second.stop()


async def test_stop_does_not_wait_for_a_request_parked_in_a_delay(rig: Rig) -> None:
    pump = await rig.client("pump")
    rig.sim.set_delay("pump", 60.0)
    pending = asyncio.ensure_future(pump.read_input_registers(0, count=1, device_id=1))
    parked = rig.sim._devices["pump"].parked  # white-box: the request is inside the delay
    await wait_until(lambda: len(parked) == 1)
    port = rig.sim.ports()["pump"]
    await asyncio.wait_for(rig.sim.stop(), 2.0)
    assert not port_is_open(port)
    assert len(parked) == 0
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
