"""The ``ilup`` command: daemon, simulator, config check, live view and demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ilup_controller import __version__, examples
from ilup_controller.config import CartConfig, ConfigError, load_config
from ilup_controller.exitcodes import ExitCode

# The table of exit codes is ExitCode (exitcodes.py); these names stay for existing callers.
EXIT_OK = ExitCode.OK
EXIT_FAILURE = ExitCode.FAILURE
EXIT_USAGE = ExitCode.USAGE
EXIT_REFUSED = ExitCode.REFUSED  # a start-up safety check failed (e.g. a device watchdog is off)
EXIT_CONFIG = ExitCode.CONFIG


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we log link changes ourselves


def _load(path: str, overlays: Sequence[str] = ()) -> CartConfig:
    return load_config(path, overlays)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)


async def _run_daemon(cfg: CartConfig, cart_file: str | None = None) -> int:
    from ilup_controller.runtime.lock import CartLockError, cart_lock

    stop = asyncio.Event()
    _stop_on_signals(stop)
    try:
        # One daemon per cart: locked before any device, broker or record is touched (and
        # before the heavy imports, so a second start is refused at once).
        with cart_lock(cfg.cart_id, cfg.record.directory):
            return await _run_locked(cfg, stop, cart_file)
    except CartLockError as e:
        print(f"ilup run: refusing to start: {e}", file=sys.stderr)
        return EXIT_REFUSED


async def _run_locked(cfg: CartConfig, stop: asyncio.Event, cart_file: str | None = None) -> int:
    from ilup_controller.runtime.daemon import Daemon
    from ilup_controller.runtime.watchdog import StartRefused

    try:
        await Daemon(cfg, cart_file=cart_file).run(stop)
    except StartRefused as e:
        print(f"ilup run: refusing to start: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


async def _run_sim(args: argparse.Namespace) -> int:
    from sim.faults import load_scenario
    from sim.runner import SimulatedCart

    cfg = _load(args.config, args.overlay)
    if args.variant:
        from sim.family import apply, by_name, write_config

        try:
            cfg = apply(by_name(args.variant), cfg)
        except (KeyError, ValueError) as e:
            print(f"ilup sim: --variant: {e}", file=sys.stderr)
            return EXIT_CONFIG
        if args.variant_config:
            write_config(cfg, args.variant_config)
            print(
                f"ilup sim: variant {args.variant}: cart file for `ilup run` written to "
                f"{args.variant_config}",
                file=sys.stderr,
            )
    scenario = load_scenario(examples.resolve_scenario(args.scenario)) if args.scenario else None
    stop = asyncio.Event()
    _stop_on_signals(stop)
    try:
        cart = SimulatedCart(
            cfg,
            scenario=scenario,
            watchdog_ignored=frozenset(args.watchdog_off),
            watchdog_no_trip=frozenset(args.watchdog_no_trip),
            swap_words=frozenset(args.swap_words),
            disconnected=frozenset(args.disconnect),
        )
    except ValueError as e:
        print(f"ilup sim: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        await cart.run(stop, speed=args.speed)
    except OSError as e:  # a device port taken or not available: a configuration problem
        print(f"ilup sim: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overlay)
    shown = " + ".join([args.config, *args.overlay])
    print(
        f"{shown}: ok (cart_id={cfg.cart_id}, {len(cfg.devices)} devices, "
        f"{len(cfg.signals)} signals)"
    )
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from ilup_controller.config.secrets import with_mqtt_password

    cfg, where = with_mqtt_password(_load(args.config, args.overlay), source=args.config)
    if cfg.mqtt.password is not None:  # the source, never the value
        logging.getLogger("ilup.cli").info("MQTT password: %s", where)
    return asyncio.run(_run_daemon(cfg, args.config))


def _cmd_sim(args: argparse.Namespace) -> int:
    return asyncio.run(_run_sim(args))


def _cmd_tune(args: argparse.Namespace) -> int:
    from ilup_controller.tuning.cli import run_tune

    return run_tune(args, _load(args.config, args.overlay))


def _cmd_guard(args: argparse.Namespace) -> int:
    from ilup_controller.config.secrets import with_mqtt_password
    from ilup_controller.guard.runner import run_guard

    cfg, _ = with_mqtt_password(_load(args.config, args.overlay), source=args.config)
    if cfg.guard is None:
        print(f"ilup guard: {args.config}: no 'guard' section", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.guard.mqtt_username is not None:  # its own broker identity, not the daemon's
        mqtt = cfg.mqtt.model_copy(update={"username": cfg.guard.mqtt_username})
        cfg = cfg.model_copy(update={"mqtt": mqtt})

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await run_guard(cfg, stop)
        return EXIT_OK

    return asyncio.run(main())


def _cmd_guard_reset(args: argparse.Namespace) -> int:
    from ilup_controller.client import connection_failure, send_guard_reset, settings_from

    settings = settings_from(args)
    try:
        reply = asyncio.run(send_guard_reset(settings, timeout_s=args.timeout))
    except Exception as e:
        text, code = connection_failure(e, settings)
        print(f"ilup guard-reset: {text}", file=sys.stderr)
        return code
    if reply is None:
        print("ilup guard-reset: no reply from the guard in time", file=sys.stderr)
        return ExitCode.FAILURE
    ok = reply.result == "ok"
    print(
        f"guard reset {reply.result}{': ' + reply.detail if reply.detail else ''}",
        file=sys.stdout if ok else sys.stderr,
    )
    return ExitCode.OK if ok else ExitCode.REJECTED


def _cmd_commission(args: argparse.Namespace) -> int:
    from ilup_controller.commissioning.cli import run_commission

    return run_commission(args, _load(args.config, args.overlay))


def _cmd_watch(args: argparse.Namespace) -> int:
    from ilup_controller.view import watch

    cfg = _load(args.config)
    host = args.host or cfg.mqtt.host
    port = args.port or cfg.mqtt.port
    try:
        return asyncio.run(
            watch(
                host,
                port,
                cfg.mqtt.topic_prefix,
                cfg.cart_id,
                protocol=args.protocol or cfg.mqtt.protocol,
                username=cfg.mqtt.username,
                password=cfg.mqtt.password,
                once=args.once,
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK


SETPOINT_FIELDS = {
    "flow": "flow_ml_min",
    "pressure-limit": "pressure_limit_mmhg",
    "temperature": "temperature_c",
}


def _operator_body(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """(command name, JSON body) of an operator subcommand."""
    match args.command:
        case "set":
            return "setpoint", {SETPOINT_FIELDS[args.what]: args.value}
        case "mode":
            body: dict[str, object] = {"control": args.control, "output_mode": args.output}
            if args.pump_speed_rpm is not None:
                body["pump_speed_rpm"] = args.pump_speed_rpm
            return "mode", body
        case "phase":
            return "phase", {"action": args.action.replace("-", "_")}
        case "ack":
            return "alarm", {"action": "acknowledge", "alarm_id": args.alarm_id}
        case "reset":
            return "alarm", {"action": "reset", "alarm_id": args.alarm_id}
        case "pause-audio":
            return "alarm", {"action": "pause_audio"}
        case "marker":
            return "marker", {"text": args.text}
        case "zero":
            return "calibrate", {"action": "zero_pressure"}
        case "stroke-volume":
            return "calibrate", {"action": "stroke_volume", "stroke_volume_ml_per_rev": args.value}
    raise AssertionError(args.command)


def _cmd_operator(args: argparse.Namespace) -> int:
    from ilup_controller.client import (
        CartOffline,
        ConsoleConfirm,
        connection_failure,
        print_reply,
        send_command,
        settings_from,
    )

    name, body = _operator_body(args)
    settings = settings_from(args)
    decide = ConsoleConfirm(yes=args.yes)
    try:
        reply = asyncio.run(
            send_command(settings, name, body, timeout_s=args.timeout, decide=decide)
        )
    except CartOffline as e:
        print(f"ilup {args.command}: not sent: {e}", file=sys.stderr)
        return ExitCode.OFFLINE
    except Exception as e:
        text, code = connection_failure(e, settings)
        print(f"ilup {args.command}: {text}", file=sys.stderr)
        return code
    rc = print_reply(reply)
    # The operator said no: the cancel was accepted, but the change was not made.
    return ExitCode.REJECTED if decide.declined and rc == ExitCode.OK else rc


def _cmd_status(args: argparse.Namespace) -> int:
    from ilup_controller.client import connection_failure, print_snapshot, settings_from, snapshot

    settings = settings_from(args)
    try:
        return print_snapshot(asyncio.run(snapshot(settings)))
    except Exception as e:
        text, code = connection_failure(e, settings)
        print(f"ilup status: {text}", file=sys.stderr)
        return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from ilup_controller.demo import run_demo

    return run_demo(args.config, speed=args.speed, guard=not args.no_guard)


def _overlay_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML deep-merged over the cart file, in order (e.g. gains from `ilup tune`)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ilup", description=__doc__)
    p.add_argument("--version", action="version", version=f"ilup {__version__}")
    p.add_argument(
        "--log-level",
        default=os.environ.get("ILUP_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-config", help="validate a cart configuration file")
    c.add_argument("file", nargs="?", help="cart file (the same as -c FILE)")
    c.add_argument("-c", "--config", metavar="FILE", help="cart file")
    _overlay_flag(c)
    c.set_defaults(func=_cmd_check_config)

    r = sub.add_parser("run", help="run the control daemon")
    r.add_argument("-c", "--config", required=True)
    _overlay_flag(r)
    r.set_defaults(func=_cmd_run)

    from ilup_controller.tuning.cli import add_tune_parser

    _overlay_flag(add_tune_parser(sub, _cmd_tune))

    from ilup_controller.commissioning.cli import add_commission_parser

    _overlay_flag(add_commission_parser(sub, _cmd_commission))

    s = sub.add_parser("sim", help="run the plant simulator behind Modbus TCP")
    _packaged_sim_config_flag(s)
    _overlay_flag(s)
    s.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    s.add_argument(
        "--scenario",
        help="YAML file of timed faults (docs/faults.md), or a packaged one: "
        + ", ".join(examples.scenario_names()),
    )
    s.add_argument(
        "--variant",
        metavar="NAME",
        help="serve this plant variant of the cart (docs/plant_family.md)",
    )
    s.add_argument(
        "--variant-config",
        metavar="FILE",
        help="with --variant: write the variant's full cart file here, for `ilup run -c FILE` "
        "(its register scales may differ from the base)",
    )
    s.add_argument(
        "--watchdog-off",
        action="append",
        default=[],
        metavar="DEVICE",
        help="test aid: this simulated device ignores its watchdog register",
    )
    s.add_argument(
        "--watchdog-no-trip",
        action="append",
        default=[],
        metavar="DEVICE",
        help="test aid: this device's watchdog reads back its timeout but never trips",
    )
    s.add_argument(
        "--swap-words",
        action="append",
        default=[],
        metavar="SIGNAL",
        help="test aid: serve this 32-bit signal in the other word order (a wrong word_order)",
    )
    s.add_argument(
        "--disconnect",
        action="append",
        default=[],
        metavar="SIGNAL",
        help="test aid: this analogue input reads as a broken 4-20 mA loop",
    )
    s.set_defaults(func=_cmd_sim)

    gd = sub.add_parser("guard", help="run the independent safety guard (docs/security.md)")
    gd.add_argument("-c", "--config", required=True)
    _overlay_flag(gd)
    gd.set_defaults(func=_cmd_guard)

    w = sub.add_parser("watch", help="live terminal view of a cart over MQTT")
    w.add_argument("-c", "--config", required=True)
    w.add_argument("--host")
    w.add_argument("--port", type=int)
    w.add_argument("--protocol", choices=["3.1.1", "5"])
    w.add_argument("--once", action="store_true", help="print one snapshot and exit")
    w.set_defaults(func=_cmd_watch)

    from ilup_controller.client import add_connection_flags

    st = sub.add_parser("status", help="one snapshot of state and active alarms")
    add_connection_flags(st)
    st.set_defaults(func=_cmd_status)

    ops: list[argparse.ArgumentParser] = []
    o = sub.add_parser("set", help="change a target: flow, pressure-limit or temperature")
    o.add_argument("what", choices=sorted(SETPOINT_FIELDS))
    o.add_argument("value", type=float)
    ops.append(o)
    o = sub.add_parser("mode", help="control mode: flow or pressure; auto or manual output")
    o.add_argument("control", choices=["flow", "pressure"])
    o.add_argument("--output", choices=["auto", "manual"], default="auto")
    o.add_argument("--pump-speed-rpm", type=float)
    ops.append(o)
    o = sub.add_parser("phase", help="procedure phase")
    o.add_argument(
        "action", choices=["priming", "perfusion", "washout", "complete", "safe-stop", "resume"]
    )
    ops.append(o)
    o = sub.add_parser("ack", help="acknowledge an alarm (silences this occurrence)")
    o.add_argument("alarm_id")
    ops.append(o)
    o = sub.add_parser("reset", help="reset a latched alarm whose condition has cleared")
    o.add_argument("alarm_id")
    ops.append(o)
    ops.append(sub.add_parser("pause-audio", help="pause alarm audio (max 120 s)"))
    o = sub.add_parser("marker", help="free-text event in the record, e.g. 'drug in'")
    o.add_argument("text")
    ops.append(o)
    o = sub.add_parser("zero", help="zero a sensor: pump stopped, idle, transducer open to air")
    o.add_argument("sensor", choices=["pressure"])
    ops.append(o)
    o = sub.add_parser("stroke-volume", help="set the pump's stroke volume from a measurement")
    o.add_argument("value", type=float, help="mL/rev, e.g. from ilup commission")
    ops.append(o)
    for o in ops:
        add_connection_flags(o)
        o.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
        o.add_argument(
            "--yes",
            action="store_true",
            help="confirm a change that needs confirmation without asking (still two steps)",
        )
        o.set_defaults(func=_cmd_operator)
    gr = sub.add_parser("guard-reset", help="release the guard's latches once the cause is gone")
    add_connection_flags(gr)
    gr.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    gr.set_defaults(func=_cmd_guard_reset)

    from ilup_controller.record.commands import (
        add_export_arguments,
        add_report_arguments,
        add_verify_arguments,
    )

    add_report_arguments(sub.add_parser("report", help="HTML report with plots from a record"))
    add_export_arguments(sub.add_parser("export", help="a record's samples as CSV (--csv)"))
    add_verify_arguments(
        sub.add_parser("verify", help="check a record's hash chain: intact, unsealed or tampered")
    )

    d = sub.add_parser("demo", help="simulator + daemon + broker + live view")
    _packaged_sim_config_flag(d)
    d.add_argument("--speed", type=float, default=1.0)
    d.add_argument("--no-guard", action="store_true", help="without the independent safety guard")
    d.set_defaults(func=_cmd_demo)

    i = sub.add_parser("init", help="write a commented cart file to start from")
    i.add_argument("file", type=Path, help="cart file to write")
    i.add_argument("--sim", action="store_true", help="a cart wired to `ilup sim` (default: real)")
    i.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    i.set_defaults(func=_cmd_init)

    k = sub.add_parser("completion", help="print a shell completion script")
    k.add_argument("shell", choices=["bash"])
    k.set_defaults(func=_cmd_completion)
    return p


def _packaged_sim_config_flag(p: argparse.ArgumentParser) -> None:
    # The demo and the simulator run from any directory: the default is the packaged sim.yaml.
    p.add_argument(
        "-c",
        "--config",
        default=str(examples.example(examples.SIM_CONFIG)),
        help="cart file (default: the packaged sim.yaml)",
    )


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        path = examples.write_starter(args.file, simulated=args.sim, force=args.force)
    except OSError as e:
        print(f"ilup init: {e}", file=sys.stderr)
        return EXIT_FAILURE
    kind = "simulator" if args.sim else "real-hardware"
    print(f"{path}: {kind} cart file written; next: ilup check-config -c {path}")
    return EXIT_OK


def _cmd_completion(args: argparse.Namespace) -> int:
    from ilup_controller.completion import bash_script

    print(bash_script(build_parser()), end="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check-config":
        if (args.file is None) == (args.config is None):
            parser.error("check-config: give the cart file once, as FILE or as -c FILE")
        args.config = args.config or args.file
    _setup_logging(args.log_level)
    try:
        rc: int = args.func(args)
    except ConfigError as e:
        print(e.report(), file=sys.stderr)
        return EXIT_CONFIG
    return rc


if __name__ == "__main__":
    sys.exit(main())
