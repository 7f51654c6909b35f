"""`ilup demo` in a pseudo-terminal: live values within 10 s, and Ctrl-C stops everything in
order (daemon first: pump to zero and heater off)."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import write_cart_config

from ilup_controller.broker import MosquittoProcess

pytestmark = pytest.mark.integration


def _read_until(fd: int, needle: bytes, timeout_s: float, seen: bytearray) -> float:
    start = time.monotonic()
    while needle not in seen:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            raise AssertionError(
                f"{needle!r} not shown within {timeout_s} s:\n"
                + seen.decode(errors="replace")[-3000:]
            )
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return time.monotonic() - start


def demo_in_a_terminal(args: list[str], cwd: Path, timeout_s: float = 10.0) -> None:
    """Run ``args`` (an `ilup demo`) in a pseudo-terminal: live values within ``timeout_s``,
    then Ctrl-C stops the daemon before the simulator and the demo exits 0."""
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    demo = subprocess.Popen(
        args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    seen = bytearray()
    try:
        took = _read_until(master, b"Flow", timeout_s, seen)
        took += _read_until(master, b"state age", timeout_s - took, seen)
        assert b"STALE" not in seen.split(b"state age")[-1][:400]
        # The demo runs the independent safety guard, and the view shows it watching.
        _read_until(master, b"guard: watching", max(timeout_s - took, 3.0), seen)
        # Ctrl-C: the terminal sends SIGINT to its foreground process group, which holds the
        # demo only (its children run in their own sessions, so they are stopped in order).
        demo.send_signal(signal.SIGINT)
        _read_until(master, b"simulator stopped", 20.0, seen)
        assert demo.wait(10) == 0
        text = seen.decode(errors="replace")
        assert text.index("daemon stopped (exit 0)") < text.index("simulator stopped")
        assert text.index("daemon stopped (exit 0)") < text.index("guard stopped (exit 0)")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        os.close(master)


def test_demo_shows_live_values_and_stops_cleanly(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, _ = write_cart_config(tmp_path, mosquitto.port, ramp_s=5.0)
    demo_in_a_terminal(
        [sys.executable, "-m", "ilup_controller", "demo", "-c", str(cfg_path)], tmp_path
    )
    # Nothing left behind: no simulator or daemon of this run still running.
    left = subprocess.run(
        ["pgrep", "-f", str(cfg_path.parent)], capture_output=True, text=True, check=False
    )
    assert left.stdout.strip() == ""
