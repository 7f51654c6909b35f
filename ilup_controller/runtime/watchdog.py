"""Arm every actuator device's own communication watchdog at start-up and read it back.

A device whose watchdog cannot be confirmed is a reason to refuse to start: without it a hung
daemon would leave the pump running at its last speed (safety.md 3.3).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from ilup_controller.config.models import CartConfig
from ilup_controller.modbus.link import DeviceLink

log = logging.getLogger("ilup.watchdog")

ARM_DEADLINE_S = 15.0  # devices may still be booting when the daemon starts
RETRY_S = 0.5
TOLERANCE_S = 0.05


class StartRefused(RuntimeError):
    """A start-up safety check failed: the daemon does not start (exit code 3)."""


class WatchdogError(StartRefused):
    pass


async def arm_watchdogs(
    cfg: CartConfig, links: Mapping[str, DeviceLink], deadline_s: float = ARM_DEADLINE_S
) -> None:
    """Write each configured timeout and read it back; raise WatchdogError naming the device."""
    await asyncio.gather(
        *(
            _arm(cfg, name, links[name], deadline_s)
            for name, dev in cfg.devices.items()
            if dev.watchdog is not None
        )
    )


async def _arm(cfg: CartConfig, name: str, link: DeviceLink, deadline_s: float) -> None:
    wd = cfg.devices[name].watchdog
    assert wd is not None
    sig = cfg.signals[wd.signal]
    where = f"device {name!r} watchdog register {wd.signal!r} ({sig.table} {sig.address})"
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    problem = "no answer"
    while loop.time() < end:
        if await link.write_now({wd.signal: wd.timeout_s}, timeout_s=1.0):
            value = await link.read_now(wd.signal, timeout_s=1.0)
            if value is not None:
                if abs(float(value) - wd.timeout_s) <= TOLERANCE_S:
                    log.info("%s armed: %.2f s", where, wd.timeout_s)
                    return
                problem = f"reads back {float(value):g} s after writing {wd.timeout_s:g} s" + (
                    ": the watchdog is off" if float(value) == 0 else ""
                )
                break  # the device answered: a wrong value will not fix itself
        await asyncio.sleep(RETRY_S)
    raise WatchdogError(
        f"{where} {problem}; the device must stop by itself when the "
        "controller goes silent: enable its communication watchdog"
    )
