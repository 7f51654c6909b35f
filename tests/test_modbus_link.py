"""DeviceLink against the simulator's Modbus servers over real loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import wait_until

from ilup_controller.broker import free_port
from ilup_controller.config import load_config
from ilup_controller.config.models import CartConfig, Device, Signal
from ilup_controller.core.types import Reading
from ilup_controller.modbus.codec import CodecError
from ilup_controller.modbus.link import DeviceLink
from sim.server import SimModbusServers

HOST = "127.0.0.1"
CONFIG = load_config("config/sim.yaml")
INPUTS: dict[str, float | bool] = {
    "flow": 512.5,
    "pa_pressure": 12.345,
    "perfusate_temp": 36.5,
    "reservoir_volume": 800.0,
    "pump_speed": 15.5,
    "heater_water_temp": 38.02,
}


async def stays_false(pred: Callable[[], bool], window_s: float) -> bool:
    """True if ``pred`` never became true during ``window_s`` (for "must not happen" checks)."""
    try:
        await wait_until(pred, window_s)
    except TimeoutError:
        return True
    return False


def signals_of(device: str, config: CartConfig = CONFIG) -> dict[str, Signal]:
    return {n: s for n, s in config.signals.items() if s.device == device}


class Rig:
    """Simulator servers plus one running DeviceLink per device, sharing one store."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, float | bool]] = []
        self.store: dict[str, Reading] = {}
        self.sim = self._new_sim(dict.fromkeys(CONFIG.devices, 0))
        self.links: dict[str, DeviceLink] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def _new_sim(self, ports: dict[str, int]) -> SimModbusServers:
        return SimModbusServers(
            CONFIG,
            lambda name, value: self.writes.append((name, value)),
            host_override=HOST,
            port_override=ports,
        )

    async def start(self, **device_updates: Any) -> None:
        await self.sim.start()
        await self.sim.set_inputs(INPUTS)
        self.ports = self.sim.ports()
        for name, dev in CONFIG.devices.items():
            device = dev.model_copy(update={"port": self.ports[name], **device_updates})
            link = DeviceLink(name, device, signals_of(name), self.store)
            self.links[name] = link
            self.tasks.append(asyncio.create_task(link.run(), name=f"link-{name}"))

    async def restart_sim(self) -> None:
        self.sim = self._new_sim(self.ports)
        await self.sim.start()

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.sim.stop()
        # run() ends only by cancellation, never by an error of its own.
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    await r.start()
    try:
        yield r
    finally:
        await r.close()


def all_read(store: dict[str, Reading]) -> bool:
    return set(store) >= set(CONFIG.signals)


async def test_readings_match_the_simulated_inputs(rig: Rig) -> None:
    await wait_until(lambda: all_read(rig.store))
    for name, value in INPUTS.items():
        sig = CONFIG.signals[name]
        lsb = 0.0 if sig.data_type == "float32" else abs(sig.scale) / 2
        assert rig.store[name].value == pytest.approx(value, abs=lsb + 1e-9), name
    # Writable holding registers are read back too (0 until something is written).
    assert rig.store["pump_speed_setpoint"].value == 0.0
    health = rig.links["io"].health
    assert health.connected
    assert health.reads_ok >= 1
    assert health.reads_failed == 0
    assert health.consecutive_failures == 0


async def test_readings_keep_fresh_without_cycle_requests(rig: Rig) -> None:
    await wait_until(lambda: "flow" in rig.store)
    first_t = rig.store["flow"].t
    cycles = rig.links["io"].health.cycles
    # poll_period_s is unset in sim.yaml: the link polls on its own every 0.1 s.
    await wait_until(lambda: rig.links["io"].health.cycles >= cycles + 3, 2.0)
    assert rig.store["flow"].t > first_t


async def test_outputs_reach_the_device_every_cycle(rig: Rig) -> None:
    pump = rig.links["pump"]
    pump.set_output("pump_speed_setpoint", 12.34)
    pump.request_cycle()
    # Re-written every cycle, even unchanged (keeps a device watchdog fed).
    # (on_write runs before the reply goes out, so wait on the link's own count.)
    await wait_until(lambda: pump.health.writes_ok >= 3)
    assert len(rig.writes) >= 3
    assert {name for name, _ in rig.writes} == {"pump_speed_setpoint"}
    assert all(v == pytest.approx(12.34) for _, v in rig.writes)
    assert pump.health.writes_failed == 0
    # The read-back of the holding register shows the written value.
    await wait_until(
        lambda: (
            rig.store.get("pump_speed_setpoint", Reading(0.0, 0.0)).value == pytest.approx(12.34)
        )
    )


