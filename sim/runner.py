"""Run the plant model behind its Modbus TCP servers, in real time or faster.

The model is stepped on the event loop clock scaled by ``speed``; every ``publish_period_s`` of
wall time the instruments' readings are encoded into the servers' input registers, and every
command the controller writes to a holding register goes straight to the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from ilup_controller.config.models import CartConfig
from sim.plant import Plant
from sim.server import SimModbusServers
from sim.wiring import apply_command, sensor_values

log = logging.getLogger("ilup.sim")


class SimulatedCart:
    """The plant model served as Modbus TCP devices, stepped on the event loop clock."""

    def __init__(self, cfg: CartConfig, *, port_override: Mapping[str, int] | None = None) -> None:
        if cfg.simulator is None:
            raise ValueError("the configuration has no 'simulator' section")
        self.cfg = cfg
        self.sim = cfg.simulator
        self.plant = Plant(self.sim.plant, step_s=self.sim.step_s)
        self.servers = SimModbusServers(cfg, self._on_write, port_override=port_override)

    def _on_write(self, signal: str, value: float | bool) -> None:
        apply_command(self.cfg, self.plant, signal, float(value))

    async def run(
        self, stop: asyncio.Event, *, speed: float = 1.0, publish_period_s: float = 0.02
    ) -> None:
        await self.servers.start()
        log.info(
            "simulator serving %s at speed x%g",
            ", ".join(f"{d}=:{p}" for d, p in self.servers.ports().items()),
            speed,
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        k = 0
        try:
            while not stop.is_set():
                k += 1
                deadline = t0 + k * publish_period_s
                delay = deadline - loop.time()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                self.plant.advance_to((loop.time() - t0) * speed)
                await self.servers.set_inputs(sensor_values(self.cfg, self.plant))
        finally:
            await self.servers.stop()
