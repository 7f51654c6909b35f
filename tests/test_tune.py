"""Autotune: FOPDT identification (pure), SIMC gains, the step test's safe bounds, config
overlays, and `ilup tune` end to end against `ilup sim` over real Modbus TCP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from procs import Proc, read_signal, session, write_cart_config
from ruamel.yaml import YAML

from ilup_controller.broker import MosquittoProcess
from ilup_controller.config import ConfigError, load_config
from ilup_controller.config.models import CartConfig, SimPlant
from ilup_controller.exitcodes import ExitCode
from ilup_controller.runtime.lock import cart_lock
from ilup_controller.tuning.identify import (
    Fopdt,
    IdentificationError,
    add_lag,
    fit_step,
    simc_pi,
)
from ilup_controller.tuning.propose import (
    FLOW_NOISE_GAIN,
    MAX_FIT_ERROR_SHARE,
    check_fit,
    propose,
)
from ilup_controller.tuning.steptest import (
    PRESSURE_HEADROOM_MMHG,
    THERMAL_FLOW_MARGIN,
    Command,
    Measured,
    Stage,
    StepPlan,
    StepTest,
    default_plan,
)
from sim import virtual_tune
from sim.family import apply, by_name, random_variants
from sim.metrics import run_metrics
from sim.plant import PERFUSATE_SPECIFIC_HEAT_J_PER_KG_K

SIM = Path("config/sim.yaml")


# ------------------------------------------------------------------ identification (pure)


@pytest.mark.parametrize(
    ("gain", "tau_s", "theta_s", "du", "dt_s", "noise", "drift_per_s"),
    [
        (0.35, 120.0, 9.0, 20.0, 0.5, 0.02, 0.002),  # water-like, drifting baseline
        (0.72, 46.0, 8.4, 3.0, 0.5, 0.01, -0.001),  # perfusate-like
        (33.0, 0.4, 0.2, 4.5, 0.02, 3.0, 0.0),  # flow-like: fast, noisy
        (0.65, 0.4, 0.1, 4.5, 0.02, 0.2, 0.0),  # pressure-like
    ],
)
def test_fit_step_recovers_a_fopdt_within_10_percent(
    gain: float,
    tau_s: float,
    theta_s: float,
    du: float,
    dt_s: float,
    noise: float,
    drift_per_s: float,
) -> None:
    rng = random.Random(7)
    span_s = 8.0 * tau_s + theta_s
    ts = [i * dt_s for i in range(-round(0.5 * span_s / dt_s), round(span_s / dt_s))]
    truth = Fopdt(gain, tau_s, theta_s)
    ys = [10.0 + drift_per_s * t + truth.response(t, du) + rng.gauss(0.0, noise) for t in ts]
    m = fit_step(ts, ys, t_step_s=0.0, du=du, detrend=drift_per_s != 0.0)
    assert m.gain == pytest.approx(gain, rel=0.10)
    assert m.time_constant_s == pytest.approx(tau_s, rel=0.10)
    # A dead time below a few samples is judged against the sample period.
    assert abs(m.dead_time_s - theta_s) <= max(0.10 * theta_s, 2 * dt_s)


def test_a_model_that_does_not_fit_its_response_proposes_no_gains() -> None:
    """A perfusate-like step (K 0.6, tau 60 s) fits within 1 % of its response; the same step
    with a slow swing of 0.5 degC through it (a disturbance the model has no term for) leaves
    a fit error over 8 % of the response, and propose() refuses, naming the loop and the
    share."""
    ts = [i * 0.5 for i in range(-120, 1200)]
    truth = Fopdt(0.6, 60.0, 5.0)
    clean = [34.0 + truth.response(t, 3.0) for t in ts]
    swing = [
        y + (0.5 * math.sin(t / 60.0) if t > 0.0 else 0.0) for t, y in zip(ts, clean, strict=True)
    ]
    good = fit_step(ts, clean, t_step_s=0.0, du=3.0)
    assert good.error_share < 0.01
    assert good.response_span == pytest.approx(1.8, rel=0.01)
    check_fit("perfusate", good)
    bad = fit_step(ts, swing, t_step_s=0.0, du=3.0)
    assert bad.error_share > MAX_FIT_ERROR_SHARE
    with pytest.raises(IdentificationError, match=r"perfusate model does not fit .* \d+% of"):
        propose(load_config(SIM), "perfusate", bad)


def test_a_coarse_probe_gets_a_baseline_that_resolves_its_drift() -> None:
    """random_2026_31 (0.1 degC probes, 35 W/K) drifts 0.1 degC/min before the perfusate step.
    With a 60 s baseline one LSB of that drift, extrapolated over the 600 s test, left K 0.34 and
    tau 13 s, a fit 12 % off its response. The baseline is now long enough that one LSB over it
    fakes at most 5 % of the step: 400 s for 0.1 degC, 60 s (the floor) for 0.01 degC; the model
    then fits within 3 % and its C/UA is within 20 % of the plant's (3.9 kJ/K / 34.7 W/K)."""
    reference = default_plan(load_config(SIM), "perfusate")
    assert reference.baseline_s == pytest.approx(60.0)
    variant = dataclasses.replace(random_variants(2026, 32)[31], start_c=None)
    cfg = virtual_tune.tuned(apply(variant, load_config(SIM)), ("water",))
    assert default_plan(cfg, "perfusate").baseline_s == pytest.approx(400.0)
    model = virtual_tune.tune(cfg, "perfusate").identified
    assert model.error_share < 0.03
    assert 0.5 < model.gain < 0.7
    plant = cfg.simulator.plant if cfg.simulator else None
    assert plant is not None
    c_per_ua_s = (
        plant.perfusate_volume_ml * 1e-3 * PERFUSATE_SPECIFIC_HEAT_J_PER_KG_K / plant.hx_ua_w_per_k
    )
    assert model.time_constant_s / model.gain == pytest.approx(c_per_ua_s, rel=0.2)


