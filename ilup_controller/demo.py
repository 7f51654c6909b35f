"""`ilup demo`: broker + simulator + guard + daemon as real processes, and the live view in front.

A cart file without a ``guard`` section gets the packaged guard overlay (config/guard.yaml,
its safety I/O module on a free port), so the demo runs the independent safety layer too
(``--no-guard`` leaves it out). Ctrl-C stops the daemon first (it drives the pump to zero and
the heater off and says so on MQTT), then the guard, then the simulator, then any broker the
demo started itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ilup_controller import examples
from ilup_controller.broker import BrokerHandle, ensure_broker, free_port
from ilup_controller.config import CartConfig, load_config
from ilup_controller.view import watch

STOP_TIMEOUT_S = 10.0
SIM_START_TIMEOUT_S = 10.0


def write_config(source: str | Path, dest: Path, *, guard: Path | None = None, **mqtt: Any) -> Path:
    """A copy of ``source`` with the given ``mqtt`` keys replaced, recording next to it, and
    the ``guard`` overlay merged in when the cart has no guard of its own."""
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(Path(source).read_text(encoding="utf-8"))
    if guard is not None and "guard" not in data:
        overlay = yaml.load(guard.read_text(encoding="utf-8"))
        for name, device in overlay.get("devices", {}).items():
            device["port"] = free_port()  # beside whatever the cart's own devices use
            data["devices"][name] = device
        data["signals"].update(overlay.get("signals", {}))
        data["guard"] = overlay["guard"]
        bindings = overlay.get("simulator", {}).get("bindings", {})
        data.setdefault("simulator", {}).setdefault("bindings", {}).update(bindings)
    data.setdefault("mqtt", {}).update(mqtt)
    data["record"] = {"directory": str(dest.parent / "records")}
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 0.2):
            return True
    except OSError:
        return False


def _wait_listening(sim: subprocess.Popen[bytes], cfg: CartConfig, log: Path) -> None:
    """Wait until the simulator owns its ports, or say why it did not start."""
    deadline = time.monotonic() + SIM_START_TIMEOUT_S
    pending = {(d.host, d.port) for d in cfg.devices.values() if d.transport == "tcp"}
    while pending:
        if sim.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"the simulator exited (code {sim.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the simulator did not listen on {sorted(pending)} in time")
        pending = {hp for hp in pending if not _listening(*hp)}
        time.sleep(0.05)


def run_demo(config_path: str, *, speed: float = 1.0, guard: bool = True) -> int:
    cfg = load_config(config_path)  # fail early, with key paths, before starting anything
    busy = [
        f"{d.host}:{d.port}"
        for d in cfg.devices.values()
        if d.transport == "tcp" and _listening(d.host, d.port)
    ]
    if busy:
        # A simulator left from an earlier run would be driven by two daemons at once.
        print(
            f"demo: {', '.join(busy)} already in use (a simulator from an earlier run?): "
            "stop it first",
            file=sys.stderr,
        )
        return 1
    # A closed terminal or a kill must still stop the children in order.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    host, port, broker, protocol = ensure_broker(cfg.mqtt.host, cfg.mqtt.port)
    workdir = Path(tempfile.mkdtemp(prefix="ilup-demo-"))
    overlay = examples.example("guard.yaml") if guard else None
    demo_cfg = write_config(
        config_path, workdir / "cart.yaml", guard=overlay, host=host, port=port, protocol=protocol
    )
    cfg = load_config(demo_cfg)
    origin = "started by the demo" if broker is not None else "already running"
    print(f"broker {host}:{port} (MQTT {protocol}, {origin}); logs in {workdir}")
    sim = _spawn(["sim", "-c", str(demo_cfg), "--speed", str(speed)], workdir / "sim.log")
    daemon: subprocess.Popen[bytes] | None = None
    guardian: subprocess.Popen[bytes] | None = None
    rc = 0
    try:
        _wait_listening(sim, cfg, workdir / "sim.log")
        if cfg.guard is not None:
            guardian = _spawn(["guard", "-c", str(demo_cfg)], workdir / "guard.log")
        daemon = _spawn(["run", "-c", str(demo_cfg)], workdir / "daemon.log")
        with contextlib.suppress(KeyboardInterrupt):
            rc = asyncio.run(
                watch(host, port, cfg.mqtt.topic_prefix, cfg.cart_id, protocol=protocol)
            )
    except RuntimeError as e:
        print(f"demo: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping: daemon first (pump to zero, heater off), then guard and simulator")
        if daemon is not None:
            _stop(daemon, "daemon")
        if guardian is not None:
            _stop(guardian, "guard")
        _stop(sim, "simulator")
        _stop_broker(broker)
    return rc


def _stop_broker(broker: BrokerHandle | None) -> None:
    if broker is not None:
        broker.stop()
        print("  broker stopped")
