"""Behaviour of the simulated ILuP plant (sim/plant.py), with numbers."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from ilup_controller.config.models import SimPlant
from sim.plant import Plant, SensorValues

DEFAULTS = SimPlant()
PERFUSATE_J_PER_K = DEFAULTS.perfusate_volume_ml * 1e-3 * 3800.0
WATER_J_PER_K = DEFAULTS.water_mass_kg * 4186.0


def law_vascular_mmhg(flow_ml_min: float, params: SimPlant, pvr_factor: float = 1.0) -> float:
    """Distensible-vessel law (Linehan 1992), independent of the plant code."""
    a = params.alpha_per_mmhg
    r0 = params.pvr_wu * pvr_factor
    q_l_min = flow_ml_min / 1000.0
    inner = (1.0 + a * params.outflow_pressure_mmhg) ** 5 + 5.0 * a * r0 * q_l_min
    return float((inner**0.2 - 1.0) / a)


def law_sensor_mmhg(flow_ml_min: float, params: SimPlant, pvr_factor: float = 1.0) -> float:
    cannula = params.cannula_resistance_mmhg_min_per_l * flow_ml_min / 1000.0
    return law_vascular_mmhg(flow_ml_min, params, pvr_factor) + cannula


def running_plant(flow_ml_min: float, params: SimPlant = DEFAULTS, step_s: float = 0.01) -> Plant:
    plant = Plant(params, step_s=step_s)
    plant.set_pump_speed_command(flow_ml_min / params.stroke_volume_ml_per_rev)
    return plant


# ---------------------------------------------------------------------------- hydraulics


def test_steady_state_sensor_pressure_at_500_ml_min_matches_law() -> None:
    plant = running_plant(500.0)
    plant.advance_to(60.0)
    law = law_sensor_mmhg(500.0, DEFAULTS)
    assert law == pytest.approx(15.08, abs=0.01)  # 7.08 vascular + 8.0 cannula
    truth = plant.truth()
    assert truth.flow_ml_min == pytest.approx(500.0, abs=1e-9)
    assert truth.vascular_pressure_mmhg == pytest.approx(7.08, abs=0.01)
    assert truth.pa_pressure_mmhg == pytest.approx(law, abs=0.01)
    readings = [plant.sensors().pa_pressure_mmhg for _ in range(400)]
    mean = statistics.fmean(readings)
    assert abs(mean - law) <= 0.5
    # The bias is the configured zero offset, the spread the configured noise.
    assert mean - law == pytest.approx(DEFAULTS.pressure_offset_mmhg, abs=0.05)
    assert statistics.stdev(readings) == pytest.approx(DEFAULTS.pressure_noise_mmhg, rel=0.15)


def test_zero_flow_starts_at_outflow_pressure() -> None:
    plant = Plant(DEFAULTS)
    plant.advance_to(10.0)
    truth = plant.truth()
    assert truth.vascular_pressure_mmhg == DEFAULTS.outflow_pressure_mmhg
    assert truth.pa_pressure_mmhg == DEFAULTS.outflow_pressure_mmhg


@pytest.mark.parametrize("pvr_factor", [1.0, 2.0, 3.0, 5.0, 10.0])
def test_pressure_rises_with_pvr_factor_per_law(pvr_factor: float) -> None:
    plant = running_plant(500.0)
    plant.pvr_factor = pvr_factor
    plant.advance_to(90.0)  # node time constant ~1.5 s at factor 10
    truth = plant.truth()
    assert truth.pvr_wu == pytest.approx(DEFAULTS.pvr_wu * pvr_factor)
    assert truth.pa_pressure_mmhg == pytest.approx(
        law_sensor_mmhg(500.0, DEFAULTS, pvr_factor), abs=0.02
    )


def test_pvr_factor_step_raises_pressure_monotonically() -> None:
    plant = running_plant(500.0)
    plant.advance_to(30.0)
    before = plant.truth().pa_pressure_mmhg
    plant.pvr_factor = 3.0  # drug vasoconstriction
    pressures = []
    for i in range(1, 601):
        plant.advance_to(30.0 + i * 0.05)
        pressures.append(plant.truth().pa_pressure_mmhg)
    assert all(b >= a for a, b in itertools.pairwise(pressures))
    after = pressures[-1]
    assert before == pytest.approx(15.08, abs=0.01)
    assert after == pytest.approx(law_sensor_mmhg(500.0, DEFAULTS, 3.0), abs=0.02)
    assert after - before > 5.5  # 3x R0 at 500 mL/min: vascular 7.1 -> 12.9 mmHg


@pytest.mark.parametrize("step_s", [0.01, 0.1])
@pytest.mark.parametrize("compliance", [0.2, 1.0, 5.0])
@pytest.mark.parametrize("pvr_factor", [0.1, 1.0, 10.0])
def test_hydraulics_stable_without_overshoot(
    pvr_factor: float, compliance: float, step_s: float
) -> None:
    params = DEFAULTS.model_copy(
        update={"compliance_ml_per_mmhg": compliance, "pump_slew_rpm_per_s": 1000.0}
    )
    plant = running_plant(1000.0, params, step_s=step_s)
    plant.pvr_factor = pvr_factor
    target = law_vascular_mmhg(1000.0, params, pvr_factor)
    pressures = []
    for i in range(1, 1201):
        plant.advance_to(i * 0.1)
        pressures.append(plant.truth().vascular_pressure_mmhg)
    assert max(pressures) <= target + 0.05
    assert pressures[-1] == pytest.approx(target, abs=0.01)
    # Pump stopped: decays back to the outflow pressure, never below it, never rings.
    plant.set_pump_speed_command(0.0)
    decay = []
    for i in range(1, 1201):
        plant.advance_to(120.0 + i * 0.1)
        decay.append(plant.truth().vascular_pressure_mmhg)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(decay))
    assert min(decay) >= params.outflow_pressure_mmhg - 1e-9  # float rounding only
    # Slowest case (factor 10, C = 5): time constant ~29 s near Pla, so 120 s leaves < 5 %.
    assert decay[-1] - params.outflow_pressure_mmhg < 0.05 * (target - params.outflow_pressure_mmhg)


def test_pvr_drift_compounds_per_minute() -> None:
    plant = running_plant(500.0)
    plant.pvr_drift_per_min = 0.01
    plant.advance_to(600.0)
    assert plant.truth().pvr_wu == pytest.approx(DEFAULTS.pvr_wu * math.exp(0.1), rel=1e-6)
    assert plant.pvr_factor == 1.0  # drift is kept apart from the settable factor
    plant.advance_to(620.0)
    assert plant.truth().pa_pressure_mmhg == pytest.approx(
        law_sensor_mmhg(500.0, DEFAULTS, plant.pvr_drift_multiplier), abs=0.05
    )


def test_invalid_pvr_factor_is_an_error() -> None:
    plant = running_plant(500.0)
    plant.pvr_factor = 0.0
    with pytest.raises(ValueError, match="PVR"):
        plant.step(0.1)


# ---------------------------------------------------------------------------- pump


@pytest.mark.parametrize("speed_rpm", [0.0, 3.7, 15.0, 30.3])
def test_flow_is_speed_times_stroke_volume(speed_rpm: float) -> None:
    params = DEFAULTS.model_copy(update={"stroke_volume_ml_per_rev": 15.0})
    plant = Plant(params)
    plant.set_pump_speed_command(speed_rpm)
    plant.advance_to(5.0)
    truth = plant.truth()
    assert truth.pump_speed_rpm == speed_rpm
    assert truth.flow_ml_min == pytest.approx(speed_rpm * 15.0, abs=1e-9)
    sensed = [plant.sensors() for _ in range(300)]
    assert statistics.fmean(s.flow_ml_min for s in sensed) == pytest.approx(
        speed_rpm * 15.0, abs=0.6
    )
    assert statistics.fmean(s.pump_speed_rpm for s in sensed) == pytest.approx(speed_rpm, abs=0.02)


def test_slew_limit_respected_up_and_down() -> None:
    plant = Plant(DEFAULTS)  # 30 rpm/s
    plant.set_pump_speed_command(30.0)
    speeds = [0.0]
    for i in range(1, 151):
        plant.advance_to(i * 0.01)
        speeds.append(plant.truth().pump_speed_rpm)
    steps = [b - a for a, b in itertools.pairwise(speeds)]
    assert max(steps) <= 30.0 * 0.01 + 1e-9
    assert speeds[50] == pytest.approx(15.0, abs=1e-6)  # 0.5 s
    assert speeds[100] == pytest.approx(30.0, abs=1e-9)  # reached at 1.0 s, no overshoot
    assert max(speeds) == 30.0
    plant.set_pump_speed_command(-5.0)  # clamps to 0
    assert plant.pump_speed_command_rpm == 0.0
    plant.step(0.1)  # braking at 200 rpm/s
    assert plant.truth().pump_speed_rpm == pytest.approx(10.0, abs=1e-6)
    plant.step(0.06)
    assert plant.truth().pump_speed_rpm == 0.0


def test_commands_clamp_and_reject_non_finite() -> None:
    plant = Plant(DEFAULTS)
    plant.set_heater_power_command(150.0)
    assert plant.heater_command_pct == 100.0
    plant.set_heater_power_command(-3.0)
    assert plant.heater_command_pct == 0.0
    with pytest.raises(ValueError, match="finite"):
        plant.set_pump_speed_command(math.nan)
    with pytest.raises(ValueError, match="finite"):
        plant.set_heater_power_command(math.inf)
    with pytest.raises(ValueError, match=">= 0"):
        plant.step(-0.1)


# ---------------------------------------------------------------------------- thermal


def steady_heater_duty(
    perfusate_c: float, flow_ml_min: float, params: SimPlant
) -> tuple[float, float]:
    """(duty fraction, water_c) holding the perfusate at perfusate_c, from the heat balance."""
    lung_ua = params.lung_ua_w_per_k_per_l_min * flow_ml_min / 1000.0
    perfusate_loss_w = params.tubing_ua_w_per_k * (perfusate_c - params.ambient_c) + lung_ua * (
        perfusate_c - params.body_c
    )
    water_c = perfusate_c + perfusate_loss_w / params.hx_ua_w_per_k
    water_loss_w = params.water_ambient_ua_w_per_k * (water_c - params.ambient_c)
    return (perfusate_loss_w + water_loss_w) / params.heater_power_w, water_c


def test_steady_heater_duty_at_37_c_and_500_ml_min_holds_temperature() -> None:
    duty, water_c = steady_heater_duty(37.0, 500.0, DEFAULTS)
    assert duty == pytest.approx(0.202, abs=0.001)
    assert 0.15 < duty < 0.60
    params = DEFAULTS.model_copy(update={"initial_perfusate_c": 37.0, "initial_water_c": water_c})
    plant = running_plant(500.0, params, step_s=0.05)
    plant.set_heater_power_command(duty * 100.0)
    plant.advance_to(600.0)
    truth = plant.truth()
    assert truth.perfusate_c == pytest.approx(37.0, abs=0.02)
    assert truth.water_c == pytest.approx(water_c, abs=0.02)
    assert truth.heater_power_w == pytest.approx(duty * DEFAULTS.heater_power_w)


def test_water_never_exceeds_cap_with_full_heater_for_30_min() -> None:
    params = DEFAULTS.model_copy(update={"initial_perfusate_c": 37.0, "initial_water_c": 37.0})
    plant = running_plant(500.0, params)
    plant.set_heater_power_command(100.0)
    cap = params.water_cap_c
    water: list[float] = []
    powers: list[float] = []
    for i in range(1, 18001):
        plant.advance_to(i * 0.1)
        truth = plant.truth()
        water.append(truth.water_c)
        powers.append(truth.heater_power_w)
    assert max(water) <= cap + 0.3
    first_cut = powers.index(0.0)  # the cut-out did engage, so the bound is not vacuous
    assert water[first_cut] >= cap - 0.01  # sampled at 10 Hz around the cut-out
    after = water[first_cut:]
    assert min(after) >= cap - 0.3  # hysteresis 0.2 degC, then the element is back on
    assert powers[first_cut:].count(params.heater_power_w) > 0
    assert max(powers) == params.heater_power_w


def test_heater_off_cools_toward_ambient_body_mix() -> None:
    params = DEFAULTS.model_copy(update={"initial_perfusate_c": 37.0, "initial_water_c": 37.0})
    plant = running_plant(500.0, params, step_s=0.1)
    # Passive equilibrium of the two nodes (linear heat balance, solved by hand):
    hx, wa, tu = params.hx_ua_w_per_k, params.water_ambient_ua_w_per_k, params.tubing_ua_w_per_k
    lu = params.lung_ua_w_per_k_per_l_min * 0.5
    amb, body = params.ambient_c, params.body_c
    # water: hx (w - p) + wa (w - amb) = 0  ->  w = (hx p + wa amb) / (hx + wa)
    # perfusate: hx (w - p) = tu (p - amb) + lu (p - body)
    k = hx * hx / (hx + wa)
    p_eq = (hx * wa * amb / (hx + wa) + tu * amb + lu * body) / (hx - k + tu + lu)
    assert amb < p_eq < body  # a mix: about 31.8 degC with the defaults
    temps = []
    for minute in range(1, 241):
        plant.advance_to(minute * 60.0)
        temps.append(plant.truth().perfusate_c)
        assert plant.truth().heater_power_w == 0.0
    assert all(b < a for a, b in itertools.pairwise(temps))
    assert temps[-1] == pytest.approx(p_eq, abs=0.1)


def test_perfusate_warms_with_heater_on() -> None:
    plant = running_plant(500.0, step_s=0.05)
    plant.set_heater_power_command(50.0)
    plant.advance_to(600.0)
    truth = plant.truth()
    assert truth.perfusate_c > DEFAULTS.initial_perfusate_c + 1.0
    assert truth.water_c > truth.perfusate_c  # heat flows water -> perfusate


# ---------------------------------------------------------------------------- transport delay


def measured_delay_s(plant: Plant, jump_c: float = 2.0, window_s: float = 120.0) -> float:
    """Step the perfusate temperature, return when the arterial reading first shows it."""
    t0 = plant.t_s
    before = plant.truth().arterial_c
    plant.perfusate_c += jump_c
    for i in range(1, int(window_s / 0.01) + 1):
        plant.advance_to(t0 + i * 0.01)
        if plant.truth().arterial_c - before > jump_c / 2:
            return plant.t_s - t0
    raise AssertionError("arterial temperature never followed the step")


@pytest.mark.parametrize("flow_ml_min", [250.0, 500.0, 1000.0])
def test_transport_delay_is_tubing_volume_over_flow(flow_ml_min: float) -> None:
    plant = running_plant(flow_ml_min)
    plant.advance_to(30.0)
    expected_s = DEFAULTS.tubing_volume_ml / flow_ml_min * 60.0  # 8.4 s at 500 mL/min
    assert measured_delay_s(plant) == pytest.approx(expected_s, abs=1.0)


def test_transport_delay_capped_at_60_s_when_flow_is_low() -> None:
    plant = running_plant(30.0)  # 140 s uncapped
    plant.advance_to(90.0)
    assert measured_delay_s(plant, window_s=200.0) == pytest.approx(60.0, abs=1.0)
    stopped = Plant(DEFAULTS)
    stopped.advance_to(90.0)
    assert measured_delay_s(stopped, window_s=200.0) == pytest.approx(60.0, abs=1.0)


def test_arterial_sensor_reports_delayed_temperature() -> None:
    plant = running_plant(500.0)
    plant.advance_to(30.0)
    plant.perfusate_c += 2.0
    plant.advance_to(33.0)
    truth = plant.truth()
    assert truth.perfusate_c - truth.arterial_c > 1.5
    readings = [plant.sensors().perfusate_temperature_c for _ in range(200)]
    assert statistics.fmean(readings) == pytest.approx(truth.arterial_c, abs=0.005)


# ---------------------------------------------------------------------------- reservoir, sensors


def test_reservoir_constant_then_leaks() -> None:
    plant = running_plant(500.0)
    plant.advance_to(60.0)
    assert plant.truth().reservoir_volume_ml == DEFAULTS.reservoir_volume_ml
    plant.leak_ml_min = 10.0
    plant.advance_to(420.0)
    assert plant.truth().reservoir_volume_ml == pytest.approx(740.0, abs=1e-6)
    readings = [plant.sensors().reservoir_volume_ml for _ in range(400)]
    assert statistics.fmean(readings) == pytest.approx(740.0, abs=0.5)
    assert statistics.stdev(readings) == pytest.approx(2.0, rel=0.15)
    plant.leak_ml_min = 1000.0
    plant.advance_to(480.0)
    assert plant.truth().reservoir_volume_ml == 0.0


def sensor_run(seed: int) -> list[SensorValues]:
    plant = running_plant(500.0, DEFAULTS.model_copy(update={"seed": seed}))
    plant.set_heater_power_command(40.0)
    out = []
    for i in range(1, 201):
        plant.advance_to(i * 0.1)
        out.append(plant.sensors())
    return out


def test_same_seed_gives_identical_sensor_sequence() -> None:
    first = sensor_run(7)
    assert first == sensor_run(7)
    other = sensor_run(8)
    assert sum(a != b for a, b in zip(first, other, strict=True)) == len(first)


def test_time_advances_exactly_and_never_backwards() -> None:
    plant = Plant(DEFAULTS)
    for i in range(1, 1001):
        plant.advance_to(i * 0.1)
    assert plant.t_s == 100.0
    plant.advance_to(50.0)  # past: no-op
    assert plant.t_s == 100.0
    plant.step(0.0)
    assert plant.t_s == 100.0
    plant.step(0.25)
    assert plant.t_s == pytest.approx(100.25, abs=1e-12)
