"""Physics model of a simulated ILuP circuit, stepped in virtual time.

Pure and deterministic: no asyncio, sockets or wall clock; the only randomness is sensor noise
from ``random.Random(params.seed)`` (and from per-fault generators seeded from it). State lives in
plain attributes so fault injection (sim/faults.py) can poke it; each physical sub-model is one
method, and instrument failures are a layer of ``SensorFault`` objects applied in ``sensors()``.

Sub-models and parameters (``SimPlant`` fields; confidence tags from shared/domain.md:
H read in source, M derived, L placeholder):

Roller pump (``_step_pump``)
    Occlusive, no intrinsic pressure limit (domain.md, equipment, M). The actual speed follows the
    command with a slew limit ``pump_slew_rpm_per_s`` (30 rpm/s, L placeholder for drive
    acceleration) and brakes at ``pump_brake_rpm_per_s`` (200 rpm/s, L: a roller head at 15 rpm
    stops within a tenth of a second). Flow = speed x ``stroke_volume_ml_per_rev`` (33 mL/rev:
    3/8 in tubing on a 6 in head, M; real pumps spread +-10-15 %, so the controller's own
    stroke volume may differ).
    ``pump_stalled`` (fault): the rotor stops, the speed slews to 0 whatever the command.

Inflow line and vascular bed (``_step_hydraulics``)
    Two compliance nodes. The inflow line between the pump and the cannula,
    ``line_compliance_ml_per_mmhg`` (0.3 mL/mmHg, L: ~1.5 m of PVC tubing, connectors and the
    transducer dome), carries
    the pressure sensor: C_l dP_l/dt = Q_pump - Q_c, Q_c = (P_l - P) / R_c through the cannula.
    The pulmonary artery, ``compliance_ml_per_mmhg`` (1 mL/mmHg, L):
    C dP/dt = Q_c - Q_lung(P). Q_lung inverts the distensible-vessel law (Linehan 1992, M form,
    H alpha): Ppa = ([(1+a Pla)^5 + 5 a R0 Q]^(1/5) - 1)/a, so
    Q_lung = ((1+a P)^5 - (1+a Pla)^5)/(5 a R0) [L/min], and 0 for P <= Pla (no backflow).
    ``alpha_per_mmhg`` 0.02 (H); ``outflow_pressure_mmhg`` Pla 3 (closed atrium 3-5, H);
    ``pvr_wu`` R0 12 WU (injured/ex-vivo lungs 2.3-8.7 WU for both, x ~2 for one lung,
    M/L) times the disturbances ``pvr_factor`` and a compounding ``pvr_drift_per_min``
    (Pogrebniak 1994: 15 -> 32 mmHg over 90 min at fixed settings, H). R_c is
    ``cannula_resistance_mmhg_min_per_l`` (16 mmHg min/L, L) times ``occlusion_factor`` (fault: a
    kinked or clamped line downstream of the sensor; ``math.inf`` = complete occlusion, Q_c = 0).
    Defaults at 500 mL/min: 7.1 mmHg vascular + 8.0 cannula = 15.1 mmHg at the sensor (12-15 mmHg
    animal practice, H). The line node's time constant R_c C_l is 19 ms at defaults, so it only
    matters when the line occludes: the roller pump then pushes Q_pump / C_l into it (417 mmHg/s at
    500 mL/min, complete occlusion) with no intrinsic limit (domain.md), as a real roller pump does
    until the tubing or a connector gives way. Integration is backward Euler: the line equation is
    linear, so Q_c is eliminated in closed form and the vascular pressure is solved by Newton (1-3
    iterations). The node time constant C/(dQ_lung/dP) is ~0.4 s at defaults but ~10 ms at C = 0.2
    and high flow, where explicit Euler at 10 ms would ring; the implicit step neither rings nor
    overshoots at any step, and stays exact for R_c = 0 and R_c = inf.

Thermal (``_step_thermal``)
    Two lumped nodes, explicit Euler (time constants >= ~10 s, far above the step):
    water  m_w c_w dTw/dt = heater - UA_hx (Tw - Tp) - UA_wa (Tw - T_amb)
    perfusate m_p c_p dTp/dt = UA_hx (Tw - Tp) - UA_tube (Tp - T_amb) - UA_lung (Tp - T_body)
    ``heater_power_w`` 800 W (L), delivered as heater_pct % of it unless the heater-cooler's own
    thermostat has cut out: off at Tw >= ``water_cap_c`` (42 degC, STS/SCA/AmSECT 2015, H) until
    Tw < cap - 0.2 degC (hysteresis, L). Faults: ``heater_stuck_on`` delivers 100 % whatever the
    command (the thermostat still cuts out), ``heater_thermostat_failed`` disables the cut-out,
    ``heater_failed`` delivers 0 W. No boiling: with both stuck-on and thermostat failures the water
    keeps rising (~3.8 degC/min at 800 W into 3 kg). ``water_mass_kg`` 3 kg (L), c_w 4186 J/kg/K.
    ``hx_ua_w_per_k`` 60 W/K (L; gives a thermal time constant of minutes, Pongratz 2019, H).
    Perfusate ``perfusate_volume_ml`` 1000 mL (L) at 1.0 g/mL, c_p 3.8 kJ/kg/K (blood-like, M).
    ``tubing_ua_w_per_k`` 3 W/K (L: ~3 m of 3/8 in PVC at ~0.3 W/K/m plus open reservoir and
    oxygenator shell). ``water_ambient_ua_w_per_k`` 6 W/K (L: tank plus ~6 m of uninsulated
    1/2 in hose). ``lung_ua_w_per_k_per_l_min`` 40 W/K per L/min of lung flow (L: perfusate
    equilibrates well with lung tissue, m_dot c_p is 63 W/K per L/min, effectiveness ~0.6;
    at fixed heater power a lung sink 3-4 degC colder lowers the steady perfusate by 0.7 x that,
    2-3 degC, as in "a cold lung attached drops the perfusate 2-3 degC", Pongratz 2019, H).
    ``ambient_c`` 22, ``body_c`` 36 (L).
    Steady state at 37 degC / 500 mL/min with defaults: losses 45 W tubing + 20 W lung = 65 W,
    water at 38.08 degC, + 96.5 W water to ambient = 161.5 W, i.e. heater duty 20.2 %.

Transport delay (``_step_transport``)
    The arterial sensor sees the perfusate as it was when the volume now in the tubing left the
    heat exchanger: plug flow over ``tubing_volume_ml`` (70 mL ~ 1 m of 3/8 in, M), i.e.
    8.4 s at 500 mL/min; the delay is capped at 60 s when flow is low or stopped (the line
    equilibrates; L). Implemented on pumped volume, so it is exact for varying flow.

Reservoir (``_step_reservoir``)
    ``reservoir_volume_ml`` 800 mL (L), constant unless ``leak_ml_min`` > 0 (perfusate leaving the
    isolated circuit into the body); floors at 0.

Air (``air_in_line``)
    Set by the air fault: a bubble of at least 0.5 mL is in the inflow line, which the bubble
    detector reports (``air_detected``; detects >= 0.5 mL up to 6 L/min, Terumo System 1, H).

Sensors (``sensors``)
    True value + Gaussian noise: ``pressure_noise_mmhg`` 0.2 with zero offset
    ``pressure_offset_mmhg`` 0.3 (transducer zero drift +-2 mmHg, H); ``flow_noise_ml_min`` 3
    (ultrasonic +-2 %, H); ``temperature_noise_c`` 0.01 on the arterial probe (L);
    ``water_temperature_noise_c`` 0.02, ``pump_speed_noise_rpm`` 0.05 (tacho),
    ``reservoir_volume_noise_ml`` 2 (all L); the bubble detector has no noise. Noise is drawn for
    every channel on every call, in a fixed order, so sensor faults never shift the sequence of
    the healthy channels. Then each channel's ``SensorFault`` (at most one per channel) rewrites
    its reading: stuck, drifting, noisy, dropped out or spiking. Quantisation happens in the
    Modbus registers.
"""

