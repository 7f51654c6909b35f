"""Operator commands end to end on a hardened broker, with real processes only.

Mosquitto runs the committed config/mosquitto/mosquitto.conf (TLS, passwords, no anonymous
access) and the committed ACL with an operator ``op1`` and a monitor ``mon1`` added the way
docs/security.md says (tests/brokers.py). The simulator serves Modbus on free ports; the daemon
(``ilup run``) logs in as ``ilup-daemon`` over TLS; the operator uses the ``ilup`` CLI, a raw
aiomqtt client, or a flood process. Anonymous and wrong-password logins against this very
mosquitto.conf are refused in tests/test_broker_security.py::
test_anonymous_and_wrong_password_are_refused (not repeated here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from brokers import ACL, Pki, SecureBroker, acl_with_users, make_pki, run_broker
from helpers import wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from procs import Proc, processes, write_cart_config
from ruamel.yaml import YAML

from ilup_controller.broker import free_port
from ilup_controller.config import CartConfig
from ilup_controller.exitcodes import ExitCode

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
DAEMON, OPERATOR, MONITOR = "ilup-daemon", "op1", "mon1"
DRUG_PHASE_S = 3.0
CLI_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 5.0

# The flood (test 4).
FLOOD_RATE_PER_S = 1000.0
FLOOD_DURATION_S = 10.0
FLOOD_SETTLE_S = 10.0
FLOOD_MIN_RATE_PER_S = 500.0  # what this 2-core box must reach if 1000/s is out of reach
# A flood must not become a log flood: at most one daemon log line per this many commands.
FLOOD_COMMANDS_PER_LOG_LINE = 10
RSS_LIMIT_KB = 100 * 1024
RSS_GROWTH_LIMIT_KB = 30 * 1024
# CommandProcessor's per-sender token bucket (its constructor defaults, used by the daemon).
RATE_PER_S, BURST = 5.0, 10


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), (DAEMON, OPERATOR, MONITOR))


@pytest.fixture(scope="module")
def acl(pki: Pki) -> Path:
    path = pki.dir / "acl"
    path.write_text(acl_with_users(ACL.read_text(), operators=[OPERATOR], monitors=[MONITOR]))
    return path


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    correlation: bytes | None
    at_s: float  # loop.time() at arrival

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Observer:
    """A connected client (any user) that records what it receives; it may publish too."""

    client: aiomqtt.Client
    messages: list[Msg] = field(default_factory=list)

    async def collect(self) -> None:
        loop = asyncio.get_running_loop()
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            props = m.properties
            corr = getattr(props, "CorrelationData", None) if props is not None else None
            self.messages.append(Msg(m.topic.value, m.payload, corr, loop.time()))

    def on(self, topic: str) -> list[Msg]:
        return [m for m in self.messages if m.topic == topic]

    def under(self, prefix: str) -> list[Msg]:
        return [m for m in self.messages if m.topic.startswith(prefix)]

    async def first(self, match: Callable[[Msg], bool], timeout_s: float, what: str) -> Msg:
        found: list[Msg] = []

        def check() -> bool:
            found[:] = [m for m in self.messages if match(m)][:1]
            return bool(found)

        await wait_until(check, timeout_s, interval_s=0.01, what=what)
        return found[0]


@contextlib.asynccontextmanager
async def observing(
    broker: SecureBroker, user: str, topics: Iterable[str]
) -> AsyncIterator[Observer]:
    async with broker.client(user) as client:
        for t in topics:
            await client.subscribe(t, qos=1)
        obs = Observer(client)
        task = asyncio.create_task(obs.collect())
        try:
            yield obs
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@dataclass(frozen=True)
class Cart:
    broker: SecureBroker
    cfg_path: Path
    cfg: CartConfig
    op_client_config: Path  # op1's credentials, for `--client-config`
    daemon: Proc

    @property
    def base(self) -> str:
        return f"{self.cfg.mqtt.topic_prefix}/{self.cfg.cart_id}"

    def cmd(self, user: str, name: str) -> str:
        return f"{self.base}/cmd/{user}/{name}"

    def reply(self, user: str, name: str) -> str:
        return f"{self.cmd(user, name)}/reply"


@pytest.fixture
async def cart(tmp_path: Path, pki: Pki, acl: Path) -> AsyncIterator[Cart]:
    """Hardened broker, simulator and daemon (TLS, ilup-daemon); the daemon is up and idle."""
    with run_broker(pki, acl=acl) as broker, processes() as procs:
        overrides = {
            "control": {"autostart": False, "temperature": {"target_c": 34.5}},
            "procedure": {"auto_advance": False, "drug_phase_s": DRUG_PHASE_S},
            "simulator": {"plant": {"initial_perfusate_c": 34.5, "initial_water_c": 34.5}},
            "mqtt": {
                "username": DAEMON,
                "password": pki.passwords[DAEMON],
                "tls": {"ca_file": str(pki.ca_file)},
            },
        }
        cfg_path, cfg = write_cart_config(tmp_path, broker.port, ramp_s=2.0, overrides=overrides)
        # The simulator's fault listener speaks neither TLS nor our passwords, and no test needs
        # it: its copy of the configuration points it at a closed port (it just retries).
        yaml = YAML(typ="safe", pure=True)
        sim_data = yaml.load(cfg_path.read_text(encoding="utf-8"))
        sim_data["mqtt"] = {"host": "127.0.0.1", "port": free_port()}
        sim_path = tmp_path / "sim.yaml"
        with sim_path.open("w", encoding="utf-8") as f:
            yaml.dump(sim_data, f)
        op_path = tmp_path / "op1.yaml"
        with op_path.open("w", encoding="utf-8") as f:
            yaml.dump({"username": OPERATOR, "password": pki.passwords[OPERATOR]}, f)

        procs.append(Proc(["sim", "-c", str(sim_path)], tmp_path / "sim.log"))
        procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        c = Cart(broker, cfg_path, cfg, op_path, daemon)
        try:
            async with observing(broker, OPERATOR, [f"{c.base}/state"]) as obs:
                await obs.first(
                    lambda m: m.json()["measured"]["flow_ml_min"] is not None,
                    20,
                    "a daemon state with the simulator's measurements",
                )
                assert obs.on(f"{c.base}/state")[-1].json()["phase"] == "idle"
            yield c
        finally:
            # Shown by pytest for a failing test only.
            for p in procs:
                print(f"---- {p.args[0]} log (tail) ----\n{p.log()[-4000:]}")
            print(f"---- broker log (tail) ----\n{broker.log_path.read_text()[-2000:]}")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class CliResult:
    rc: int
    stdout: str
    stderr: str


async def ilup(
    *args: str, cart: Cart | None = None, env: dict[str, str] | None = None
) -> CliResult:
    """``python -m ilup_controller ARGS``; with ``cart``, as op1 via ``-c`` and
    ``--client-config``. The environment holds no ILUP_MQTT_* except those in ``env``."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ILUP_MQTT_")}
    conn = [] if cart is None else ["-c", str(cart.cfg_path)]
    if cart is not None and not env:
        conn += ["--client-config", str(cart.op_client_config)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ilup_controller",
        *args,
        *conn,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**base_env, **(env or {})},
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


