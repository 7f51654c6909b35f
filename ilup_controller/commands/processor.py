"""Operator commands: check who sent them, parse, de-duplicate, rate-limit, apply to the core.

Pure: no I/O and no clock of its own. The caller passes the wall-clock time (UTC) of arrival to
``parse`` and the core's time to ``apply``. Neither method raises: every problem, including a
bug in here, becomes a rejected ``Reply`` with a specific reason.

Identity (docs/security.md). Commands arrive on ``<prefix>/<cart_id>/cmd/<user>/<name>``. The
broker authenticates every client (password or certificate) and its ACL
``pattern write <prefix>/+/cmd/%u/+`` lets a client publish commands under its own username
only; monitors are denied even that. The daemon takes ``sender`` from that topic level and never
from the payload. Anyone the broker lets publish a command is an operator; commands that name
the daemon's own user (``mqtt.username``), or a user that is not a plain topic level, are
rejected ``unauthorized``.

Order of the checks in ``parse``, cheapest first, so that a flood costs little:

1. sender (``unauthorized``);
2. rate limit per sender, a token bucket that every message draws from, valid or not
   (``rate_limited``);
3. command name (``unknown_command``), then the payload (commands/payload.py): empty or over
   ``MAX_PAYLOAD_BYTES`` (``invalid``, the payload is not parsed), UTF-8, JSON without
   NaN/Infinity or repeated keys, at most ``MAX_JSON_DEPTH`` deep; the strict model
   (``invalid``, or ``out_of_range`` when only bounds were broken);
4. ``(sender, command_id)`` seen before: the same command again gets the FIRST reply and is
   never applied twice; a different command under a used id is rejected ``duplicate``;
5. sender clock more than ``MAX_CLOCK_AHEAD_S`` ahead (``invalid``; not kept for repeats, so
   a command dated years ahead holds no cache slot), older than its
   ``expires_in_s`` (``expired``), a v5 response topic outside the sender's reply space
   (``invalid``);
6. the duplicate cache full of commands still inside their validity window (``rate_limited``):
   forgetting one of those would let its replay be applied again.

``apply`` then checks the command against the cart: setpoints against bounds derived from the
configuration and against per-command slew limits (``out_of_range``), phase changes through the
procedure (``not_allowed_in_phase``, ``interlock_active``), alarm actions through the alarm
engine (``refused``). A rejected command changes nothing. Every outcome is a ``CommandEvent``
for the record; collect them with ``drain_events``.

Wiring in the daemon: subscribe to ``command_filter(prefix, cart_id)`` at QoS 1; for each
message take ``(sender, name)`` from ``split_command_topic`` (ignore other topics), call
``parse(name, payload, datetime.now(UTC), sender, response_topic=<v5 ResponseTopic>)``; call
``apply`` for a ``ParsedCommand`` in the control task, between two core steps (or ``reject``
with ``recorder_failed`` when its event cannot be recorded first); publish
``reply.model_dump_json()`` to ``reply_topic(sender, name, response_topic)`` at QoS 1, not
retained, with the command's CorrelationData copied.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NoReturn, cast

from pydantic import ValidationError

from ilup_controller.commands.models import (
    COMMAND_MODELS,
    USERNAME_RE,
    AlarmCommand,
    AnyCommand,
    Command,
    CommandName,
    MarkerCommand,
    ModeCommand,
    PhaseCommand,
    ReasonCode,
    Reply,
    SetpointCommand,
    default_reply_topic,
    response_topic_allowed,
)
from ilup_controller.commands.payload import (
    PayloadError,
    command_id_of,
    decode,
    loads,
    peek_command_id,
    safe_text,
)
from ilup_controller.config.models import CartConfig
from ilup_controller.core.cart import CartCore
from ilup_controller.core.procedure import Phase, PhaseEvent, Refusal

log = logging.getLogger(__name__)

# A command issued further ahead than this by the sender's clock is a clock fault, not a command.
MAX_CLOCK_AHEAD_S: Final = 2.0

# Slew limits: the largest change of a target that one command may make, so that a typing slip
# (5000 for 500) cannot become a step on the lung. Defaults until they move into the config.
FLOW_SLEW_ML_MIN: Final = 200.0
PRESSURE_SLEW_MMHG: Final = 5.0
TEMPERATURE_SLEW_C: Final = 1.0

# Bounds derived from the configuration (setpoint_bounds): the floor of the pressure limit and
# of the temperature target, and the distance kept from the interlocks above them.
PRESSURE_LIMIT_MIN_MMHG: Final = 5.0
PRESSURE_BELOW_STOP_MMHG: Final = 1.0
TEMPERATURE_MIN_C: Final = 30.0
TEMPERATURE_BELOW_MAX_C: Final = 0.5

MAX_DETAIL_CHARS: Final = 300
MAX_EVENTS: Final = 1000  # events kept until drained; older ones are dropped and counted
MAX_SENDERS: Final = 256  # token buckets kept; idle (full) ones are forgotten beyond this

_RANGE_ERRORS: Final = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
)
_ENVELOPE: Final = frozenset(Command.model_fields)
_PHASES: Final[dict[str, Phase]] = {
    "priming": Phase.priming,
    "perfusion": Phase.perfusion,
    "washout": Phase.washout,
    "complete": Phase.complete,
    "safe_stop": Phase.safe_stop,
}


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """A well-formed, fresh, first-seen command from an authenticated sender, ready to apply."""

    name: CommandName
    sender: str
    command: AnyCommand
    received_at: datetime  # UTC


@dataclass(frozen=True, slots=True)
class CommandEvent:
    """One command and its outcome, for the procedure record and the events topic."""

    t: datetime  # UTC
    sender: str
    command: str
    command_id: str | None
    status: str  # ok | rejected
    reason: str | None
    detail: str
    repeated: bool = False  # a repeated delivery, answered with the first reply, not applied
    arguments: dict[str, Any] = field(default_factory=dict)  # the command's own fields

    @property
    def kind(self) -> str:
        """'marker' for an accepted marker, else 'command'."""
        # A repeated delivery is not a second marker: it is a command answered again.
        ok_marker = self.command == "marker" and self.status == "ok" and not self.repeated
        return "marker" if ok_marker else "command"

    @property
    def message(self) -> str:
        if self.kind == "marker":
            return str(self.arguments.get("text", ""))
        head = f"{self.command} {self.command_id or '?'} from {self.sender}: {self.status}"
        if self.repeated:
            head += " (repeated delivery, not applied again)"
        elif self.reason is not None:
            head += f" ({self.reason})"
        return f"{head}: {self.detail}" if self.detail else head


@dataclass(frozen=True, slots=True)
class SetpointBounds:
    """Allowed range of each target, derived from the cart configuration."""

    flow_ml_min: tuple[float, float]
    pressure_limit_mmhg: tuple[float, float]
    temperature_c: tuple[float, float]


def setpoint_bounds(cfg: CartConfig) -> SetpointBounds:
    c = cfg.control
    return SetpointBounds(
        flow_ml_min=(0.0, c.flow.speed_max_rpm * c.flow.stroke_volume_ml_per_rev),
        # The limiter regulates at limit - margin: a limit at or below the margin means 0 flow.
        pressure_limit_mmhg=(
            max(PRESSURE_LIMIT_MIN_MMHG, c.pressure.margin_mmhg + 1.0),
            c.pressure.stop_mmhg - PRESSURE_BELOW_STOP_MMHG,
        ),
        temperature_c=(TEMPERATURE_MIN_C, c.temperature.max_c - TEMPERATURE_BELOW_MAX_C),
    )


@dataclass(slots=True)
class _Entry:
    name: str
    command: Command
    valid_until: datetime  # after this a repeat is refused as expired anyway
    reply: Reply | None = None  # None while parsed and not yet applied


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last_s: float
    limited: bool = False  # log the start of a limited episode once, not every message


class CommandProcessor:
    """Parses and applies operator commands for one cart. See the module docstring."""

    def __init__(
        self,
        cfg: CartConfig,
        *,
        cache_size: int = 1024,
        rate_per_s: float = 5.0,
        burst: int = 10,
    ) -> None:
        if cache_size < 1 or not rate_per_s > 0.0 or burst < 1:
            raise ValueError("cache_size and burst must be >= 1 and rate_per_s > 0")
        self._cfg = cfg
        self.bounds = setpoint_bounds(cfg)
        self._cache_size = cache_size
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._buckets: dict[str, _Bucket] = {}
        self._events: deque[CommandEvent] = deque()
        self.events_dropped = 0

    # ------------------------------------------------------------------ public API

    def parse(
        self,
        name: str,
        payload: bytes,
        now_utc: datetime,
        sender: str,
        *,
        response_topic: str | None = None,
    ) -> ParsedCommand | Reply:
        """Check one received command; a ``Reply`` means it is answered already (rejected, or a
        repeat of a command answered before). ``response_topic``: the MQTT v5 property, if any.
        """
        now = _as_utc(now_utc)
        try:
            return self._parse(name, payload, now, sender, response_topic)
        except Exception:  # a bug here must never take the command reader down
            log.exception("command parse failed: sender=%r name=%r", sender, name)
            return self._answer(
                None,
                str(name),
                str(sender)[:64],
                now,
                "invalid",
                "internal error while parsing the command",
            )

    def apply(
        self,
        cmd: ParsedCommand,
        core: CartCore,
        t_s: float,
        operator: str,
        *,
        now_utc: datetime | None = None,
    ) -> Reply:
        """Apply a parsed command to the core at core time ``t_s`` on behalf of ``operator``.

        A command already answered (same sender and id) is not applied again: its first reply
        is returned. ``now_utc`` stamps the reply (default: the command's arrival time).
        """
        now = cmd.received_at if now_utc is None else _as_utc(now_utc)
        key = (cmd.sender, cmd.command.command_id)
        try:
            entry = self._cache.get(key)
            if entry is not None and entry.reply is not None:
                self._emit(entry.reply, cmd.sender, now, repeated=True)
                return entry.reply
            reason, detail = self._decide(cmd, core, t_s, operator)
        except Exception:  # the core refused in a way we did not foresee: nothing was changed
            log.exception(
                "command apply failed: sender=%r name=%s id=%s",
                cmd.sender,
                cmd.name,
                cmd.command.command_id,
            )
            reason, detail = "refused", "internal error while applying the command"
        reply = _reply(cmd.command.command_id, cmd.name, now, reason, detail)
        self._record(key, cmd.name, cmd.command, reply, now)
        self._emit(reply, cmd.sender, now, arguments=_arguments(cmd.command))
        self._log(reply, cmd.sender)
        return reply

    def reject(
        self,
        cmd: ParsedCommand,
        reason: ReasonCode,
        detail: str,
        *,
        now_utc: datetime | None = None,
    ) -> Reply:
        """Answer a parsed command without applying it, e.g. ``recorder_failed`` when its event
        cannot be recorded first. A repeat of the command then gets this reply."""
        now = cmd.received_at if now_utc is None else _as_utc(now_utc)
        key = (cmd.sender, cmd.command.command_id)
        entry = self._cache.get(key)
        if entry is not None and entry.reply is not None:
            self._emit(entry.reply, cmd.sender, now, repeated=True)
            return entry.reply
        reply = _reply(cmd.command.command_id, cmd.name, now, reason, detail)
        self._record(key, cmd.name, cmd.command, reply, now)
        self._emit(reply, cmd.sender, now, arguments=_arguments(cmd.command))
        self._log(reply, cmd.sender)
        return reply

    def reply_topic(self, sender: str, name: str, response_topic: str | None = None) -> str:
        """Where to publish the reply: the v5 response topic when it lies in the sender's own
        reply space (commands/models.response_topic_allowed), else ``cmd/<user>/<name>/reply``.
        """
        prefix, cart_id = self._cfg.mqtt.topic_prefix, self._cfg.cart_id
        if response_topic is not None and response_topic_allowed(
            response_topic, prefix, cart_id, sender
        ):
            return response_topic
        return default_reply_topic(prefix, cart_id, sender, name)

    def drain_events(self) -> list[CommandEvent]:
        """Command events since the last call, oldest first: one for every message ``parse``
        answered itself, and one for every ``apply`` or ``reject``. At most ``MAX_EVENTS`` are
        kept between calls (older ones are dropped and counted in ``events_dropped``)."""
        events = list(self._events)
        self._events.clear()
        return events

    # ------------------------------------------------------------------ parse

    def _parse(
        self, name: str, payload: bytes, now: datetime, sender: str, response_topic: str | None
    ) -> ParsedCommand | Reply:
        if not isinstance(sender, str) or not USERNAME_RE.match(sender):
            return self._answer(
                None, name, str(sender)[:64], now, "unauthorized", "sender is not a valid username"
            )
        if sender == self._cfg.mqtt.username:
            return self._answer(
                None, name, sender, now, "unauthorized", "the daemon's own user sends no commands"
            )
        if not isinstance(payload, bytes | bytearray):
            return self._answer(None, name, sender, now, "invalid", "payload is not bytes")
        if not self._take_token(sender, now):
            return self._answer(
                peek_command_id(payload),
                name,
                sender,
                now,
                "rate_limited",
                f"more than {self._rate_per_s:g} commands/s (burst {self._burst:g}) from {sender}",
            )
        model = COMMAND_MODELS.get(name)
        if model is None:
            return self._answer(
                peek_command_id(payload),
                name,
                sender,
                now,
                "unknown_command",
                f"unknown command {safe_text(name)!r}; known: {', '.join(COMMAND_MODELS)}",
            )
        cname = cast(CommandName, name)
        try:
            text = decode(bytes(payload))
            obj = loads(text)
        except PayloadError as exc:
            return self._answer(None, name, sender, now, exc.reason, f"{name}: {exc.detail}")
        peeked = command_id_of(obj)
        try:
            cmd = cast(AnyCommand, model.model_validate_json(text))
        except ValidationError as exc:
            reason, detail = _describe(name, exc)
            return self._answer(peeked, name, sender, now, reason, detail)

        key = (sender, cmd.command_id)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            if entry.name == name and entry.command == cmd:
                if entry.reply is not None:
                    self._emit(entry.reply, sender, now, repeated=True)
                    return entry.reply
                return self._answer(
                    cmd.command_id,
                    name,
                    sender,
                    now,
                    "duplicate",
                    "already received and being applied; it is applied once",
                )
            return self._answer(
                cmd.command_id,
                name,
                sender,
                now,
                "duplicate",
                f"command_id {cmd.command_id!r} was already used for a different command",
            )

        age_s = (now - cmd.issued_at).total_seconds()
        if age_s < -MAX_CLOCK_AHEAD_S:
            # Not kept for its repeats (they are refused the same way): dated years ahead, it
            # would hold a cache slot for years, and a few such entries refuse every command.
            return self._answer(
                cmd.command_id,
                name,
                sender,
                now,
                "invalid",
                f"{name}.issued_at is {-age_s:.1f} s in the future (more than "
                f"{MAX_CLOCK_AHEAD_S:g} s): check the sender's clock",
            )
        rejection: tuple[ReasonCode, str] | None = None
        if age_s > cmd.expires_in_s:
            rejection = (
                "expired",
                f"issued {age_s:.1f} s ago; it expired after expires_in_s = {cmd.expires_in_s:g} s",
            )
        elif response_topic is not None and not response_topic_allowed(
            response_topic, self._cfg.mqtt.topic_prefix, self._cfg.cart_id, sender
        ):
            rejection = (
                "invalid",
                "response topic not allowed: use one at least two levels below "
                f"{self._cfg.mqtt.topic_prefix}/{self._cfg.cart_id}/cmd/{sender}/",
            )
        if rejection is not None:
            reply = self._answer(cmd.command_id, name, sender, now, *rejection)
            self._record(key, name, cmd, reply, now)
            return reply
        if not self._make_room(now):
            return self._answer(
                cmd.command_id,
                name,
                sender,
                now,
                "rate_limited",
                f"{len(self._cache)} commands are still within their validity window",
            )
        self._cache[key] = _Entry(name, cmd, _valid_until(cmd))
        return ParsedCommand(cname, sender, cmd, now)

    def _take_token(self, sender: str, now: datetime) -> bool:
        now_s = now.timestamp()
        bucket = self._buckets.get(sender)
        if bucket is None:
            if len(self._buckets) >= MAX_SENDERS:
                self._forget_idle_buckets(now_s)
            bucket = self._buckets[sender] = _Bucket(self._burst, now_s)
        # A wall clock that steps back refills nothing (and does not go negative).
        elapsed_s = max(0.0, now_s - bucket.last_s)
        bucket.tokens = min(self._burst, bucket.tokens + elapsed_s * self._rate_per_s)
        bucket.last_s = max(bucket.last_s, now_s)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            if bucket.limited:
                bucket.limited = False
                log.info("commands from %s no longer rate limited", sender)
            return True
        if not bucket.limited:
            bucket.limited = True
            log.warning(
                "commands from %s rate limited (%g/s, burst %g)",
                sender,
                self._rate_per_s,
                self._burst,
            )
        return False

    def _forget_idle_buckets(self, now_s: float) -> None:
        for sender, b in list(self._buckets.items()):
            if b.tokens + (now_s - b.last_s) * self._rate_per_s >= self._burst:
                del self._buckets[sender]

    # ------------------------------------------------------------------ duplicate cache

    def _make_room(self, now: datetime) -> bool:
        """Room for one more entry. Only entries past their validity window are evicted: one
        still valid, if forgotten, could be replayed and applied a second time."""
        if len(self._cache) < self._cache_size:
            return True
        for key, entry in self._cache.items():  # least recently used first
            if entry.valid_until < now:
                del self._cache[key]
                return True
        return False

    def _record(
        self, key: tuple[str, str], name: str, command: Command, reply: Reply, now: datetime
    ) -> None:
        entry = self._cache.get(key)
        if entry is None:
            if not self._make_room(now):
                self._cache.popitem(last=False)  # apply() outside parse(): best effort
            entry = self._cache[key] = _Entry(name, command, _valid_until(command))
        if entry.reply is None:
            entry.reply = reply
        self._cache.move_to_end(key)

    # ------------------------------------------------------------------ apply

    def _decide(
        self, cmd: ParsedCommand, core: CartCore, t_s: float, operator: str
    ) -> tuple[ReasonCode | None, str]:
        c = cmd.command
        why = f"operator command {c.command_id}"
        if isinstance(c, SetpointCommand):
            return self._setpoint(c, core)
        if isinstance(c, ModeCommand):
            ctl = core.controller
            if (
                c.output_mode == "manual"
                and c.pump_speed_rpm is not None
                and not (0.0 <= c.pump_speed_rpm <= self._cfg.control.flow.speed_max_rpm)
            ):
                return "out_of_range", (
                    f"mode.pump_speed_rpm: {c.pump_speed_rpm:g} outside 0.."
                    f"{self._cfg.control.flow.speed_max_rpm:g} rpm"
                )
            ctl.set_mode(c.control, c.output_mode, c.pump_speed_rpm)
            manual = f" at {ctl.manual_speed_rpm:g} rpm" if c.output_mode == "manual" else ""
            return None, f"mode now constant-{c.control}, {c.output_mode} output{manual}"
        if isinstance(c, PhaseCommand):
            before = core.procedure.phase
            result: PhaseEvent | Refusal = (
                core.resume(t_s, operator)
                if c.action == "resume"
                else core.request_phase(_PHASES[c.action], t_s, why, operator)
            )
            if isinstance(result, Refusal):
                reason: ReasonCode = (
                    "interlock_active" if "interlock" in result.reason else "not_allowed_in_phase"
                )
                return reason, f"phase {c.action} in {before}: {result.reason}"
            return None, f"phase {result.from_phase} -> {result.to_phase}"
        if isinstance(c, AlarmCommand):
            if c.action == "pause_audio":
                verdict = core.pause_audio(t_s, operator)
                target = "all present alarms"
            elif c.action == "acknowledge":
                target = str(c.alarm_id)
                verdict = core.acknowledge(target, t_s, operator)
            else:
                target = str(c.alarm_id)
                verdict = core.reset(target, t_s, operator)
            if not verdict.ok:
                return "refused", f"alarm {c.action} {target}: {verdict.reason}"
            return None, f"alarm {c.action}: {target}"
        if isinstance(c, MarkerCommand):
            return None, f"marker recorded: {c.text}"
        _unreachable(c)

    def _setpoint(self, c: SetpointCommand, core: CartCore) -> tuple[ReasonCode | None, str]:
        ctl = core.controller
        b = self.bounds
        checks = (
            ("flow_ml_min", "flow_target_ml_min", c.flow_ml_min, b.flow_ml_min, FLOW_SLEW_ML_MIN),
            (
                "pressure_limit_mmhg",
                "pressure_limit_mmhg",
                c.pressure_limit_mmhg,
                b.pressure_limit_mmhg,
                PRESSURE_SLEW_MMHG,
            ),
            (
                "temperature_c",
                "temperature_target_c",
                c.temperature_c,
                b.temperature_c,
                TEMPERATURE_SLEW_C,
            ),
        )
        changes: list[tuple[str, str, float, float]] = []
        for name, attr, value, (low, high), slew in checks:
            if value is None:
                continue
            current = float(getattr(ctl, attr))
            if not low <= value <= high:
                return "out_of_range", (
                    f"setpoint.{name}: {value:g} is outside the allowed {low:g}..{high:g}"
                )
            if abs(value - current) > slew + 1e-9:
                return "out_of_range", (
                    f"setpoint.{name}: the step {current:g} -> {value:g} is larger than the "
                    f"slew limit of {slew:g} per command"
                )
            changes.append((name, attr, current, value))
        # All checked first: a command is applied whole or not at all.
        for _, attr, _, value in changes:
            setattr(ctl, attr, value)
        return None, "; ".join(f"{n} {old:g} -> {new:g}" for n, _, old, new in changes)

    # ------------------------------------------------------------------ replies and events

    def _answer(
        self,
        command_id: str | None,
        name: str,
        sender: str,
        now: datetime,
        reason: ReasonCode,
        detail: str,
    ) -> Reply:
        reply = _reply(command_id, name, now, reason, detail)
        self._emit(reply, sender, now)
        self._log(reply, sender)
        return reply

    def _emit(
        self,
        reply: Reply,
        sender: str,
        t: datetime,
        *,
        repeated: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        if len(self._events) >= MAX_EVENTS:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append(
            CommandEvent(
                t=t,
                sender=sender,
                command=reply.command,
                command_id=reply.command_id,
                status=reply.status,
                reason=reply.reason,
                detail=reply.detail,
                repeated=repeated,
                arguments=arguments or {},
            )
        )

    @staticmethod
    def _log(reply: Reply, sender: str) -> None:
        if reply.reason == "rate_limited":
            return  # logged once per episode by the bucket
        log.info(
            "command %s id=%s sender=%s: %s%s: %s",
            reply.command,
            reply.command_id,
            sender,
            reply.status,
            f" ({reply.reason})" if reply.reason else "",
            reply.detail,
        )


# --------------------------------------------------------------------------- helpers


def _unreachable(value: NoReturn) -> NoReturn:
    raise AssertionError(f"unhandled command {value!r}")


def _as_utc(t: datetime) -> datetime:
    """UTC; a naive time is taken as UTC already."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _valid_until(cmd: Command) -> datetime:
    try:
        return cmd.issued_at + timedelta(seconds=cmd.expires_in_s)
    except OverflowError:  # near datetime.max; parse() refuses such a command before this
        return datetime.max.replace(tzinfo=UTC)


def _reply(
    command_id: str | None, name: str, now: datetime, reason: ReasonCode | None, detail: str
) -> Reply:
    detail = detail if len(detail) <= MAX_DETAIL_CHARS else detail[: MAX_DETAIL_CHARS - 3] + "..."
    return Reply(
        command_id=command_id,
        command=safe_text(name, 60),
        status="ok" if reason is None else "rejected",
        reason=reason,
        detail=detail,
        t=now,
    )


def _arguments(cmd: Command) -> dict[str, Any]:
    return cmd.model_dump(mode="json", exclude=set(_ENVELOPE), exclude_none=True)


def _describe(name: str, exc: ValidationError) -> tuple[ReasonCode, str]:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts: list[str] = []
    for err in errors[:3]:
        loc = ".".join(safe_text(str(p)) for p in err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "required field missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{name}.{loc}: {msg}" if loc else f"{name}: {msg}")
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more error(s)")
    only_bounds = all(err["type"] in _RANGE_ERRORS for err in errors)
    return ("out_of_range" if only_bounds else "invalid"), "; ".join(parts)
