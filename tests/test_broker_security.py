"""The shipped broker configuration (config/mosquitto/) on a real Mosquitto.

The broker runs config/mosquitto/mosquitto.conf and config/mosquitto/acl as committed, with only
the listener (a free port on 127.0.0.1), the file paths and the log destination replaced. The
test makes a throwaway CA and server certificate with openssl and a password file with
mosquitto_passwd (tests/brokers.py, shared with tests/test_operator_e2e.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from brokers import (
    ACL,
    CONF,
    NOT_AUTHORIZED,
    Pki,
    SecureBroker,
    make_client_certificate,
    make_pki,
    run_broker,
)
from helpers import wait_until

from ilup_controller.broker import broker_answers
from ilup_controller.commands import CommandProcessor, ParsedCommand, split_command_topic
from ilup_controller.config import load_config

REPO = Path(__file__).resolve().parents[1]
SIM = load_config(REPO / "config" / "sim.yaml")
CART = SIM.cart_id
DAEMON, OPERATOR, MONITOR = "ilup-daemon", "operator", "monitor"
DELIVERY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), (DAEMON, OPERATOR, MONITOR))


@pytest.fixture(scope="module")
def secure_broker(pki: Pki) -> Iterator[SecureBroker]:
    with run_broker(pki) as broker:
        yield broker


class Collector:
    """Records every message a connected client receives."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append((m.topic.value, payload))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    def payloads(self) -> list[bytes]:
        return [p for _, p in self.messages]

    async def wait_for(self, payload: bytes) -> None:
        await wait_until(
            lambda: payload in self.payloads(), DELIVERY_TIMEOUT_S, what=f"receipt of {payload!r}"
        )


@contextlib.asynccontextmanager
async def listening(client: aiomqtt.Client, *topics: str) -> AsyncIterator[Collector]:
    async with client:
        for t in topics:
            await client.subscribe(t, qos=1)
        rec = Collector(client)
        rec.start()
        try:
            yield rec
        finally:
            await rec.stop()


# --------------------------------------------------------------------------- static checks


def _active(path: Path) -> list[list[str]]:
    # Mosquitto comments are whole lines starting with '#' ('ilup/#' is a topic, not a comment).
    lines = (ln.split() for ln in path.read_text().splitlines() if not ln.startswith("#"))
    return [ln for ln in lines if ln]


def test_committed_config_is_hardened() -> None:
    conf = _active(CONF)
    keys = [ln[0] for ln in conf]
    assert ["per_listener_settings", "false"] in conf
    assert ["allow_anonymous", "false"] in conf
    assert keys.count("password_file") == 1
    assert keys.count("acl_file") == 1
    listeners = [ln for ln in conf if ln[0] == "listener"]
    assert listeners == [["listener", "8883"]], "exactly one listener, the TLS one"
    after_listener = keys[keys.index("listener") :]
    for key in ("cafile", "certfile", "keyfile", "require_certificate"):
        assert key in after_listener, key
    assert ["require_certificate", "false"] in conf
    # The loopback plain listener exists only as a comment.
    assert "#listener 1883 127.0.0.1" in CONF.read_text()


def test_committed_acl_gives_the_roles() -> None:
    acl = _active(ACL)
    assert ["pattern", "write", "ilup/+/cmd/%u/+"] in acl
    assert not any(ln[0] == "pattern" and ln[1] in ("read", "readwrite") for ln in acl)
    blocks: dict[str, list[list[str]]] = {}
    current: str | None = None
    for ln in acl:
        if ln[0] == "user":
            current = ln[1]
            blocks[current] = []
        elif ln[0] == "topic":
            assert current is not None, f"topic line before any user: {ln}"
            blocks[current].append(ln[1:])
    assert blocks[DAEMON] == [["readwrite", "ilup/#"]]
    assert blocks[OPERATOR] == [["read", "ilup/#"]]
    assert blocks[MONITOR] == [
        ["read", "ilup/#"],
        ["deny", "ilup/+/cmd/+/+"],
        ["deny", "ilup/+/guard/cmd/+/+"],
    ]
    assert ["pattern", "write", "ilup/+/guard/cmd/%u/reset"] in acl
    assert blocks["ilup-guard"] == [["readwrite", "ilup/+/guard/#"], ["read", "ilup/+/state"]]


# --------------------------------------------------------------------------- real broker


async def test_anonymous_and_wrong_password_are_refused(secure_broker: SecureBroker) -> None:
    with pytest.raises(MqttConnectError) as anonymous:
        async with secure_broker.client(None):
            pass
    assert anonymous.value.rc == NOT_AUTHORIZED
    with pytest.raises(MqttConnectError) as wrong:
        async with secure_broker.client(OPERATOR, "not-the-password"):
            pass
    assert wrong.value.rc == NOT_AUTHORIZED
    # The right password works (the refusals above are not a broken broker).
    async with secure_broker.client(OPERATOR):
        pass


