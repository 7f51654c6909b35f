"""The operator side of the `ilup` command: send a command and wait for its reply, or print one
snapshot of a cart. Connection settings come from flags, then ILUP_MQTT_* environment
variables, then a client file (``--client-config``, YAML with the same keys), then the cart
configuration given with ``-c``, then defaults."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ilup_controller.commands.models import Reply, default_reply_topic
from ilup_controller.config.loader import ConfigError, load_config, read_yaml_file
from ilup_controller.exitcodes import ExitCode
from ilup_controller.mqtt.messages import GuardReply, GuardReset, drug_timer_paused

REPLY_TIMEOUT_S = 5.0
# A daemon's status is retained: the broker sends it right after the subscription. No status
# within this bound means no daemon ever came online on this broker for this cart.
STATUS_BOUND_S = 1.5
# MQTT 3.1.1 CONNACK 4/5 and MQTT 5 reason codes 134/135: the broker refused the credentials.
_CREDENTIALS_REFUSED = frozenset({4, 5, 134, 135})
_KEYS = (
    "host",
    "port",
    "prefix",
    "cart_id",
    "username",
    "password",
    "protocol",
    "ca_file",
    "cert_file",
    "key_file",
)


@dataclass(frozen=True)
class ClientSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "ilup"
    cart_id: str = "sim_cart_1"
    username: str = "operator"
    password: str | None = None
    protocol: str = "5"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def client(self, identifier: str) -> aiomqtt.Client:
        tls = None
        if self.ca_file is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file
            )
        protocol = (
            aiomqtt.ProtocolVersion.V5 if self.protocol == "5" else aiomqtt.ProtocolVersion.V311
        )
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=identifier,
            protocol=protocol,
            username=self.username,
            password=self.password,
            tls_params=tls,
            timeout=REPLY_TIMEOUT_S,
        )


_HELP = {
    "host": "broker host (default 127.0.0.1)",
    "port": "broker port (default 1883)",
    "prefix": "topic prefix (default ilup)",
    "cart_id": "cart id, the topic level under the prefix",
    "username": "broker user (default operator)",
    # On the command line a password shows in the process list, and argparse takes one that
    # starts with '-' for an option.
    "password": "broker password; prefer --client-config or the environment: on the command "
    "line other users see it in the process list, and one that starts with '-' must be "
    "given as --password=VALUE",
    "protocol": "MQTT protocol: 5 (default) or 3.1.1",
    "ca_file": "CA certificate to verify the broker (TLS)",
    "cert_file": "client certificate (TLS client authentication)",
    "key_file": "client certificate's key",
}


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="cart configuration (broker, prefix and cart id)")
    p.add_argument("--client-config", help="YAML file with host, port, username, ...")
    for key in _KEYS:
        p.add_argument(
            f"--{key.replace('_', '-')}",
            dest=f"conn_{key}",
            metavar=key.upper(),
            type=int if key == "port" else str,
            help=f"{_HELP[key]}; env ILUP_MQTT_{key.upper()}",
        )


def settings_from(args: argparse.Namespace) -> ClientSettings:
    values: dict[str, Any] = {}
    if args.config:
        cfg = load_config(args.config)
        m = cfg.mqtt
        values.update(
            host=m.host,
            port=m.port,
            prefix=m.topic_prefix,
            cart_id=cfg.cart_id,
            protocol=m.protocol,
        )
        if m.username:
            values.update(username=m.username, password=m.password)
        if m.tls is not None:
            values.update(ca_file=m.tls.ca_file, cert_file=m.tls.cert_file, key_file=m.tls.key_file)
    if args.client_config:
        data, source = read_yaml_file(args.client_config)
        unknown = sorted(set(data or {}) - set(_KEYS)) if isinstance(data, dict) else ["<top>"]
        if unknown:
            raise ConfigError(
                source, [f"{k}: unknown key (known: {', '.join(_KEYS)})" for k in unknown]
            )
        values.update(data)
    for key in _KEYS:
        env = os.environ.get(f"ILUP_MQTT_{key.upper()}")
        if env is not None:
            values[key] = int(env) if key == "port" else env
        flag = getattr(args, f"conn_{key}", None)
        if flag is not None:
            values[key] = flag
    return ClientSettings(**values)


class CartOffline(Exception):
    """The cart's daemon is not online: a command would wait for a reply that cannot come."""


