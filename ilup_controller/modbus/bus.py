"""Who owns a Modbus client: each TCP device its own; all RTU devices of one RS-485 line one.

A :class:`Bus` is a pymodbus client plus the right to use it. A device link takes a *turn* on
its bus for each cycle (its writes and reads) and for each direct write or read. Turns are
granted in FIFO order (``asyncio.Lock`` hands over to the longest waiter), so on a shared line
the devices go round-robin: a waiting device waits for at most one turn of each other device.
A turn ends at the device's first failed request (the link skips the rest of the cycle), so a
dead device holds the line for at most ``(retries + 1) * timeout_s`` of its *own* settings per
turn, and its link backs off after that. On the line one request is physical, not a library
limit (shared/libraries.md 7.6): this keeps it to one owner per serial port.

Between two frames the line stays silent for the inter-frame delay (3.5 characters by default);
a pty ignores it, a real RS-485 line needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.framer import FramerType

from ilup_controller.config.models import Device, SerialLine, Signal

__all__ = ["Bus", "line_time_per_cycle_s", "serial_buses"]

log = logging.getLogger("ilup.modbus")


class Bus:
    """A Modbus client for one TCP device or one RS-485 line (see module docstring)."""

    def __init__(self, device: Device, label: str) -> None:
        # For a shared line, ``device`` supplies the line settings and default timing only;
        # each turn uses the timing of the device that takes it.
        self.label = label
        self.line: SerialLine | None = device.serial
        self.shared = device.serial is not None
        self._device = device
        self._client: ModbusBaseClient | None = None
        self._users = 0
        self._lock = asyncio.Lock()
        self._gap_s = device.serial.frame_gap_s if device.serial is not None else 0.0
        self._quiet_until_s = 0.0
        self.turns = 0  # granted turns (for tests and diagnostics)

    def __repr__(self) -> str:
        return f"Bus({self.label!r}, users={self._users})"

    # ----------------------------------------------------------------------- the client

    def make_client(self, device: Device, name: str, *, direct: bool) -> ModbusBaseClient:
        """A new client for this bus with ``device``'s timing. A ``direct`` client is
        one-shot: no background reconnect."""
        reconnect_min_s = 0.0 if direct else device.reconnect_min_s
        line = self.line
        if line is None:
            return AsyncModbusTcpClient(
                device.host,
                port=device.port,
                name=name,
                timeout=device.timeout_s,
                retries=device.retries,
                reconnect_delay=reconnect_min_s,
                reconnect_delay_max=device.reconnect_max_s,
            )
        return AsyncModbusSerialClient(
            line.port,
            framer=FramerType.RTU,
            baudrate=line.baudrate,
            bytesize=line.bytesize,
            parity=line.parity,
            stopbits=line.stopbits,
            name=name,
            timeout=device.timeout_s,
            retries=device.retries,
            reconnect_delay=reconnect_min_s,
            reconnect_delay_max=device.reconnect_max_s,
        )

    @property
    def client(self) -> ModbusBaseClient | None:
        """The long-lived client while at least one link runs on this bus."""
        return self._client

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def attach(self, device: Device, name: str) -> ModbusBaseClient:
        """A running link starts using the bus; the first one creates the client."""
        self._users += 1
        if self._client is None:
            label = f"ilup-{self.label}" if self.shared else f"ilup-{name}"
            self._client = self.make_client(device, label, direct=False)
        return self._client

    def detach(self) -> None:
        """A running link stops; the last one closes the client (and the serial port)."""
        self._users -= 1
        if self._users <= 0 and self._client is not None:
            self._users = 0
            self._client.close()
            self._client = None

    # ----------------------------------------------------------------------- turns

    @contextlib.asynccontextmanager
    async def turn(self, device: Device) -> AsyncIterator[None]:
        """Exclusive use of the bus, granted in FIFO order; ``device``'s timing applies."""
        async with self._lock:
            self.turns += 1
            client = self._client
            if self.shared and client is not None:
                # One client for the line, but each device answers within its *own* timeout:
                # pymodbus 3.16.1 reads both per request from these two attributes.
                client.ctx.comm_params.timeout_connect = device.timeout_s
                client.ctx.retries = device.retries
            yield

    async def pace(self) -> None:
        """Before a request: keep the line silent for the inter-frame delay."""
        if self._gap_s <= 0.0:
            return
        delay_s = self._quiet_until_s - asyncio.get_running_loop().time()
        if delay_s > 0.0:
            await asyncio.sleep(delay_s)

    def frame_done(self) -> None:
        """After a request (answered or not): the silence starts now."""
        if self._gap_s > 0.0:
            self._quiet_until_s = asyncio.get_running_loop().time() + self._gap_s

    def drop(self, client: ModbusBaseClient, *, line_broken: bool) -> None:
        """After a failed request. TCP: a fresh connection, so a late reply cannot be taken
        for the next answer. A shared line stays open for the other devices unless the line
        itself failed: a silent device is one unit id not answering, and RTU replies carry
        the unit id (pymodbus refuses another device's reply) while the pymodbus receive
        buffer is emptied before every request."""
        if not self.shared or line_broken:
            client.close()


def serial_buses(devices: Mapping[str, Device]) -> dict[str, Bus]:
    """One shared bus per serial port; returns device name -> its bus (RTU devices only)."""
    by_port: dict[str, Bus] = {}
    of_device: dict[str, Bus] = {}
    for name, dev in devices.items():
        if dev.serial is None:
            continue
        bus = by_port.get(dev.serial.port)
        if bus is None:
            bus = by_port[dev.serial.port] = Bus(dev, dev.serial.port)
        of_device[name] = bus
    for port, bus in by_port.items():
        users = sorted(n for n, b in of_device.items() if b is bus)
        log.info("RTU line %s shared by %s", port, ", ".join(users))
    return of_device


def line_time_per_cycle_s(line: SerialLine, signals: Mapping[str, Signal]) -> float:
    """Lower bound of the line time one device's cycle takes: every writable signal written
    and every read block read, with the frames' bytes at the baud rate and the inter-frame
    silence before the request and before the reply (device processing time not counted)."""
    from ilup_controller.modbus.plan import plan_reads  # plan imports the config models

    frame_bytes = 0
    transactions = 0
    for sig in signals.values():
        if sig.writable:
            n = sig.register_count
            # FC5/6 echo 8 bytes each way; FC16: 9 + 2n out, 8 back.
            frame_bytes += 16 if n == 1 or sig.table == "coil" else 9 + 2 * n + 8
            transactions += 1
    for block in plan_reads(dict(signals)):
        data = (block.count + 7) // 8 if block.is_bits else 2 * block.count
        frame_bytes += 8 + 5 + data  # request; reply: id, fc, byte count, data, CRC
        transactions += 1
    return frame_bytes * line.char_s + 2 * transactions * line.frame_gap_s
