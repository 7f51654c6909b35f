"""The operator CLI against a running daemon (real processes, test broker): a whole procedure
driven from the terminal, every reply checked, and the specific rejections."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from helpers import wait_until
from procs import Proc, Subscriber, operator_cli, session, write_cart_config
from ruamel.yaml import YAML

from ilup_controller.broker import MosquittoProcess
from ilup_controller.exitcodes import ExitCode

pytestmark = pytest.mark.integration


async def test_cli_runs_a_procedure_and_gets_specific_rejections(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(cfg_path.read_text())
    data["control"]["autostart"] = False
    data["procedure"].update({"auto_advance": False, "drug_phase_s": 5.0})
    with cfg_path.open("w") as f:
        yaml.dump(data, f)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        await wait_until(lambda: bool(sub.of("/state")), 20, what="daemon up")

        out_of_phase = await asyncio.to_thread(operator_cli, cfg_path, "phase", "washout")
        assert out_of_phase.returncode == ExitCode.REJECTED
        assert "not_allowed_in_phase" in out_of_phase.stderr
        for action in ("priming", "perfusion"):
            r = await asyncio.to_thread(operator_cli, cfg_path, "phase", action)
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("phase ok")
        r = await asyncio.to_thread(operator_cli, cfg_path, "marker", "drug in")
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(operator_cli, cfg_path, "set", "flow", "450")
        assert r.returncode == 0, r.stderr
        too_big = await asyncio.to_thread(operator_cli, cfg_path, "set", "flow", "5000")
        assert too_big.returncode == ExitCode.REJECTED
        assert "out_of_range" in too_big.stderr or "invalid" in too_big.stderr
        status = await asyncio.to_thread(operator_cli, cfg_path, "status")
        assert status.returncode == 0, status.stderr
        assert "phase perfusion" in status.stdout
        assert "(target 450.0)" in status.stdout
        for action in ("washout", "complete"):
            r = await asyncio.to_thread(operator_cli, cfg_path, "phase", action)
            assert r.returncode == 0, r.stderr

        # Duplicate and expired commands, sent by hand.
        topic = f"{prefix}/cmd/op1/marker"
        stale = datetime.now(UTC) - timedelta(seconds=30)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe(f"{topic}/reply", qos=1)
            same = json.dumps(
                {
                    "command_id": "dup-1",
                    "text": "once",
                    "issued_at": datetime.now(UTC).isoformat(),
                }
            )
            old = json.dumps(
                {"command_id": uuid.uuid4().hex, "text": "late", "issued_at": stale.isoformat()}
            )
            # A fence last: the daemon publishes its events in order, so once the fence's
            # event is seen every event of the three before it has been seen too.
            fence = json.dumps(
                {"command_id": "fence", "text": "fence", "issued_at": datetime.now(UTC).isoformat()}
            )
            for payload in (same, same, old, fence):
                await client.publish(topic, payload, qos=1)
            replies: list[dict[str, object]] = []
            async with asyncio.timeout(10):
                async for m in client.messages:
                    assert isinstance(m.payload, bytes)
                    replies.append(json.loads(m.payload))
                    if len(replies) == 4:
                        break

        def markers() -> list[str]:
            return [
                m.payload["message"] for m in sub.of("/events") if m.payload["kind"] == "marker"
            ]

        await wait_until(lambda: "fence" in markers(), 10, what="the fence's marker event")
        by_id: dict[object, list[dict[str, object]]] = {}
        for rep in replies:
            by_id.setdefault(rep["command_id"], []).append(rep)
        assert by_id["dup-1"][0] == by_id["dup-1"][1]  # the first reply, again
        assert by_id["dup-1"][0]["status"] == "ok"
        (expired,) = [r for k, v in by_id.items() if k not in ("dup-1", "fence") for r in v]
        assert (expired["status"], expired["reason"]) == ("rejected", "expired")

        phases = [m.payload["to_phase"] for m in sub.of("/events") if m.payload["kind"] == "phase"]
        assert phases == ["priming", "perfusion", "washout", "complete"]
        assert markers().count("once") == 1  # applied once despite the duplicate
        assert "drug in" in markers()
        commands = [m for m in sub.of("/events") if m.payload["kind"] == "command"]
        assert any("not_allowed_in_phase" in m.payload["message"] for m in commands)
