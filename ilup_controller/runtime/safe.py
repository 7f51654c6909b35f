"""The cart's named safe state and the one way to write it: pump 0 and heater 0, each device
written directly and acknowledged on its own, so one silent device never keeps another from
going safe. Used wherever actuators are driven: the daemon's shutdown and `ilup tune`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from ilup_controller.config.models import CartConfig
from ilup_controller.modbus.link import DeviceLink
from ilup_controller.runtime.causes import likely_cause

log = logging.getLogger("ilup.safe")

SAFE_WRITE_TIMEOUT_S = 1.0


def safe_outputs(cfg: CartConfig) -> dict[str, float]:
    """Command signal -> its safe value."""
    c = cfg.control
    return {c.flow.command: 0.0, c.temperature.command: 0.0}


async def drive_safe(cfg: CartConfig, links: Mapping[str, DeviceLink]) -> dict[str, bool]:
    """Write the safe state to every actuator device at once; device -> acknowledged."""
    by_device: dict[str, dict[str, float | bool]] = {}
    for sig, value in safe_outputs(cfg).items():
        by_device.setdefault(cfg.signals[sig].device, {})[sig] = value
    results = await asyncio.gather(
        *(links[d].write_now(v, SAFE_WRITE_TIMEOUT_S) for d, v in by_device.items()),
        return_exceptions=True,
    )
    acknowledged: dict[str, bool] = {}
    for device, ok in zip(by_device, results, strict=True):
        acknowledged[device] = ok is True
        if ok is True:
            log.info("safe state written device=%s", device)
        else:
            h = links[device].health
            if h.last_ok_t is None:  # it never answered: nothing was ever driven
                log.error(
                    "safe state NOT confirmed device=%s: it never answered (%s): %s",
                    device,
                    h.last_error or "no reply",
                    likely_cause(h.last_error or "", device),
                )
            else:
                log.error(
                    "safe state NOT confirmed device=%s result=%r; relying on the device watchdog",
                    device,
                    ok,
                )
    return acknowledged
