"""Live terminal view of one cart (``ilup watch`` and the demo): reads state and status over MQTT.

``render_state`` is pure and makes one frame. ``watch`` subscribes, follows broker outages by
itself and redraws. A state that is too old is shown as STALE in red and never as current.
A retained state whose age cannot be known counts as too old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiomqtt
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ilup_controller.aio import raise_if_cancelling
from ilup_controller.mqtt.messages import GuardStatus, State, Status, drug_timer_paused
from ilup_controller.mqtt.topics import GUARD, Topics

log = logging.getLogger(__name__)

STALE_AFTER_S = 3.0
# `once`: how long to wait for a live state (the daemon publishes at least once a second).
ONCE_WAIT_S = 3.0
_RECONNECT_MIN_S = 0.2
_RECONNECT_MAX_S = 2.0
_NO_VALUE = "-"


# --------------------------------------------------------------------------- rendering


def _num(value: float | None, digits: int, *, stale: bool, missing: str = "no reading") -> Text:
    if value is None:
        return Text(missing, style="red" if stale else "yellow")
    text = f"{value:.{digits}f}"
    return Text(f"{text} STALE", style="red") if stale else Text(text, style="bold")


def _ref(value: float | None, digits: int, *, stale: bool) -> Text:
    """A setpoint, target or command: plain, or dimmed red when the state is stale."""
    if value is None:
        return Text(_NO_VALUE, style="dim")
    return Text(f"{value:.{digits}f}", style="dim red" if stale else "")


def _minutes(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60}:{whole % 60:02d} min"


def _detuned(rate_integral_scale: float) -> str:
    """The rewarming loop slowed its integral after bursts of warming (core/rewarm.py)."""
    if rate_integral_scale >= 1.0:
        return ""
    return f"    rewarm integral x{rate_integral_scale:g} (warming came in bursts)"


def _status_line(status: Status | None) -> Text:
    if status is None:
        return Text("daemon: status unknown (none received)", style="yellow")
    if not status.online:
        return Text(" DAEMON OFFLINE ", style="bold white on red")
    parts = ["daemon online"]
    if status.since is not None:
        parts.append(f"since {status.since:%Y-%m-%d %H:%M:%S} UTC")
    if status.version:
        parts.append(f"v{status.version}")
    if status.simulated:
        parts.append("(simulated)")
    return Text(" ".join(parts), style="green")


def _guard_line(guard: GuardStatus) -> Text:
    """The independent safety guard: online, how it stops each actuator, what it holds off."""
    if not guard.online:
        return Text("guard: OFFLINE (second safety layer not running)", style="bold red")
    forms = ", ".join(f"{a} by {f}" for a, f in sorted(guard.form.items()))
    if guard.latched:
        held = "; ".join(f"{a} HELD OFF: {why}" for a, why in sorted(guard.latched.items()))
        return Text(f"guard: {held}", style="bold white on red")
    return Text(f"guard: watching ({forms})", style="green")


def _broker_line(broker_ok: bool) -> Text:
    if broker_ok:
        return Text("broker: connected", style="green")
    return Text(" BROKER DISCONNECTED ", style="bold white on red")


def _age_line(state: State, age_s: float | None, stale: bool) -> Text:
    when = f"seq {state.seq}, tick at {state.t:%H:%M:%S} UTC"
    if age_s is None:
        return Text(f"STALE: retained state of unknown age ({when}); not current", "bold red")
    if stale:
        return Text(f"STALE: no new state for {age_s:.1f} s ({when}); not current", "bold red")
    return Text(f"state age {age_s:.1f} s ({when})", style="green")


TREND_POINTS = 40  # live states kept per value for the sparklines
_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None]) -> str:
    """One character per value, scaled to the window's range; a gap (missing value) is a space."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    span = hi - lo
    return "".join(
        " "
        if v is None
        else _BLOCKS[0 if span == 0 else min(len(_BLOCKS) - 1, int((v - lo) / span * len(_BLOCKS)))]
        for v in values
    )


def trend_of(history: Sequence[State]) -> dict[str, str]:
    return {
        "flow": sparkline([s.measured.flow_ml_min for s in history]),
        "pressure": sparkline([s.measured.pressure_mmhg for s in history]),
        "temperature": sparkline([s.measured.temperature_c for s in history]),
    }


