"""The operator side of the `ilup` command: send a command and wait for its reply, or print one
snapshot of a cart. Connection settings come from flags, then ILUP_MQTT_* environment
variables, then a client file (``--client-config``, YAML with the same keys), then the cart
configuration given with ``-c``, then defaults."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ilup_controller.commands.models import Reply, default_reply_topic
from ilup_controller.config.loader import ConfigError, load_config, read_yaml_file

REPLY_TIMEOUT_S = 5.0
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


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="cart configuration (broker, prefix and cart id)")
    p.add_argument("--client-config", help="YAML file with host, port, username, ...")
    for key in _KEYS:
        p.add_argument(
            f"--{key.replace('_', '-')}", dest=f"conn_{key}", type=int if key == "port" else str
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


async def send_command(
    s: ClientSettings, name: str, body: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S
) -> Reply | None:
    """Publish one command and wait for its reply (None when none came in time)."""
    command_id = uuid.uuid4().hex
    payload = {"command_id": command_id, "issued_at": datetime.now(UTC).isoformat(), **body}
    reply_topic = default_reply_topic(s.prefix, s.cart_id, s.username, name)
    async with s.client(f"ilup-cli-{command_id[:8]}") as client:
        await client.subscribe(reply_topic, qos=1)
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
                    reply = Reply.model_validate_json(message.payload)
                    if reply.command_id == command_id:
                        return reply
        except TimeoutError:
            return None
    return None


async def snapshot(s: ClientSettings, timeout_s: float = 3.0) -> dict[str, Any]:
    """The retained status, state and alarms of the cart."""
    base = f"{s.prefix}/{s.cart_id}"
    got: dict[str, Any] = {}
    async with s.client(f"ilup-status-{uuid.uuid4().hex[:8]}") as client:
        for name in ("status", "state", "alarms"):
            await client.subscribe(f"{base}/{name}", qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    if isinstance(message.payload, bytes):
                        got[message.topic.value.rsplit("/", 1)[1]] = json.loads(message.payload)
                    if {"status", "state"} <= got.keys() and ("alarms" in got or len(got) >= 2):
                        break
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
        return 1
    line = f"{reply.command} {reply.status}"
    if reply.reason:
        line += f" ({reply.reason})"
    if reply.detail:
        line += f": {reply.detail}"
    print(line, file=sys.stdout if reply.status == "ok" else sys.stderr)
    return 0 if reply.status == "ok" else 2


def print_snapshot(got: dict[str, Any]) -> int:
    state, status = got.get("state"), got.get("status")
    if status is not None:
        print(f"daemon: {'online' if status.get('online') else 'OFFLINE'}")
    if state is None:
        print("no state received", file=sys.stderr)
        return 1
    m, t, o = state["measured"], state["targets"], state["outputs"]
    print(
        f"at {state['t']}  phase {state['phase']}  drug phase "
        f"{state['drug_phase']['elapsed_s']:.0f} s done, "
        f"{state['drug_phase']['remaining_s']:.0f} s left"
    )
    print(
        f"flow {m['flow_ml_min']} mL/min (target {t['flow_ml_min']}), pressure "
        f"{m['pressure_mmhg']} mmHg (limit {t['pressure_limit_mmhg']}), perfusate "
        f"{m['temperature_c']} degC (target {t['temperature_c']})"
    )
    print(f"pump {o['pump_speed_rpm']:.2f} rpm, heater {o['heater_pct']:.1f} %")
    alarms = (got.get("alarms") or {}).get("alarms", [])
    for a in alarms:
        print(f"ALARM {a['priority']:<6} {a['presence']:<7} {a['id']}: {a['message']}")
    if not alarms:
        print("alarms: none")
    return 0
