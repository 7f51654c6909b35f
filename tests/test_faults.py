"""Fault injection (sim/faults.py and the fault layer of sim/plant.py), in virtual time."""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from ilup_controller.config import load_config
from ilup_controller.config.loader import ConfigError
from ilup_controller.config.models import CartConfig, SimPlant
from sim.faults import (
    CLEAR_EXAMPLES,
    DOC_PATH,
    EXAMPLES,
    FAULT_KINDS,
    SCENARIO_EXAMPLE,
    AirFault,
    DeviceExceptionFault,
    DeviceSlowFault,
    DeviceUnresponsiveFault,
    FaultClear,
    FaultInjector,
    HeaterFailedFault,
    HeaterStuckOnFault,
    LeakFault,
    OcclusionFault,
    PumpStallFault,
    ResistanceFault,
    Scenario,
    ScenarioError,
    SensorDriftFault,
    SensorDropoutFault,
    SensorNoiseFault,
    SensorSpikeFault,
    SensorStuckFault,
    load_scenario,
    main,
    parse_runtime_fault,
    parse_runtime_message,
    render_docs,
    scenario_from_data,
)
from sim.plant import DriftingSensor, Plant, SensorValues
from sim.virtual import VirtualCart
from sim.wiring import quantise, sensor_values

ROOT = Path(__file__).resolve().parents[1]
SIM_YAML = ROOT / "config" / "sim.yaml"
SCENARIOS = sorted((ROOT / "config" / "scenarios").glob("*.yaml"))
DEFAULTS = SimPlant()
STEADY_SENSOR_MMHG = 15.08  # 7.08 vascular + 8.0 cannula at 500 mL/min (test_plant.py)


def law_vascular_mmhg(flow_ml_min: float, pvr_factor: float = 1.0) -> float:
    """Distensible-vessel law (Linehan 1992), independent of the plant code."""
    p = DEFAULTS
    a = p.alpha_per_mmhg
    inner = (1.0 + a * p.outflow_pressure_mmhg) ** 5 + 5.0 * a * p.pvr_wu * pvr_factor * (
        flow_ml_min / 1000.0
    )
    return float((inner**0.2 - 1.0) / a)


def running_plant(
    flow_ml_min: float = 500.0, params: SimPlant = DEFAULTS, step_s: float = 0.01
) -> Plant:
    plant = Plant(params, step_s=step_s)
    plant.set_pump_speed_command(flow_ml_min / params.stroke_volume_ml_per_rev)
    return plant


def mean_sensor(plant: Plant, attr: str, n: int = 200) -> float:
    return statistics.fmean(float(getattr(plant.sensors(), attr)) for _ in range(n))


@pytest.fixture(scope="module")
def cfg() -> CartConfig:
    return load_config(SIM_YAML)


class RecordingHooks:
    """DeviceHooks that records each call with the plant time it was made at."""

    def __init__(self, plant: Plant) -> None:
        self.plant = plant
        self.calls: list[tuple[float, str, str, object]] = []

    def set_unresponsive(self, device: str, on: bool) -> None:
        self.calls.append((self.plant.t_s, "unresponsive", device, on))

    def set_delay(self, device: str, delay_s: float) -> None:
        self.calls.append((self.plant.t_s, "delay", device, delay_s))

    def set_exception(self, device: str, code: int | None) -> None:
        self.calls.append((self.plant.t_s, "exception", device, code))


# ---------------------------------------------------------------------------- plant faults


def test_occlusion_20x_raises_sensor_pressure_above_30_mmhg_within_a_second() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    plant.advance_to(30.0)
    assert plant.truth().pa_pressure_mmhg == pytest.approx(STEADY_SENSOR_MMHG, abs=0.01)
    injector.apply(OcclusionFault(factor=20.0))
    crossed_s = None
    for i in range(1, 51):  # 10 Hz for 5 s, pump held at 500 mL/min
        plant.advance_to(30.0 + i * 0.1)
        if crossed_s is None and plant.sensors().pa_pressure_mmhg > 30.0:
            crossed_s = i * 0.1
    # Line: 8.3 mL/s into 0.3 mL/mmHg climbs ~28 mmHg/s at first, toward 167 mmHg.
    assert crossed_s is not None
    assert crossed_s <= 1.0
    plant.advance_to(100.0)  # 10 line time constants (20 x 0.96 x 0.3 = 5.8 s)
    truth = plant.truth()
    expected = law_vascular_mmhg(500.0) + 20.0 * 8.0  # 20 x the 8 mmHg cannula drop
    assert truth.pa_pressure_mmhg == pytest.approx(expected, abs=0.05)
    assert truth.cannula_flow_ml_min == pytest.approx(500.0, abs=0.1)  # roller pump forces it
    assert mean_sensor(plant, "flow_ml_min") == pytest.approx(500.0, abs=1.0)
    injector.clear("occlusion")
    assert plant.occlusion_factor == 1.0
    plant.advance_to(160.0)
    assert plant.truth().pa_pressure_mmhg == pytest.approx(STEADY_SENSOR_MMHG, abs=0.01)


