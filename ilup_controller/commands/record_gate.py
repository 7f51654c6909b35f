"""Which commands may still be applied while the procedure record cannot be written.

A command that changes therapy is applied only if its event can go on the record: an
unrecorded change of target, mode or phase is a gap in the legal record of the procedure
(hazard H10), and nothing about it is urgent. What brings the cart to safety or lets the team
handle the alarms stays possible, and its reply says the record is failing. The table is
documented in docs/security.md ("While the record cannot be written").

| command | while the record fails |
|---|---|
| setpoint (any target) | rejected ``recorder_failed`` |
| mode | rejected ``recorder_failed`` |
| phase priming, perfusion, washout, complete, resume | rejected ``recorder_failed`` |
| phase safe_stop | applied: the way to safety is never closed |
| alarm acknowledge, pause_audio | applied: they change nothing the patient receives |
| alarm reset | rejected ``recorder_failed``: it can lift an interlock and restart the pump |
| marker | attempted: answered ok, the reply says it was not recorded |
| confirm (of a pending change) | rejected ``recorder_failed``; the pending change is cancelled |
| confirm with action cancel | applied |
"""

from __future__ import annotations

from typing import Final

from ilup_controller.commands.models import (
    AlarmCommand,
    AnyCommand,
    ConfirmCommand,
    MarkerCommand,
    PhaseCommand,
)

# Shown in the rejection so the operator knows what still works.
STILL_ACCEPTED: Final = "alarm acknowledge/pause_audio, marker and phase safe_stop still work"
MAX_PROBLEM_CHARS: Final = 160


def needs_record(cmd: AnyCommand) -> bool:
    """True for a command that changes therapy: refused while the record cannot be written."""
    if isinstance(cmd, PhaseCommand):
        return cmd.action != "safe_stop"
    if isinstance(cmd, AlarmCommand):
        return cmd.action == "reset"
    if isinstance(cmd, ConfirmCommand):
        return cmd.action == "confirm"
    return not isinstance(cmd, MarkerCommand)


def refusal_detail(name: str, problem: str) -> str:
    """The reply detail of a command refused because the record fails with ``problem``."""
    if len(problem) > MAX_PROBLEM_CHARS:
        problem = problem[: MAX_PROBLEM_CHARS - 3] + "..."
    return (
        f"{name} not applied: the procedure record cannot be written ({problem}); {STILL_ACCEPTED}"
    )
