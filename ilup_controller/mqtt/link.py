"""The daemon's only MQTT client.

The control loop hands data over through two calls that never wait: ``offer_state`` (a slot where
the latest state wins) and ``publish_event`` (a bounded queue that drops its oldest entry when
full). Everything that touches the network runs in ``run()``: a reconnect loop around one
``aiomqtt.Client``. Inside each connection a TaskGroup runs the publishers and a receiver, and the
first MqttError in any of them ends that connection (libraries.md 3.3). A broker that is down,
hung or restarting therefore never stalls the control loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from ilup_controller.aio import raise_if_cancelling
from ilup_controller.config.models import Mqtt
from ilup_controller.mqtt.messages import State, Status
from ilup_controller.mqtt.topics import (
    EVENTS_SPEC,
    STATE_REPUBLISH_MAX_AGE_S,
    STATE_SPEC,
    STATUS_SPEC,
    Topics,
)

log = logging.getLogger("ilup.mqtt")

RECONNECT_MIN_S = 0.1
# Bounds the wait for CONNACK and for the broker's reply to DISCONNECT.
CLIENT_TIMEOUT_S = 3.0
# A publish still waiting after this long means the broker hangs: drop the connection and retry.
# A QoS 1 publish that timed out may still be delivered later (libraries.md 3.2), so events are
# at-least-once and consumers must tolerate duplicates.
PUBLISH_TIMEOUT_S = 2.0
# close() returns within this time, even when the broker is gone or hangs.
CLOSE_TIMEOUT_S = 2.0
# Share of the close budget spent on flushing queued events before the offline status.
_CLOSE_FLUSH_SHARE = 0.4
# Queued messages (alarms, events) must arrive; duplicates after a timeout are acceptable.
EVENT_QOS = EVENTS_SPEC.qos
EVENTS_IN_FLIGHT = 50  # QoS 1 publishes awaiting their PUBACK at once
# Two clients with one cart_id share one MQTT client id and knock each other off the broker.
# Once another instance is seen, reconnects wait at least this long (the storm stops), and the
# clash is reported for this long after the last evidence.
CLASH_BACKOFF_S = 10.0
CLASH_HOLD_S = 60.0


class LinkStats(NamedTuple):
    published: int  # messages the broker accepted (QoS 1) or that were written out (QoS 0)
    dropped: int  # events dropped from the full queue (a replaced state is not a drop)
    reconnects: int  # successful connections after the first one
    last_error: str | None  # why the latest failed attempt or link-down happened (kept after)
    queued: int = 0  # events waiting, including any being published and not yet acknowledged


@dataclass(frozen=True, slots=True, eq=False)
class _Event:
    topic: str
    payload: str
    retain: bool
    correlation_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message received on a subscribed topic (commands)."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None
    correlation_data: bytes | None


# Called in the receive task for every message on the subscribed topics; must not block.
IncomingHandler = Callable[[Incoming], None]


class _LinkStopped(Exception):
    """Raised inside a connection's TaskGroup once close() was asked for and status is offline."""