@pytest.mark.parametrize("step_s", [0.01, 0.1])
def test_complete_occlusion_climbs_at_pump_flow_over_line_compliance_and_stays_finite(
    step_s: float,
) -> None:
    plant = running_plant(500.0, step_s=step_s)
    injector = FaultInjector(plant)
    plant.advance_to(30.0)
    injector.apply(OcclusionFault(complete=True, duration_s=5.0))
    assert plant.occlusion_factor == math.inf
    plant.advance_to(31.0)
    p1, v1 = plant.truth().pa_pressure_mmhg, plant.truth().vascular_pressure_mmhg
    plant.advance_to(32.0)
    p2, v2 = plant.truth().pa_pressure_mmhg, plant.truth().vascular_pressure_mmhg
    rate = (500.0 / 60.0) / DEFAULTS.line_compliance_ml_per_mmhg  # 417 mmHg/s, no limit
    assert p2 - p1 == pytest.approx(rate, rel=1e-6)
    assert plant.truth().cannula_flow_ml_min == 0.0
    assert v2 < v1 < law_vascular_mmhg(500.0)  # the lung drains, nothing comes in
    pressures = []
    for i in range(1, 601):  # released at 35 s: the line empties into the lung
        injector.step_plant_to(32.0 + i * 0.1)
        pressures.append(plant.truth().pa_pressure_mmhg)
    assert plant.occlusion_factor == 1.0
    assert all(math.isfinite(p) for p in pressures)
    assert max(pressures) == pytest.approx(15.08 + 5.0 * rate, rel=0.05)
    assert pressures[-1] == pytest.approx(STEADY_SENSOR_MMHG, abs=0.05)


def test_leak_of_50_ml_min_lowers_the_reservoir_reading_50_ml_per_minute() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    plant.advance_to(10.0)
    injector.apply(LeakFault(leak_ml_min=50.0))
    before = mean_sensor(plant, "reservoir_volume_ml", 50)
    plant.advance_to(70.0)
    after = mean_sensor(plant, "reservoir_volume_ml", 50)
    assert before - after == pytest.approx(50.0, abs=5.0)
    assert plant.truth().reservoir_volume_ml == pytest.approx(750.0, abs=1e-6)
    injector.clear("leak")
    plant.advance_to(130.0)
    assert plant.truth().reservoir_volume_ml == pytest.approx(750.0, abs=1e-6)


def test_pump_stall_stops_the_flow_within_2_s_whatever_the_command() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    plant.advance_to(10.0)
    command_rpm = plant.pump_speed_command_rpm
    injector.apply(PumpStallFault(duration_s=5.0))
    plant.advance_to(10.05)  # the rotor brakes at pump_brake_rpm_per_s
    brake = plant.params.pump_brake_rpm_per_s
    assert plant.truth().pump_speed_rpm == pytest.approx(command_rpm - brake * 0.05, abs=1e-6)
    injector.step_plant_to(12.0)
    assert plant.truth().flow_ml_min == 0.0
    assert abs(mean_sensor(plant, "flow_ml_min")) < 5.0
    assert abs(mean_sensor(plant, "pump_speed_rpm")) < 0.05  # the tacho shows it
    assert plant.pump_speed_command_rpm == command_rpm
    injector.step_plant_to(16.0)  # stall over at 15 s: back at the command within 0.51 s
    assert plant.pump_stalled is False
    assert plant.truth().flow_ml_min == pytest.approx(500.0, abs=1e-6)


