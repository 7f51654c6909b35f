"""Fault injection for the plant simulator: scenario files, run-time messages and the injector.

A fault is a frozen pydantic model chosen by its ``kind`` (a discriminated union, so an error
names the exact field of the exact kind). Faults come from a scenario file (a timed list,
``load_scenario``) or, while the simulator runs, from JSON messages (``parse_runtime_message``;
the simulator runner subscribes to ``<prefix>/<cart_id>/sim/fault``). ``FaultInjector`` turns
them into changes of the plant model (sim/plant.py) and of the simulated Modbus devices (through
``DeviceHooks``), starting and ending each at its simulated time. It never reads a clock: time is
whatever ``advance(t_s)`` is given, so runs repeat exactly.

``python -m sim.faults --docs`` writes docs/faults.md from these models (``--check`` compares);
``python -m sim.faults FILE...`` validates scenario files.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ilup_controller.config.loader import ConfigError, format_validation_error, read_yaml_file
from ilup_controller.config.models import Name
from sim.plant import (
    NUMERIC_SENSOR_CHANNELS,
    SENSOR_CHANNELS,
    SENSOR_UNITS,
    DriftingSensor,
    DroppedSensor,
    NoisySensor,
    NumericSensorChannel,
    Plant,
    SensorChannel,
    SensorFault,
    SpikingSensor,
    StuckSensor,
)

__all__ = [
    "FAULT_KINDS",
    "ActiveFault",
    "DeviceHooks",
    "Fault",
    "FaultClear",
    "FaultInjector",
    "FaultKind",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "parse_runtime_fault",
    "parse_runtime_message",
    "render_docs",
    "scenario_from_data",
]

logger = logging.getLogger(__name__)

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "faults.md"
DOC_COMMAND = "python -m sim.faults --docs"
RUNTIME_TOPIC = "<prefix>/<cart_id>/sim/fault"

FaultKind = Literal[
    "occlusion",
    "leak",
    "air",
    "resistance",
    "pump_stall",
    "heater_stuck_on",
    "heater_failed",
    "sensor_stuck",
    "sensor_drift",
    "sensor_noise",
    "sensor_dropout",
    "sensor_spike",
    "device_unresponsive",
    "device_slow",
    "device_exception",
]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)
ClearTarget = Literal[FaultKind, "all"]
# Every code pymodbus 3.16 can send (ExcCodes); 4 = server device failure.
ModbusExceptionCode = Literal[1, 2, 3, 4, 5, 6, 7, 8, 10, 11]

NonNegFinite = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
PosFinite = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


# --------------------------------------------------------------------------- fault models


class _Strict(BaseModel):
    # Strict: "20" is not a number and 1 is not true, in a file or in a message.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _FaultBase(_Strict):
    at_s: NonNegFinite | None = Field(
        None,
        description="Start, in simulated seconds since the simulator started. Required in a "
        "scenario file; omitted or null in a run-time message = now.",
    )
    duration_s: PosFinite | None = Field(
        None, description="How long the fault lasts; omitted or null = until cleared."
    )


class OcclusionFault(_FaultBase):
    """Inflow line kinked or clamped downstream of the pressure sensor.

    Multiplies the cannula resistance by ``factor`` (20 = severe kink), or blocks the line
    (``complete: true``). The roller pump keeps pushing: the line pressure climbs by
    Q_pump / line compliance with no intrinsic limit (about 400 mmHg/s at 500 mL/min, complete).
    The flow meter at the pump outlet still reads the pump's flow.
    """

    kind: Literal["occlusion"] = "occlusion"
    factor: float | None = Field(
        None,
        ge=1.0,
        allow_inf_nan=False,
        description="Cannula resistance multiplier, >= 1 (1 = open line).",
    )
    complete: bool = Field(False, description="True: the line is fully blocked (no factor).")

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if self.complete == (self.factor is not None):
            raise ValueError("give either factor (>= 1) or complete: true")
        return self


class LeakFault(_FaultBase):
    """Perfusate leaves the isolated circuit into the body: the reservoir volume falls."""

    kind: Literal["leak"] = "leak"
    leak_ml_min: float = Field(
        gt=0.0, le=5000.0, allow_inf_nan=False, description="Volume lost, mL/min."
    )


class AirFault(_FaultBase):
    """A bubble (>= 0.5 mL, so detectable) is in the inflow line for the fault's duration.

    The bubble detector reads true meanwhile; a short duration (0.1 s) is a passing bubble.
    """

    kind: Literal["air"] = "air"


class ResistanceFault(_FaultBase):
    """Pulmonary vascular resistance rises (vasoconstriction, edema): a step and/or a drift.

    When the fault ends the resistance returns to what it was before it, drift included.
    """

    kind: Literal["resistance"] = "resistance"
    factor: float = Field(
        1.0, gt=0.0, le=100.0, allow_inf_nan=False, description="PVR multiplier (step)."
    )
    drift_per_min: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="Compounding PVR change per minute (0.01 = +1 %/min).",
    )

    @model_validator(mode="after")
    def _does_something(self) -> Self:
        if self.factor == 1.0 and self.drift_per_min == 0.0:
            raise ValueError("give factor != 1 and/or drift_per_min != 0")
        return self


class PumpStallFault(_FaultBase):
    """The pump rotor stops whatever the command (jammed head, drive fault).

    The speed slews to 0 (the tacho shows it) and resumes towards the command when it ends.
    """

    kind: Literal["pump_stall"] = "pump_stall"


class HeaterStuckOnFault(_FaultBase):
    """The heater element delivers 100 % whatever the command (welded relay).

    The heater-cooler's own thermostat still cuts out at the water cap unless
    ``thermostat_failed`` is true (worst case: the water keeps heating, about 3.8 degC/min).
    """

    kind: Literal["heater_stuck_on"] = "heater_stuck_on"
    thermostat_failed: bool = Field(False, description="The water cap cut-out fails as well.")


class HeaterFailedFault(_FaultBase):
    """The heater element delivers 0 W whatever the command: the water cools."""

    kind: Literal["heater_failed"] = "heater_failed"


class SensorStuckFault(_FaultBase):
    """The channel repeats the value it reported when the fault began, without noise."""

    kind: Literal["sensor_stuck"] = "sensor_stuck"
    channel: SensorChannel = Field(description="Instrument channel.")


class SensorDriftFault(_FaultBase):
    """The channel reads off by ``rate_per_min`` x minutes since the fault began."""

    kind: Literal["sensor_drift"] = "sensor_drift"
    channel: NumericSensorChannel = Field(description="Instrument channel (not air_detected).")
    rate_per_min: Finite = Field(description="Drift, channel units per minute (e.g. mmHg/min).")

    @model_validator(mode="after")
    def _nonzero(self) -> Self:
        if self.rate_per_min == 0.0:
            raise ValueError("rate_per_min must not be 0")
        return self


class SensorNoiseFault(_FaultBase):
    """The channel gets extra Gaussian noise of standard deviation ``sigma`` on every sample."""

    kind: Literal["sensor_noise"] = "sensor_noise"
    channel: NumericSensorChannel = Field(description="Instrument channel (not air_detected).")
    sigma: PosFinite = Field(description="Standard deviation, channel units.")


class SensorDropoutFault(_FaultBase):
    """The channel has no value: its register stops updating, so the reading goes stale."""

    kind: Literal["sensor_dropout"] = "sensor_dropout"
    channel: SensorChannel = Field(description="Instrument channel.")


class SensorSpikeFault(_FaultBase):
    """Single samples of the channel are offset by ``magnitude``.

    Either periodically (the first sample at or after the start, then one every ``period_s``)
    or at random with ``probability`` per sample, from a generator seeded from the plant seed.
    """

    kind: Literal["sensor_spike"] = "sensor_spike"
    channel: NumericSensorChannel = Field(description="Instrument channel (not air_detected).")
    magnitude: Finite = Field(description="Offset of a spiking sample, channel units.")
    period_s: PosFinite | None = Field(None, description="One spike per this many seconds.")
    probability: float | None = Field(
        None, gt=0.0, le=1.0, description="Chance that a sample spikes (0 < p <= 1)."
    )

    @model_validator(mode="after")
    def _one_pattern(self) -> Self:
        if self.magnitude == 0.0:
            raise ValueError("magnitude must not be 0")
        if (self.period_s is None) == (self.probability is None):
            raise ValueError("give exactly one of period_s or probability")
        return self


class DeviceUnresponsiveFault(_FaultBase):
    """The Modbus device accepts connections and requests but never replies."""

    kind: Literal["device_unresponsive"] = "device_unresponsive"
    device: Name = Field(description="Device name from the configuration's devices.")


class DeviceSlowFault(_FaultBase):
    """The Modbus device replies to every request only after ``delay_s``."""

    kind: Literal["device_slow"] = "device_slow"
    device: Name = Field(description="Device name from the configuration's devices.")
    delay_s: float = Field(
        gt=0.0,
        le=60.0,
        allow_inf_nan=False,
        description="Reply delay, wall-clock seconds (not scaled by the simulator's speed).",
    )


class DeviceExceptionFault(_FaultBase):
    """The Modbus device answers every request with a Modbus exception response."""

    kind: Literal["device_exception"] = "device_exception"
    device: Name = Field(description="Device name from the configuration's devices.")
    exception_code: ModbusExceptionCode = Field(
        4, description="Modbus exception code (4 = server device failure, 6 = busy)."
    )


PlantFault = (
    OcclusionFault
    | LeakFault
    | AirFault
    | ResistanceFault
    | PumpStallFault
    | HeaterStuckOnFault
    | HeaterFailedFault
)
SensorFaultModel = (
    SensorStuckFault | SensorDriftFault | SensorNoiseFault | SensorDropoutFault | SensorSpikeFault
)
DeviceFault = DeviceUnresponsiveFault | DeviceSlowFault | DeviceExceptionFault
Fault = Annotated[PlantFault | SensorFaultModel | DeviceFault, Field(discriminator="kind")]

FAULT_MODELS: tuple[type[_FaultBase], ...] = (
    OcclusionFault,
    LeakFault,
    AirFault,
    ResistanceFault,
    PumpStallFault,
    HeaterStuckOnFault,
    HeaterFailedFault,
    SensorStuckFault,
    SensorDriftFault,
    SensorNoiseFault,
    SensorDropoutFault,
    SensorSpikeFault,
    DeviceUnresponsiveFault,
    DeviceSlowFault,
    DeviceExceptionFault,
)
_SENSOR_MODELS = (
    SensorStuckFault,
    SensorDriftFault,
    SensorNoiseFault,
    SensorDropoutFault,
    SensorSpikeFault,
)
_DEVICE_MODELS = (DeviceUnresponsiveFault, DeviceSlowFault, DeviceExceptionFault)
_FAULT_ADAPTER: TypeAdapter[Fault] = TypeAdapter(Fault)


class FaultClear(_Strict):
    """Run-time message that ends active faults and drops scheduled ones that match.

    ``clear`` is a fault kind or ``all``; ``channel`` narrows a sensor kind to one channel and
    ``device`` a device kind to one device. The plant returns to its state before each fault.
    """

    clear: ClearTarget = Field(description="Fault kind to clear, or all.")
    channel: SensorChannel | None = Field(None, description="Only this channel (sensor kinds).")
    device: Name | None = Field(None, description="Only this device (device kinds).")

    @model_validator(mode="after")
    def _narrowing(self) -> Self:
        if self.channel is not None and not self.clear.startswith("sensor_"):
            raise ValueError("channel narrows sensor_* kinds only")
        if self.device is not None and not self.clear.startswith("device_"):
            raise ValueError("device narrows device_* kinds only")
        return self


class Scenario(_Strict):
    """A timed list of faults (``ilup sim --scenario FILE``). Every fault needs ``at_s``."""

    name: str = Field("", description="Short name, for logs.")
    description: str = Field("", description="What the scenario tests.")
    faults: list[Fault] = Field(description="Faults in any order; each starts at its at_s.")

    @model_validator(mode="after")
    def _timed(self) -> Self:
        missing = [f"faults[{i}].at_s" for i, f in enumerate(self.faults) if f.at_s is None]
        if missing:
            raise ValueError("; ".join(f"{path}: required in a scenario file" for path in missing))
        return self


# --------------------------------------------------------------------------- loading, parsing


class ScenarioError(ConfigError):
    """A scenario file that cannot be used; ``problems`` holds one line per error."""


def _problems(err: ValidationError) -> list[str]:
    return format_validation_error(err, union_tags=FAULT_KINDS, what="fault kind")


def scenario_from_data(data: Any, source: str = "<scenario>") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(source, ["the top level must be a mapping with a 'faults' list"])
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(source, _problems(e)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file; ScenarioError names every problem's key path."""
    data, source = read_yaml_file(path, ScenarioError)
    return scenario_from_data(data, source)


