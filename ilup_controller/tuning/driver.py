"""`ilup tune`: run a step test on the connected plant over Modbus and identify the loop.

The edges are the daemon's: one :class:`DeviceLink` per device (it writes the commands every
cycle, which keeps the devices' watchdogs fed), watchdogs armed and read back first. Whatever
ends the test, ``finally`` writes pump 0 and heater 0 to each device directly.

Refused while the cart is in use: the retained MQTT ``status`` says a daemon is online, or the
retained ``state`` shows a running phase (priming, perfusion, washout: a lung may be on the
circuit, even if the daemon has crashed). Two masters must never drive one pump. When the broker
cannot be reached this cannot be checked, and the tuner refuses unless the operator confirms
with ``--assume-no-daemon`` that no daemon is running and no lung is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiomqtt

from ilup_controller.config.models import CartConfig
from ilup_controller.core.types import Reading
from ilup_controller.modbus.link import DeviceLink
from ilup_controller.mqtt.topics import topic
from ilup_controller.runtime.safe import drive_safe, safe_outputs
from ilup_controller.runtime.watchdog import StartRefused, arm_watchdogs
from ilup_controller.tuning.identify import Fopdt, IdentificationError
from ilup_controller.tuning.steptest import Measured, Stage, StepPlan, StepTest, fit_test

log = logging.getLogger("ilup.tune")

MIN_SAMPLE_WALL_S = 0.02
IN_USE_PHASES = frozenset({"priming", "perfusion", "washout"})


class TuneRefused(StartRefused):
    """The test may not run (cart in use, watchdog off): exit code 3."""


class TuneFailed(RuntimeError):
    """The test ran but gave no model (aborted for safety, or no usable response)."""


@dataclass(frozen=True, slots=True)
class TuneRun:
    test: StepTest
    model: Fopdt


async def cart_in_use(cfg: CartConfig, wait_s: float = 2.0) -> str | None:
    """Why the cart is in use (from retained MQTT), None if not; raises OSError-like
    ``aiomqtt.MqttError`` when the broker cannot be reached."""
    m = cfg.mqtt
    got: dict[str, dict[str, object]] = {}
    tls = None
    if m.tls is not None:
        tls = aiomqtt.TLSParameters(
            ca_certs=m.tls.ca_file, certfile=m.tls.cert_file, keyfile=m.tls.key_file
        )
    async with aiomqtt.Client(
        m.host, m.port, username=m.username, password=m.password, tls_params=tls, timeout=3
    ) as client:
        for name in ("status", "state"):
            await client.subscribe(topic(m.topic_prefix, cfg.cart_id, name), qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):  # retained messages come at once, if any
                async for message in client.messages:
                    if isinstance(message.payload, bytes):
                        got[message.topic.value.rsplit("/", 1)[1]] = json.loads(message.payload)
                    if len(got) == 2:
                        break
    if got.get("status", {}).get("online") is True:
        return f"a daemon for cart {cfg.cart_id!r} is online (retained status): stop it first"
    phase = got.get("state", {}).get("phase")
    if phase in IN_USE_PHASES:
        return (
            f"the cart's last published phase is {phase!r}: a procedure is unfinished "
            "(complete or safe-stop it first)"
        )
    return None


def _fresh(store: Mapping[str, Reading], name: str, now: float, stale_s: float) -> float | None:
    r = store.get(name)
    if r is None or now - r.t > stale_s:
        return None
    return float(r.value)


async def run_test(
    cfg: CartConfig, plan: StepPlan, *, time_scale: float = 1.0, deadline_factor: float = 3.0
) -> TuneRun:
    """Run ``plan`` on the devices of ``cfg``; plant time = wall time x ``time_scale``."""
    loop = asyncio.get_running_loop()
    c = cfg.control
    sample_wall_s = max(MIN_SAMPLE_WALL_S, c.tick_period_s / time_scale)
    store: dict[str, Reading] = {}
    links: dict[str, DeviceLink] = {}
    for name, dev in cfg.devices.items():
        signals = {s: sig for s, sig in cfg.signals.items() if sig.device == name}
        fast = dev.model_copy(update={"poll_period_s": sample_wall_s})
        links[name] = DeviceLink(name, fast, signals, store, clock=loop.time)
    for sig, value in safe_outputs(cfg).items():
        links[cfg.signals[sig].device].set_output(sig, value)
    tasks = [asyncio.create_task(link.run(), name=f"tune:{n}") for n, link in links.items()]
    test = StepTest(cfg, plan)
    heartbeat = None if cfg.guard is None else cfg.guard.heartbeat_register
    stale_wall_s = c.stale_after_s  # the links' reading times are wall (loop) time
    try:
        await arm_watchdogs(cfg, links)
        t0 = loop.time()
        total_plant_s = plan.settle_s + plan.baseline_s + plan.hold_s + 120.0
        end = t0 + deadline_factor * total_plant_s / time_scale
        k = 0
        last_t = 0.0
        while not test.finished:
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * sample_wall_s - loop.time()))
            now = loop.time()
            if now > end:
                test.stage, test.reason = Stage.aborted, "the test did not finish in time"
                break
            t_s = (now - t0) * time_scale
            m = Measured(
                flow_ml_min=_fresh(store, c.flow.measured, now, stale_wall_s),
                pressure_mmhg=_fresh(store, c.pressure.measured, now, stale_wall_s),
                temperature_c=_fresh(store, c.temperature.measured, now, stale_wall_s),
                water_c=_fresh(store, c.temperature.water_measured, now, stale_wall_s),
            )
            cmd = test.step(t_s, max(t_s - last_t, 1e-6), m)
            last_t = t_s
            links[cfg.signals[c.flow.command].device].set_output(c.flow.command, cmd.pump_rpm)
            links[cfg.signals[c.temperature.command].device].set_output(
                c.temperature.command, cmd.heater_pct
            )
            if heartbeat is not None:  # a running `ilup guard` sees the cart driven, not hung
                links[cfg.signals[heartbeat].device].set_output(heartbeat, k % 65536)
            if k % max(1, round(5.0 / sample_wall_s)) == 0:
                log.info(
                    "t=%.0f s stage=%s pump=%.2f rpm heater=%.1f %% %s",
                    t_s,
                    test.stage,
                    cmd.pump_rpm,
                    cmd.heater_pct,
                    m,
                )
    finally:
        await drive_safe(cfg, links)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if test.stage is Stage.aborted:
        raise TuneFailed(f"test aborted, actuators driven safe: {test.reason}")
    if test.reason:
        log.warning("test ended early: %s", test.reason)
    try:
        model = fit_test(test)
    except IdentificationError as e:
        raise TuneFailed(str(e)) from e
    return TuneRun(test, model)
