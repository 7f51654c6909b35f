"""Command intake: MQTT messages -> CommandProcessor -> the core, replies back over MQTT.

Parsing, validation, duplicates, expiry and the rate limit run in the MQTT receive task as each
message arrives, so a flood is answered with rejections without touching the control tick.
Accepted commands wait in a bounded queue and are applied by the control loop at the start of
a tick, so the core stays single-threaded and deterministic. While the procedure record cannot
be written, commands that change therapy are rejected ``recorder_failed`` instead
(commands/record_gate.py). ``phase safe_stop`` and ``alarm pause_audio`` wait in a queue of their
own, applied first and whole every tick: the queue of other commands being full never holds
them back (commands/policy.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from ilup_controller.commands.models import Reply, split_command_topic
from ilup_controller.commands.policy import exempt
from ilup_controller.commands.processor import CommandEvent, CommandProcessor, ParsedCommand
from ilup_controller.commands.record_gate import needs_record, refusal_detail
from ilup_controller.config.models import CartConfig
from ilup_controller.core.cart import CartCore
from ilup_controller.mqtt.link import Incoming

log = logging.getLogger("ilup.commands")

MAX_PENDING = 64  # accepted commands waiting for a tick (the rate limit keeps this small)
MAX_PER_TICK = 16
# safe_stop / pause_audio waiting for a tick: not rate limited, so bounded only for memory
# (a hundred ticks' worth at the broker's pace); every waiting one is applied at the next tick.
MAX_URGENT = 1024

PendingReply = tuple[str, Reply, bytes | None]  # (reply topic, reply, correlation data)


class CommandIntake:
    def __init__(
        self,
        cfg: CartConfig,
        send_reply: Callable[[str, Reply, bytes | None], None],
    ) -> None:
        self._cfg = cfg
        self.processor = CommandProcessor(cfg)
        self._send_reply = send_reply
        self._pending: deque[tuple[ParsedCommand, str, bytes | None]] = deque()
        self._urgent: deque[tuple[ParsedCommand, str, bytes | None]] = deque()
        # Repeats of a command still waiting for its tick: they get its reply when it is applied.
        self._repeats: dict[tuple[str, str], list[tuple[str, bytes | None]]] = {}

    def on_message(self, msg: Incoming) -> None:
        """Runs in the MQTT receive task for every message under ``cmd/``; never raises."""
        m = self._cfg.mqtt
        where = split_command_topic(msg.topic, m.topic_prefix, self._cfg.cart_id)
        if where is None:
            return  # a reply topic or something else under cmd/: not a command
        sender, name = where
        reply_topic = self.processor.reply_topic(sender, name, msg.response_topic)
        if msg.retain:
            # A retained command would be re-applied by every restart: never accepted.
            log.warning("retained command on %s ignored", msg.topic)
            return
        now = datetime.now(UTC)
        parsed = self.processor.parse(
            name, msg.payload, now, sender, response_topic=msg.response_topic
        )
        if isinstance(parsed, Reply):
            key = (sender, parsed.command_id or "")
            if parsed.reason == "duplicate" and key in self._repeats:
                self._repeats[key].append((reply_topic, msg.correlation_data))
            else:
                self._send_reply(reply_topic, parsed, msg.correlation_data)
            return
        urgent = exempt(parsed.name, parsed.command)
        queue, bound = (self._urgent, MAX_URGENT) if urgent else (self._pending, MAX_PENDING)
        if len(queue) >= bound:
            reply = self.processor.reject(parsed, "rate_limited", "command queue full")
            self._send_reply(reply_topic, reply, msg.correlation_data)
            return
        queue.append((parsed, reply_topic, msg.correlation_data))
        self._repeats[(sender, parsed.command.command_id)] = []

    def apply_pending(
        self, core: CartCore, t_s: float, *, record_problem: str = ""
    ) -> tuple[list[PendingReply], list[CommandEvent]]:
        """Apply queued commands at tick time ``t_s``. Returns their replies, which the caller
        sends once the outcome is on disk, and every command event since the last call
        (rejections from the intake included), for the events topic and the record.
        ``record_problem``: why the record cannot be written now ("" while it can)."""
        replies: list[PendingReply] = []
        self.processor.expire(t_s, datetime.now(UTC))  # pending confirmations past their window
        batch = list(self._urgent)
        self._urgent.clear()
        batch += [self._pending.popleft() for _ in range(min(MAX_PER_TICK, len(self._pending)))]
        for parsed, topic, correlation in batch:
            if record_problem and needs_record(parsed.command):
                detail = refusal_detail(parsed.name, record_problem)
                reply = self.processor.reject(parsed, "recorder_failed", detail)
            else:
                reply = self.processor.apply(parsed, core, t_s, parsed.sender)
            log.info(
                "command %s from %s: %s %s %s",
                parsed.name,
                parsed.sender,
                reply.status,
                reply.reason or "",
                reply.detail,
            )
            replies.append((topic, reply, correlation))
            repeats = self._repeats.pop((parsed.sender, parsed.command.command_id), [])
            replies.extend((t, reply, c) for t, c in repeats)  # the first reply, again
        return replies, self.processor.drain_events()
