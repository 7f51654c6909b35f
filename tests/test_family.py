"""The plant family (sim/family.py) and the plant features it needs; fast, no closed-loop runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ilup_controller.config import CartConfig, load_config
from ilup_controller.config.models import SimPlant
from ilup_controller.exitcodes import ExitCode
from sim import family
from sim.metrics import run_metrics
from sim.plant import Plant
from sim.wiring import compile_quantiser, quantise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base() -> CartConfig:
    return load_config(ROOT / "config" / "sim.yaml")


def test_at_least_24_variants_with_unique_names_and_one_line_descriptions() -> None:
    names = [v.name for v in family.VARIANTS]
    assert len(names) >= 24, len(names)
    assert len(set(names)) == len(names)
    for v in family.VARIANTS:
        assert v.description, v.name
        assert "\n" not in v.description, v.name
        assert family.by_name(v.name) is v


@pytest.mark.parametrize("variant", family.VARIANTS, ids=lambda v: v.name)
def test_every_variant_builds_a_valid_cart_config(
    variant: family.Variant, base: CartConfig
) -> None:
    cfg = family.apply(variant, base)
    assert isinstance(cfg, CartConfig)
    assert cfg.simulator is not None
    assert base.simulator is not None
    plant = cfg.simulator.plant
    for key, value in variant.plant.items():
        assert getattr(plant, key) == value, key
    if variant.start_c is not None:
        assert plant.initial_perfusate_c == plant.initial_water_c == variant.start_c
    # The controller's side is untouched: only the plant and register scales change.
    assert cfg.control == base.control
    assert cfg.alarms == base.alarms


def test_family_spans_the_ranges_of_issue_9(base: CartConfig) -> None:
    plants = {v.name: family.apply(v, base).simulator.plant for v in family.VARIANTS}  # type: ignore[union-attr]
    heaters = [p.heater_power_w for p in plants.values()]
    assert min(heaters) == 300.0
    assert max(heaters) == 1500.0
    waters = [p.water_mass_kg for p in plants.values()]
    assert min(waters) == 1.5
    assert max(waters) == 8.0
    hx = [p.hx_ua_w_per_k for p in plants.values()]
    assert min(hx) == 20.0
    assert max(hx) == 150.0
    starts = {p.initial_perfusate_c for p in plants.values()}
    assert {25.0, 30.0, 34.0, 36.0} <= starts
    rooms = [p.ambient_c for p in plants.values()]
    assert min(rooms) == 18.0
    assert max(rooms) == 26.0
    pvr = [p.pvr_wu for p in plants.values()]
    assert min(pvr) == 6.0
    assert max(pvr) == 40.0
    comp = [p.compliance_ml_per_mmhg for p in plants.values()]
    assert min(comp) == 0.3
    assert max(comp) == 3.0
    offsets = {p.pressure_offset_mmhg for p in plants.values()}
    assert {2.0, -2.0} <= offsets
    # Probe delay 0 and 25 s at the 500 mL/min target: 0 and 208.3 mL of tubing.
    assert plants["probe_delay_0s"].tubing_volume_ml == 0.0
    assert plants["probe_delay_25s"].tubing_volume_ml == pytest.approx(25.0 * 500.0 / 60.0)
    # True stroke volume +-10 % of the configured 33 mL/rev.
    assert plants["stroke_plus10"].stroke_volume_ml_per_rev == pytest.approx(36.3)
    assert plants["stroke_minus10"].stroke_volume_ml_per_rev == pytest.approx(29.7)
    noise_free = plants["noise_free"]
    assert all(getattr(noise_free, k) == 0.0 for k in family.NOISE_FIELDS)
    assert plants["flow_cutoff_20"].flow_cutoff_ml_min == 20.0
    assert plants["pump_slip"].pump_slip_per_mmhg > 0.0


def test_register_resolution_reaches_the_cart_signals(base: CartConfig) -> None:
    cfg = family.apply(family.by_name("all_quantised"), base)
    sig = cfg.signals
    assert sig["perfusate_temp"].scale == 0.1
    assert sig["heater_water_temp"].scale == 0.1
    assert sig["pa_pressure"].scale == 0.1
    assert sig["reservoir_volume"].scale == 10.0
    assert sig["flow"].data_type == "int16"
    assert sig["flow"].scale == 1.0
    assert quantise(sig["perfusate_temp"], 36.94) == pytest.approx(36.9)
    assert quantise(sig["reservoir_volume"], 796.0) == 800.0
    assert quantise(sig["flow"], 499.62) == 500.0
    # The base file is not changed by applying a variant.
    assert base.signals["perfusate_temp"].scale == 0.01


def test_compiled_quantisers_match_the_codec_bit_for_bit(base: CartConfig) -> None:
    cfg = family.apply(family.by_name("all_quantised"), base)
    values = [-1e9, -250.0, -0.005, 0.0, 0.004999, 0.05, 14.999, 36.95, 499.62, 1e6, 1e40]
    for signals in (base.signals, cfg.signals):
        for s in signals.values():
            if s.data_type == "bool":
                continue
            fast = compile_quantiser(s)
            for v in values:
                assert fast(v) == quantise(s, v), (s, v)


def test_random_variants_are_reproducible_and_inside_the_ranges(base: CartConfig) -> None:
    a = family.random_variants(7, 12)
    assert a == family.random_variants(7, 12)
    assert a != family.random_variants(8, 12)
    assert [v.name for v in a] == [f"random_7_{i}" for i in range(12)]
    assert family.by_name("random_7_5") == a[5]
    for v in a:
        cfg = family.apply(v, base)
        assert cfg.simulator is not None
        p = cfg.simulator.plant
        for key, (lo, hi) in family.RANDOM_RANGES.items():
            value = (
                getattr(v, key)
                if key in ("probe_delay_s", "stroke_volume_factor")
                else (getattr(p, key))
            )
            assert lo <= value <= hi, (v.name, key, value)
        assert p.initial_perfusate_c in family.START_TEMPERATURES_C


def test_defaults_leave_the_reference_plant_unchanged() -> None:
    p = SimPlant()
    assert p.flow_cutoff_ml_min == 0.0
    assert p.pump_slip_per_mmhg == 0.0
    assert p.heater_supply_max_w is None
    assert family.apply(family.by_name("reference"), load_config(ROOT / "config/sim.yaml")) == (
        load_config(ROOT / "config/sim.yaml")
    )


def test_low_flow_cut_off_reads_exactly_zero_below_its_threshold() -> None:
    plant = Plant(SimPlant(flow_cutoff_ml_min=20.0, flow_noise_ml_min=1.0))
    plant.set_pump_speed_command(12.0 / 33.0)  # 12 mL/min: 8 sigma under the cut-off
    plant.step(5.0)
    assert plant.truth().flow_ml_min == pytest.approx(12.0)
    below = [plant.sensors().flow_ml_min for _ in range(500)]
    assert all(f == 0.0 for f in below)
    plant.set_pump_speed_command(40.0 / 33.0)  # 40 mL/min: 20 sigma above the cut-off
    plant.step(5.0)
    above = [plant.sensors().flow_ml_min for _ in range(500)]
    assert all(f >= 20.0 for f in above)
    assert sum(above) / len(above) == pytest.approx(40.0, abs=0.5)
    # At rest the meter reads exactly 0.0 (without a cut-off, noise makes it +-3 mL/min).
    rest = Plant(SimPlant(flow_cutoff_ml_min=20.0))
    assert {rest.sensors().flow_ml_min for _ in range(100)} == {0.0}


def test_pump_slip_reduces_flow_under_afterload() -> None:
    speed_rpm = 500.0 / 33.0
    plants = {}
    for slip in (0.0, 0.004):
        plant = Plant(SimPlant(pump_slip_per_mmhg=slip))
        plant.set_pump_speed_command(speed_rpm)
        plant.step(30.0)
        plants[slip] = plant
    ref, slipping = plants[0.0].truth(), plants[0.004].truth()
    assert ref.flow_ml_min == pytest.approx(500.0)
    # Net flow = speed x stroke volume x (1 - slip x line pressure), here ~14.5 mmHg: -5.8 %.
    expected = 500.0 * (1.0 - 0.004 * slipping.pa_pressure_mmhg)
    assert slipping.flow_ml_min == pytest.approx(expected, rel=1e-3)
    assert 465.0 < slipping.flow_ml_min < 475.0
    assert slipping.cannula_flow_ml_min == pytest.approx(slipping.flow_ml_min, rel=1e-3)
    # Twice the afterload: the slip grows with it.
    plants[0.004].pvr_factor = 3.0
    plants[0.004].step(30.0)
    harder = plants[0.004].truth()
    assert harder.pa_pressure_mmhg > slipping.pa_pressure_mmhg + 5.0
    assert harder.flow_ml_min == pytest.approx(
        500.0 * (1.0 - 0.004 * harder.pa_pressure_mmhg), rel=1e-3
    )
    assert harder.flow_ml_min < slipping.flow_ml_min - 10.0


def test_heater_supply_limits_delivered_power() -> None:
    plant = Plant(SimPlant(heater_power_w=1500.0, heater_supply_max_w=400.0))
    plant.set_heater_power_command(20.0)
    assert plant.heater_delivered_w == pytest.approx(300.0)
    plant.set_heater_power_command(100.0)
    assert plant.heater_delivered_w == 400.0
    t0 = plant.water_c
    plant.step(60.0)
    # 400 W into 3 kg of water (less what the exchanger passes on): at most 1.91 degC/min.
    assert 0.0 < plant.water_c - t0 <= 400.0 * 60.0 / (3.0 * 4186.0) + 1e-9


def test_metrics_of_a_short_reference_run(base: CartConfig) -> None:
    m = run_metrics(base, duration_s=300.0)
    assert m.alarm_onsets == {}
    assert m.rewarm_start_c is not None
    assert 33.9 < m.rewarm_start_c < 34.1
    assert m.rewarm_s is None  # 3 degC at 0.4 degC/min: not within 0.3 degC after 5 min
    assert m.rewarm_limit_s == pytest.approx(1.25 * (37.0 - m.rewarm_start_c) / 0.5 * 60.0)
    assert m.peak_pressure_mmhg < base.control.pressure.limit_mmhg
    assert m.flow_rms_ml_min is not None
    assert m.flow_rms_ml_min < 10.0
    assert m.drug_phase_done_s is None


def test_committed_doc_is_up_to_date() -> None:
    assert family.DOC_PATH == ROOT / "docs" / "plant_family.md"
    assert family.DOC_PATH.read_text(encoding="utf-8") == family.render(), (
        f"docs/plant_family.md is out of date: run `{family.COMMAND}`"
    )


def test_docs_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "plant_family.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert family.main(["--check", "--output", str(stale)]) == 1
    assert family.main(["--docs", "--output", str(stale)]) == 0
    assert family.main(["--check", "--output", str(stale)]) == 0


def test_cli_sim_rejects_an_unknown_variant_and_writes_a_variant_cart_file(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ilup_controller", "sim", "-c", "config/sim.yaml",
         "--variant", "no_such_plant"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "no plant variant named 'no_such_plant'" in done.stderr
    out = tmp_path / "cart.yaml"
    cfg = family.apply(family.by_name("temp_0p1c"), load_config(ROOT / "config/sim.yaml"))
    family.write_config(cfg, out)
    assert load_config(out) == cfg
