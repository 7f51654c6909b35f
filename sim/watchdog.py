"""The simulated devices' communication watchdog, as the real pump drive and heater must have:
a device not written for longer than the timeout in its watchdog register stops (pump) or
switches off (heater) by itself, until it is written again. Its command register then reads 0,
so a master reading it back (mbpoll, a commissioning engineer) sees what the device does."""

from __future__ import annotations

import logging

from ilup_controller.config.models import CartConfig
from sim.plant import Plant
from sim.wiring import apply_command

log = logging.getLogger("ilup.sim")


class DeviceWatchdogs:
    """Device-side dead-man of every device that has a watchdog register."""

    def __init__(
        self,
        cfg: CartConfig,
        plant: Plant,
        *,
        ignored: frozenset[str] = frozenset(),
        no_trip: frozenset[str] = frozenset(),
    ):
        self._cfg = cfg
        self._plant = plant
        self._signal_of = {d.watchdog.signal: n for n, d in cfg.devices.items() if d.watchdog}
        self.ignored = ignored  # devices whose watchdog register ignores writes (reads 0)
        self.no_trip = no_trip  # devices whose watchdog holds its timeout but never trips
        self.timeout_s: dict[str, float] = {}
        self.last_write_s: dict[str, float] = {}
        self.tripped: set[str] = set()

    def on_write(self, signal: str, value: float, now_s: float) -> bool:
        """Record a write; False if the write must not reach the register (ignored watchdog)."""
        device = self._cfg.signals[signal].device
        self.last_write_s[device] = now_s
        if device in self.tripped:
            self.tripped.discard(device)
            log.warning("device %s: written again after its watchdog tripped", device)
        if signal in self._signal_of:
            if device in self.ignored:
                return False
            self.timeout_s[device] = value
        return True

    def check(self, now_s: float) -> list[str]:
        """Trip every device not written within its timeout; the command signals set to 0."""
        assert self._cfg.simulator is not None
        zeroed: list[str] = []
        b = self._cfg.simulator.bindings
        for device, timeout in self.timeout_s.items():
            if timeout <= 0 or device in self.tripped or device in self.no_trip:
                continue
            if now_s - self.last_write_s.get(device, now_s) > timeout:
                self.tripped.add(device)
                log.warning(
                    "device %s: no write for > %.2f s: watchdog trips to safe state",
                    device,
                    timeout,
                )
                for cmd in (b.pump_speed_command, b.heater_power_command):
                    if self._cfg.signals[cmd].device == device:
                        apply_command(self._cfg, self._plant, cmd, 0.0)
                        zeroed.append(cmd)
        return zeroed
