"""`ilup tune` in virtual time: the same step test (tuning/steptest.py), identification and
proposal, run against the plant model instead of over Modbus, so a benchmark or a test can tune
every plant variant in seconds. The readings pass through the signals' register round trip, as
in sim/virtual.py; the plant has no faults and no device delays.
"""

from __future__ import annotations

from typing import Any

from ilup_controller.config.models import CartConfig
from ilup_controller.tuning.propose import Proposal, merge, propose
from ilup_controller.tuning.steptest import Loop, Measured, StepTest, default_plan, fit_test
from sim.plant import Plant
from sim.wiring import apply_command, compile_quantiser, sensor_bindings

TEST_SLACK_S = 600.0  # the test ends by itself; this only bounds a test that never would


def tune(cfg: CartConfig, loop: Loop) -> Proposal:
    """Run ``loop``'s step test on a fresh plant of ``cfg`` and propose its gains."""
    if cfg.simulator is None:
        raise ValueError("the configuration has no 'simulator' section")
    c = cfg.control
    plan = default_plan(cfg, loop)
    plant = Plant(cfg.simulator.plant, step_s=cfg.simulator.step_s)
    channel_of = {name: channel for channel, name in sensor_bindings(cfg).items()}
    quantise = {name: compile_quantiser(cfg.signals[name]) for name in channel_of}
    test = StepTest(cfg, plan)

    def read(signal: str, values: dict[Any, Any]) -> float:
        return float(quantise[signal](values[channel_of[signal]]))

    end_s = plan.settle_s + plan.baseline_s + plan.hold_s + TEST_SLACK_S
    dt_s = c.tick_period_s
    k = 0
    while not test.finished:
        k += 1
        t_s = k * dt_s
        if t_s > end_s:
            raise RuntimeError(f"{loop} step test did not finish in {end_s:.0f} s")
        plant.advance_to(t_s)
        values = plant.sensors().by_channel()
        m = Measured(
            flow_ml_min=read(c.flow.measured, values),
            pressure_mmhg=read(c.pressure.measured, values),
            temperature_c=read(c.temperature.measured, values),
            water_c=read(c.temperature.water_measured, values),
        )
        cmd = test.step(t_s, dt_s, m)
        apply_command(cfg, plant, c.flow.command, cmd.pump_rpm)
        apply_command(cfg, plant, c.temperature.command, cmd.heater_pct)
    if test.reason and test.stage.value == "aborted":
        raise RuntimeError(f"{loop} step test aborted: {test.reason}")
    return propose(cfg, loop, fit_test(test))


def tuned(cfg: CartConfig, loops: tuple[Loop, ...] = ("water", "perfusate")) -> CartConfig:
    """``cfg`` with the gains ``ilup tune`` proposes for ``loops``, tuned one after the other
    (each test runs with the gains of the loops before it)."""
    for loop in loops:
        data = cfg.model_dump()
        merge(data, tune(cfg, loop).overlay())
        cfg = CartConfig.model_validate(data)
    return cfg
