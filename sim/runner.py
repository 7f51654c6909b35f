"""Run the plant model behind its Modbus TCP servers, in real time or faster.

The model is stepped on the event loop clock scaled by ``speed``; every ``publish_period_s`` of
wall time the instruments' readings are encoded into the servers' input registers, and every
command the controller writes to a holding register goes straight to the model. Faults come from
a scenario file and from JSON messages on ``<prefix>/<cart_id>/sim/fault``.

The simulated pump drive and heater implement a communication watchdog (sim/watchdog.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import aiomqtt

from ilup_controller.config.models import CartConfig
from ilup_controller.mqtt.link import client_protocol, client_tls
from ilup_controller.mqtt.topics import topic
from sim.faults import FaultInjector, Scenario
from sim.plant import Plant
from sim.server import SimModbusServers
from sim.watchdog import DeviceWatchdogs
from sim.wiring import apply_command, enable_signals, saturate, sensor_values

log = logging.getLogger("ilup.sim")

FAULT_TOPIC = "sim/fault"


class SimulatedCart:
    """The plant model served as Modbus TCP devices, stepped on the event loop clock."""

    def __init__(
        self,
        cfg: CartConfig,
        *,
        port_override: Mapping[str, int] | None = None,
        scenario: Scenario | None = None,
        watchdog_ignored: frozenset[str] = frozenset(),
        watchdog_no_trip: frozenset[str] = frozenset(),
        swap_words: frozenset[str] = frozenset(),
        disconnected: frozenset[str] = frozenset(),
    ) -> None:
        """Test aids (commissioning): ``swap_words`` serves these 32-bit signals in the other
        word order than the cart file says; ``disconnected`` serves these analogue inputs as a
        broken 4-20 mA loop does (-25 % of the range); ``watchdog_no_trip``: these devices hold
        their watchdog timeout but never trip."""
        if cfg.simulator is None:
            raise ValueError("the configuration has no 'simulator' section")
        self.cfg = cfg
        self.sim = cfg.simulator
        self.plant = Plant(self.sim.plant, step_s=self.sim.step_s)
        self.servers = SimModbusServers(
            _swapped(cfg, swap_words), self._on_write, port_override=port_override
        )
        self._disconnected = {s: _broken_loop_value(cfg, s) for s in disconnected}
        self.injector = FaultInjector(self.plant, self.servers, devices=cfg.devices)
        if scenario is not None:
            self.injector.load(scenario)
        self.watchdogs = DeviceWatchdogs(
            cfg, self.plant, ignored=watchdog_ignored, no_trip=watchdog_no_trip
        )
        self._now_s = 0.0
        self._enables = enable_signals(cfg)

    def _on_write(self, signal: str, value: float | bool) -> None:
        if signal in self._enables:
            # Hard-wired to the drive's STO input and the heater contactor: no device watchdog
            # sees it, so the guard's writes never feed the controller's dead-man.
            apply_command(self.cfg, self.plant, signal, float(value))
            return
        if not self.watchdogs.on_write(signal, float(value), self._now_s):
            wd = self.cfg.signals[signal]
            # The device ignores the write: its register keeps reading 0 (watchdog off).
            asyncio.get_running_loop().create_task(self.servers.set_inputs({signal: 0.0}))
            log.warning(
                "device %s ignores its watchdog register (%s %d)", wd.device, wd.table, wd.address
            )
            return
        if self.cfg.signals[signal].device not in self.watchdogs.tripped:
            apply_command(self.cfg, self.plant, signal, float(value))

    async def run(
        self, stop: asyncio.Event, *, speed: float = 1.0, publish_period_s: float = 0.02
    ) -> None:
        await self.servers.start()
        await self.servers.set_inputs(self._enables)  # enables closed at power-up
        log.info(
            "simulator serving %s at speed x%g",
            ", ".join(f"{d}={w}" for d, w in self.servers.where().items()),
            speed,
        )
        faults = asyncio.create_task(self._fault_listener(), name="sim-faults")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        k = 0
        try:
            while not stop.is_set():
                k += 1
                deadline = t0 + k * publish_period_s
                delay = deadline - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        break
                self._now_s = loop.time() - t0
                tripped = dict.fromkeys(self.watchdogs.check(self._now_s), 0.0)
                self.injector.step_plant_to(self._now_s * speed)
                await self.servers.set_inputs(
                    {**sensor_values(self.cfg, self.plant), **self._disconnected, **tripped}
                )
        finally:
            faults.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await faults
            await self.servers.stop()

    async def _fault_listener(self) -> None:
        """Run-time faults over MQTT; the simulator works the same when no broker answers."""
        m = self.cfg.mqtt
        where = topic(m.topic_prefix, self.cfg.cart_id, FAULT_TOPIC)
        last_error = ""
        while True:
            try:
                # The same protocol and TLS settings as the daemon: a cart file that asks for
                # TLS never gets a plain-text connection (issue 8 #10).
                async with aiomqtt.Client(
                    m.host,
                    m.port,
                    username=m.username,
                    password=m.password,
                    protocol=client_protocol(m),
                    tls_params=client_tls(m),
                    keepalive=m.keepalive_s,
                    timeout=3,
                ) as client:
                    await client.subscribe(where, qos=1)
                    log.info("simulator listening for faults on %s", where)
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes):
                            continue
                        try:
                            applied = self.injector.handle_runtime_message(payload)
                            log.warning("fault injected: %s", applied)
                        except ValueError as e:
                            log.warning("fault message rejected: %s", e)
                        except Exception:  # one bad message must not end the fault intake
                            log.exception("fault message could not be handled; ignored")
            except aiomqtt.MqttError as e:
                if str(e) != last_error:  # once per distinct reason, not every 2 s
                    last_error = str(e)
                    log.warning(
                        "fault topic unavailable on %s:%d (%s); retrying", m.host, m.port, e
                    )
                await asyncio.sleep(2.0)


def _swapped(cfg: CartConfig, names: frozenset[str]) -> CartConfig:
    """``cfg`` with the word order of ``names`` flipped: what a device wired the other way
    serves."""
    if not names:
        return cfg
    unknown = sorted(names - set(cfg.signals))
    if unknown:
        raise ValueError(f"--swap-words: no signal named {unknown}")
    signals = dict(cfg.signals)
    for n in names:
        s = signals[n]
        flipped = "little" if s.word_order == "big" else "big"
        signals[n] = s.model_copy(update={"word_order": flipped})
    return cfg.model_copy(update={"signals": signals})


def _broken_loop_value(cfg: CartConfig, name: str) -> float:
    """A 4-20 mA input at 0 mA: 25 % of the span below the range (saturated by the register)."""
    sig = cfg.signals.get(name)
    if sig is None or sig.range is None:
        raise ValueError(f"--disconnect: {name!r} is not a signal with a range")
    lo, hi = sig.range
    return float(saturate(sig, lo - 0.25 * (hi - lo)))
