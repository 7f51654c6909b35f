"""`ilup demo`: broker + simulator + daemon as real processes, and the live view in front.

Ctrl-C stops the daemon first (it drives the pump to zero and the heater off and says so on
MQTT), then the simulator, then any broker the demo started itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ilup_controller.broker import BrokerHandle, ensure_broker
from ilup_controller.config import load_config
from ilup_controller.view import watch

STOP_TIMEOUT_S = 10.0


def write_config(source: str | Path, dest: Path, **mqtt: Any) -> Path:
    """A copy of ``source`` with the given ``mqtt`` keys replaced (used by the demo and tests)."""
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(Path(source).read_text(encoding="utf-8"))
    data.setdefault("mqtt", {}).update(mqtt)
    with dest.open("w", encoding="utf-8") as f:
        yaml.dump(data, f)
    return dest


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "ilup_controller", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(STOP_TIMEOUT_S)
        print(f"  {name} stopped (exit {rc})")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"  {name} did not stop in {STOP_TIMEOUT_S:.0f} s: killed")


def run_demo(config_path: str, *, speed: float = 1.0) -> int:
    cfg = load_config(config_path)  # fail early, with key paths, before starting anything
    host, port, broker, protocol = ensure_broker(cfg.mqtt.host, cfg.mqtt.port)
    workdir = Path(tempfile.mkdtemp(prefix="ilup-demo-"))
    demo_cfg = write_config(
        config_path, workdir / "cart.yaml", host=host, port=port, protocol=protocol
    )
    origin = "started by the demo" if broker is not None else "already running"
    print(f"broker {host}:{port} (MQTT {protocol}, {origin}); logs in {workdir}")
    sim = _spawn(["sim", "-c", str(demo_cfg), "--speed", str(speed)], workdir / "sim.log")
    time.sleep(0.5)  # the daemon copes with a late simulator; this only spares a warning line
    daemon = _spawn(["run", "-c", str(demo_cfg)], workdir / "daemon.log")
    rc = 0
    try:
        with contextlib.suppress(KeyboardInterrupt):
            rc = asyncio.run(
                watch(host, port, cfg.mqtt.topic_prefix, cfg.cart_id, protocol=protocol)
            )
    finally:
        print("stopping: daemon first (pump to zero, heater off), then simulator")
        _stop(daemon, "daemon")
        _stop(sim, "simulator")
        _stop_broker(broker)
    return rc


def _stop_broker(broker: BrokerHandle | None) -> None:
    if broker is not None:
        broker.stop()
        print("  broker stopped")