def test_simc_pi_gains_follow_the_rule() -> None:
    g = simc_pi(Fopdt(gain=2.0, time_constant_s=10.0, dead_time_s=1.0))
    # tau_c = theta = 1: kc = 10 / (2 * 2) = 2.5, tau_i = min(10, 8) = 8, ki = kc / tau_i.
    assert (g.kp, g.ki, g.kd, g.tau_i_s) == pytest.approx((2.5, 0.3125, 0.0, 8.0))
    slow = simc_pi(Fopdt(gain=2.0, time_constant_s=4.0, dead_time_s=1.0), tau_c_s=3.0)
    assert (slow.kp, slow.ki) == pytest.approx((0.5, 0.125))  # tau_i = tau = 4
    # The limiter's 0.3 s filter on a 0.4 s lag: tau 0.55 s, theta + 0.15 s (half rule).
    lagged = add_lag(Fopdt(1.0, 0.4, 0.1), 0.3)
    assert (lagged.time_constant_s, lagged.dead_time_s) == pytest.approx((0.55, 0.25))


# ------------------------------------------------------------------ safe bounds (pure)


def _cfg() -> CartConfig:
    return load_config(SIM)


def _run(test: StepTest, m: Measured, until_s: float, t0: float = 0.0) -> float:
    t = t0
    while t < until_s and not test.finished:
        t += 0.1
        test.step(t, 0.1, m)
    return t


def test_step_test_aborts_and_stops_the_pump_at_the_pressure_bound() -> None:
    cfg = _cfg()
    test = StepTest(cfg, StepPlan("flow", 350.0, 4.5, 5.0, 5.0, 15.0))
    ok = Measured(350.0, 12.0, 34.0, 34.0)
    _run(test, ok, 3.0)
    assert test.stage is Stage.ramp or test.stage is Stage.settle
    bound = cfg.control.pressure.limit_mmhg - cfg.control.pressure.margin_mmhg  # 23 mmHg
    cmd = test.step(3.1, 0.1, Measured(350.0, bound + 0.01, 34.0, 34.0))
    assert (cmd.pump_rpm, cmd.heater_pct) == (0.0, 0.0)
    assert test.stage is Stage.aborted
    assert "23.0 mmHg" in test.reason
    later = test.step(3.2, 0.1, ok)
    assert (later.pump_rpm, later.heater_pct) == (0.0, 0.0)  # never resumes by itself


