"""MQTT brokers for tests and for ``ilup demo``: find one, or start one on loopback.

``MosquittoProcess`` runs a real mosquitto with its own temporary configuration. Tests use it and
CI installs mosquitto. ``EmbeddedBroker`` runs amqtt in a child process, and only the demo uses it
as a fallback. amqtt speaks MQTT 3.1.1 only (libraries.md 6).
``python -m ilup_controller.broker --embedded --port N`` is that child process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Protocol, Self

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_STOP_TIMEOUT_S = 3.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that the OS does not hand out by itself.

    A port from ``bind(port 0)`` lies in the ephemeral range, where any outgoing connection may
    take it before our server binds it: a test's simulator once failed "Address already in use".
    So the port is drawn below that range, never twice in one process, and checked by binding.
    """
    below = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(_PICK_FROM, below)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded machine: the OS's
        s.bind((LOOPBACK, 0))
        picked: int = s.getsockname()[1]
        return picked


_PICK_FROM = 20000  # above registered services (PostgreSQL 5432, Redis 6379, MQTT 1883/8883)
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return max(low, _PICK_FROM + 1000)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def mosquitto_binary() -> str | None:
    """Path of the mosquitto broker, or None. Debian installs it in /usr/sbin, often not on PATH."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    fallback = Path("/usr/sbin/mosquitto")
    return str(fallback) if fallback.is_file() and os.access(fallback, os.X_OK) else None


# --------------------------------------------------------------------------- probing


def _connect_packet(protocol_level: int, client_id: str) -> bytes:
    """A minimal MQTT CONNECT: clean session, keepalive 10 s, no credentials."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([protocol_level, 0x02]) + struct.pack("!H", 10)
    if protocol_level == 5:
        variable += b"\x00"  # no CONNECT properties
    payload = struct.pack("!H", len(cid)) + cid
    body = variable + payload
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed before CONNACK")
        data += chunk
    return data


def _handshake(host: str, port: int, protocol_level: int, timeout_s: float) -> bool:
    """True when the server at host:port accepts an anonymous MQTT CONNECT at this level."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_connect_packet(protocol_level, f"ilup-probe-{os.getpid()}"))
            header = _recv_exactly(sock, 2)
            if header[0] != 0x20 or header[1] & 0x80:
                return False  # not a CONNACK (or a long one no broker sends here)
            body = _recv_exactly(sock, header[1])
            accepted = len(body) >= 2 and body[1] == 0x00  # v3.1.1 return code / v5 reason code
            if accepted:
                sock.sendall(b"\xe0\x00" if protocol_level != 5 else b"\xe0\x01\x00")  # DISCONNECT
            return accepted
    except OSError:
        return False


def broker_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when an MQTT broker at host:port accepts an anonymous MQTT 3.1.1 connection.

    Does a real CONNECT/CONNACK exchange, because an open TCP port alone proves nothing.
    """
    return _handshake(host, port, 4, timeout_s)


