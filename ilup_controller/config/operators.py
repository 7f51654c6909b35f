"""Who may command the cart, and the limits on operator commands (cart file sections
``operators`` and ``commands``).

The broker authenticates a user and its ACL lets the user publish only under its own name; the
daemon then decides what that user may do, from the cart file (docs/security.md):

- ``operators`` maps each broker user name to a role. A user the map does not name, or whose
  role is ``monitor``, gets every command refused ``unauthorized``: being in the broker's
  password file is not enough to change a therapy. A cart file without the section accepts no
  command at all (fail closed: a user added to the broker for a monitor, a dashboard or a
  service tool must not gain control by omission). The key ``"*"`` gives its role to every user
  not named, and only on a simulated cart, whose broker may be anonymous (the demo).
- ``commands`` holds the per-command slew limits, the rate limit and the two-step confirmation
  settings, each bounded, defaults equal to the former constants.

What each role may do is ``ROLE_DUTIES`` (a command's duty: commands/roles.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

OperatorRole = Literal["monitor", "assistant", "operator"]
Duty = Literal["respond", "treat"]

# respond: alarm acknowledge and audio pause, phase safe_stop, markers, cancelling one's own
#          pending change: what brings the cart to safety or documents, never more therapy.
# treat:   every command that changes what the patient receives: setpoints, mode, phases other
#          than safe_stop (resume included), alarm reset (it can lift an interlock).
ROLE_DUTIES: Final[dict[str, frozenset[str]]] = {
    "monitor": frozenset(),
    "assistant": frozenset({"respond"}),
    "operator": frozenset({"respond", "treat"}),
}
WILDCARD: Final = "*"

UserName = Annotated[str, Field(pattern=r"^([A-Za-z0-9_.@-]{1,64}|\*)$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Slew(_Strict):
    """The largest change of a target that one command may make, so that a typing slip (5000
    for 500) cannot become a step on the lung."""

    flow_ml_min: float = Field(200.0, ge=10.0, le=1000.0, allow_inf_nan=False)
    pressure_limit_mmhg: float = Field(5.0, ge=0.5, le=20.0, allow_inf_nan=False)
    temperature_c: float = Field(1.0, ge=0.1, le=5.0, allow_inf_nan=False)


class Confirmation(_Strict):
    """Two-step confirmation of safety-relevant changes: raising the pressure limit, raising the
    flow target by more than ``flow_step_ml_min``, manual pump output (entering it or raising
    its speed), resume from safe_stop. The first command is answered ``confirm_required`` with
    a token; the same operator confirms it within ``window_s``, or it is cancelled."""

    window_s: float = Field(
        10.0,
        ge=3.0,
        le=60.0,
        allow_inf_nan=False,
        description="Time to confirm, seconds (core time), from the request's application.",
    )
    flow_step_ml_min: float = Field(
        100.0,
        ge=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="A flow target raised by more than this in one command needs confirmation.",
    )


class CommandLimits(_Strict):
    """Limits on operator commands. ``phase safe_stop`` and ``alarm pause_audio`` are exempt
    from the rate limit, from expiry and from confirmation (docs/security.md)."""

    rate_per_s: float = Field(
        5.0,
        ge=0.5,
        le=50.0,
        allow_inf_nan=False,
        description="Commands per second per sender, sustained (token bucket refill).",
    )
    burst: int = Field(10, ge=1, le=100, description="Commands a sender may send at once.")
    slew: Slew = Slew()
    confirm: Confirmation = Confirmation()


def role_of(operators: Mapping[str, str] | None, user: str) -> str | None:
    """The role of ``user``: by name, else the wildcard's, else None (not listed)."""
    if operators is None:
        return None
    role = operators.get(user)
    return role if role is not None else operators.get(WILDCARD)
