"""One supervised Modbus link per device: write the outputs, read the inputs, every cycle.

The link talks through a :class:`~ilup_controller.modbus.bus.Bus`: a TCP device has its own,
the RTU devices of one RS-485 line share one and take turns (bus.py). It connects itself with
exponential back-off (pymodbus never retries a failed *first* connect, libraries.md 1.3),
bounds every call with its own timeout (pymodbus #349: a request can hang), and keeps going
through any failure:
``run()`` only ends by cancellation. A failed read leaves the previous Reading in the store;
the core judges staleness from its timestamp, so an error never turns into a value.

Only a reply that is on time and matches its request counts as an answer. After a timeout the
connection is dropped and made afresh: a device that answers late would otherwise have its late
reply taken as the answer to the next request (issue 8: a slow module looked alive, with empty
replies). A reply of the wrong function or size is refused the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn, TypeVar

from pymodbus.client.base import ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from ilup_controller.aio import raise_if_cancelling
from ilup_controller.config.models import CartConfig, Device, Signal, Table
from ilup_controller.core.types import Reading
from ilup_controller.modbus.bus import Bus, serial_buses
from ilup_controller.modbus.codec import encode, encode_bit, is_bit_signal
from ilup_controller.modbus.plan import (
    BlockMember,
    BlockResult,
    ReadBlock,
    decode_block,
    plan_reads,
)

__all__ = ["DEFAULT_POLL_PERIOD_S", "DeviceLink", "LinkHealth", "build_links"]

log = logging.getLogger("ilup.modbus")

DEFAULT_POLL_PERIOD_S = 0.1
# Margin on top of pymodbus' own worst case, so its timeout normally fires first.
_CALL_MARGIN_S = 0.1

_T = TypeVar("_T")
_TRANSPORT_ERRORS = (ModbusException, OSError, TimeoutError)
# While a link stays down, a summary of the failures is logged at most this often.
_DOWN_SUMMARY_PERIOD_S = 60.0
_READ_FC = {Table.coil: 1, Table.discrete: 2, Table.holding: 3, Table.input: 4}


@dataclass(slots=True)
class LinkHealth:
    """Counters and state of one device link (a snapshot; the link keeps its own copy)."""

    connected: bool = False  # the device answered the last request (TCP alone is not enough)
    consecutive_failures: int = 0  # failed connects/requests since the last good reply
    last_error: str | None = None
    last_ok_t: float | None = None  # clock() of the last good reply
    last_write_ok_t: float | None = None  # clock() of the last acknowledged write (feeds watchdogs)
    reads_ok: int = 0
    reads_failed: int = 0
    writes_ok: int = 0
    writes_failed: int = 0
    cycles: int = 0
    decode_errors: int = 0  # signals whose registers did not hold a valid value
    bad_replies: int = 0  # replies refused: wrong function or size (a late reply, most likely)
    last_cycle_s: float | None = None  # duration of the last cycle (loop time)
    max_cycle_s: float = 0.0


class _LinkDown(Exception):
    """A transport failure: the rest of the cycle is skipped (each request would time out)."""


ReadProblem = Literal["", "unreachable", "no_reply", "refused", "invalid"]


@dataclass(frozen=True, slots=True)
class DirectRead:
    """A direct read's value, or why there is none: ``refused`` (a Modbus exception reply),
    ``invalid`` (the registers do not decode), ``no_reply`` (nothing in time), ``unreachable``
    (no connection). ``detail`` is for the reader."""

    value: float | bool | None
    problem: ReadProblem = ""
    detail: str = ""


def _direct_outcome(signal: str, result: BlockResult | None, last_error: str | None) -> DirectRead:
    if result is None:
        return DirectRead(None, "refused", last_error or "Modbus exception")
    if signal in result.errors:
        return DirectRead(None, "invalid", str(result.errors[signal]))
    return DirectRead(result.values[signal])


@dataclass(frozen=True, slots=True)
class _Output:
    signal: Signal
    value: float | bool
    data: list[int] | bool  # encoded registers, or the coil state


def _exc_text(code: int) -> str:
    try:
        return f"{code} ({ExcCodes(code).name})"
    except ValueError:
        return str(code)


class DeviceLink:
    """Owner of the Modbus connection to one device (see module docstring)."""

    def __init__(
        self,
        name: str,
        device: Device,
        signals: Mapping[str, Signal],
        store: dict[str, Reading],
        clock: Callable[[], float] = time.monotonic,
        bus: Bus | None = None,
        expire_outputs: bool = False,
    ) -> None:
        """``bus``: the shared bus of an RTU line (serial_buses); None: a bus of its own.
        ``expire_outputs``: for a caller that sets its commands every tick (the daemon's
        control loop), nothing is written once it has set no output for longer than the
        device's watchdog timeout (``_fresh_outputs``); callers that set a command and hold it
        (commissioning) leave it off."""
        foreign = sorted(n for n, s in signals.items() if s.device != name)
        if foreign:
            raise ValueError(f"device {name}: signals of other devices given: {foreign}")
        self.name = name
        self._device = device
        self._signals = dict(signals)
        self._store = store
        self._clock = clock
        self._blocks: list[ReadBlock] = plan_reads(self._signals)
        self._poll_period_s = device.poll_period_s or DEFAULT_POLL_PERIOD_S
        self._call_timeout_s = (device.retries + 1) * device.timeout_s + _CALL_MARGIN_S
        self._outputs: dict[str, _Output] = {}
        self._expire_outputs = expire_outputs
        self._set_at_s: float | None = None  # clock() when an output was last set
        self._withholding = False  # stale outputs are being left unwritten (logged once)
        self._wake = asyncio.Event()
        self._io_lock = asyncio.Lock()  # one cycle or write_now at a time
        self._bus = bus if bus is not None else Bus(device, name)
        self._health = LinkHealth()
        self._up: bool | None = None  # None until the first reply or failure
        self._faults: dict[str, str] = {}  # request key -> current device fault
        self._bad_signals: set[str] = set()
        self._next_auto_cycle = 0.0
        # Failures while down: logged once, then summarised (see _link_down / _answered).
        self._down_since_s = 0.0
        self._down_failures = 0
        self._down_summary_s = 0.0

    # ----------------------------------------------------------------------- public API

    @property
    def health(self) -> LinkHealth:
        return dataclasses.replace(self._health)

    def set_output(self, signal: str, value: float | bool) -> None:
        """Queue ``value`` for ``signal``; written every cycle from now on (latest wins)."""
        out = self._encode_output(signal, value)
        self._outputs[signal] = out
        self._set_at_s = self._clock()

    def request_cycle(self) -> None:
        """Ask for a cycle now; requests during a running cycle coalesce into one more."""
        self._wake.set()

    async def run(self) -> None:
        """Connect, then cycle until cancelled; never raises anything else."""
        dev = self._device
        bus = self._bus
        client = bus.attach(dev, self.name)
        backoff_s = dev.reconnect_min_s
        log.info(
            "device %s: link starting to %s, %d read request(s)",
            self.name,
            dev.where,
            len(self._blocks),
        )
        try:
            while True:
                raise_if_cancelling()
                try:
                    if not bus.connected and not await self._connect_bus(client):
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(2.0 * backoff_s, dev.reconnect_max_s)
                        continue
                    await self._wait_for_cycle()
                    if bus.connected:
                        await self._cycle(client)
                    if self._health.consecutive_failures == 0:
                        backoff_s = dev.reconnect_min_s
                    elif not self._health.connected:
                        # No answer (timeout, bad reply, refused TCP): a device that keeps
                        # being slow is retried with the same back-off as one that refuses
                        # TCP, and on a shared line it leaves the line to the others.
                        await asyncio.sleep(backoff_s)
                        backoff_s = min(2.0 * backoff_s, dev.reconnect_max_s)
                except Exception as e:  # a bug must not kill the link: log it, back off, go on
                    log.exception("device %s: unexpected error in link", self.name)
                    self._failed(f"internal error: {e!r}")
                    await asyncio.sleep(backoff_s)
        finally:
            bus.detach()
            self._health.connected = False
            log.info("device %s: link stopped", self.name)

    async def write_now(self, values: Mapping[str, float | bool], timeout_s: float) -> bool:
        """Write ``values`` at once (e.g. safe states at shutdown); True if all acknowledged.

        The values also replace the queued outputs, so a later cycle cannot undo them. Works
        with or without ``run()`` going (a short-lived client is used when not connected).
        """
        staged = {name: self._encode_output(name, value) for name, value in values.items()}
        self._outputs.update(staged)
        self._set_at_s = self._clock()
        done: set[str] = set()
        try:
            async with asyncio.timeout(timeout_s), self._direct_client() as client:
                if client is not None:
                    for name, out in staged.items():
                        try:
                            if await self._write(client, name, out):
                                done.add(name)
                        except _LinkDown:
                            pass  # still try the others: each actuator made safe counts
        except TimeoutError:
            log.error(
                "device %s: direct write timed out after %.2f s, acknowledged: %s",
                self.name,
                timeout_s,
                sorted(done),
            )
            return False
        raise_if_cancelling()
        missing = sorted(set(staged) - done)
        if missing:
            log.error("device %s: direct write not acknowledged for %s", self.name, missing)
        else:
            log.info("device %s: direct write acknowledged: %s", self.name, sorted(done))
        return not missing

    async def read_now(self, signal: str, timeout_s: float) -> float | bool | None:
        """Read one signal at once (e.g. a read-back check); None if it could not be read.

        A good value also refreshes the store, like a cycle's read.
        """
        return (await self.read_checked(signal, timeout_s)).value

    async def read_checked(self, signal: str, timeout_s: float) -> DirectRead:
        """As read_now, with why there is no value: commissioning advises by the cause."""
        sig = self._signals.get(signal)
        if sig is None:
            raise KeyError(f"device {self.name}: {signal!r} is not a signal of this device")
        block = ReadBlock(
            sig.table, sig.address, sig.register_count, (BlockMember(signal, 0, sig),)
        )
        outcome: DirectRead
        try:
            async with asyncio.timeout(timeout_s), self._direct_client() as client:
                if client is None:
                    why = self._health.last_error or "no connection"
                    outcome = DirectRead(None, "unreachable", why)
                else:
                    try:
                        result = await self._read(client, block)
                    except _LinkDown as e:
                        outcome = DirectRead(None, "no_reply", str(e))
                    else:
                        outcome = _direct_outcome(signal, result, self._health.last_error)
        except TimeoutError:
            log.warning(
                "device %s: read of %s timed out after %.2f s", self.name, signal, timeout_s
            )
            outcome = DirectRead(None, "no_reply", f"timed out after {timeout_s:.2f} s")
        raise_if_cancelling()
        return outcome

    # ----------------------------------------------------------------------- internals

    @contextlib.asynccontextmanager
    async def _direct_client(self) -> AsyncIterator[ModbusBaseClient | None]:
        """Exclusive use of a connected client, between cycles; None if none can connect.

        The bus's running client if it is connected, else a short-lived one of our own.
        """
        async with self._io_lock, self._bus.turn(self._device):
            client = self._bus.client
            if client is not None and client.connected:
                yield client
                return
            temp = self._bus.make_client(self._device, f"ilup-{self.name}-direct", direct=True)
            try:
                yield temp if await self._connect(temp) else None
            finally:
                temp.close()

    def _encode_output(self, signal: str, value: float | bool) -> _Output:
        sig = self._signals.get(signal)
        if sig is None:
            raise KeyError(f"device {self.name}: {signal!r} is not a signal of this device")
        if not sig.writable:
            raise ValueError(f"device {self.name}: signal {signal!r} is not writable")
        data: list[int] | bool = (
            encode_bit(sig, value) if is_bit_signal(sig) else encode(sig, value)
        )
        return _Output(sig, value, data)

    async def _call(
        self, client: ModbusBaseClient, op: Callable[[], Awaitable[_T]], what: str
    ) -> _T:
        """Run one pymodbus call under our own deadline; transport errors -> _LinkDown."""
        await self._bus.pace()
        try:
            # op() is inside the try: pymodbus raises ConnectionException when *building* a
            # request on a client that is not connected.
            return await asyncio.wait_for(op(), self._call_timeout_s)
        except TimeoutError:
            # Our deadline, not pymodbus': the client is in an unknown state, start afresh.
            self._bus.drop(client, line_broken=True)
            msg = f"{what}: no result within {self._call_timeout_s:.2f} s"
            self._link_down(msg)
            raise _LinkDown(msg) from None
        except _TRANSPORT_ERRORS as e:
            # Whatever failed, a reply may still be on its way: start a fresh connection so it
            # cannot be taken for the answer to the next request (a shared line: bus.drop).
            silent = isinstance(e, ModbusIOException)
            self._bus.drop(client, line_broken=not silent)
            if silent and "No response" in str(e):
                dev = self._device
                msg = (
                    f"{what}: no reply within {dev.timeout_s:.2f} s "
                    f"(timeout_s, {dev.retries} retries): the device is too slow or not answering"
                )
            else:
                msg = f"{what}: {type(e).__name__}: {e}"
            self._link_down(msg)
            raise _LinkDown(msg) from e
        finally:
            self._bus.frame_done()

    def _bad_reply(self, client: ModbusBaseClient, what: str, why: str) -> NoReturn:
        """A reply that does not answer the request sent: not an answer, and the stream is
        out of step (most likely a late reply to an earlier request): reconnect."""
        self._health.bad_replies += 1
        self._bus.drop(client, line_broken=False)
        msg = f"{what}: reply refused, {why} (a late reply to an earlier request?)"
        self._link_down(msg)
        raise _LinkDown(msg)

    async def _connect_bus(self, client: ModbusBaseClient) -> bool:
        """Connect the bus's long-lived client, unless another device on it just did."""
        async with self._bus.turn(self._device):
            return self._bus.connected or await self._connect(client)

    async def _connect(self, client: ModbusBaseClient) -> bool:
        dev = self._device
        # Cancel pymodbus' own background reconnect: this supervisor is the only one that
        # connects, so two connects can never race.
        client.close()
        where = f"connect to {dev.where}"
        try:
            ok = await asyncio.wait_for(client.connect(), self._call_timeout_s)
        except TimeoutError:
            ok, why = False, f"{where}: no result within {self._call_timeout_s:.2f} s"
        except _TRANSPORT_ERRORS as e:
            ok, why = False, f"{where}: {type(e).__name__}: {e}"
        else:
            why = f"{where} failed"
        if ok and client.connected:
            log.debug("device %s: connected to %s", self.name, dev.where)
            return True
        self._link_down(why)
        return False

    async def _wait_for_cycle(self) -> None:
        loop = asyncio.get_running_loop()
        delay_s = self._next_auto_cycle - loop.time()
        if delay_s > 0.0 and not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()
        # Cleared before the cycle: a request arriving during it gets exactly one more cycle.
        self._wake.clear()
        self._next_auto_cycle = loop.time() + self._poll_period_s

    async def _cycle(self, client: ModbusBaseClient) -> None:
        loop = asyncio.get_running_loop()
        async with self._io_lock, self._bus.turn(self._device):
            started = loop.time()
            self._health.cycles += 1
            try:
                # Every cycle, even unchanged: the write is what keeps device watchdogs fed.
                for name, out in self._fresh_outputs():
                    await self._write(client, name, out)
                for block in self._blocks:
                    await self._read(client, block)
            except _LinkDown:
                pass  # counted and logged; the next request would only time out as well
            finally:
                took_s = loop.time() - started
                self._health.last_cycle_s = took_s
                self._health.max_cycle_s = max(self._health.max_cycle_s, took_s)

    def _fresh_outputs(self) -> list[tuple[str, _Output]]:
        """The outputs to write this cycle: none once the control loop has set no output for
        longer than the device's own watchdog timeout. The control loop stalled (SIGSTOP, a
        starved CPU): rewriting its last command would feed the device's watchdog for it, and
        after the stall this link's first cycle could run before the control loop's first tick
        and re-enable a tripped pump drive at its speed from before the stall. Judged per link,
        not per output: the watchdog register is set once, at arming, and must go on being
        written while the control loop lives (a per-output age stopped writing it after 1 s,
        and the warning below, logged once, then stood for the whole run and hid a real
        stall)."""
        wd = self._device.watchdog
        if wd is None or not self._expire_outputs or not self._outputs:
            return list(self._outputs.items())
        stale = self._set_at_s is None or self._clock() - self._set_at_s > wd.timeout_s
        if stale and not self._withholding:
            log.warning(
                "device %s: no output set for over %.2f s (control stalled?): not written, "
                "the device's own watchdog takes over",
                self.name,
                wd.timeout_s,
            )
        elif self._withholding and not stale:
            log.info("device %s: outputs set again: written", self.name)
        self._withholding = stale
        return [] if stale else list(self._outputs.items())

    async def _write(self, client: ModbusBaseClient, name: str, out: _Output) -> bool:
        sig = out.signal
        unit = self._device.unit_id
        what = f"write {name} ({sig.table} {sig.address})"
        data = out.data

        def op() -> Awaitable[ModbusPDU]:
            if isinstance(data, bool):
                return client.write_coil(sig.address, data, device_id=unit)
            if len(data) == 1:
                return client.write_register(sig.address, data[0], device_id=unit)
            return client.write_registers(sig.address, data, device_id=unit)

        try:
            rsp = await self._call(client, op, what)
        except _LinkDown:
            self._health.writes_failed += 1
            raise
        if rsp.isError():
            self._health.writes_failed += 1
            self._device_fault(f"write:{name}", what, rsp.exception_code)
            return False
        expected_fc = 5 if isinstance(data, bool) else 6 if len(data) == 1 else 16
        if rsp.function_code != expected_fc:
            self._health.writes_failed += 1
            self._bad_reply(client, what, f"function {rsp.function_code}, sent {expected_fc}")
        self._health.writes_ok += 1
        self._health.last_write_ok_t = self._clock()
        self._answered(ok=True)
        self._fault_cleared(f"write:{name}", what)
        return True

    async def _read(self, client: ModbusBaseClient, block: ReadBlock) -> BlockResult | None:
        """Read one block into the store; None if the device answered with an exception."""
        unit = self._device.unit_id
        what = f"read {block.table} {block.start}..{block.start + block.count - 1}"
        read = {
            Table.input: client.read_input_registers,
            Table.holding: client.read_holding_registers,
            Table.coil: client.read_coils,
            Table.discrete: client.read_discrete_inputs,
        }[block.table]
        try:
            rsp = await self._call(
                client, lambda: read(block.start, count=block.count, device_id=unit), what
            )
        except _LinkDown:
            self._health.reads_failed += 1
            raise
        key = f"read:{block.table}:{block.start}"
        if rsp.isError():
            self._health.reads_failed += 1
            self._device_fault(key, what, rsp.exception_code)
            return None
        data: Sequence[int] | Sequence[bool] = rsp.bits if block.is_bits else rsp.registers
        expected_fc = _READ_FC[block.table]
        # Bits come in whole bytes (padded); registers exactly as many as asked.
        short = len(data) < block.count if block.is_bits else len(data) != block.count
        if rsp.function_code != expected_fc or short:
            self._health.reads_failed += 1
            kind = "bits" if block.is_bits else "registers"
            self._bad_reply(
                client,
                what,
                f"function {rsp.function_code} with {len(data)} {kind}, "
                f"asked function {expected_fc} for {block.count}",
            )
        self._health.reads_ok += 1
        self._answered(ok=True)
        self._fault_cleared(key, what)
        result = decode_block(block, data)
        now = self._clock()
        for name, value in result.values.items():
            self._store[name] = Reading(value, now)
            if name in self._bad_signals:
                self._bad_signals.discard(name)
                log.info("device %s: signal %s decodes again", self.name, name)
        for name, err in result.errors.items():
            self._health.decode_errors += 1
            if name not in self._bad_signals:
                self._bad_signals.add(name)
                log.warning("device %s: signal %s: invalid value: %s", self.name, name, err)
        return result

    # ----------------------------------------------------------------------- state tracking

    def _answered(self, ok: bool) -> None:
        """The device replied: the link is up (a Modbus exception is still a reply)."""
        h = self._health
        h.connected = True
        if ok:
            h.consecutive_failures = 0
            h.last_ok_t = self._clock()
        if self._up is not True:
            if self._up is False and self._down_failures > 1:
                log.info(
                    "device %s: link up after %d failed request(s) in %.1f s (last: %s)",
                    self.name,
                    self._down_failures,
                    time.monotonic() - self._down_since_s,
                    h.last_error,
                )
            else:
                log.info("device %s: link up", self.name)
            self._up = True

    def _failed(self, error: str) -> None:
        self._health.consecutive_failures += 1
        self._health.last_error = error

    def _link_down(self, error: str) -> None:
        self._failed(error)
        self._health.connected = False
        now_s = time.monotonic()
        if self._up is not False:
            self._up = False
            self._down_since_s = self._down_summary_s = now_s
            self._down_failures = 1
            log.warning("device %s: link down: %s", self.name, error)
            return
        self._down_failures += 1
        if now_s - self._down_summary_s >= _DOWN_SUMMARY_PERIOD_S:
            self._down_summary_s = now_s
            log.warning(
                "device %s: still down after %.0f s, %d failed request(s); last: %s",
                self.name,
                now_s - self._down_since_s,
                self._down_failures,
                error,
            )
        else:
            log.debug("device %s: still down: %s", self.name, error)

    def _device_fault(self, key: str, what: str, code: int) -> None:
        text = f"{what}: Modbus exception {_exc_text(code)}"
        self._answered(ok=False)
        self._failed(text)
        if self._faults.get(key) != text:
            self._faults[key] = text
            log.warning(
                "device %s: device fault: %s (unit %d)", self.name, text, self._device.unit_id
            )

    def _fault_cleared(self, key: str, what: str) -> None:
        if self._faults.pop(key, None) is not None:
            log.info("device %s: %s answers normally again", self.name, what)


def build_links(
    cfg: CartConfig,
    store: dict[str, Reading],
    clock: Callable[[], float],
    *,
    expire_outputs: bool = False,
) -> dict[str, DeviceLink]:
    """One link per device; the RTU devices of one serial port share that port's bus."""
    buses = serial_buses(cfg.devices)
    return {
        name: DeviceLink(
            name,
            dev,
            {s: sig for s, sig in cfg.signals.items() if sig.device == name},
            store,
            clock=clock,
            bus=buses.get(name),
            expire_outputs=expire_outputs,
        )
        for name, dev in cfg.devices.items()
    }