# A fault message is a flat object of a few fields; anything much bigger or deeper is hostile.
# Checked before parsing: json.loads recurses per nesting level (RecursionError, issue 8 #10).
MAX_MESSAGE_BYTES = 4096
MAX_MESSAGE_DEPTH = 8


def _nesting_depth(payload: bytes) -> int:
    """Deepest [ / { nesting of a JSON text, ignoring brackets inside strings (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def parse_runtime_message(payload: bytes) -> Fault | FaultClear:
    """A fault (has ``kind``) or a clear request (has ``clear``) from a run-time JSON message.

    Raises ValueError with a specific message for anything else.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"fault message too large: {len(payload)} bytes, at most {MAX_MESSAGE_BYTES}"
        )
    depth = _nesting_depth(payload)
    if depth > MAX_MESSAGE_DEPTH:
        raise ValueError(
            f"fault message nested too deep: {depth} levels, at most {MAX_MESSAGE_DEPTH}"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"fault message is not UTF-8: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"fault message is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"fault message must be a JSON object, got {type(data).__name__}")
    try:
        if "clear" in data and "kind" not in data:
            return FaultClear.model_validate(data)
        return _FAULT_ADAPTER.validate_python(data)
    except ValidationError as e:
        raise ValueError("invalid fault message: " + "; ".join(_problems(e))) from None


