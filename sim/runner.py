"""Run the plant model behind its Modbus TCP servers, in real time or faster.

The model is stepped on the event loop clock scaled by ``speed``; every ``publish_period_s`` of
wall time the instruments' readings are encoded into the servers' input registers, and every
command the controller writes to a holding register goes straight to the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from ilup_controller.config.models import CartConfig, DataType, Signal
from sim.plant import Plant
from sim.server import SimModbusServers

log = logging.getLogger("ilup.sim")

_RAW_LIMITS: dict[DataType, tuple[float, float]] = {
    DataType.uint16: (0, 0xFFFF),
    DataType.int16: (-0x8000, 0x7FFF),
    DataType.uint32: (0, 0xFFFFFFFF),
    DataType.int32: (-0x80000000, 0x7FFFFFFF),
    DataType.float32: (-3.0e38, 3.0e38),
    DataType.bool: (0, 1),
}


def saturate(signal: Signal, value: float) -> float:
    """Clip to what the register can carry, as a real transducer saturates at full scale."""
    lo, hi = _RAW_LIMITS[signal.data_type]
    a, b = lo * signal.scale + signal.offset, hi * signal.scale + signal.offset
    return min(max(value, min(a, b)), max(a, b))


class SimulatedCart:
    """The plant plus its Modbus servers; ``step_to`` is usable without any clock."""

    def __init__(self, cfg: CartConfig, *, port_override: Mapping[str, int] | None = None) -> None:
        if cfg.simulator is None:
            raise ValueError("the configuration has no 'simulator' section")
        self.cfg = cfg
        self.sim = cfg.simulator
        self.plant = Plant(self.sim.plant, step_s=self.sim.step_s)
        self.servers = SimModbusServers(cfg, self._on_write, port_override=port_override)
        b = self.sim.bindings
        self._writers: dict[str, Callable[[float], None]] = {
            b.pump_speed_command: self.plant.set_pump_speed_command,
            b.heater_power_command: self.plant.set_heater_power_command,
        }

    def _on_write(self, signal: str, value: float | bool) -> None:
        writer = self._writers.get(signal)
        if writer is not None:
            writer(float(value))

    def sensor_registers(self) -> dict[str, float]:
        """Current instrument readings keyed by the signal that carries each."""
        s = self.plant.sensors()
        b = self.sim.bindings
        values: dict[str | None, float] = {
            b.flow: s.flow_ml_min,
            b.pa_pressure: s.pa_pressure_mmhg,
            b.perfusate_temperature: s.perfusate_temperature_c,
            b.water_temperature: s.water_temperature_c,
            b.pump_speed: s.pump_speed_rpm,
            b.reservoir_volume: s.reservoir_volume_ml,
        }
        return {
            name: saturate(self.cfg.signals[name], v) for name, v in values.items() if name is not None
        }

    async def run(self, stop: asyncio.Event, *, speed: float = 1.0,
                  publish_period_s: float = 0.02) -> None:
        await self.servers.start()
        log.info("simulator serving %s at speed x%g",
                 ", ".join(f"{d}=:{p}" for d, p in self.servers.ports().items()), speed)
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
                await self.servers.set_inputs(self.sensor_registers())
        finally:
            await self.servers.stop()
