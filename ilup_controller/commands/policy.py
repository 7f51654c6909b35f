"""Which commands a role may send, which are exempt from limits, which need confirmation.

Three tables about commands, kept as small pure functions beside each other:

- ``duty_of``: what a command does, in terms of the roles of config/operators.py
  (``ROLE_DUTIES``): ``respond`` (alarm acknowledge and audio pause, phase safe_stop, marker,
  confirm/cancel of one's own pending change) or ``treat`` (everything that changes what the
  patient receives);
- ``exempt``: ``phase safe_stop`` and ``alarm pause_audio`` are never rate-limited, never expire
  and never need confirmation (the way to safety and to quiet is never closed);
- ``needs_confirmation``: the safety-relevant changes that take two steps, with the text that
  tells the operator what will change (old -> new). There is no command that waives or
  bypasses an interlock: an alarm reset is refused while its condition persists. A command that
  could waive one must be added here.
"""

from __future__ import annotations

from typing import Final

from ilup_controller.commands.models import (
    AlarmCommand,
    AnyCommand,
    ConfirmCommand,
    MarkerCommand,
    ModeCommand,
    PhaseCommand,
    SetpointCommand,
)
from ilup_controller.commands.payload import PayloadError, decode, loads
from ilup_controller.config.models import CartConfig
from ilup_controller.config.operators import ROLE_DUTIES, Duty
from ilup_controller.core.cart import CartCore
from ilup_controller.core.procedure import Phase

# (command name, action) pairs that are exempt: checked on the raw payload before the rate limit.
EXEMPT_ACTIONS: Final[dict[str, str]] = {"phase": "safe_stop", "alarm": "pause_audio"}


def duty_of(cmd: AnyCommand) -> Duty:
    if isinstance(cmd, PhaseCommand):
        return "respond" if cmd.action == "safe_stop" else "treat"
    if isinstance(cmd, AlarmCommand):
        return "treat" if cmd.action == "reset" else "respond"
    if isinstance(cmd, MarkerCommand | ConfirmCommand):
        return "respond"
    return "treat"


def may(role: str | None, duty: Duty) -> bool:
    return role is not None and duty in ROLE_DUTIES.get(role, frozenset())


def exempt(name: str, cmd: AnyCommand) -> bool:
    """safe_stop and pause_audio: no rate limit, no expiry, no confirmation."""
    wanted = EXEMPT_ACTIONS.get(name)
    return wanted is not None and getattr(cmd, "action", None) == wanted


def exempt_payload(name: str, payload: bytes | bytearray) -> bool:
    """``exempt`` on a payload not parsed yet (for the rate limit, which comes first)."""
    wanted = EXEMPT_ACTIONS.get(name)
    if wanted is None or wanted.encode() not in payload:  # a flood of others stays cheap
        return False
    try:
        obj = loads(decode(bytes(payload)))
    except PayloadError:
        return False
    return isinstance(obj, dict) and obj.get("action") == wanted


def needs_confirmation(
    cmd: AnyCommand, core: CartCore, cfg: CartConfig, changes: list[tuple[str, float, float]]
) -> str | None:
    """What will change, when ``cmd`` needs the operator's confirmation; None when it does not.

    ``changes``: a setpoint's checked changes ``(field, old, new)`` (empty for other commands).
    The command has passed its range and slew checks: only an applicable change is confirmed.
    """
    ctl = core.controller
    if isinstance(cmd, SetpointCommand):
        step = cfg.commands.confirm.flow_step_ml_min
        parts: list[str] = []
        relevant = False
        for name, old, new in changes:
            text = f"{name} {old:g} -> {new:g}"
            if name == "pressure_limit_mmhg" and new > old + 1e-9:
                text += " (raises the pressure limit)"
                relevant = True
            elif name == "flow_ml_min" and new - old > step + 1e-9:
                text += f" (+{new - old:g} mL/min, more than {step:g} in one step)"
                relevant = True
            parts.append(text)
        return "; ".join(parts) if relevant else None
    if isinstance(cmd, ModeCommand):
        if cmd.output_mode != "manual" or cmd.pump_speed_rpm is None:
            return None
        speed = min(cmd.pump_speed_rpm, cfg.control.flow.speed_max_rpm)
        if ctl.output_mode == "manual":
            if speed <= ctl.manual_speed_rpm + 1e-9:
                return None
            return (
                f"manual pump speed {ctl.manual_speed_rpm:g} -> {speed:g} rpm "
                f"(constant-{cmd.control})"
            )
        return (
            f"mode constant-{ctl.control_mode} {ctl.output_mode} -> constant-{cmd.control} "
            f"manual at {speed:g} rpm: the pump runs at a fixed speed, the loops stop "
            "(the pressure cap and safe actions still apply)"
        )
    if isinstance(cmd, PhaseCommand) and cmd.action == "resume":
        proc = core.procedure
        if proc.phase is not Phase.safe_stop or proc.resume_to is None or core.pump_blockers():
            return None  # refused anyway when applied: nothing to confirm
        return (
            f"phase safe_stop -> {proc.resume_to.value} (resume): the pump restarts and the "
            f"flow ramps up from 0 to {ctl.phase_target_ml_min(proc.resume_to):g} mL/min"
        )
    return None
