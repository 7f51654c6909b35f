"""The operator interface on the shipped hardened broker configuration (TLS, password file, ACL)
with real processes: the daemon over TLS, a whole procedure from the CLI, a monitor that
cannot command, and a flood of commands that leaves the control tick alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from brokers import SecureBroker, make_pki, run_broker
from helpers import wait_until
from procs import Proc, processes
from ruamel.yaml import YAML

from ilup_controller.broker import free_port

pytestmark = pytest.mark.integration

DAEMON, OPERATOR, MONITOR = "ilup-daemon", "operator", "monitor"
FLOOD_RATE_HZ = 1000
FLOOD_S = 10.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    with run_broker(make_pki(pki_dir, [DAEMON, OPERATOR, MONITOR])) as b:
        yield b


def _cart(tmp_path: Path, b: SecureBroker) -> tuple[Path, str]:
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(Path("config/sim.yaml").read_text())
    for dev in data["devices"].values():
        dev["port"] = free_port()
    data["mqtt"].update(
        {
            "port": b.port,
            "username": DAEMON,
            "password": b.pki.passwords[DAEMON],
            "tls": {"ca_file": str(b.pki.ca_file)},
            "keepalive_s": 2,
        }
    )
    data["control"]["autostart"] = False
    data["control"]["flow"]["ramp_s"] = 2.0
    data["procedure"].update({"auto_advance": False})
    data["record"] = {"directory": str(tmp_path / "records")}
    path = tmp_path / "cart.yaml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path, f"{data['mqtt'].get('topic_prefix', 'ilup')}/{data['cart_id']}"


def _cli(cfg: Path, b: SecureBroker, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ilup_controller",
            *args,
            "-c",
            str(cfg),
            "--username",
            user,
            "--password",
            b.pki.passwords[user],
            "--ca-file",
            str(b.pki.ca_file),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def _events(
    b: SecureBroker, prefix: str, got: list[dict[str, object]], ready: asyncio.Event
) -> None:
    async with b.client(OPERATOR) as client:
        await client.subscribe(f"{prefix}/events", qos=1)
        await client.subscribe(f"{prefix}/state", qos=0)
        ready.set()
        async for m in client.messages:
            assert isinstance(m.payload, bytes)
            got.append({"topic": m.topic.value, **json.loads(m.payload)})


async def test_procedure_over_tls_and_the_monitor_cannot_command(
    tmp_path: Path, broker: SecureBroker
) -> None:
    cfg, prefix = _cart(tmp_path, broker)
    got: list[dict[str, object]] = []
    ready = asyncio.Event()
    listener = asyncio.create_task(_events(broker, prefix, got, ready))
    with processes() as procs:
        try:
            await asyncio.wait_for(ready.wait(), 5)
            procs.append(Proc(["sim", "-c", str(cfg)], tmp_path / "sim.log"))
            procs.append(daemon := Proc(["run", "-c", str(cfg)], tmp_path / "daemon.log"))
            await wait_until(
                lambda: any(str(g["topic"]).endswith("/state") for g in got),
                20,
                what="state over TLS",
            )
            for action in ("priming", "perfusion"):
                r = await asyncio.to_thread(_cli, cfg, broker, OPERATOR, "phase", action)
                assert r.returncode == 0, r.stderr

            # The monitor tries its own command topic and the operator's: neither reaches the
            # daemon (the broker's ACL drops them). The operator's marker right after proves
            # the daemon was listening all along.
            async with broker.client(MONITOR) as mon:
                for topic in (f"{prefix}/cmd/{MONITOR}/phase", f"{prefix}/cmd/{OPERATOR}/phase"):
                    body = {
                        "command_id": uuid.uuid4().hex,
                        "action": "washout",
                        "issued_at": datetime.now(UTC).isoformat(),
                    }
                    await mon.publish(topic, json.dumps(body), qos=1)
            r = await asyncio.to_thread(_cli, cfg, broker, OPERATOR, "marker", "after monitor")
            assert r.returncode == 0, r.stderr
            commands = [g for g in got if g.get("kind") in ("command", "marker")]
            assert not [g for g in commands if g.get("operator") == MONITOR]
            assert not [g for g in commands if "washout" in str(g.get("message"))]
            states = [g for g in got if str(g["topic"]).endswith("/state")]
            assert states[-1]["phase"] == "perfusion"

            for action in ("washout", "complete"):
                r = await asyncio.to_thread(_cli, cfg, broker, OPERATOR, "phase", action)
                assert r.returncode == 0, r.stderr
            phases = [g["to_phase"] for g in got if g.get("kind") == "phase"]
            assert phases == ["priming", "perfusion", "washout", "complete"]
            assert "Traceback" not in daemon.log()
        except BaseException:
            for p in procs:
                print(f"---- {p.args[0]} log ----\n{p.log()[-3000:]}")
            raise
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


async def test_flood_of_commands_gets_replies_and_leaves_the_tick_alone(
    tmp_path: Path, broker: SecureBroker
) -> None:
    cfg, prefix = _cart(tmp_path, broker)
    with processes() as procs:
        try:
            procs.append(Proc(["sim", "-c", str(cfg)], tmp_path / "sim.log"))
            procs.append(daemon := Proc(["run", "-c", str(cfg)], tmp_path / "daemon.log"))
            states: list[dict[str, object]] = []
            async with broker.client(OPERATOR, max_concurrent_outgoing_calls=50) as client:
                topic = f"{prefix}/cmd/{OPERATOR}/marker"
                await client.subscribe(f"{topic}/reply", qos=1)
                await client.subscribe(f"{prefix}/state", qos=0)
                replies: dict[str, str] = {}

                async def collect() -> None:
                    async for m in client.messages:
                        assert isinstance(m.payload, bytes)
                        body = json.loads(m.payload)
                        if m.topic.value.endswith("/state"):
                            states.append(body)
                        else:
                            replies[body["command_id"]] = body["reason"] or body["status"]

                reader = asyncio.create_task(collect())
                await wait_until(lambda: len(states) > 2, 20, what="daemon up")
                rss_before = _rss_mb(daemon.p.pid)
                overruns_before = states[-1]["timing"]["overruns"]  # type: ignore[index]
                sent: list[str] = []
                t0 = time.monotonic()
                n = int(FLOOD_RATE_HZ * FLOOD_S)
                for i in range(n):
                    cid = f"f{i}-{uuid.uuid4().hex[:8]}"
                    body = {
                        "command_id": cid,
                        "text": f"flood {i}",
                        "issued_at": datetime.now(UTC).isoformat(),
                    }
                    await client.publish(topic, json.dumps(body), qos=0)
                    sent.append(cid)
                    ahead = t0 + (i + 1) / FLOOD_RATE_HZ - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                rate = n / (time.monotonic() - t0)
                await wait_until(
                    lambda: len(replies) >= len(sent),
                    20,
                    what=f"a reply to every command ({len(replies)}/{len(sent)})",
                )
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            rss_after = _rss_mb(daemon.p.pid)
            counts = {k: list(replies.values()).count(k) for k in set(replies.values())}
            print(
                f"\nflood: {n} commands at {rate:.0f}/s, replies {counts}, "
                f"RSS {rss_before:.1f} -> {rss_after:.1f} MB"
            )
            assert rate >= 0.9 * FLOOD_RATE_HZ
            assert set(counts) <= {"ok", "rate_limited"}
            assert counts.get("ok", 0) >= 10  # the burst, then the sustained rate
            assert states[-1]["timing"]["overruns"] == overruns_before  # type: ignore[index]
            assert "alarm=tick_overrun" not in daemon.log()
            assert rss_after < 100.0
            assert rss_after - rss_before < 30.0
        except BaseException:
            for p in procs:
                print(f"---- {p.args[0]} log ----\n{p.log()[-3000:]}")
            raise
