"""Wire contract of operator commands: payload models, the reply, and the command topics.

Topics (``<prefix>`` is ``mqtt.topic_prefix``, default ``ilup``):

- command: ``<prefix>/<cart_id>/cmd/<user>/<name>``, published by the operator ``<user>``;
- reply: the MQTT v5 response topic of the command when it names one inside the sender's own
  reply space ``<prefix>/<cart_id>/cmd/<user>/<a>/<b>...`` (two or more levels below the user),
  else ``<prefix>/<cart_id>/cmd/<user>/<name>/reply``.

``<user>`` is the MQTT username the broker authenticated: the broker ACL
``pattern write <prefix>/+/cmd/%u/+`` lets a user publish commands under its own name only, so
the topic, not the payload, proves who sent a command (docs/security.md).

Payloads are strict (no type coercion, unknown fields rejected, finite numbers only) and carry
the envelope ``command_id``, ``issued_at`` and ``expires_in_s`` next to the command's own fields.
The bounds here are the absolute caps of the configuration schema; the processor narrows them
to the cart's configuration (commands/processor.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

# An MQTT username usable as the <user> topic level: no '/', '+', '#', NUL or spaces.
USERNAME_RE: Final = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")

CommandId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Chosen by the sender, unique per sender (a UUID is fine). A repeated id is "
        "answered with the first reply and never applied twice.",
    ),
]
FlowMlMin = Annotated[float, Field(ge=0.0, le=5000.0, allow_inf_nan=False)]
PressureMmhg = Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)]
TemperatureC = Annotated[float, Field(ge=20.0, le=42.0, allow_inf_nan=False)]
AlarmId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]

ReasonCode = Literal[
    "invalid",
    "unknown_command",
    "out_of_range",
    "not_allowed_in_phase",
    "interlock_active",
    "expired",
    "duplicate",
    "rate_limited",
    "unauthorized",
    "recorder_failed",
    "refused",
    "not_confirmed",
    "not_commissioned",
]
REASON_CODES: Final[tuple[str, ...]] = ReasonCode.__args__  # type: ignore[attr-defined]

CommandName = Literal["setpoint", "mode", "phase", "alarm", "marker", "confirm", "calibrate"]

MAX_EXPIRES_IN_S: Final = 60.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Command(_Strict):
    """Envelope fields common to every command."""

    command_id: CommandId
    issued_at: AwareDatetime = Field(
        description="UTC time the sender issued the command (ISO-8601 with an offset, e.g. "
        "2025-01-01T12:00:00Z). Older than expires_in_s on arrival: rejected 'expired'; more "
        "than 2 s in the future: rejected 'invalid' (sender clock)."
    )
    expires_in_s: float = Field(
        5.0,
        gt=0.0,
        le=MAX_EXPIRES_IN_S,
        allow_inf_nan=False,
        description="Validity after issued_at, seconds.",
    )


class SetpointCommand(Command):
    """Change one or more targets. Each value must lie within the cart's configured bounds and
    differ from the current target by no more than the per-command slew limit."""

    flow_ml_min: FlowMlMin | None = Field(None, description="Flow target, mL/min.")
    pressure_limit_mmhg: PressureMmhg | None = Field(
        None, description="PA pressure limit the pump must not push above, mmHg."
    )
    temperature_c: TemperatureC | None = Field(
        None, description="Perfusate temperature target, degC."
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> Self:
        if (
            self.flow_ml_min is None
            and self.pressure_limit_mmhg is None
            and (self.temperature_c is None)
        ):
            raise ValueError("give at least one of flow_ml_min, pressure_limit_mmhg, temperature_c")
        return self


class ModeCommand(Command):
    """Control mode: constant flow or constant pressure; automatic or manual pump output.
    Switching is bumpless both ways (the new mode starts from the speed applied now)."""

    control: Literal["flow", "pressure"]
    output_mode: Literal["auto", "manual"]
    pump_speed_rpm: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="Manual pump speed, rpm: required with output_mode manual, absent with auto.",
    )

    @model_validator(mode="after")
    def _manual_needs_speed(self) -> Self:
        if self.output_mode == "manual" and self.pump_speed_rpm is None:
            raise ValueError("pump_speed_rpm is required when output_mode is manual")
        if self.output_mode == "auto" and self.pump_speed_rpm is not None:
            raise ValueError("pump_speed_rpm is only allowed when output_mode is manual")
        return self


class PhaseCommand(Command):
    """Procedure phase: start priming, perfusion or washout, complete, safe-stop, or resume
    from safe-stop. Transitions the procedure does not allow are rejected."""

    action: Literal["priming", "perfusion", "washout", "complete", "safe_stop", "resume"]


class AlarmCommand(Command):
    """Acknowledge or reset one alarm, or pause the audio of the present alarms."""

    action: Literal["acknowledge", "pause_audio", "reset"]
    alarm_id: AlarmId | None = Field(
        None, description="Required for acknowledge and reset; absent for pause_audio."
    )

    @model_validator(mode="after")
    def _alarm_id_when_needed(self) -> Self:
        if self.action == "pause_audio":
            if self.alarm_id is not None:
                raise ValueError("pause_audio applies to all present alarms: omit alarm_id")
        elif self.alarm_id is None:
            raise ValueError(f"alarm_id is required for {self.action}")
        return self


class MarkerCommand(Command):
    """A free-text event in the procedure record, e.g. 'drug in', 'clamp off'."""

    text: str = Field(min_length=1, max_length=200, description="Printable text, one line.")

    @field_validator("text")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("text must be printable on one line (no control characters)")
        if not v.strip():
            raise ValueError("text must not be blank")
        return v


class ConfirmCommand(Command):
    """Second step of a safety-relevant change: confirm (or cancel) the change this operator
    requested, whose reply said ``confirm_required`` and gave ``token``. Only the operator who
    requested it may confirm it, within the cart's ``commands.confirm.window_s``; any other
    command from that operator, a wrong token or another operator's confirm cancels it."""

    token: str = Field(
        pattern=r"^[A-Za-z0-9_-]{8,64}$",
        description="The token of the confirm_required reply.",
    )
    action: Literal["confirm", "cancel"] = Field(
        "confirm", description="confirm: apply the pending change; cancel: drop it."
    )


