"""A hardened Mosquitto for tests: the committed config/mosquitto/ files on a free loopback port.

``from brokers import make_pki, run_broker, SecureBroker`` (tests/ is on sys.path). The broker
runs config/mosquitto/mosquitto.conf as committed, with only the listener (a free port on
127.0.0.1), the file paths and the log destination replaced. The PKI is throwaway: a CA and a
server certificate made with openssl, and a password file made with mosquitto_passwd.
"""

from __future__ import annotations

import contextlib
import getpass
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from ruamel.yaml import YAML

from ilup_controller.broker import free_port, mosquitto_binary

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "config" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "config" / "mosquitto" / "acl"
V5 = aiomqtt.ProtocolVersion.V5
NOT_AUTHORIZED = 135  # MQTT v5 CONNACK reason code


def tool(name: str) -> str:
    found = mosquitto_binary() if name == "mosquitto" else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: the broker security tests need it", pytrace=False)
    return found


def run_tool(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stderr}"


def make_certificates(d: Path) -> None:
    """A CA, and a server certificate for 127.0.0.1 signed by it (EC P-256, 2 days)."""
    openssl = tool("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run_tool(openssl, "req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
             "-days", "2", "-subj", "/CN=ilup test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run_tool(openssl, "req", "-new", *ec, "-keyout", str(d / "server.key"),
             "-out", str(d / "server.csr"), "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = d / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    run_tool(openssl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.crt"),
             "-days", "2", "-extfile", str(ext))  # fmt: skip


def make_client_certificate(d: Path, user: str) -> tuple[Path, Path]:
    """A client certificate with the username as CN, signed by the test CA (docs/security.md)."""
    openssl = tool("openssl")
    key, csr, crt, ext = (d / f"{user}.{x}" for x in ("key", "csr", "crt", "ext"))
    run_tool(openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={user}")  # fmt: skip
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    run_tool(openssl, "x509", "-req", "-in", str(csr), "-CA", str(d / "ca.crt"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(crt),
             "-days", "2", "-extfile", str(ext))  # fmt: skip
    return crt, key


def derive_conf(
    text: str, port: int, files: dict[str, Path], overrides: dict[str, str] | None = None
) -> str:
    """The committed config with the listener, file paths and log destination replaced.

    Every replaced key must occur exactly once, so a reshaped config breaks the tests loudly
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


def acl_with_users(
    text: str, *, operators: Iterable[str] = (), monitors: Iterable[str] = ()
) -> str:
    """The committed ACL plus one block per new user, copied from the role's example block.

    docs/security.md adds an operator or a monitor by repeating the ``user operator`` or
    ``user monitor`` block under the new name; this does exactly that, so the roles stay the
    committed ones.
    """

    def block(role: str) -> list[str]:
        lines = text.splitlines()
        start = lines.index(f"user {role}")
        body: list[str] = []
        for line in lines[start + 1 :]:
            if not line.startswith("topic "):
                break
            body.append(line)
        assert body, f"the committed ACL has no topic lines for user {role}"
        return body

    extra: list[str] = []
    for role, users in (("operator", operators), ("monitor", monitors)):
        for user in users:
            extra += ["", f"user {user}", *block(role)]
    return text.rstrip("\n") + "\n" + "\n".join(extra) + "\n"


@dataclass(frozen=True)
class Pki:
    """Throwaway CA, server certificate and password file in ``dir``."""

    dir: Path
    passwords: dict[str, str]

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"


def make_pki(d: Path, users: Sequence[str]) -> Pki:
    """Certificates and a password file with a random password for each of ``users``."""
    make_certificates(d)
    # Never a leading "-": `--password -x...` is an option to argparse and to mosquitto_passwd
    # (1 in 64 of these tokens starts with one; a CI run failed on it).
    passwords = {u: "p" + secrets.token_urlsafe(12) for u in users}
    for i, (user, password) in enumerate(passwords.items()):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        run_tool(tool("mosquitto_passwd"), *flags, str(d / "passwd"), user, password)
    return Pki(d, passwords)


@dataclass(frozen=True)
class SecureBroker:
    port: int
    pki: Pki
    log_path: Path

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


@contextlib.contextmanager
def run_broker(
    pki: Pki, overrides: dict[str, str] | None = None, *, acl: Path = ACL
) -> Iterator[SecureBroker]:
    """The committed mosquitto.conf (and by default the committed acl) on a free loopback port,
    stopped on exit."""
    port = free_port()
    files = {
        "password_file": pki.dir / "passwd",
        "acl_file": acl,
        "cafile": pki.ca_file,
        "certfile": pki.dir / "server.crt",
        "keyfile": pki.dir / "server.key",
    }
    conf = pki.dir / f"mosquitto-{port}.conf"
    conf.write_text(derive_conf(CONF.read_text(), port, files, overrides))
    log_path = pki.dir / f"broker-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [tool("mosquitto"), "-c", str(conf)],
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
        yield SecureBroker(port, pki, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def secure_cart(
    tmp_path: Path, b: SecureBroker, daemon_user: str, operators: Mapping[str, str] | None = None
) -> tuple[Path, str]:
    """config/sim.yaml on free device ports, the daemon logged in to ``b`` as ``daemon_user``
    over TLS, no autostart, phases advanced by hand. ``operators`` replaces the simulator's
    allow-list (whose "*" would let every user command). Returns the cart file and its topic
    root."""
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(Path("config/sim.yaml").read_text())
    for dev in data["devices"].values():
        dev["port"] = free_port()
    data["mqtt"].update(
        {
            "port": b.port,
            "username": daemon_user,
            "password": b.pki.passwords[daemon_user],
            "tls": {"ca_file": str(b.pki.ca_file)},
            "keepalive_s": 2,
        }
    )
    data["control"]["autostart"] = False
    data["control"]["flow"]["ramp_s"] = 2.0
    data["procedure"].update({"auto_advance": False})
    data["record"] = {"directory": str(tmp_path / "records")}
    if operators is not None:
        data["operators"] = dict(operators)
    path = tmp_path / "cart.yaml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path, f"{data['mqtt'].get('topic_prefix', 'ilup')}/{data['cart_id']}"