def credentials_refused(e: BaseException, s: ClientSettings) -> str | None:
    """The operator-facing sentence when ``e`` is the broker refusing the credentials."""
    if not isinstance(e, MqttConnectError):
        return None
    rc = e.rc.value if isinstance(e.rc, ReasonCode) else e.rc
    if rc not in _CREDENTIALS_REFUSED:
        return None
    how = "no password" if s.password is None else "the password given"
    return (
        f"the broker {s.host}:{s.port} refused the credentials for user {s.username!r} "
        f"({how}; broker says: {e}). Check --username/--password, ILUP_MQTT_USERNAME/"
        "ILUP_MQTT_PASSWORD or the client file"
    )


def connection_failure(e: BaseException, s: ClientSettings) -> tuple[str, ExitCode]:
    """(message, exit code) for an exception raised while talking to the broker."""
    refused = credentials_refused(e, s)
    if refused is not None:
        return refused, ExitCode.BROKER_AUTH
    return f"cannot reach the broker {s.host}:{s.port}: {e}", ExitCode.FAILURE


async def _await_status(
    client: aiomqtt.Client, status_topic: str, bound_s: float
) -> dict[str, Any] | None:
    """The retained status of the cart, or None when none comes within ``bound_s``."""
    try:
        async with asyncio.timeout(bound_s):
            async for message in client.messages:
                if message.topic.matches(status_topic) and isinstance(message.payload, bytes):
                    status: dict[str, Any] = json.loads(message.payload)
                    return status
    except TimeoutError:
        return None
    return None


def _offline_reason(s: ClientSettings, status: dict[str, Any] | None) -> str | None:
    where = f"cart {s.cart_id!r} on {s.host}:{s.port} (prefix {s.prefix!r})"
    if status is None:
        return (
            f"{where} is offline: no daemon status within {STATUS_BOUND_S:g} s "
            "(no `ilup run` has come online for this cart on this broker)"
        )
    if not status.get("online"):
        return f"{where} is offline: its daemon's retained status says online: false"
    return None


# Decides a confirm_required reply: True confirms the change, False cancels it.
Decide = Callable[[Reply], Awaitable[bool]]