async def test_latest_output_value_wins(rig: Rig) -> None:
    pump = rig.links["pump"]
    for rpm in (15.0, 16.0, 17.0):  # no await in between: one mailbox slot
        pump.set_output("pump_speed_setpoint", rpm)
    await wait_until(lambda: any(v == pytest.approx(17.0) for _, v in rig.writes))
    assert all(v == pytest.approx(17.0) for _, v in rig.writes)


async def test_set_output_is_checked_before_any_io(rig: Rig) -> None:
    io, pump = rig.links["io"], rig.links["pump"]
    with pytest.raises(ValueError, match="not writable"):
        io.set_output("flow", 1.0)
    with pytest.raises(KeyError, match="heater_power_setpoint"):
        pump.set_output("heater_power_setpoint", 1.0)  # another device's signal
    with pytest.raises(KeyError, match="nope"):
        pump.set_output("nope", 1.0)
    with pytest.raises(CodecError, match="uint16"):
        pump.set_output("pump_speed_setpoint", -1.0)
    with pytest.raises(ValueError, match="not writable"):
        await io.write_now({"flow": 1.0}, 1.0)
    cycles = pump.health.cycles
    await wait_until(lambda: pump.health.cycles >= cycles + 2)
    assert rig.writes == []
    assert pump.health.writes_ok == pump.health.writes_failed == 0


async def test_cycle_requests_coalesce(rig: Rig) -> None:
    # Use a pump link that never polls on its own, so every cycle is a requested one.
    pump_dev = CONFIG.devices["pump"].model_copy(
        update={"port": rig.ports["pump"], "poll_period_s": 60.0}
    )
    store: dict[str, Reading] = {}
    link = DeviceLink("pump", pump_dev, signals_of("pump"), store)
    task = asyncio.create_task(link.run())
    try:
        await wait_until(lambda: link.health.last_cycle_s is not None)  # the first cycle
        assert link.health.cycles == 1
        rig.sim.set_delay("pump", 0.05)  # a cycle now takes >= 0.1 s (2 reads)
        link.request_cycle()
        await wait_until(lambda: link.health.cycles == 2)
        for _ in range(5):  # while cycle 2 runs
            link.request_cycle()
        await wait_until(lambda: link.health.cycles == 3)
        assert await stays_false(lambda: link.health.cycles > 3, 0.4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_server_loss_keeps_last_reading_and_recovers(rig: Rig) -> None:
    io = rig.links["io"]
    await wait_until(lambda: all_read(rig.store))
    await rig.sim.stop()
    await wait_until(lambda: not io.health.connected)
    snapshot = dict(rig.store)
    failures = io.health.consecutive_failures
    reads_ok = io.health.reads_ok
    assert failures >= 1
    assert io.health.last_error is not None
    await wait_until(lambda: io.health.consecutive_failures >= failures + 2)
    # Nothing was removed or zeroed, and no timestamp advanced: the core sees them age.
    assert rig.store == snapshot
    assert io.health.reads_ok == reads_ok
    assert not io.health.connected

    await rig.restart_sim()  # same ports
    await rig.sim.set_inputs({"flow": 600.0})
    await wait_until(lambda: rig.store["flow"].value == 600.0, 5.0)
    assert rig.store["flow"].t > snapshot["flow"].t
    assert io.health.connected
    assert io.health.consecutive_failures == 0


async def test_unresponsive_device_bounds_each_cycle_and_the_loop_keeps_running(
    rig: Rig,
) -> None:
    io = rig.links["io"]
    dev = CONFIG.devices["io"]
    await wait_until(lambda: "flow" in rig.store)
    loop = asyncio.get_running_loop()
    max_lag_s = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal max_lag_s
        while not stop.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.01)
            max_lag_s = max(max_lag_s, loop.time() - t0 - 0.01)

    tick = asyncio.create_task(ticker())
    try:
        rig.sim.set_unresponsive("io", True)
        failed = io.health.reads_failed
        await wait_until(lambda: io.health.reads_failed >= failed + 4, 5.0)
        snapshot = rig.store["flow"]
    finally:
        stop.set()
        await tick
    health = io.health
    assert not health.connected
    assert health.max_cycle_s <= (dev.retries + 1) * dev.timeout_s + 0.2
    assert max_lag_s < 0.05
    assert rig.store["flow"] is snapshot
    # The other devices are not held up by the silent one.
    assert rig.links["pump"].health.connected
    assert rig.links["pump"].health.consecutive_failures == 0

    rig.sim.set_unresponsive("io", False)
    await wait_until(lambda: io.health.connected and rig.store["flow"].t > snapshot.t, 5.0)


