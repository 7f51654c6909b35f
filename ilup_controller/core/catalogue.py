"""The alarm catalogue: data, read by the small engine in core/alarms.py.

Each entry fixes what an alarm *is*: priority (IEC 60601-1-8: high = immediate response,
medium = prompt, low = awareness), whether it latches, the safe action it triggers per actuator,
the hazard it controls and its message. Priorities and latching are the manufacturer's decision
and are not configurable (a protective alarm cannot be made non-latching); thresholds and
condition delays are configuration (``alarms:`` in the cart file), with the defaults below.
docs/alarms.md is generated from this table (`python -m ilup_controller.core.catalogue`).
"""

from __future__ import annotations

import sys
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Priority(StrEnum):
    high = "high"
    medium = "medium"
    low = "low"


class PumpAction(StrEnum):
    none = "none"
    hold = "hold"  # speed may not rise above its value at onset
    stop = "stop"


class HeaterAction(StrEnum):
    none = "none"
    off = "off"


class AlarmDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    title: str
    priority: Priority
    technical: bool = Field(
        description="A fault of the equipment rather than of the patient circuit."
    )
    latching: bool
    delay_s: float = Field(ge=0.0, description="Default condition delay (debounce).")
    clear_delay_s: float = Field(
        0.0,
        ge=0.0,
        description="The condition must stay absent this long before the alarm ends: a rate "
        "hovering at its threshold is one occurrence, not one onset per crossing.",
    )
    suppressed_by: tuple[str, ...] = Field(
        (),
        description="While one of these alarms is present (on or latched), this condition "
        "counts as absent: the operator already has the alarm that acts on it.",
    )
    pump: PumpAction = PumpAction.none
    heater: HeaterAction = HeaterAction.none
    safe_stop: bool = Field(
        False,
        description="Its onset takes a running procedure to safe_stop: control was lost or the "
        "pump did not do what it was told, so nothing restarts until the operator resumes.",
    )
    hazard: str = Field(description="Hazard id in the risk table.")
    message: str = Field(description="Template: {value}, {limit}, {detail}.")

    @property
    def protective(self) -> bool:
        return self.pump is not PumpAction.none or self.heater is not HeaterAction.none

    @model_validator(mode="after")
    def _protective_latches(self) -> AlarmDef:
        if self.protective and not self.latching:
            raise ValueError(f"{self.id}: an alarm with a safe action must latch")
        if self.protective and self.suppressed_by:
            raise ValueError(f"{self.id}: an alarm with a safe action is never suppressed")
        return self

    def render(self, *, value: float | None, limit: float | None, detail: str) -> str:
        v = "?" if value is None else f"{value:.2f}"
        lim = "?" if limit is None else f"{limit:.2f}"
        return self.message.format(value=v, limit=lim, detail=detail).strip()


_H, _M, _L = Priority.high, Priority.medium, Priority.low
# Water this far above the perfusate: the heater is a heat source, and heating_rate (heater off)
# acts on the cause; below it the same rate is warming_uncontrolled (core/monitor.py).
HEATER_CONTRIBUTES_C = 0.5

