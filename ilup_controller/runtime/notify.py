"""systemd's sd_notify protocol, with the standard library: READY, WATCHDOG, STATUS, STOPPING.

One datagram per message to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
names the abstract namespace). Without ``$NOTIFY_SOCKET`` (not started by systemd) every call
is a no-op. Sending never blocks the control tick: the socket is non-blocking, and a failed
send is dropped and logged once per kind of error (systemd, seeing no ping, is the safe side).

The watchdog ping proves that *control* is alive, not merely the process: :meth:`tick` is called
by the control loop after each tick, and pings only when every tick since the previous ping came
on time (no gap between ticks longer than ``max_gap_s``). A hung or crashed control task, or one
starved for long, stops the pings, and systemd kills and restarts the daemon after
``WatchdogSec=`` (the devices' own watchdogs have already stopped pump and heater by then).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("ilup.notify")

# Pings per WatchdogSec: with 4, one late window still leaves a ping within WatchdogSec/2.
PINGS_PER_WATCHDOG = 4


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):  # abstract namespace: a leading NUL byte
        return b"\0" + raw[1:].encode()
    return raw


def watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """The watchdog timeout systemd asks for (``$WATCHDOG_USEC``), None when off or not ours."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):  # meant for another process (sd_watchdog_enabled)
        return None
    return int(usec) / 1e6


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = _address(raw) if raw else None
        self._sock: socket.socket | None = None
        self.watchdog_s = watchdog_interval_s(env) if raw else None
        self._failed: set[str] = set()
        self.sent = 0
        self.ready = False
        self._status = ""
        # Watchdog bookkeeping, all on the caller's monotonic clock.
        self._last_ping_s: float | None = None
        self._last_tick_s: float | None = None
        self._window_on_time = True

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=value`` lines; False if not sent (never raises, never waits)."""
        if self._addr is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as e:
            kind = type(e).__name__
            if kind not in self._failed:  # once per kind: a tick-rate log flood helps nobody
                self._failed.add(kind)
                log.error("sd_notify to %r failed: %s (not logged again)", self._addr, e)
            return False
        self.sent += 1
        return True

    def notify_ready(self, status: str) -> None:
        """After the device watchdogs are armed and the first tick ran."""
        self.ready = True
        self._status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """STATUS= when it changed (phase, alarm count)."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def tick(self, now_s: float, max_gap_s: float) -> None:
        """Called by the control loop after every tick: WATCHDOG=1 at most every
        WatchdogSec/4, only when every tick since the previous ping was on time."""
        last = self._last_tick_s
        self._last_tick_s = now_s
        if last is not None and now_s - last > max_gap_s:
            self._window_on_time = False
        if self.watchdog_s is None or not self.ready:
            return
        if self._last_ping_s is None:
            self._last_ping_s = now_s  # READY=1 counts as the first sign of life
            return
        if now_s - self._last_ping_s < self.watchdog_s / PINGS_PER_WATCHDOG:
            return
        if self._window_on_time:
            self.send("WATCHDOG=1")
        else:
            log.warning("control ticks were late: watchdog ping withheld for this window")
        self._last_ping_s = now_s
        self._window_on_time = True

    def stopping(self, status: str = "stopping: driving actuators safe") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
