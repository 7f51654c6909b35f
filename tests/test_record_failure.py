"""Commands while the procedure record cannot be written (issue 8, defect 5), real processes.

The daemon (``ilup run``) fills its disk: ``RLIMIT_FSIZE`` is lowered on the running process, so
every write to a file fails with EFBIG, for root too, as on a full filesystem. Its output goes
to a pipe, which the limit does not touch. Commands that change therapy are then rejected
``recorder_failed`` and change nothing; acknowledge, audio pause, markers and safe-stop are
still answered ok (their reply says the record is failing) and safe-stop stops the pump.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from helpers import wait_until
from procs import Proc, Subscriber, read_signal, session, write_cart_config

from ilup_controller.broker import MosquittoProcess

pytestmark = pytest.mark.integration


class PipedDaemon:
    """``ilup run`` with its output through a pipe (copied to a file by this process), so a
    file-size limit on the daemon fails its record but not its log."""

    def __init__(self, cfg_path: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.p = subprocess.Popen(
            [sys.executable, "-m", "ilup_controller", "run", "-c", str(cfg_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._copier = threading.Thread(target=self._copy, daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        assert self.p.stdout is not None
        with self.log_path.open("ab") as f:
            for line in self.p.stdout:
                f.write(line)
                f.flush()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fill_disk(self) -> None:
        """Every write by the daemon to a file beyond byte 1 now fails (EFBIG)."""
        resource.prlimit(self.p.pid, resource.RLIMIT_FSIZE, (1, 1))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._copier.join(5)


@contextlib.contextmanager
def piped_daemon(cfg_path: Path, log_path: Path) -> Iterator[PipedDaemon]:
    d = PipedDaemon(cfg_path, log_path)
    try:
        yield d
    except BaseException:
        print(f"---- {log_path.name} ----\n{d.log()[-6000:]}")
        raise
    finally:
        d.stop()


async def command(port: int, prefix: str, name: str, **fields: Any) -> dict[str, Any]:
    cid = uuid.uuid4().hex[:12]
    topic = f"{prefix}/cmd/op1/{name}"
    async with aiomqtt.Client("127.0.0.1", port, timeout=5) as client:
        await client.subscribe(f"{topic}/reply", qos=1)
        body = {"command_id": cid, "issued_at": datetime.now(UTC).isoformat(), **fields}
        await client.publish(topic, json.dumps(body), qos=1)
        async with asyncio.timeout(10):
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                reply: dict[str, Any] = json.loads(m.payload)
                if reply["command_id"] == cid:
                    return reply
    raise AssertionError("unreachable")


async def test_therapy_commands_are_rejected_while_the_record_cannot_be_written(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    port = mosquitto.port
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(port, f"{prefix}/#")
    loop = asyncio.get_running_loop()

    def latest_state() -> dict[str, Any]:
        return sub.of("/state")[-1].payload

    def recorder_alarm() -> bool:
        return any(
            a["id"] == "recorder" for m in sub.of("/alarms")[-1:] for a in m.payload["alarms"]
        )

    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        with piped_daemon(cfg_path, tmp_path / "daemon.log") as daemon:
            await wait_until(
                lambda: bool(sub.of("/state")) and latest_state()["phase"] == "perfusion",
                30,
                what="perfusion",
            )
            # The record works: a setpoint is applied.
            ok = await command(port, prefix, "setpoint", flow_ml_min=450.0)
            assert (ok["status"], ok["reason"]) == ("ok", None), ok
            assert "NOT RECORDED" not in ok["detail"]

            daemon.fill_disk()
            await wait_until(recorder_alarm, 15, what="recorder alarm")

            # Therapy-changing commands: rejected, nothing changes.
            therapy: list[tuple[str, dict[str, Any]]] = [
                ("setpoint", {"flow_ml_min": 480.0}),
                ("setpoint", {"temperature_c": 37.5}),
                ("mode", {"control": "flow", "output_mode": "manual", "pump_speed_rpm": 20.0}),
                ("phase", {"action": "washout"}),
                ("alarm", {"action": "reset", "alarm_id": "recorder"}),
            ]
            for name, fields in therapy:
                reply = await command(port, prefix, name, **fields)
                assert (reply["status"], reply["reason"]) == ("rejected", "recorder_failed"), reply
                assert "record" in reply["detail"], reply
            t_after = loop.time()
            await wait_until(lambda: bool(sub.of("/state", t_after)), 5, what="fresh state")
            state = latest_state()
            assert state["targets"]["flow_ml_min"] == 450.0
            assert state["targets"]["temperature_c"] == 37.0
            assert state["phase"] == "perfusion"
            assert state["outputs"]["pump_speed_rpm"] > 5.0  # still perfusing: not stopped by us

            # Still possible, answered ok, and the reply says the record is failing.
            allowed: list[tuple[str, dict[str, Any]]] = [
                ("alarm", {"action": "acknowledge", "alarm_id": "recorder"}),
                ("alarm", {"action": "pause_audio"}),
                ("marker", {"text": "disk full noticed"}),
                ("phase", {"action": "safe_stop"}),
            ]
            for name, fields in allowed:
                reply = await command(port, prefix, name, **fields)
                assert (reply["status"], reply["reason"]) == ("ok", None), reply
                assert "NOT RECORDED" in reply["detail"], reply

            # Safe-stop took effect: the pump is stopped at the drive itself.
            t_stop = loop.time()
            await wait_until(
                lambda: any(
                    m.payload["phase"] == "safe_stop"
                    and m.payload["outputs"]["pump_speed_rpm"] == 0.0
                    for m in sub.of("/state", t_stop)
                ),
                10,
                what="safe_stop with the pump at 0",
            )
            pump_rpm = await read_signal(cfg, ports, cfg.control.flow.command)
            assert pump_rpm == 0.0
            # Resume out of safe-stop is therapy too: refused while the record fails.
            resume = await command(port, prefix, "phase", action="resume")
            assert (resume["status"], resume["reason"]) == ("rejected", "recorder_failed")
            assert latest_state()["phase"] == "safe_stop"