async def send_command(
    s: ClientSettings,
    name: str,
    body: dict[str, Any],
    timeout_s: float = REPLY_TIMEOUT_S,
    *,
    decide: Decide | None = None,
) -> Reply | None:
    """Publish one command and wait for its reply (None when none came in time). Raises
    CartOffline, without publishing, when the cart's daemon is not online.

    A reply ``confirm_required`` with ``decide`` given: ``decide(reply)`` says whether to
    confirm, and a ``confirm`` command (action confirm or cancel, the reply's token) goes out
    on the same connection; its reply is returned."""
    status_topic = f"{s.prefix}/{s.cart_id}/status"
    async with s.client(f"ilup-cli-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(status_topic, qos=1)
        why = _offline_reason(s, await _await_status(client, status_topic, STATUS_BOUND_S))
        if why is not None:
            raise CartOffline(why)
        names = [name] if decide is None or name == "confirm" else [name, "confirm"]
        for n in names:
            await client.subscribe(default_reply_topic(s.prefix, s.cart_id, s.username, n), qos=1)
        reply = await _command(client, s, name, body, status_topic, timeout_s)
        if reply is None or reply.status != "confirm_required" or decide is None:
            return reply
        yes = await decide(reply)
        second = {"token": reply.token, "action": "confirm" if yes else "cancel"}
        return await _command(client, s, "confirm", second, status_topic, timeout_s)


async def _command(
    client: aiomqtt.Client,
    s: ClientSettings,
    name: str,
    body: dict[str, Any],
    status_topic: str,
    timeout_s: float,
) -> Reply | None:
    """Publish one command on an open connection and wait for its reply."""
    command_id = uuid.uuid4().hex
    payload = {"command_id": command_id, "issued_at": datetime.now(UTC).isoformat(), **body}
    props = None
    if s.protocol == "5":
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = command_id.encode()
    topic = f"{s.prefix}/{s.cart_id}/cmd/{s.username}/{name}"
    await client.publish(topic, json.dumps(payload), qos=1, properties=props)
    try:
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                if not isinstance(message.payload, bytes):
                    continue
                if message.topic.matches(status_topic):
                    # The daemon went away (its last will) while the command was out.
                    if not json.loads(message.payload).get("online"):
                        raise CartOffline(
                            f"cart {s.cart_id!r} went offline before replying: the "
                            "command may or may not have been applied; check `ilup status`"
                        )
                    continue
                reply = Reply.model_validate_json(message.payload)
                if reply.command_id == command_id:
                    return reply
    except TimeoutError:
        return None
    return None


@dataclass
class ConsoleConfirm:
    """Asks the operator at the terminal whether to confirm a change (``--yes``: confirm
    without asking; it still takes the daemon's two steps). ``declined`` records a no."""

    yes: bool = False
    declined: bool = False
    out: TextIO | None = None  # default: sys.stdout at the time of asking

    async def __call__(self, reply: Reply) -> bool:
        out = self.out or sys.stdout
        window_s = reply.confirm_within_s or 0.0
        print(f"{reply.command} needs confirmation: {reply.detail}", file=out)
        if self.yes:
            print("confirmed (--yes)", file=out)
            return True
        line = await _read_line(
            f"Confirm within {window_s:g} s? [y/N] ", max(0.5, window_s - 0.5), out
        )
        ok = line is not None and line.strip().lower() in ("y", "yes")
        if line is None:
            print("\nno answer in time: cancelling", file=out)
        self.declined = not ok
        return ok


async def _read_line(prompt: str, timeout_s: float, out: TextIO) -> str | None:
    """One line from stdin within ``timeout_s``, else None. The reading thread is a daemon:
    an unanswered prompt never keeps the process alive."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()

    def deliver(line: str) -> None:
        if not got.done():
            got.set_result(line)

    def read() -> None:
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):
            line = ""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(deliver, line)

    print(prompt, end="", file=out, flush=True)
    threading.Thread(target=read, name="ilup-confirm", daemon=True).start()
    try:
        return await asyncio.wait_for(got, timeout_s)
    except TimeoutError:
        return None


async def send_guard_reset(
    s: ClientSettings, timeout_s: float = REPLY_TIMEOUT_S
) -> GuardReply | None:
    """Ask the cart's guard to release its latches; its reply, or None when none came."""
    command_id = uuid.uuid4().hex
    base = f"{s.prefix}/{s.cart_id}/guard/cmd/{s.username}/reset"
    payload = GuardReset(command_id=command_id, issued_at=datetime.now(UTC))
    async with s.client(f"ilup-cli-{command_id[:8]}") as client:
        await client.subscribe(f"{base}/reply", qos=1)
        await client.publish(base, payload.model_dump_json(), qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    if isinstance(message.payload, bytes):
                        reply = GuardReply.model_validate_json(message.payload)
                        if reply.command_id == command_id:
                            return reply
        except TimeoutError:
            return None
    return None


SNAPSHOT_TOPICS = ("status", "state", "alarms")
GUARD_GRACE_S = 0.2  # after the three above, how long a guard status may still come


async def snapshot(s: ClientSettings, timeout_s: float = 3.0) -> dict[str, Any]:
    """The retained status, state and alarms of the cart: waits for all three, at most
    ``timeout_s`` (the broker sends retained messages right after the subscription, in no
    promised order across topics)."""
    base = f"{s.prefix}/{s.cart_id}"
    got: dict[str, Any] = {}
    async with s.client(f"ilup-status-{uuid.uuid4().hex[:8]}") as client:
        for name in (*SNAPSHOT_TOPICS, "guard"):
            await client.subscribe(f"{base}/{name}", qos=1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout(timeout_s) as scope:
                async for message in client.messages:
                    if isinstance(message.payload, bytes):
                        got[message.topic.value.rsplit("/", 1)[1]] = json.loads(message.payload)
                    if "guard" in got and set(SNAPSHOT_TOPICS) <= got.keys():
                        break
                    if set(SNAPSHOT_TOPICS) <= got.keys():  # a cart may have no guard
                        deadline = min(deadline, loop.time() + GUARD_GRACE_S)
                        scope.reschedule(deadline)
        except TimeoutError:
            pass
    return got


def print_reply(reply: Reply | None) -> int:
    if reply is None:
        print(
            "no reply within the timeout: the command may or may not have been applied; "
            "check `ilup status`",
            file=sys.stderr,
        )
        return ExitCode.FAILURE
    line = f"{reply.command} {reply.status}"
    if reply.reason:
        line += f" ({reply.reason})"
    if reply.detail:
        line += f": {reply.detail}"
    if reply.token is not None:
        line += f" (token {reply.token}, {reply.confirm_within_s:g} s)"
    print(line, file=sys.stdout if reply.status == "ok" else sys.stderr)
    return ExitCode.OK if reply.status == "ok" else ExitCode.REJECTED


def print_snapshot(got: dict[str, Any]) -> int:
    """Print one snapshot; exit OFFLINE when the cart's daemon is not online (the values shown
    are then the last ones it retained)."""
    state, status = got.get("state"), got.get("status")
    online = bool(status and status.get("online"))
    if status is None:
        print("daemon: OFFLINE (no status message)")
    else:
        print(f"daemon: {'online' if online else 'OFFLINE (values below are its last)'}")
    if state is None:
        print("no state received", file=sys.stderr)
        return ExitCode.FAILURE if online else ExitCode.OFFLINE
    m, t, o = state["measured"], state["targets"], state["outputs"]
    at = datetime.fromisoformat(state["t"]).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    drug = state["drug_phase"]
    # An older daemon sends no "counting": not shown as paused.
    paused = drug_timer_paused(state["phase"], drug["remaining_s"], drug.get("counting", True))
    print(
        f"at {at}  phase {state['phase']}  drug phase {drug['elapsed_s']:.0f} s done, "
        f"{drug['remaining_s']:.0f} s left" + (" (PAUSED: off target)" if paused else "")
    )
    print(
        f"flow {m['flow_ml_min']} mL/min (target {t['flow_ml_min']}), pressure "
        f"{m['pressure_mmhg']} mmHg (limit {t['pressure_limit_mmhg']}), perfusate "
        f"{m['temperature_c']} degC (target {t['temperature_c']})"
    )
    print(f"pump {o['pump_speed_rpm']:.2f} rpm, heater {o['heater_pct']:.1f} %")
    cal, gate = state.get("calibration"), state.get("commissioning")
    if cal:
        print(
            f"calibration: pressure zero {cal['pressure_zero_mmhg']:+.2f} mmHg, stroke volume "
            f"{cal['stroke_volume_ml_per_rev']:.2f} mL/rev ({cal['source']})"
        )
    if gate:
        label = {"not_commissioned": "NOT COMMISSIONED", "waived": "WAIVED"}
        print(f"commissioning: {label.get(gate['status'], gate['status'])}: {gate['detail']}")
    if "alarms" in got:
        alarms = got["alarms"].get("alarms", [])
        for a in alarms:
            print(f"ALARM {a['priority']:<6} {a['presence']:<7} {a['id']}: {a['message']}")
        if not alarms:
            print("alarms: none")
    else:
        # Never say "none" without the alarms message: fall back on the ids in the state.
        ids = state.get("active_alarms", [])
        for alarm_id in ids:
            print(f"ALARM {alarm_id} (details: no alarms message received)")
        if not ids:
            print("alarms: none listed in the state (no alarms message received)")
    guard = got.get("guard")
    if guard is not None:
        print(guard_line(guard))
    return ExitCode.OK if online else ExitCode.OFFLINE


def guard_line(guard: dict[str, Any]) -> str:
    """One line on the independent safety guard, from its retained status."""
    if not guard.get("online"):
        return "guard: OFFLINE (the second safety layer is not running)"
    forms = ", ".join(f"{a} by {f}" for a, f in sorted(guard.get("form", {}).items()))
    latched = guard.get("latched") or {}
    held = "; ".join(f"{a} HELD OFF: {why}" for a, why in sorted(latched.items()))
    return f"guard: online ({forms}){'  ' + held if held else ', nothing held off'}"
