"""The daemon's view of its guard (runtime/guardwatch.py): why guard_absent is raised."""

from __future__ import annotations

import json

from ilup_controller.config import load_config
from ilup_controller.runtime.guardwatch import GuardWatch

GUARDED = load_config("config/sim.yaml", ["config/guard.yaml"]).guard


def _status(online: bool) -> bytes:
    return json.dumps({"online": online, "cart_id": "c"}).encode()


def test_no_guard_configured_means_no_problem() -> None:
    assert GuardWatch(None, 0.0).problem(1000.0) == ""


def test_a_guard_never_heard_of_is_absent_after_the_timeout() -> None:
    assert GUARDED is not None
    w = GuardWatch(GUARDED, 10.0)
    assert w.problem(10.0 + GUARDED.status_timeout_s) == ""  # it may start after the daemon
    assert w.problem(14.0) == "no status from the guard for 4 s"
    # A retained "online" may be left from a guard that died: it does not count.
    w.on_status(_status(True), retained=True, now_s=14.0)
    assert w.problem(14.0).startswith("no status")
    w.on_status(b"not json", retained=False, now_s=14.0)
    w.on_status(b"[1]", retained=False, now_s=14.0)
    assert w.problem(14.0).startswith("no status")


def test_a_live_guard_is_fine_until_its_status_ages_or_it_goes_offline() -> None:
    assert GUARDED is not None
    w = GuardWatch(GUARDED, 0.0)
    w.on_status(_status(True), retained=False, now_s=5.0)
    assert w.problem(5.0 + GUARDED.status_timeout_s) == ""
    assert w.problem(8.5) == "the guard's last status is 3.5 s old"
    w.on_status(_status(False), retained=True, now_s=9.0)  # its last will
    assert w.problem(9.0) == "the guard is offline (stopped, or its connection broke)"
    w.on_status(_status(True), retained=False, now_s=9.5)
    assert w.problem(9.6) == ""
