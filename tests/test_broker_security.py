"""The shipped broker configuration (config/mosquitto/) on a real Mosquitto.

The broker runs config/mosquitto/mosquitto.conf and config/mosquitto/acl as committed, with only
the listener (a free port on 127.0.0.1), the file paths and the log destination replaced. The
test makes a throwaway CA and server certificate with openssl and a password file with
mosquitto_passwd.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from helpers import wait_until

from ilup_controller.broker import broker_answers, free_port, mosquitto_binary
from ilup_controller.commands import CommandProcessor, ParsedCommand, split_command_topic
from ilup_controller.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "config" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "config" / "mosquitto" / "acl"
SIM = load_config(REPO / "config" / "sim.yaml")
CART = SIM.cart_id
DAEMON, OPERATOR, MONITOR = "ilup-daemon", "operator", "monitor"
DELIVERY_TIMEOUT_S = 3.0
V5 = aiomqtt.ProtocolVersion.V5
NOT_AUTHORIZED = 135  # MQTT v5 CONNACK reason code


def _tool(name: str) -> str:
    found = mosquitto_binary() if name == "mosquitto" else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: the broker security tests need it", pytrace=False)
    return found


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr}"


def make_certificates(d: Path) -> None:
    """A CA, and a server certificate for 127.0.0.1 signed by it (EC P-256, 2 days)."""
    openssl = _tool("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(openssl, "req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
         "-days", "2", "-subj", "/CN=ilup test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    _run(openssl, "req", "-new", *ec, "-keyout", str(d / "server.key"),
         "-out", str(d / "server.csr"), "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = d / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _run(openssl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
         "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.crt"),
         "-days", "2", "-extfile", str(ext))  # fmt: skip


def make_client_certificate(d: Path, user: str) -> tuple[Path, Path]:
    """A client certificate with the username as CN, signed by the test CA (docs/security.md)."""
    openssl = _tool("openssl")
    key, csr, crt, ext = (d / f"{user}.{x}" for x in ("key", "csr", "crt", "ext"))
    _run(openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={user}")  # fmt: skip
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    _run(openssl, "x509", "-req", "-in", str(csr), "-CA", str(d / "ca.crt"),
         "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(crt),
         "-days", "2", "-extfile", str(ext))  # fmt: skip
    return crt, key


def derive_conf(
    text: str, port: int, files: dict[str, Path], overrides: dict[str, str] | None = None
) -> str:
    """The committed config with the listener, file paths and log destination replaced.

    Every replaced key must occur exactly once, so a reshaped config breaks this test loudly
    rather than running something else than what ships.
    """
    replace = {
        "listener": f"{port} 127.0.0.1",
        "log_dest": "stdout",
        **{key: str(path) for key, path in files.items()},
        **(overrides or {}),
    }
    seen = dict.fromkeys(replace, 0)
    out: list[str] = []
    for line in text.splitlines():
        key = line.split(" ", 1)[0]
        if key in replace:
            seen[key] += 1
            line = f"{key} {replace[key]}"
        out.append(line)
    assert seen == dict.fromkeys(replace, 1), f"keys to replace not found once each: {seen}"
    # Started as root, mosquitto drops to user 'mosquitto', which cannot read our 0600 key.
    out.append(f"user {getpass.getuser()}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Pki:
    """Throwaway CA, server certificate and password file in ``dir``."""

    dir: Path
    passwords: dict[str, str]

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"


@dataclass(frozen=True)
class SecureBroker:
    port: int
    pki: Pki

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_file))

    def client(self, user: str | None, password: str | None = None, **kw: object) -> aiomqtt.Client:
        if user is not None and password is None:
            password = self.pki.passwords[user]
        options: dict[str, object] = {"tls_context": self.tls(), "timeout": 3.0, **kw}
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=user,
            password=password,
            protocol=V5,
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    make_certificates(d)
    passwords = {u: secrets.token_urlsafe(12) for u in (DAEMON, OPERATOR, MONITOR)}
    first = True
    for user, password in passwords.items():
        flags = ["-b", "-c"] if first else ["-b"]
        _run(_tool("mosquitto_passwd"), *flags, str(d / "passwd"), user, password)
        first = False
    return Pki(d, passwords)


@contextlib.contextmanager
def run_broker(pki: Pki, overrides: dict[str, str] | None = None) -> Iterator[SecureBroker]:
    """The committed mosquitto.conf and acl on a free loopback port, stopped on exit."""
    port = free_port()
    files = {
        "password_file": pki.dir / "passwd",
        "acl_file": ACL,  # the committed ACL, unchanged
        "cafile": pki.ca_file,
        "certfile": pki.dir / "server.crt",
        "keyfile": pki.dir / "server.key",
    }
    conf = pki.dir / f"mosquitto-{port}.conf"
    conf.write_text(derive_conf(CONF.read_text(), port, files, overrides))
    log_path = pki.dir / f"broker-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [_tool("mosquitto"), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline_s = time.monotonic() + 5.0
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline_s:
                pytest.fail(f"mosquitto did not start:\n{log_path.read_text()}", pytrace=False)
            time.sleep(0.02)
        yield SecureBroker(port, pki)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    assert blocks[MONITOR] == [["read", "ilup/#"], ["deny", "ilup/+/cmd/+/+"]]


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