def _values_table(state: State, stale: bool, trend: dict[str, str] | None = None) -> Table:
    m, tg, out, lp = state.measured, state.targets, state.outputs, state.loop
    trend = trend or {}
    table = Table(expand=False, pad_edge=False, box=None, padding=(0, 2))
    table.add_column("")
    table.add_column("measured", justify="right")
    table.add_column("setpoint/command", justify="right")
    table.add_column("target/limit", justify="right")
    table.add_column("unit")
    table.add_column("trend", style="dim red" if stale else "cyan", no_wrap=True)
    pressure = _num(m.pressure_mmhg, 1, stale=stale)
    if not stale and m.pressure_mmhg is not None and m.pressure_mmhg >= tg.pressure_limit_mmhg:
        pressure.stylize("bold white on red")
    table.add_row(
        "Flow",
        _num(m.flow_ml_min, 0, stale=stale),
        _ref(tg.flow_ramped_ml_min, 0, stale=stale),
        _ref(tg.flow_ml_min, 0, stale=stale),
        "mL/min",
        trend.get("flow", ""),
    )
    table.add_row(
        "PA pressure",
        pressure,
        Text(_NO_VALUE, style="dim"),
        _ref(tg.pressure_limit_mmhg, 1, stale=stale),
        "mmHg",
        trend.get("pressure", ""),
    )
    table.add_row(
        "Perfusate temp",
        _num(m.temperature_c, 2, stale=stale),
        _ref(tg.temperature_ramped_c, 2, stale=stale),
        _ref(tg.temperature_c, 2, stale=stale),
        "degC",
        trend.get("temperature", ""),
    )
    table.add_row(
        "Heater water",
        _num(m.water_temperature_c, 2, stale=stale, missing=_NO_VALUE),
        _ref(lp.water_setpoint_c, 2, stale=stale),
        Text(_NO_VALUE, style="dim"),
        "degC",
    )
    table.add_row(
        "Pump speed",
        _num(m.pump_speed_rpm, 1, stale=stale, missing=_NO_VALUE),
        _ref(out.pump_speed_rpm, 1, stale=stale),
        Text(_NO_VALUE, style="dim"),
        "rpm",
    )
    table.add_row(
        "Heater power",
        Text(_NO_VALUE, style="dim"),
        _ref(out.heater_pct, 0, stale=stale),
        Text(_NO_VALUE, style="dim"),
        "%",
    )
    return table


def render_state(
    state: State | None,
    status: Status | None,
    now_s: float,
    received_at_s: float | None,
    broker_ok: bool,
    *,
    detail: str | None = None,
    trend: dict[str, str] | None = None,
    guard: GuardStatus | None = None,
) -> RenderableType:
    """One frame of the view. ``now_s`` and ``received_at_s`` are on the same monotonic clock.

    ``received_at_s`` is None when the state's age is unknown (a retained message from before
    we subscribed): such a state is STALE until a live one arrives.
    """
    lines: list[RenderableType] = [_broker_line(broker_ok), _status_line(status)]
    cart_id = state.cart_id if state is not None else status.cart_id if status else "?"
    if state is None:
        lines.append(Text("No state received yet.", style="yellow"))
        stale = True
        alarm = not broker_ok or (status is not None and not status.online)
    else:
        age_s = None if received_at_s is None else max(0.0, now_s - received_at_s)
        stale = age_s is None or age_s > STALE_AFTER_S
        lines.append(_age_line(state, age_s, stale))
        lines.append(
            Text.assemble(
                ("phase ", ""),
                (state.phase, "bold red" if stale else "bold cyan"),
                ("   simulated" if state.simulated else "", "magenta"),
            )
        )
        lines.append(_values_table(state, stale, trend))
        lines.append(
            Text(
                f"pump limited by: {state.loop.pump_limited_by}    "
                f"heater limited by: {state.loop.heater_limited_by}"
                + _detuned(state.loop.rate_integral_scale),
                style="dim red" if stale else "",
            )
        )
        if state.active_alarms:
            lines.append(
                Text("ALARMS: " + ", ".join(state.active_alarms), style="bold white on red")
            )
        else:
            lines.append(Text("alarms: none", style="dim red" if stale else "green"))
        drug = state.drug_phase
        paused = drug_timer_paused(state.phase, drug.remaining_s, drug.counting)
        lines.append(
            Text(
                f"drug phase: {_minutes(drug.elapsed_s)} at target, "
                f"{_minutes(drug.remaining_s)} remaining"
                + (" (PAUSED: off target)" if paused else ""),
                style="dim red" if stale else ("bold yellow" if paused else ""),
            )
        )
        lines.append(
            Text(
                f"tick {state.timing.tick_period_s * 1000:.0f} ms, ticks {state.timing.ticks}, "
                f"overruns {state.timing.overruns}",
                style="dim",
            )
        )
        alarm = stale or bool(state.active_alarms) or not broker_ok
        alarm = alarm or (status is not None and not status.online)
    if guard is not None:
        lines.append(_guard_line(guard))
        alarm = alarm or not guard.online or bool(guard.latched)
    if detail:
        lines.append(Text(detail, style="yellow"))
    border = "red" if alarm else ("yellow" if state is None else "green")
    return Panel(
        Group(*lines),
        title=f"ILuP cart {cart_id}" + ("  [STALE]" if stale and state is not None else ""),
        border_style=border,
        expand=False,
    )