async def test_plain_tcp_and_untrusted_ca_are_refused(secure_broker: SecureBroker) -> None:
    # A plain MQTT CONNECT to the TLS port gets no CONNACK.
    assert broker_answers("127.0.0.1", secure_broker.port, timeout_s=1.0) is False
    with pytest.raises(aiomqtt.MqttError):
        async with secure_broker.client(OPERATOR, tls_context=None, timeout=1.0):
            pass
    # A client that does not trust our CA refuses the server's certificate.
    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        async with secure_broker.client(OPERATOR, tls_context=ssl.create_default_context()):
            pass


async def test_only_the_operator_reaches_the_daemon(secure_broker: SecureBroker) -> None:
    cmd_filter = f"ilup/{CART}/cmd/+/+"
    async with (
        listening(secure_broker.client(DAEMON), cmd_filter, f"ilup/{CART}/state") as daemon,
        secure_broker.client(MONITOR) as monitor,
        secure_broker.client(OPERATOR) as operator,
    ):
        # Each refused publish is answered (PUBACK) before the next is sent; the broker then
        # handles the operator's control message after all of them, and delivers to the
        # daemon's session in that order: when the control message has arrived, a refused one
        # that had got through would have arrived before it.
        refused = [
            (monitor, f"ilup/{CART}/cmd/{MONITOR}/phase", b"monitor command"),
            (operator, f"ilup/{CART}/cmd/{MONITOR}/phase", b"operator posing as monitor"),
            (operator, f"ilup/{CART}/cmd/{DAEMON}/phase", b"operator posing as daemon"),
            (operator, f"ilup/{CART}/cmd/{OPERATOR}/phase/extra", b"operator two levels down"),
            (operator, f"ilup/{CART}/state", b"operator writing state"),
            (monitor, f"ilup/{CART}/state", b"monitor writing state"),
        ]
        for client, topic, payload in refused:
            await client.publish(topic, payload, qos=1)
        now = datetime.now(UTC)
        command = (
            b'{"command_id": "c-1", "issued_at": "'
            + now.isoformat().encode()
            + b'", "action": "priming"}'
        )
        await operator.publish(f"ilup/{CART}/cmd/{OPERATOR}/phase", command, qos=1)
        await daemon.wait_for(command)
        assert [p for _, p in daemon.messages] == [command]

    # The daemon takes the sender from the topic level the broker checked.
    topic = daemon.messages[0][0]
    split = split_command_topic(topic, "ilup", CART)
    assert split == (OPERATOR, "phase")
    parsed = CommandProcessor(SIM).parse(split[1], command, now, split[0])
    assert isinstance(parsed, ParsedCommand)
    assert parsed.sender == OPERATOR


async def test_monitor_reads_state_and_replies(secure_broker: SecureBroker) -> None:
    state_topic = f"ilup/{CART}/state"
    reply_topic = f"ilup/{CART}/cmd/{OPERATOR}/phase/reply"
    async with secure_broker.client(DAEMON) as daemon:
        await daemon.publish(state_topic, b'{"state": 1}', qos=1, retain=True)
        try:
            async with listening(secure_broker.client(MONITOR), f"ilup/{CART}/#") as monitor:
                await monitor.wait_for(b'{"state": 1}')  # retained, handed over on subscribe
                await daemon.publish(reply_topic, b'{"reply": 1}', qos=1)
                await monitor.wait_for(b'{"reply": 1}')
                assert (reply_topic, b'{"reply": 1}') in monitor.messages
        finally:
            await daemon.publish(state_topic, b"", qos=1, retain=True)  # clear the retained


async def test_client_certificate_when_required(pki: Pki) -> None:
    crt, key = make_client_certificate(pki.dir, OPERATOR)
    with run_broker(pki, {"require_certificate": "true"}) as broker:
        # A password alone is no longer enough...
        with pytest.raises(aiomqtt.MqttError):
            async with broker.client(OPERATOR, timeout=1.0):
                pass
        # ...with the certificate the same login works, and a wrong password still fails.
        with_cert = broker.tls()
        with_cert.load_cert_chain(str(crt), str(key))
        async with broker.client(OPERATOR, tls_context=with_cert):
            pass
        with pytest.raises(MqttConnectError) as wrong:
            async with broker.client(OPERATOR, "not-the-password", tls_context=with_cert):
                pass
        assert wrong.value.rc == NOT_AUTHORIZED