async def test_exception_response_is_a_counted_device_fault(rig: Rig) -> None:
    io = rig.links["io"]
    await wait_until(lambda: "flow" in rig.store)
    rig.sim.set_exception("io", 4)
    failed = io.health.reads_failed
    await wait_until(lambda: io.health.reads_failed >= failed + 1)
    snapshot = rig.store["flow"]
    await wait_until(lambda: io.health.reads_failed >= failed + 3)
    health = io.health
    assert health.last_error is not None
    assert "exception 4" in health.last_error
    assert "DEVICE_FAILURE" in health.last_error
    assert health.connected  # the device answers; it reports a fault
    assert health.consecutive_failures >= 3
    assert rig.store["flow"] is snapshot

    rig.sim.set_exception("io", None)
    await wait_until(lambda: rig.store["flow"].t > snapshot.t)
    assert io.health.consecutive_failures == 0


async def test_first_connect_retries_with_backoff_until_a_server_appears() -> None:
    port = free_port()
    device = Device(host=HOST, port=port, timeout_s=0.25, reconnect_min_s=0.05, reconnect_max_s=0.4)
    store: dict[str, Reading] = {}
    link = DeviceLink("io", device, signals_of("io"), store)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(link.run())
    sim: SimModbusServers | None = None
    try:
        await wait_until(lambda: link.health.consecutive_failures >= 1)
        t1 = loop.time()
        await wait_until(lambda: link.health.consecutive_failures >= 4)
        # Delays 0.05 + 0.1 + 0.2 between attempts 1..4: it backs off, it does not spin.
        assert loop.time() - t1 >= 0.3
        assert link.health.consecutive_failures <= 6
        assert not link.health.connected
        assert store == {}

        sim = SimModbusServers(CONFIG, lambda n, v: None, port_override={"io": port})
        await sim.start()
        await sim.set_inputs({"flow": 250.0})
        await wait_until(lambda: "flow" in store, 3.0)
        assert store["flow"].value == 250.0
        assert link.health.connected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if sim is not None:
            await sim.stop()


async def test_write_now_drives_outputs_and_reports_acknowledgement(rig: Rig) -> None:
    pump = rig.links["pump"]
    pump.set_output("pump_speed_setpoint", 20.0)
    await wait_until(lambda: any(v == pytest.approx(20.0) for _, v in rig.writes))
    assert await pump.write_now({"pump_speed_setpoint": 0.0}, timeout_s=1.0)
    assert rig.writes[-1] == ("pump_speed_setpoint", 0.0)
    # The safe value also replaced the queued one: later cycles keep writing 0.
    n = len(rig.writes)
    await wait_until(lambda: len(rig.writes) >= n + 2)
    assert all(v == 0.0 for _, v in rig.writes[n:])

    await rig.sim.stop()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert not await pump.write_now({"pump_speed_setpoint": 0.0}, timeout_s=0.5)
    assert loop.time() - t0 <= 0.6


async def test_write_now_without_a_running_link(rig: Rig) -> None:
    heater_dev = CONFIG.devices["heater"].model_copy(update={"port": rig.ports["heater"]})
    link = DeviceLink("heater", heater_dev, signals_of("heater"), {})
    assert await link.write_now({"heater_power_setpoint": 0.0}, timeout_s=1.0)
    assert ("heater_power_setpoint", 0.0) in rig.writes
    assert link.health.writes_ok == 1


