"""Alarm engine with IEC 60601-1-8 semantics, driven by the catalogue (core/catalogue.py).

Per alarm, each tick: the raw condition is debounced by its condition delay on the way in and
by its clear delay on the way out; an alarm whose definition takes a protective action
*latches*: it stays (presence ``latched``) after the condition clears until an operator resets
it, and a reset is refused while the condition is still present. Acknowledge silences only the
current occurrence. Audio pause is time-limited and covers only the alarms present when it
began: a new alarm, or one of higher priority than any paused, annunciates at once. There is no
"alarm off" for protective alarms.

Pure code: time is passed in, nothing is awaited, events are returned to the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from ilup_controller.core.catalogue import (
    CATALOGUE,
    AlarmDef,
    HeaterAction,
    Priority,
    PumpAction,
)
from ilup_controller.core.types import value_type

PRIORITY_RANK = {Priority.low: 1, Priority.medium: 2, Priority.high: 3}


class Presence(StrEnum):
    """HL7/IEEE alarm presence vocabulary."""

    off = "off"
    on = "on"
    latched = "latched"


@value_type
class Condition:
    """One evaluation of an alarm condition: is it present, and with which value and limit."""

    present: bool
    value: float | None = None
    limit: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    t_s: float
    # onset | end | acknowledge | reset | refused | audio_pause | audio_resume
    kind: str
    alarm_id: str | None
    priority: str | None
    message: str
    operator: str | None = None
    value: float | None = None
    limit: float | None = None


@dataclass(slots=True)
class _State:
    raw_since_s: float | None = None  # when the raw condition became present
    clear_since_s: float | None = None  # when it became absent while the alarm is on
    presence: Presence = Presence.off
    acknowledged: bool = False
    onset_s: float | None = None
    value: float | None = None
    limit: float | None = None
    detail: str = ""
    # The condition of this occurrence has cleared once: while it stays latched, its condition
    # coming and going is the same occurrence (no new onset, no new end).
    cleared: bool = False


@dataclass(frozen=True, slots=True)
class ActiveAlarm:
    alarm_id: str
    priority: Priority
    presence: Presence
    acknowledged: bool
    audible: bool
    onset_s: float
    message: str
    value: float | None
    limit: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""


@dataclass(slots=True)
class _Pause:
    until_s: float
    covers: frozenset[str] = field(default_factory=frozenset)


class AlarmEngine:
    def __init__(
        self,
        delays_s: Mapping[str, float] | None = None,
        *,
        audio_pause_s: float = 120.0,
        catalogue: Mapping[str, AlarmDef] = CATALOGUE,
    ) -> None:
        self._defs = dict(catalogue)
        self._delay_s = {k: (delays_s or {}).get(k, d.delay_s) for k, d in self._defs.items()}
        self._state = {k: _State() for k in self._defs}
        self._audio_pause_s = audio_pause_s
        self._pause: _Pause | None = None
        self._last_raw: dict[str, Condition] = {}

    # ------------------------------------------------------------------ per tick

    def update(self, t_s: float, conditions: Mapping[str, Condition]) -> list[AlarmEvent]:
        events: list[AlarmEvent] = []
        if self._pause is not None and t_s >= self._pause.until_s:
            self._pause = None
            events.append(AlarmEvent(t_s, "audio_resume", None, None, "audio pause ended"))
        for alarm_id, cond in conditions.items():
            d = self._defs[alarm_id]  # KeyError: a condition outside the catalogue is a bug
            s = self._state[alarm_id]
            self._last_raw[alarm_id] = cond
            if cond.present and any(
                self._state[o].presence is not Presence.off for o in d.suppressed_by
            ):
                cond = Condition(False)
            if cond.present:
                s.clear_since_s = None
                if s.raw_since_s is None:
                    s.raw_since_s = t_s
                due = t_s - s.raw_since_s >= self._delay_s[alarm_id] - 1e-9
                if s.presence is Presence.on:
                    s.value = cond.value  # keep the current value visible
                elif s.presence is Presence.latched and due:
                    # The same occurrence, not a new one: it stays unreset, and announcing it
                    # again each time the condition returns buried the operator in onsets.
                    s.presence = Presence.on
                    s.value = cond.value
                elif due:
                    s.presence = Presence.on
                    s.acknowledged = False
                    s.cleared = False
                    s.onset_s = t_s
                    s.value, s.limit, s.detail = cond.value, cond.limit, cond.detail
                    events.append(self._event(t_s, "onset", d, s))
            else:
                s.raw_since_s = None
                if s.presence is Presence.on:
                    if s.clear_since_s is None:
                        s.clear_since_s = t_s
                    if t_s - s.clear_since_s < d.clear_delay_s - 1e-9:
                        continue  # still the same occurrence (clear delay)
                    s.clear_since_s = None
                    if d.latching:
                        s.presence = Presence.latched
                        if not s.cleared:
                            s.cleared = True
                            events.append(
                                self._event(
                                    t_s, "end", d, s, "condition cleared; latched until reset"
                                )
                            )
                    else:
                        s.presence = Presence.off
                        events.append(self._event(t_s, "end", d, s, "condition cleared"))
        return events

    # ------------------------------------------------------------------ operator actions

    def acknowledge(
        self, alarm_id: str, t_s: float, operator: str
    ) -> tuple[Verdict, list[AlarmEvent]]:
        s = self._state.get(alarm_id)
        if s is None:
            return Verdict(False, f"unknown alarm {alarm_id!r}"), []
        if s.presence is Presence.off:
            return Verdict(False, f"alarm {alarm_id!r} is not active"), []
        s.acknowledged = True
        return Verdict(True), [
            self._event(t_s, "acknowledge", self._defs[alarm_id], s, operator=operator)
        ]

    def pause_audio(self, t_s: float, operator: str) -> tuple[Verdict, list[AlarmEvent]]:
        covers = frozenset(k for k, s in self._state.items() if s.presence is not Presence.off)
        self._pause = _Pause(until_s=t_s + self._audio_pause_s, covers=covers)
        msg = f"audio paused for {self._audio_pause_s:.0f} s"
        return Verdict(True), [AlarmEvent(t_s, "audio_pause", None, None, msg, operator=operator)]

    def reset(self, alarm_id: str, t_s: float, operator: str) -> tuple[Verdict, list[AlarmEvent]]:
        s = self._state.get(alarm_id)
        if s is None:
            return Verdict(False, f"unknown alarm {alarm_id!r}"), []
        d = self._defs[alarm_id]
        if s.presence is Presence.on or s.raw_since_s is not None:
            reason = f"condition still present: {self._message(d, s)}"
            return Verdict(False, reason), [
                self._event(t_s, "refused", d, s, "reset refused: " + reason, operator=operator)
            ]
        if s.presence is Presence.off:
            return Verdict(False, f"alarm {alarm_id!r} is not active"), []
        s.presence = Presence.off
        s.acknowledged = False
        return Verdict(True), [
            self._event(t_s, "reset", d, s, "reset by operator", operator=operator)
        ]

    def raise_latched(
        self, alarm_id: str, t_s: float, *, value: float | None = None, detail: str = ""
    ) -> list[AlarmEvent]:
        """Put an alarm straight into ``latched`` (restored after a restart, or a one-off such
        as the restart itself): it stays until reset, and a reset needs no condition."""
        d, s = self._defs[alarm_id], self._state[alarm_id]
        s.presence, s.acknowledged, s.onset_s = Presence.latched, False, t_s
        s.value, s.limit, s.detail, s.cleared = value, None, detail, True
        return [self._event(t_s, "onset", d, s)]

    # ------------------------------------------------------------------ queries

    def is_present(self, alarm_id: str) -> bool:
        return self._state[alarm_id].presence is not Presence.off

    def actions(self) -> tuple[PumpAction, HeaterAction, str | None, str | None]:
        """The most restrictive safe action per actuator, and the alarm that asks for it."""
        pump, pump_by = PumpAction.none, None
        heater, heater_by = HeaterAction.none, None
        for k, s in self._state.items():
            if s.presence is Presence.off:
                continue
            d = self._defs[k]
            if _PUMP_RANK[d.pump] > _PUMP_RANK[pump]:
                pump, pump_by = d.pump, k
            if d.heater is HeaterAction.off and heater is HeaterAction.none:
                heater, heater_by = HeaterAction.off, k
        return pump, heater, pump_by, heater_by

    def active(self, t_s: float) -> list[ActiveAlarm]:
        out: list[ActiveAlarm] = []
        for k, s in self._state.items():
            if s.presence is Presence.off or s.onset_s is None:
                continue
            d = self._defs[k]
            out.append(
                ActiveAlarm(
                    alarm_id=k,
                    priority=d.priority,
                    presence=s.presence,
                    acknowledged=s.acknowledged,
                    audible=self._audible(k, s),
                    onset_s=s.onset_s,
                    message=self._message(d, s),
                    value=s.value,
                    limit=s.limit,
                )
            )
        out.sort(key=lambda a: (-PRIORITY_RANK[a.priority], a.onset_s))
        return out

    def audio_paused_until(self) -> float | None:
        return None if self._pause is None else self._pause.until_s

    # ------------------------------------------------------------------ internals

    def _audible(self, alarm_id: str, s: _State) -> bool:
        if s.acknowledged:
            return False
        return not (self._pause is not None and alarm_id in self._pause.covers)

    def _message(self, d: AlarmDef, s: _State) -> str:
        return d.render(value=s.value, limit=s.limit, detail=s.detail)

    def _event(
        self,
        t_s: float,
        kind: str,
        d: AlarmDef,
        s: _State,
        note: str = "",
        operator: str | None = None,
    ) -> AlarmEvent:
        msg = self._message(d, s) + (f" ({note})" if note else "")
        return AlarmEvent(t_s, kind, d.id, str(d.priority), msg, operator, s.value, s.limit)


_PUMP_RANK = {PumpAction.none: 0, PumpAction.hold: 1, PumpAction.stop: 2}
