"""Crash safety of the procedure record and restart recovery, with real processes: the daemon is
killed with SIGKILL at random moments while an operator sends commands; after every kill the
record is intact, holds every command the operator saw acknowledged, misses at most the last
second of samples, and the restarted daemon comes up in the safe state with the restart alarm."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from helpers import wait_until
from procs import Proc, Subscriber, read_signal, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.record.chain import verify_record
from ilup_controller.record.store import open_record

pytestmark = pytest.mark.integration

KILLS = 20


async def _operator(port: int, prefix: str, acked: list[str], stop: asyncio.Event) -> None:
    """Sends markers and keeps the ids the daemon acknowledged with ok."""
    base = f"{prefix}/cmd/op1/marker"
    while not stop.is_set():
        try:
            async with aiomqtt.Client("127.0.0.1", port, timeout=2) as client:
                await client.subscribe(f"{base}/reply", qos=1)

                async def replies() -> None:
                    async for m in client.messages:
                        assert isinstance(m.payload, bytes)
                        reply = json.loads(m.payload)
                        if reply["status"] == "ok":
                            acked.append(reply["command_id"])

                reader = asyncio.create_task(replies())
                try:
                    while not stop.is_set():
                        cid = uuid.uuid4().hex
                        body = {
                            "command_id": cid,
                            "issued_at": datetime.now(UTC).isoformat(),
                            "text": f"marker {cid[:6]}",
                        }
                        await client.publish(base, json.dumps(body), qos=1)
                        await asyncio.sleep(0.05)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await reader
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)


async def test_kill_9_at_random_moments(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    rng = random.Random(7)
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    loop = asyncio.get_running_loop()
    acked: list[str] = []
    stop_ops = asyncio.Event()
    ops = asyncio.create_task(_operator(mosquitto.port, prefix, acked, stop_ops))
    records = tmp_path / "records"
    try:
        async with session(sub) as procs:
            procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
            for k in range(KILLS):
                started = loop.time()
                daemon = Proc(["run", "-c", str(cfg_path)], tmp_path / f"daemon{k}.log")
                procs.append(daemon)
                await wait_until(
                    lambda s=started: bool(sub.of("/state", s)),
                    15,
                    what=f"daemon {k} publishing state",
                )
                if k > 0:
                    # Restarted: safe state, restart alarm, same record continued.
                    def restart_alarm(s: float = started) -> bool:
                        return any(
                            a["id"] == "controller_restarted"
                            for m in sub.of("/alarms", s)
                            for a in m.payload["alarms"]
                        )

                    await wait_until(restart_alarm, 5, what="controller_restarted alarm")
                    state = sub.of("/state", started)[-1].payload
                    assert state["phase"] == "safe_stop", state["phase"]
                    assert state["outputs"]["pump_speed_rpm"] == 0.0
                    assert state["outputs"]["heater_pct"] == 0.0
                    assert await read_signal(cfg, ports, cfg.control.flow.command) == 0.0
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                acked_before_kill = list(acked)
                daemon.signal(signal.SIGKILL)
                await asyncio.to_thread(daemon.wait, 5)
                killed_at = datetime.now(UTC)
                files = sorted(records.glob("*.sqlite"))
                assert len(files) == 1, files  # one procedure, one file, reopened each time
                data = open_record(files[0])  # raises unless PRAGMA integrity_check is ok
                assert data.integrity == "ok"
                # Killed each time: the chain, continued across restarts, is whole but unsealed.
                chain = verify_record(files[0])
                assert chain.status == "unsealed", f"kill {k}: {chain.summary()}"
                recorded = "\n".join(str(e["message"]) for e in data.events)
                missing = [cid for cid in acked_before_kill if cid not in recorded]
                assert missing == [], f"kill {k}: acknowledged but not recorded: {missing}"
                last = datetime.fromisoformat(str(data.samples["t_utc"][-1]))
                lost_s = (killed_at - last).total_seconds()
                assert lost_s <= 1.0 + 0.2, f"kill {k}: last sample {lost_s:.2f} s before kill"
            assert len(acked) >= KILLS  # the operator really was acknowledged along the way
    finally:
        stop_ops.set()
        ops.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ops


async def _command(port: int, prefix: str, name: str, body: dict[str, object]) -> dict[str, object]:
    cid = uuid.uuid4().hex
    topic = f"{prefix}/cmd/op1/{name}"
    async with aiomqtt.Client("127.0.0.1", port, timeout=2) as client:
        await client.subscribe(f"{topic}/reply", qos=1)
        payload = {"command_id": cid, "issued_at": datetime.now(UTC).isoformat(), **body}
        await client.publish(topic, json.dumps(payload), qos=1)
        async with asyncio.timeout(5):
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                reply: dict[str, object] = json.loads(m.payload)
                if reply["command_id"] == cid:
                    return reply
    raise AssertionError("unreachable")


async def test_restart_restores_targets_phase_and_latched_alarms(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    loop = asyncio.get_running_loop()
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(first := Proc(["run", "-c", str(cfg_path)], tmp_path / "d1.log"))
        await wait_until(
            lambda: any(m.payload["phase"] == "perfusion" for m in sub.of("/state")),
            20,
            what="perfusion",
        )
        reply = await _command(mosquitto.port, prefix, "setpoint", {"flow_ml_min": 450.0})
        assert reply["status"] == "ok", reply
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"{prefix}/sim/fault", b'{"kind": "air", "duration_s": 0.3}')
        await wait_until(
            lambda: any(
                a["id"] == "air_detected" for m in sub.of("/alarms") for a in m.payload["alarms"]
            ),
            5,
            what="air alarm",
        )
        first.signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 5)
        restarted = loop.time()
        procs.append(Proc(["run", "-c", str(cfg_path)], tmp_path / "d2.log"))
        await wait_until(lambda: bool(sub.of("/state", restarted)), 20, what="restarted")
        state = sub.of("/state", restarted)[-1].payload
        assert state["phase"] == "safe_stop"
        assert state["targets"]["flow_ml_min"] == 450.0
        assert state["outputs"]["pump_speed_rpm"] == 0.0
        await wait_until(lambda: bool(sub.of("/alarms", restarted)), 5, what="alarms")
        present = {a["id"]: a for a in sub.of("/alarms", restarted)[-1].payload["alarms"]}
        assert {"air_detected", "controller_restarted"} <= present.keys()
        assert present["air_detected"]["presence"] == "latched"
        # The operator decides: resume is refused while the air interlock is latched...
        refused = await _command(mosquitto.port, prefix, "phase", {"action": "resume"})
        assert refused["status"] == "rejected"
        assert refused["reason"] == "interlock_active"
        # ...and accepted once it is reset: back to perfusion, the flow ramps up again.
        for alarm_id in ("air_detected", "controller_restarted"):
            ok = await _command(
                mosquitto.port, prefix, "alarm", {"action": "reset", "alarm_id": alarm_id}
            )
            assert ok["status"] == "ok", ok
        asked = await _command(mosquitto.port, prefix, "phase", {"action": "resume"})
        assert asked["status"] == "confirm_required", asked  # resume takes two steps
        resumed = await _command(mosquitto.port, prefix, "confirm", {"token": asked["token"]})
        assert resumed["status"] == "ok", resumed
        t_resume = loop.time()
        await wait_until(
            lambda: any(
                m.payload["phase"] == "perfusion" and m.payload["outputs"]["pump_speed_rpm"] > 5.0
                for m in sub.of("/state", t_resume)
            ),
            15,
            what="perfusion resumed",
        )