def test_step_test_heats_only_with_flow_proven_and_under_the_caps() -> None:
    cfg = _cfg()
    tc = cfg.control.temperature
    plan = StepPlan("water", 500.0, 30.0, 10.0, 10.0, 600.0)
    # Flow not proven at the end of settling: no heating at all.
    no_flow = StepTest(cfg, plan)
    _run(no_flow, Measured(tc.min_flow_ml_min - 1.0, 12.0, 34.0, 34.0), 60.0)
    assert no_flow.stage is Stage.aborted
    assert "not proven" in no_flow.reason
    # Flow proven: the step heats at 30 %; at water cap - 0.5 the heater is off and the test ends.
    test = StepTest(cfg, plan)
    t = _run(test, Measured(500.0, 15.0, 34.0, 34.0), 25.0)
    cmd = test.step(t + 0.1, 0.1, Measured(500.0, 15.0, 34.0, 36.0))
    assert test.stage is Stage.step
    assert cmd.heater_pct == 30.0
    cmd = test.step(t + 0.2, 0.1, Measured(500.0, 15.0, 38.0, tc.water_cap_c - 0.5))
    assert cmd.heater_pct == 0.0
    assert test.stage is Stage.done
    assert "cap" in test.reason
    # Gradient at its limit: heater off as well.
    grad = StepTest(cfg, plan)
    t = _run(grad, Measured(500.0, 15.0, 34.0, 34.0), 25.0)
    cmd = grad.step(t + 0.1, 0.1, Measured(500.0, 15.0, 34.0, 34.0 + tc.max_gradient_c))
    assert cmd.heater_pct == 0.0
    # Flow lost while heating: abort, pump and heater 0.
    lost = StepTest(cfg, plan)
    t = _run(lost, Measured(500.0, 15.0, 34.0, 34.0), 25.0)
    cmd = lost.step(t + 0.1, 0.1, Measured(50.0, 15.0, 34.0, 35.0))
    assert (cmd.pump_rpm, cmd.heater_pct, lost.stage) == (0.0, 0.0, Stage.aborted)