from __future__ import annotations

import logging
import math
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Literal, get_args

from ilup_controller.config.models import SimPlant
from ilup_controller.core.types import value_type

logger = logging.getLogger(__name__)

WATER_SPECIFIC_HEAT_J_PER_KG_K = 4186.0
PERFUSATE_DENSITY_KG_PER_ML = 1.0e-3
PERFUSATE_SPECIFIC_HEAT_J_PER_KG_K = 3800.0
HEATER_HYSTERESIS_C = 0.2
TRANSPORT_DELAY_MAX_S = 60.0
_NEWTON_TOLERANCE_MMHG = 1e-9
_NEWTON_MAX_ITERATIONS = 30
_MMHG_S_PER_ML_PER_MMHG_MIN_PER_L = 60.0 / 1000.0  # 1 L/min = 1000/60 mL/s

# One name per instrument, the same as the SimBindings field that carries it.
SensorChannel = Literal[
    "flow",
    "pa_pressure",
    "perfusate_temperature",
    "water_temperature",
    "pump_speed",
    "reservoir_volume",
    "air_detected",
]
NumericSensorChannel = Literal[
    "flow",
    "pa_pressure",
    "perfusate_temperature",
    "water_temperature",
    "pump_speed",
    "reservoir_volume",
]
SENSOR_CHANNELS: tuple[SensorChannel, ...] = get_args(SensorChannel)
NUMERIC_SENSOR_CHANNELS: tuple[NumericSensorChannel, ...] = get_args(NumericSensorChannel)
# Engineering unit of each channel (drift rates are per minute, noise and spikes in these units).
SENSOR_UNITS: Mapping[SensorChannel, str] = MappingProxyType(
    {
        "flow": "mL/min",
        "pa_pressure": "mmHg",
        "perfusate_temperature": "degC",
        "water_temperature": "degC",
        "pump_speed": "rpm",
        "reservoir_volume": "mL",
        "air_detected": "bool",
    }
)