class CalibrateCommand(Command):
    """Calibration, in idle with the pump stopped only: ``zero_pressure`` takes the mean PA
    pressure of the last 5 s as the transducer's zero (pump stopped, line open to atmosphere);
    ``stroke_volume`` sets the pump's stroke volume from a measurement (ilup commission)."""

    action: Literal["zero_pressure", "stroke_volume"]
    stroke_volume_ml_per_rev: float | None = Field(
        None,
        gt=0.0,
        le=500.0,
        allow_inf_nan=False,
        description="Measured stroke volume, mL/rev: required with stroke_volume, absent with "
        "zero_pressure; within 25 % of the configured one.",
    )

    @model_validator(mode="after")
    def _value_when_needed(self) -> Self:
        if (self.action == "stroke_volume") != (self.stroke_volume_ml_per_rev is not None):
            raise ValueError("stroke_volume_ml_per_rev is required with (only with) stroke_volume")
        return self


AnyCommand = (
    SetpointCommand
    | ModeCommand
    | PhaseCommand
    | AlarmCommand
    | MarkerCommand
    | ConfirmCommand
    | CalibrateCommand
)

COMMAND_MODELS: Final[dict[str, type[Command]]] = {
    "setpoint": SetpointCommand,
    "mode": ModeCommand,
    "phase": PhaseCommand,
    "alarm": AlarmCommand,
    "marker": MarkerCommand,
    "confirm": ConfirmCommand,
    "calibrate": CalibrateCommand,
}


class Reply(_Strict):
    """The daemon's answer to one command, on the command's reply topic (QoS 1, not retained)."""

    command_id: str | None = Field(
        description="The command's id; null when the payload gave no valid one."
    )
    command: str = Field(max_length=64, description="Command name: the last topic level.")
    status: Literal["ok", "rejected", "confirm_required"] = Field(
        description="ok: applied; rejected: nothing changed (see reason); confirm_required: "
        "nothing changed yet, detail says what would change (old -> new), and the same "
        "operator must send a confirm command with the token within confirm_within_s."
    )
    reason: ReasonCode | None = Field(
        None, description="Why a command was rejected (machine code); null otherwise."
    )
    detail: str = Field(
        "", max_length=500, description="Specific human text: what was changed, or what is wrong."
    )
    t: AwareDatetime = Field(description="UTC time of the decision.")
    token: str | None = Field(
        None, description="With confirm_required: the token to send back in a confirm command."
    )
    confirm_within_s: float | None = Field(
        None, description="With confirm_required: seconds left to confirm."
    )

    @model_validator(mode="after")
    def _reason_iff_rejected(self) -> Self:
        if (self.status == "rejected") != (self.reason is not None):
            raise ValueError("a rejected reply has a reason, an ok reply has none")
        if (self.status == "confirm_required") != (self.token is not None):
            raise ValueError("a confirm_required reply has a token, other replies have none")
        return self


# --------------------------------------------------------------------------- topics

CMD: Final = "cmd"
REPLY: Final = "reply"


def command_filter(prefix: str, cart_id: str) -> str:
    """The daemon's subscription: every command of every user of this cart (one level each)."""
    return f"{prefix.strip('/')}/{cart_id}/{CMD}/+/+"


def split_command_topic(topic: str, prefix: str, cart_id: str) -> tuple[str, str] | None:
    """``(user, name)`` of ``<prefix>/<cart_id>/cmd/<user>/<name>``, else None."""
    head = f"{prefix.strip('/')}/{cart_id}/{CMD}/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head) :].split("/")
    if len(rest) != 2 or not rest[0] or not rest[1]:
        return None
    return rest[0], rest[1]


def default_reply_topic(prefix: str, cart_id: str, user: str, name: str) -> str:
    return f"{prefix.strip('/')}/{cart_id}/{CMD}/{user}/{name}/{REPLY}"


def response_topic_allowed(topic: str, prefix: str, cart_id: str, user: str) -> bool:
    """A v5 response topic is honoured only inside the sender's own reply space.

    The daemon may write anywhere under ``<prefix>/#``: a response topic chosen freely by the
    sender would let it make the daemon publish on ``state`` or on another user's replies, or
    on a command topic the daemon itself listens to (a reply loop). The sender's own space
    ``<prefix>/<cart_id>/cmd/<user>/<a>/<b>...`` is written only by the daemon (the ACL gives
    the user one level there) and is never a command topic (commands have exactly one).
    """
    head = f"{prefix.strip('/')}/{cart_id}/{CMD}/{user}/"
    if not topic.startswith(head) or len(topic) > 512:
        return False
    rest = topic[len(head) :].split("/")
    return len(rest) >= 2 and all(part and not set(part) & set("+#\0") for part in rest)
