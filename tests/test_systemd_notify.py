"""systemd supervision (issue 10, deliverable 2): the sd_notify protocol over a datagram socket
the test binds, as systemd would. READY=1 once the device watchdogs are armed and the first tick
ran; WATCHDOG=1 from the control loop only, so a stalled tick stops the pings while the rest of
the process runs on; STATUS= with phase and alarms; STOPPING=1 at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import wait_until
from procs import Proc, processes, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.runtime.daemon import Daemon
from ilup_controller.runtime.notify import Notifier

WATCHDOG_S = 2.0  # WatchdogSec= in the real-process test: a ping every 0.5 s


@dataclass
class NotifySocket:
    """What systemd's end of $NOTIFY_SOCKET receives: (loop time, datagram text)."""

    name: str = field(default_factory=lambda: f"@ilup-test-{secrets.token_hex(8)}")
    messages: list[tuple[float, str]] = field(default_factory=list)

    def with_field(self, prefix: str, since_s: float = 0.0) -> list[tuple[float, str]]:
        return [
            (t, m)
            for t, m in self.messages
            if t >= since_s and any(line.startswith(prefix) for line in m.splitlines())
        ]

    def first(self, prefix: str) -> float | None:
        found = self.with_field(prefix)
        return found[0][0] if found else None


