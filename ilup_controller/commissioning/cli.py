"""`ilup commission`: the argument parser and the command (kept out of cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from ilup_controller.commissioning.results import CommissioningRun, StepResult, results_path, save
from ilup_controller.commissioning.runner import Plan, commission
from ilup_controller.config.models import CartConfig

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 3
DEFAULT = Plan()
MARK = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "skipped": "SKIP"}


def add_commission_parser(
    sub: Any, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "commission",
        help="pre-use checklist of the connected cart (daemon stopped, phase idle); "
        "its passing result gates priming",
    )
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--operator", help="who confirms the operator items (default: login name)")
    p.add_argument("--yes", action="store_true", help="answer yes to every confirmation")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-o", "--output", help="commissioning file (default: next to the cart file)")
    p.add_argument("--zero-s", type=float, default=DEFAULT.zero_s, help="pressure zero window, s")
    p.add_argument("--settle-s", type=float, default=DEFAULT.settle_s, help="settling per speed, s")
    p.add_argument("--measure-s", type=float, default=DEFAULT.measure_s, help="averaging, s")
    p.add_argument("--heater-max-s", type=float, default=DEFAULT.heater_max_s)
    p.add_argument(
        "--heater-pct", type=float, default=DEFAULT.heater_pct, help="heater pulse power, %%"
    )
    p.set_defaults(func=func)
    return p


def _ask_tty(question: str, optional: bool) -> bool:
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def run_commission(args: argparse.Namespace, cfg: CartConfig) -> int:
    from ilup_controller.runtime.lock import CartLockError, cart_lock
    from ilup_controller.tuning.driver import cart_in_use

    operator = args.operator or getpass.getuser()
    if args.yes:

        def ask(question: str, optional: bool) -> bool:
            return not optional
    elif sys.stdin.isatty():
        ask = _ask_tty
    else:
        print("ilup commission: no terminal to confirm on: pass --yes", file=sys.stderr)
        return EXIT_REFUSED
    plan = Plan(
        zero_s=args.zero_s,
        settle_s=args.settle_s,
        measure_s=args.measure_s,
        heater_max_s=args.heater_max_s,
        heater_pct=args.heater_pct,
    )
    path = Path(args.output) if args.output else results_path(cfg, args.config)

    def show(r: StepResult) -> None:
        if args.json:
            return
        print(f"[{MARK[r.status]}] {r.title}: {r.did}")
        if r.measured:
            print(f"       measured: {r.measured}")
        if r.fix:
            print(f"       fix: {r.fix}")
        if r.confirmed_by:
            print(f"       confirmed by: {r.confirmed_by}")

    try:
        with cart_lock(cfg.cart_id, cfg.record.directory):
            try:
                why = asyncio.run(cart_in_use(cfg, wait_s=1.0))
            except (aiomqtt.MqttError, OSError):
                why = None  # no broker: the lock proves no daemon runs on this computer
            if why is not None:
                print(f"ilup commission: refusing: {why}", file=sys.stderr)
                return EXIT_REFUSED
            run: CommissioningRun = asyncio.run(commission(cfg, plan, operator, ask, show))
    except CartLockError as e:
        print(f"ilup commission: refusing: {e}", file=sys.stderr)
        return EXIT_REFUSED
    save(run, path)
    if args.json:
        print(json.dumps(run.model_dump(mode="json"), indent=2))
    else:
        print(f"{run.summary()}\nwritten to {path}")
        if not run.passed:
            print("priming stays refused (not_commissioned) until a run passes")
    return EXIT_OK if run.passed else EXIT_FAILED
