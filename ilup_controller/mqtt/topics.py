"""Topic names of one cart and what is published on each of them.

Every topic lives under ``<prefix>/<cart_id>/``. The publishing rules (QoS, retained, direction)
are declared once here in ``TOPIC_SPECS``: the link publishes with them and docs/topics.md is
generated from them, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from ilup_controller.mqtt.messages import Alarms, Event, GuardEvent, GuardStatus, State, Status

STATUS = "status"
STATE = "state"
ALARMS = "alarms"
EVENTS = "events"
CMD = "cmd"  # commands to the daemon, `cmd/<name>` (a later issue)

# After a (re)connect the latest state is re-sent at once only if the control loop offered it
# this recently; an older one would look current to subscribers that judge freshness by arrival.
STATE_REPUBLISH_MAX_AGE_S = 2.0


def topic(prefix: str, cart_id: str, name: str) -> str:
    """Full topic ``<prefix>/<cart_id>/<name>``; raises ValueError on an unusable part."""
    base = prefix.strip("/")
    if not base:
        raise ValueError(f"empty MQTT topic prefix {prefix!r}")
    for label, part in (("cart_id", cart_id), ("name", name)):
        if not part or part.startswith("/") or part.endswith("/"):
            raise ValueError(f"bad MQTT topic {label} {part!r}")
    for part in (base, cart_id, name):
        if any(c in part for c in "+#\0"):
            raise ValueError(f"MQTT wildcard or NUL in topic part {part!r}")
    return f"{base}/{cart_id}/{name}"


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one cart."""

    prefix: str
    cart_id: str

    def name(self, name: str) -> str:
        return topic(self.prefix, self.cart_id, name)

    @property
    def status(self) -> str:
        return self.name(STATUS)

    @property
    def state(self) -> str:
        return self.name(STATE)

    @property
    def alarms(self) -> str:
        return self.name(ALARMS)

    @property
    def events(self) -> str:
        return self.name(EVENTS)

    def cmd(self, command: str) -> str:
        return self.name(f"{CMD}/{command}")


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How one topic is used: the link publishes with these values, the doc describes them."""

    name: str
    payload: type[BaseModel]
    qos: Literal[0, 1, 2]
    retained: bool
    direction: Literal["daemon -> clients", "clients -> daemon", "guard -> clients"]
    when: str


STATUS_SPEC = TopicSpec(
    name=STATUS,
    payload=Status,
    # At-least-once is harmless here (the message is idempotent) and the status must arrive.
    qos=1,
    retained=True,
    direction="daemon -> clients",
    when=(
        "On every (re)connect with `online: true`. On a clean shutdown with `online: false`. "
        "The broker publishes the last will, `online: false`, when the daemon's connection "
        "breaks: at once if the daemon's process dies, and within 1.5 x keepalive if the "
        "daemon's host or network dies."
    ),
)

STATE_SPEC = TopicSpec(
    name=STATE,
    payload=State,
    # QoS 0: every period supersedes the last state, and the broker keeps the latest one as
    # retained. QoS 1 would make paho hold and re-send stale states after an outage and make the
    # publisher wait for PUBACKs. Consumers judge freshness by the time they receive a state.
    qos=0,
    retained=True,
    direction="daemon -> clients",
    when=(
        "Every `mqtt.state_period_s` (at least 1 Hz), timed by the MQTT link. The control tick "
        "does not set the rate. A state is sent only if the control loop offered a new one since "
        "the last publish. It is also sent at once after every (re)connect, unless it is older "
        f"than {STATE_REPUBLISH_MAX_AGE_S:g} s. If the control loop stops, no more states are "
        "published, so a stopped daemon never looks current."
    ),
)

ALARMS_SPEC = TopicSpec(
    name=ALARMS,
    payload=Alarms,
    # Retained so that a display that starts late still sees the present alarms at once.
    qos=1,
    retained=True,
    direction="daemon -> clients",
    when=(
        "Whenever an alarm starts, ends, is acknowledged or reset, or the audio pause changes. "
        "It goes through the link's bounded queue of events, so it is delivered at least once, "
        "in order, after a broker outage too."
    ),
)

EVENTS_SPEC = TopicSpec(
    name=EVENTS,
    payload=Event,
    # At-least-once: a QoS 1 publish that timed out may still arrive, so use `seq` to drop
    # duplicates.
    qos=1,
    retained=False,
    direction="daemon -> clients",
    when=(
        "One message per alarm transition or phase change. Events wait in a bounded queue "
        "(`mqtt.queue_size`) while the broker is unreachable. When the queue is full, the oldest "
        "event is dropped and counted."
    ),
)

GUARD = "guard"  # the independent safety layer, `ilup guard`
GUARD_EVENTS = "guard/events"

GUARD_SPEC = TopicSpec(
    name=GUARD,
    payload=GuardStatus,
    qos=1,
    retained=True,
    direction="guard -> clients",
    when=(
        "By `ilup guard`: every 0.5 s and at once when a latch or hazard changes. Its last "
        "will sets `online: false`. The daemon raises `guard_absent` when a configured guard's "
        "status is missing, older than `guard.status_timeout_s` or offline. Reset commands go "
        "to `guard/cmd/<user>/reset` (`GuardReset`), replies to `guard/cmd/<user>/reset/reply`."
    ),
)

GUARD_EVENTS_SPEC = TopicSpec(
    name=GUARD_EVENTS,
    payload=GuardEvent,
    qos=1,
    retained=False,
    direction="guard -> clients",
    when="By `ilup guard`: on start and stop, each latch, and each reset or refused reset.",
)

TOPIC_SPECS: tuple[TopicSpec, ...] = (
    STATUS_SPEC,
    STATE_SPEC,
    ALARMS_SPEC,
    EVENTS_SPEC,
    GUARD_SPEC,
    GUARD_EVENTS_SPEC,
)