@pytest.mark.parametrize("thermostat_failed", [False, True])
def test_heater_stuck_on_heats_to_the_cap_or_past_it_without_the_thermostat(
    thermostat_failed: bool,
) -> None:
    params = DEFAULTS.model_copy(update={"initial_perfusate_c": 37.0, "initial_water_c": 37.0})
    plant = running_plant(500.0, params, step_s=0.05)
    injector = FaultInjector(plant)
    plant.set_heater_power_command(0.0)
    injector.apply(HeaterStuckOnFault(thermostat_failed=thermostat_failed))
    cap = params.water_cap_c
    water: list[float] = []
    powers: list[float] = []
    for i in range(1, 1201):  # 20 min
        plant.advance_to(i * 1.0)
        water.append(plant.truth().water_c)
        powers.append(plant.truth().heater_power_w)
    assert plant.heater_command_pct == 0.0
    # 800 W into 3 kg of water: ~3.8 degC/min at first.
    assert water[59] - 37.0 == pytest.approx(800.0 * 60.0 / (3.0 * 4186.0), rel=0.25)
    if thermostat_failed:
        assert all(p == params.heater_power_w for p in powers)
        assert all(b > a for a, b in itertools.pairwise(water))
        assert water[-1] > cap + 10.0
    else:
        assert max(water) >= cap  # reaches the cap...
        assert max(water) <= cap + 0.3  # ...and the heater's own cut-out holds it there
        assert 0.0 in powers
        assert min(water[water.index(max(water)) :]) >= cap - 0.5
    injector.clear("all")
    assert plant.heater_stuck_on is False
    assert plant.heater_thermostat_failed is False


def test_heater_failed_delivers_nothing_and_the_water_cools() -> None:
    params = DEFAULTS.model_copy(update={"initial_perfusate_c": 40.0, "initial_water_c": 41.0})
    plant = running_plant(500.0, params, step_s=0.05)
    injector = FaultInjector(plant)
    plant.set_heater_power_command(100.0)
    injector.apply(HeaterFailedFault())
    water = []
    for i in range(1, 601):  # 10 min
        plant.advance_to(i * 1.0)
        water.append(plant.truth().water_c)
        assert plant.truth().heater_power_w == 0.0
    assert all(b < a for a, b in itertools.pairwise(water))
    assert water[-1] < 41.0 - 2.0
    injector.clear("heater_failed")
    assert plant.truth().heater_power_w == params.heater_power_w  # command is still 100 %


def test_air_fault_sets_the_bubble_detector_for_its_duration() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    injector.schedule(AirFault(at_s=5.0, duration_s=0.5))
    seen: list[tuple[float, bool, bool]] = []
    for i in range(1, 101):
        injector.step_plant_to(i * 0.1)
        seen.append((plant.t_s, plant.sensors().air_detected, plant.truth().air_in_line))
    detected = [round(t, 6) for t, sensed, _ in seen if sensed]
    assert detected == [5.0, 5.1, 5.2, 5.3, 5.4]
    assert all(sensed == truth for _, sensed, truth in seen)


def test_resistance_fault_steps_and_drifts_then_restores_the_previous_resistance() -> None:
    plant = running_plant(500.0)
    plant.pvr_factor = 1.5  # a baseline set outside the injector survives the fault
    injector = FaultInjector(plant)
    injector.schedule(ResistanceFault(at_s=10.0, duration_s=120.0, factor=3.0, drift_per_min=0.01))
    injector.step_plant_to(70.0)
    assert plant.truth().pvr_wu == pytest.approx(DEFAULTS.pvr_wu * 3.0 * math.exp(0.01), rel=1e-6)
    injector.step_plant_to(200.0)
    assert plant.pvr_factor == 1.5
    assert plant.pvr_drift_per_min == 0.0
    assert plant.truth().pvr_wu == pytest.approx(DEFAULTS.pvr_wu * 1.5, rel=1e-12)
    expected = law_vascular_mmhg(500.0, 1.5) + 8.0
    assert plant.truth().pa_pressure_mmhg == pytest.approx(expected, abs=0.02)


# ---------------------------------------------------------------------------- sensor faults


def test_stuck_sensor_repeats_its_last_value_without_noise() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    plant.advance_to(30.0)
    last = plant.sensors().pa_pressure_mmhg
    injector.apply(SensorStuckFault(channel="pa_pressure"))
    plant.pvr_factor = 3.0  # the true pressure moves by ~6 mmHg, the reading must not
    readings = []
    flows = []
    for i in range(1, 101):
        plant.advance_to(30.0 + i * 0.1)
        s = plant.sensors()
        readings.append(s.pa_pressure_mmhg)
        flows.append(s.flow_ml_min)
    assert readings == [last] * 100
    assert plant.truth().pa_pressure_mmhg - last > 5.0
    assert statistics.stdev(flows) == pytest.approx(DEFAULTS.flow_noise_ml_min, rel=0.3)
    injector.clear("sensor_stuck", channel="pa_pressure")
    expected = plant.truth().pa_pressure_mmhg + DEFAULTS.pressure_offset_mmhg
    assert mean_sensor(plant, "pa_pressure_mmhg", 400) == pytest.approx(expected, abs=0.05)


