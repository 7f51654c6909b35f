"""The operator CLI against real brokers and a real daemon: `ilup status` shows latched alarms
and values at their resolution, a command to an offline cart fails at once, and refused
credentials are named as such."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from brokers import SecureBroker, make_pki, run_broker
from helpers import wait_until
from procs import Proc, Subscriber, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.exitcodes import ExitCode

pytestmark = pytest.mark.integration

OPERATOR = "operator"
# A number printed with more digits than any signal's resolution: float noise.
FLOAT_NOISE = re.compile(r"\d\.\d{3,}")


def ilup(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "ilup_controller", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - start


async def test_status_shows_the_latched_alarm_and_rounded_values(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """Before: `ilup status` stopped reading once it had status and state and printed
    `alarms: none` while air_detected was latched; values carried float noise."""
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        await wait_until(
            lambda: any(m.payload.get("phase") == "perfusion" for m in sub.of("/state")),
            40,
            what="perfusion",
        )
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"{prefix}/sim/fault", b'{"kind": "air", "duration_s": 0.3}')

        def latched() -> bool:
            alarms = sub.of("/alarms")
            return bool(alarms) and any(
                a["id"] == "air_detected" and a["presence"] == "latched"
                for a in alarms[-1].payload["alarms"]
            )

        await wait_until(latched, 10, what="air_detected latched")
        status, took_s = await asyncio.to_thread(ilup, "status", "-c", str(cfg_path))
        assert status.returncode == ExitCode.OK, status.stderr
        assert re.search(r"ALARM high\s+latched air_detected", status.stdout), status.stdout
        assert "alarms: none" not in status.stdout
        assert took_s < 10.0
        assert not FLOAT_NOISE.findall(status.stdout), status.stdout

        # The state payloads carry each value at its signal's resolution (config/sim.yaml:
        # pressure and temperatures 0.01, pump speed 0.01 rpm, heater 0.1 %, reservoir 1 mL).
        decimals = {
            ("measured", "flow_ml_min"): 2,
            ("measured", "pressure_mmhg"): 2,
            ("measured", "temperature_c"): 2,
            ("measured", "water_temperature_c"): 2,
            ("measured", "pump_speed_rpm"): 2,
            ("measured", "reservoir_volume_ml"): 0,
            ("outputs", "pump_speed_rpm"): 2,
            ("outputs", "heater_pct"): 1,
            ("targets", "flow_ramped_ml_min"): 2,
            ("drug_phase", "elapsed_s"): 1,
        }
        await wait_until(lambda: len(sub.of("/state")) >= 5, 10, what="5 state messages")
        states = [m.payload for m in sub.of("/state")]
        for state in states:
            for (group, key), n in decimals.items():
                value = state[group][key]
                if value is not None:
                    assert value == round(value, n), (group, key, value)


@pytest.mark.parametrize("retained", [{"online": False, "cart_id": "sim_cart_1"}, None])
async def test_command_to_an_offline_cart_fails_at_once_and_is_not_sent(
    tmp_path: Path, mosquitto: MosquittoProcess, retained: dict[str, object] | None
) -> None:
    """Before: `ilup set` waited 5 s and said the command "may or may not have been applied"
    (exit 1)."""
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    async with session(sub):
        if retained is not None:
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
                await client.publish(f"{prefix}/status", json.dumps(retained), retain=True)
            await wait_until(lambda: bool(sub.of("/status")), 5, what="retained status")
        done, took_s = await asyncio.to_thread(
            ilup, "set", "flow", "400", "-c", str(cfg_path), "--username", OPERATOR
        )
        assert done.returncode == ExitCode.OFFLINE, done.stderr
        assert "is offline" in done.stderr
        assert "may or may not" not in done.stderr
        assert took_s < 4.5  # bound 1.5 s plus interpreter start-up; before: 5 s timeout
        assert not [m for m in sub.messages if "/cmd/" in m.topic]  # never published


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    with run_broker(make_pki(pki_dir, [OPERATOR])) as b:
        yield b


@pytest.mark.parametrize("command", [["status"], ["set", "flow", "400"]])
async def test_refused_credentials_are_named(
    tmp_path: Path, secure: SecureBroker, command: list[str]
) -> None:
    """Before: "cannot reach the broker ...: [code:135] Not authorized" with exit 1."""
    common = ["--host", "127.0.0.1", "--port", str(secure.port), "--ca-file"]
    common += [str(secure.pki.ca_file), "--username", OPERATOR, "--password", "wrong"]
    done, _ = await asyncio.to_thread(ilup, *command, *common)
    assert done.returncode == ExitCode.BROKER_AUTH, done.stderr
    assert f"refused the credentials for user '{OPERATOR}'" in done.stderr
    assert "cannot reach" not in done.stderr