@contextlib.asynccontextmanager
async def notify_socket() -> AsyncIterator[NotifySocket]:
    ns = NotifySocket()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + ns.name[1:].encode())  # abstract namespace, as '@' in NOTIFY_SOCKET
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def receive() -> None:
        while True:
            data = await loop.sock_recv(sock, 4096)
            ns.messages.append((loop.time(), data.decode()))

    task = asyncio.create_task(receive())
    try:
        yield ns
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.integration
async def test_ilup_run_reports_ready_pings_status_and_stopping(
    tmp_path: Path, mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = write_cart_config(tmp_path, mosquitto.port)
    loop = asyncio.get_running_loop()
    async with notify_socket() as ns, session() as procs:
        procs.append(Proc(["sim", "-c", str(path)], tmp_path / "sim.log"))
        monkeypatch.setenv("NOTIFY_SOCKET", ns.name)  # the daemon only, as systemd does
        monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
        started = loop.time()
        procs.append(daemon := Proc(["run", "-c", str(path)], tmp_path / "daemon.log"))
        await wait_until(lambda: ns.first("READY=1") is not None, 30, 0.02, "READY=1")
        log_at_ready = daemon.log()
        ready_t = ns.first("READY=1")
        assert ready_t is not None
        ready_msg = ns.with_field("READY=1")[0][1]
        print(f"READY=1 {ready_t - started:.2f} s after start: {ready_msg!r}")
        # Armed first (both devices), then the first tick, then READY.
        assert log_at_ready.count(") armed: ") == 2, log_at_ready
        assert "daemon started" in log_at_ready
        assert all(t >= ready_t for t, _ in ns.with_field("WATCHDOG=1"))
        assert "STATUS=phase " in ready_msg
        assert f"MAINPID={daemon.p.pid}" in ready_msg

        await wait_until(
            lambda: bool(ns.with_field("STATUS=phase perfusion")), 30, 0.05, "STATUS perfusion"
        )
        window_start = loop.time()
        await asyncio.sleep(4.0)
        pings = [t for t, _ in ns.with_field("WATCHDOG=1", window_start)]
        gaps = _gaps(pings)
        print(
            f"{len(pings)} WATCHDOG=1 in 4.0 s (WatchdogSec {WATCHDOG_S:g} s); gaps "
            f"{min(gaps):.2f}..{max(gaps):.2f} s"
        )
        assert 6 <= len(pings) <= 9  # every WatchdogSec/4 = 0.5 s
        assert max(gaps) < WATCHDOG_S / 2
        assert min(gaps) >= WATCHDOG_S / 4 - 0.15  # the loop's clock vs the receiver's

        daemon.signal(signal.SIGTERM)
        rc = await asyncio.to_thread(daemon.wait, 20)
        assert rc == 0, daemon.log()[-2000:]
        stopping = ns.with_field("STOPPING=1")
        assert len(stopping) == 1
        assert all(t <= stopping[0][0] for t, _ in ns.with_field("WATCHDOG=1"))
        assert len(ns.with_field("READY=1")) == 1


@pytest.mark.integration
async def test_pings_stop_when_the_tick_stops_while_the_process_lives_on(
    tmp_path: Path, mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control task hangs (its ticker never yields again) while the event loop, the MQTT
    link and the device links run on: an independent timer would keep pinging; ours stops."""
    path, cfg = write_cart_config(tmp_path, mosquitto.port)
    watchdog_s = 1.0
    loop = asyncio.get_running_loop()
    async with notify_socket() as ns:
        monkeypatch.setenv("NOTIFY_SOCKET", ns.name)
        monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog_s * 1e6)))
        daemon = Daemon(cfg)
        assert daemon.notify.watchdog_s == watchdog_s
        hang = asyncio.Event()
        real_ticks = daemon.ticker.ticks

        async def ticks() -> AsyncIterator[float]:
            async for t in real_ticks():
                if hang.is_set():
                    await asyncio.Event().wait()  # the control task hangs here, forever
                yield t

        monkeypatch.setattr(daemon.ticker, "ticks", ticks)
        stop = asyncio.Event()
        with processes() as procs:
            procs.append(Proc(["sim", "-c", str(path)], tmp_path / "sim.log"))
            run = asyncio.create_task(daemon.run(stop))
            try:
                await wait_until(lambda: len(ns.with_field("WATCHDOG=1")) >= 3, 30, 0.02, "pings")
                assert daemon.mqtt is not None
                await wait_until(lambda: daemon.mqtt is not None and daemon.mqtt.connected, 10)
                hang.set()
                hung_at = loop.time()
                ticks_at_hang = daemon.ticker.stats.ticks
                await asyncio.sleep(3 * watchdog_s)
                late = ns.with_field("WATCHDOG=1", hung_at + 0.05)
                print(
                    f"pings before the hang: {len(ns.with_field('WATCHDOG=1'))}; after it, in "
                    f"{3 * watchdog_s:g} s: {len(late)}"
                )
                assert late == []
                assert daemon.ticker.stats.ticks - ticks_at_hang <= 1
                assert not run.done()  # the process and its other tasks are alive
                assert daemon.mqtt.connected
            finally:
                stop.set()
                await asyncio.wait_for(run, 20)
        assert len(ns.with_field("STOPPING=1")) == 1


def test_a_late_window_withholds_its_ping_and_the_next_one_pings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Notifier.tick on an explicit clock: 0.1 s ticks, WatchdogSec 2 s (ping every 0.5 s),
    a 1.2 s stall (gap limit 0.75 s) between t=3.0 and t=4.2."""
    sent: list[tuple[float, str]] = []
    n = Notifier({"NOTIFY_SOCKET": "@unused", "WATCHDOG_USEC": "2000000"})
    now = [0.0]

    def record(*fields: str) -> bool:
        sent.extend((now[0], f) for f in fields)
        return True

    n.send = record  # type: ignore[method-assign]
    times = [round(0.1 * k, 1) for k in range(31)] + [round(4.2 + 0.1 * k, 1) for k in range(30)]
    for i, t in enumerate(times):
        now[0] = t
        if i == 0:
            n.notify_ready("phase idle")
        n.tick(t, max_gap_s=0.75)
    pings = [t for t, f in sent if f == "WATCHDOG=1"]
    assert pings[:6] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    # 4.2: the first tick after the stall ends the window that holds the gap: no ping.
    assert 4.2 not in pings
    assert pings[6] == 4.7
    assert max(_gaps(pings)) <= 2.0 / 2 + 0.75
    assert "watchdog ping withheld" in caplog.text


def test_no_notify_socket_is_a_no_op_and_send_errors_are_logged_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.notify_ready("x")
    for k in range(10):
        quiet.tick(0.1 * k, 1.0)
    quiet.stopping()
    assert quiet.sent == 0
    # A socket nobody listens on: the tick goes on, one error line.
    caplog.set_level(logging.ERROR, logger="ilup.notify")
    broken = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock"), "WATCHDOG_USEC": "1"})
    for _ in range(50):
        assert broken.send("WATCHDOG=1") is False
    assert caplog.text.count("sd_notify") == 1
    # WATCHDOG_PID of another process: its watchdog, not ours.
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None