def test_drifting_sensor_error_grows_linearly_at_the_rate() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    injector.schedule(SensorDriftFault(at_s=20.0, channel="pa_pressure", rate_per_min=3.0))
    times, errors = [], []
    for i in range(1, 601):  # 1 Hz for 10 min
        injector.step_plant_to(20.0 + i)
        error = (
            plant.sensors().pa_pressure_mmhg
            - plant.truth().pa_pressure_mmhg
            - DEFAULTS.pressure_offset_mmhg
        )
        times.append(float(i))
        errors.append(error)
    slope, intercept = statistics.linear_regression(times, errors)
    assert slope * 60.0 == pytest.approx(3.0, rel=0.005)  # mmHg/min
    assert intercept == pytest.approx(0.0, abs=0.05)
    assert errors[-1] == pytest.approx(30.0, abs=1.0)  # 10 min x 3 mmHg/min
    residuals = [e - (slope * t + intercept) for t, e in zip(times, errors, strict=True)]
    assert statistics.stdev(residuals) == pytest.approx(DEFAULTS.pressure_noise_mmhg, rel=0.2)


def test_noisy_sensor_has_the_extra_sigma() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    plant.advance_to(30.0)
    injector.apply(SensorNoiseFault(channel="flow", sigma=40.0))
    readings = [plant.sensors().flow_ml_min for _ in range(3000)]
    expected_sigma = math.hypot(40.0, DEFAULTS.flow_noise_ml_min)
    assert statistics.stdev(readings) == pytest.approx(expected_sigma, rel=0.1)
    assert statistics.fmean(readings) == pytest.approx(500.0, abs=3.0)


def test_dropped_out_sensor_has_no_value_and_its_register_is_not_refreshed(
    cfg: CartConfig,
) -> None:
    assert cfg.simulator is not None
    plant = Plant(cfg.simulator.plant)
    plant.set_pump_speed_command(15.0)
    injector = FaultInjector(plant)
    plant.advance_to(10.0)
    assert "perfusate_temp" in sensor_values(cfg, plant)
    before = plant.sensors()  # the last reading before the dropout
    injector.apply(SensorDropoutFault(channel="perfusate_temperature", duration_s=5.0))
    plant.perfusate_c += 3.0
    plant.advance_to(12.0)
    during = plant.sensors()
    assert during.dropouts == frozenset({"perfusate_temperature"})
    assert plant.sensor_dropouts() == frozenset({"perfusate_temperature"})
    assert during.perfusate_temperature_c == before.perfusate_temperature_c  # held, not fresh
    values = sensor_values(cfg, plant)
    assert "perfusate_temp" not in values
    assert {"flow", "pa_pressure", "air_detected"} <= set(values)
    injector.step_plant_to(20.0)  # dropout over at 15 s
    assert plant.sensors().dropouts == frozenset()
    assert "perfusate_temp" in sensor_values(cfg, plant)


def test_dropout_makes_the_virtual_reading_go_stale(cfg: CartConfig) -> None:
    cart = VirtualCart(cfg)
    injector = FaultInjector(cart.plant)
    cart.run_for(5.0)
    stale_since = cart.readings["pa_pressure"].t
    injector.apply(SensorDropoutFault(channel="pa_pressure"))
    cart.run_for(3.0)
    assert cart.readings["pa_pressure"].t == stale_since
    assert cart.readings["flow"].t == cart.t_s
    assert cart.t_s - stale_since == pytest.approx(3.0, abs=1e-9)
    assert cart.readings["air_detected"].value is False


@pytest.mark.parametrize("sample_period_s", [0.1, 0.7])
def test_periodic_spikes_hit_the_first_sample_of_each_period(sample_period_s: float) -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    injector.schedule(
        SensorSpikeFault(
            at_s=10.0, duration_s=55.0, channel="pa_pressure", magnitude=50.0, period_s=10.0
        )
    )
    spikes: list[tuple[float, float]] = []
    for k in range(1, round(80.0 / sample_period_s)):
        t = k * sample_period_s
        injector.step_plant_to(t)
        offset = (
            plant.sensors().pa_pressure_mmhg
            - plant.truth().pa_pressure_mmhg
            - DEFAULTS.pressure_offset_mmhg
        )
        if abs(offset) > 25.0:
            spikes.append((t, offset))
    # Due at 10, 20, ... 60 (the fault ends at 65): the first sample at or after each.
    expected = [
        math.ceil(due / sample_period_s - 1e-9) * sample_period_s for due in range(10, 61, 10)
    ]
    assert [t for t, _ in spikes] == pytest.approx(expected, abs=1e-9)
    assert all(o == pytest.approx(50.0, abs=1.0) for _, o in spikes)