async def test_write_now_times_out_on_a_silent_device(rig: Rig) -> None:
    rig.sim.set_unresponsive("heater", True)
    heater = rig.links["heater"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ok = await heater.write_now({"heater_power_setpoint": 0.0}, timeout_s=0.2)
    assert not ok
    assert loop.time() - t0 <= 0.3


async def test_discrete_input_is_read_as_bool(rig: Rig) -> None:
    await rig.sim.set_inputs({"air_detected": True})
    await wait_until(lambda: rig.store.get("air_detected", Reading(False, 0.0)).value is True)
    await rig.sim.set_inputs({"air_detected": False})
    await wait_until(lambda: rig.store["air_detected"].value is False)


async def test_read_now(rig: Rig) -> None:
    pump = rig.links["pump"]
    assert await pump.write_now({"pump_watchdog": 1.0}, timeout_s=1.0)
    assert await pump.read_now("pump_watchdog", timeout_s=1.0) == pytest.approx(1.0)
    assert await pump.read_now("pump_speed", timeout_s=1.0) == pytest.approx(15.5)
    with pytest.raises(KeyError, match="flow"):
        await pump.read_now("flow", timeout_s=1.0)
    rig.sim.set_exception("pump", 2)
    assert await pump.read_now("pump_speed", timeout_s=1.0) is None
    refused = await pump.read_checked("pump_speed", timeout_s=1.0)
    assert (refused.value, refused.problem) == (None, "refused")
    assert "exception 2" in refused.detail
    rig.sim.set_exception("pump", None)
    # Silent: not the register map's fault, and commissioning must not say it is.
    rig.sim.set_unresponsive("pump", True)
    silent = await pump.read_checked("pump_speed", timeout_s=1.0)
    assert (silent.value, silent.problem) == (None, "no_reply"), silent
    rig.sim.set_unresponsive("pump", False)
    ok = await pump.read_checked("pump_speed", timeout_s=3.0)
    assert (ok.value, ok.problem, ok.detail) == (pytest.approx(15.5), "", "")
    # Without a running link: a short-lived connection of its own.
    heater_dev = CONFIG.devices["heater"].model_copy(update={"port": rig.ports["heater"]})
    lone = DeviceLink("heater", heater_dev, signals_of("heater"), {})
    assert await lone.read_now("heater_water_temp", timeout_s=1.0) == pytest.approx(38.02)
    await rig.sim.stop()
    assert await lone.read_now("heater_water_temp", timeout_s=1.0) is None
    gone = await lone.read_checked("heater_water_temp", timeout_s=1.0)
    assert gone.problem == "unreachable", gone


async def test_run_honours_a_cancel_that_was_swallowed(rig: Rig) -> None:
    """Python 3.11's wait_for can eat a CancelledError; run() must still stop."""
    io_dev = CONFIG.devices["io"].model_copy(update={"port": rig.ports["io"]})
    link = DeviceLink("io", io_dev, signals_of("io"), {})

    async def swallow_then_run() -> None:
        me = asyncio.current_task()
        assert me is not None
        me.cancel()
        # What wait_for does by accident when its inner call just finished:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        await link.run()

    task = asyncio.create_task(swallow_then_run())
    done, _ = await asyncio.wait({task}, timeout=2.0)
    assert task in done
    assert task.cancelled()
    assert link.health.cycles == 0


@contextlib.asynccontextmanager
async def running_pump_link(rig: Rig, now: list[float]) -> AsyncIterator[DeviceLink]:
    """The daemon's pump link (expire_outputs) on a hand-stepped clock, cycling until exit."""
    pump_dev = CONFIG.devices["pump"].model_copy(update={"port": rig.ports["pump"]})
    pump = DeviceLink(
        "pump", pump_dev, signals_of("pump"), {}, clock=lambda: now[0], expire_outputs=True
    )
    task = asyncio.create_task(pump.run())
    try:
        yield pump
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_output_the_control_loop_stopped_setting_is_not_written(rig: Rig) -> None:
    """A control loop that stalls (SIGSTOP) leaves its last command in the mailbox: once it is
    older than the device's watchdog timeout (1 s) the link stops writing it, so the device's
    own watchdog acts instead of being fed by a command nobody decided. A fresh command is
    written again at once."""
    now = [0.0]
    async with running_pump_link(rig, now) as pump:
        pump.set_output("pump_speed_setpoint", 11.0)
        pump.request_cycle()
        await wait_until(lambda: ("pump_speed_setpoint", pytest.approx(11.0)) in rig.writes)
        now[0] = 1.01  # the control loop has not set it for longer than the timeout
        n = len(rig.writes)
        cycles = pump.health.cycles
        await wait_until(lambda: pump.health.cycles >= cycles + 3)  # the link goes on cycling
        assert rig.writes[n:] == []
        pump.set_output("pump_speed_setpoint", 0.0)
        pump.request_cycle()
        await wait_until(lambda: ("pump_speed_setpoint", 0.0) in rig.writes[n:])


async def test_the_watchdog_register_set_at_arming_is_written_while_control_runs(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog register is set once, at arming; the control loop then sets the pump
    command every tick. 1.8 s on (past the 1 s timeout) the register is still written every
    cycle, and nothing says control stalled. With the age judged per output, it stopped being
    written after 1 s and the daemon warned "control stalled?" at every start."""
    now = [0.0]
    async with running_pump_link(rig, now) as pump:
        pump.set_output("pump_watchdog", 1.0)
        for k in range(1, 4):
            now[0] = 0.6 * k
            pump.set_output("pump_speed_setpoint", 11.0)
            n = len(rig.writes)
            pump.request_cycle()
            await wait_until(lambda n=n: ("pump_watchdog", pytest.approx(1.0)) in rig.writes[n:])
    assert "control stalled" not in caplog.text