def parse_runtime_fault(payload: bytes) -> Fault:
    """A fault from a run-time JSON message (``at_s`` may be omitted: now); ValueError if not."""
    message = parse_runtime_message(payload)
    if isinstance(message, FaultClear):
        raise ValueError("this is a clear message, not a fault; use parse_runtime_message")
    return message


# --------------------------------------------------------------------------- the injector


class DeviceHooks(Protocol):
    """What the injector needs from the simulated Modbus devices (``SimModbusServers``)."""

    def set_unresponsive(self, device: str, on: bool) -> None: ...

    def set_delay(self, device: str, delay_s: float) -> None: ...

    def set_exception(self, device: str, code: int | None) -> None: ...


@dataclass(frozen=True, slots=True)
class ActiveFault:
    """A fault in effect: when it started and when it is due to end (None = until cleared)."""

    fault: Fault
    started_s: float
    ends_s: float | None
    # Plant attributes as they were before the fault, put back when it ends.
    restore: dict[str, object] = field(default_factory=dict, repr=False, compare=False)


_Slot = tuple[str, str]


def _slot(fault: Fault) -> _Slot:
    """Faults in one slot replace each other: one per plant kind, per channel, per device+kind."""
    if isinstance(fault, _SENSOR_MODELS):
        return ("sensor", fault.channel)
    if isinstance(fault, _DEVICE_MODELS):
        return (fault.kind, fault.device)
    return (fault.kind, "")