@value_type
class PlantTruth:
    """True physical state, for tests and ground truth."""

    t_s: float
    pump_speed_rpm: float
    flow_ml_min: float
    pa_pressure_mmhg: float
    vascular_pressure_mmhg: float
    perfusate_c: float
    arterial_c: float
    water_c: float
    heater_power_w: float
    reservoir_volume_ml: float
    pvr_wu: float
    cannula_flow_ml_min: float  # into the lung; differs from the pump's flow when occluded
    air_in_line: bool


@value_type
class SensorValues:
    """What the instruments report (noise, offset and sensor faults applied, not quantised).

    A channel named in ``dropouts`` has no new value: its field repeats the last value reported
    before the dropout, and a consumer must not publish it as a fresh reading.
    """

    flow_ml_min: float
    pa_pressure_mmhg: float
    perfusate_temperature_c: float
    water_temperature_c: float
    pump_speed_rpm: float
    reservoir_volume_ml: float
    air_detected: bool = False
    dropouts: frozenset[SensorChannel] = frozenset()

    def by_channel(self) -> dict[SensorChannel, float | bool]:
        """Every channel's value (dropped-out ones included), keyed by channel name."""
        return {
            "flow": self.flow_ml_min,
            "pa_pressure": self.pa_pressure_mmhg,
            "perfusate_temperature": self.perfusate_temperature_c,
            "water_temperature": self.water_temperature_c,
            "pump_speed": self.pump_speed_rpm,
            "reservoir_volume": self.reservoir_volume_ml,
            "air_detected": self.air_detected,
        }


# ---------------------------------------------------------------------------- sensor faults


class SensorFault(ABC):
    """One instrument failure, rewriting one channel's reading in ``Plant.sensors()``.

    An instance belongs to one plant: ``Plant.set_sensor_fault`` calls ``begin`` with the start
    time and the fault's own random generator (seeded from the plant's seed, so runs repeat).
    """

    drops_out: ClassVar[bool] = False
    numeric_only: ClassVar[bool] = True

    def begin(self, t_s: float, rng: random.Random) -> None:
        self.started_s = t_s
        self.rng = rng

    @abstractmethod
    def reading(self, value: float, t_s: float, previous: float | None) -> float:
        """The faulty reading, from the healthy ``value`` and the last reported ``previous``."""


@dataclass(eq=False)
class StuckSensor(SensorFault):
    """Repeats the value it reported when the fault began, without noise."""

    numeric_only: ClassVar[bool] = False
    held: float | None = field(default=None, init=False)

    def reading(self, value: float, t_s: float, previous: float | None) -> float:
        if self.held is None:
            self.held = value if previous is None else previous
        return self.held


@dataclass(eq=False)
class DroppedSensor(StuckSensor):
    """No value at all (a broken cable, a dead input): listed in ``SensorValues.dropouts``."""

    drops_out: ClassVar[bool] = True


@dataclass(eq=False)
class DriftingSensor(SensorFault):
    """Adds ``rate_per_min`` (channel units per minute) times the time since the fault began."""

    rate_per_min: float

    def reading(self, value: float, t_s: float, previous: float | None) -> float:
        return value + self.rate_per_min * (t_s - self.started_s) / 60.0