# --------------------------------------------------------------------------- MQTT side


@dataclass
class _Latest:
    """What the subscriber saw last; read by the renderer."""

    state: State | None = None
    status: Status | None = None
    guard: GuardStatus | None = None
    received_at_s: float | None = None
    broker_ok: bool = False
    detail: str | None = None
    live_state: asyncio.Event = field(default_factory=asyncio.Event)  # set by a non-retained state
    history: deque[State] = field(default_factory=lambda: deque(maxlen=TREND_POINTS))

    def take(self, topics: Topics, message: aiomqtt.Message, now_s: float) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | str):
            return
        topic = message.topic.value
        try:
            if topic == topics.state:
                state = State.model_validate_json(payload)
                if not message.retain:
                    self.received_at_s = now_s
                    self.live_state.set()
                    self.history.append(state)
                elif self.state is None or (state.seq, state.t) != (self.state.seq, self.state.t):
                    self.received_at_s = None  # retained from before we subscribed: age unknown
                self.state = state
            elif topic == topics.status:
                self.status = Status.model_validate_json(payload)
            elif topic == topics.name(GUARD):
                self.guard = GuardStatus.model_validate_json(payload)
        except ValidationError as exc:
            # Keep the last good message (it turns STALE), and say why nothing newer is shown.
            self.detail = f"ignored a bad payload on {topic}: {exc.error_count()} error(s)"


async def _follow(
    latest: _Latest,
    topics: Topics,
    host: str,
    port: int,
    protocol: str,
    username: str | None,
    password: str | None,
) -> None:
    """Subscribe to state and status, reconnecting by itself; runs until cancelled."""
    delay_s = _RECONNECT_MIN_S
    version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
    identifier = f"ilup-watch-{os.getpid()}-{secrets.token_hex(3)}"
    while True:
        try:
            client = aiomqtt.Client(
                host,
                port,
                identifier=identifier,
                protocol=version,
                username=username,
                password=password,
                keepalive=5,
                timeout=3,
            )
            async with client:
                await client.subscribe(
                    [(topics.state, 0), (topics.status, 1), (topics.name(GUARD), 1)]
                )
                latest.broker_ok = True
                latest.detail = None
                delay_s = _RECONNECT_MIN_S
                async for message in client.messages:
                    raise_if_cancelling()  # one swallowed while connecting (aio.py)
                    latest.take(topics, message, time.monotonic())
        except aiomqtt.MqttError as exc:
            latest.detail = f"broker {host}:{port}: {exc}"
        finally:
            latest.broker_ok = False
        raise_if_cancelling()  # leaving on a cancel can raise MqttError instead (aio.py)
        await asyncio.sleep(delay_s)
        delay_s = min(_RECONNECT_MAX_S, delay_s * 2)


def _frame(latest: _Latest) -> RenderableType:
    return render_state(
        latest.state,
        latest.status,
        time.monotonic(),
        latest.received_at_s,
        latest.broker_ok,
        detail=latest.detail,
        trend=trend_of(latest.history),
        guard=latest.guard,
    )


async def watch(
    host: str,
    port: int,
    prefix: str,
    cart_id: str,
    *,
    protocol: str = "5",
    username: str | None = None,
    password: str | None = None,
    refresh_s: float = 0.5,
    once: bool = False,
) -> int:
    """Show the cart live until Ctrl-C (then return 0).

    With ``once``, wait up to ONCE_WAIT_S for a live state, print one frame and return 0 if
    a current state was shown, else 1.
    """
    topics = Topics(prefix, cart_id)
    latest = _Latest()
    console = Console()
    follower = asyncio.create_task(
        _follow(latest, topics, host, port, protocol, username, password), name="watch-mqtt"
    )
    try:
        if once:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(latest.live_state.wait(), timeout=ONCE_WAIT_S)
            console.print(_frame(latest))
            fresh = latest.received_at_s is not None and (
                time.monotonic() - latest.received_at_s <= STALE_AFTER_S
            )
            return 0 if fresh else 1
        with Live(_frame(latest), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(refresh_s)
                live.update(_frame(latest), refresh=True)
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 0
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
