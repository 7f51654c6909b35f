"""Sensor diagnostics: zero false alarms on healthy steady or quantised sensors, and stuck
sensors still found from evidence. Virtual time; the figures print with -s."""

from __future__ import annotations

import copy
import json
import math

import pytest
from diag_variants import VARIANTS, onsets, run_procedure, variant

from ilup_controller.config.models import SensorLimits
from ilup_controller.core.procedure import Phase
from ilup_controller.core.sensors import SensorCheck
from ilup_controller.core.types import Reading
from sim.faults import parse_runtime_fault
from sim.virtual import VirtualCart


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_full_procedure_has_no_alarm_onset(name: str) -> None:
    """Idle -> priming -> 30-min drug phase -> washout -> complete with zero alarm onsets.
    Before: noise_free 1495 onsets, coarse_registers 500, coarse_noise_free 200,
    steady_reservoir_zero_flow 2, and the drug phase never completed on any of them."""
    samples = run_procedure(VARIANTS[name]())
    ev = onsets(samples)
    assert [(e.alarm_id, round(e.t_s, 1)) for e in ev] == []
    done = samples[-1].decision
    assert done.phase is Phase.complete
    assert done.drug_remaining_s == pytest.approx(0.0, abs=1e-6)


LIMITS = SensorLimits(max_rate_per_s=2.0, max_noise=0.3, stuck_s=1.3)


def test_quantised_steady_and_one_lsb_flipping_values_are_healthy() -> None:
    """0.1 degC register: an hour at one value, then an hour flipping by one LSB at random
    ticks, is never stuck, noisy or jumping."""
    chk = SensorCheck("temperature", LIMITS, (5.0, 50.0), 1.0, resolution=0.1)
    t = 0.0
    faults = set()
    for k in range(36000):
        t = k * 0.1
        assert chk.check(t, Reading(37.0, t)) == 37.0
        faults.add(chk.fault)
    for k in range(36000):
        t += 0.1
        v = 37.0 + 0.1 * (math.sin(k * 0.7) * math.sin(k * 0.013) > 0.3)
        chk.check(t, Reading(v, t))
        faults.add(chk.fault)
    assert faults == {""}


def test_a_noisy_sensor_that_falls_silent_is_stuck_within_two_seconds() -> None:
    """Loss of the noise signature: after 60 s of +-3 LSB noise, identical readings."""
    chk = SensorCheck(
        "pressure",
        SensorLimits(max_rate_per_s=150, max_noise=2, stuck_s=1.0),
        None,
        1.0,
        resolution=0.01,
    )
    t = 0.0
    for k in range(600):
        t = k * 0.1
        chk.check(t, Reading(15.0 + 0.01 * ((k * 7919) % 7 - 3), t))
    assert chk.fault == ""
    frozen_at = t
    while chk.fault == "":
        t += 0.1
        chk.check(t, Reading(15.0, t))
    assert chk.fault.startswith("stuck at 15.00")
    assert t - frozen_at <= 1.2


def test_a_noise_free_ramp_that_settles_is_not_a_lost_signature() -> None:
    """A noise-free flow meter reads the 3-minute flow ramp changing at every reading, with the
    plant's own sub-LSB wiggles (1e-3 mL/min against 0.28 mL/min steps, reversing 2 changes in
    5), then the settled flow reads steady for ten minutes: healthy throughout. Before the
    reversal test it was "stuck" 1.4 s after the ramp ended and the pump was held."""
    chk = SensorCheck(
        "flow",
        SensorLimits(max_rate_per_s=400, max_noise=20, stuck_s=1.0),
        (0.0, 6000.0),
        1.0,
        resolution=0.0,
    )
    faults = set()
    t, v = 0.0, 0.0
    for k in range(1800):  # 180 s at 10 Hz, 0 -> 500 mL/min
        t = k * 0.1
        v = 500.0 * k / 1800 + (1e-3 if k % 5 in (1, 3) else 0.0)
        chk.check(t, Reading(v, t))
        faults.add(chk.fault)
    for _ in range(6000):
        t += 0.1
        chk.check(t, Reading(500.0, t))
        faults.add(chk.fault)
    assert faults == {""}


# ------------------------------------------------------------------ stuck from the process

REPORT: list[str] = []


@pytest.fixture(scope="module")
def quiet_cart() -> VirtualCart:
    """Noise-free sensors, perfusing at 500 mL/min and 37 degC: no noise signature to lose."""
    cart = VirtualCart(variant(noise_free=True))
    cart.run_for(900.0)
    assert cart.core.procedure.phase is Phase.perfusion
    assert cart.core.alarms.active(cart.t_s) == []
    return cart


def _stuck_then(
    cart: VirtualCart, channel: str, alarm_id: str, stimulus: str, quiet_s: float, max_s: float
) -> tuple[float | None, float | None]:
    """Freeze ``channel``; run ``quiet_s`` with the process steady, then apply ``stimulus``.
    Returns (onset during the quiet part, onset after the stimulus, from the stimulus)."""
    cart = copy.deepcopy(cart)
    t0 = cart.t_s
    cart.injector.apply(
        parse_runtime_fault(json.dumps({"kind": "sensor_stuck", "channel": channel}).encode())
    )

    def raised() -> bool:
        return any(a.alarm_id == alarm_id for a in cart.core.alarms.active(cart.t_s))

    while cart.t_s < t0 + quiet_s:
        cart.tick()
        if raised():
            return cart.t_s - t0, None
    ctl = cart.core.controller
    if stimulus == "flow 500 -> 350 mL/min":
        ctl.flow_target_ml_min = 350.0
    elif stimulus == "temperature 37 -> 35 degC":
        ctl.temperature_target_c = 35.0
    t1 = cart.t_s
    while cart.t_s < t1 + max_s:
        cart.tick()
        if raised():
            return None, cart.t_s - t1
    return None, None


@pytest.mark.parametrize(
    ("channel", "alarm_id", "stimulus", "budget_s"),
    [
        ("flow", "sensor_flow", "flow 500 -> 350 mL/min", 10.0),
        ("pa_pressure", "sensor_pressure", "flow 500 -> 350 mL/min", 30.0),
        ("perfusate_temperature", "sensor_temperature", "temperature 37 -> 35 degC", 600.0),
    ],
)
def test_stuck_noise_free_sensor_is_found_when_the_process_moves(
    quiet_cart: VirtualCart, channel: str, alarm_id: str, stimulus: str, budget_s: float
) -> None:
    """A frozen noise-free sensor reads like a healthy steady one: no alarm while the process
    is steady (60 s), then the alarm within the budget once the process must have moved."""
    quiet, after = _stuck_then(quiet_cart, channel, alarm_id, stimulus, 60.0, budget_s + 60.0)
    assert quiet is None, f"{alarm_id} raised {quiet:.1f} s into a steady process"
    assert after is not None, f"{alarm_id} never raised after {stimulus}"
    REPORT.append(f"| {channel} stuck, noise 0 | {stimulus} | {alarm_id} after {after:.1f} s |")
    assert after <= budget_s


def test_report(capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\n| fault | stimulus | detection |\n|---|---|---|")
        print("\n".join(REPORT))