@dataclass(eq=False)
class NoisySensor(SensorFault):
    """Adds Gaussian noise of standard deviation ``sigma`` (channel units) to every sample."""

    sigma: float

    def reading(self, value: float, t_s: float, previous: float | None) -> float:
        return value + self.rng.gauss(0.0, self.sigma)


@dataclass(eq=False)
class SpikingSensor(SensorFault):
    """Offsets single samples by ``magnitude``: the first sample at or after the start and then
    after every further ``period_s`` (at most one spike per period), or each sample with
    ``probability`` (drawn from the fault's seeded generator)."""

    magnitude: float
    period_s: float | None = None
    probability: float | None = None
    _periods_done: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if (self.period_s is None) == (self.probability is None):
            raise ValueError("a spiking sensor needs exactly one of period_s or probability")
        if self.period_s is not None and not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"period_s must be > 0, got {self.period_s!r}")
        if self.probability is not None and not 0.0 < self.probability <= 1.0:
            raise ValueError(f"probability must be in (0, 1], got {self.probability!r}")

    def reading(self, value: float, t_s: float, previous: float | None) -> float:
        if self.period_s is None:
            assert self.probability is not None
            return value + self.magnitude if self.rng.random() < self.probability else value
        # Spike k is due at started_s + k * period_s; counted, so no float drift and no burst of
        # spikes after a gap between samples.
        due_s = self.started_s + self._periods_done * self.period_s
        if t_s < due_s:
            return value
        self._periods_done = math.floor((t_s - self.started_s) / self.period_s) + 1
        return value + self.magnitude


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


