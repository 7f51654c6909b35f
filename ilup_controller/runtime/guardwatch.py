"""The daemon's view of its independent safety layer, ``ilup guard``: from the guard's retained
status on ``<prefix>/<cart_id>/guard``, why the guard is not watching ("" while it is).

Fed by the MQTT receive task, read by the control tick: a plain attribute each way, so control
never waits on MQTT. Only live statuses count: a retained one may be any age.
"""

from __future__ import annotations

import json

from ilup_controller.config.models import Guard


class GuardWatch:
    def __init__(self, guard: Guard | None, started_s: float) -> None:
        self._guard = guard
        self._started_s = started_s
        self._seen_s: float | None = None  # loop time of the last live status
        self._online = False

    def on_status(self, payload: bytes, retained: bool, now_s: float) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        online = data.get("online") is True
        if retained and online:
            return  # may be left from a guard that died; wait for a live one
        self._online, self._seen_s = online, now_s

    def problem(self, now_s: float) -> str:
        g = self._guard
        if g is None:
            return ""
        timeout_s = g.status_timeout_s
        if self._seen_s is None:
            waited_s = now_s - self._started_s
            return f"no status from the guard for {waited_s:.0f} s" if waited_s > timeout_s else ""
        if not self._online:
            return "the guard is offline (stopped, or its connection broke)"
        age_s = now_s - self._seen_s
        return f"the guard's last status is {age_s:.1f} s old" if age_s > timeout_s else ""
