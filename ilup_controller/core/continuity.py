"""Continuity of control: was the loop interrupted, and do the actuators still hear it?

A pump drive or heater that is not written for its watchdog timeout goes safe by itself. When
control comes back (a tick long after the previous one: the process was stopped or starved; a
device that answers writes again), the next write would restart that actuator by itself, from
readings and loop states that no longer describe the circuit. Each such gap becomes a latched
alarm whose safe action keeps the actuator off until the operator resets it and resumes (the
README's promise: the pump never restarts on its own).

The limit is a fraction of the shorter of ``stale_after_s`` and the device watchdog timeout, so
the alarm is latched before (or as) the device gives up, never after a silent restart.
"""

from __future__ import annotations

from collections.abc import Mapping

from ilup_controller.config.models import CartConfig
from ilup_controller.core.alarms import Condition

# Of the shorter of stale_after_s and the watchdog timeout: a write this late may already find
# the device stopped (its timeout counts from the previous write, which followed a tick).
GAP_FRACTION = 0.75


class Continuity:
    def __init__(self, cfg: CartConfig, t0_s: float) -> None:
        c = cfg.control
        self._t0_s = t0_s
        self._links: dict[str, tuple[str, float]] = {}  # alarm id -> (device, limit s)
        for alarm_id, command in (
            ("pump_link_lost", c.flow.command),
            ("heater_link_lost", c.temperature.command),
        ):
            device = cfg.signals[command].device
            wd = cfg.devices[device].watchdog
            timeout_s = c.stale_after_s if wd is None else min(wd.timeout_s, c.stale_after_s)
            self._links[alarm_id] = (device, GAP_FRACTION * timeout_s)
        self.gap_limit_s = min(limit for _, limit in self._links.values())

    def evaluate(
        self,
        t_s: float,
        dt_s: float,
        last_write_ok_s: Mapping[str, float | None] | None,
        *,
        pump_on: bool,
        heater_on: bool,
    ) -> dict[str, Condition]:
        """``last_write_ok_s``: device -> time its last write was acknowledged (None: never);
        None when the caller has no device links (a core driven without devices).
        ``pump_on``/``heater_on``: what the previous tick commanded. Only an actuator that was
        commanded on can be restarted by the next write, so only then is a gap a hazard (an
        idle cart whose links are still connecting raises ``device_comms`` alone)."""
        gap = dt_s > self.gap_limit_s
        out = {
            "control_interrupted": Condition(
                gap and (pump_on or heater_on),
                dt_s,
                self.gap_limit_s,
                f"tick {dt_s:.1f} s after the previous one",
            )
        }
        on = {"pump_link_lost": pump_on, "heater_link_lost": heater_on}
        for alarm_id, (device, limit_s) in self._links.items():
            # In a gap tick the interruption explains the silence: one alarm, not three.
            if gap or not on[alarm_id] or last_write_ok_s is None or device not in last_write_ok_s:
                out[alarm_id] = Condition(False)
                continue
            ok_s = last_write_ok_s[device]
            silent_s = t_s - (self._t0_s if ok_s is None else ok_s)
            out[alarm_id] = Condition(
                silent_s > limit_s,
                silent_s,
                limit_s,
                f"device {device}: no write acknowledged",
            )
        return out