def _plant_settings(fault: PlantFault, plant: Plant) -> dict[str, object]:
    """Plant attributes a plant fault sets (all of them are restored when it ends)."""
    match fault:
        case OcclusionFault(complete=True):
            return {"occlusion_factor": math.inf}
        case OcclusionFault(factor=factor):
            assert factor is not None
            return {"occlusion_factor": factor}
        case LeakFault(leak_ml_min=leak):
            return {"leak_ml_min": leak}
        case AirFault():
            return {"air_in_line": True}
        case ResistanceFault(factor=factor, drift_per_min=drift):
            # The multiplier is listed unchanged so the drift accumulated is undone at the end.
            return {
                "pvr_factor": factor,
                "pvr_drift_per_min": drift,
                "pvr_drift_multiplier": plant.pvr_drift_multiplier,
            }
        case PumpStallFault():
            return {"pump_stalled": True}
        case HeaterStuckOnFault(thermostat_failed=failed):
            return {"heater_stuck_on": True, "heater_thermostat_failed": failed}
        case HeaterFailedFault():
            return {"heater_failed": True}


def _sensor_fault(fault: SensorFaultModel) -> SensorFault:
    match fault:
        case SensorStuckFault():
            return StuckSensor()
        case SensorDropoutFault():
            return DroppedSensor()
        case SensorDriftFault(rate_per_min=rate):
            return DriftingSensor(rate)
        case SensorNoiseFault(sigma=sigma):
            return NoisySensor(sigma)
        case SensorSpikeFault(magnitude=magnitude, period_s=period_s, probability=probability):
            return SpikingSensor(magnitude, period_s=period_s, probability=probability)


