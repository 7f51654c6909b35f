"""Operator commands: check who sent them, parse, de-duplicate, rate-limit, apply to the core.

Pure: no I/O and no clock of its own. The caller passes the wall-clock time (UTC) of arrival to
``parse`` and the core's time to ``apply``. Neither method raises: every problem, including a
bug in here, becomes a rejected ``Reply`` with a specific reason.

Identity (docs/security.md). Commands arrive on ``<prefix>/<cart_id>/cmd/<user>/<name>``. The
broker authenticates every client (password or certificate) and its ACL
``pattern write <prefix>/+/cmd/%u/+`` lets a client publish commands under its own username
only; monitors are denied even that. The daemon takes ``sender`` from that topic level and never
from the payload. What a sender may do is its role in the cart file's ``operators``
(config/operators.py, commands/policy.py): a user not listed, a ``monitor``, a role without the
command's duty, the daemon's own user (``mqtt.username``) or a user that is not a plain topic
level is rejected ``unauthorized``.

Order of the checks in ``parse``, cheapest first, so that a flood costs little:

1. sender (``unauthorized``: not a username, the daemon's own user);
2. rate limit per sender, a token bucket that every message draws from, valid or not
   (``rate_limited``), except ``phase safe_stop`` and ``alarm pause_audio`` from a user
   allowed to command: they are never rate-limited and never expire (commands/policy.py);
   then the allow-list (``unauthorized``: not listed, or a role that may send nothing);
3. command name (``unknown_command``), then the payload (commands/payload.py): empty or over
   ``MAX_PAYLOAD_BYTES`` (``invalid``, the payload is not parsed), UTF-8, JSON without
   NaN/Infinity or repeated keys, at most ``MAX_JSON_DEPTH`` deep; the strict model
   (``invalid``, or ``out_of_range`` when only bounds were broken); the sender's role may
   send this command (``unauthorized``);
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

Two-step confirmation (commands/confirm.py). A safety-relevant change (commands/policy.py
``needs_confirmation``) that passes its checks is not applied: the reply says
``confirm_required`` with a token and what will change. The same sender's ``confirm`` with that
token within ``commands.confirm.window_s`` of core time applies it (checked again against the
cart as it is then). Any other command from that sender, a wrong token, another sender's
confirm naming the token, or the window passing (``expire``, called every tick) cancels it;
every step is a ``CommandEvent``.

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
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, NoReturn, cast

from pydantic import ValidationError

from ilup_controller.commands.calibration import calibrate
from ilup_controller.commands.confirm import Confirmations, Ending, Pending, new_token
from ilup_controller.commands.models import (
    COMMAND_MODELS,
    USERNAME_RE,
    AlarmCommand,
    AnyCommand,
    CalibrateCommand,
    Command,
    CommandName,
    ConfirmCommand,
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
from ilup_controller.commands.policy import (
    duty_of,
    exempt,
    exempt_payload,
    may,
    needs_confirmation,
)
from ilup_controller.config.models import CartConfig
from ilup_controller.config.operators import ROLE_DUTIES, role_of
from ilup_controller.core.cart import CartCore
from ilup_controller.core.procedure import Phase, PhaseEvent, Refusal

log = logging.getLogger(__name__)

# A command issued further ahead than this by the sender's clock is a clock fault, not a command.
MAX_CLOCK_AHEAD_S: Final = 2.0

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
    status: str  # ok | rejected | confirm_required; cancelled | expired for a pending change
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
        rate_per_s: float | None = None,
        burst: int | None = None,
        token_factory: Callable[[], str] = new_token,
    ) -> None:
        """``rate_per_s`` and ``burst`` default to the cart's ``commands`` section."""
        limits = cfg.commands
        rate_per_s = limits.rate_per_s if rate_per_s is None else rate_per_s
        burst = limits.burst if burst is None else burst
        if cache_size < 1 or not rate_per_s > 0.0 or burst < 1:
            raise ValueError("cache_size and burst must be >= 1 and rate_per_s > 0")
        self._cfg = cfg
        self.bounds = setpoint_bounds(cfg)
        self.confirmations = Confirmations(limits.confirm.window_s, token_factory)
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
            note = ""
            if not isinstance(cmd.command, ConfirmCommand):
                note = self._cancel_pending(cmd.sender, f"{cmd.name} {cmd.command.command_id}", now)
            outcome = self._decide(cmd, core, t_s, operator, now=now)
        except Exception:  # the core refused in a way we did not foresee: nothing was changed
            log.exception(
                "command apply failed: sender=%r name=%s id=%s",
                cmd.sender,
                cmd.name,
                cmd.command.command_id,
            )
            outcome, note = ("refused", "internal error while applying the command"), ""
        if isinstance(outcome, Pending):
            reply = _reply(
                cmd.command.command_id,
                cmd.name,
                now,
                None,
                f"confirm within {self.confirmations.window_s:g} s: {outcome.change}{note}",
                token=outcome.token,
                confirm_within_s=self.confirmations.window_s,
            )
        else:
            reason, detail = outcome
            reply = _reply(cmd.command.command_id, cmd.name, now, reason, detail + note)
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
        detail += self._cancel_pending(cmd.sender, f"{cmd.name} {cmd.command.command_id}", now)
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

    def expire(self, t_s: float, now_utc: datetime) -> None:
        """End every pending change whose confirmation window has passed at core time ``t_s``
        (call it every tick: the record then shows the expiry when it happens)."""
        now = _as_utc(now_utc)
        for ended in self.confirmations.expire(t_s):
            self._emit_ending(ended.pending, "expired", ended.why, now)

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
        role = role_of(self._cfg.operators, sender)
        allowed = role is not None and bool(ROLE_DUTIES.get(role))
        urgent = allowed and exempt_payload(name, payload)
        if not urgent and not self._take_token(sender, now):
            return self._answer(
                peek_command_id(payload),
                name,
                sender,
                now,
                "rate_limited",
                f"more than {self._rate_per_s:g} commands/s (burst {self._burst:g}) from {sender}",
            )
        if not allowed:
            why = (
                "the cart file lists no operators: no command is accepted"
                if self._cfg.operators is None
                else f"user {sender} is not on this cart's operator list"
                if role is None
                else f"user {sender} has role {role}, which sends no commands"
            )
            return self._answer(peek_command_id(payload), name, sender, now, "unauthorized", why)
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
        duty = duty_of(cmd)
        if not may(role, duty):
            return self._answer(
                cmd.command_id,
                name,
                sender,
                now,
                "unauthorized",
                f"user {sender} has role {role}, which may not send {_what(name, cmd)} "
                f"(it changes therapy)",
            )
        urgent = exempt(name, cmd)

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

        age_s = 0.0 if urgent else (now - cmd.issued_at).total_seconds()  # urgent: no expiry
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
            if urgent:  # never limited: applied without a duplicate-cache entry
                return ParsedCommand(cname, sender, cmd, now)
            return self._answer(
                cmd.command_id,
                name,
                sender,
                now,
                "rate_limited",
                f"{len(self._cache)} commands are still within their validity window",
            )
        # An urgent command is kept for its repeats from its arrival on, whatever its date.
        until = now + timedelta(seconds=cmd.expires_in_s) if urgent else _valid_until(cmd)
        self._cache[key] = _Entry(name, cmd, until)
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
                if exempt(name, cast(AnyCommand, command)):
                    return  # never evicts a valid entry; a repeat is harmless (safe_stop)
                self._cache.popitem(last=False)  # apply() outside parse(): best effort
            entry = self._cache[key] = _Entry(name, command, _valid_until(command))
        if entry.reply is None:
            entry.reply = reply
        self._cache.move_to_end(key)

    # ------------------------------------------------------------------ apply

    def _decide(
        self,
        cmd: ParsedCommand,
        core: CartCore,
        t_s: float,
        operator: str,
        *,
        now: datetime,
        confirmed: bool = False,
    ) -> tuple[ReasonCode | None, str] | Pending:
        """The outcome of one command: applied or rejected ``(reason, detail)``, or a change
        that waits for its confirmation (``confirmed``: it has it)."""
        c = cmd.command
        why = f"operator command {c.command_id}"

        def ask(changes: list[tuple[str, float, float]] | None = None) -> Pending | None:
            if confirmed:
                return None
            change = needs_confirmation(c, core, self._cfg, changes or [])
            if change is None:
                return None
            return self.confirmations.request(cmd.sender, cmd.name, c, change, t_s)

        if isinstance(c, SetpointCommand):
            checked = self._check_setpoint(c, core)
            if isinstance(checked, tuple):
                return checked
            pending = ask([(n, old, new) for n, _, old, new in checked])
            if pending is not None:
                return pending
            # All checked first: a command is applied whole or not at all.
            for _, attr, _, value in checked:
                setattr(core.controller, attr, value)
            return None, "; ".join(f"{n} {old:g} -> {new:g}" for n, _, old, new in checked)
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
            pending = ask()
            if pending is not None:
                return pending
            ctl.set_mode(c.control, c.output_mode, c.pump_speed_rpm)
            manual = f" at {ctl.manual_speed_rpm:g} rpm" if c.output_mode == "manual" else ""
            return None, f"mode now constant-{c.control}, {c.output_mode} output{manual}"
        if isinstance(c, PhaseCommand):
            pending = ask()
            if pending is not None:
                return pending
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
                if result.reason.startswith("not_commissioned"):
                    reason = "not_commissioned"
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
        if isinstance(c, ConfirmCommand):
            return self._settle(cmd, c, core, t_s, operator, now)
        if isinstance(c, CalibrateCommand):
            return calibrate(c, core, t_s, operator)
        _unreachable(c)

    def _settle(
        self,
        cmd: ParsedCommand,
        c: ConfirmCommand,
        core: CartCore,
        t_s: float,
        operator: str,
        now: datetime,
    ) -> tuple[ReasonCode | None, str]:
        """A confirm (or cancel) against the pending change of its sender."""
        sender, confirms = cmd.sender, self.confirmations
        by = f"confirm {c.command_id}"
        mine = confirms.pending(sender)
        owner = confirms.owner_of(c.token)
        if owner is not None and owner.sender != sender:
            self._end(owner.sender, "cancelled", f"{sender} sent a confirm naming its token", now)
            note = self._cancel_pending(sender, by, now)
            return "unauthorized", (
                f"that token belongs to {owner.label} of {owner.sender}: only {owner.sender} "
                f"may confirm it; it is cancelled ({owner.change} not applied){note}"
            )
        if mine is None:
            ended = confirms.last_ended(sender, c.token)
            if ended is None:
                return "not_confirmed", f"no change of {sender} waits for this token"
            p = ended.pending
            if ended.how == "expired":
                return "expired", (
                    f"{p.label} was {ended.why}; nothing was changed ({p.change}): send it again"
                )
            if ended.how == "confirmed":
                return "not_confirmed", f"{p.label} was confirmed already ({ended.why})"
            return "not_confirmed", f"{p.label} was {ended.why}; nothing was changed"
        if not secrets.compare_digest(mine.token, c.token):
            self._end(sender, "cancelled", f"cancelled: wrong token in {by}", now)
            return "not_confirmed", (
                f"wrong token: your pending {mine.label} is cancelled ({mine.change} not applied)"
            )
        if t_s > mine.deadline_s + 1e-9:
            window = confirms.window_s
            self._end(sender, "expired", f"not confirmed within {window:g} s", now)
            return "expired", (
                f"{mine.label} was not confirmed within {window:g} s; nothing was changed "
                f"({mine.change}): send it again"
            )
        if c.action == "cancel":
            self._end(sender, "cancelled", f"cancelled by the operator ({by})", now)
            return None, f"{mine.label} cancelled: {mine.change} not applied"
        confirms.end(sender, "confirmed", by)  # this confirm's own event records it
        held = ParsedCommand(mine.name, sender, mine.command, cmd.received_at)
        outcome = self._decide(held, core, t_s, operator, now=now, confirmed=True)
        assert not isinstance(outcome, Pending)
        reason, detail = outcome
        if reason is None:
            return None, f"{mine.label} confirmed: {detail}"
        return reason, f"{mine.label} confirmed but refused now: {detail}"

    def _cancel_pending(self, sender: str, by: str, now: datetime) -> str:
        """Any command but the matching confirm ends the sender's pending change: the text to
        add to that command's reply ("" when nothing was pending)."""
        p = self.confirmations.pending(sender)
        if p is None:
            return ""
        self._end(sender, "cancelled", f"cancelled by {by}", now)
        return f"; your pending {p.label} is cancelled ({p.change} not applied)"

    def _end(self, sender: str, how: Ending, why: str, now: datetime) -> None:
        ended = self.confirmations.end(sender, how, why)
        if ended is not None:
            self._emit_ending(ended.pending, how, why, now)

    def _emit_ending(self, p: Pending, how: str, why: str, now: datetime) -> None:
        self._push(
            CommandEvent(
                t=now,
                sender=p.sender,
                command=p.name,
                command_id=p.command.command_id,
                status=how,
                reason=None,
                detail=f"{why}; not applied: {p.change}",
            )
        )
        log.info("pending %s of %s %s: %s", p.label, p.sender, how, why)

    def _check_setpoint(
        self, c: SetpointCommand, core: CartCore
    ) -> tuple[ReasonCode, str] | list[tuple[str, str, float, float]]:
        """The changes ``(field, attribute, old, new)`` of a setpoint, or why it is refused."""
        ctl = core.controller
        b = self.bounds
        slew = self._cfg.commands.slew
        checks = (
            ("flow_ml_min", "flow_target_ml_min", c.flow_ml_min, b.flow_ml_min, slew.flow_ml_min),
            (
                "pressure_limit_mmhg",
                "pressure_limit_mmhg",
                c.pressure_limit_mmhg,
                b.pressure_limit_mmhg,
                slew.pressure_limit_mmhg,
            ),
            (
                "temperature_c",
                "temperature_target_c",
                c.temperature_c,
                b.temperature_c,
                slew.temperature_c,
            ),
        )
        changes: list[tuple[str, str, float, float]] = []
        for name, attr, value, (low, high), limit in checks:
            if value is None:
                continue
            current = float(getattr(ctl, attr))
            if not low <= value <= high:
                return "out_of_range", (
                    f"setpoint.{name}: {value:g} is outside the allowed {low:g}..{high:g}"
                )
            if abs(value - current) > limit + 1e-9:
                return "out_of_range", (
                    f"setpoint.{name}: the step {current:g} -> {value:g} is larger than the "
                    f"slew limit of {limit:g} per command (commands.slew.{name})"
                )
            changes.append((name, attr, current, value))
        return changes

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
        if reason != "duplicate":  # a repeated delivery is not another command
            detail += self._cancel_pending(sender, f"{safe_text(name)} {command_id or '?'}", now)
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
        self._push(
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

    def _push(self, event: CommandEvent) -> None:
        if len(self._events) >= MAX_EVENTS:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append(event)

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
    command_id: str | None,
    name: str,
    now: datetime,
    reason: ReasonCode | None,
    detail: str,
    *,
    token: str | None = None,
    confirm_within_s: float | None = None,
) -> Reply:
    detail = detail if len(detail) <= MAX_DETAIL_CHARS else detail[: MAX_DETAIL_CHARS - 3] + "..."
    status: Literal["ok", "rejected", "confirm_required"] = (
        "rejected" if reason is not None else "confirm_required" if token else "ok"
    )
    return Reply(
        command_id=command_id,
        command=safe_text(name, 60),
        status=status,
        reason=reason,
        detail=detail,
        t=now,
        token=token,
        confirm_within_s=confirm_within_s,
    )


def _arguments(cmd: Command) -> dict[str, Any]:
    # A confirm's token is not kept: the command id and the events tie the two steps together.
    return cmd.model_dump(mode="json", exclude=set(_ENVELOPE) | {"token"}, exclude_none=True)


def _what(name: str, cmd: AnyCommand) -> str:
    action = getattr(cmd, "action", None)
    return f"{name} {action}" if isinstance(action, str) else name


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