_ENTRIES = [
    # ------------------------------------------------------------------ pressure and flow
    AlarmDef(
        id="pressure_alert",
        title="PA pressure above alert limit",
        priority=_M,
        technical=False,
        latching=True,
        delay_s=1.0,
        pump=PumpAction.hold,
        hazard="H1 overpressure: lung edema",
        message="PA pressure {value} mmHg >= alert limit {limit} mmHg: pump speed held",
    ),
    AlarmDef(
        id="pressure_high",
        title="PA pressure above alarm limit",
        priority=_H,
        technical=False,
        latching=True,
        delay_s=0.2,
        pump=PumpAction.stop,
        hazard="H1 overpressure: lung edema",
        message="PA pressure {value} mmHg >= alarm limit {limit} mmHg: pump stopped",
    ),
    AlarmDef(
        id="flow_deviation",
        title="Flow off target",
        priority=_M,
        technical=False,
        latching=False,
        delay_s=10.0,
        hazard="H5 under-perfusion: drug not delivered",
        message="flow {value} mL/min deviates from setpoint by more than {limit} mL/min{detail}",
    ),
    AlarmDef(
        id="pvr_rise",
        title="Vascular resistance rising",
        priority=_M,
        technical=False,
        latching=False,
        delay_s=30.0,
        hazard="H1 overpressure: lung edema",
        message="pressure/flow ratio {value} % above its baseline (limit {limit} %)",
    ),
    # ------------------------------------------------------------------ temperature
    AlarmDef(
        id="perfusate_high",
        title="Perfusate over temperature",
        priority=_H,
        technical=False,
        latching=True,
        delay_s=1.0,
        heater=HeaterAction.off,
        hazard="H3 overheating",
        message="perfusate {value} degC >= maximum {limit} degC: heater off",
    ),
    AlarmDef(
        id="perfusate_low",
        title="Perfusate under temperature",
        priority=_M,
        technical=False,
        latching=False,
        delay_s=60.0,
        hazard="H6 hypothermic perfusion",
        message="perfusate {value} degC below setpoint by more than {limit} degC",
    ),
    AlarmDef(
        id="water_cap",
        title="Heater water at its cap",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=1.0,
        heater=HeaterAction.off,
        hazard="H3 overheating",
        message="heater water {value} degC >= cap {limit} degC: heater off",
    ),
    AlarmDef(
        id="heating_rate",
        title="Rewarming too fast",
        priority=_M,
        technical=False,
        latching=True,
        delay_s=5.0,
        heater=HeaterAction.off,
        hazard="H7 gas emboli from outgassing",
        message="perfusate warming at {value} degC/min > {limit} degC/min with the heater "
        "contributing: heater off. Reset once the rate is back under the limit to resume "
        "rewarming",
    ),
    # Rule for a condition the controller cannot act on: it never latches an actuator off (that
    # would deadlock the procedure and change nothing) and its message says what to do.
    AlarmDef(
        id="warming_uncontrolled",
        title="Perfusate warming faster than the limit, not by the heater",
        priority=_M,
        technical=False,
        latching=False,
        delay_s=5.0,
        # A 2-minute rate of a 0.1 degC probe moves in 0.05 degC/min steps: at the limit it
        # crossed it 2-3 times a minute (cold primes: 2 onsets 6-7 s apart).
        clear_delay_s=30.0,
        # After heating_rate switched the heater off, the warmth already in the water keeps the
        # rate up with the water under 0.5 degC above the perfusate: the same event, not a
        # second one blaming the body.
        suppressed_by=("heating_rate",),
        hazard="H7 gas emboli from outgassing",
        message="perfusate warming at {value} degC/min > {limit} degC/min with the heater "
        f"water at most {HEATER_CONTRIBUTES_C:g} degC above it ({{detail}}): switching the "
        "heater off would not slow it. Heat comes from the body through the lung, from the "
        "room, or from warmth already in the exchanger. Check the lung and patient temperature; "
        "cool the water or lower the flow if it must slow. Rewarming continues on its own",
    ),
    AlarmDef(
        id="gradient",
        title="Water-to-perfusate gradient too high",
        priority=_M,
        technical=False,
        latching=True,
        delay_s=10.0,
        heater=HeaterAction.off,
        hazard="H7 gas emboli from outgassing",
        message="water {value} degC above perfusate (limit {limit} degC): heater off",
    ),
    # A welded relay (or a heater-cooler ignoring its command): software cannot switch it off,
    # so the message says who can. water_cap and the perfusate limit follow only much later.
    AlarmDef(
        id="heater_heats_when_off",
        title="Heater heating with its command at 0",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        heater=HeaterAction.off,
        hazard="H3 overheating",
        message="heater water warming at {value} degC/min with the heater commanded 0 % "
        "({detail}): the element heats against its command (a welded relay?). Software "
        "cannot switch it off: switch off the heater-cooler's supply",
    ),
    AlarmDef(
        id="heater_not_heating",
        title="Heater not heating as expected",
        priority=_M,
        technical=True,
        latching=True,
        delay_s=0.0,
        heater=HeaterAction.off,
        hazard="H3 overheating / H6 hypothermic perfusion",
        message="heater supervision: {detail}: heater off",
    ),
    # ------------------------------------------------------------------ volume, leak, air
    AlarmDef(
        id="reservoir_low",
        title="Reservoir level low",
        priority=_H,
        technical=False,
        latching=True,
        delay_s=1.0,
        pump=PumpAction.stop,
        hazard="H4 air pumped into the lung",
        message="reservoir {value} mL <= low limit {limit} mL: pump stopped",
    ),
    AlarmDef(
        id="leak",
        title="Perfusate leaking from the circuit",
        priority=_H,
        technical=False,
        latching=True,
        delay_s=10.0,
        hazard="H2 drug leak into the body",
        message="reservoir falling {value} mL/min > {limit} mL/min: consider washout",
    ),
    AlarmDef(
        id="air_detected",
        title="Air in the inflow line",
        priority=_H,
        technical=False,
        latching=True,
        delay_s=0.0,
        pump=PumpAction.stop,
        hazard="H4 air pumped into the lung",
        message="bubble detector: air in line: pump stopped",
    ),
    # ------------------------------------------------------------------ sensors
    AlarmDef(
        id="sensor_pressure",
        title="PA pressure sensor fault",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.5,
        pump=PumpAction.stop,
        hazard="H1 overpressure: lung edema",
        message="PA pressure sensor {detail}: pump stopped",
    ),
    AlarmDef(
        id="sensor_flow",
        title="Flow sensor fault",
        priority=_M,
        technical=True,
        latching=True,
        delay_s=0.5,
        pump=PumpAction.hold,
        hazard="H5 under-perfusion: drug not delivered",
        message="flow sensor {detail}: pump speed held",
    ),
    AlarmDef(
        id="sensor_temperature",
        title="Perfusate temperature sensor fault",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.5,
        heater=HeaterAction.off,
        hazard="H3 overheating",
        message="perfusate temperature sensor {detail}: heater off",
    ),
    AlarmDef(
        id="sensor_water",
        title="Heater water temperature sensor fault",
        priority=_M,
        technical=True,
        latching=True,
        delay_s=0.5,
        heater=HeaterAction.off,
        hazard="H3 overheating",
        message="water temperature sensor {detail}: heater off",
    ),
    AlarmDef(
        id="sensor_reservoir",
        title="Reservoir level sensor fault",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.5,
        pump=PumpAction.hold,
        hazard="H2 drug leak into the body / H4 air",
        message="reservoir level sensor {detail}: pump speed held",
    ),
    AlarmDef(
        id="sensor_air",
        title="Bubble detector fault",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.5,
        pump=PumpAction.stop,
        hazard="H4 air pumped into the lung",
        message="bubble detector {detail}: pump stopped",
    ),
    # ------------------------------------------------------------------ equipment
    AlarmDef(
        id="device_comms",
        title="Device not answering",
        priority=_H,
        technical=True,
        latching=False,
        delay_s=1.0,
        hazard="H8 loss of control",
        message="Modbus device {detail}",
    ),
    AlarmDef(
        id="pump_not_following",
        title="Pump speed not following its command",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=2.0,
        pump=PumpAction.stop,
        safe_stop=True,
        hazard="H5 under-perfusion / H1 overpressure",
        message="pump speed {value} rpm vs command {limit} rpm: pump stopped; check the pump "
        "head and drive, reset, then resume",
    ),
    AlarmDef(
        id="control_interrupted",
        title="Control was interrupted",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        pump=PumpAction.stop,
        heater=HeaterAction.off,
        safe_stop=True,
        hazard="H8 loss of control",
        message="no control for {value} s ({detail}): the device watchdogs may have stopped the "
        "pump and heater; pump held stopped and heater off until the operator resets and resumes",
    ),
    AlarmDef(
        id="pump_link_lost",
        title="Pump drive unreachable",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        pump=PumpAction.stop,
        safe_stop=True,
        hazard="H8 loss of control",
        message="pump drive silent for {value} s ({detail}): its watchdog may have stopped the "
        "pump; pump held stopped until the operator resets and resumes",
    ),
    AlarmDef(
        id="heater_link_lost",
        title="Heater unreachable",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        heater=HeaterAction.off,
        hazard="H3 overheating / H8 loss of control",
        message="heater silent for {value} s ({detail}): its watchdog may have switched it off; "
        "heater held off until the operator resets it (the pump keeps running)",
    ),
    AlarmDef(
        id="tick_overrun",
        title="Control tick overrun",
        priority=_L,
        technical=True,
        latching=False,
        delay_s=0.0,
        hazard="H8 loss of control",
        message="control tick missed its deadline {value} times in the last minute",
    ),
    AlarmDef(
        id="recorder",
        title="Procedure record not being written",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        hazard="H10 incomplete legal record of the procedure",
        message="procedure record: {detail}",
    ),
    AlarmDef(
        id="controller_restarted",
        title="Controller restarted",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        hazard="H8 loss of control",
        message="controller restarted after {value} s without control: {detail}; "
        "pump and heater held safe until the operator resumes",
    ),
    AlarmDef(
        id="record_unreadable",
        title="Last procedure record unreadable",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        pump=PumpAction.stop,
        heater=HeaterAction.off,
        hazard="H8 loss of control / H10 incomplete legal record of the procedure",
        message="last procedure record {detail} is unreadable and may hold an unfinished "
        "procedure: started in safe_stop with a new record; check the circuit, then reset and "
        "resume (to idle)",
    ),
    AlarmDef(
        id="remote_link",
        title="Remote monitoring lost",
        priority=_L,
        technical=True,
        latching=False,
        delay_s=5.0,
        hazard="H9 remote viewers see stale data",
        message="MQTT broker unreachable: remote viewers are not updated",
    ),
    # High and latching: while two clients share a cart_id, commands and state may belong to
    # the other cart, and the clash must be seen even if it has stopped by the time someone
    # looks. No safe action: the local loops still control their own devices correctly, and
    # stopping the pump would stop the legitimate cart's perfusion as well.
    AlarmDef(
        id="duplicate_cart_id",
        title="Another controller uses this cart's identity",
        priority=_H,
        technical=True,
        latching=True,
        delay_s=0.0,
        hazard="H10 commands and state reach the wrong cart",
        message="Two clients use one cart_id on the broker: {detail}. Remote commands and "
        "state may belong to the other cart; stop the other client or fix its cart_id",
    ),
    # Medium: control and its own interlocks go on, but a second failure (a control fault that
    # keeps the pump or heater on against a hazard) would go unchecked. No safe action: stopping
    # the perfusion because a watcher is gone would trade a possible hazard for a certain one.
    # Raised only on a cart whose file has a guard section.
    AlarmDef(
        id="guard_absent",
        title="Independent safety guard absent",
        priority=_M,
        technical=True,
        latching=False,
        delay_s=0.0,
        hazard="H1 overpressure / H3 overheating / H8 loss of control (second layer gone)",
        message="the independent safety guard (ilup guard) is not watching this cart: "
        "{detail}. Control goes on; restart the guard (`ilup guard -c CART`) or watch the "
        "pressure and temperatures closely",
    ),
]

