"""Closed-loop control across the plant family (issue 9): 13 fault-free variants the
controller was not tuned on, each a full procedure in virtual time with the default cart
settings. Zero alarm onsets, the drug phase completes, and the rewarming bars on the true plant:
no overshoot beyond 0.3 degC, water under its cap, gradient within its limit, the arterial never
warming faster than 0.5 degC/min over 2 minutes. The rewarm time is held to the figure the
controller reaches today (README family table); the guideline's 1.25 x allowance is met on the
stronger variants only, and each bound below says how far off the others are."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from itertools import pairwise
from typing import cast

import pytest
from diag_variants import onsets, run_procedure

from ilup_controller.config import load_config
from ilup_controller.config.models import CartConfig
from ilup_controller.core.control import ControlEvent
from ilup_controller.runtime.state import build_event
from sim.family import apply, by_name, changed
from sim.metrics import (
    GUIDELINE_C_PER_MIN,
    RunCollector,
    RunMetrics,
    physical_bound_s,
    run_many,
)
from sim.virtual import Sample, VirtualCart

# variant -> (virtual minutes to run, rewarm time / guideline limit held to: today's figure in
# the README family table plus 0.02)
CASES = {
    "all_quantised": (42.0, 1.02),  # noise-free, 0.1 degC / 0.1 mmHg / 10 mL registers
    "digital_stiff_circuit": (42.0, 1.02),  # quantised, offset, stiff, slip, stroke -10 %
    "noise_free_27wu": (42.0, 0.99),  # noise-free ramp then steady: was "stuck", pump held
    # 36 degC prime, 20 W/K: cools before it warms; the gradient froze for 10 min (ratio 5.96)
    "weak_hx_warm_prime": (42.0, 2.94),
    "probe_delay_25s": (42.0, 1.10),  # long tubing to the probe
    "small_bath_delay_12s": (42.0, 1.04),  # the circuit
    "hx_20": (44.0, 1.23),  # weak exchanger: the gradient limit binds near 37 degC
    "heater_300w": (42.0, 1.10),  # weak heater
    "water_8kg": (42.0, 1.03),  # slow water bath
    "start_30c": (50.0, 0.87),  # cold prime, warmed by the body through the lung
    # 140 W/K, 17 s probe delay: the ramp after the cold plug rose 0.55 degC/min over 2 minutes
    # from the plug's bottom (heating_rate latched, drug phase never done) until the asked rate
    # kept the alarm's window within 0.49 degC/min (core/rewarm.py)
    "strong_hx_delay_17s": (42.0, 1.01),
    # 0.1 degC noise-free probes 17-21 s down the line: the integral wound up while the probe
    # stayed flat, and warmed in bursts (heating_rate latched on the cool prime, 0.52 degC/min
    # and 0.3-0.4 degC overshoot on the other) until each burst halved the integral gain, and
    # the integral held while the water stood above its setpoint
    "late_flat_probe": (42.0, 1.05),
    "late_flat_probe_cool_prime": (50.0, 0.99),
    # noise-free, 24 s probe delay: a limit cycle at 0.68-0.75 degC/min at the probe, under the
    # former burst threshold, grew until heating_rate latched at 946 s (core/rewarm.py)
    "noise_free_delay_24s_cool_prime": (50.0, 0.93),
}
# A prime colder than the body is warmed through the lung faster than the guideline rate with
# the heater off: the controller cannot slow it (heater-only), so the advisory says so.
BODY_WARMED = {"start_30c", "late_flat_probe_cool_prime", "noise_free_delay_24s_cool_prime"}


@pytest.fixture(scope="module")
def results() -> dict[str, RunMetrics]:
    base = load_config("config/sim.yaml")
    return run_many(
        {name: (apply(by_name(name), base), minutes * 60.0) for name, (minutes, _) in CASES.items()}
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_variant_runs_a_full_procedure_without_alarms(
    results: dict[str, RunMetrics], name: str
) -> None:
    m = results[name]
    expected = {"warming_uncontrolled"} if name in BODY_WARMED else set()
    assert set(m.alarm_onsets) == expected, m.alarm_onsets
    assert sum(m.alarm_onsets.values()) == len(expected), m.alarm_onsets
    assert m.drug_phase_done_s is not None, f"drug phase at {m.drug_elapsed_s:.0f} s"
    assert m.flow_rms_ml_min is not None
    assert m.flow_rms_ml_min <= 5.0
    assert m.peak_pressure_mmhg < 25.0


@pytest.mark.parametrize("name", sorted(CASES))
def test_variant_rewarms_within_the_guideline_limits(
    results: dict[str, RunMetrics], name: str
) -> None:
    m = results[name]
    cfg = apply(by_name(name), load_config("config/sim.yaml"))
    t = cfg.control.temperature
    assert m.overshoot_c <= 0.3, m.overshoot_c
    assert m.peak_water_c < t.water_cap_c, m.peak_water_c
    assert m.max_gradient_c <= cfg.alarms.gradient_c, m.max_gradient_c
    if name not in BODY_WARMED:
        assert m.max_rate_c_per_min <= GUIDELINE_C_PER_MIN, m.max_rate_c_per_min
    assert m.rewarm_ratio is not None
    assert m.rewarm_ratio <= CASES[name][1], m.rewarm_ratio
    # ... and the plant could have done it faster: the figure is the controller's, not physics'.
    assert m.bound_start is not None
    bound = physical_bound_s(cfg, *m.bound_start)
    assert bound is not None
    assert m.rewarm_s is not None
    assert bound < m.rewarm_s


def test_the_cold_plug_sets_a_pace_no_heater_warmed_run_beats(
    results: dict[str, RunMetrics],
) -> None:
    """As the flow ramps, the tubing contents that cooled at priming flow pass the probe: the
    true arterial dips 0.2-0.4 degC under where rewarming started, 40-80 s after the heater
    starts (the README family table's plug column). The guideline's 2-minute window counts the
    rise from that bottom, so a steady 0.5 degC/min from it is a pace no heater-warmed run
    beats. With a 25 s probe delay the bottom comes at 76 s, and that pace alone takes 0.97
    of the limit: the physical bound (0.86) leaves the plug out."""
    for name in sorted(CASES.keys() - BODY_WARMED):
        start_c, rewarm_s, low_c, low_s, pace_s = _plug_figures(results[name])
        assert rewarm_s >= pace_s, (name, rewarm_s, pace_s)
        if name != "weak_hx_warm_prime":  # 36 degC through 20 W/K: cools 0.8 degC at first
            assert 0.15 < start_c - low_c < 0.5, (name, low_c)
            assert 30.0 < low_s < 90.0, (name, low_s)
    delayed = results["probe_delay_25s"]
    _, _, _, low_s, pace_s = _plug_figures(delayed)
    assert 60.0 < low_s < 90.0, low_s
    assert delayed.rewarm_limit_s is not None
    assert 0.95 < pace_s / delayed.rewarm_limit_s < 1.0


def _plug_figures(m: RunMetrics) -> tuple[float, float, float, float, float]:
    """Rewarm start and time, the plug's bottom and its time, the guideline pace from it."""
    figures = (m.rewarm_start_c, m.rewarm_s, m.plug_low_c, m.plug_low_s, m.plug_pace_s)
    assert None not in figures, figures
    return cast(tuple[float, float, float, float, float], figures)


def test_the_rate_loop_slows_its_integral_only_where_the_warming_came_in_bursts() -> None:
    """In the first 10 minutes the strong exchanger's warming, 17 s down the line, comes in
    bursts and the published integral scale halves twice (1 -> 0.5 -> 0.25), each told once, at
    the tick it halves, as a rewarm_integral event (events topic and record: the reader sees why
    the loop changed); the reference plant keeps the configured gain and tells nothing."""
    base = load_config("config/sim.yaml")
    told: dict[str, list[ControlEvent]] = {}
    drops: dict[str, list[tuple[float, float]]] = {}  # (tick, published scale) where it fell
    for name in ("strong_hx_delay_17s", "reference"):
        told[name], published_scales = [], [(0.0, 1.0)]

        def keep(
            s: Sample, name: str = name, scales: list[tuple[float, float]] = published_scales
        ) -> None:
            d = s.decision
            told[name].extend(e for e in d.events if isinstance(e, ControlEvent))
            scales.append((d.t_s, d.loop.rate_integral_scale))

        VirtualCart(apply(by_name(name), base)).run_for(600.0, keep)
        drops[name] = [now for before, now in pairwise(published_scales) if now[1] < before[1]]
    assert [scale for _, scale in drops["strong_hx_delay_17s"]] == [0.5, 0.25], drops
    assert drops["reference"] == [], drops
    assert told["reference"] == []
    assert [(e.t_s, e.value) for e in told["strong_hx_delay_17s"]] == drops["strong_hx_delay_17s"]
    first = told["strong_hx_delay_17s"][0]
    assert "integral gain is now 0.5 x control.temperature.gradient_pid.ki" in first.message
    published = build_event(base, first, seq=7, utc_of=lambda t_s: datetime.fromtimestamp(t_s, UTC))
    assert (published.kind, published.value, published.message) == (
        "rewarm_integral",
        0.5,
        first.message,
    )


def test_heating_resumes_within_the_guideline_after_a_flow_interruption() -> None:
    """Mid-rewarming the flow drops to 50 mL/min (below min_flow_ml_min: the heater is
    blocked) for 400 s, on the strongest exchanger, then returns. The line contents cool and
    pass the probe again as the flow ramps: heating restarts without warming the true arterial
    faster than 0.5 degC/min over any 2 minutes (0.49 measured), and without an alarm."""
    cfg = apply(by_name("hx_150"), load_config("config/sim.yaml"))
    cart = VirtualCart(cfg)
    before, after = RunCollector(cfg), RunCollector(cfg)
    cart.run_for(250.0, before)
    cart.core.controller.flow_target_ml_min = 50.0
    cart.run_for(400.0, before)
    assert cart.plant.truth().flow_ml_min < 100.0
    cart.core.controller.flow_target_ml_min = 500.0
    cart.run_for(600.0, after)  # from the restart on
    assert cart.plant.truth().arterial_c > 36.7  # it did rewarm
    assert 0.3 < after.max_rate <= GUIDELINE_C_PER_MIN, after.max_rate
    assert not before.onsets, before.onsets
    assert not after.onsets, after.onsets


# ------------------------------------------------------------------ the physical bound


def _plant(**settings: float) -> CartConfig:
    base = load_config("config/sim.yaml")
    assert base.simulator is not None
    plant = base.simulator.plant.model_copy(update=settings)
    return base.model_copy(update={"simulator": base.simulator.model_copy(update={"plant": plant})})


def test_the_bound_is_the_guideline_ramp_plus_warming_the_water_plus_the_transit() -> None:
    """From 33.7 degC with the water no warmer: 3.0 degC at 0.5 degC/min is 360 s, the probe
    sees it 70 mL / 500 mL/min = 8.4 s later, and the 800 W heater needs a few seconds to put
    its 3 kg of water at the gradient first."""
    cfg = _plant()
    ramp_s = (cfg.control.temperature.target_c - 0.3 - 33.7) / GUIDELINE_C_PER_MIN * 60.0
    transit_s = 70.0 / 500.0 * 60.0
    bound = physical_bound_s(cfg, 33.7, 33.7)
    assert bound is not None
    assert ramp_s + transit_s < bound < ramp_s + transit_s + 15.0
    # Water already 1.5 degC up: no warm-up, and the gradient drives the first seconds faster.
    warm = physical_bound_s(cfg, 33.7, 35.2)
    assert warm is not None
    assert warm < bound


def test_the_bound_grows_as_the_heater_weakens_and_is_none_out_of_reach() -> None:
    strong = physical_bound_s(_plant(heater_supply_max_w=800.0), 33.7, 33.7)
    weak = physical_bound_s(_plant(heater_supply_max_w=300.0), 33.7, 33.7)
    assert strong is not None
    assert weak is not None
    assert weak > strong + 5.0
    # 150 W cannot hold 37 degC against ~160 W of losses: no bound, the target is out of reach.
    assert physical_bound_s(_plant(heater_supply_max_w=150.0), 33.7, 33.7) is None


def test_the_advisory_says_where_the_water_stands() -> None:
    """A 30 degC prime warmed by the body: `warming_uncontrolled` names the measured water
    against the perfusate (below it here), so the operator sees the heater is not the source."""
    samples = run_procedure(apply(by_name("start_30c"), load_config("config/sim.yaml")), 300.0)
    messages = [e.message for e in onsets(samples)]
    assert len(messages) == 1, messages
    m = re.search(r"at most 0\.5 degC above it \(now (\d+\.\d) degC below\)", messages[0])
    assert m is not None, messages[0]
    assert 0.0 < float(m.group(1)) < 2.0


# ------------------------------------------------------------------ a lung that takes less flow


def _flow_target(ml_min: float) -> CartConfig:
    """The reference cart asked for 1000 mL/min (the top of the human range, domain.md): its
    lung takes about 840 mL/min where the pressure limiter holds 25 - 2 mmHg."""
    return changed(load_config("config/sim.yaml"), {"control.flow.target_ml_min": ml_min})


def test_constant_pressure_counts_the_drug_phase_while_the_pressure_loop_holds() -> None:
    """At constant pressure the flow target is a ceiling and a lower flow is the mode at work.
    The drug timer counted only at the ceiling: 0 s in 40 minutes, with no alarm."""
    cfg = _flow_target(1000.0)
    cart = VirtualCart(cfg)
    cart.core.controller.set_mode("pressure", "auto")
    collect = RunCollector(cfg)
    mid = cart.run_for(1200.0, collect)
    assert mid.decision.drug_counting  # published as drug_phase.counting
    last = cart.run_for(1200.0, collect)
    m = collect.result(2400.0, 1.0, 1.0)
    assert 700.0 < last.truth.flow_ml_min < 900.0  # under the ceiling: the pressure leads
    assert last.decision.loop.pump_limited_by == "pressure"
    assert m.peak_pressure_mmhg < cfg.control.pressure.limit_mmhg
    assert m.drug_phase_done_s is not None
    assert m.drug_phase_done_s < 40 * 60.0
    assert m.alarm_onsets == {}


def test_a_flow_target_the_pressure_limit_denies_says_why_and_what_to_do() -> None:
    """At constant flow the same lung is a deviation: the alarm says the pressure limiter holds
    the pump and how to let the procedure go on (the drug timer waits for the target flow)."""
    cfg = _flow_target(1000.0)
    last = VirtualCart(cfg).run_for(400.0)
    (alarm,) = last.decision.alarms
    assert alarm.alarm_id == "flow_deviation"
    assert alarm.value is not None
    assert 700.0 < alarm.value < 900.0
    held = re.search(
        r"pressure limiter holds the pump at ([\d.]+) mmHg \(limit 25 mmHg\)", alarm.message
    )
    assert held is not None, alarm.message
    assert 21.0 < float(held.group(1)) < 25.0
    assert "lower the flow target, or switch to constant pressure" in alarm.message
    assert last.decision.drug_elapsed_s == 0.0
    assert not last.decision.drug_counting  # shown as paused (drug_phase.counting false)


def test_a_slow_tick_with_the_flow_trim_it_allows_perfuses_steadily() -> None:
    """A 0.5 s tick with the default flow gains is refused at load (the trim would correct 132 %
    of an error per tick: healthy pumps oscillated into pump_not_following and a safe stop).
    With ki 0.02 (99 %) the configuration loads and the reference cart perfuses steadily."""
    cfg = changed(
        load_config("config/sim.yaml"),
        {"control.tick_period_s": 0.5, "control.flow.pid.ki": 0.02},
    )
    collect = RunCollector(cfg)
    VirtualCart(cfg).run_for(900.0, collect)
    m = collect.result(900.0, 1.0, 1.0)
    assert m.alarm_onsets == {}
    assert m.flow_rms_ml_min is not None
    assert m.flow_rms_ml_min <= 6.0, m.flow_rms_ml_min


# ------------------------------------------------------------------ the flow on its target


def _steady_true_flow(cfg: CartConfig) -> tuple[float, float]:
    """Mean and RMS deviation of the true flow from its target over minutes 10-15."""
    cart = VirtualCart(cfg)
    cart.run_for(600.0)
    flows: list[float] = []
    cart.run_for(300.0, lambda s: flows.append(s.truth.flow_ml_min))
    target = cfg.control.flow.target_ml_min
    mean = sum(flows) / len(flows)
    rms = (sum((q - target) ** 2 for q in flows) / len(flows)) ** 0.5
    return mean, rms


def test_a_noisy_flow_reading_at_50_hz_keeps_the_mean_flow_on_target() -> None:
    """The slew limit cut the noisy demand's rises and passed its falls, and re-seeding the
    integral to applied - P took each cut out of it: 482 of 500 mL/min (RMS 15.8) at 50 Hz."""
    cfg = changed(load_config("config/sim.yaml"), {"control.tick_period_s": 0.02})
    mean, rms = _steady_true_flow(cfg)
    assert abs(mean - 500.0) <= 2.0, mean
    assert rms <= 5.0, rms


def test_the_pressure_loop_near_its_limit_does_not_pull_the_flow_down() -> None:
    """At 21.7 mmHg (regulating at 23) the idle pressure loop, tracked to the applied speed,
    sat a tick's integral above it and cut every rise of the flow loop's noisy demand: mean
    flow 497.0 of 500 mL/min. Tracked with its own P as headroom it stays out of the way."""
    mean, rms = _steady_true_flow(apply(by_name("pvr_40wu"), load_config("config/sim.yaml")))
    assert abs(mean - 500.0) <= 1.0, mean
    assert rms <= 5.0, rms
