"""Operator commands like a clinical console, end to end over the shipped hardened broker (TLS,
password file, the committed ACL) with a real daemon and simulator, in one session:

- two-step confirmation through the real `ilup` CLI (--yes, an interactive yes, an interactive no);
- a user in the broker's password file but not in the cart's operator list (and, as the
  committed ACL's command pattern allows, able to publish a command) changes nothing;
- safe_stop goes through at once while the operator's rate limit is exhausted.
(The decisions themselves are tested in virtual time in test_console.py.)"""

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
from typing import Any

import aiomqtt
import pytest
from brokers import SecureBroker, make_pki, run_broker, secure_cart
from helpers import wait_until
from procs import Proc, processes

pytestmark = pytest.mark.integration

# OPERATOR is in the password file, the committed ACL and the cart's operator list; INTRUDER is
# in the password file only (the situation issue 12 reports: it could change the flow target).
DAEMON, OPERATOR, INTRUDER = "ilup-daemon", "operator", "intruder"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    with run_broker(make_pki(pki_dir, [DAEMON, OPERATOR, INTRUDER])) as b:
        yield b


def _cart(tmp_path: Path, b: SecureBroker) -> tuple[Path, str]:
    # No wildcard: only the operator may command.
    return secure_cart(tmp_path, b, DAEMON, operators={OPERATOR: "operator"})


def _cli(
    cfg: Path, b: SecureBroker, *args: str, answer: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ilup_controller", *args, "-c", str(cfg), "--username", OPERATOR,
         "--password", b.pki.passwords[OPERATOR], "--ca-file", str(b.pki.ca_file)],
        input=answer if answer is not None else "",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip


def _body(**fields: Any) -> str:
    return json.dumps(
        {"command_id": uuid.uuid4().hex, "issued_at": datetime.now(UTC).isoformat(), **fields}
    )


class Watch:
    """Events, replies to the operator and the latest state, as the operator reads them."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.replies: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}
        self.ready = asyncio.Event()

    async def run(self, b: SecureBroker, prefix: str) -> None:
        async with b.client(OPERATOR) as client:
            for topic in ("events", "state", f"cmd/{OPERATOR}/+/reply"):
                await client.subscribe(f"{prefix}/{topic}", qos=1)
            self.ready.set()
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                data = json.loads(m.payload)
                if m.topic.value.endswith("/state"):
                    self.state = data
                elif m.topic.value.endswith("/events"):
                    self.events.append(str(data.get("message", "")))
                else:
                    self.replies.append(data)


async def test_confirmation_allow_list_and_exemptions_over_the_hardened_broker(
    tmp_path: Path, broker: SecureBroker
) -> None:
    cfg, prefix = _cart(tmp_path, broker)
    watch = Watch()
    listener = asyncio.create_task(watch.run(broker, prefix))
    with processes() as procs:
        try:
            await asyncio.wait_for(watch.ready.wait(), 5)
            procs.append(Proc(["sim", "-c", str(cfg)], tmp_path / "sim.log"))
            procs.append(daemon := Proc(["run", "-c", str(cfg)], tmp_path / "daemon.log"))
            await wait_until(lambda: bool(watch.state), 20, what="state over TLS")
            for action in ("priming", "perfusion"):
                r = await asyncio.to_thread(_cli, cfg, broker, "phase", action)
                assert r.returncode == 0, r.stderr

            # --yes: the CLI shows what will change and confirms it (two MQTT commands).
            r = await asyncio.to_thread(_cli, cfg, broker, "set", "pressure-limit", "28", "--yes")
            assert r.returncode == 0, r.stdout + r.stderr
            assert "pressure_limit_mmhg 25 -> 28 (raises the pressure limit)" in r.stdout
            assert "confirmed: pressure_limit_mmhg 25 -> 28" in r.stdout
            await wait_until(
                lambda: watch.state["targets"]["pressure_limit_mmhg"] == 28.0, 3, what="limit 28"
            )
            # Interactive: "n" cancels (exit 5, nothing changed), "y" applies.
            r = await asyncio.to_thread(_cli, cfg, broker, "set", "flow", "650", answer="n\n")
            assert r.returncode == 5, r.stdout + r.stderr
            assert "flow_ml_min 500 -> 650 (+150 mL/min, more than 100 in one step)" in r.stdout
            assert "cancelled" in r.stdout
            assert watch.state["targets"]["flow_ml_min"] == 500.0
            r = await asyncio.to_thread(_cli, cfg, broker, "set", "flow", "650", answer="y\n")
            assert r.returncode == 0, r.stdout + r.stderr
            await wait_until(
                lambda: watch.state["targets"]["flow_ml_min"] == 650.0, 3, what="flow 650"
            )

            # In the password file, not on the operator list: the broker lets the command
            # through (the ACL's command pattern applies to every user), the daemon refuses it.
            async with broker.client(INTRUDER) as intruder:
                await intruder.publish(
                    f"{prefix}/cmd/{INTRUDER}/setpoint", _body(flow_ml_min=450.0), qos=1
                )
            await wait_until(
                lambda: any(f"from {INTRUDER}: rejected (unauthorized)" in e for e in watch.events),
                5,
                what="the intruder's command refused",
            )
            assert watch.state["targets"]["flow_ml_min"] == 650.0

            # Exhaust the operator's rate limit, then safe_stop: applied at once.
            loop = asyncio.get_running_loop()
            async with broker.client(OPERATOR) as op:
                for i in range(15):
                    await op.publish(f"{prefix}/cmd/{OPERATOR}/marker", _body(text=f"m{i}"), qos=1)
                await op.publish(f"{prefix}/cmd/{OPERATOR}/phase", _body(action="safe_stop"), qos=1)
                sent_s = loop.time()
            await wait_until(lambda: watch.state["phase"] == "safe_stop", 2, what="safe_stop")
            stop_s = loop.time() - sent_s
            await wait_until(
                lambda: any("safe_stop" in r["detail"] for r in watch.replies), 3, what="reply"
            )
            limited = [r for r in watch.replies if r.get("reason") == "rate_limited"]
            stop = next(r for r in watch.replies if "safe_stop" in r["detail"])
            assert len(limited) >= 4, watch.replies  # the burst (10) ran out
            assert (stop["status"], stop["detail"]) == ("ok", "phase perfusion -> safe_stop")
            assert stop_s < 1.0
            # The record holds every step (the events topic is its copy).
            joined = "\n".join(watch.events)
            for text in ("confirm_required", "cancelled by the operator", "setpoint", "confirmed"):
                assert text in joined, text
            assert "Traceback" not in daemon.log()
        except BaseException:
            for p in procs:
                print(f"---- {p.args[0]} log ----\n{p.log()[-3000:]}")
            raise
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await listener
