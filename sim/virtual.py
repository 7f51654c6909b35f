"""Closed loop in virtual time: the core against the plant model, no sockets, no clock.

Each tick mirrors the runtime: the core decides from readings taken one tick earlier (the
device links read right after writing), its commands pass through the same register encoding
the Modbus edge uses, and the model advances to the next tick. Faults are injected with the same
:class:`FaultInjector` the real-time simulator uses; a faulty device is emulated here the way a
:class:`DeviceLink` experiences it: its readings stop refreshing, its writes do not arrive, and
its own watchdog trips. A 30-minute procedure takes a few seconds of wall time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ilup_controller.config.models import CartConfig
from ilup_controller.core.cart import CartCore, TickResult
from ilup_controller.core.monitor import silent_devices
from ilup_controller.core.types import Reading, value_type
from sim.faults import FaultInjector
from sim.plant import Plant, PlantTruth, SensorChannel
from sim.watchdog import DeviceWatchdogs
from sim.wiring import Quantiser, apply_command, compile_quantiser, sensor_bindings

# (tick time, readings) -> the readings the core is handed instead
Tamper = Callable[[float, dict[str, Reading]], Mapping[str, Reading]]


@value_type
class Sample:
    decision: TickResult
    truth: PlantTruth


class VirtualDevices:
    """DeviceHooks for virtual time: which devices fail to answer, and why."""

    def __init__(self, cfg: CartConfig) -> None:
        self._cfg = cfg
        self.failing: dict[str, str] = {}
        self.delay_s: dict[str, float] = {}

    def set_unresponsive(self, device: str, on: bool) -> None:
        self._set(device, "no response (timeout)" if on else None)

    def set_delay(self, device: str, delay_s: float) -> None:
        self.delay_s[device] = delay_s
        too_slow = (
            delay_s > (self._cfg.devices[device].retries + 1) * self._cfg.devices[device].timeout_s
        )
        self._set(device, f"reply after {delay_s:.2f} s exceeds the timeout" if too_slow else None)

    def set_exception(self, device: str, code: int | None) -> None:
        self._set(device, None if code is None else f"Modbus exception {code}")

    def _set(self, device: str, reason: str | None) -> None:
        if reason is None:
            self.failing.pop(device, None)
        else:
            self.failing[device] = reason


class VirtualCart:
    def __init__(self, cfg: CartConfig, t0_s: float = 0.0) -> None:
        if cfg.simulator is None:
            raise ValueError("the configuration has no 'simulator' section")
        self.cfg = cfg
        self.plant = Plant(cfg.simulator.plant, step_s=cfg.simulator.step_s)
        self.devices = VirtualDevices(cfg)
        self.injector = FaultInjector(self.plant, self.devices, devices=cfg.devices)
        self.watchdogs = DeviceWatchdogs(cfg, self.plant)
        self.core = CartCore(cfg, t0_s=t0_s)
        self.period_s = cfg.control.tick_period_s
        self.t_s = t0_s
        self._k = 0
        self._t0_s = t0_s
        self.readings: dict[str, Reading] = {}
        # Per-signal register round trips, compiled once (the hot path of the harness).
        self._quantise: dict[str, Quantiser] = {
            name: compile_quantiser(sig) for name, sig in cfg.signals.items()
        }
        self._sensors: list[tuple[SensorChannel, str, str, Quantiser]] = [
            (channel, name, cfg.signals[name].device, self._quantise[name])
            for channel, name in sensor_bindings(cfg).items()
        ]
        self._signal_device = {name: sig.device for name, sig in cfg.signals.items()}
        self.last_ok: dict[str, tuple[float | None, str | None]] = {
            d: (None, None) for d in cfg.devices
        }
        for dev in cfg.devices.values():  # armed at start-up, as the daemon does
            if dev.watchdog is not None:
                self.watchdogs.on_write(dev.watchdog.signal, dev.watchdog.timeout_s, t0_s)
        self._exchange()

    def _exchange(self) -> None:
        """One Modbus cycle per device after the tick: what answers is read."""
        s = self.plant.sensors()
        values = s.by_channel()
        failing = self.devices.failing
        readings = self.readings
        t_s = self.t_s
        for channel, name, device, quantise in self._sensors:
            # A dropped-out channel is not refreshed and goes stale, as a dead input does.
            if device not in failing and channel not in s.dropouts:
                readings[name] = Reading(quantise(values[channel]), t_s)
        for device in self.cfg.devices:
            reason = self.devices.failing.get(device)
            ok_t, _ = self.last_ok[device]
            self.last_ok[device] = (self.t_s, None) if reason is None else (ok_t, reason)

    def tick(self, tamper: Tamper | None = None) -> Sample:
        """One tick; ``tamper`` lets a test replace what the core is handed as readings."""
        self._k += 1
        self.t_s = self._t0_s + self._k * self.period_s  # absolute deadlines: no float drift
        self.injector.step_plant_to(self.t_s)
        self.watchdogs.check(self.t_s)
        down = silent_devices(self.t_s, self.last_ok, self.cfg.control.stale_after_s)
        readings = self.readings if tamper is None else tamper(self.t_s, dict(self.readings))
        decision = self.core.step(
            self.t_s,
            readings,
            devices_down=down,
            # A device that answers in a cycle has its writes of that cycle acknowledged too.
            last_write_ok_s={d: ok_t for d, (ok_t, _) in self.last_ok.items()},
        )
        for signal, value in decision.outputs.items():
            if self._signal_device[signal] in self.devices.failing:
                continue  # the write does not arrive
            if self.watchdogs.on_write(signal, value, self.t_s):
                apply_command(self.cfg, self.plant, signal, float(self._quantise[signal](value)))
        self._exchange()
        return Sample(decision, self.plant.truth())

    def stall(self, duration_s: float) -> None:
        """The controller process stops (SIGSTOP, a starved CPU) for ``duration_s``: the plant and
        the devices' own watchdogs go on, nothing is read or written. The next tick comes late,
        as the runtime's ticker delivers it after skipping the missed deadlines."""
        missed = round(duration_s / self.period_s)
        end_s = self._t0_s + (self._k + missed) * self.period_s
        t_s = self.t_s
        while t_s < end_s - 1e-9:
            t_s = min(t_s + self.period_s, end_s)
            self.injector.step_plant_to(t_s)
            self.watchdogs.check(t_s)
        self._k += missed - 1  # the next tick() lands at the end of the stall

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
