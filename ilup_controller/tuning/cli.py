"""`ilup tune`: the argument parser and the command (kept out of cli.py to keep that small)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiomqtt

from ilup_controller.config.models import CartConfig
from ilup_controller.runtime.lock import CartLockError, cart_lock
from ilup_controller.runtime.watchdog import StartRefused
from ilup_controller.tuning.driver import TuneFailed, cart_in_use, run_test
from ilup_controller.tuning.identify import IdentificationError
from ilup_controller.tuning.propose import propose, write_overlay
from ilup_controller.tuning.steptest import LOOPS, PRESSURE_HEADROOM_MMHG, Loop, default_plan

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 3


def add_tune_parser(sub: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    t: argparse.ArgumentParser = sub.add_parser(
        "tune",
        help="step test on the connected plant: FOPDT model and SIMC PI gains as an overlay",
    )
    t.add_argument("-c", "--config", required=True)
    t.add_argument("--loop", required=True, choices=LOOPS)
    t.add_argument("-o", "--output", help="overlay file to write (default tuned-<loop>.yaml)")
    t.add_argument(
        "--step", type=float, help="step size: rpm (flow, pressure), %% (water), degC (perfusate)"
    )
    t.add_argument("--hold-s", type=float, help="plant seconds to record after the step")
    t.add_argument("--tau-c", type=float, help="SIMC closed-loop time constant, s (default theta)")
    t.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="plant seconds per wall second: only for a simulator run with `ilup sim --speed N`",
    )
    t.add_argument(
        "--assume-no-daemon",
        action="store_true",
        help="when the broker cannot be reached: I have checked that no daemon drives this "
        "cart and no lung is connected",
    )
    t.set_defaults(func=func)
    return t


def run_tune(args: argparse.Namespace, cfg: CartConfig) -> int:
    # One process drives a cart's actuators: the daemon, `ilup commission` and a second tune
    # take the same lock (on this computer; the broker's retained state covers the others).
    try:
        with cart_lock(cfg.cart_id, cfg.record.directory):
            return _tune_locked(args, cfg)
    except CartLockError as e:
        print(f"ilup tune: refusing: {e}", file=sys.stderr)
        return EXIT_REFUSED


def _tune_locked(args: argparse.Namespace, cfg: CartConfig) -> int:
    loop: Loop = args.loop
    try:
        why = asyncio.run(cart_in_use(cfg))
    except (aiomqtt.MqttError, OSError) as e:
        if not args.assume_no_daemon:
            print(
                f"ilup tune: refusing: cannot read the cart's retained state from the broker "
                f"{cfg.mqtt.host}:{cfg.mqtt.port} ({e}); check that no daemon runs and no lung "
                "is connected, then pass --assume-no-daemon",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        why = None
    if why is not None:
        print(f"ilup tune: refusing: {why}", file=sys.stderr)
        return EXIT_REFUSED
    plan = default_plan(cfg, loop, args.step)
    if args.hold_s is not None:
        plan = replace(plan, hold_s=args.hold_s)
    try:
        result = asyncio.run(run_test(cfg, plan, time_scale=args.time_scale))
        proposal = propose(cfg, loop, result.model, tau_c_s=args.tau_c)
    except StartRefused as e:
        print(f"ilup tune: refusing: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (TuneFailed, IdentificationError) as e:
        print(f"ilup tune: {e}", file=sys.stderr)
        return EXIT_FAILED
    out = args.output or f"tuned-{loop}.yaml"
    write_overlay(out, [proposal])
    if result.test.reason:
        print(f"note: the step ended early: {result.test.reason}")
    if result.test.held_flow_ml_min is not None:
        print(
            f"note: the pump backed off to {result.test.held_flow_ml_min:.0f} mL/min, under the "
            f"plan's {plan.base_flow_ml_min:.0f}: the PA pressure came within "
            f"{PRESSURE_HEADROOM_MMHG:g} mmHg of limit - margin (a stiff lung)"
        )
    print(
        f"step of {result.test.du:g} at t = {result.test.t_step_s:.1f} s, "
        f"{len(result.test.samples)} samples"
    )
    print(proposal.describe())
    print(f"overlay written to {out}: ilup run -c {args.config} --overlay {out}")
    return EXIT_OK