def spike_positions(seed: int) -> list[int]:
    plant = running_plant(500.0, DEFAULTS.model_copy(update={"seed": seed}))
    injector = FaultInjector(plant)
    plant.advance_to(10.0)
    injector.apply(SensorSpikeFault(channel="flow", magnitude=-300.0, probability=0.1))
    return [i for i in range(3000) if plant.sensors().flow_ml_min < 500.0 - 150.0]


def test_random_spikes_follow_the_probability_and_repeat_with_the_seed() -> None:
    first = spike_positions(3)
    assert len(first) == pytest.approx(300, abs=60)  # 3000 x 0.1, +-3.6 sigma
    assert spike_positions(3) == first
    assert spike_positions(4) != first


def test_bool_channel_takes_only_stuck_and_dropout() -> None:
    with pytest.raises(ValueError, match="channel"):
        SensorDriftFault.model_validate(
            {"kind": "sensor_drift", "channel": "air_detected", "rate_per_min": 1.0}
        )
    plant = Plant(DEFAULTS)
    with pytest.raises(ValueError, match="numeric channel"):
        plant.set_sensor_fault("air_detected", DriftingSensor(1.0))
    with pytest.raises(ValueError, match="unknown sensor channel"):
        plant.set_sensor_fault("oxygen", DriftingSensor(1.0))  # type: ignore[arg-type]


def test_stuck_bubble_detector_hides_real_air() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    plant.advance_to(1.0)
    assert plant.sensors().air_detected is False
    injector.apply(SensorStuckFault(channel="air_detected"))
    injector.apply(AirFault())
    plant.advance_to(2.0)
    assert plant.truth().air_in_line is True
    assert plant.sensors().air_detected is False
    injector.clear("sensor_stuck")
    assert plant.sensors().air_detected is True


def run_with_faults(seed: int) -> list[SensorValues]:
    plant = running_plant(500.0, DEFAULTS.model_copy(update={"seed": seed}))
    injector = FaultInjector(plant)
    injector.load(
        Scenario(
            faults=[
                SensorNoiseFault(at_s=1.0, channel="pa_pressure", sigma=2.0),
                SensorSpikeFault(at_s=2.0, channel="flow", magnitude=100.0, probability=0.2),
                LeakFault(at_s=3.0, leak_ml_min=100.0),
            ]
        )
    )
    out = []
    for i in range(1, 101):
        injector.step_plant_to(i * 0.1)
        out.append(plant.sensors())
    return out


def test_faulted_runs_repeat_exactly_with_the_seed() -> None:
    assert run_with_faults(5) == run_with_faults(5)
    assert run_with_faults(5) != run_with_faults(6)


# ---------------------------------------------------------------------------- scheduling


def test_scenario_faults_start_and_end_exactly_at_their_times() -> None:
    plant = running_plant(500.0)
    injector = FaultInjector(plant)
    injector.load(
        scenario_from_data(
            {
                "faults": [
                    {"kind": "occlusion", "at_s": 15.0, "factor": 4},
                    {"kind": "leak", "at_s": 10.0, "duration_s": 20.0, "leak_ml_min": 60},
                    {"kind": "pump_stall", "at_s": 40.0, "duration_s": 1.5},
                ]
            }
        )
    )
    assert injector.next_event_s() == 10.0
    log: list[tuple[float, float, float, bool]] = []
    for t in (7.0, 14.0, 21.0, 28.0, 35.0, 42.0, 49.0):  # not aligned with any event
        injector.step_plant_to(t)
        log.append((t, plant.leak_ml_min, plant.occlusion_factor, plant.pump_stalled))
    assert log == [
        (7.0, 0.0, 1.0, False),
        (14.0, 60.0, 1.0, False),
        (21.0, 60.0, 4.0, False),
        (28.0, 60.0, 4.0, False),
        (35.0, 0.0, 4.0, False),
        (42.0, 0.0, 4.0, False),
        (49.0, 0.0, 4.0, False),
    ]
    # Stepped to the exact event times: 20 s at 60 mL/min, to the microlitre.
    assert plant.truth().reservoir_volume_ml == pytest.approx(800.0 - 20.0, abs=1e-9)
    assert injector.next_event_s() is None
    assert [a.fault.kind for a in injector.active] == ["occlusion"]
    assert injector.active[0].started_s == 15.0
    assert injector.active[0].ends_s is None