def _describe(fault: Fault) -> dict[str, object]:
    return fault.model_dump(exclude={"at_s", "duration_s"}, exclude_defaults=True) | {
        "kind": fault.kind
    }


class FaultInjector:
    """Starts and ends faults on a plant (and on simulated devices) at simulated times.

    ``advance(t_s)`` processes every start and end due at or before ``t_s`` in time order (an
    end before a start at the same time); it does not step the plant. ``step_plant_to(t_s)``
    steps the plant to each event time exactly, then to ``t_s``. A fault replaces an active one
    in the same slot (same plant kind, same sensor channel, or same device and kind); when a
    fault ends or is cleared the plant gets back what the fault changed.
    """

    def __init__(
        self,
        plant: Plant,
        device_hooks: DeviceHooks | None = None,
        *,
        devices: Collection[str] | None = None,
    ) -> None:
        self.plant = plant
        self.device_hooks = device_hooks
        self._devices = None if devices is None else frozenset(devices)
        self._active: dict[_Slot, ActiveFault] = {}
        self._pending: list[tuple[float, int, Fault]] = []  # heap on (at_s, order)
        self._order = 0

    @property
    def now_s(self) -> float:
        return self.plant.t_s

    @property
    def active(self) -> tuple[ActiveFault, ...]:
        return tuple(sorted(self._active.values(), key=lambda a: a.started_s))

    @property
    def pending(self) -> tuple[Fault, ...]:
        return tuple(f for _, _, f in sorted(self._pending))

    # ------------------------------------------------------------------ scheduling

    def check(self, fault: Fault) -> None:
        """ValueError if this injector cannot apply ``fault`` (no device hooks, unknown device)."""
        if isinstance(fault, _DEVICE_MODELS):
            if self.device_hooks is None:
                raise ValueError(f"{fault.kind} on {fault.device!r}: this simulator has no devices")
            if self._devices is not None and fault.device not in self._devices:
                known = sorted(self._devices)
                raise ValueError(f"{fault.kind}: no device named {fault.device!r}; known: {known}")

    def load(self, scenario: Scenario) -> None:
        """Schedule every fault of a scenario; nothing is scheduled if any fault is unusable."""
        for fault in scenario.faults:
            self.check(fault)
            self._check_not_past(fault)
        for fault in scenario.faults:
            self.schedule(fault)
        logger.info(
            "scenario loaded",
            extra={"scenario": scenario.name, "faults": len(scenario.faults), "t_s": self.now_s},
        )

    def schedule(self, fault: Fault) -> None:
        """Start ``fault`` at its ``at_s`` (None: now, at once)."""
        self.check(fault)
        self._check_not_past(fault)
        if fault.at_s is None:
            self.apply(fault)
            return
        self._order += 1
        heapq.heappush(self._pending, (fault.at_s, self._order, fault))
        logger.info("fault scheduled", extra={"fault": _describe(fault), "at_s": fault.at_s})

    def apply(self, fault: Fault) -> None:
        """Start ``fault`` now, whatever its ``at_s``; it lasts ``duration_s`` from now."""
        self.check(fault)
        self._start(fault, self.now_s)

    def clear(
        self,
        target: Fault | ClearTarget,
        *,
        channel: SensorChannel | None = None,
        device: str | None = None,
    ) -> list[Fault]:
        """End matching active faults and drop matching scheduled ones; returns them all.

        ``target``: a fault (that fault), a kind (every fault of that kind, narrowed by
        ``channel`` or ``device``) or ``"all"``.
        """
        if isinstance(target, str) and target != "all" and target not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {target!r}; known: {', '.join(FAULT_KINDS)}")

        def matches(fault: Fault) -> bool:
            if not isinstance(target, str):
                return fault == target
            if target != "all" and fault.kind != target:
                return False
            if channel is not None and getattr(fault, "channel", None) != channel:
                return False
            return device is None or getattr(fault, "device", None) == device

        cleared: list[Fault] = []
        for slot, active in list(self._active.items()):
            if matches(active.fault):
                self._end(slot, at_s=self.now_s, reason="cleared")
                cleared.append(active.fault)
        kept = [entry for entry in self._pending if not matches(entry[2])]
        cleared.extend(entry[2] for entry in sorted(self._pending) if matches(entry[2]))
        heapq.heapify(kept)
        self._pending = kept
        return cleared

    def handle_runtime_message(self, payload: bytes) -> Fault | FaultClear:
        """Parse and act on one run-time message (a fault or a clear); ValueError if bad."""
        message = parse_runtime_message(payload)
        if isinstance(message, FaultClear):
            cleared = self.clear(message.clear, channel=message.channel, device=message.device)
            logger.info(
                "run-time clear",
                extra={"clear": message.model_dump(), "cleared": len(cleared), "t_s": self.now_s},
            )
        else:
            self.schedule(message)
        return message

    # ------------------------------------------------------------------ time

    def next_event_s(self) -> float | None:
        """Time of the next start or end, or None if nothing is due ever."""
        times = [a.ends_s for a in self._active.values() if a.ends_s is not None]
        if self._pending:
            times.append(self._pending[0][0])
        return min(times) if times else None

    def advance(self, t_s: float) -> None:
        """Start and end every fault due at or before ``t_s``, in time order."""
        if not math.isfinite(t_s):
            raise ValueError(f"t_s must be finite, got {t_s!r}")
        while True:
            end_s, end_slot = min(
                ((a.ends_s, slot) for slot, a in self._active.items() if a.ends_s is not None),
                default=(math.inf, None),
            )
            start_s = self._pending[0][0] if self._pending else math.inf
            if end_slot is not None and end_s <= t_s and end_s <= start_s:
                self._end(end_slot, at_s=end_s, reason="duration over")  # ends first on a tie
                continue
            if start_s <= t_s:
                at_s, _, fault = heapq.heappop(self._pending)
                self._start(fault, at_s)
                continue
            return

    def step_plant_to(self, t_s: float) -> None:
        """Step the plant to ``t_s``, stopping at each fault start or end to apply it exactly."""
        while (event_s := self.next_event_s()) is not None and event_s <= t_s:
            self.plant.advance_to(event_s)
            self.advance(event_s)
        self.plant.advance_to(t_s)
        self.advance(t_s)

    # ------------------------------------------------------------------ effects

    def _check_not_past(self, fault: Fault) -> None:
        if fault.at_s is not None and fault.at_s < self.now_s:
            raise ValueError(
                f"{fault.kind}: at_s {fault.at_s:g} s is in the past (now {self.now_s:g} s)"
            )

    def _start(self, fault: Fault, at_s: float) -> None:
        slot = _slot(fault)
        if slot in self._active:
            self._end(slot, at_s=at_s, reason="replaced")
        restore: dict[str, object] = {}
        if isinstance(fault, _SENSOR_MODELS):
            self.plant.set_sensor_fault(fault.channel, _sensor_fault(fault))
        elif isinstance(fault, _DEVICE_MODELS):
            self._device_on(fault)
        else:
            for name, value in _plant_settings(fault, self.plant).items():
                restore[name] = getattr(self.plant, name)
                setattr(self.plant, name, value)
        ends_s = None if fault.duration_s is None else at_s + fault.duration_s
        self._active[slot] = ActiveFault(fault, at_s, ends_s, restore)
        logger.info(
            "fault started",
            extra={"fault": _describe(fault), "t_s": at_s, "ends_s": ends_s},
        )

    def _end(self, slot: _Slot, *, at_s: float, reason: str) -> None:
        active = self._active.pop(slot)
        fault = active.fault
        if isinstance(fault, _SENSOR_MODELS):
            self.plant.clear_sensor_fault(fault.channel)
        elif isinstance(fault, _DEVICE_MODELS):
            self._device_off(fault)
        else:
            for name, value in active.restore.items():
                setattr(self.plant, name, value)
        logger.info(
            "fault ended",
            extra={"fault": _describe(fault), "t_s": at_s, "reason": reason},
        )

    def _hooks(self) -> DeviceHooks:
        if self.device_hooks is None:  # check() refuses device faults first; never reached
            raise ValueError("this simulator has no devices")
        return self.device_hooks

    def _device_on(self, fault: DeviceFault) -> None:
        hooks = self._hooks()
        match fault:
            case DeviceUnresponsiveFault(device=device):
                hooks.set_unresponsive(device, True)
            case DeviceSlowFault(device=device, delay_s=delay_s):
                hooks.set_delay(device, delay_s)
            case DeviceExceptionFault(device=device, exception_code=code):
                hooks.set_exception(device, code)

    def _device_off(self, fault: DeviceFault) -> None:
        hooks = self._hooks()
        match fault:
            case DeviceUnresponsiveFault(device=device):
                hooks.set_unresponsive(device, False)
            case DeviceSlowFault(device=device):
                hooks.set_delay(device, 0.0)
            case DeviceExceptionFault(device=device):
                hooks.set_exception(device, None)


