"""Arm every actuator device's own communication watchdog at start-up and read it back.

A device whose watchdog cannot be confirmed is a reason to refuse to start: without it a hung
daemon would leave the pump running at its last speed (safety.md 3.3).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from ilup_controller.config.models import CartConfig
from ilup_controller.modbus.codec import CodecError, resolution
from ilup_controller.modbus.link import DeviceLink
from ilup_controller.runtime.causes import likely_cause

log = logging.getLogger("ilup.watchdog")

ARM_DEADLINE_S = 15.0  # devices may still be booting when the daemon starts
RETRY_S = 0.5


class StartRefused(RuntimeError):
    """A start-up safety check failed: the daemon does not start (exit code 3)."""


class WatchdogError(StartRefused):
    pass


async def arm_watchdogs(
    cfg: CartConfig, links: Mapping[str, DeviceLink], deadline_s: float = ARM_DEADLINE_S
) -> None:
    """Write each configured timeout and read it back; raise WatchdogError naming every device
    that failed (all of them, so one start attempt shows every problem)."""
    names = [name for name, dev in cfg.devices.items() if dev.watchdog is not None]
    results = await asyncio.gather(
        *(_arm(cfg, name, links[name], deadline_s) for name in names), return_exceptions=True
    )
    problems: list[str] = []
    for result in results:
        if isinstance(result, WatchdogError):
            problems.append(str(result))
        elif isinstance(result, BaseException):
            raise result
    if problems:
        raise WatchdogError("; ".join(problems))


async def _arm(cfg: CartConfig, name: str, link: DeviceLink, deadline_s: float) -> None:
    dev = cfg.devices[name]
    wd = dev.watchdog
    assert wd is not None
    sig = cfg.signals[wd.signal]
    register = f"watchdog register {wd.signal!r} ({sig.table} {sig.address})"
    where = f"device {name!r} {register}"
    # One register step: the device holds the nearest value it can represent, never further.
    step_s = resolution(sig, wd.timeout_s)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        try:
            written = await link.write_now({wd.signal: wd.timeout_s}, timeout_s=1.0)
        except CodecError as e:  # check-config refuses this; a hand-built config may not
            raise WatchdogError(f"{where}: cannot encode {wd.timeout_s:g} s: {e}") from e
        if written:
            value = await link.read_now(wd.signal, timeout_s=1.0)
            if value is not None:
                held_s = float(value)
                if held_s > 0.0 and abs(held_s - wd.timeout_s) <= step_s * (1.0 + 1e-9):
                    log.info("%s armed: %g s (configured %g s)", where, held_s, wd.timeout_s)
                    return
                # The device answered: a wrong value will not fix itself.
                if held_s <= 0.0:
                    raise WatchdogError(
                        f"{where} reads back {held_s:g} s after writing {wd.timeout_s:g} s: "
                        "the watchdog is off; the device must stop by itself when the "
                        "controller goes silent: enable its communication watchdog"
                    )
                raise WatchdogError(
                    f"{where} reads back {held_s:g} s after writing {wd.timeout_s:g} s, more "
                    f"than one register step ({step_s:g} s) apart: set a timeout the device "
                    f"accepts (devices.{name}.watchdog.timeout_s) and check "
                    f"signals.{wd.signal} against the device manual"
                )
        await asyncio.sleep(RETRY_S)
    health = link.health
    error = health.last_error or "no reply"
    if health.connected:
        # It answers Modbus, but not to this register: the register map is wrong.
        raise WatchdogError(
            f"device {name!r} answered but its {register} could not be written and read "
            f"back within {deadline_s:g} s: {error}; check signals.{wd.signal} against the "
            "device manual"
        )
    raise WatchdogError(
        f"device {name!r} at {dev.where} did not answer within {deadline_s:g} s (last error: "
        f"{error}): likely {likely_cause(error, name)}; its watchdog could not be armed and "
        f"nothing was driven: check the cabling, host, port and unit_id in devices.{name}"
    )