def _port_accepts_tcp(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- broker processes


class BrokerHandle(Protocol):
    port: int

    def stop(self) -> None: ...


class _BrokerProcess:
    """A broker child process on 127.0.0.1:<port> with its own temporary directory."""

    name = "broker"
    # A child that reads stdin gets EOF when this process dies and can exit by itself.
    _stdin_pipe = False

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._log_file: IO[bytes] | None = None

    def _command(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log_text(self) -> str:
        """What the broker printed so far (for failure messages)."""
        if self._dir is None:
            return ""
        path = self._dir / "broker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout_s: float = 5.0) -> None:
        """Start the broker and wait until its port accepts TCP. Restartable after stop()."""
        if self.running:
            raise RuntimeError(f"{self.name} on port {self.port} is already running")
        self._cleanup()
        if _port_accepts_tcp(LOOPBACK, self.port):
            raise RuntimeError(
                f"{LOOPBACK}:{self.port} is already in use; cannot start {self.name}"
            )
        self._dir = Path(tempfile.mkdtemp(prefix=f"ilup-{self.name}-"))
        try:
            command = self._command(self._dir)
            self._log_file = (self._dir / "broker.log").open("wb")
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE if self._stdin_pipe else subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        except BaseException:
            self._proc = None
            self._cleanup()
            raise
        deadline_s = time.monotonic() + timeout_s
        while not _port_accepts_tcp(LOOPBACK, self.port):
            if self._proc.poll() is not None:
                text = self.log_text()
                self._cleanup()
                raise RuntimeError(
                    f"{self.name} exited with code {self._proc.returncode} before listening on "
                    f"{LOOPBACK}:{self.port}:\n{text}"
                )
            if time.monotonic() > deadline_s:
                text = self.log_text()
                self.kill()
                raise RuntimeError(
                    f"{self.name} did not listen on {LOOPBACK}:{self.port} "
                    f"within {timeout_s} s:\n{text}"
                )
            time.sleep(0.02)
        log.debug("%s listening on %s:%d (pid %d)", self.name, LOOPBACK, self.port, self._proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after a few seconds; waits for it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL: connections are reset without a clean goodbye."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def pause(self) -> None:
        """SIGSTOP: the broker hangs with its sockets open (a hung broker)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def _cleanup(self) -> None:
        if (
            self._proc is not None
            and self._proc.stdin is not None
            and self._proc.poll() is not None
        ):
            self._proc.stdin.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._dir is not None and (self._proc is None or self._proc.poll() is not None):
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class MosquittoProcess(_BrokerProcess):
    """A real mosquitto on 127.0.0.1:<port>: anonymous, no persistence, its own config file."""

    name = "mosquitto"

    def __init__(self, port: int | None = None, extra_conf: str = "") -> None:
        super().__init__(port)
        self.extra_conf = extra_conf

    def _command(self, workdir: Path) -> list[str]:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError(
                "mosquitto is not installed (apt-get install mosquitto); "
                "it is needed for the MQTT tests and, without amqtt, for the demo"
            )
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            f"{self.extra_conf}\n"
        )
        return [binary, "-c", str(conf)]


class EmbeddedBroker(_BrokerProcess):
    """amqtt in a child process (MQTT 3.1.1 only): the demo's last resort without mosquitto."""

    name = "amqtt"
    _stdin_pipe = True  # the child exits when we die, even without stop()

    def __init__(self, port: int | None = None) -> None:
        if importlib.util.find_spec("amqtt") is None:
            raise RuntimeError(
                "the embedded MQTT broker needs the 'amqtt' package, which is not installed: "
                "pip install 'ilup-controller[demo]' (or install mosquitto)"
            )
        super().__init__(port)

    def _command(self, workdir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ilup_controller.broker",
            "--embedded",
            "--port",
            str(self.port),
        ]


def ensure_broker(
    preferred_host: str = LOOPBACK, preferred_port: int = 1883
) -> tuple[str, int, BrokerHandle | None, Literal["5", "3.1.1"]]:
    """A broker for the demo: (host, port, handle to stop or None, MQTT protocol to use).

    Uses a broker that already answers at preferred_host:preferred_port. Otherwise starts
    mosquitto, on the preferred port if it is free, else on a free one. Without mosquitto it
    starts amqtt, which speaks MQTT 3.1.1 only.
    """
    if broker_answers(preferred_host, preferred_port):
        protocol: Literal["5", "3.1.1"] = (
            "5" if _handshake(preferred_host, preferred_port, 5, 0.5) else "3.1.1"
        )
        log.info(
            "Using the MQTT broker at %s:%d (MQTT %s)", preferred_host, preferred_port, protocol
        )
        return preferred_host, preferred_port, None, protocol
    port = preferred_port if _port_bindable(preferred_port) else free_port()
    if mosquitto_binary() is not None:
        mosquitto = MosquittoProcess(port)
        mosquitto.start()
        log.info("Started mosquitto on %s:%d (pid %s)", LOOPBACK, port, mosquitto.pid)
        return LOOPBACK, port, mosquitto, "5"
    embedded = EmbeddedBroker(port)  # raises a clear RuntimeError without amqtt
    embedded.start()
    log.info("Started the embedded amqtt broker on %s:%d (MQTT 3.1.1 only)", LOOPBACK, port)
    return LOOPBACK, port, embedded, "3.1.1"


# --------------------------------------------------------------------------- amqtt child process


async def _serve_embedded(port: int) -> None:
    from amqtt.broker import Broker  # optional dependency: imported only in the child

    broker = Broker(
        {
            # Explicit loopback bind: amqtt's packaged default listens on 0.0.0.0:1883.
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def parent_gone() -> None:
        # EOF on the pipe from the parent: it died without stopping us; do not linger.
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    if not sys.stdin.isatty():
        loop.add_reader(sys.stdin.fileno(), parent_gone)
    await broker.start()
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an MQTT broker on 127.0.0.1 (test/demo aid).")
    parser.add_argument("--embedded", action="store_true", help="run amqtt (MQTT 3.1.1 only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)  # amqtt's state machine chatter
    port = args.port if args.port is not None else free_port()
    if args.embedded:
        asyncio.run(_serve_embedded(port))
        return 0
    with MosquittoProcess(port) as mosquitto:
        print(f"mosquitto on {LOOPBACK}:{mosquitto.port}; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while mosquitto.running:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