def test_thermal_step_test_holds_a_stiff_lung_under_the_pressure_limit() -> None:
    """random_2026_38 (37 WU): 500 mL/min needs 23 mmHg, limit - margin, so both thermal tests
    used to abort and `ilup tune` gave no gains. Now each time the pressure comes within 3 mmHg
    of the bound before the baseline the pump backs off 10 % and settles again (twice here: 365
    mL/min, peak 21.3 mmHg), and the models fit (0.8 and 1.8 % of their responses)."""
    cfg = apply(by_name("random_2026_38"), _cfg())
    bound = cfg.control.pressure.limit_mmhg - cfg.control.pressure.margin_mmhg
    peak = 0.0
    tests: dict[int, StepTest] = {}
    original = StepTest.step

    def step(self: StepTest, t_s: float, dt_s: float, m: Measured) -> Command:
        nonlocal peak
        assert m.pressure_mmhg is not None
        peak = max(peak, m.pressure_mmhg)
        tests[id(self)] = self
        return original(self, t_s, dt_s, m)

    for loop in ("water", "perfusate"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(StepTest, "step", step)
            proposal = virtual_tune.tune(cfg, loop)
        assert proposal.identified.error_share < 0.03
    assert peak < bound - 1.0  # 21.3 mmHg measured; the bound is 23.0
    least = THERMAL_FLOW_MARGIN * cfg.control.temperature.min_flow_ml_min
    flows = [t.held_flow_ml_min for t in tests.values()]
    assert len(flows) == 2
    assert all(f is not None and least < f < cfg.control.flow.target_ml_min - 50 for f in flows)


def test_thermal_step_test_on_a_lung_too_stiff_to_prove_flow_aborts() -> None:
    """The pressure nears the bound before the flow reaches 1.5 x min_flow_ml_min: aborted,
    pump and heater 0, saying so; the heater never ran."""
    cfg = _cfg()
    bound = cfg.control.pressure.limit_mmhg - cfg.control.pressure.margin_mmhg
    test = StepTest(cfg, default_plan(cfg, "water"))
    _run(test, Measured(100.0, 12.0, 34.0, 34.0), 5.0)
    assert test.stage in (Stage.ramp, Stage.settle)
    cmd = test.step(5.1, 0.1, Measured(100.0, bound - PRESSURE_HEADROOM_MMHG, 34.0, 34.0))
    assert (cmd.pump_rpm, cmd.heater_pct, test.stage) == (0.0, 0.0, Stage.aborted)
    assert "too little flow to heat" in test.reason


# ------------------------------------------------------------------ overlays


def test_overlay_deep_merges_and_errors_name_the_overlay_key(tmp_path: Path) -> None:
    good = tmp_path / "tuned.yaml"
    good.write_text("control: {temperature: {inner_pid: {kp: 12.5, ki: 0.25}}}\n")
    cfg = load_config(SIM, [good])
    assert (cfg.control.temperature.inner_pid.kp, cfg.control.temperature.inner_pid.ki) == (
        12.5,
        0.25,
    )
    assert cfg.control.temperature.target_c == 37.0  # untouched keys stay
    assert cfg.control.flow.measured == "flow"
    bad = tmp_path / "bad.yaml"
    bad.write_text("control: {temperature: {inner_pid: {kp: -1, kq: 2}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(SIM, [bad])
    assert any(
        p.startswith(f"{bad}: control.temperature.inner_pid.kp: Input should be greater than")
        for p in e.value.problems
    ), e.value.problems
    assert f"{bad}: control.temperature.inner_pid.kq: unknown key" in e.value.problems
    shape = tmp_path / "shape.yaml"
    shape.write_text("control: {temperature: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(SIM, [shape])
    assert e.value.problems == [
        f"{shape}: control.temperature: a single value cannot replace a mapping"
    ]
    r = subprocess.run(
        [sys.executable, "-m", "ilup_controller", "check-config", str(SIM), "--overlay", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == ExitCode.CONFIG
    assert f"{bad}: control.temperature.inner_pid.kq: unknown key" in r.stderr


# ------------------------------------------------------------------ end to end


def _true_line_pressure_mmhg(p: SimPlant, flow_ml_min: float) -> float:
    """Steady PA pressure at the sensor (sim/plant.py: Linehan inverse + cannula + zero)."""
    q_l_min = flow_ml_min / 1000.0
    a = p.alpha_per_mmhg
    vascular = ((1 + a * p.outflow_pressure_mmhg) ** 5 + 5 * a * p.pvr_wu * q_l_min) ** 0.2
    return (vascular - 1) / a + p.cannula_resistance_mmhg_min_per_l * q_l_min


SPEED = 5.0


@pytest.mark.integration
@pytest.mark.parametrize("loop", ["flow", "pressure"])
async def test_ilup_tune_identifies_the_simulated_plant(
    tmp_path: Path, mosquitto: MosquittoProcess, loop: str
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port)
    assert cfg.simulator is not None
    plant = cfg.simulator.plant
    out = tmp_path / "tuned.yaml"
    async with session() as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path), "--speed", str(SPEED)], tmp_path / "s.log"))
        tune = Proc(
            [
                "tune",
                "-c",
                str(cfg_path),
                "--loop",
                loop,
                "--time-scale",
                str(SPEED),
                "-o",
                str(out),
            ],
            tmp_path / "tune.log",
        )
        procs.append(tune)
        rc = await asyncio.to_thread(tune.wait, 120)
        assert rc == 0, tune.log()[-3000:]
        # Driven safe at the end: the pump and heater command registers hold 0.
        ports = {n: d.port for n, d in cfg.devices.items()}
        assert await read_signal(cfg, ports, "pump_speed_setpoint") == 0.0
        assert await read_signal(cfg, ports, "heater_power_setpoint") == 0.0
    log = tune.log()
    assert "SIMC (Skogestad 2003)" in log
    check = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "ilup_controller",
            "check-config",
            str(cfg_path),
            "--overlay",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    data = YAML(typ="safe", pure=True).load(out.read_text())
    key = "flow" if loop == "flow" else "pressure"
    gains = data["control"][key]["pid"]
    assert gains["kp"] > 0.0
    assert gains["ki"] > 0.0
    gain = float(log.split("K = ")[1].split()[0])
    c = cfg.control.flow
    if loop == "flow":
        true_gain = plant.stroke_volume_ml_per_rev  # mL/min per rpm
        tolerance = 0.03
    else:
        # Secant gain over the test's step: 70 % -> 100 % of the flow target.
        lo, hi = 0.7 * c.target_ml_min, c.target_ml_min
        f_lo = lo / c.stroke_volume_ml_per_rev * plant.stroke_volume_ml_per_rev
        f_hi = hi / c.stroke_volume_ml_per_rev * plant.stroke_volume_ml_per_rev
        true_gain = (
            _true_line_pressure_mmhg(plant, f_hi) - _true_line_pressure_mmhg(plant, f_lo)
        ) / ((hi - lo) / c.stroke_volume_ml_per_rev)
        tolerance = 0.10
    assert gain == pytest.approx(true_gain, rel=tolerance), (gain, true_gain)


@pytest.mark.integration
async def test_ilup_tune_refuses_a_model_that_does_not_fit_and_writes_nothing(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """A flow meter that spikes (+300 mL/min on 30 % of its samples, a scenario of `ilup sim`)
    through the whole flow step test: the FOPDT fit's RMS error is far more than 8 % of its
    150 mL/min response, so `ilup tune` names the loop and the error, writes no overlay, exits
    1, and leaves the pump and heater at 0."""
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port)
    scenario = tmp_path / "spiking_meter.yaml"
    scenario.write_text(
        "name: spiking flow meter\nfaults:\n"
        "  - {kind: sensor_spike, at_s: 0, duration_s: 3600, channel: flow, magnitude: 300,"
        " probability: 0.3}\n"
    )
    out = tmp_path / "tuned.yaml"
    sim_args = ["sim", "-c", str(cfg_path), "--speed", str(SPEED), "--scenario", str(scenario)]
    async with session() as procs:
        procs.append(Proc(sim_args, tmp_path / "s.log"))
        tune_args = ["tune", "-c", str(cfg_path), "--loop", "flow", "--time-scale", str(SPEED)]
        tune = Proc([*tune_args, "-o", str(out)], tmp_path / "tune.log")
        procs.append(tune)
        rc = await asyncio.to_thread(tune.wait, 120)
        log = tune.log()
        assert rc == ExitCode.FAILURE, log[-3000:]
        ports = {n: d.port for n, d in cfg.devices.items()}
        assert await read_signal(cfg, ports, "pump_speed_setpoint") == 0.0
        assert await read_signal(cfg, ports, "heater_power_setpoint") == 0.0
    assert "the flow model does not fit its step response" in log, log[-3000:]
    share = float(log.split("fit RMS error ")[1].split(" is ")[1].split("%")[0])
    assert share > 8.0
    assert not out.exists()


def _tune_flow(cfg_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ilup_controller", "tune", "-c", str(cfg_path), "--loop", "flow"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
async def test_ilup_tune_refuses_while_a_daemon_is_online(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.publish(
            f"ilup/{cfg.cart_id}/status", json.dumps({"online": True}), qos=1, retain=True
        )
    r = await asyncio.to_thread(_tune_flow, cfg_path)
    assert r.returncode == 3
    assert "is online" in r.stderr
    # Another process on this computer holds the cart (a daemon, a commission run, a tune).
    with cart_lock(cfg.cart_id, cfg.record.directory):
        r = await asyncio.to_thread(_tune_flow, cfg_path)
    assert r.returncode == 3
    assert "refusing" in r.stderr
    assert "is online" not in r.stderr  # refused by the lock, before the broker was asked
    # Broker unreachable: refused unless the operator confirms.
    mosquitto.stop()
    r = await asyncio.to_thread(_tune_flow, cfg_path)
    assert r.returncode == 3
    assert "--assume-no-daemon" in r.stderr


def test_proposal_bounds_the_gain_when_the_dead_time_is_not_resolved() -> None:
    # Water loop as identified on the reference plant: theta below one sample.
    p = propose(_cfg(), "water", Fopdt(gain=0.51, time_constant_s=923.0, dead_time_s=0.0))
    # tau_c = min(tau / 10, 30 s) = 30 s (the cascade's inner loop must keep up with the
    # rewarming rate loop): kc = 923 / (0.51 * 30) = 60.3 %/degC, tau_i = 4 * 30 = 120 s.
    assert p.gains.tau_c_s == pytest.approx(30.0)
    assert p.gains.kp == pytest.approx(60.33, rel=1e-3)
    assert p.gains.ki == pytest.approx(60.33 / 120.0, rel=1e-3)
    assert p.overlay() == {
        "control": {
            "temperature": {
                "inner_pid": {"kp": round(p.gains.kp, 6), "ki": round(p.gains.ki, 6), "kd": 0.0}
            }
        }
    }


def _flow_rms_with(cfg: CartConfig, kp: float, ki: float) -> float:
    flow = cfg.control.flow
    pid = flow.pid.model_copy(update={"kp": kp, "ki": ki})
    control = cfg.control.model_copy(update={"flow": flow.model_copy(update={"pid": pid})})
    m = run_metrics(cfg.model_copy(update={"control": control}), 900.0)
    assert m.flow_rms_ml_min is not None
    return m.flow_rms_ml_min


def test_tuned_flow_gains_keep_the_meter_noise_off_the_pump() -> None:
    """The flow loop as `ilup tune --loop flow` identified it over Modbus on the simulator
    (K 33.06 mL/min per rpm, tau 0.369 s, theta 0.247 s). SIMC's tight tau_c = theta gives
    K kc = 0.75, and the flow meter's noise then moves the true flow: RMS 5.05 mL/min on the
    reference plant, over the bar of 5 (the default gains: 3.35). The proposal keeps K kc at
    0.5 and the true flow RMS drops to 2.25."""
    cfg = _cfg()
    model = Fopdt(gain=33.06, time_constant_s=0.369, dead_time_s=0.247)
    p = propose(cfg, "flow", model)
    assert model.gain * p.gains.kp == pytest.approx(FLOW_NOISE_GAIN, rel=1e-6)
    assert "K kc <=" in p.gains.rule
    tight = simc_pi(model)
    assert model.gain * tight.kp > 0.7
    proposed_rms = _flow_rms_with(cfg, p.gains.kp, p.gains.ki)
    tight_rms = _flow_rms_with(cfg, tight.kp, tight.ki)
    print(f"\nflow RMS: proposed {proposed_rms:.2f}, SIMC tight {tight_rms:.2f} mL/min")
    assert proposed_rms <= 3.0
    assert tight_rms > 1.5 * proposed_rms


@pytest.mark.parametrize("name", ["reference", "heater_300w", "hx_150"])
def test_tuned_gains_meet_the_rewarming_bars(name: str) -> None:
    """`ilup tune --loop water` then `--loop perfusate` on a plant variant (in virtual time,
    sim/virtual_tune.py), then a rewarm from 34 degC with the proposed gains: within 1.25 x the
    guideline time, never faster than 0.5 degC/min over 2 minutes, no overshoot beyond 0.3 degC,
    the gradient under its alarm and not one alarm onset. The 300 W heater misses the time with
    the default gains (ratio 1.08) and meets it tuned."""
    cfg = apply(by_name(name), load_config("config/sim.yaml"))
    tuned = virtual_tune.tuned(cfg)
    t = tuned.control.temperature
    assert t.exchanger_time_constant_s != cfg.control.temperature.exchanger_time_constant_s
    m = run_metrics(tuned, 900.0)
    assert m.rewarm_ratio is not None
    assert m.rewarm_ratio <= 1.0, m.rewarm_ratio
    assert m.max_rate_c_per_min <= 0.5, m.max_rate_c_per_min
    assert m.overshoot_c <= 0.3, m.overshoot_c
    assert m.max_gradient_c < tuned.alarms.gradient_c, m.max_gradient_c
    assert m.peak_water_c < t.water_cap_c
    assert m.onsets == 0, m.alarm_onsets


def test_tune_identifies_a_weak_exchanger_time_constant() -> None:
    """20 W/K with 1 L of perfusate: C/UA = 3800/20 = 190 s, three times the default 60 s. The
    perfusate step test, fitted from the measured water (not its setpoint), finds it within
    10 %."""
    cfg = apply(by_name("hx_20"), load_config("config/sim.yaml"))
    proposal = virtual_tune.tune(cfg, "perfusate")
    assert proposal.extra is not None
    assert proposal.extra["exchanger_time_constant_s"] == pytest.approx(190.0, rel=0.10)


def test_tuned_gains_on_a_strong_exchanger_with_a_long_probe_delay() -> None:
    """strong_hx_delay_17s (140 W/K, 2.2 kg bath, 17 s probe delay): with the default gains the
    rate loop oscillates (bursts of 0.7 degC/min at the bulk); until the asked rate kept the
    2-minute window within 0.49 degC/min it reached 0.54 and `heating_rate` latched the heater
    off. Tuned, a full procedure: no alarm onset, never faster than 0.5 degC/min over 2
    minutes, the drug phase completes; the rewarm time is held to today's 1.13 x the limit
    (1.03 before the window limit, which holds the ramp back after the cold plug's dip)."""
    cfg = apply(by_name("strong_hx_delay_17s"), load_config("config/sim.yaml"))
    tuned = virtual_tune.tuned(cfg)
    m = run_metrics(tuned, 42 * 60.0)
    assert m.onsets == 0, m.alarm_onsets
    assert m.max_rate_c_per_min <= 0.5, m.max_rate_c_per_min
    assert m.overshoot_c <= 0.3, m.overshoot_c
    assert m.drug_phase_done_s is not None
    assert m.rewarm_ratio is not None
    assert m.rewarm_ratio <= 1.15, m.rewarm_ratio
