"""Configuration schema: the single source of truth for every setting of a cart.

Every clinical number here is a *default* taken from ../shared/domain.md (engineering
placeholders, not clinical advice); a site overrides them in its YAML file. Register maps live
only in configuration (``devices`` and ``signals``); no address is written in code.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ilup_controller.config.operators import (
    WILDCARD,
    CommandLimits,
    OperatorRole,
    UserName,
)


class Strict(BaseModel):
    """Base for all config models: unknown keys are errors and loaded config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


NonNeg = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Pos = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


# --------------------------------------------------------------------------- devices and signals


class Watchdog(Strict):
    """The device's own communication watchdog: without a write for ``timeout_s`` it goes to
    its safe state by itself (pump stops, heater off). Armed and read back at start-up."""

    signal: Name = Field(description="Writable signal holding the watchdog timeout, seconds.")
    timeout_s: Pos = Field(1.0, le=60.0)


class SerialLine(Strict):
    """One RS-485 line, as its RTU devices reach it. Devices naming the same ``port`` share the
    line and must agree on every setting here (one master, one request at a time)."""

    port: str = Field(
        min_length=1, description="Serial device path, e.g. /dev/serial/by-id/... or /dev/ttyUSB0."
    )
    baudrate: int = Field(19200, ge=1200, le=921600)
    parity: Literal["N", "E", "O"] = Field("E", description="Modbus default: even parity.")
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[8] = Field(8, description="RTU frames are 8-bit (7 would be ASCII mode).")
    inter_frame_delay_s: NonNeg | None = Field(
        None,
        le=1.0,
        description="Silence before every request; default 3.5 characters (1.75 ms above "
        "19200 baud), as the Modbus serial line specification asks.",
    )

    @property
    def char_s(self) -> float:
        """Time on the line of one character (start, data, parity and stop bits)."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate

    @property
    def frame_gap_s(self) -> float:
        if self.inter_frame_delay_s is not None:
            return self.inter_frame_delay_s
        return 0.00175 if self.baudrate > 19200 else 3.5 * self.char_s


class Device(Strict):
    """One Modbus device (an I/O module, a pump drive, a heater): over TCP, or over RTU on an
    RS-485 line that it may share with other devices (distinct ``unit_id``s)."""

    transport: Literal["tcp", "rtu"] = Field(
        "tcp", description="tcp: host/port; rtu: the serial line in 'serial'."
    )
    host: str = Field("127.0.0.1", description="TCP only.")
    port: int = Field(502, ge=1, le=65535, description="TCP only.")
    serial: SerialLine | None = Field(
        None, validate_default=True, description="RTU only: the RS-485 line."
    )
    unit_id: int = Field(1, ge=0, le=247)
    timeout_s: Pos = Field(0.25, le=5.0, description="Per-request reply timeout.")
    retries: int = Field(0, ge=0, le=3, description="Resends after a timeout before giving up.")
    reconnect_min_s: Pos = Field(0.1, description="First reconnect delay; doubles per failure.")
    reconnect_max_s: Pos = Field(5.0, description="Ceiling of the reconnect back-off.")
    poll_period_s: Pos | None = Field(
        None, description="Poll period; default: the control tick period."
    )
    watchdog: Watchdog | None = Field(
        None, description="Required on every device that drives an actuator."
    )

    @field_validator("host", "port")
    @classmethod
    def _tcp_only(cls, v: object, info: ValidationInfo) -> object:
        if info.data.get("transport") == "rtu":
            raise ValueError("a TCP setting; an rtu device is reached through serial.port")
        return v

    @field_validator("serial")
    @classmethod
    def _serial_for_rtu(cls, v: SerialLine | None, info: ValidationInfo) -> SerialLine | None:
        transport = info.data.get("transport")
        if transport == "rtu" and v is None:
            raise ValueError("required when transport is rtu")
        if transport == "tcp" and v is not None:
            raise ValueError("only for transport: rtu")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.transport == "rtu" and self.unit_id == 0:
            # 0 is the RTU broadcast address: no device replies to it.
            raise ValueError("unit_id 0 is the RTU broadcast address; use 1..247")
        return self

    @property
    def where(self) -> str:
        """Where the device is reached, for logs and messages."""
        if self.serial is not None:
            s = self.serial
            line = f"{s.baudrate} {s.bytesize}{s.parity}{s.stopbits}"
            return f"{s.port} ({line}) unit id {self.unit_id}"
        return f"{self.host}:{self.port} unit id {self.unit_id}"


class Table(StrEnum):
    holding = "holding"
    input = "input"
    coil = "coil"
    discrete = "discrete"


class DataType(StrEnum):
    uint16 = "uint16"
    int16 = "int16"
    uint32 = "uint32"
    int32 = "int32"
    float32 = "float32"
    bool = "bool"


REGISTER_COUNT: dict[DataType, int] = {
    DataType.uint16: 1,
    DataType.int16: 1,
    DataType.uint32: 2,
    DataType.int32: 2,
    DataType.float32: 2,
    DataType.bool: 1,
}


class Signal(Strict):
    """A named point on a device: engineering value = raw * scale + offset."""

    device: Name
    table: Table
    address: int = Field(ge=0, le=65535)
    data_type: DataType = DataType.uint16
    word_order: Literal["big", "little"] = Field(
        "big", description="Order of the 16-bit words of 32-bit values (bytes are always big)."
    )
    scale: Finite = 1.0
    offset: Finite = 0.0
    units: str = ""
    writable: bool = False
    range: tuple[Finite, Finite] | None = Field(
        None, description="Plausible engineering range; a reading outside it is a sensor fault."
    )

    @property
    def register_count(self) -> int:
        return REGISTER_COUNT[self.data_type]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        bit_table = self.table in (Table.coil, Table.discrete)
        if bit_table != (self.data_type is DataType.bool):
            raise ValueError("coil/discrete tables hold data_type bool, registers hold numbers")
        if self.writable and self.table in (Table.input, Table.discrete):
            raise ValueError(f"a {self.table} table is read-only; writable needs holding or coil")
        if self.scale == 0.0:
            raise ValueError("scale must not be 0")
        if self.range is not None and self.range[0] >= self.range[1]:
            raise ValueError("range must be [low, high] with low < high")
        if self.address + self.register_count - 1 > 65535:
            raise ValueError("value runs past register 65535")
        return self


# --------------------------------------------------------------------------- control


class PidGains(Strict):
    kp: NonNeg = Field(description="Proportional gain (output units per measurement unit).")
    ki: NonNeg = Field(0.0, description="Integral gain (output units per unit per second).")
    kd: NonNeg = Field(0.0, description="Derivative gain on measurement (units x seconds).")


class FlowLoop(Strict):
    """Pump speed from measured flow: feed-forward from stroke volume plus a PI trim."""

    measured: Name = Field(description="Signal: measured circuit flow, mL/min.")
    command: Name = Field(description="Signal: pump speed command, rpm.")
    speed_measured: Name | None = Field(None, description="Signal: pump tacho, rpm (shown only).")
    target_ml_min: NonNeg = Field(500.0, le=5000.0)
    ramp_s: NonNeg = Field(180.0, description="Time to ramp from 0 to the flow target.")
    stroke_volume_ml_per_rev: Pos = Field(33.0, description="3/8 in tubing on a 6 in head.")
    pid: PidGains = PidGains(kp=0.02, ki=0.04)
    trim_limit_rpm: Pos = Field(
        5.0, description="Largest correction the PI may add to the feed-forward speed."
    )
    speed_max_rpm: Pos = Field(40.0, description="Hard ceiling on the pump speed command.")
    slew_rpm_per_s: Pos = Field(5.0, description="Largest change of the speed command per second.")


class PressureLimiter(Strict):
    """Override control: caps the pump speed so PA pressure stays under the limit."""

    measured: Name = Field(description="Signal: PA inflow pressure, mmHg.")
    limit_mmhg: Pos = Field(25.0, le=100.0, description="Pressure the pump must not push above.")
    margin_mmhg: NonNeg = Field(
        2.0, description="The limiter regulates at limit - margin, so noise stays under the limit."
    )
    pid: PidGains = PidGains(kp=0.6, ki=1.2)
    filter_s: NonNeg = Field(0.3, description="Low-pass time constant on the limiter's input.")
    stop_mmhg: Pos = Field(
        30.0, le=100.0, description="Interlock: at or above this the pump stops (latched)."
    )

    @model_validator(mode="after")
    def _margin(self) -> Self:
        if self.margin_mmhg >= self.limit_mmhg:
            raise ValueError("margin_mmhg must be below limit_mmhg")
        if self.stop_mmhg <= self.limit_mmhg:
            raise ValueError("stop_mmhg must be above limit_mmhg")
        return self


class TemperatureLoop(Strict):
    """Cascade: perfusate temperature -> heater water setpoint -> heater power."""

    measured: Name = Field(description="Signal: perfusate (arterial line) temperature, degC.")
    water_measured: Name = Field(description="Signal: heater water temperature, degC.")
    command: Name = Field(description="Signal: heater power command, %.")
    target_c: Finite = Field(37.0, ge=20.0, le=42.0)
    ramp_c_per_min: Pos = Field(
        0.48,
        le=2.0,
        description="Rewarming rate asked of the perfusate, degC/min; under the 0.5 degC/min "
        "guideline limit by the margin a 2-minute window of readings needs.",
    )
    window_rate_c_per_min: Pos = Field(
        0.49,
        le=2.0,
        description="The asked rate keeps the perfusate's rise over every "
        "alarms.heating_rate_window_s (over its lowest reading) within this rate: a cooler "
        "plug passing the probe as the flow ramps, and the ramp after it, must not add up "
        "to a window over the guideline. Between ramp_c_per_min and "
        "alarms.heating_rate_c_per_min.",
    )
    landing_s: Pos = Field(
        60.0,
        ge=10.0,
        le=1800.0,
        description="Time constant of the approach to the target, s: the asked rate is "
        "(target - perfusate) / landing_s, at most ramp_c_per_min (no overshoot).",
    )
    rate_window_s: Pos = Field(
        30.0,
        ge=5.0,
        le=300.0,
        description="Perfusate warming rate: slope of a line through this much of the "
        "readings, s (longer: smoother on a coarse or noisy probe, slower).",
    )
    exchanger_time_constant_s: NonNeg = Field(
        60.0,
        le=1800.0,
        description="Perfusate heat capacity over exchanger UA (C/UA), s: the feed-forward "
        "gradient for a rate is rate x this. `ilup tune --loop perfusate` measures it.",
    )
    water_cap_c: Finite = Field(42.0, le=42.0, description="Heater water never above this.")
    max_gradient_c: Pos = Field(
        3.6,
        le=10.0,
        description="Water setpoint at most this far above the perfusate; below "
        "alarms.gradient_c, so the water's own overshoot and noise stay under the alarm.",
    )
    ramp_integral_per_s: NonNeg = Field(
        0.005,
        le=0.1,
        description="Second integral of the rewarming rate loop, per s: while the ramp runs, "
        "the rate loop's integral is itself integrated at this rate, which learns a loss that "
        "grows as the perfusate warms (tubing to the room, lung to the body) so the warming "
        "rate holds the ramp instead of trailing it; only while the warming trails the ramp. "
        "0: off.",
    )
    gradient_slew_c_per_s: Pos = Field(
        0.02,
        le=10.0,
        description="The asked water-to-perfusate gradient rises at most this fast, degC/s: "
        "at the start of rewarming the feed-forward and the proportional kick do not land at "
        "once (an exchanger stronger than exchanger_time_constant_s says would overshoot "
        "the guideline rate).",
    )
    gradient_pid: PidGains = Field(
        PidGains(kp=1.0, ki=0.05),
        description="Outer loop: perfusate warming-rate error (degC/min) to the water-to-"
        "perfusate gradient (degC): kp in degC per degC/min, ki per second. Each burst of "
        "warming (a long probe delay) halves ki for the rest of the run, down to 1/4 "
        "(core/rewarm.py).",
    )
    inner_pid: PidGains = Field(
        PidGains(kp=50.0, ki=1.0),
        description="Inner loop: water temperature error (degC) to heater power (%).",
    )
    heater_max_pct: Finite = Field(100.0, gt=0.0, le=100.0)
    max_c: Finite = Field(
        39.0, le=42.0, description="Interlock: perfusate at or above this turns the heater off."
    )
    min_flow_ml_min: NonNeg = Field(
        100.0, description="No heating below this flow (a stagnant heat exchanger overheats)."
    )

    @model_validator(mode="after")
    def _ceiling(self) -> Self:
        if self.target_c >= self.max_c:
            raise ValueError("target_c must be below max_c")
        return self


class Control(Strict):
    tick_period_s: Pos = Field(0.1, ge=0.005, le=1.0, description="Control tick (default 10 Hz).")
    stale_after_s: Pos = Field(
        1.0, description="A reading older than this is missing, never reused as current."
    )
    autostart: bool = Field(
        False,
        description="Start perfusing as soon as every sensor reads (simulator demos only; "
        "a real cart waits for the perfusionist).",
    )
    flow: FlowLoop
    pressure: PressureLimiter
    temperature: TemperatureLoop
    reservoir_measured: Name | None = Field(None, description="Signal: reservoir volume, mL.")
    air_measured: Name | None = Field(None, description="Signal: bubble detector (bool).")

    @model_validator(mode="after")
    def _flow_trim_per_tick(self) -> Self:
        # The pump answers a speed command within about a tick, so a trim that corrects more
        # than the whole flow error per tick overshoots every tick: with the default gains a
        # 0.5 s tick made healthy pumps oscillate into pump_not_following (safe stop); 0.3 s
        # (106 %) doubled the flow RMS; 0.5 s with ki 0.02 (99 %) ran clean.
        f, dt_s = self.flow, self.tick_period_s
        share = f.stroke_volume_ml_per_rev * (f.pid.kp + f.pid.ki * dt_s + f.pid.kd / dt_s)
        if share > 1.0:
            raise ValueError(
                f"flow.pid (kp {f.pid.kp:g}, ki {f.pid.ki:g}, kd {f.pid.kd:g}) with "
                f"tick_period_s {dt_s:g} s and flow.stroke_volume_ml_per_rev "
                f"{f.stroke_volume_ml_per_rev:g}: the flow trim would correct "
                f"{share * 100:.0f} % of a flow error in one tick and the pump speed would "
                "oscillate (at most 100 %: "
                "stroke_volume x (kp + ki x tick + kd / tick) <= 1). Lower flow.pid.ki or kp, "
                "or tick_period_s"
            )
        return self


# --------------------------------------------------------------------------- safety


class SensorLimits(Strict):
    """Plausibility checks of one safety sensor (range comes from the signal's ``range``)."""

    max_rate_per_s: Pos = Field(description="Largest believable change per second.")
    max_noise: Pos = Field(description="Noise (standard deviation) above this over 2 s = noisy.")
    stuck_s: Pos = Field(
        description="Identical readings may be called stuck only after this long, and only "
        "with evidence (docs/alarms.md)."
    )


class Alarms(Strict):
    """Alarm thresholds and delays. Priority, latching and action are fixed by the catalogue."""

    audio_pause_s: Pos = Field(120.0, le=120.0, description="Audio pause length (max 120 s).")
    delays_s: dict[str, NonNeg] = Field(
        default_factory=dict, description="Condition delay per alarm id, overriding the default."
    )
    flow_deviation_pct: Pos = 10.0
    flow_deviation_min_ml_min: Pos = 25.0
    perfusate_low_c: Pos = Field(1.5, description="Alarm when this far below the setpoint.")
    heating_rate_c_per_min: Pos = 0.5
    heating_rate_window_s: Pos = 120.0
    gradient_c: Pos = Field(4.0, description="Water above perfusate (when perfusate >= 30 degC).")
    reservoir_low_ml: NonNeg = 300.0
    leak_ml_min: Pos = Field(20.0, description="Reservoir volume loss rate that means a leak.")
    leak_window_s: Pos = 60.0
    pvr_rise_pct: Pos = Field(10.0, description="Pressure/flow ratio worse than baseline by this.")
    pvr_baseline_s: Pos = Field(60.0, description="Baseline: mean over this long at target.")
    pump_follow_rpm: Pos = Field(1.0, description="Tacho may differ from command by this...")
    pump_follow_pct: Pos = Field(10.0, description="...or by this share of the command.")
    heater_hysteresis_c: Pos = Field(1.0, description="verify_heater: band around the setpoint.")
    heater_max_error_c_s: Pos = Field(120.0, description="verify_heater: cumulative error limit.")
    heater_check_gain_time_s: Pos = Field(120.0, description="Time allowed to rise by the gain.")
    heater_gain_c: Pos = Field(0.5, description="Rise expected within check_gain_time_s.")
    heater_off_rise_c_per_min: Pos = Field(
        0.5,
        description="heater_heats_when_off: the water warming this fast (over "
        "heater_off_window_s, above the perfusate) with the heater commanded 0.",
    )
    heater_off_window_s: Pos = Field(
        30.0, ge=5.0, description="heater_heats_when_off: the window of that rise."
    )
    heater_off_settle_s: NonNeg = Field(
        20.0,
        le=120.0,
        description="heater_heats_when_off: the water readings of this long after the "
        "command went to 0 do not count. An element switched off from full power gives its "
        "water the heat stored in it (a few tenths of a degC within about 20 s), and over a "
        "30-s window that is as steep as a weld.",
    )
    heater_off_rise_c: Pos = Field(
        0.5,
        description="heater_heats_when_off, for a heater too weak to warm its water at "
        "heater_off_rise_c_per_min: the water (a line through heater_off_window_s of "
        "readings, above the perfusate) this far above its lowest since the heater was "
        "commanded 0. An element switched off adds a few tenths from its stored heat.",
    )
    overrun_window_s: Pos = 60.0
    # A clamped line under a roller pump climbs up to ~75 mmHg/s at full speed: only jumps
    # beyond what the circuit can do are implausible.
    pressure: SensorLimits = SensorLimits(max_rate_per_s=150.0, max_noise=2.0, stuck_s=1.0)
    flow: SensorLimits = SensorLimits(max_rate_per_s=3000.0, max_noise=30.0, stuck_s=1.0)
    temperature: SensorLimits = SensorLimits(max_rate_per_s=2.0, max_noise=0.3, stuck_s=30.0)
    water: SensorLimits = SensorLimits(max_rate_per_s=2.0, max_noise=0.5, stuck_s=30.0)
    reservoir: SensorLimits = SensorLimits(max_rate_per_s=300.0, max_noise=20.0, stuck_s=10.0)

    @field_validator("delays_s")
    @classmethod
    def _known_alarms(cls, v: dict[str, float]) -> dict[str, float]:
        from ilup_controller.core.catalogue import CATALOGUE

        unknown = sorted(set(v) - set(CATALOGUE))
        if unknown:
            raise ValueError(f"unknown alarm id(s) {unknown}; known: {sorted(CATALOGUE)}")
        return v


class Procedure(Strict):
    """Phase timing. ``auto_advance`` walks the phases by these timers (simulator demos)."""

    priming_flow_ml_min: NonNeg = 150.0
    priming_s: Pos = Field(60.0, description="Auto-advance only: time spent priming.")
    drug_phase_s: Pos = Field(1800.0, description="Drug phase: time at target (30 min).")
    washout_s: Pos = Field(600.0, description="Washout duration (10 min).")
    at_target_flow_pct: Pos = Field(
        10.0,
        description="Drug timer counts with the flow within this band of its target (constant "
        "flow)...",
    )
    at_target_pressure_mmhg: Pos = Field(
        2.0,
        description="...or, at constant pressure, with the pressure within this of where the "
        "pressure loop holds it (limit - margin), or the flow at its ceiling...",
    )
    at_target_temperature_c: Pos = Field(0.5, description="...and within this of target.")
    auto_advance: bool = False


# --------------------------------------------------------------------------- MQTT


class MqttTls(Strict):
    ca_file: str = Field(description="CA certificate that signed the broker's certificate.")
    cert_file: str | None = Field(None, description="Client certificate, when the broker asks.")
    key_file: str | None = None


class Mqtt(Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["3.1.1", "5"] = "5"
    username: str | None = None
    password: str | None = Field(
        None,
        description=(
            "Broker password in the YAML (lowest precedence). Prefer password_file, "
            "$ILUP_MQTT_PASSWORD or the systemd credential mqtt-password (docs/deployment.md)."
        ),
    )
    password_file: str | None = Field(
        None,
        description=(
            "File holding the broker password (one line, mode 0600). Used unless the systemd "
            "credential $CREDENTIALS_DIRECTORY/mqtt-password or $ILUP_MQTT_PASSWORD is set."
        ),
    )
    tls: MqttTls | None = Field(None, description="Connect over TLS (port 8883 usually).")
    topic_prefix: str = Field("ilup", pattern=r"^[A-Za-z0-9_\-/]+$")
    keepalive_s: int = Field(5, ge=2, le=600)
    state_period_s: Pos = Field(0.5, le=1.0, description="State is published at least 1 Hz.")
    queue_size: int = Field(
        2000, ge=1, le=100000, description="Events and replies waiting for the broker."
    )
    reconnect_max_s: Pos = 5.0

    @field_validator("password_file")
    @classmethod
    def _one_password_source(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("password") is not None:
            raise ValueError("set either mqtt.password or mqtt.password_file, not both")
        return v


# --------------------------------------------------------------------------- record


class Record(Strict):
    """Durable procedure record: one SQLite file (WAL, synchronous=FULL) per procedure."""

    directory: str = Field("records", description="Directory of the record files.")
    sample_every_ticks: int = Field(
        1, ge=1, description="Record every Nth control tick (1: every tick)."
    )
    queue_size: int = Field(
        10000, ge=1, description="Rows waiting for the writer; a full queue drops and alarms."
    )


# --------------------------------------------------------------------------- simulator


class SimPlant(Strict):
    """Physical parameters of the simulated circuit (sources in sim/plant.py)."""

    seed: int = 1
    stroke_volume_ml_per_rev: Pos = Field(33.0, description="True stroke volume of the pump.")
    pump_slew_rpm_per_s: Pos = 30.0
    pump_brake_rpm_per_s: Pos = 200.0
    pvr_wu: Pos = Field(12.0, description="Single-lung vascular resistance R0, Wood units.")
    alpha_per_mmhg: Pos = 0.02
    outflow_pressure_mmhg: NonNeg = 3.0
    cannula_resistance_mmhg_min_per_l: NonNeg = 16.0
    compliance_ml_per_mmhg: Pos = 1.0
    line_compliance_ml_per_mmhg: Pos = Field(
        0.3, description="Inflow line between pump and cannula (where the pressure sensor sits)."
    )
    perfusate_volume_ml: Pos = 1000.0
    reservoir_volume_ml: NonNeg = 800.0
    initial_perfusate_c: Finite = 34.0
    initial_water_c: Finite = 34.0
    ambient_c: Finite = 22.0
    body_c: Finite = 36.0
    heater_power_w: Pos = 800.0
    water_mass_kg: Pos = 3.0
    water_cap_c: Finite = Field(42.0, description="The heater's own thermostat cut-out.")
    hx_ua_w_per_k: Pos = 60.0
    tubing_volume_ml: NonNeg = Field(
        70.0,
        le=1000.0,
        description="Tubing between heat exchanger and arterial probe: the probe's transport "
        "delay is this volume over the flow (8.4 s at 500 mL/min for 70 mL).",
    )
    pressure_noise_mmhg: NonNeg = 0.2
    pressure_offset_mmhg: Finite = Field(
        0.3, ge=-20.0, le=20.0, description="Transducer zero offset added to the reading."
    )
    flow_noise_ml_min: NonNeg = 3.0
    temperature_noise_c: NonNeg = 0.01
    tubing_ua_w_per_k: NonNeg = Field(3.0, description="Perfusate circuit to ambient.")
    water_ambient_ua_w_per_k: NonNeg = Field(6.0, description="Heater water tank+hoses to ambient.")
    lung_ua_w_per_k_per_l_min: NonNeg = Field(
        40.0, description="Perfusate to body through the lung, per L/min of lung flow."
    )
    pump_speed_noise_rpm: NonNeg = 0.05
    water_temperature_noise_c: NonNeg = 0.02
    reservoir_volume_noise_ml: NonNeg = 2.0
    flow_cutoff_ml_min: NonNeg = Field(
        0.0,
        le=200.0,
        description="Flow meter low-flow cut-off: a reading of magnitude below this is exactly "
        "0.0, as digital meters report at rest (0: no cut-off).",
    )
    pump_slip_per_mmhg: NonNeg = Field(
        0.0,
        le=0.02,
        description="Share of the pump's geometric flow lost per mmHg of line pressure (back-leak "
        "of an under-occluded roller; 0.004 loses 6 % at 15 mmHg; 0: fully occlusive).",
    )
    heater_supply_max_w: Pos | None = Field(
        None,
        le=5000.0,
        description="Most power the heater's own supply delivers: commands above "
        "heater_supply_max_w / heater_power_w saturate (None: the full heater_power_w).",
    )


class SimBindings(Strict):
    """Which configured signal carries each plant quantity (the sim serves these registers)."""

    pump_speed_command: Name
    heater_power_command: Name
    flow: Name
    pa_pressure: Name
    perfusate_temperature: Name
    water_temperature: Name
    pump_speed: Name | None = None
    reservoir_volume: Name | None = None
    air_detected: Name | None = Field(None, description="Bubble detector on the inflow line.")
    pump_enable: Name | None = Field(
        None, description="Coil: the pump drive's run-enable (off: the pump does not turn)."
    )
    heater_enable: Name | None = Field(
        None, description="Coil: the heater contactor (off: the heater gives 0 W)."
    )


class Simulator(Strict):
    plant: SimPlant = SimPlant()
    bindings: SimBindings
    step_s: Pos = Field(0.01, le=0.1, description="Physics integration step.")
    serial_ports: dict[str, str] = Field(
        default_factory=dict,
        description="RTU devices: the port the simulator serves for each serial.port the "
        "controller opens (the other end of a pty or null-modem pair).",
    )


# --------------------------------------------------------------------------- guard


class Guard(Strict):
    """The independent safety layer, ``ilup guard`` (docs/security.md): a second process that
    re-reads the safety sensors over its own Modbus connections and stops an actuator the
    controller leaves on against a hazard. Limits left unset take the control limit; a set
    one must be equal to it or looser (checked at load), so the two layers never fight."""

    cycle_s: Pos = Field(0.05, le=0.1, description="Guard cycle (at least 10 Hz).")
    budget_s: Pos | None = Field(
        None,
        le=5.0,
        description="How long a hazard may persist with its actuator still on before the "
        "guard acts; default one control tick + 0.1 s (the controller acts first).",
    )
    pressure_stop_mmhg: Pos | None = Field(
        None, le=150.0, description="PA pressure hazard; default control.pressure.stop_mmhg."
    )
    perfusate_max_c: Finite | None = Field(
        None, le=45.0, description="Perfusate hazard; default control.temperature.max_c."
    )
    water_max_c: Finite | None = Field(
        None, le=45.0, description="Heater water hazard; default control.temperature.water_cap_c."
    )
    reservoir_low_ml: NonNeg | None = Field(
        None, description="Reservoir hazard (at or below); default alarms.reservoir_low_ml."
    )
    unreadable_s: Pos = Field(
        1.5, le=10.0, description="A safety sensor unreadable this long is a hazard."
    )
    heartbeat: Literal["modbus", "mqtt"] = Field(
        "modbus",
        description="Controller heartbeat: the counter the daemon writes each tick to "
        "heartbeat_signal (modbus), or the seq of its MQTT state (mqtt).",
    )
    heartbeat_signal: Name | None = Field(
        None, description="Writable uint16 register (scale 1) the daemon counts in each tick."
    )
    heartbeat_s: Pos = Field(
        1.0, le=10.0, description="Heartbeat unchanged this long with an actuator on: a hazard."
    )
    pump_enable: Name | None = Field(
        None,
        description="Output the guard alone writes: the pump drive's run-enable (safe torque "
        "off) input, true = may run. None: the guard writes speed 0 itself (weaker form).",
    )
    heater_enable: Name | None = Field(
        None,
        description="Output the guard alone writes: the heater contactor or enable, true = may "
        "heat. None: the guard writes heater 0 itself (weaker form).",
    )
    status_timeout_s: Pos = Field(
        3.0,
        le=60.0,
        description="The daemon raises guard_absent when the guard's status is older than this.",
    )
    log_file: str | None = Field(None, description="The guard's own log (default: stderr only).")
    mqtt_username: str | None = Field(
        None,
        description="The guard's own broker user (ACL role ilup-guard); default mqtt.username. "
        "Its password comes from the guard's own service credential (deploy/ilup-guard@.service).",
    )

    @property
    def heartbeat_register(self) -> str | None:
        """The signal whatever drives the actuators counts in (the daemon each tick, `ilup
        tune` each sample), or None when the heartbeat is the MQTT state."""
        return self.heartbeat_signal if self.heartbeat == "modbus" else None


# --------------------------------------------------------------------------- commissioning


class Commissioning(Strict):
    """The gate: ``phase priming`` is refused (``not_commissioned``) unless ``ilup commission``
    passed for this exact configuration (SHA-256) within ``max_age_h``. Only a simulated cart
    may waive it, and the waiver is shown in ``ilup status`` and the state."""

    max_age_h: Pos = Field(24.0, le=24.0 * 365, description="A passing run is valid this long.")
    waive: bool = Field(False, description="Simulated carts only: no commissioning needed.")
    reason: str = Field("", max_length=200, description="Why the gate is waived (required).")
    file: str | None = Field(
        None,
        description="Commissioning file; default <cart file without .yaml>.commissioning.json "
        "next to the cart file.",
    )
    heater_power_measured: Name | None = Field(
        None,
        description="Signal: the heater's own power readback, %, when it has one; the heater "
        "watchdog test needs it to see the heater fall to 0.",
    )

    @model_validator(mode="after")
    def _reasoned(self) -> Self:
        if self.waive and not self.reason.strip():
            raise ValueError("waive: true needs a reason (shown in ilup status and the state)")
        return self


# --------------------------------------------------------------------------- the cart


class CartConfig(Strict):
    cart_id: Name
    simulated: bool = Field(False, description="True when the devices are the plant simulator.")
    devices: dict[Name, Device] = Field(min_length=1)
    signals: dict[Name, Signal] = Field(min_length=1)
    control: Control
    alarms: Alarms = Alarms()
    procedure: Procedure = Procedure()
    mqtt: Mqtt = Mqtt()
    record: Record = Record()
    simulator: Simulator | None = None
    operators: dict[UserName, OperatorRole] | None = Field(
        None,
        description="Broker user -> role (monitor, assistant, operator); config/operators.py. "
        "Absent: no command is accepted. '*': the role of every user not named (simulated "
        "carts only).",
    )
    commands: CommandLimits = CommandLimits()
    guard: Guard | None = Field(None, description="The independent safety layer, `ilup guard`.")
    commissioning: Commissioning = Commissioning()

    @field_validator("signals")
    @classmethod
    def _finite_scale(cls, v: dict[str, Signal]) -> dict[str, Signal]:
        for s in v.values():
            if not math.isfinite(s.scale * 65535.0):
                raise ValueError("scale too large")
        return v

    @model_validator(mode="after")
    def _cross_references(self) -> Self:
        errors: list[str] = []
        for name, sig in self.signals.items():
            if sig.device not in self.devices:
                errors.append(f"signals.{name}.device: no device named {sig.device!r}")
        c = self.control
        refs: list[tuple[str, str, bool]] = [
            ("control.flow.measured", c.flow.measured, False),
            ("control.flow.command", c.flow.command, True),
            ("control.pressure.measured", c.pressure.measured, False),
            ("control.temperature.measured", c.temperature.measured, False),
            ("control.temperature.water_measured", c.temperature.water_measured, False),
            ("control.temperature.command", c.temperature.command, True),
        ]
        for path, opt in (
            ("control.flow.speed_measured", c.flow.speed_measured),
            ("control.reservoir_measured", c.reservoir_measured),
            ("control.air_measured", c.air_measured),
        ):
            if opt is not None:
                refs.append((path, opt, False))
        if self.simulator is not None:
            for field, value in self.simulator.bindings:
                if value is not None:
                    refs.append((f"simulator.bindings.{field}", value, False))
        for path, ref, must_write in refs:
            sig_or_none = self.signals.get(ref)
            if sig_or_none is None:
                errors.append(f"{path}: no signal named {ref!r}")
            elif must_write and not sig_or_none.writable:
                errors.append(f"{path}: signal {ref!r} is not writable")
        for path, cmd in (
            ("control.flow.command", c.flow.command),
            ("control.temperature.command", c.temperature.command),
        ):
            actuator = self.signals.get(cmd)
            if actuator is None or actuator.device not in self.devices:
                continue
            dev_name = actuator.device
            wd = self.devices[dev_name].watchdog
            if wd is None:
                errors.append(
                    f"devices.{dev_name}.watchdog: required: {path} drives an "
                    "actuator on this device"
                )
                continue
            wd_sig = self.signals.get(wd.signal)
            if wd_sig is None or not wd_sig.writable or wd_sig.device != dev_name:
                errors.append(
                    f"devices.{dev_name}.watchdog.signal: {wd.signal!r} must be a "
                    f"writable signal of device {dev_name!r}"
                )
        if c.temperature.max_gradient_c >= self.alarms.gradient_c:
            errors.append(
                f"control.temperature.max_gradient_c: {c.temperature.max_gradient_c:g} degC must "
                f"be below alarms.gradient_c ({self.alarms.gradient_c:g} degC), or the "
                "controller's own gradient raises the alarm"
            )
        t, a = c.temperature, self.alarms
        if not t.ramp_c_per_min <= t.window_rate_c_per_min <= a.heating_rate_c_per_min:
            errors.append(
                f"control.temperature.window_rate_c_per_min: {t.window_rate_c_per_min:g} "
                f"degC/min must lie between control.temperature.ramp_c_per_min "
                f"({t.ramp_c_per_min:g}) and alarms.heating_rate_c_per_min "
                f"({a.heating_rate_c_per_min:g})"
            )
        if self.commissioning.waive and not self.simulated:
            errors.append(
                "commissioning.waive: only a simulated cart (simulated: true) may waive "
                "commissioning; run ilup commission on a real cart"
            )
        hp = self.commissioning.heater_power_measured
        if hp is not None and hp not in self.signals:
            errors.append(f"commissioning.heater_power_measured: no signal named {hp!r}")
        errors.extend(_overlaps(self.signals))
        errors.extend(_serial_lines(self.devices, self.simulator))
        errors.extend(_line_budgets(self))
        errors.extend(_operator_list(self))
        errors.extend(_guard_checks(self))
        if errors:
            raise ValueError("; ".join(errors))
        return self


def _operator_list(cfg: CartConfig) -> list[str]:
    ops = cfg.operators or {}
    errors: list[str] = []
    if WILDCARD in ops and not cfg.simulated:
        errors.append(
            f"operators.{WILDCARD}: a wildcard is only allowed on a simulated cart; name each "
            "broker user with its role"
        )
    daemon = cfg.mqtt.username
    if daemon and daemon in ops:
        errors.append(
            f"operators.{daemon}: the daemon's own user (mqtt.username) sends no commands"
        )
    return errors


def _overlaps(signals: dict[str, Signal]) -> list[str]:
    """Two signals sharing a register would silently overwrite each other."""
    seen: dict[tuple[str, Table, int], str] = {}
    errors: list[str] = []
    for name, s in signals.items():
        for reg in range(s.address, s.address + s.register_count):
            key = (s.device, s.table, reg)
            other = seen.get(key)
            if other is not None and other != name:
                errors.append(
                    f"signals.{name}.address: register {s.table} {reg} on {s.device!r} "
                    f"is also used by {other!r}"
                )
                break
            seen[key] = name
    return errors


def _serial_lines(devices: dict[str, Device], simulator: Simulator | None) -> list[str]:
    """RTU devices on one port share a line: same settings, distinct unit ids."""
    errors: list[str] = []
    first: dict[str, tuple[str, Device]] = {}  # port -> first device on it
    units: dict[tuple[str, int], str] = {}
    for name, dev in devices.items():
        if dev.serial is None:
            continue
        port = dev.serial.port
        if port not in first:
            first[port] = (name, dev)
        else:
            other_name, other = first[port]
            assert other.serial is not None
            mine, theirs = dev.serial.model_dump(), other.serial.model_dump()
            diff = ", ".join(
                f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]
            )
            if diff:
                errors.append(
                    f"devices.{name}.serial: differs from devices.{other_name}.serial on the "
                    f"same port {port} ({diff}); one line has one set of settings"
                )
        clash = units.get((port, dev.unit_id))
        if clash is not None:
            errors.append(
                f"devices.{name}.unit_id: {dev.unit_id} is also used by devices.{clash} "
                f"on serial port {port}"
            )
        units.setdefault((port, dev.unit_id), name)
    if simulator is not None:
        for port, (name, _) in first.items():
            if port not in simulator.serial_ports:
                errors.append(
                    f"simulator.serial_ports: no entry for {port!r} (devices.{name}.serial.port):"
                    " the simulator serves the other end of the line"
                )
        for port in simulator.serial_ports:
            if port not in first:
                errors.append(f"simulator.serial_ports.{port}: no rtu device on this port")
    return errors


def _line_budgets(cfg: CartConfig) -> list[str]:
    """A line that cannot carry its devices' cycles at their poll periods is refused: the
    readings would silently age (shared/libraries.md 7.6)."""
    from ilup_controller.modbus.bus import line_time_per_cycle_s

    share: dict[str, list[tuple[str, float, float]]] = {}  # port -> (device, ms, period)
    for name, dev in cfg.devices.items():
        if dev.serial is None:
            continue
        signals = {n: s for n, s in cfg.signals.items() if s.device == name}
        busy_s = line_time_per_cycle_s(dev.serial, signals)
        period_s = dev.poll_period_s or cfg.control.tick_period_s
        share.setdefault(dev.serial.port, []).append((name, busy_s, period_s))
    errors: list[str] = []
    for port, devices in share.items():
        load = sum(busy_s / period_s for _, busy_s, period_s in devices)
        if load > 1.0:
            first = devices[0][0]
            baud = cfg.devices[first].serial.baudrate  # type: ignore[union-attr]
            parts = ", ".join(
                f"{n} {busy_s * 1000:.1f} ms every {period_s * 1000:.0f} ms"
                for n, busy_s, period_s in devices
            )
            errors.append(
                f"devices.{first}.serial.baudrate: line {port} at {baud} baud would be busy "
                f"{load * 100:.0f}% of the time ({parts}); raise the baud rate or the "
                "devices' poll_period_s"
            )
    return errors


def _guard_checks(cfg: CartConfig) -> list[str]:
    """The guard's limits are the control limits or looser (never a fight with control), its
    outputs are its own, and it needs connections of its own (TCP: an RS-485 line has one
    master, the controller)."""
    g = cfg.guard
    if g is None:
        return []
    c, errors = cfg.control, []
    looser: list[tuple[str, float | None, float, str, bool]] = [
        (
            "pressure_stop_mmhg",
            g.pressure_stop_mmhg,
            c.pressure.stop_mmhg,
            "control.pressure.stop_mmhg",
            True,
        ),
        (
            "perfusate_max_c",
            g.perfusate_max_c,
            c.temperature.max_c,
            "control.temperature.max_c",
            True,
        ),
        (
            "water_max_c",
            g.water_max_c,
            c.temperature.water_cap_c,
            "control.temperature.water_cap_c",
            True,
        ),
        (
            "reservoir_low_ml",
            g.reservoir_low_ml,
            cfg.alarms.reservoir_low_ml,
            "alarms.reservoir_low_ml",
            False,
        ),
    ]
    for key, mine, theirs, where, above in looser:
        if mine is not None and (mine < theirs if above else mine > theirs):
            side = "below" if above else "above"
            errors.append(
                f"guard.{key}: {mine:g} is {side} {where} ({theirs:g}): the guard's limit must "
                "equal the control limit or be looser, or the two layers fight"
            )
    if g.budget_s is not None and g.budget_s < c.tick_period_s:
        errors.append(
            f"guard.budget_s: {g.budget_s:g} s is shorter than control.tick_period_s "
            f"({c.tick_period_s:g} s): the controller must get one tick to act first"
        )
    if g.heartbeat == "modbus" and g.heartbeat_signal is None:
        errors.append("guard.heartbeat_signal: required when guard.heartbeat is modbus")
    commands = {c.flow.command, c.temperature.command}
    outputs = [("pump_enable", g.pump_enable), ("heater_enable", g.heater_enable)]
    for key, name in [*outputs, ("heartbeat_signal", g.heartbeat_signal)]:
        sig = cfg.signals.get(name) if name is not None else None
        if name is None:
            continue
        if sig is None:
            errors.append(f"guard.{key}: no signal named {name!r}")
        elif not sig.writable:
            errors.append(f"guard.{key}: signal {name!r} is not writable")
        elif name in commands:
            errors.append(f"guard.{key}: {name!r} is a control command; the guard needs its own")
        elif key == "heartbeat_signal" and (
            sig.data_type is not DataType.uint16 or sig.scale != 1.0 or sig.offset != 0.0
        ):
            errors.append(f"guard.{key}: {name!r} must be uint16 with scale 1 and offset 0")
    if g.pump_enable is not None and g.pump_enable == g.heater_enable:
        errors.append("guard.heater_enable: the pump and the heater need separate enables")
    used = {
        cfg.signals[n].device
        for n in (
            c.pressure.measured,
            c.temperature.measured,
            c.temperature.water_measured,
            c.flow.command,
            c.temperature.command,
            c.reservoir_measured,
            c.air_measured,
            g.pump_enable,
            g.heater_enable,
            g.heartbeat_signal,
        )
        if n is not None and n in cfg.signals
    }
    for dev in sorted(used):
        if dev in cfg.devices and cfg.devices[dev].transport != "tcp":
            errors.append(
                f"guard: device {dev!r} is on an RS-485 line, whose one master is the "
                "controller; the guard needs its own connection (a TCP device or gateway)"
            )
    return errors
