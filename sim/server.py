"""Modbus face of the plant simulator: one TCP server per TCP device, one RTU server per
serial line (its devices as unit ids; the line is ``simulator.serial_ports[serial.port]``, the
other end of the controller's pty or null-modem pair).

The register maps come from the same CartConfig the controller reads, so the simulator can
never disagree with the controller about an address. A client write to a holding register or
coil is decoded to the signal(s) it touches and passed to ``on_write`` (a write to an address
that is not a writable signal, or of a value outside the signal's ``range``, is refused with
exception 2 or 3 and changes nothing, as a real drive's would); the plant pushes its
measurements back with ``set_inputs``. Fault hooks (unresponsive, delay, exception) let tests
reproduce the failures of real devices.

pymodbus 3.16 facts used here (see shared/libraries.md 1.4): the 4-tuple ``SimDevice`` keeps the
four tables apart; ``action`` runs before every access and can veto it; only
``server.shutdown()`` closes the listening port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusBaseServer, ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from ilup_controller.config.models import CartConfig, Device, Signal, Table
from ilup_controller.modbus.codec import CodecError, decode, decode_bit, encode, encode_bit

__all__ = ["OnWrite", "SimModbusServers"]

log = logging.getLogger(__name__)

OnWrite = Callable[[str, float | bool], None]

# True while set_inputs updates the tables: the plant's own updates bypass fault injection and
# the write allow-list. A ContextVar (not a flag) because request handlers run as other tasks.
_INTERNAL: ContextVar[bool] = ContextVar("sim_modbus_internal", default=False)

# Function code -> table, for every code the pymodbus simulator routes to the action hook.
_FC_TABLE: dict[int, Table] = {
    1: Table.coil,
    5: Table.coil,
    15: Table.coil,
    2: Table.discrete,
    3: Table.holding,
    6: Table.holding,
    16: Table.holding,
    22: Table.holding,
    23: Table.holding,
    4: Table.input,
}
_READ_FCS = frozenset({1, 2, 3, 4})
# Function code used by set_inputs to write each table.
_SET_FC: dict[Table, int] = {Table.coil: 15, Table.discrete: 2, Table.holding: 16, Table.input: 4}


@dataclass
class _Faults:
    unresponsive: bool = False
    delay_s: float = 0.0
    exception: ExcCodes | None = None


@dataclass
class _DeviceServer:
    """One simulated device: its register map, fault state and pymodbus server."""

    name: str
    device: Device
    signals: dict[str, Signal]
    on_write: OnWrite
    faults: _Faults = field(default_factory=_Faults)
    server: ModbusBaseServer | None = None  # an RTU line's server is shared by its devices
    port: int | None = None
    # Handler tasks parked in a delay; cancelled at stop so nothing outlives the server.
    parked: set[asyncio.Task[object]] = field(default_factory=set)
    # (table, address) -> signal name, for every register/bit a signal covers.
    owner: dict[tuple[Table, int], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, sig in self.signals.items():
            for a in range(sig.address, sig.address + sig.register_count):
                self.owner[(sig.table, a)] = name

    # ----------------------------------------------------------------------- tables

    def _addresses(self, table: Table) -> list[int]:
        return sorted(a for (t, a) in self.owner if t is table)

    def _register_table(self, table: Table) -> list[SimData]:
        addresses = self._addresses(table)
        if not addresses:
            return [SimData(0, datatype=DataType.INVALID)]  # every address refused
        runs: list[SimData] = []
        run_start = prev = addresses[0]
        for a in [*addresses[1:], None]:
            if a is not None and a == prev + 1:
                prev = a
                continue
            count = prev - run_start + 1
            runs.append(SimData(run_start, count=count, values=0, datatype=DataType.REGISTERS))
            if a is not None:
                run_start = prev = a
        return runs

    def _bit_table(self, table: Table) -> list[SimData]:
        # pymodbus validates bits per 16-bit word only; the action checks single bits.
        addresses = self._addresses(table) or [0]
        low, high = addresses[0], addresses[-1]
        return [SimData(low, values=[False] * (high - low + 1), datatype=DataType.BITS)]

    def sim_device(self) -> SimDevice:
        return SimDevice(
            id=self.device.unit_id,
            simdata=(
                self._bit_table(Table.coil),
                self._bit_table(Table.discrete),
                self._register_table(Table.holding),
                self._register_table(Table.input),
            ),
            action=self.action,
        )

    # ----------------------------------------------------------------------- hooks

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Drop every reply while unresponsive: the TCP link stays up, nothing comes back."""
        if sending and self.faults.unresponsive:
            return b""
        return data

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if _INTERNAL.get():
            return None
        # Single writes (fc 5/6) read back after writing; fault once per request, not twice.
        primary = set_values is not None or function_code in _READ_FCS
        if primary:
            if self.faults.unresponsive:
                return ExcCodes.DEVICE_FAILURE  # never sent (trace_packet), and no write lands
            if self.faults.delay_s > 0.0:
                await self._park(self.faults.delay_s)
            if self.faults.exception is not None:
                return self.faults.exception
        table = _FC_TABLE.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if set_values is None:
            return self._check_read(table, address, count)
        return self._apply_write(table, start_address, address, registers, set_values)

    async def _park(self, delay_s: float) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.parked.add(task)
        try:
            await asyncio.sleep(delay_s)
        finally:
            if task is not None:
                self.parked.discard(task)

    def _check_read(self, table: Table, address: int, count: int) -> ExcCodes | None:
        # For bit tables pymodbus passes a word count, not a bit count: check the first bit.
        span = 1 if table in (Table.coil, Table.discrete) else count
        for a in range(address, address + span):
            if (table, a) not in self.owner:
                return ExcCodes.ILLEGAL_ADDRESS
        return None

    def _apply_write(
        self,
        table: Table,
        start_address: int,
        address: int,
        registers: list[int],
        set_values: list[int] | list[bool],
    ) -> ExcCodes | None:
        touched: list[str] = []
        for a in range(address, address + len(set_values)):
            name = self.owner.get((table, a))
            if name is None or not self.signals[name].writable:
                log.info(
                    "sim device %s: write refused, %s %d is not a writable signal",
                    self.name,
                    table,
                    a,
                )
                return ExcCodes.ILLEGAL_ADDRESS
            if name not in touched:
                touched.append(name)
        decoded: list[tuple[str, float | bool]] = []
        for name in touched:
            sig = self.signals[name]
            try:
                if table is Table.coil:
                    value: float | bool = decode_bit(sig, set_values[sig.address - address])
                else:
                    # The image after the write: current registers overlaid with the new ones,
                    # so a partial write of a 32-bit value is decoded whole.
                    image = [
                        int(set_values[a - address])
                        if address <= a < address + len(set_values)
                        else registers[a - start_address]
                        for a in range(sig.address, sig.address + sig.register_count)
                    ]
                    value = decode(sig, image)
            except CodecError as e:
                log.info("sim device %s: write to %s refused: %s", self.name, name, e)
                return ExcCodes.ILLEGAL_VALUE
            # As a real drive or heater does, a setpoint outside the map's range is refused
            # (whatever master wrote it) rather than run: 650 rpm would have been.
            if sig.range is not None and not sig.range[0] <= float(value) <= sig.range[1]:
                log.info(
                    "sim device %s: write to %s refused: %g outside its range [%g, %g]",
                    self.name,
                    name,
                    float(value),
                    *sig.range,
                )
                return ExcCodes.ILLEGAL_VALUE
            decoded.append((name, value))
        for name, value in decoded:
            log.debug("sim device %s: %s <- %r", self.name, name, value)
            try:
                self.on_write(name, value)
            except Exception:
                log.exception("sim device %s: on_write(%s, %r) failed", self.name, name, value)
                return ExcCodes.DEVICE_FAILURE
        return None


