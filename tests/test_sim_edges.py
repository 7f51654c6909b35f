"""`ilup sim` as a real process at its edges (issue 8, defect 10): a hostile fault message, a
TLS broker, and a device port that is already taken."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from brokers import SecureBroker, make_pki, run_broker
from helpers import wait_until
from procs import Proc, read_signal, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.exitcodes import ExitCode

pytestmark = pytest.mark.integration

DAEMON = "ilup-daemon"
# +100 mmHg per second on the PA pressure channel: unmistakable in the register within 1 s.
DRIFT = b'{"kind": "sensor_drift", "channel": "pa_pressure", "rate_per_min": 6000}'
DEPTH = 50_000


def _ports(cfg_devices: dict[str, object]) -> dict[str, int]:
    return {name: dev.port for name, dev in cfg_devices.items()}  # type: ignore[attr-defined]


async def _drift_takes_effect(cfg_path: Path, ports: dict[str, int], cfg: object) -> float:
    """Seconds until the PA pressure register reads above 20 mmHg (the plant idles near 0)."""

    async def high() -> bool:
        try:
            return await read_signal(cfg, ports, "pa_pressure") > 20.0  # type: ignore[arg-type]
        except (ConnectionError, OSError):
            return False

    return await wait_until(high, 15.0, 0.1, "pa_pressure register above 20 mmHg")


async def test_hostile_fault_message_is_refused_and_faults_still_work(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port)
    fault_topic = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/sim/fault"
    hostile = b"[" * DEPTH + b"]" * DEPTH  # 100 kB; json.loads would recurse 50 000 deep
    async with session() as procs:
        procs.append(sim := Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        await wait_until(lambda: "listening for faults" in sim.log(), 20.0, 0.05, "fault intake")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, timeout=3) as client:
            await client.publish(fault_topic, hostile, qos=1)
            await client.publish(fault_topic, b"{" * 20 + b"}" * 20, qos=1)  # small but deep
            await client.publish(fault_topic, DRIFT, qos=1)
        took_s = await _drift_takes_effect(cfg_path, _ports(cfg.devices), cfg)
        print(f"valid fault took effect {took_s:.2f} s after the hostile ones")
        log = sim.log()
        assert "fault message too large: 100000 bytes, at most 4096" in log
        assert "fault message nested too deep: 20 levels, at most 8" in log
        sim.signal(signal.SIGTERM)
        assert sim.wait(15.0) == 0
        assert "Traceback" not in sim.log()
        assert "RecursionError" not in sim.log()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    with run_broker(make_pki(pki_dir, [DAEMON])) as b:
        yield b


async def test_sim_uses_the_tls_settings_of_the_cart_file(
    tmp_path: Path, tls_broker: SecureBroker
) -> None:
    b = tls_broker
    mqtt = {
        "username": DAEMON,
        "password": b.pki.passwords[DAEMON],
        "tls": {"ca_file": str(b.pki.ca_file)},
    }
    cfg_path, cfg = write_cart_config(tmp_path, b.port, overrides={"mqtt": mqtt})
    fault_topic = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/sim/fault"
    async with session() as procs:
        procs.append(sim := Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        # A plain-text client never gets past the TLS listener: this only appears over TLS.
        await wait_until(lambda: "listening for faults" in sim.log(), 20.0, 0.05, "fault intake")
        async with b.client(DAEMON) as client:
            await client.publish(fault_topic, DRIFT, qos=1)
        await _drift_takes_effect(cfg_path, _ports(cfg.devices), cfg)
    assert "unknown protocol" not in b.log_path.read_text().lower()


def test_sim_port_in_use_names_it_and_exits_2(tmp_path: Path) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, 1)  # no broker needed: the sim stops at once
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", cfg.devices["pump"].port))
    held.listen()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ilup_controller", "sim", "-c", str(cfg_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        held.close()
    port = cfg.devices["pump"].port
    print(done.stderr[-2000:])
    assert done.returncode == ExitCode.CONFIG
    assert "Traceback" not in done.stderr
    assert f"sim device pump: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr
    assert "devices.pump.port" in done.stderr


def test_nesting_depth_ignores_brackets_in_strings() -> None:
    from sim.faults import parse_runtime_message

    with pytest.raises(ValueError, match="invalid fault message"):  # depth 1: parsed, refused
        parse_runtime_message(b'{"clear": "[[[[[[[[[[[[\\"[[[["}')
    with pytest.raises(ValueError, match="nested too deep: 9 levels, at most 8"):
        parse_runtime_message(b"[" * 9 + b"]" * 9)
