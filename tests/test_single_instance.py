"""One daemon per cart (issue 10, deliverable 1): real `ilup run` processes on one cart file.

Before the lock a second `ilup run` armed the devices' watchdogs, reopened the first daemon's
live record and connected to the broker with the same client id: the running cart lost its
broker link dozens of times and latched pump_not_following. Now it exits 3 at once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_until
from procs import Proc, Subscriber, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.runtime.lock import AlreadyRunning, cart_lock, lock_paths

pytestmark = pytest.mark.integration

# The second start (interpreter, imports, config, lock, exit) within 2 s; on a loaded machine
# the interpreter alone may take longer, so the budget grows with a bare `ilup --version`.
REFUSE_BUDGET_S = 2.0
REFUSE_OVER_BASELINE_S = 1.5
QUIET_WINDOW_S = 4.0  # after it exited, the first daemon must stay undisturbed


def _records(d: Path) -> list[Path]:
    return sorted(d.glob("*.sqlite"))


def _link_ups(p: Proc) -> int:
    return p.log().count("MQTT link up")


async def test_second_daemon_for_the_same_cart_exits_3_and_disturbs_nothing(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    path, cfg = write_cart_config(tmp_path, mosquitto.port)
    records = Path(cfg.record.directory)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    loop = asyncio.get_running_loop()
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(path)], tmp_path / "sim.log"))
        procs.append(first := Proc(["run", "-c", str(path)], tmp_path / "first.log"))
        await wait_until(
            lambda: any(m.payload.get("phase") == "perfusion" for m in sub.of("/state")),
            30,
            what="the first daemon perfusing",
        )
        await asyncio.sleep(1.0)  # settled at flow: any disturbance would show now
        ups_before = _link_ups(first)
        files_before = _records(records)
        t_second = loop.time()

        started = time.monotonic()
        bare = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "ilup_controller", "--version"], check=True
        )
        baseline_s = time.monotonic() - started
        assert bare.returncode == 0
        budget_s = max(REFUSE_BUDGET_S, baseline_s + REFUSE_OVER_BASELINE_S)

        started = time.monotonic()
        second = Proc(["run", "-c", str(path)], tmp_path / "second.log")
        procs.append(second)
        try:
            rc = await asyncio.to_thread(second.wait, 30)
        finally:
            took_s = time.monotonic() - started
        out = second.log()
        print(
            f"second `ilup run` exited {rc} after {took_s:.2f} s (budget {budget_s:.2f} s; bare "
            f"`ilup --version` {baseline_s:.2f} s): {out.strip()[-300:]}"
        )
        assert rc == 3, out
        assert took_s <= budget_s, took_s
        assert f"PID {first.p.pid}" in out
        assert "already runs this cart" in out
        for touched in ("armed", "MQTT link up", "recording to", "daemon started"):
            assert touched not in out, touched

        await asyncio.sleep(QUIET_WINDOW_S)
        assert first.p.poll() is None, "the first daemon exited"
        assert _link_ups(first) == ups_before == 1
        onsets = [m.payload for m in sub.of("/events", t_second) if m.payload["kind"] == "onset"]
        assert onsets == []
        last_alarms = sub.of("/alarms")[-1].payload["alarms"]
        assert [a["id"] for a in last_alarms] == []
        states = sub.of("/state", t_second)
        assert len(states) >= 4
        assert all(s.payload["phase"] == "perfusion" for s in states)
        assert _records(records) == files_before
        assert len(files_before) == 1
        assert "UNIQUE constraint" not in first.log()


def test_lock_names_the_holder_and_is_released(tmp_path: Path) -> None:
    env = {"ILUP_RUNTIME_DIR": str(tmp_path / "run")}
    with cart_lock("cart_x", tmp_path / "records", env) as held:
        assert held == lock_paths("cart_x", tmp_path / "records", env)
        assert held[0] == tmp_path / "records" / ".cart_x.lock"
        assert held[1] == tmp_path / "run" / "cart_x.lock"
        for p in held:
            assert p.read_text() == f"{os.getpid()}\n"
        # flock locks belong to the open file: a second open, even in this process, is refused.
        with pytest.raises(AlreadyRunning) as e, cart_lock("cart_x", tmp_path / "records", env):
            pass
        assert f"PID {os.getpid()}" in str(e.value)
        # Another record directory, same cart id on this computer: still refused.
        with pytest.raises(AlreadyRunning), cart_lock("cart_x", tmp_path / "elsewhere", env):
            pass
        # Another cart: its own locks.
        with cart_lock("cart_y", tmp_path / "records", env):
            pass
    with cart_lock("cart_x", tmp_path / "records", env):  # released on exit
        pass