def test_advance_applies_due_faults_without_stepping_the_plant() -> None:
    plant = Plant(DEFAULTS)
    injector = FaultInjector(plant)
    injector.schedule(LeakFault(at_s=10.0, duration_s=5.0, leak_ml_min=30.0))
    injector.advance(9.999)
    assert plant.leak_ml_min == 0.0
    assert injector.next_event_s() == 10.0
    injector.advance(10.0)
    assert plant.leak_ml_min == 30.0
    assert injector.next_event_s() == 15.0
    injector.advance(100.0)
    assert plant.leak_ml_min == 0.0
    assert plant.t_s == 0.0
    with pytest.raises(ValueError, match="finite"):
        injector.advance(math.nan)


def test_a_fault_replaces_the_one_in_its_slot_and_an_end_precedes_a_start() -> None:
    plant = Plant(DEFAULTS)
    injector = FaultInjector(plant)
    injector.schedule(OcclusionFault(at_s=10.0, duration_s=20.0, factor=5.0))
    injector.schedule(OcclusionFault(at_s=20.0, factor=20.0))
    injector.schedule(LeakFault(at_s=0.0, duration_s=10.0, leak_ml_min=10.0))
    injector.schedule(LeakFault(at_s=10.0, leak_ml_min=99.0))
    injector.schedule(SensorStuckFault(at_s=5.0, channel="flow"))
    injector.schedule(SensorNoiseFault(at_s=6.0, channel="flow", sigma=1.0))
    injector.advance(31.0)  # the replaced occlusion's end (30 s) must not clear the new one
    assert plant.occlusion_factor == 20.0
    assert plant.leak_ml_min == 99.0  # ended at 10 s, then the next one started at 10 s
    assert [type(f).__name__ for f in plant.sensor_faults.values()] == ["NoisySensor"]
    assert sorted(a.fault.kind for a in injector.active) == ["leak", "occlusion", "sensor_noise"]


def test_clear_ends_matching_faults_and_restores_what_they_changed() -> None:
    plant = Plant(DEFAULTS)
    plant.leak_ml_min = 5.0  # a baseline leak set outside the injector
    injector = FaultInjector(plant)
    injector.apply(LeakFault(leak_ml_min=50.0))
    injector.apply(SensorStuckFault(channel="flow"))
    injector.apply(SensorStuckFault(channel="pa_pressure"))
    injector.schedule(AirFault(at_s=100.0))
    cleared = injector.clear("sensor_stuck", channel="flow")
    assert [(f.kind, getattr(f, "channel", None)) for f in cleared] == [("sensor_stuck", "flow")]
    assert set(plant.sensor_faults) == {"pa_pressure"}
    assert injector.clear(LeakFault(leak_ml_min=50.0)) == [LeakFault(leak_ml_min=50.0)]
    assert plant.leak_ml_min == 5.0
    assert len(injector.clear("all")) == 2  # the active stuck sensor and the scheduled air
    assert injector.active == ()
    assert injector.pending == ()
    injector.advance(200.0)
    assert plant.air_in_line is False
    with pytest.raises(ValueError, match="unknown fault kind"):
        injector.clear("flood")  # type: ignore[arg-type]


def test_device_faults_drive_the_hooks_at_their_times() -> None:
    plant = Plant(DEFAULTS)
    hooks = RecordingHooks(plant)
    injector = FaultInjector(plant, hooks, devices=["io", "pump", "heater"])
    injector.load(
        Scenario(
            faults=[
                DeviceUnresponsiveFault(at_s=1.0, duration_s=2.0, device="pump"),
                DeviceSlowFault(at_s=2.0, duration_s=0.5, device="io", delay_s=0.3),
                DeviceExceptionFault(at_s=4.0, device="heater", exception_code=6),
            ]
        )
    )
    for i in range(1, 11):
        injector.step_plant_to(i * 0.5)
    assert hooks.calls == [
        (1.0, "unresponsive", "pump", True),
        (2.0, "delay", "io", 0.3),
        (2.5, "delay", "io", 0.0),
        (3.0, "unresponsive", "pump", False),
        (4.0, "exception", "heater", 6),
    ]
    injector.clear("device_exception", device="heater")
    assert hooks.calls[-1] == (5.0, "exception", "heater", None)


def test_unusable_faults_are_refused_before_anything_is_scheduled() -> None:
    plant = Plant(DEFAULTS)
    no_devices = FaultInjector(plant)
    with pytest.raises(ValueError, match="no devices"):
        no_devices.apply(DeviceSlowFault(device="io", delay_s=0.5))
    injector = FaultInjector(plant, RecordingHooks(plant), devices=["io"])
    scenario = Scenario(
        faults=[
            LeakFault(at_s=1.0, leak_ml_min=10.0),
            DeviceUnresponsiveFault(at_s=2.0, device="pmp"),
        ]
    )
    with pytest.raises(ValueError, match="no device named 'pmp'"):
        injector.load(scenario)
    assert injector.pending == ()
    plant.advance_to(10.0)
    with pytest.raises(ValueError, match="in the past"):
        injector.schedule(LeakFault(at_s=5.0, leak_ml_min=10.0))


