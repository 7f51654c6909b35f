"""MQTT payload schemas. docs/topics.md and the JSON schemas are generated from these models."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Status(Message):
    """Retained on ``<prefix>/<cart_id>/status``; the last will sets ``online`` to false."""

    online: bool
    cart_id: str
    simulated: bool | None = None
    version: str | None = None
    since: datetime | None = Field(None, description="UTC time the daemon came online.")
    instance: str | None = Field(
        None,
        description="Random id of the daemon process. Another id on a cart's own status topic "
        "means two clients use one cart_id (alarm duplicate_cart_id).",
    )


class Measured(Message):
    """Latest measurements; null when the reading is missing or stale (never a made-up 0)."""

    flow_ml_min: float | None
    pressure_mmhg: float | None
    temperature_c: float | None
    water_temperature_c: float | None = None
    pump_speed_rpm: float | None = None
    reservoir_volume_ml: float | None = None


class Targets(Message):
    flow_ml_min: float = Field(description="Final flow target.")
    flow_ramped_ml_min: float = Field(description="Flow setpoint on its ramp, this tick.")
    pressure_limit_mmhg: float
    temperature_c: float = Field(description="Final perfusate temperature target.")
    temperature_ramped_c: float = Field(description="Temperature setpoint on its ramp.")


class Outputs(Message):
    pump_speed_rpm: float
    heater_pct: float


class Loop(Message):
    pump_limited_by: str = Field(
        description="'flow', 'pressure' or the interlock holding the pump."
    )
    heater_limited_by: str = Field(description="'temperature' or the interlock holding the heater.")
    water_setpoint_c: float | None = None


class DrugPhase(Message):
    elapsed_s: float = Field(description="Time at target so far (the timer pauses off target).")
    remaining_s: float


class Timing(Message):
    tick_period_s: float
    ticks: int
    overruns: int


class State(Message):
    """Retained on ``<prefix>/<cart_id>/state`` at least once a second."""

    t: datetime = Field(description="UTC time of the tick this state describes (ISO-8601).")
    seq: int = Field(
        ge=0, description="Tick number; strictly increasing, gaps where ticks were not published."
    )
    cart_id: str
    phase: str
    simulated: bool
    measured: Measured
    targets: Targets
    outputs: Outputs
    loop: Loop
    drug_phase: DrugPhase
    active_alarms: list[str] = Field(
        default_factory=list, description="Ids of present alarms (details on the alarms topic)."
    )
    timing: Timing


class Alarm(Message):
    id: str
    priority: str = Field(description="high, medium or low (IEC 60601-1-8).")
    presence: str = Field(description="on (condition present) or latched (awaiting reset).")
    acknowledged: bool
    audible: bool = Field(description="False when acknowledged or covered by an audio pause.")
    since: datetime = Field(description="UTC onset of this occurrence.")
    message: str = Field(description="Names the sensor, the value, the limit and the action.")
    value: float | None = None
    limit: float | None = None


class Alarms(Message):
    """Retained on ``<prefix>/<cart_id>/alarms``: every present alarm, highest priority first."""

    t: datetime
    cart_id: str
    audio_paused_until: datetime | None = None
    alarms: list[Alarm]


class Event(Message):
    """On ``<prefix>/<cart_id>/events`` (not retained): one per alarm or phase transition."""

    t: datetime
    seq: int = Field(ge=0, description="Event number since the daemon started.")
    cart_id: str
    kind: str = Field(
        description="Alarms: onset, end, acknowledge, audio_pause, audio_resume, reset, refused; "
        "phase; command (every command and its outcome); marker (operator's free text); "
        "acknowledged (replies sent after the record was on disk); device (link up/down); "
        "daemon (start, stop)."
    )
    alarm_id: str | None = None
    priority: str | None = None
    from_phase: str | None = None
    to_phase: str | None = None
    message: str
    operator: str | None = None
    value: float | None = None
    limit: float | None = None