# --------------------------------------------------------------------------- documentation

# One example per kind: shown in the docs and parsed by the tests.
EXAMPLES: dict[FaultKind, dict[str, object]] = {
    "occlusion": {"kind": "occlusion", "factor": 20, "duration_s": 30},
    "leak": {"kind": "leak", "leak_ml_min": 50},
    "air": {"kind": "air", "duration_s": 0.5},
    "resistance": {"kind": "resistance", "factor": 1.5, "drift_per_min": 0.01},
    "pump_stall": {"kind": "pump_stall", "duration_s": 10},
    "heater_stuck_on": {"kind": "heater_stuck_on", "thermostat_failed": True},
    "heater_failed": {"kind": "heater_failed"},
    "sensor_stuck": {"kind": "sensor_stuck", "channel": "pa_pressure"},
    "sensor_drift": {"kind": "sensor_drift", "channel": "pa_pressure", "rate_per_min": 2.0},
    "sensor_noise": {"kind": "sensor_noise", "channel": "flow", "sigma": 20},
    "sensor_dropout": {"kind": "sensor_dropout", "channel": "perfusate_temperature"},
    "sensor_spike": {
        "kind": "sensor_spike",
        "channel": "pa_pressure",
        "magnitude": 40,
        "period_s": 10,
    },
    "device_unresponsive": {"kind": "device_unresponsive", "device": "pump", "duration_s": 5},
    "device_slow": {"kind": "device_slow", "device": "io", "delay_s": 0.4},
    "device_exception": {"kind": "device_exception", "device": "heater", "exception_code": 6},
}
CLEAR_EXAMPLES: tuple[dict[str, object], ...] = (
    {"clear": "occlusion"},
    {"clear": "sensor_stuck", "channel": "pa_pressure"},
    {"clear": "device_slow", "device": "io"},
    {"clear": "all"},
)
SCENARIO_EXAMPLE = """\
name: occlusion then leak
description: A kinked inflow line for 30 s, then a slow leak until the end.
faults:
  - {kind: occlusion, at_s: 600, duration_s: 30, factor: 20}
  - {kind: leak, at_s: 900, leak_ml_min: 25}
  - {kind: sensor_drift, at_s: 1200, duration_s: 300, channel: pa_pressure, rate_per_min: 1.5}
"""


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    text = str(prop.get("type", "any"))
    bounds = [
        f"{op} {prop[key]}"
        for key, op in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if key in prop
    ]
    return text + (", " + ", ".join(bounds) if bounds else "")


