"""MQTT payload schemas. docs/topics.md and the JSON schemas are generated from these models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


def quantity(units: str, description: str, default: Any = ...) -> Any:
    """A numeric field with its units in the JSON Schema (``x-units``: an extension keyword,
    valid in JSON Schema and AsyncAPI alike) and its description; values are rounded to the
    resolution of their signal (config/resolution.py)."""
    return Field(default, description=description, json_schema_extra={"x-units": units})


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

    flow_ml_min: float | None = quantity("mL/min", "Circuit flow (flow sensor).")
    pressure_mmhg: float | None = quantity("mmHg", "Pulmonary-artery inflow pressure.")
    temperature_c: float | None = quantity("degC", "Perfusate (arterial line) temperature.")
    water_temperature_c: float | None = quantity("degC", "Heater-cooler water temperature.", None)
    pump_speed_rpm: float | None = quantity("rpm", "Pump speed from its tacho.", None)
    reservoir_volume_ml: float | None = quantity("mL", "Reservoir volume (level sensor).", None)


class Targets(Message):
    flow_ml_min: float = quantity("mL/min", "Final flow target.")
    flow_ramped_ml_min: float = quantity("mL/min", "Flow setpoint on its ramp, this tick.")
    pressure_limit_mmhg: float = quantity("mmHg", "PA pressure limit; the pump is held below it.")
    temperature_c: float = quantity("degC", "Final perfusate temperature target.")
    temperature_ramped_c: float = quantity("degC", "Temperature setpoint on its ramp.")


class Outputs(Message):
    pump_speed_rpm: float = quantity("rpm", "Pump speed command written this tick.")
    heater_pct: float = quantity("%", "Heater power command written this tick (0 to 100).")


class Loop(Message):
    pump_limited_by: str = Field(
        description="'flow', 'pressure' or the interlock holding the pump."
    )
    heater_limited_by: str = Field(description="'temperature' or the interlock holding the heater.")
    water_setpoint_c: float | None = quantity(
        "degC", "Water temperature the outer loop asks of the heater-cooler.", None
    )
    rate_integral_scale: float = quantity(
        "ratio",
        "The rewarming rate loop's integral gain over the configured "
        "control.temperature.gradient_pid.ki: 1, halved at each burst of heater-driven warming "
        "(a late or coarse perfusate probe), down to 0.25; kept while the daemon runs, and "
        "through a restart that continues the procedure (a rewarm_integral event says so).",
        1.0,
    )


class DrugPhase(Message):
    elapsed_s: float = quantity("s", "Time at target so far (the timer pauses off target).")
    remaining_s: float = quantity("s", "Time at target still to go.")
    counting: bool = Field(
        False,
        description="The timer runs now: perfusion, and the flow (or, at constant pressure, "
        "the pressure) and the perfusate temperature on target. False in perfusion: paused.",
    )


def drug_timer_paused(phase: str, remaining_s: float, counting: bool) -> bool:
    """In perfusion with drug time still to go and the timer standing still. Not once the
    time is done: without auto_advance the cart stays in perfusion with the timer stopped."""
    return phase == "perfusion" and remaining_s > 0.0 and not counting


class Timing(Message):
    tick_period_s: float = quantity("s", "Configured control period.")
    ticks: int = quantity("count", "Ticks run since the daemon started.")
    overruns: int = quantity("count", "Ticks that started late (took longer than the period).")


class Calibration(Message):
    """Calibration the daemon applies (core/calibration.py)."""

    pressure_zero_mmhg: float = quantity(
        "mmHg", "Transducer zero subtracted from every PA pressure reading."
    )
    stroke_volume_ml_per_rev: float = quantity("mL/rev", "Stroke volume of the feed-forward.")
    source: str = Field(description="configuration, commissioning <when> by <who>, or operator.")


class Commissioning(Message):
    """The gate on priming (docs/commissioning.md)."""

    status: str = Field(description="commissioned, waived (simulated cart) or not_commissioned.")
    detail: str = Field(description="Who and when, the waiver's reason, or why not.")
    valid_until: datetime | None = Field(None, description="UTC end of the passing run's validity.")


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
    calibration: Calibration | None = None
    commissioning: Commissioning | None = None


class Alarm(Message):
    id: str
    priority: str = Field(description="high, medium or low (IEC 60601-1-8).")
    presence: str = Field(description="on (condition present) or latched (awaiting reset).")
    acknowledged: bool
    audible: bool = Field(description="False when acknowledged or covered by an audio pause.")
    since: datetime = Field(description="UTC onset of this occurrence.")
    message: str = Field(description="Names the sensor, the value, the limit and the action.")
    value: float | None = Field(
        None, description="The value that raised the alarm, in the units of its signal."
    )
    limit: float | None = Field(None, description="The limit it crossed, in the same units.")


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
        "daemon (start, stop); record (sealed at a clean stop: its rows and chain head, for "
        "`ilup verify` to be checked against); rewarm_integral (the rewarming rate loop "
        "slowed its integral after a warming burst, or kept it so after a restart)."
    )
    alarm_id: str | None = None
    priority: str | None = None
    from_phase: str | None = None
    to_phase: str | None = None
    message: str
    operator: str | None = None
    value: float | None = Field(
        None,
        description="Alarm events: the value, in the units of the alarm's signal; "
        "rewarm_integral: the rate loop's integral gain over the configured (ratio).",
    )
    limit: float | None = Field(None, description="Alarm events: the limit, in the same units.")


class GuardStatus(Message):
    """Retained on ``<prefix>/<cart_id>/guard``: the independent safety layer (``ilup guard``);
    its last will sets ``online`` to false."""

    online: bool
    cart_id: str
    t: datetime | None = Field(None, description="UTC time of the guard cycle described.")
    instance: str | None = Field(None, description="Random id of the guard process.")
    since: datetime | None = Field(None, description="UTC time the guard came online.")
    form: dict[str, str] = Field(
        default_factory=dict,
        description="Per actuator, how the guard stops it: 'enable' (a channel the controller "
        "does not drive) or 'command' (it writes the safe value itself: the weaker form).",
    )
    enabled: dict[str, bool] = Field(
        default_factory=dict, description="Per actuator: false while the guard holds it off."
    )
    latched: dict[str, str] = Field(
        default_factory=dict, description="Per actuator held off: why (until an operator resets)."
    )
    hazards: dict[str, str] = Field(default_factory=dict, description="Hazards present now.")
    cycle_ms: float | None = quantity(
        "ms", "Duration of the last guard cycle (reads + acts).", None
    )


class GuardEvent(Message):
    """On ``<prefix>/<cart_id>/guard/events`` (not retained): the guard started or stopped,
    latched an actuator off, or was reset (or refused a reset)."""

    t: datetime
    seq: int = Field(ge=0, description="Event number since the guard started.")
    cart_id: str
    kind: str = Field(description="started, stopped, latched, reset, refused.")
    message: str
    operator: str | None = None


class GuardReset(Message):
    """On ``<prefix>/<cart_id>/guard/cmd/<user>/reset``: release the guard's latches. The
    broker ACL proves ``<user>``; the reply goes to ``.../reset/reply``."""

    command_id: str = Field(min_length=1, max_length=64)
    issued_at: AwareDatetime = Field(
        description="With its UTC offset; a reset older than 10 s is refused."
    )


class GuardReply(Message):
    command_id: str
    result: str = Field(description="ok or rejected.")
    detail: str = ""