CATALOGUE: dict[str, AlarmDef] = {d.id: d for d in _ENTRIES}
assert len(CATALOGUE) == len(_ENTRIES), "duplicate alarm id"
assert all(o in CATALOGUE for d in _ENTRIES for o in d.suppressed_by), "unknown suppressed_by"


# How a stuck sensor is found, and how long it takes (core/sensors.py, core/diagnostics.py).
STUCK_EVIDENCE = """\
## Stuck sensors: evidence and detection budgets

A healthy digital sensor may read one steady or quantised value for hours, so identical
readings alone never raise a sensor alarm, and a change of one least significant bit (the
register `scale`) is neither a jump nor noise. Stuck is declared only on evidence:

| evidence | sensors | detection budget | why |
|---|---|---|---|
| loss of the sensor's own noise signature: after >= 200 readings (60 s window, relearned when \
the pump moves to another operating point or the phase changes) in which consecutive values \
were equal <= 35 % of the time and went back and forth (>= 1/3 of their movement reversing \
the change before, by size: a noise-free sensor reading a ramp moves one way, then settles), a \
run of n identical readings with p^n < 1e-7 | all | `stuck_s` + condition delay: <= 2 s on the \
reference cart | the chance of a healthy sensor doing it is below 1e-7 |
| flow against pump speed x stroke volume (0.75-1.15 of it, +-10 % stroke volume and slip; \
+2 LSB + 10 mL/min, +30 mL/min low-flow cut-off) | flow | 1 s after the pump speed leaves the \
band + delay; 7 s for a 500 -> 350 mL/min target change | needs the pump to move |
| pressure against flow and the identified pressure/flow ratio (0.3 x it, >= 1 WU): the flow \
moved by dQ with 0.3 R dQ > 2 LSB + 0.5 mmHg | PA pressure | 3 s after that flow change + \
delay; 24 s for a ramped 500 -> 350 mL/min change | needs the flow to move; not above the \
pressure limit (an occluded line holds its pressure) |
| perfusate against water: the integral of (water - perfusate reading) bends away from a \
straight line by more than (2 LSB + 0.05 degC) x 600 s (+ its LSB over time), water taken \
60 s late for the probe's transport delay | perfusate temperature | minutes: ~6 min for a \
37 -> 35 degC target change (336 s) | the slowest exchanger against 3 L of perfusate |

Without noise and without a process change there is no evidence, and none is claimed: a
noise-free water-temperature or reservoir sensor that freezes is found by the loss of its noise
signature only if it has one; otherwise by heater supervision (water stuck low), the water cap
and gradient alarms, and the level and leak alarms.
"""