def _fields_table(model: type[BaseModel], last: Collection[str] = ()) -> list[str]:
    schema = model.model_json_schema()
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    # The tag first, the common timing fields last.
    names = sorted(props, key=lambda n: (n != "kind") + (n in last))
    lines = ["| Field | Type | Required | Default | Description |", "|---|---|---|---|---|"]
    for name in names:
        prop = props[name]
        is_tag = name == "kind" and "const" in prop
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop and not is_tag else ""
        needed = "yes" if name in required or is_tag else "no"
        description = prop.get("description", "")
        lines.append(
            f"| `{name}` | {_type(prop)} | {needed} | {default} | {description} |".replace(
                "\n", " "
            )
        )
    return lines


def _doc(model: type[BaseModel]) -> str:
    text = (model.__doc__ or "").strip().replace("``", "`")
    return "\n".join(line.strip() for line in text.splitlines())


def render_docs() -> str:
    """docs/faults.md, generated from the models above."""
    out: list[str] = [
        "# Simulator fault injection",
        "",
        f"<!-- Generated by `{DOC_COMMAND}` from sim/faults.py. Do not edit by hand. -->",
        "",
        "The plant simulator can break on purpose, so the controller's alarms and safe states",
        "can be tested against the failures they exist for. Faults come from two places:",
        "",
        "- a **scenario file**, a timed list loaded at start: `ilup sim -c config/sim.yaml "
        "--scenario FILE` (examples in `config/scenarios/`);",
        f"- **run-time messages**: JSON published to `{RUNTIME_TOPIC}` while the simulator runs,"
        " e.g. `ilup/sim_cart_1/sim/fault`. `<prefix>` is `mqtt.topic_prefix` (default `ilup`)."
        " Publish without the retain flag: a retained fault would hit every simulator that"
        " starts later.",
        "",
        "A message or file that does not validate is refused as a whole, with one line per"
        " problem naming its key path (e.g. `faults[1].leak_ml_min: required key is missing`);"
        " the simulator logs a refused run-time message and carries on.",
        "`python -m sim.faults FILE...` validates scenario files without running anything.",
        "",
        "## Timing",
        "",
        "- Times are simulated seconds since the simulator started (at speed x10, 60 s of"
        " simulated time pass in 6 s of wall time).",
        "- `at_s` is required in a scenario file. In a run-time message, omit it (or send null)"
        " to start the fault now; a time in the past is refused.",
        "- `duration_s` omitted or null: the fault lasts until cleared.",
        "- `at_s` and `duration_s` are simulated time; `delay_s` of `device_slow` is wall-clock"
        " time, the reply delay the controller sees.",
        "- Faults in the same *slot* replace each other: one per plant fault kind, one per sensor"
        " channel (whatever the sensor fault), one per device and device fault kind. At the same"
        " time an end is applied before a start.",
        "- When a fault ends or is cleared, what it changed goes back to what it was before it.",
        "",
        "## Fault kinds",
        "",
        "| `kind` | Effect | Parameters |",
        "|---|---|---|",
    ]
    base_fields = set(_FaultBase.model_fields)
    for model in FAULT_MODELS:
        kind = model.model_fields["kind"].default
        params = [n for n in model.model_fields if n not in base_fields and n != "kind"]
        first_line = _doc(model).split("\n", 1)[0]
        param_text = ", ".join(f"`{p}`" for p in params) or "none"
        out.append(f"| [`{kind}`](#{kind.replace('_', '-')}) | {first_line} | {param_text} |")
    out += [
        "",
        "## Sensor channels",
        "",
        "Sensor faults name a channel. Each channel is served in the register of the signal"
        " named by the `simulator.bindings` field of the same name. `air_detected` is a bool: it"
        " can be stuck or drop out, but not drift, be noisy or spike (a short `air` fault is a"
        " spurious detection).",
        "",
        "| `channel` | Units | Faults |",
        "|---|---|---|",
    ]
    for channel in SENSOR_CHANNELS:
        numeric = channel in NUMERIC_SENSOR_CHANNELS
        kinds = "stuck, drift, noise, dropout, spike" if numeric else "stuck, dropout"
        out.append(f"| `{channel}` | {SENSOR_UNITS[channel]} | {kinds} |")
    for model in FAULT_MODELS:
        kind = model.model_fields["kind"].default
        example = json.dumps(EXAMPLES[kind])
        out += [
            "",
            f"## {kind}",
            "",
            _doc(model),
            "",
            *_fields_table(model, last=base_fields),
            "",
            "```json",
            example,
            "```",
        ]
    out += [
        "",
        "## Clearing faults at run time",
        "",
        _doc(FaultClear),
        "",
        *_fields_table(FaultClear),
        "",
        "```json",
        *(json.dumps(example) for example in CLEAR_EXAMPLES),
        "```",
        "",
        "## Scenario files",
        "",
        _doc(Scenario),
        "",
        *_fields_table(Scenario),
        "",
        "```yaml",
        SCENARIO_EXAMPLE.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim.faults", description="Simulator faults: docs and scenario checks."
    )
    parser.add_argument("scenarios", nargs="*", type=Path, help="scenario files to validate")
    parser.add_argument("--docs", action="store_true", help="write docs/faults.md")
    parser.add_argument("--check", action="store_true", help="fail if docs/faults.md is stale")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="docs file path")
    args = parser.parse_args(argv)
    status = 0
    if args.docs or args.check:
        text = render_docs()
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if args.check:
            if current != text:
                print(f"{args.output} is out of date: run `{DOC_COMMAND}`", file=sys.stderr)
                status = 1
        elif current != text:
            args.output.write_text(text, encoding="utf-8")
            print(f"wrote {args.output}")
    for path in args.scenarios:
        try:
            scenario = load_scenario(path)
        except ScenarioError as e:
            print(e.report(), file=sys.stderr)
            status = 1
        else:
            print(f"{path}: ok, {len(scenario.faults)} fault(s)")
    if not (args.docs or args.check or args.scenarios):
        parser.print_usage(sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
