"""The one place where the core is wired to its edges.

Tasks: one :class:`DeviceLink` per Modbus device (each owns its connection), the MQTT link, and
the control loop. The control loop never awaits I/O: it reads the latest readings from a plain
dict, steps the core, drops the commands into each link's mailbox and offers the state to the
MQTT link. Whatever ends the run (a stop request, a crash in any task), ``finally`` drives every
actuator to its safe state before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from ilup_controller import __version__
from ilup_controller.config.models import CartConfig
from ilup_controller.core.control import Controller
from ilup_controller.core.types import Reading
from ilup_controller.modbus.link import DeviceLink
from ilup_controller.mqtt.link import MqttLink
from ilup_controller.runtime.state import build_state
from ilup_controller.runtime.ticker import Ticker

log = logging.getLogger("ilup.daemon")

SAFE_WRITE_TIMEOUT_S = 1.0


class Daemon:
    def __init__(
        self, cfg: CartConfig, *, on_tick: Callable[[float, float, float], None] | None = None
    ) -> None:
        """``on_tick(deadline_s, started_s, finished_s)`` is for benchmarks (loop clock)."""
        self.cfg = cfg
        self._on_tick = on_tick
        self.store: dict[str, Reading] = {}
        self.ticker = Ticker(cfg.control.tick_period_s)
        self.links: dict[str, DeviceLink] = {}
        self.mqtt: MqttLink | None = None
        self.controller: Controller | None = None

    def _safe_outputs(self) -> dict[str, float]:
        c = self.cfg.control
        return {c.flow.command: 0.0, c.temperature.command: 0.0}

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises if a task crashed (after the safe shutdown)."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        for name, dev in cfg.devices.items():
            signals = {s: sig for s, sig in cfg.signals.items() if sig.device == name}
            self.links[name] = DeviceLink(name, dev, signals, self.store, clock=loop.time)
        self.mqtt = MqttLink(cfg.mqtt, cfg.cart_id, simulated=cfg.simulated, version=__version__)
        self.controller = Controller(cfg, t0_s=loop.time())
        # Commands start safe in every mailbox, so the very first cycle writes zeros.
        for sig, value in self._safe_outputs().items():
            self._link_of(sig).set_output(sig, value)

        background = [asyncio.create_task(link.run(), name=f"modbus:{n}") for n, link in self.links.items()]
        background.append(asyncio.create_task(self.mqtt.run(), name="mqtt"))
        control = asyncio.create_task(self._control_loop(), name="control")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        log.info("daemon started cart_id=%s devices=%s tick=%.3fs", cfg.cart_id,
                 ",".join(self.links), cfg.control.tick_period_s)
        crashed: BaseException | None = None
        try:
            done, _ = await asyncio.wait(
                {control, stopper, *background}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    crashed = task.exception()
                    log.critical("task %s crashed: %r; driving actuators safe", task.get_name(), crashed)
        finally:
            control.cancel()
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
            await self._drive_safe()
            with contextlib.suppress(Exception):
                await self.mqtt.close()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            log.info("daemon stopped ticks=%d overruns=%d", self.ticker.stats.ticks,
                     self.ticker.stats.overruns)
        if crashed is not None:
            raise crashed

    def _link_of(self, signal: str) -> DeviceLink:
        return self.links[self.cfg.signals[signal].device]

    async def _drive_safe(self) -> None:
        """Pump to zero and heater off, written directly; each device independently."""
        by_link: dict[str, dict[str, float]] = {}
        for sig, value in self._safe_outputs().items():
            self._link_of(sig).set_output(sig, value)
            by_link.setdefault(self.cfg.signals[sig].device, {})[sig] = value
        results = await asyncio.gather(
            *(self.links[n].write_now(v, SAFE_WRITE_TIMEOUT_S) for n, v in by_link.items()),
            return_exceptions=True,
        )
        for name, ok in zip(by_link, results, strict=True):
            if ok is True:
                log.info("safe state written device=%s", name)
            else:
                log.error("safe state NOT confirmed device=%s result=%r; relying on the device "
                          "watchdog", name, ok)

    async def _control_loop(self) -> None:
        assert self.controller is not None and self.mqtt is not None
        controller, mqtt, cfg = self.controller, self.mqtt, self.cfg
        seq = 0
        on_tick = self._on_tick
        async for t_s in self.ticker.ticks():
            started_s = time.monotonic() if on_tick is not None else 0.0
            decision = controller.step(t_s, self.store)
            for sig, value in decision.outputs.items():
                self._link_of(sig).set_output(sig, value)
            for link in self.links.values():
                link.request_cycle()
            mqtt.offer_state(
                build_state(cfg, decision, self.store, seq=seq, wall=datetime.now(UTC),
                            stats=self.ticker.stats)
            )
            seq += 1
            if on_tick is not None:
                on_tick(t_s, started_s, time.monotonic())