class Plant:
    """The simulated circuit: pump, vascular bed, heater-cooler, tubing, reservoir."""

    def __init__(self, params: SimPlant, step_s: float = 0.01) -> None:
        if not (math.isfinite(step_s) and step_s > 0.0):
            raise ValueError(f"step_s must be a positive finite number, got {step_s!r}")
        self.params = params
        self.step_s = step_s
        self._rng = random.Random(params.seed)
        self._t_s = 0.0

        # Disturbances and equipment faults (settable at any time; sim/faults.py drives them).
        self.pvr_factor = 1.0
        self.pvr_drift_per_min = 0.0
        self.pvr_drift_multiplier = 1.0  # accumulated drift; reset to 1.0 to clear
        self.leak_ml_min = 0.0
        self.occlusion_factor = 1.0  # x cannula resistance; math.inf = complete occlusion
        self.air_in_line = False
        self.pump_stalled = False
        self.heater_stuck_on = False
        self.heater_thermostat_failed = False
        self.heater_failed = False
        # Enable channels the guard drives (ilup guard): a pump drive whose run-enable (safe
        # torque off) is off does not turn, a heater whose contactor is open gives 0 W.
        self.pump_enabled = True
        self.heater_enabled = True

        # Commands as received by the devices.
        self.pump_speed_command_rpm = 0.0
        self.heater_command_pct = 0.0

        # Physical state.
        self.pump_speed_rpm = 0.0
        self.vascular_pressure_mmhg = params.outflow_pressure_mmhg  # steady state at zero flow
        self.line_pressure_mmhg = params.outflow_pressure_mmhg
        self.cannula_flow_ml_min = 0.0
        self.lung_flow_ml_min = 0.0
        self.perfusate_c = params.initial_perfusate_c
        self.water_c = params.initial_water_c
        self.heater_cut_out = params.initial_water_c >= params.water_cap_c
        self.reservoir_volume_ml = params.reservoir_volume_ml
        self.pumped_volume_ml = 0.0
        self.arterial_c = params.initial_perfusate_c
        # (t_s, pumped_volume_ml, perfusate_c) per sub-step, oldest first; see _step_transport.
        self._transport: deque[tuple[float, float, float]] = deque(
            [(0.0, 0.0, params.initial_perfusate_c)]
        )

        # Instrument faults, at most one per channel, and the last reported readings they hold.
        self._sensor_faults: dict[SensorChannel, SensorFault] = {}
        self._sensor_faults_started = 0
        self._last_reported: dict[SensorChannel, float | bool] = {}

        self._water_heat_capacity_j_per_k = params.water_mass_kg * WATER_SPECIFIC_HEAT_J_PER_KG_K
        self._perfusate_heat_capacity_j_per_k = (
            params.perfusate_volume_ml
            * PERFUSATE_DENSITY_KG_PER_ML
            * PERFUSATE_SPECIFIC_HEAT_J_PER_KG_K
        )

    # ------------------------------------------------------------------ commands and time

    def set_pump_speed_command(self, speed_rpm: float) -> None:
        self.pump_speed_command_rpm = max(0.0, _finite("speed_rpm", speed_rpm))

    def set_heater_power_command(self, heater_pct: float) -> None:
        self.heater_command_pct = min(100.0, max(0.0, _finite("heater_pct", heater_pct)))

    @property
    def t_s(self) -> float:
        return self._t_s

    def step(self, dt_s: float) -> None:
        """Advance by dt_s in equal sub-steps no longer than step_s."""
        _finite("dt_s", dt_s)
        if dt_s < 0.0:
            raise ValueError(f"dt_s must be >= 0, got {dt_s!r}")
        if dt_s > 0.0:
            self._run(dt_s, self._t_s + dt_s)

    def advance_to(self, t_s: float) -> None:
        """Step up to absolute time t_s; no-op if t_s is not in the future."""
        _finite("t_s", t_s)
        if t_s > self._t_s:
            self._run(t_s - self._t_s, t_s)

    def _run(self, dt_s: float, end_t_s: float) -> None:
        """n equal sub-steps of every sub-model, fused into one loop over local variables.

        The sub-models run in this order in each sub-step: pump, hydraulics, thermal (with the
        thermostat), reservoir, transport. State is read into locals once per call and written
        back at the end: faults change the plant only between calls (FaultInjector stops the
        plant at each fault's start and end), so nothing outside sees the locals. Hoisting and
        inlining cut the harness time severalfold without changing one bit of the arithmetic.
        """
        n = max(1, math.ceil(dt_s / self.step_s - 1e-9))
        h = dt_s / n
        t0 = self._t_s
        p = self.params
        log_debug = logger.isEnabledFor(logging.DEBUG)

        # Pump: the target and the slew limits are fixed for the call.
        stopped = self.pump_stalled or not self.pump_enabled
        target_rpm = 0.0 if stopped else self.pump_speed_command_rpm
        max_rise = p.pump_slew_rpm_per_s * h
        max_fall = p.pump_brake_rpm_per_s * h
        stroke_ml = p.stroke_volume_ml_per_rev
        slip = p.pump_slip_per_mmhg
        speed = self.pump_speed_rpm

        # Hydraulics constants (see the module docstring for the equations).
        drift = self.pvr_drift_per_min
        drift_mult = self.pvr_drift_multiplier
        r0 = self.effective_pvr_wu
        if not r0 > 0.0:  # also catches NaN
            raise ValueError(f"effective PVR must be > 0 WU, got {r0!r} (pvr_factor?)")
        c = p.compliance_ml_per_mmhg
        c_line = p.line_compliance_ml_per_mmhg
        r_c = self.cannula_resistance_mmhg_s_per_ml
        # Backward Euler of the line node, C_l (Pl - Pl0) = h (Q_in - Q_c), Q_c = (Pl - P) / R_c,
        # gives Q_c = k (C_l (Pl0 - P) + h Q_in) with k = 1 / (C_l R_c + h): linear in P, and
        # exact at R_c = 0 (k = 1/h) and R_c = inf (k = 0, nothing reaches the lung).
        k = 1.0 / (c_line * r_c + h)
        k_c_line = k * c_line
        pla = p.outflow_pressure_mmhg
        a = p.alpha_per_mmhg
        five_a = 5.0 * a
        y = 1.0 + a * pla
        y5 = y * y
        y5 *= y5 * y
        lung_scale = 1000.0 / 60.0 / r0  # L/min -> mL/s, over R0
        pressure = self.vascular_pressure_mmhg
        line = self.line_pressure_mmhg
        lung_flow_ml_min = self.lung_flow_ml_min
        cannula_flow_ml_min = self.cannula_flow_ml_min

        # Thermal.
        water_cap_c = p.water_cap_c
        cut_out = self.heater_cut_out
        if self.heater_failed or not self.heater_enabled:
            heater_on_w = 0.0
        else:
            pct = 100.0 if self.heater_stuck_on else self.heater_command_pct
            heater_on_w = pct * 0.01 * p.heater_power_w
            if p.heater_supply_max_w is not None:
                heater_on_w = min(heater_on_w, p.heater_supply_max_w)
        thermostat_works = not self.heater_thermostat_failed
        hx_ua = p.hx_ua_w_per_k
        water_ua = p.water_ambient_ua_w_per_k
        tubing_ua = p.tubing_ua_w_per_k
        lung_ua = p.lung_ua_w_per_k_per_l_min
        ambient_c = p.ambient_c
        body_c = p.body_c
        c_water = self._water_heat_capacity_j_per_k
        c_perfusate = self._perfusate_heat_capacity_j_per_k
        tw = self.water_c
        tp = self.perfusate_c

        # Reservoir and transport.
        leak = self.leak_ml_min
        reservoir = self.reservoir_volume_ml
        pumped = self.pumped_volume_ml
        tubing_ml = p.tubing_volume_ml
        buf = self._transport
        append = buf.append
        popleft = buf.popleft

        for i in range(1, n + 1):
            # ---- pump: slew up, brake down, towards the command.
            delta = target_rpm - speed
            if delta > max_rise:
                speed += max_rise
            elif delta < -max_fall:
                speed -= max_fall
            else:
                speed = target_rpm
            flow_ml_min = speed * stroke_ml
            if slip != 0.0:
                # Back-leak of an under-occluded roller grows with the afterload it pumps
                # against (line pressure at the start of the sub-step: explicit coupling, its
                # gain h*slip*Q/C_l is far below 1).
                flow_ml_min *= max(0.0, 1.0 - slip * max(0.0, line))

            # ---- hydraulics.
            if drift != 0.0:
                drift_mult *= math.exp(drift * h / 60.0)
                r0 = p.pvr_wu * self.pvr_factor * drift_mult
                if not r0 > 0.0:
                    raise ValueError(f"effective PVR must be > 0 WU, got {r0!r} (pvr_factor?)")
                lung_scale = 1000.0 / 60.0 / r0
            p0 = pressure
            pl0 = line
            q_in_ml_s = flow_ml_min / 60.0
            h_q_in = h * q_in_ml_s
            # Vascular node, C (P - P0) + h (Q_lung(P) - Q_c(P)) = 0, solved by Newton. Q_lung is
            # convex and increasing in P and -Q_c is increasing and linear, so after at most one
            # step past the root Newton descends monotonically onto it: no ringing and no
            # overshoot for any C, R0 or step.
            for _ in range(_NEWTON_MAX_ITERATIONS):
                if pressure <= pla:
                    q_lung_ml_s = 0.0  # no backflow through the lung
                    slope = 0.0
                else:
                    x = 1.0 + a * pressure
                    x4 = x * x
                    x4 *= x4
                    q_lung_ml_s = (x4 * x - y5) / five_a * lung_scale
                    slope = x4 * lung_scale
                q_c_ml_s = k * (c_line * (pl0 - pressure) + h_q_in)
                delta = (c * (pressure - p0) + h * (q_lung_ml_s - q_c_ml_s)) / (
                    c + h * (slope + k_c_line)
                )
                pressure -= delta
                if -_NEWTON_TOLERANCE_MMHG < delta < _NEWTON_TOLERANCE_MMHG:
                    break
            else:
                logger.warning(
                    "hydraulics did not converge",
                    extra={"t_s": t0 + i * h, "pressure_mmhg": pressure, "delta_mmhg": delta},
                )
            q_c_ml_s = k * (c_line * (pl0 - pressure) + h_q_in)
            line = pl0 + h * (q_in_ml_s - q_c_ml_s) / c_line
            cannula_flow_ml_min = q_c_ml_s * 60.0
            if pressure <= pla:
                lung_flow_ml_min = 0.0
            else:
                x = 1.0 + a * pressure
                x4 = x * x
                x4 *= x4
                lung_flow_ml_min = (x4 * x - y5) / five_a * lung_scale * 60.0

            # ---- thermal: two lumped nodes, explicit Euler, then the thermostat.
            heater_w = 0.0 if cut_out and thermostat_works else heater_on_w
            hx_w = hx_ua * (tw - tp)
            water_loss_w = water_ua * (tw - ambient_c)
            tubing_loss_w = tubing_ua * (tp - ambient_c)
            lung_loss_w = lung_ua * lung_flow_ml_min * 1e-3 * (tp - body_c)
            tw += h * (heater_w - hx_w - water_loss_w) / c_water
            tp += h * (hx_w - tubing_loss_w - lung_loss_w) / c_perfusate
            # The heater-cooler's own water cut-out, independent of any controller.
            if not cut_out and tw >= water_cap_c:
                cut_out = True
                if log_debug:
                    logger.debug("heater thermostat cut out", extra={"water_c": tw, "t_s": t0})
            elif cut_out and tw < water_cap_c - HEATER_HYSTERESIS_C:
                cut_out = False
                if log_debug:
                    logger.debug("heater thermostat cut in", extra={"water_c": tw, "t_s": t0})

            # ---- reservoir: floors at 0.
            if leak != 0.0:
                volume = reservoir - leak * h / 60.0
                if volume <= 0.0 and reservoir > 0.0:
                    logger.warning("reservoir empty", extra={"t_s": t0, "leak_ml_min": leak})
                reservoir = max(0.0, volume)

            # ---- transport: plug flow through the tubing to the arterial sensor, on pumped
            # volume. The source is the newest sample at least a tubing volume ago, or
            # TRANSPORT_DELAY_MAX_S ago, whichever is newer; older samples are never needed.
            t_s = t0 + i * h
            pumped += flow_ml_min * h / 60.0
            append((t_s, pumped, tp))
            volume_limit_ml = pumped - tubing_ml
            time_limit_s = t_s - TRANSPORT_DELAY_MAX_S
            while len(buf) > 1:
                t_next, v_next, _ = buf[1]
                if v_next <= volume_limit_ml or t_next <= time_limit_s:
                    popleft()
                else:
                    break

        self.pump_speed_rpm = speed
        self.pvr_drift_multiplier = drift_mult
        self.vascular_pressure_mmhg = pressure
        self.line_pressure_mmhg = line
        self.cannula_flow_ml_min = cannula_flow_ml_min
        self.lung_flow_ml_min = lung_flow_ml_min
        self.water_c = tw
        self.perfusate_c = tp
        self.heater_cut_out = cut_out
        self.reservoir_volume_ml = reservoir
        self.pumped_volume_ml = pumped
        self.arterial_c = buf[0][2]
        # Set exactly so repeated advance_to() calls do not accumulate rounding.
        self._t_s = end_t_s

    # ------------------------------------------------------------------ sensor faults

    def set_sensor_fault(self, channel: SensorChannel, fault: SensorFault) -> None:
        """Install ``fault`` on ``channel`` from now on, replacing any fault it already has."""
        if channel not in SENSOR_CHANNELS:
            raise ValueError(f"unknown sensor channel {channel!r}; known: {list(SENSOR_CHANNELS)}")
        if fault.numeric_only and channel not in NUMERIC_SENSOR_CHANNELS:
            raise ValueError(f"{type(fault).__name__} needs a numeric channel, {channel!r} is bool")
        self._sensor_faults_started += 1
        # Own generator per fault (string seeds hash with SHA-512: stable across runs).
        rng = random.Random(f"{self.params.seed}:sensor-fault:{self._sensor_faults_started}")
        fault.begin(self._t_s, rng)
        self._sensor_faults[channel] = fault
        logger.info(
            "sensor fault on",
            extra={"channel": channel, "fault": type(fault).__name__, "t_s": self._t_s},
        )

    def clear_sensor_fault(self, channel: SensorChannel) -> bool:
        """Heal ``channel``; False if it had no fault."""
        fault = self._sensor_faults.pop(channel, None)
        if fault is None:
            return False
        logger.info(
            "sensor fault off",
            extra={"channel": channel, "fault": type(fault).__name__, "t_s": self._t_s},
        )
        return True

    @property
    def sensor_faults(self) -> Mapping[SensorChannel, SensorFault]:
        return MappingProxyType(self._sensor_faults)

    def sensor_dropouts(self) -> frozenset[SensorChannel]:
        """Channels that currently have no value (same as ``sensors().dropouts``)."""
        return frozenset(c for c, f in self._sensor_faults.items() if f.drops_out)

    # ------------------------------------------------------------------ sub-models

    @property
    def pump_flow_ml_min(self) -> float:
        """Net pump flow: speed x true stroke volume, less the slip under the line pressure."""
        flow_ml_min = self.pump_speed_rpm * self.params.stroke_volume_ml_per_rev
        slip = self.params.pump_slip_per_mmhg
        if slip != 0.0:
            flow_ml_min *= max(0.0, 1.0 - slip * max(0.0, self.line_pressure_mmhg))
        return flow_ml_min

    @property
    def effective_pvr_wu(self) -> float:
        return self.params.pvr_wu * self.pvr_factor * self.pvr_drift_multiplier

    @property
    def cannula_resistance_mmhg_s_per_ml(self) -> float:
        """Inflow cannula resistance with the occlusion; math.inf when completely occluded."""
        factor = self.occlusion_factor
        if not factor > 0.0:  # also catches NaN
            raise ValueError(f"occlusion_factor must be > 0, got {factor!r}")
        if math.isinf(factor):
            return math.inf  # a clamp blocks even a zero-resistance cannula
        return (
            self.params.cannula_resistance_mmhg_min_per_l
            * _MMHG_S_PER_ML_PER_MMHG_MIN_PER_L
            * factor
        )

    @property
    def heater_delivered_w(self) -> float:
        if self.heater_failed or not self.heater_enabled:
            return 0.0
        if self.heater_cut_out and not self.heater_thermostat_failed:
            return 0.0
        pct = 100.0 if self.heater_stuck_on else self.heater_command_pct
        power_w = pct * 0.01 * self.params.heater_power_w
        supply_w = self.params.heater_supply_max_w
        return power_w if supply_w is None else min(power_w, supply_w)

    # ------------------------------------------------------------------ outputs

    def truth(self) -> PlantTruth:
        return PlantTruth(
            t_s=self._t_s,
            pump_speed_rpm=self.pump_speed_rpm,
            flow_ml_min=self.pump_flow_ml_min,
            pa_pressure_mmhg=self.line_pressure_mmhg,
            vascular_pressure_mmhg=self.vascular_pressure_mmhg,
            perfusate_c=self.perfusate_c,
            arterial_c=self.arterial_c,
            water_c=self.water_c,
            heater_power_w=self.heater_delivered_w,
            reservoir_volume_ml=self.reservoir_volume_ml,
            pvr_wu=self.effective_pvr_wu,
            cannula_flow_ml_min=self.cannula_flow_ml_min,
            air_in_line=self.air_in_line,
        )

    def sensors(self) -> SensorValues:
        """Instrument readings; each call draws fresh noise (in a fixed order).

        The flow meter sits at the pump outlet, upstream of any occlusion: it reads the pump's
        flow even when that volume only distends the line.
        """
        p = self.params
        gauss = self._rng.gauss
        flow_ml_min = self.pump_flow_ml_min + gauss(0.0, p.flow_noise_ml_min)
        if -p.flow_cutoff_ml_min < flow_ml_min < p.flow_cutoff_ml_min:
            flow_ml_min = 0.0  # the meter's low-flow cut-off reads exactly zero
        healthy: dict[SensorChannel, float | bool] = {
            "flow": flow_ml_min,
            "pa_pressure": self.line_pressure_mmhg
            + p.pressure_offset_mmhg
            + gauss(0.0, p.pressure_noise_mmhg),
            "perfusate_temperature": self.arterial_c + gauss(0.0, p.temperature_noise_c),
            "water_temperature": self.water_c + gauss(0.0, p.water_temperature_noise_c),
            "pump_speed": self.pump_speed_rpm + gauss(0.0, p.pump_speed_noise_rpm),
            "reservoir_volume": self.reservoir_volume_ml + gauss(0.0, p.reservoir_volume_noise_ml),
            "air_detected": self.air_in_line,
        }
        if not self._sensor_faults:
            self._last_reported = healthy
            return SensorValues(
                flow_ml_min=flow_ml_min,
                pa_pressure_mmhg=healthy["pa_pressure"],
                perfusate_temperature_c=healthy["perfusate_temperature"],
                water_temperature_c=healthy["water_temperature"],
                pump_speed_rpm=healthy["pump_speed"],
                reservoir_volume_ml=healthy["reservoir_volume"],
                air_detected=self.air_in_line,
            )
        reported = dict(healthy)
        dropouts: set[SensorChannel] = set()
        for channel, fault in self._sensor_faults.items():
            reported[channel] = fault.reading(
                healthy[channel], self._t_s, self._last_reported.get(channel)
            )
            if fault.drops_out:
                dropouts.add(channel)
        self._last_reported = reported
        return SensorValues(
            flow_ml_min=reported["flow"],
            pa_pressure_mmhg=reported["pa_pressure"],
            perfusate_temperature_c=reported["perfusate_temperature"],
            water_temperature_c=reported["water_temperature"],
            pump_speed_rpm=reported["pump_speed"],
            reservoir_volume_ml=reported["reservoir_volume"],
            air_detected=bool(reported["air_detected"]),
            dropouts=frozenset(dropouts),
        )