def render_markdown() -> str:
    lines = [
        "# Alarm catalogue",
        "",
        "Generated from `ilup_controller/core/catalogue.py` by "
        "`python -m ilup_controller.core.catalogue`; a test fails when they differ.",
        "Thresholds and condition delays are configuration (`alarms:` in the cart file); "
        "priority, latching and safe action are fixed here. An alarm with a safe action always "
        "latches: it stays until an operator resets it *and* its condition has cleared.",
        "",
        "An alarm marked *safe_stop* also takes a running procedure to safe_stop: nothing "
        "restarts until the operator resets it and resumes.",
        "",
        "**No alarm deadlocks a procedure without telling the operator what to do.** A safe "
        "action is taken only where it acts on the cause: `heating_rate` switches the heater "
        "off only while the heater contributes heat (its water more than "
        f"{HEATER_CONTRIBUTES_C:g} degC above the perfusate, whatever the command: a welded "
        "relay heats at 0 %), and its message says "
        "to reset once the rate is under the limit. When the circuit warms by itself (a cold "
        "prime warmed by the body through the lung) the same rate raises the advisory "
        "`warming_uncontrolled` instead: no latch, no actuator held off, and a message that "
        "names the likely source and what to do. It is suppressed while `heating_rate` is "
        "present: once the heater is off, the warmth left in its water keeps the rate up for a "
        "minute, and that is the same event. A heater that heats against its 0 % (a welded "
        "relay) raises `heater_heats_when_off` (high) once its water, above the perfusate, "
        "has warmed faster than `alarms.heater_off_rise_c_per_min` over "
        "`alarms.heater_off_window_s` (plus three standard errors of that slope: a noisy "
        "probe tilts it), or (a heater too weak for that rate) "
        "`alarms.heater_off_rise_c` above its lowest, with the command at 0; readings of the "
        "first `alarms.heater_off_settle_s` after the command went to 0 do not count (an "
        "element switched off gives its water the heat stored in it). Software cannot switch "
        "it off, so the message names who can (the heater-cooler's supply; `ilup guard`, "
        "where fitted, opens its contactor: docs/security.md). On the simulator it comes 45 s "
        "after the weld, where `heating_rate` came at 78 s and `perfusate_high` at 114 s; on "
        "a 300 W heater (`heater_300w`) at 154 s, where `perfusate_high` came at 450 s and "
        "`heating_rate` never (the perfusate warms under its limit).",
        "",
        "| id | title | priority | technical | latching | default delay (s) | clear delay (s) "
        "| pump | heater | procedure | suppressed by | hazard |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in _ENTRIES:
        lines.append(
            f"| `{d.id}` | {d.title} | {d.priority} | {'yes' if d.technical else 'no'} | "
            f"{'yes' if d.latching else 'no'} | {d.delay_s:g} | {d.clear_delay_s:g} | {d.pump} "
            f"| {d.heater} "
            f"| {'safe_stop' if d.safe_stop else '-'} | {', '.join(d.suppressed_by) or '-'} "
            f"| {d.hazard} |"
        )
    lines += ["", "## Messages", ""]
    lines += [f"- `{d.id}`: {d.message}" for d in _ENTRIES]
    return "\n".join(lines) + "\n\n" + STUCK_EVIDENCE


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
