"""The ``ilup`` command: daemon, simulator, config check, live view and demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from ilup_controller import __version__
from ilup_controller.config import CartConfig, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3  # a start-up safety check failed (e.g. a device watchdog is off)


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


async def _run_daemon(cfg: CartConfig) -> int:
    from ilup_controller.runtime.lock import CartLockError, cart_lock

    stop = asyncio.Event()
    _stop_on_signals(stop)
    try:
        # One daemon per cart: locked before any device, broker or record is touched (and
        # before the heavy imports, so a second start is refused at once).
        with cart_lock(cfg.cart_id, cfg.record.directory):
            return await _run_locked(cfg, stop)
    except CartLockError as e:
        print(f"ilup run: refusing to start: {e}", file=sys.stderr)
        return EXIT_REFUSED


async def _run_locked(cfg: CartConfig, stop: asyncio.Event) -> int:
    from ilup_controller.runtime.daemon import Daemon
    from ilup_controller.runtime.watchdog import StartRefused

    try:
        await Daemon(cfg).run(stop)
    except StartRefused as e:
        print(f"ilup run: refusing to start: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


async def _run_sim(args: argparse.Namespace) -> int:
    from sim.faults import load_scenario
    from sim.runner import SimulatedCart

    cfg = _load(args.config)
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
    scenario = load_scenario(args.scenario) if args.scenario else None
    stop = asyncio.Event()
    _stop_on_signals(stop)
    cart = SimulatedCart(cfg, scenario=scenario, watchdog_ignored=frozenset(args.watchdog_off))
    try:
        await cart.run(stop, speed=args.speed)
    except OSError as e:  # a device port taken or not available: a configuration problem
        print(f"ilup sim: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file, args.overlay)
    shown = " + ".join([args.file, *args.overlay])
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
    return asyncio.run(_run_daemon(cfg))


def _cmd_sim(args: argparse.Namespace) -> int:
    return asyncio.run(_run_sim(args))


def _cmd_tune(args: argparse.Namespace) -> int:
    from ilup_controller.tuning.cli import run_tune

    return run_tune(args, _load(args.config, args.overlay))


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
    raise AssertionError(args.command)


def _cmd_operator(args: argparse.Namespace) -> int:
    from ilup_controller.client import print_reply, send_command, settings_from

    name, body = _operator_body(args)
    settings = settings_from(args)
    try:
        reply = asyncio.run(send_command(settings, name, body, timeout_s=args.timeout))
    except Exception as e:
        print(
            f"ilup {args.command}: cannot reach the broker {settings.host}:{settings.port}: {e}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return print_reply(reply)


def _cmd_status(args: argparse.Namespace) -> int:
    from ilup_controller.client import print_snapshot, settings_from, snapshot

    settings = settings_from(args)
    try:
        return print_snapshot(asyncio.run(snapshot(settings)))
    except Exception as e:
        print(
            f"ilup status: cannot reach the broker {settings.host}:{settings.port}: {e}",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def _cmd_demo(args: argparse.Namespace) -> int:
    from ilup_controller.demo import run_demo

    return run_demo(args.config, speed=args.speed)


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
    c.add_argument("file")
    _overlay_flag(c)
    c.set_defaults(func=_cmd_check_config)

    r = sub.add_parser("run", help="run the control daemon")
    r.add_argument("-c", "--config", required=True)
    _overlay_flag(r)
    r.set_defaults(func=_cmd_run)

    from ilup_controller.tuning.cli import add_tune_parser

    _overlay_flag(add_tune_parser(sub, _cmd_tune))

    s = sub.add_parser("sim", help="run the plant simulator behind Modbus TCP")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    s.add_argument("--scenario", help="YAML file of timed faults (docs/faults.md)")
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
    s.set_defaults(func=_cmd_sim)

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
    for o in ops:
        add_connection_flags(o)
        o.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
        o.set_defaults(func=_cmd_operator)

    for name, text in (
        ("report", "HTML report with plots from a procedure record"),
        ("export", "export a procedure record's samples (--csv)"),
    ):
        t = sub.add_parser(name, help=text, add_help=False)
        t.add_argument("rest", nargs=argparse.REMAINDER)
        t.set_defaults(func=_cmd_record_tool)

    d = sub.add_parser("demo", help="simulator + daemon + broker + live view")
    d.add_argument("-c", "--config", default="config/sim.yaml")
    d.add_argument("--speed", type=float, default=1.0)
    d.set_defaults(func=_cmd_demo)
    return p


def _cmd_record_tool(args: argparse.Namespace) -> int:
    if args.command == "report":
        from ilup_controller.record.report import main_report

        return main_report(args.rest)
    from ilup_controller.record.export import main_export

    return main_export(args.rest)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        rc: int = args.func(args)
    except ConfigError as e:
        print(e.report(), file=sys.stderr)
        return EXIT_CONFIG
    return rc


if __name__ == "__main__":
    sys.exit(main())
