"""The operator interface on the shipped hardened broker configuration (TLS, password file, ACL)
with real processes: the daemon over TLS, a whole procedure from the CLI, and a monitor that
cannot command. (The flood test is in test_operator_e2e.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from brokers import SecureBroker, make_pki, run_broker, secure_cart
from helpers import wait_until
from procs import Proc, processes

pytestmark = pytest.mark.integration

DAEMON, OPERATOR, MONITOR = "ilup-daemon", "operator", "monitor"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    with run_broker(make_pki(pki_dir, [DAEMON, OPERATOR, MONITOR])) as b:
        yield b


def _cart(tmp_path: Path, b: SecureBroker) -> tuple[Path, str]:
    return secure_cart(tmp_path, b, DAEMON)


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
