"""Closed loop in virtual time: the control core against the plant model, no sockets, no clock.

Each tick mirrors the runtime: the core decides from readings taken one tick earlier (the
device links read right after writing), its commands pass through the same register encoding
the Modbus edge uses, and the model advances to the next tick. A 30-minute procedure takes a
few seconds of wall time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ilup_controller.config.models import CartConfig
from ilup_controller.core.cart import CartCore, TickResult
from ilup_controller.core.types import Reading
from sim.plant import Plant, PlantTruth
from sim.wiring import apply_command, quantise, sensor_values


@dataclass(frozen=True, slots=True)
class Sample:
    decision: TickResult
    truth: PlantTruth


class VirtualCart:
    def __init__(self, cfg: CartConfig, t0_s: float = 0.0) -> None:
        if cfg.simulator is None:
            raise ValueError("the configuration has no 'simulator' section")
        self.cfg = cfg
        self.plant = Plant(cfg.simulator.plant, step_s=cfg.simulator.step_s)
        self.core = CartCore(cfg, t0_s=t0_s)
        self.period_s = cfg.control.tick_period_s
        self.t_s = t0_s
        self._k = 0
        self._t0_s = t0_s
        self.readings: dict[str, Reading] = {}
        self._sample_sensors()

    def _sample_sensors(self) -> None:
        for name, value in sensor_values(self.cfg, self.plant).items():
            self.readings[name] = Reading(quantise(self.cfg.signals[name], value), self.t_s)

    def tick(self) -> Sample:
        self._k += 1
        self.t_s = self._t0_s + self._k * self.period_s  # absolute deadlines: no float drift
        self.plant.advance_to(self.t_s)
        decision = self.core.step(self.t_s, self.readings)
        for signal, value in decision.outputs.items():
            apply_command(self.cfg, self.plant, signal, quantise(self.cfg.signals[signal], value))
        self._sample_sensors()
        return Sample(decision, self.plant.truth())

    def run_for(self, duration_s: float, on_tick: Callable[[Sample], None] | None = None) -> Sample:
        end = self.t_s + duration_s - 1e-9
        sample = self.tick()
        if on_tick is not None:
            on_tick(sample)
        while self.t_s < end:
            sample = self.tick()
            if on_tick is not None:
                on_tick(sample)
        return sample