# ---------------------------------------------------------------------------- scenario files


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_example_scenarios_load_and_fit_the_sim_config(path: Path, cfg: CartConfig) -> None:
    scenario = load_scenario(path)
    assert scenario.name
    assert len(scenario.faults) >= 1
    assert all(f.at_s is not None and f.at_s >= 60.0 for f in scenario.faults)
    assert cfg.simulator is not None
    plant = Plant(cfg.simulator.plant)
    injector = FaultInjector(plant, RecordingHooks(plant), devices=cfg.devices)
    injector.load(scenario)
    assert len(injector.pending) == len(scenario.faults)


def test_scenario_examples_include_the_required_ones() -> None:
    assert {p.name for p in SCENARIOS} >= {"occlusion.yaml", "leak.yaml", "heater_runaway.yaml"}
    runaway = load_scenario(ROOT / "config" / "scenarios" / "heater_runaway.yaml")
    assert runaway.faults == [HeaterStuckOnFault(at_s=420.0, thermostat_failed=True)]


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        (
            "faults:\n  - {kind: leak, at_s: 1}\n",
            ["faults[0].leak_ml_min: required key is missing"],
        ),
        (
            "faults:\n  - {kind: occlusion, at_s: 1, factr: 20}\n",
            ["faults[0].factr: unknown key"],
        ),
        (
            "faults:\n  - {kind: air, at_s: 1}\n  - {kind: leek, at_s: 2}\n",
            [f"faults[1].kind: unknown fault kind 'leek'; known: {', '.join(FAULT_KINDS)}"],
        ),
        (
            "faults:\n  - {at_s: 1, leak_ml_min: 5}\n",
            [f"faults[0].kind: required key is missing (one of: {', '.join(FAULT_KINDS)})"],
        ),
        (
            "faults:\n  - {kind: air, at_s: 1}\n  - {kind: pump_stall}\n",
            ["faults[1].at_s: required in a scenario file"],
        ),
        (
            "faults:\n  - {kind: leak, at_s: 1, leak_ml_min: '50'}\n",
            ["faults[0].leak_ml_min: Input should be a valid number"],
        ),
        (
            "faults:\n  - {kind: sensor_noise, at_s: 1, channel: flow, sigma: 0}\n",
            ["faults[0].sigma: Input should be greater than 0"],
        ),
        (
            "faults:\n  - {kind: air, at_s: -1, duration_s: 0}\n",
            [
                "faults[0].at_s: Input should be greater than or equal to 0",
                "faults[0].duration_s: Input should be greater than 0",
            ],
        ),
        (
            "faults:\n  - {kind: device_exception, at_s: 1, device: io, exception_code: 9}\n",
            [
                "faults[0].exception_code: Input should be 1, 2, 3, 4, 5, 6, 7, 8, 10 or 11",
            ],
        ),
        ("nme: x\nfaults: []\n", ["nme: unknown key"]),
        ("- {kind: air, at_s: 1}\n", ["the top level must be a mapping with a 'faults' list"]),
    ],
)
def test_invalid_scenario_files_name_the_key_path(
    tmp_path: Path, text: str, problems: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert isinstance(info.value, ConfigError)  # one except clause for config and scenario
    assert info.value.problems == problems
    assert info.value.source == str(path)


def test_drift_on_the_bubble_detector_is_refused_naming_the_channel(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "faults:\n  - {kind: sensor_drift, at_s: 1, channel: air_detected, rate_per_min: 1}\n",
        encoding="utf-8",
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (problem,) = info.value.problems
    assert problem.startswith("faults[0].channel: Input should be 'flow', 'pa_pressure'")


def test_unreadable_scenario_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="file not found"):
        load_scenario(tmp_path / "missing.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("faults:\n  - {kind: air, at_s: 1\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"line \d+, column \d+"):
        load_scenario(path)
    path.write_text("faults: []\nfaults: []\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match="line 2"):
        load_scenario(path)  # duplicate keys are an error, not "the last one wins"


# ---------------------------------------------------------------------------- run-time messages


def test_runtime_fault_without_at_s_means_now() -> None:
    fault = parse_runtime_fault(b'{"kind": "leak", "leak_ml_min": 50}')
    assert fault == LeakFault(leak_ml_min=50.0)
    assert fault.at_s is None
    plant = running_plant(500.0)
    plant.advance_to(12.5)
    injector = FaultInjector(plant)
    assert injector.handle_runtime_message(b'{"kind": "air", "duration_s": 2}') == AirFault(
        duration_s=2.0
    )
    assert plant.air_in_line is True
    assert injector.active[0].started_s == 12.5
    assert injector.next_event_s() == 14.5
    message = injector.handle_runtime_message(b'{"clear": "air"}')
    assert message == FaultClear(clear="air")
    assert plant.air_in_line is False


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"kind": "leak", "leak_ml_min": 5', "fault message is not valid JSON: "),
        (b"", "fault message is not valid JSON: Expecting value at line 1 column 1"),
        (b"\xff\xfe", "fault message is not UTF-8"),
        (b"[1, 2]", "fault message must be a JSON object, got list"),
        (b'"leak"', "fault message must be a JSON object, got str"),
        (
            b'{"kind": "flood"}',
            "invalid fault message: kind: unknown fault kind 'flood'; known: occlusion,",
        ),
        (b'{"leak_ml_min": 5}', "invalid fault message: kind: required key is missing"),
        (b'{"kind": "leak"}', "invalid fault message: leak_ml_min: required key is missing"),
        (
            b'{"kind": "sensor_noise", "channel": "flow"}',
            "invalid fault message: sigma: required key is missing",
        ),
        (
            b'{"kind": "leak", "leak_ml_min": "50"}',
            "invalid fault message: leak_ml_min: Input should be a valid number",
        ),
        (
            b'{"kind": "leak", "leak_ml_min": NaN}',
            "invalid fault message: leak_ml_min: Input should be a finite number",
        ),
        (
            b'{"kind": "air", "colour": "red"}',
            "invalid fault message: colour: unknown key",
        ),
        (
            b'{"kind": "sensor_spike", "channel": "flow", "magnitude": 5}',
            "invalid fault message: give exactly one of period_s or probability",
        ),
        (
            b'{"clear": "leak", "channel": "flow"}',
            "invalid fault message: channel narrows sensor_* kinds only",
        ),
        (
            b'{"clear": "everything"}',
            "invalid fault message: clear: Input should be 'occlusion', 'leak', ",
        ),
        (
            b'{"kind": "occlusion"}',
            "invalid fault message: give either factor (>= 1) or complete: true",
        ),
        (b'{"clear": "air"}', "this is a clear message, not a fault"),
    ],
)
def test_malformed_runtime_messages_are_refused_specifically(payload: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_runtime_fault(payload)


def test_every_kind_has_a_documented_example_that_parses() -> None:
    assert set(EXAMPLES) == set(FAULT_KINDS)
    for kind, example in EXAMPLES.items():
        fault = parse_runtime_fault(json.dumps(example).encode())
        assert fault.kind == kind
        assert fault.model_dump(exclude_defaults=True) | {"kind": kind} == example
    for clear in CLEAR_EXAMPLES:
        assert isinstance(parse_runtime_message(json.dumps(clear).encode()), FaultClear)
    assert len(scenario_from_data(_yaml(SCENARIO_EXAMPLE)).faults) == 3


def _yaml(text: str) -> object:
    from ilup_controller.config.loader import parse_yaml

    return parse_yaml(text, "<example>")


# ---------------------------------------------------------------------------- wiring, docs


def test_bool_signals_pass_through_quantise(cfg: CartConfig) -> None:
    air = cfg.signals["air_detected"]
    assert quantise(air, True) is True
    assert quantise(air, False) is False
    assert quantise(cfg.signals["pa_pressure"], 15.084) == pytest.approx(15.08, abs=1e-9)
    assert cfg.simulator is not None
    assert cfg.simulator.bindings.air_detected == "air_detected"
    plant = Plant(cfg.simulator.plant)
    plant.air_in_line = True
    assert sensor_values(cfg, plant)["air_detected"] is True


def test_committed_docs_match_the_models() -> None:
    assert DOC_PATH == ROOT / "docs" / "faults.md"
    assert DOC_PATH.read_text(encoding="utf-8") == render_docs(), (
        "docs/faults.md is out of date: run `python -m sim.faults --docs`"
    )
    text = render_docs()
    for kind in FAULT_KINDS:
        assert f"\n## {kind}\n" in text
        assert json.dumps(EXAMPLES[kind]) in text


def test_docs_check_mode_and_scenario_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "faults.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--docs", "--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == render_docs()
    bad = tmp_path / "bad.yaml"
    bad.write_text("faults:\n  - {kind: leak, at_s: 1}\n", encoding="utf-8")
    assert main([str(SCENARIOS[0])]) == 0
    assert main([str(SCENARIOS[0]), str(bad)]) == 1
    assert "faults[0].leak_ml_min: required key is missing" in capsys.readouterr().err
