"""Physics model of a simulated ILuP circuit, stepped in virtual time.

Pure and deterministic: no asyncio, sockets or wall clock; the only randomness is sensor noise
from ``random.Random(params.seed)``. State lives in plain attributes so fault injection (occlusion,
leak, air, stuck sensors) can poke it; each physical sub-model is one method.

Sub-models and parameters (``SimPlant`` fields; confidence tags from shared/domain.md:
H read in source, M derived, L placeholder):

Roller pump (``_step_pump``)
    Occlusive, no intrinsic pressure limit (domain.md, equipment, M). The actual speed follows the
    command with a slew limit ``pump_slew_rpm_per_s`` (30 rpm/s, L placeholder for drive
    acceleration). Flow = speed x ``stroke_volume_ml_per_rev`` (33 mL/rev: 3/8 in tubing on a
    6 in head, M; real pumps spread +-10-15 %, so the controller's own stroke volume may differ).

Vascular bed (``_step_hydraulics``)
    One compliance node at the pulmonary artery, ``compliance_ml_per_mmhg`` (1 mL/mmHg, L):
    C dP/dt = Q_pump - Q_lung(P). Q_lung inverts the distensible-vessel law (Linehan 1992, M form,
    H alpha): Ppa = ([(1+a Pla)^5 + 5 a R0 Q]^(1/5) - 1)/a, so
    Q_lung = ((1+a P)^5 - (1+a Pla)^5)/(5 a R0) [L/min], and 0 for P <= Pla (no backflow).
    ``alpha_per_mmhg`` 0.02 (H); ``outflow_pressure_mmhg`` Pla 3 (closed atrium 3-5, H);
    ``pvr_wu`` R0 12 WU (injured/ex-vivo lungs 2.3-8.7 WU for both, x ~2 for one lung,
    M/L) times the disturbances ``pvr_factor`` and a compounding ``pvr_drift_per_min``
    (Pogrebniak 1994: 15 -> 32 mmHg over 90 min at fixed settings, H). The inflow-line sensor adds
    the cannula drop ``cannula_resistance_mmhg_min_per_l`` x Q_pump (16 mmHg min/L, L).
    Defaults at 500 mL/min: 7.1 mmHg vascular + 8.0 cannula = 15.1 mmHg at the sensor (12-15 mmHg
    animal practice, H). Integration is backward Euler solved by Newton (1-3 iterations): the node
    time constant C/(dQ_lung/dP) is ~0.4 s at defaults but ~10 ms at C = 0.2 and high flow, where
    explicit Euler at 10 ms would ring; the implicit step neither rings nor overshoots at any step.

Thermal (``_step_thermal``)
    Two lumped nodes, explicit Euler (time constants >= ~10 s, far above the step):
    water  m_w c_w dTw/dt = heater - UA_hx (Tw - Tp) - UA_wa (Tw - T_amb)
    perfusate m_p c_p dTp/dt = UA_hx (Tw - Tp) - UA_tube (Tp - T_amb) - UA_lung (Tp - T_body)
    ``heater_power_w`` 800 W (L), delivered as heater_pct % of it unless the heater-cooler's own
    thermostat has cut out: off at Tw >= ``water_cap_c`` (42 degC, STS/SCA/AmSECT 2015, H) until
    Tw < cap - 0.2 degC (hysteresis, L). ``water_mass_kg`` 3 kg (L), c_w 4186 J/kg/K.
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
    ``reservoir_volume_ml`` 800 mL (L), constant unless ``leak_ml_min`` > 0; floors at 0.

Sensors (``sensors``)
    True value + Gaussian noise: ``pressure_noise_mmhg`` 0.2 with zero offset
    ``pressure_offset_mmhg`` 0.3 (transducer zero drift +-2 mmHg, H); ``flow_noise_ml_min`` 3
    (ultrasonic +-2 %, H); ``temperature_noise_c`` 0.01 on the arterial probe (L);
    ``water_temperature_noise_c`` 0.02, ``pump_speed_noise_rpm`` 0.05 (tacho),
    ``reservoir_volume_noise_ml`` 2 (all L). Quantisation happens in the Modbus registers.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass

from ilup_controller.config.models import SimPlant

logger = logging.getLogger(__name__)

WATER_SPECIFIC_HEAT_J_PER_KG_K = 4186.0
PERFUSATE_DENSITY_KG_PER_ML = 1.0e-3
PERFUSATE_SPECIFIC_HEAT_J_PER_KG_K = 3800.0
HEATER_HYSTERESIS_C = 0.2
TRANSPORT_DELAY_MAX_S = 60.0
_NEWTON_TOLERANCE_MMHG = 1e-9
_NEWTON_MAX_ITERATIONS = 30


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class SensorValues:
    """What the instruments report (noise and offset applied, not quantised)."""

    flow_ml_min: float
    pa_pressure_mmhg: float
    perfusate_temperature_c: float
    water_temperature_c: float
    pump_speed_rpm: float
    reservoir_volume_ml: float


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

        # Disturbances (settable at any time).
        self.pvr_factor = 1.0
        self.pvr_drift_per_min = 0.0
        self.pvr_drift_multiplier = 1.0  # accumulated drift; reset to 1.0 to clear
        self.leak_ml_min = 0.0

        # Commands as received by the devices.
        self.pump_speed_command_rpm = 0.0
        self.heater_command_pct = 0.0

        # Physical state.
        self.pump_speed_rpm = 0.0
        self.vascular_pressure_mmhg = params.outflow_pressure_mmhg  # steady state at zero flow
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
        n = max(1, math.ceil(dt_s / self.step_s - 1e-9))
        h = dt_s / n
        t0 = self._t_s
        for i in range(1, n + 1):
            self._step_pump(h)
            self._step_hydraulics(h)
            self._step_thermal(h)
            self._step_reservoir(h)
            self._step_transport(h, t0 + i * h)
        # Set exactly so repeated advance_to() calls do not accumulate rounding.
        self._t_s = end_t_s

    # ------------------------------------------------------------------ sub-models

    @property
    def pump_flow_ml_min(self) -> float:
        return self.pump_speed_rpm * self.params.stroke_volume_ml_per_rev

    @property
    def effective_pvr_wu(self) -> float:
        return self.params.pvr_wu * self.pvr_factor * self.pvr_drift_multiplier

    @property
    def heater_delivered_w(self) -> float:
        if self.heater_cut_out:
            return 0.0
        return self.heater_command_pct * 0.01 * self.params.heater_power_w

    def _step_pump(self, h: float) -> None:
        max_delta = self.params.pump_slew_rpm_per_s * h
        delta = self.pump_speed_command_rpm - self.pump_speed_rpm
        if delta > max_delta:
            self.pump_speed_rpm += max_delta
        elif delta < -max_delta:
            self.pump_speed_rpm -= max_delta
        else:
            self.pump_speed_rpm = self.pump_speed_command_rpm

    def _step_hydraulics(self, h: float) -> None:
        p = self.params
        if self.pvr_drift_per_min != 0.0:
            self.pvr_drift_multiplier *= math.exp(self.pvr_drift_per_min * h / 60.0)
        r0 = self.effective_pvr_wu
        if not r0 > 0.0:  # also catches NaN
            raise ValueError(f"effective PVR must be > 0 WU, got {r0!r} (pvr_factor?)")
        c = p.compliance_ml_per_mmhg
        p0 = self.vascular_pressure_mmhg
        q_in_ml_s = self.pump_flow_ml_min / 60.0
        # Backward Euler, C (P - P0) + h (Q_lung(P) - Q_in) = 0, solved by Newton. Q_lung is
        # convex and increasing in P, so after at most one step past the root Newton descends
        # monotonically onto it: no ringing and no overshoot for any C, R0 or step.
        pressure = p0
        q_lung_ml_s = 0.0
        for _ in range(_NEWTON_MAX_ITERATIONS):
            q_lung_ml_s, slope = self._lung_flow_ml_s(pressure, r0)
            delta = (c * (pressure - p0) + h * (q_lung_ml_s - q_in_ml_s)) / (c + h * slope)
            pressure -= delta
            if -_NEWTON_TOLERANCE_MMHG < delta < _NEWTON_TOLERANCE_MMHG:
                break
        else:
            logger.warning(
                "hydraulics did not converge",
                extra={"t_s": self._t_s, "pressure_mmhg": pressure, "delta_mmhg": delta},
            )
        self.vascular_pressure_mmhg = pressure
        self.lung_flow_ml_min = self._lung_flow_ml_s(pressure, r0)[0] * 60.0

    def _lung_flow_ml_s(self, pressure_mmhg: float, r0_wu: float) -> tuple[float, float]:
        """Inverted distensible-vessel law: (Q_lung in mL/s, dQ_lung/dP in mL/s/mmHg)."""
        p = self.params
        pla = p.outflow_pressure_mmhg
        if pressure_mmhg <= pla:
            return 0.0, 0.0  # no backflow through the lung
        a = p.alpha_per_mmhg
        scale = 1000.0 / 60.0 / r0_wu  # L/min -> mL/s, over R0
        x = 1.0 + a * pressure_mmhg
        x4 = x * x
        x4 *= x4
        y = 1.0 + a * pla
        y5 = y * y
        y5 *= y5 * y
        return (x4 * x - y5) / (5.0 * a) * scale, x4 * scale

    def _step_thermal(self, h: float) -> None:
        p = self.params
        tp = self.perfusate_c
        tw = self.water_c
        heater_w = self.heater_delivered_w
        hx_w = p.hx_ua_w_per_k * (tw - tp)
        water_loss_w = p.water_ambient_ua_w_per_k * (tw - p.ambient_c)
        tubing_loss_w = p.tubing_ua_w_per_k * (tp - p.ambient_c)
        lung_loss_w = p.lung_ua_w_per_k_per_l_min * self.lung_flow_ml_min * 1e-3 * (tp - p.body_c)
        tw += h * (heater_w - hx_w - water_loss_w) / self._water_heat_capacity_j_per_k
        tp += h * (hx_w - tubing_loss_w - lung_loss_w) / self._perfusate_heat_capacity_j_per_k
        self.water_c = tw
        self.perfusate_c = tp
        self._step_thermostat()

    def _step_thermostat(self) -> None:
        """The heater-cooler's own water cut-out, independent of any controller."""
        cap = self.params.water_cap_c
        if not self.heater_cut_out and self.water_c >= cap:
            self.heater_cut_out = True
            logger.debug(
                "heater thermostat cut out", extra={"water_c": self.water_c, "t_s": self._t_s}
            )
        elif self.heater_cut_out and self.water_c < cap - HEATER_HYSTERESIS_C:
            self.heater_cut_out = False
            logger.debug(
                "heater thermostat cut in", extra={"water_c": self.water_c, "t_s": self._t_s}
            )

    def _step_reservoir(self, h: float) -> None:
        if self.leak_ml_min == 0.0:
            return
        volume = self.reservoir_volume_ml - self.leak_ml_min * h / 60.0
        if volume <= 0.0 and self.reservoir_volume_ml > 0.0:
            logger.warning(
                "reservoir empty", extra={"t_s": self._t_s, "leak_ml_min": self.leak_ml_min}
            )
        self.reservoir_volume_ml = max(0.0, volume)

    def _step_transport(self, h: float, t_s: float) -> None:
        """Plug flow through the tubing to the arterial sensor, on pumped volume."""
        self.pumped_volume_ml += self.pump_flow_ml_min * h / 60.0
        buf = self._transport
        buf.append((t_s, self.pumped_volume_ml, self.perfusate_c))
        # The source is the newest sample at least a tubing volume ago, or TRANSPORT_DELAY_MAX_S
        # ago, whichever is newer; older samples are never needed again.
        volume_limit_ml = self.pumped_volume_ml - self.params.tubing_volume_ml
        time_limit_s = t_s - TRANSPORT_DELAY_MAX_S
        while len(buf) > 1:
            t_next, v_next, _ = buf[1]
            if v_next <= volume_limit_ml or t_next <= time_limit_s:
                buf.popleft()
            else:
                break
        self.arterial_c = buf[0][2]

    # ------------------------------------------------------------------ outputs

    def truth(self) -> PlantTruth:
        flow_ml_min = self.pump_flow_ml_min
        return PlantTruth(
            t_s=self._t_s,
            pump_speed_rpm=self.pump_speed_rpm,
            flow_ml_min=flow_ml_min,
            pa_pressure_mmhg=self.vascular_pressure_mmhg
            + self.params.cannula_resistance_mmhg_min_per_l * flow_ml_min * 1e-3,
            vascular_pressure_mmhg=self.vascular_pressure_mmhg,
            perfusate_c=self.perfusate_c,
            arterial_c=self.arterial_c,
            water_c=self.water_c,
            heater_power_w=self.heater_delivered_w,
            reservoir_volume_ml=self.reservoir_volume_ml,
            pvr_wu=self.effective_pvr_wu,
        )

    def sensors(self) -> SensorValues:
        """Instrument readings; each call draws fresh noise (in a fixed order)."""
        p = self.params
        truth = self.truth()
        gauss = self._rng.gauss
        return SensorValues(
            flow_ml_min=truth.flow_ml_min + gauss(0.0, p.flow_noise_ml_min),
            pa_pressure_mmhg=truth.pa_pressure_mmhg
            + p.pressure_offset_mmhg
            + gauss(0.0, p.pressure_noise_mmhg),
            perfusate_temperature_c=truth.arterial_c + gauss(0.0, p.temperature_noise_c),
            water_temperature_c=truth.water_c + gauss(0.0, p.water_temperature_noise_c),
            pump_speed_rpm=truth.pump_speed_rpm + gauss(0.0, p.pump_speed_noise_rpm),
            reservoir_volume_ml=truth.reservoir_volume_ml + gauss(0.0, p.reservoir_volume_noise_ml),
        )