async def ok(result: Awaitable[CliResult], name: str) -> CliResult:
    r = await result
    assert r.rc == 0, f"exit {r.rc}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stdout.startswith(f"{name} ok"), r.stdout
    return r


def command(command_id: str, *, issued_at: datetime | None = None, **fields: Any) -> bytes:
    issued = issued_at or datetime.now(UTC)
    return json.dumps(
        {"command_id": command_id, "issued_at": issued.isoformat(), **fields}
    ).encode()


def publish_props(correlation: bytes, response_topic: str | None = None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    return props


def events(obs: Observer, cart: Cart, *kinds: str) -> list[dict[str, Any]]:
    got = [m.json() for m in obs.on(f"{cart.base}/events")]
    return [e for e in got if e["kind"] in kinds]


def latest_state(obs: Observer, cart: Cart) -> dict[str, Any]:
    states = obs.on(f"{cart.base}/state")
    assert states, "no state received"
    payload: dict[str, Any] = states[-1].json()
    return payload


async def fresh_state(obs: Observer, cart: Cart, timeout_s: float = 5.0) -> dict[str, Any]:
    """A state published after this call (the daemon publishes at least every second)."""
    since_s = asyncio.get_running_loop().time()
    m = await obs.first(
        lambda m: m.topic == f"{cart.base}/state" and m.at_s > since_s, timeout_s, "a fresh state"
    )
    payload: dict[str, Any] = m.json()
    return payload


def _with_correlation(corr: bytes) -> Callable[[Msg], bool]:
    return lambda m: m.correlation == corr


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- 1. the CLI


async def test_cli_drives_the_procedure_over_tls(cart: Cart) -> None:
    hex_id = "[0-9a-f]{32}"
    async with observing(cart.broker, OPERATOR, [f"{cart.base}/#"]) as obs:
        await ok(ilup("phase", "priming", cart=cart), "phase")
        await ok(ilup("phase", "perfusion", cart=cart), "phase")
        # Credentials from the environment instead of a client file.
        env = {
            "ILUP_MQTT_USERNAME": OPERATOR,
            "ILUP_MQTT_PASSWORD": cart.broker.pki.passwords[OPERATOR],
        }
        await ok(ilup("marker", "drug in", cart=cart, env=env), "marker")
        r = await ok(ilup("set", "flow", "450", cart=cart), "setpoint")
        assert "flow_ml_min 500 -> 450" in r.stdout

        # The drug timer counts only time at target (flow within 10 % of 450, 34.5 degC).
        await obs.first(
            lambda m: (
                m.topic == f"{cart.base}/state" and m.json()["drug_phase"]["remaining_s"] == 0.0
            ),
            20 + DRUG_PHASE_S,
            f"drug phase of {DRUG_PHASE_S} s at target done",
        )
        state = latest_state(obs, cart)
        assert state["phase"] == "perfusion"
        assert state["targets"]["flow_ml_min"] == 450.0
        assert abs(state["measured"]["flow_ml_min"] - 450.0) <= 45.0
        assert state["drug_phase"]["elapsed_s"] >= DRUG_PHASE_S - 1e-6

        await ok(ilup("phase", "washout", cart=cart), "phase")
        await ok(ilup("phase", "complete", cart=cart), "phase")

        # `status` prints the retained state, published every mqtt.state_period_s: wait for
        # the one that has the new phase.
        await obs.first(
            lambda m: m.topic == f"{cart.base}/state" and m.json()["phase"] == "complete",
            REPLY_TIMEOUT_S,
            "a state in phase complete",
        )
        # `status` with connection flags only (no cart configuration).
        # (`--flag=value`: a random password may start with '-'.)
        settings = {
            "host": "127.0.0.1",
            "port": str(cart.broker.port),
            "ca-file": str(cart.broker.pki.ca_file),
            "cart-id": cart.cfg.cart_id,
            "username": OPERATOR,
            "password": cart.broker.pki.passwords[OPERATOR],
        }
        flags = [f"--{key}={value}" for key, value in settings.items()]
        status = await ilup("status", *flags)
        assert status.rc == 0, status.stderr
        assert "daemon: online" in status.stdout
        assert re.search(r"\bphase complete\b", status.stdout), status.stdout

        await obs.first(
            lambda m: m.topic == f"{cart.base}/events" and m.json().get("to_phase") == "complete",
            REPLY_TIMEOUT_S,
            "the phase event washout -> complete",
        )

        # Command events precede their phase event (same tick, same FIFO queue): all are in.
        def cmd(name: str, outcome: str) -> tuple[str, None, None, str]:
            return ("command", None, None, rf"{name} {hex_id} from op1: ok: {outcome}")

        def phase(a: str, b: str) -> tuple[str, str, str, str]:
            return ("phase", a, b, rf"phase {a} -> {b}: .*")

        expected = [
            cmd("phase", "phase idle -> priming"),
            phase("idle", "priming"),
            cmd("phase", "phase priming -> perfusion"),
            phase("priming", "perfusion"),
            ("marker", None, None, "drug in"),
            cmd("setpoint", "flow_ml_min 500 -> 450"),
            cmd("phase", "phase perfusion -> washout"),
            phase("perfusion", "washout"),
            cmd("phase", "phase washout -> complete"),
            phase("washout", "complete"),
        ]
        seen = events(obs, cart, "phase", "command", "marker")
        summary = "\n".join(f"{e['kind']}: {e['message']}" for e in seen)
        assert len(seen) == len(expected), summary
        for e, (kind, from_phase, to_phase, message) in zip(seen, expected, strict=True):
            assert (e["kind"], e.get("from_phase"), e.get("to_phase")) == (
                kind,
                from_phase,
                to_phase,
            ), summary
            assert re.fullmatch(message, e["message"]), summary
            assert e["operator"] == OPERATOR, e

        # Six replies, each with the CLI's correlation data (its command id) echoed.
        replies = obs.under(f"{cart.base}/cmd/{OPERATOR}/")
        replies = [m for m in replies if m.topic.endswith("/reply")]
        assert [m.json()["status"] for m in replies] == ["ok"] * 6
        for m in replies:
            assert m.correlation == m.json()["command_id"].encode()


# --------------------------------------------------------------------------- 2. rejections


async def test_rejections_duplicates_and_expiry(cart: Cart) -> None:
    phase_reply = cart.reply(OPERATOR, "phase")
    marker_reply = cart.reply(OPERATOR, "marker")
    async with observing(cart.broker, OPERATOR, [f"{cart.base}/#"]) as obs:
        not_now = await ilup("phase", "washout", cart=cart)
        assert not_now.rc == ExitCode.REJECTED, not_now
        assert "phase rejected (not_allowed_in_phase)" in not_now.stderr, not_now.stderr

        async def send_and_wait(topic: str, payload: bytes, corr: bytes, reply_topic: str) -> Msg:
            await obs.client.publish(topic, payload, qos=1, properties=publish_props(corr))
            return await obs.first(
                lambda m: m.topic == reply_topic and m.correlation == corr,
                REPLY_TIMEOUT_S,
                f"reply with correlation {corr!r}",
            )

        # The same phase command twice: the first reply again, applied once.
        start = command("dup-phase-1", action="priming")
        first = await send_and_wait(cart.cmd(OPERATOR, "phase"), start, b"c-1", phase_reply)
        again = await send_and_wait(cart.cmd(OPERATOR, "phase"), start, b"c-2", phase_reply)
        assert first.json()["status"] == "ok", first.json()
        assert again.payload == first.payload  # byte for byte, the decision time included

        # The same marker twice.
        once = command("dup-marker-1", text="once")
        m1 = await send_and_wait(cart.cmd(OPERATOR, "marker"), once, b"m-1", marker_reply)
        m2 = await send_and_wait(cart.cmd(OPERATOR, "marker"), once, b"m-2", marker_reply)
        assert m1.json()["status"] == "ok", m1.json()
        assert m2.payload == m1.payload

        # Issued 30 s ago (valid 5 s): expired; the reply goes to the v5 response topic asked for.
        inbox = f"{cart.base}/cmd/{OPERATOR}/inbox/e2e"
        stale = command("stale-1", issued_at=datetime.now(UTC) - timedelta(seconds=30), text="late")
        await obs.client.publish(
            cart.cmd(OPERATOR, "marker"), stale, qos=1, properties=publish_props(b"s-1", inbox)
        )
        expired = await obs.first(lambda m: m.topic == inbox, REPLY_TIMEOUT_S, "expired reply")
        assert expired.correlation == b"s-1"
        assert (expired.json()["command_id"], expired.json()["status"]) == ("stale-1", "rejected")
        assert expired.json()["reason"] == "expired"

        await ok(ilup("phase", "perfusion", cart=cart), "phase")
        too_early = await ilup("phase", "complete", cart=cart)
        assert too_early.rc == ExitCode.REJECTED, too_early
        assert "phase rejected (not_allowed_in_phase)" in too_early.stderr, too_early.stderr
        assert (await fresh_state(obs, cart))["phase"] == "perfusion"

        # Applied once: one transition to priming, one "once" marker and no other marker.
        phase_events = events(obs, cart, "phase")
        assert [(e["from_phase"], e["to_phase"]) for e in phase_events] == [
            ("idle", "priming"),
            ("priming", "perfusion"),
        ]
        dup_events = [
            e["message"] for e in events(obs, cart, "command") if "dup-phase-1" in e["message"]
        ]
        assert dup_events == [
            "phase dup-phase-1 from op1: ok: phase idle -> priming",
            "phase dup-phase-1 from op1: ok (repeated delivery, not applied again): "
            "phase idle -> priming",
        ]
        assert not [m for m in obs.messages if m.topic == marker_reply and b"stale-1" in m.payload]
        # Last, as it exposes a defect: the repeated marker must not be a second marker event.
        markers = [(e["message"], e["operator"]) for e in events(obs, cart, "marker")]
        assert markers == [("once", OPERATOR)], markers


# --------------------------------------------------------------------------- 3. the monitor


async def test_monitor_commands_never_reach_the_daemon(cart: Cart) -> None:
    valid = command("mon-1", action="priming")
    async with (
        observing(cart.broker, OPERATOR, [f"{cart.base}/#"]) as obs,
        cart.broker.client(MONITOR) as monitor,
    ):
        # Each publish is answered by the broker (PUBACK) before the next is sent, and op1's
        # marker goes last: a monitor command that got through would reach the daemon, and
        # op1's observer (which reads ilup/#), before the marker and its reply.
        await monitor.publish(cart.cmd(MONITOR, "phase"), valid, qos=1)
        await monitor.publish(cart.cmd(OPERATOR, "phase"), valid, qos=1)
        marker = command("after-monitor", text="after monitor")
        await obs.client.publish(cart.cmd(OPERATOR, "marker"), marker, qos=1)
        reply = await obs.first(
            lambda m: m.topic == cart.reply(OPERATOR, "marker"), REPLY_TIMEOUT_S, "marker reply"
        )
        assert reply.json()["status"] == "ok"
        await obs.first(
            lambda m: m.topic == f"{cart.base}/events" and m.json()["kind"] == "marker",
            REPLY_TIMEOUT_S,
            "marker event",
        )
        state = await fresh_state(obs, cart)

    assert obs.under(f"{cart.base}/cmd/{MONITOR}/") == []  # neither the command nor a reply
    assert obs.under(cart.cmd(OPERATOR, "phase")) == []  # the forged one, nor its reply
    assert events(obs, cart, "command", "phase") == []
    assert [e["message"] for e in events(obs, cart, "marker")] == ["after monitor"]
    assert state["phase"] == "idle"
    assert "mon-1" not in cart.daemon.log()
    assert "mon1" not in cart.daemon.log()


# --------------------------------------------------------------------------- 4. the flood

FLOOD_SCRIPT = r"""
import asyncio, json, sys
from datetime import UTC, datetime
import aiomqtt

a = json.loads(sys.argv[1])
V5 = aiomqtt.ProtocolVersion.V5

async def main():
    loop = asyncio.get_running_loop()
    client = aiomqtt.Client(
        "127.0.0.1", a["port"], username=a["user"], password=a["password"], protocol=V5,
        tls_params=aiomqtt.TLSParameters(ca_certs=a["ca"]), identifier="ilup-e2e-flood",
        max_concurrent_outgoing_calls=64, timeout=30,
    )
    client.pending_calls_threshold = 1000  # 64 in flight is intended
    replies = {}
    async with client:
        await client.subscribe(a["reply_topic"], qos=1)

        async def collect():
            async for m in client.messages:
                r = json.loads(m.payload)
                replies.setdefault(r["command_id"], []).append(r)

        collector = asyncio.create_task(collect())
        n = int(a["rate"] * a["duration"])
        sent, tasks = 0, set()
        t0 = loop.time()
        while sent < n:
            due = min(n, int((loop.time() - t0) * a["rate"]) + 1)
            while sent < due:
                body = {"command_id": f"flood-{sent:06d}",
                        "issued_at": datetime.now(UTC).isoformat(), **a["fields"]}
                t = asyncio.create_task(client.publish(a["topic"], json.dumps(body), qos=1))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.002)
        t_issued = loop.time()
        if tasks:
            await asyncio.gather(*tasks)
        t_acked = loop.time()
        deadline = t_acked + a["settle"]
        while len(replies) < n and loop.time() < deadline:
            await asyncio.sleep(0.05)
        t_done = loop.time()
        collector.cancel()
    print(json.dumps({
        "sent": n, "issued_s": t_issued - t0, "acked_s": t_acked - t0,
        "replies_done_s": t_done - t0, "replies": replies,
    }))

asyncio.run(main())
"""


async def test_flood_is_answered_and_the_tick_keeps_its_period(cart: Cart) -> None:
    pw = cart.broker.pki.passwords[OPERATOR]
    async with observing(cart.broker, OPERATOR, [f"{cart.base}/state"]) as obs:
        async with observing(cart.broker, OPERATOR, [cart.reply(OPERATOR, "phase")]) as op:
            for i, action in enumerate(("priming", "perfusion")):
                corr = f"f-{i}".encode()
                await op.client.publish(
                    cart.cmd(OPERATOR, "phase"),
                    command(f"flood-setup-{i}", action=action),
                    qos=1,
                    properties=publish_props(corr),
                )
                answer = await op.first(
                    _with_correlation(corr), REPLY_TIMEOUT_S, f"reply to phase {action}"
                )
                assert answer.json()["status"] == "ok", answer.json()
        before = await fresh_state(obs, cart)
        assert before["phase"] == "perfusion"
        rss_before_kb = vm_rss_kb(cart.daemon.p.pid)
        log_lines_before = len(cart.daemon.log().splitlines())

        args = {
            "port": cart.broker.port,
            "user": OPERATOR,
            "password": pw,
            "ca": str(cart.broker.pki.ca_file),
            "topic": cart.cmd(OPERATOR, "setpoint"),
            "reply_topic": cart.reply(OPERATOR, "setpoint"),
            "fields": {"flow_ml_min": 500.0},  # the current target: within bounds and slew
            "rate": FLOOD_RATE_PER_S,
            "duration": FLOOD_DURATION_S,
            "settle": FLOOD_SETTLE_S,
        }
        flood = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLOOD_SCRIPT,
            json.dumps(args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        out, err = await asyncio.wait_for(
            flood.communicate(), FLOOD_DURATION_S + FLOOD_SETTLE_S + 30
        )
        assert flood.returncode == 0, err.decode()[-3000:]
        result = json.loads(out)
        after = await fresh_state(obs, cart)
        rss_after_kb = vm_rss_kb(cart.daemon.p.pid)
        alarms_seen = sorted(
            {a for m in obs.on(f"{cart.base}/state") for a in m.json()["active_alarms"]}
        )

    sent: int = result["sent"]
    replies: dict[str, list[dict[str, Any]]] = result["replies"]
    rate_per_s = sent / result["acked_s"]
    outcomes: dict[str, int] = {}
    for rs in replies.values():
        for rep in rs:
            key = rep["status"] if rep["reason"] is None else f"{rep['status']}:{rep['reason']}"
            outcomes[key] = outcomes.get(key, 0) + 1
    missing = sent - len(replies)
    report = (
        f"flood: {sent} commands, issued in {result['issued_s']:.2f} s, published (PUBACKed) "
        f"in {result['acked_s']:.2f} s = {rate_per_s:.0f}/s; {len(replies)} answered "
        f"({missing} without a reply) after "
        f"{result['replies_done_s']:.2f} s; outcomes {outcomes}; daemon RSS "
        f"{rss_before_kb / 1024:.1f} -> {rss_after_kb / 1024:.1f} MB; overruns "
        f"{before['timing']['overruns']} -> {after['timing']['overruns']}; "
        f"alarms seen {alarms_seen}"
    )
    print(report)

    assert rate_per_s >= FLOOD_MIN_RATE_PER_S, report
    assert missing == 0, report
    assert all(len(rs) == 1 for rs in replies.values()), report
    # A command that reaches the daemon after its validity (the broker's backlog on a loaded
    # machine) is rightly rejected as expired: never applied late, never left unanswered.
    assert set(outcomes) <= {"ok", "rejected:rate_limited", "rejected:expired"}, report
    # While flooded, the operator still gets RATE_PER_S commands through (no starvation), and
    # the token bucket lets through the burst plus RATE_PER_S per second, no more.
    accepted = outcomes.get("ok", 0)
    assert accepted >= RATE_PER_S * (result["issued_s"] - 1.0), report
    assert accepted <= BURST + RATE_PER_S * result["replies_done_s"] + 1, report

    assert after["timing"]["overruns"] == before["timing"]["overruns"], report
    assert after["timing"]["ticks"] > before["timing"]["ticks"]
    log = cart.daemon.log()
    assert "daemon started" in log
    assert "alarm=tick_overrun" not in log, report
    assert rss_after_kb < RSS_LIMIT_KB, report
    assert rss_after_kb - rss_before_kb <= RSS_GROWTH_LIMIT_KB, report
    assert after["phase"] == "perfusion"
    flood_log = log.splitlines()[log_lines_before:]
    noisiest: dict[str, int] = {}
    for line in flood_log:
        key = re.sub(r"\d+", "N", line[24:])[:70]  # without the timestamp and the numbers
        noisiest[key] = noisiest.get(key, 0) + 1
    top = sorted(noisiest.items(), key=lambda kv: -kv[1])[:3]
    n_lines = len(flood_log)
    assert n_lines <= sent / FLOOD_COMMANDS_PER_LOG_LINE, (
        f"{n_lines} daemon log lines during the flood; most frequent: {top}"
    )