def _bind_error(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound (pymodbus only says that it could not listen)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listener
            s.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return "the port was busy at that moment"


class _SerialLineFaults:
    """``trace_packet`` of one RTU line: drops the replies of its unresponsive devices (an RTU
    reply starts with the unit id of the device that sends it)."""

    def __init__(self, devices: list[_DeviceServer]) -> None:
        self._devices = devices

    def __call__(self, sending: bool, data: bytes) -> bytes:
        if sending and data:
            for ds in self._devices:
                if ds.device.unit_id == data[0] and ds.faults.unresponsive:
                    return b""
        return data


class SimModbusServers:
    """Modbus servers for every device of a cart configuration (TCP, and RTU per line)."""

    def __init__(
        self,
        config: CartConfig,
        on_write: OnWrite,
        host_override: str | None = None,
        port_override: Mapping[str, int] | None = None,
    ) -> None:
        port_override = dict(port_override or {})
        unknown = sorted(set(port_override) - set(config.devices))
        if unknown:
            raise KeyError(f"port_override names unknown device(s): {unknown}")
        self._config = config
        self._host_override = host_override
        self._port_override = port_override
        self._devices: dict[str, _DeviceServer] = {
            name: _DeviceServer(
                name=name,
                device=device,
                signals={n: s for n, s in config.signals.items() if s.device == name},
                on_write=on_write,
            )
            for name, device in config.devices.items()
        }

    def _dev(self, device: str) -> _DeviceServer:
        try:
            return self._devices[device]
        except KeyError:
            raise KeyError(f"no simulated device named {device!r}") from None

    async def start(self) -> None:
        """Listen on each device's host/port (port 0: an ephemeral port, see ports()) and
        serve each RTU line."""
        try:
            lines: dict[str, list[_DeviceServer]] = {}
            for name, ds in self._devices.items():
                if ds.server is not None:
                    raise RuntimeError(f"sim device {name} is already serving")
                if ds.device.serial is not None:
                    lines.setdefault(ds.device.serial.port, []).append(ds)
                    continue
                host = self._host_override or ds.device.host
                port = self._port_override.get(name, ds.device.port)
                server = ModbusTcpServer(
                    ds.sim_device(), address=(host, port), trace_packet=ds.trace_packet
                )
                ds.server = server
                try:
                    await server.serve_forever(background=True)
                except RuntimeError as e:
                    raise OSError(
                        f"sim device {name}: cannot listen on {host}:{port} "
                        f"({_bind_error(host, port)}); change devices.{name}.port"
                    ) from e
                sockets = getattr(server.transport, "sockets", None) or []
                ds.port = int(sockets[0].getsockname()[1])
                log.info("sim device %s listening on %s:%d", name, host, ds.port)
            for line_port, members in lines.items():
                await self._serve_line(line_port, members)
        except BaseException:
            await self.stop()
            raise

    async def _serve_line(self, port: str, members: list[_DeviceServer]) -> None:
        line = members[0].device.serial
        assert line is not None
        sim = self._config.simulator
        path = sim.serial_ports.get(port) if sim is not None else None
        if path is None:
            raise OSError(f"simulator.serial_ports: no entry for serial port {port!r}")
        server = ModbusSerialServer(
            [ds.sim_device() for ds in members],
            framer=FramerType.RTU,
            port=path,
            baudrate=line.baudrate,
            bytesize=line.bytesize,
            parity=line.parity,
            stopbits=line.stopbits,
            # A unit id nobody has gets no reply, as on a real line.
            ignore_missing_devices=True,
            trace_packet=_SerialLineFaults(members),
        )
        for ds in members:
            ds.server = server
        try:
            await server.serve_forever(background=True)
        except Exception as e:  # pyserial and termios raise their own types
            raise OSError(f"sim: cannot open serial port {path} for line {port}: {e!r}") from e
        if not getattr(server, "transport", None):
            raise OSError(f"sim: cannot open serial port {path} (simulator.serial_ports)")
        units = ", ".join(f"{ds.name}={ds.device.unit_id}" for ds in members)
        log.info("sim RTU line %s served on %s: %s", port, path, units)

    def where(self) -> dict[str, str]:
        """Where each started device is served: ``:port`` (TCP) or ``path#unit`` (RTU)."""
        sim = self._config.simulator
        lines = sim.serial_ports if sim is not None else {}
        out: dict[str, str] = {}
        for name, ds in self._devices.items():
            if ds.port is not None:
                out[name] = f":{ds.port}"
            elif ds.server is not None and ds.device.serial is not None:
                out[name] = f"{lines.get(ds.device.serial.port)}#{ds.device.unit_id}"
        return out

    def ports(self) -> dict[str, int]:
        """Actual bound port of each started device."""
        return {name: ds.port for name, ds in self._devices.items() if ds.port is not None}

    async def set_inputs(self, values: Mapping[str, float | bool]) -> None:
        """Encode each named signal into its table; all-or-nothing on a bad name or value."""
        staged: list[tuple[_DeviceServer, int, int, list[int] | list[bool]]] = []
        for name, value in values.items():
            sig = self._config.signals.get(name)
            if sig is None:
                raise KeyError(f"no signal named {name!r}")
            ds = self._devices[sig.device]
            if sig.table in (Table.coil, Table.discrete):
                data: list[int] | list[bool] = [encode_bit(sig, value)]
            else:
                data = encode(sig, value)
            staged.append((ds, _SET_FC[sig.table], sig.address, data))
        token = _INTERNAL.set(True)
        try:
            for ds, fc, address, data in staged:
                if ds.server is None:
                    raise RuntimeError(f"sim device {ds.name} is not serving")
                await ds.server.async_setValues(ds.device.unit_id, fc, address, data)
        finally:
            _INTERNAL.reset(token)

    async def stop(self) -> None:
        """Close every listener and client connection; the ports are free afterwards."""
        stopped: set[int] = set()
        for ds in self._devices.values():
            parked = list(ds.parked)
            for task in parked:
                task.cancel()
            if parked:
                await asyncio.gather(*parked, return_exceptions=True)
            server, ds.server, ds.port = ds.server, None, None
            if server is not None and id(server) not in stopped:
                stopped.add(id(server))
                with contextlib.suppress(Exception):
                    await server.shutdown()  # type: ignore[no-untyped-call]
                log.info("sim device %s stopped", ds.name)

    # ----------------------------------------------------------------------- fault injection

    def set_unresponsive(self, device: str, on: bool) -> None:
        """Accept TCP and requests but never reply (writes do not take effect)."""
        self._dev(device).faults.unresponsive = on
        log.info("sim device %s: unresponsive=%s", device, on)

    def set_delay(self, device: str, delay_s: float) -> None:
        """Reply to every request after ``delay_s`` seconds (0 = no delay)."""
        if not math.isfinite(delay_s) or delay_s < 0.0:
            raise ValueError(f"delay_s must be finite and >= 0, got {delay_s!r}")
        self._dev(device).faults.delay_s = delay_s
        log.info("sim device %s: delay_s=%s", device, delay_s)

    def set_exception(self, device: str, code: int | None) -> None:
        """Answer every request with Modbus exception ``code`` (None = normal replies)."""
        exc = None if code is None else ExcCodes(code)
        self._dev(device).faults.exception = exc
        log.info("sim device %s: exception=%s", device, None if exc is None else int(exc))