class MqttLink:
    """Publishes a cart's status, state and events to one broker and keeps reconnecting.

    Call ``offer_state`` and ``publish_event`` from the event loop's thread. Run ``run()`` as a
    task and end it with ``close()`` (publishes the offline status) or by cancelling the task
    (also tries to publish the offline status first). A closed link cannot be run again.
    """

    def __init__(
        self,
        cfg: Mqtt,
        cart_id: str,
        *,
        simulated: bool,
        version: str,
        subscribe: str | tuple[str, ...] | None = None,
        on_message: IncomingHandler | None = None,
    ) -> None:
        self._cfg = cfg
        self._subscribe = subscribe
        self._on_message = on_message
        self._cart_id = cart_id
        self._simulated = simulated
        self._version = version
        self.topics = Topics(cfg.topic_prefix, cart_id)
        self.client_id = f"ilup-{cart_id}"
        # Per process: tells this daemon's status from that of another client with our cart_id.
        self.instance = secrets.token_hex(6)
        self._since = datetime.now(UTC)
        self._sessions = 0  # connections made, including the current one
        self._clash = ""
        self._clash_at_s: float | None = None

        self._state: State | None = None
        self._state_version = 0
        self._state_offered_at_s = 0.0  # time.monotonic() of the latest offer
        self._published_state_version = 0

        self._events: deque[_Event] = deque()
        self._events_ready = asyncio.Event()
        self._events_drained = asyncio.Event()
        self._events_drained.set()
        self._dropping = False

        self._stop = asyncio.Event()
        self._stop_deadline_s: float | None = None
        self._run_task: asyncio.Task[None] | None = None

        self._connected = False
        self._published = 0
        self._dropped = 0
        self._connects = 0
        self._last_error: str | None = None

    # ------------------------------------------------------------------ control-loop side

    def offer_state(self, state: State) -> None:
        """Make ``state`` the one to publish next. Never waits and never raises."""
        self._state = state
        self._state_version += 1
        self._state_offered_at_s = time.monotonic()

    def publish_event(self, topic_name: str, payload: BaseModel, *, retain: bool = False) -> None:
        """Queue ``payload`` for ``<prefix>/<cart_id>/<topic_name>``. Never waits.

        When the queue already holds ``queue_size`` events, the oldest one is dropped and counted.
        Raises ValueError only for a topic name that is not valid (a programming error).
        """
        self._enqueue(_Event(self.topics.name(topic_name), payload.model_dump_json(), retain))

    def publish_to(
        self, topic: str, payload: BaseModel, *, correlation_data: bytes | None = None
    ) -> None:
        """Queue ``payload`` for an absolute ``topic`` (a command reply). Never waits."""
        self._enqueue(_Event(topic, payload.model_dump_json(), False, correlation_data))

    def _enqueue(self, event: _Event) -> None:
        if len(self._events) >= self._cfg.queue_size:
            self._events.popleft()
            self._dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "MQTT event queue full (%d events, broker %s): dropping the oldest",
                    self._cfg.queue_size,
                    self._broker,
                )
        self._events.append(event)
        self._events_ready.set()
        self._events_drained.clear()

    # ------------------------------------------------------------------ observers

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def identity_clash(self) -> str:
        """Why another client seems to use this cart's identity ("" = no recent evidence)."""
        if self._clash_at_s is None or time.monotonic() - self._clash_at_s > CLASH_HOLD_S:
            return ""
        return self._clash

    @property
    def stats(self) -> LinkStats:
        return LinkStats(
            published=self._published,
            dropped=self._dropped,
            reconnects=max(0, self._connects - 1),
            last_error=self._last_error,
            queued=len(self._events),
        )

    @property
    def _broker(self) -> str:
        return f"{self._cfg.host}:{self._cfg.port}"

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, publish and reconnect with exponential back-off until close() is called.

        Never raises, except CancelledError when the task is cancelled.
        """
        if self._run_task is not None and not self._run_task.done():
            raise RuntimeError("MqttLink.run() is already running")
        self._run_task = asyncio.current_task()
        failures = 0  # consecutive attempts that did not give a usable connection
        logged_reason: str | None = None
        try:
            while not self._stop.is_set():
                connects_before = self._connects
                reason = await self._session()
                if reason is None:
                    break  # stopped by close()
                self._last_error = reason
                if self._connects > connects_before:  # the link was up: this is a link-down
                    failures = 0
                    log.warning("MQTT link down: broker %s: %s", self._broker, reason)
                    logged_reason = reason
                elif reason != logged_reason:  # log a new reason once, not every attempt
                    log.warning(
                        "MQTT broker %s unreachable: %s (retrying, back-off up to %g s)",
                        self._broker,
                        reason,
                        self._cfg.reconnect_max_s,
                    )
                    logged_reason = reason
                delay_s = min(self._cfg.reconnect_max_s, RECONNECT_MIN_S * 2.0**failures)
                failures = min(failures + 1, 30)
                if self.identity_clash:  # each reconnect would only knock the other one off
                    delay_s = max(delay_s, CLASH_BACKOFF_S)
                # Jitter so that many carts do not hit a restarted broker at the same instant.
                await self._sleep_unless_stopped(delay_s * random.uniform(0.8, 1.0))
        finally:
            self._connected = False

    async def close(self) -> None:
        """Publish the retained offline status and disconnect. Returns within CLOSE_TIMEOUT_S."""
        start_s = time.monotonic()
        self._stop_deadline_s = start_s + CLOSE_TIMEOUT_S - 0.25  # room to cancel if needed
        self._stop.set()
        task = self._run_task
        if task is None or task.done() or task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({task}, timeout=self._stop_deadline_s - time.monotonic())
        if not done:
            log.warning(
                "MQTT link to %s did not stop within %g s; cancelling it",
                self._broker,
                CLOSE_TIMEOUT_S,
            )
            task.cancel()
            await asyncio.wait(
                {task}, timeout=max(0.0, start_s + CLOSE_TIMEOUT_S - time.monotonic())
            )

    # ------------------------------------------------------------------ one connection

    def _make_client(self) -> aiomqtt.Client:
        cfg = self._cfg
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=self.client_id,
            protocol=client_protocol(cfg),
            keepalive=cfg.keepalive_s,
            username=cfg.username,
            password=cfg.password,
            will=aiomqtt.Will(
                self.topics.status,
                self._status(online=False).model_dump_json(),
                qos=STATUS_SPEC.qos,
                retain=STATUS_SPEC.retained,
            ),
            timeout=CLIENT_TIMEOUT_S,
            tls_params=client_tls(cfg),
            max_inflight_messages=EVENTS_IN_FLIGHT,
        )
        # Up to EVENTS_IN_FLIGHT publishes wait together by design: not worth a warning each.
        client.pending_calls_threshold = EVENTS_IN_FLIGHT + 10
        return client

    def _status(self, *, online: bool) -> Status:
        return Status(
            online=online,
            cart_id=self._cart_id,
            simulated=self._simulated,
            version=self._version,
            since=self._since if online else None,
            instance=self.instance,
        )

    async def _session(self) -> str | None:
        """Run one connection. Returns None when stopped by close(), else why it ended."""
        reason = "connection ended"
        stopped = False
        try:
            client = self._make_client()  # needs the running loop: built here, not in __init__
            async with client:
                self._on_link_up()
                try:
                    # Subscribed before our own status goes out: the retained status then shows
                    # who held this identity since our last connection (see _on_own_status).
                    await client.subscribe(self.topics.status, qos=1, timeout=PUBLISH_TIMEOUT_S)
                    await self._publish(
                        client,
                        self.topics.status,
                        self._status(online=True),
                        qos=STATUS_SPEC.qos,
                        retain=STATUS_SPEC.retained,
                    )
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._receive(client))
                        tg.create_task(self._publish_states(client))
                        tg.create_task(self._publish_events(client))
                        tg.create_task(self._stop_when_asked(client))
                except asyncio.CancelledError:
                    # Cancelled without close(): still try to leave an honest retained status.
                    await self._go_offline(client, self._offline_deadline_s())
                    raise
                finally:
                    self._connected = False
        except* _LinkStopped:
            stopped = True
        except* aiomqtt.MqttError as group:
            reason = _describe(group)
        except* Exception as group:
            # A bug or an unexpected library error must not end publishing for good.
            log.error("MQTT link to %s failed unexpectedly", self._broker, exc_info=group)
            reason = _describe(group)
        return None if stopped or self._stop.is_set() else reason

    def _on_link_up(self) -> None:
        self._connected = True
        self._connects += 1
        self._sessions += 1
        log.info(
            "MQTT link up: broker %s (MQTT %s, client id %s%s)",
            self._broker,
            self._cfg.protocol,
            self.client_id,
            "" if self._connects == 1 else f", reconnect {self._connects - 1}",
        )

    async def _publish(
        self,
        client: aiomqtt.Client,
        topic: str,
        payload: BaseModel | str,
        *,
        qos: int,
        retain: bool,
        timeout_s: float = PUBLISH_TIMEOUT_S,
        correlation_data: bytes | None = None,
    ) -> None:
        data = payload if isinstance(payload, str) else payload.model_dump_json()
        properties = None
        if correlation_data is not None and self._cfg.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation_data
        await client.publish(
            topic, data, qos=qos, retain=retain, timeout=timeout_s, properties=properties
        )
        self._published += 1

    async def _receive(self, client: aiomqtt.Client) -> None:
        # Also notices a dropped connection at once: iterating raises MqttError on disconnect,
        # whereas a publisher would only notice at its next publish.
        filters = (self._subscribe,) if isinstance(self._subscribe, str) else self._subscribe or ()
        for f in filters:
            await client.subscribe(f, qos=1, timeout=PUBLISH_TIMEOUT_S)
        async for message in client.messages:
            raise_if_cancelling()  # as in _publish_states (subscribe awaits wait_for too)
            if message.topic.value == self.topics.status:
                self._on_own_status(message.payload, bool(message.retain))
                continue
            if self._on_message is None:
                continue
            props = message.properties
            payload = message.payload if isinstance(message.payload, bytes) else b""
            response = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            try:
                self._on_message(
                    Incoming(
                        message.topic.value, payload, bool(message.retain), response, correlation
                    )
                )
            except Exception:  # a bad message must not take the link down
                log.exception("MQTT message on %s could not be handled", message.topic.value)

    def _on_own_status(self, payload: object, retained: bool) -> None:
        """Another instance id on our own status topic: two clients use this cart_id.

        The one exception is the retained status found on our very first connection: it is
        from this cart's previous daemon process. Afterwards the retained status is our own
        unless someone else published it while we were away (the broker also publishes the
        will of the client it disconnects for a newcomer with the same client id).
        """
        try:
            data = json.loads(payload) if isinstance(payload, bytes | str) else None
        except ValueError:
            data = None
        other = data.get("instance") if isinstance(data, dict) else None
        if not isinstance(other, str) or other == self.instance:
            return
        if retained and self._sessions <= 1:
            return
        first = not self.identity_clash
        self._clash = (
            f"another client uses cart_id {self._cart_id} on broker {self._broker} "
            f"(instance {other}, this daemon {self.instance}, MQTT client id {self.client_id})"
        )
        self._clash_at_s = time.monotonic()
        if first:
            log.error(
                "MQTT identity clash: %s; reconnecting at most every %g s",
                self._clash,
                CLASH_BACKOFF_S,
            )

    async def _publish_states(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        period_s = self._cfg.state_period_s
        # A restarted broker (no persistence) or a late subscriber gets the current state now.
        if (
            self._state is not None
            and time.monotonic() - self._state_offered_at_s <= STATE_REPUBLISH_MAX_AGE_S
        ):
            await self._publish_latest_state(client)
        next_s = loop.time() + period_s
        while True:
            # aiomqtt's publish awaits Python 3.11's wait_for, which can drop a cancel: without
            # this the loop ran on, the session's TaskGroup waited for it, and shutdown hung.
            # (Each session's tasks are new. Not so run(): after a broker outage its pending-
            # cancel count stays at 1, left by the session's TaskGroup, so there it would end
            # the link instead of reconnecting.)
            raise_if_cancelling()
            await asyncio.sleep(max(0.0, next_s - loop.time()))
            next_s += period_s
            if next_s <= loop.time():  # overslept by a whole period: re-anchor, do not burst
                next_s = loop.time() + period_s
            if self._state_version != self._published_state_version:
                await self._publish_latest_state(client)

    async def _publish_latest_state(self, client: aiomqtt.Client) -> None:
        state = self._state
        version = self._state_version
        if state is None:
            return
        await self._publish(
            client, self.topics.state, state, qos=STATE_SPEC.qos, retain=STATE_SPEC.retained
        )
        self._published_state_version = version

    async def _publish_events(self, client: aiomqtt.Client) -> None:
        while True:
            raise_if_cancelling()  # as in _publish_states
            if not self._events:
                self._events_ready.clear()
                await self._events_ready.wait()
                continue
            # Peek, publish, then pop: an event whose publish failed stays queued for the next
            # connection. Up to EVENTS_IN_FLIGHT go out together (QoS 1 waits for each PUBACK:
            # one at a time would cap replies and events near the broker's round-trip rate).
            batch = list(itertools.islice(self._events, EVENTS_IN_FLIGHT))
            await asyncio.gather(
                *(
                    self._publish(
                        client,
                        e.topic,
                        e.payload,
                        qos=EVENT_QOS,
                        retain=e.retain,
                        correlation_data=e.correlation_data,
                    )
                    for e in batch
                )
            )
            for e in batch:  # an overflow may have dropped some meanwhile
                if self._events and self._events[0] is e:
                    self._events.popleft()
            if not self._events:
                self._events_drained.set()
            if not self._events and self._dropping:
                self._dropping = False
                log.info("MQTT event queue drained (%d events dropped so far)", self._dropped)

    async def _stop_when_asked(self, client: aiomqtt.Client) -> None:
        await self._stop.wait()
        deadline_s = self._offline_deadline_s()
        flush_until_s = time.monotonic() + _CLOSE_FLUSH_SHARE * (deadline_s - time.monotonic())
        with contextlib.suppress(TimeoutError):  # give queued events a chance to go out first
            await asyncio.wait_for(
                self._events_drained.wait(), timeout=max(0.0, flush_until_s - time.monotonic())
            )
        await self._go_offline(client, deadline_s)
        raise _LinkStopped

    def _offline_deadline_s(self) -> float:
        if self._stop.is_set() and self._stop_deadline_s is not None:
            return self._stop_deadline_s  # set by close()
        return time.monotonic() + CLOSE_TIMEOUT_S / 2  # cancelled without close()

    async def _go_offline(self, client: aiomqtt.Client, deadline_s: float) -> None:
        """Best effort before the close deadline: retained offline status, bounded DISCONNECT."""
        remaining_s = deadline_s - time.monotonic()
        if remaining_s > 0.05:
            try:
                # QoS 1: the broker has stored it before our DISCONNECT (which suppresses the will).
                await self._publish(
                    client,
                    self.topics.status,
                    self._status(online=False),
                    qos=STATUS_SPEC.qos,
                    retain=STATUS_SPEC.retained,
                    timeout_s=remaining_s * 0.6,
                )
            except Exception as exc:  # broker gone or hung: the will may still tell the truth
                log.warning("MQTT offline status not published to %s: %s", self._broker, exc)
        # Bounds the wait for the broker to close the connection in Client.__aexit__.
        client.timeout = max(0.05, deadline_s - time.monotonic())

    async def _sleep_unless_stopped(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=delay_s)


def client_protocol(cfg: Mqtt) -> aiomqtt.ProtocolVersion:
    """The MQTT version of ``mqtt.protocol``; every client of a cart file uses this."""
    return aiomqtt.ProtocolVersion.V5 if cfg.protocol == "5" else aiomqtt.ProtocolVersion.V311


def client_tls(cfg: Mqtt) -> aiomqtt.TLSParameters | None:
    """TLS settings of ``mqtt.tls`` (None: plain TCP); every client of a cart file uses this."""
    if cfg.tls is None:
        return None
    return aiomqtt.TLSParameters(
        ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file
    )


def _describe(group: BaseExceptionGroup[BaseException]) -> str:
    """A one-line reason from the first leaf exception of a group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text
