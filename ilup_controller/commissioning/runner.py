"""The Modbus edge of ``ilup commission``: drives the cart through the daemon's device links
(the same code as ``ilup tune``: runtime/safe.py, runtime/watchdog.py) and hands the samples to
evaluate.py. Whatever ends a run, ``finally`` writes pump 0 and heater 0 to each device.

The cart lock (runtime/lock.py) is held by the caller: no daemon drives this cart meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ilup_controller.commissioning import evaluate as ev
from ilup_controller.commissioning.results import CommissioningRun, StepResult, config_hash
from ilup_controller.commissioning.steps import OPERATOR_ITEMS, STEPS, Step
from ilup_controller.config.models import CartConfig, SensorLimits
from ilup_controller.core.types import Reading
from ilup_controller.modbus.link import DeviceLink, build_links
from ilup_controller.runtime.safe import drive_safe, safe_outputs
from ilup_controller.runtime.watchdog import WatchdogError, arm_watchdogs

log = logging.getLogger("ilup.commission")

SAMPLE_S = 0.05
MAX_ZERO_MMHG = 10.0
WATCHDOG_TEST_FRACTION = 0.1  # the small command: 10 % of speed_max_rpm / heater_max_pct


@dataclass(frozen=True, slots=True)
class Plan:
    zero_s: float = 5.0
    settle_s: float = 3.0
    measure_s: float = 3.0
    heater_pct: float = 50.0
    heater_max_s: float = 30.0
    signals_s: float = 1.0


# A yes/no question to the operator; ``optional``: --yes answers it "no" (a test bubble is
# only confirmed by someone who made one).
Ask = Callable[[str, bool], bool]
Show = Callable[[StepResult], None]


@dataclass
class Context:
    cfg: CartConfig
    plan: Plan
    operator: str
    ask: Ask
    store: dict[str, Reading] = field(default_factory=dict)
    links: dict[str, DeviceLink] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    rest: dict[str, list[float]] = field(default_factory=dict)  # samples at rest
    points: list[tuple[float, float, float]] = field(default_factory=list)  # rpm, flow, mmHg
    zero_mmhg: float | None = None
    sv_measured: float | None = None
    sv_use: float | None = None
    blocked: str = ""  # why actuator steps are skipped


def _result(step: Step, v: ev.Verdict, confirmed_by: str | None = None) -> StepResult:
    status = "fail" if not v.ok else ("warn" if v.warn else "pass")
    return StepResult(
        id=step.id,
        title=step.title,
        status=status,
        did=step.does,
        measured=v.measured,
        fix=v.fix,
        figures=v.figures,
        confirmed_by=confirmed_by,
    )


def _combine(verdicts: list[ev.Verdict]) -> ev.Verdict:
    ok = all(v.ok for v in verdicts)
    figures: dict[str, float] = {}
    for v in verdicts:
        figures.update(v.figures)
    return ev.Verdict(
        ok,
        "; ".join(v.measured for v in verdicts if v.measured),
        "; ".join(v.fix for v in verdicts if v.fix),
        figures if len(verdicts) == 1 else {},
        warn=any(v.warn for v in verdicts),
    )


async def commission(
    cfg: CartConfig, plan: Plan, operator: str, ask: Ask, show: Show
) -> CommissioningRun:
    started = datetime.now(UTC)
    ctx = Context(cfg, plan, operator, ask)
    loop = asyncio.get_running_loop()
    ctx.links = build_links(
        cfg.model_copy(
            update={
                "devices": {
                    n: d.model_copy(update={"poll_period_s": SAMPLE_S})
                    for n, d in cfg.devices.items()
                }
            }
        ),
        ctx.store,
        loop.time,
    )
    results: list[StepResult] = []
    try:
        for name in ctx.links:
            _start(ctx, name)
        for step in STEPS:
            if step.drives and ctx.blocked:
                r = StepResult(
                    id=step.id,
                    title=step.title,
                    status="skipped",
                    did=step.does,
                    fix=f"not run: {ctx.blocked}",
                )
            else:
                try:
                    r = await RUN[step.id](ctx, step)
                except WatchdogError as e:
                    r = _result(step, ev.Verdict(False, "watchdog not armed", str(e)))
            if r.status == "fail" and step.id in ("devices", "signals", "readback", "watchdog"):
                ctx.blocked = ctx.blocked or f"step {step.id} failed"
            results.append(r)
            show(r)
    finally:
        await drive_safe(cfg, ctx.links)
        for t in ctx.tasks.values():
            t.cancel()
        await asyncio.gather(*ctx.tasks.values(), return_exceptions=True)
    return CommissioningRun(
        cart_id=cfg.cart_id,
        config_sha256=config_hash(cfg),
        started=started,
        finished=datetime.now(UTC),
        operator=operator,
        passed=all(r.status != "fail" for r in results) and len(results) == len(STEPS),
        pressure_zero_mmhg=ctx.zero_mmhg,
        stroke_volume_ml_per_rev=ctx.sv_use,
        stroke_volume_measured_ml_per_rev=ctx.sv_measured,
        steps=results,
    )


# --------------------------------------------------------------------------- plumbing


def _start(ctx: Context, device: str) -> None:
    ctx.tasks[device] = asyncio.create_task(ctx.links[device].run(), name=f"commission:{device}")


async def _stop(ctx: Context, device: str) -> None:
    task = ctx.tasks.pop(device, None)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _set(ctx: Context, signal: str, value: float) -> None:
    ctx.links[ctx.cfg.signals[signal].device].set_output(signal, value)


def _fresh(ctx: Context, name: str, now: float) -> float | None:
    r = ctx.store.get(name)
    if r is None or now - r.t > ctx.cfg.control.stale_after_s:
        return None
    return float(r.value)


async def _sample(ctx: Context, names: list[str], seconds: float) -> dict[str, list[float]]:
    """Every new reading of ``names`` for ``seconds`` (from the links' store)."""
    loop = asyncio.get_running_loop()
    got: dict[str, list[float]] = {n: [] for n in names}
    seen: dict[str, float] = {}
    end = loop.time() + seconds
    while loop.time() < end:
        await asyncio.sleep(SAMPLE_S)
        for n in names:
            r = ctx.store.get(n)
            if r is not None and r.t != seen.get(n):
                seen[n] = r.t
                got[n].append(float(r.value))
    return got


def _safety_sensors(cfg: CartConfig) -> Iterator[tuple[str, str, SensorLimits]]:
    c, a = cfg.control, cfg.alarms
    yield "flow", c.flow.measured, a.flow
    yield "pressure", c.pressure.measured, a.pressure
    yield "temperature", c.temperature.measured, a.temperature
    yield "water", c.temperature.water_measured, a.water
    if c.reservoir_measured is not None:
        yield "reservoir", c.reservoir_measured, a.reservoir


# --------------------------------------------------------------------------- the steps


async def _devices(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    verdicts: list[ev.Verdict] = []
    for name, link in ctx.links.items():
        sigs = [s for s, sig in cfg.signals.items() if sig.device == name]
        got = {s: await link.read_checked(s, timeout_s=2.0) for s in sigs}
        missing = {s: (r.problem, r.detail) for s, r in got.items() if r.value is None}
        dev = cfg.devices[name]
        if len(missing) == len(sigs):
            h = link.health
            verdicts.append(
                ev.Verdict(
                    False,
                    f"{name} ({dev.where}): no answer ({h.last_error or 'no reply'})",
                    f"device {name!r}: {_likely_cause(h.last_error or '', name)}",
                )
            )
        elif missing:
            verdicts.append(ev.unread(name, missing))
        else:
            verdicts.append(ev.Verdict(True, f"{name}: {len(sigs)} signal(s) read"))
    return _result(step, _combine(verdicts))


def _likely_cause(error: str, device: str) -> str:
    from ilup_controller.runtime.causes import likely_cause

    return likely_cause(error, device)


async def _signals(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    got = await _sample(ctx, list(cfg.signals), ctx.plan.signals_s)
    verdicts = [ev.in_range(n, cfg.signals[n], got[n]) for n in cfg.signals]
    bad = [v for v in verdicts if not v.ok]
    shown = bad or [ev.Verdict(True, f"{len(verdicts)} signals inside their ranges")]
    return _result(step, _combine(shown))


async def _readback(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    verdicts: list[ev.Verdict] = []
    # The watchdog registers are written and read back by the watchdog step (arming).
    values: dict[str, float] = dict(safe_outputs(cfg))
    for sig_name, value in values.items():
        link = ctx.links[cfg.signals[sig_name].device]
        sig = cfg.signals[sig_name]
        if not await link.write_now({sig_name: value}, timeout_s=2.0):
            why = link.health.last_error or "no reply"
            verdicts.append(
                ev.Verdict(
                    False,
                    f"{sig_name}: write of {value:g} not acknowledged ({why})",
                    f"device {sig.device!r}: {_likely_cause(why, sig.device)}",
                )
            )
            continue
        r = await link.read_checked(sig_name, timeout_s=2.0)
        verdicts.append(ev.readback(sig_name, sig, value, r.value, (r.problem, r.detail)))
    return _result(step, _combine(verdicts))


async def _watchdog(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    c = cfg.control
    await arm_watchdogs(cfg, ctx.links, deadline_s=5.0)
    verdicts: list[ev.Verdict] = []
    tests = [(c.flow.command, c.flow.speed_measured, WATCHDOG_TEST_FRACTION * c.flow.speed_max_rpm)]
    tests.append(
        (
            c.temperature.command,
            cfg.commissioning.heater_power_measured,
            WATCHDOG_TEST_FRACTION * c.temperature.heater_max_pct,
        )
    )
    for command, feedback, value in tests:
        device = cfg.signals[command].device
        wd = cfg.devices[device].watchdog
        assert wd is not None
        if feedback is None:
            verdicts.append(
                ev.Verdict(
                    True,
                    f"{device}: no feedback signal configured, trip not observed",
                    f"device {device!r}: configure its own feedback (pump: "
                    "control.flow.speed_measured; heater: commissioning.heater_power_measured), "
                    "or check by hand that it stops when the controller stops writing",
                    warn=True,
                )
            )
            continue
        verdicts.append(await _trip(ctx, device, command, feedback, value, wd.timeout_s))
    return _result(step, _combine(verdicts))


async def _trip(
    ctx: Context, device: str, command: str, feedback: str, value: float, timeout_s: float
) -> ev.Verdict:
    """Write ``value`` (the link's cycles paused), stop writing, watch ``feedback``."""
    loop = asyncio.get_running_loop()
    link = ctx.links[device]
    fb_link = ctx.links[ctx.cfg.signals[feedback].device]
    await _stop(ctx, device)  # no cycle may feed the watchdog
    running: float | None = None
    try:
        end = loop.time() + 3.0
        while loop.time() < end:  # keep writing until the actuator runs
            await link.write_now({command: value}, timeout_s=1.0)
            got = await fb_link.read_now(feedback, timeout_s=1.0)
            if got is not None:
                running = float(got)
                if running >= 0.8 * value:
                    break
            await asyncio.sleep(0.05)
        t_last = loop.time()  # no write from here on
        samples: list[tuple[float, float]] = []
        limit = timeout_s + ctx.cfg.control.tick_period_s + 1.0
        while loop.time() - t_last < limit:
            got = await fb_link.read_now(feedback, timeout_s=1.0)
            if got is not None:
                samples.append((loop.time() - t_last, float(got)))
                if float(got) <= ev.TRIP_TACHO_FRACTION * value:
                    break
            await asyncio.sleep(0.02)
        return ev.watchdog_trip(
            device,
            feedback,
            timeout_s,
            ctx.cfg.control.tick_period_s,
            value,
            running,
            samples,
        )
    finally:
        await link.write_now({command: 0.0}, timeout_s=1.0)
        _start(ctx, device)


async def _pressure_zero(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    if not ctx.ask("Pump stopped and the pressure transducer open to atmosphere?", False):
        return _result(
            step, ev.Verdict(False, "not confirmed", "open the transducer to atmosphere, re-run")
        )
    await asyncio.sleep(min(2.0, ctx.plan.settle_s))  # the line comes to rest
    names = [s for _, s, _ in _safety_sensors(cfg)]
    got = await _sample(ctx, names, ctx.plan.zero_s)
    ctx.rest = got
    v = ev.pressure_zero(
        got[cfg.control.pressure.measured], ev.zero_reference_mmhg(cfg), MAX_ZERO_MMHG
    )
    if v.ok:
        ctx.zero_mmhg = v.figures["offset_mmhg"]
    return _result(step, v, confirmed_by=ctx.operator)


async def _sensor_noise(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    verdicts = [
        ev.sensor_noise(label, ctx.rest.get(sig, []), limits, cfg.signals[sig])
        for label, sig, limits in _safety_sensors(cfg)
    ]
    return _result(step, _combine(verdicts))


async def _stroke_volume(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    c = cfg.control
    sv_cfg = c.flow.stroke_volume_ml_per_rev
    regulate_at = c.pressure.limit_mmhg - c.pressure.margin_mmhg
    zero = ctx.zero_mmhg or 0.0
    loop = asyncio.get_running_loop()
    points: list[tuple[float, float]] = []
    await arm_watchdogs(cfg, ctx.links, deadline_s=5.0)
    for share in (0.3, 0.6):
        rpm = min(share * c.flow.target_ml_min / sv_cfg, c.flow.speed_max_rpm)
        _set(ctx, c.flow.command, rpm)
        end = loop.time() + ctx.plan.settle_s
        while loop.time() < end:
            await asyncio.sleep(SAMPLE_S)
            p = _fresh(ctx, c.pressure.measured, loop.time())
            if p is None or p - zero >= regulate_at:
                _set(ctx, c.flow.command, 0.0)
                why = "no pressure reading" if p is None else f"pressure {p - zero:.1f} mmHg"
                return _result(
                    step,
                    ev.Verdict(
                        False,
                        f"stopped at {rpm:.2f} rpm: {why}",
                        f"the pressure reached limit - margin ({regulate_at:g} mmHg) at a low "
                        "speed: a clamp is closed, or the line is kinked; open it and re-run"
                        if p is not None
                        else "the pressure sensor stopped reading: check it",
                    ),
                )
        names = [c.flow.measured, c.pressure.measured]
        if c.flow.speed_measured is not None:
            names.append(c.flow.speed_measured)
        got = await _sample(ctx, names, ctx.plan.measure_s)
        q = statistics.fmean(got[c.flow.measured]) if got[c.flow.measured] else 0.0
        p = statistics.fmean(got[c.pressure.measured]) - zero if got[c.pressure.measured] else 0.0
        tacho = got.get(c.flow.speed_measured or "", [])
        speed = statistics.fmean(tacho) if tacho else rpm
        points.append((speed, q))
        ctx.points.append((speed, q, p))
    v, sv = ev.stroke_volume(sv_cfg, points)
    ctx.sv_measured = sv
    if sv is not None:
        accept = v.warn and ctx.ask(
            f"Use the measured stroke volume {sv:.2f} mL/rev (configured {sv_cfg:g})?", False
        )
        ctx.sv_use = sv if accept else sv_cfg
    return _result(step, v)


async def _pump_step(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    if len(ctx.points) < 2:
        return _result(step, ev.Verdict(False, "no pump run to evaluate", "see stroke_volume"))
    (s1, q1, p1), (s2, q2, p2) = ctx.points[:2]
    sig = cfg.signals[cfg.control.pressure.measured]
    noise = ev.noise_sigma(ctx.rest.get(cfg.control.pressure.measured, []))
    v = ev.step_response(
        cfg.control.flow.stroke_volume_ml_per_rev, s2 - s1, q2 - q1, p2 - p1, noise, sig.scale
    )
    return _result(step, v)


async def _heater_pulse(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    c, t = cfg.control, cfg.control.temperature
    loop = asyncio.get_running_loop()
    q = _fresh(ctx, c.flow.measured, loop.time())
    if q is None or q < t.min_flow_ml_min:
        _set(ctx, t.command, 0.0)
        return _result(
            step,
            ev.Verdict(
                False,
                f"flow {q} mL/min",
                f"no heating without flow >= {t.min_flow_ml_min:g} "
                "mL/min: see the stroke_volume step",
            ),
        )
    water_sig = cfg.signals[t.water_measured]
    base = await _sample(ctx, [t.water_measured], 1.0)
    w0 = statistics.fmean(base[t.water_measured]) if base[t.water_measured] else None
    if w0 is None:
        return _result(step, ev.Verdict(False, "no water temperature", "check the water sensor"))
    noise = ev.noise_sigma(ctx.rest.get(t.water_measured, []))
    needed = max(0.2, 4.0 * noise + 2.0 * abs(water_sig.scale))
    pct = min(ctx.plan.heater_pct, t.heater_max_pct)
    _set(ctx, t.command, pct)
    start = loop.time()
    capped = ""
    recent: list[float] = []
    rise = 0.0
    try:
        while loop.time() - start < ctx.plan.heater_max_s:
            await asyncio.sleep(SAMPLE_S)
            now = loop.time()
            w = _fresh(ctx, t.water_measured, now)
            tp = _fresh(ctx, t.measured, now)
            q = _fresh(ctx, c.flow.measured, now)
            if w is None or tp is None or q is None:
                capped = "a reading went missing"
                break
            if q < t.min_flow_ml_min:
                capped = f"flow fell to {q:.0f} mL/min"
                break
            if w >= t.water_cap_c - 0.5 or tp >= t.max_c - 0.5 or w - tp >= t.max_gradient_c:
                capped = f"a cap was reached (water {w:.2f}, perfusate {tp:.2f} degC)"
                break
            recent = ([*recent, w])[-10:]
            rise = statistics.fmean(recent) - w0
            if rise >= needed and len(recent) >= 5:
                break
    finally:
        _set(ctx, t.command, 0.0)
        _set(ctx, c.flow.command, 0.0)
    return _result(step, ev.heater_rise(rise, needed, loop.time() - start, capped))


async def _bubble_reservoir(ctx: Context, step: Step) -> StepResult:
    cfg = ctx.cfg
    c = cfg.control
    verdicts: list[ev.Verdict] = []
    names = [n for n in (c.air_measured, c.reservoir_measured) if n is not None]
    got = await _sample(ctx, names, 1.0)
    if c.air_measured is not None:
        air = got[c.air_measured]
        if not air:
            verdicts.append(
                ev.Verdict(False, "bubble detector: no reading", f"check signals.{c.air_measured}")
            )
        elif any(air):
            verdicts.append(
                ev.Verdict(
                    False,
                    "bubble detector reports air",
                    "de-air the line at the detector; if it persists, check "
                    "the detector's coupling to the tubing and its polarity",
                )
            )
        else:
            verdicts.append(ev.Verdict(True, f"bubble detector: no air in {len(air)} readings"))
    if c.reservoir_measured is not None:
        level = got[c.reservoir_measured]
        low = cfg.alarms.reservoir_low_ml
        if not level:
            verdicts.append(
                ev.Verdict(False, "reservoir: no reading", f"check signals.{c.reservoir_measured}")
            )
        elif statistics.fmean(level) <= low:
            verdicts.append(
                ev.Verdict(
                    False,
                    f"reservoir {statistics.fmean(level):.0f} mL",
                    f"at or below alarms.reservoir_low_ml ({low:g} mL): fill "
                    "the reservoir, or check the level sensor's scale",
                )
            )
        else:
            verdicts.append(
                ev.Verdict(True, f"reservoir {statistics.fmean(level):.0f} mL (low alarm {low:g})")
            )
    if not verdicts:
        verdicts.append(
            ev.Verdict(
                True,
                "no bubble detector or level sensor configured",
                "a real cart needs both",
                warn=True,
            )
        )
    if ctx.ask("Test bubble / level change shown by the detectors (no: not possible)?", True):
        verdicts.append(ev.Verdict(True, f"test bubble/level change confirmed by {ctx.operator}"))
    return _result(step, _combine(verdicts), confirmed_by=ctx.operator)


async def _operator(ctx: Context, step: Step) -> StepResult:
    missing = [text for key, text in OPERATOR_ITEMS if not ctx.ask(text.capitalize() + "?", False)]
    confirmed = [key for key, text in OPERATOR_ITEMS if text not in missing]
    v = ev.Verdict(
        not missing,
        f"confirmed by {ctx.operator}: {', '.join(confirmed) or 'nothing'}",
        ("not confirmed: " + "; ".join(missing)) if missing else "",
    )
    return _result(step, v, confirmed_by=ctx.operator)


RUN = {
    "devices": _devices,
    "signals": _signals,
    "readback": _readback,
    "watchdog": _watchdog,
    "pressure_zero": _pressure_zero,
    "sensor_noise": _sensor_noise,
    "stroke_volume": _stroke_volume,
    "pump_step": _pump_step,
    "heater_pulse": _heater_pulse,
    "bubble_reservoir": _bubble_reservoir,
    "operator": _operator,
}
assert set(RUN) == {s.id for s in STEPS}, "every step has its runner"
