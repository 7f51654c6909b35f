"""Real processes for integration tests: the simulator and the daemon, with free ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from pymodbus.client import AsyncModbusTcpClient
from ruamel.yaml import YAML

from ilup_controller.broker import free_port
from ilup_controller.config import CartConfig, load_config
from ilup_controller.modbus.codec import decode


def write_cart_config(
    tmp: Path,
    broker_port: int,
    *,
    overrides: Mapping[str, Any] | None = None,
    **control: Any,
) -> tuple[Path, CartConfig]:
    """config/sim.yaml on free ports, with a given broker and ``control.flow`` overrides.

    ``overrides`` is merged into the whole configuration last (nested mappings key by key), e.g.
    ``{"control": {"autostart": False}, "mqtt": {"username": "u"}}``.
    """
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(Path("config/sim.yaml").read_text(encoding="utf-8"))
    for dev in data["devices"].values():
        dev["port"] = free_port()
    data["mqtt"].update({"host": "127.0.0.1", "port": broker_port, "keepalive_s": 2})
    data["control"]["flow"].update(control)
    data["record"] = {"directory": str(tmp / "records")}  # no record shared between tests
    data["procedure"]["priming_s"] = 1.0  # real time: reach the flow target within seconds
    if overrides:
        merge(data, overrides)
    path = tmp / "cart.yaml"
    with path.open("w", encoding="utf-8") as f:
        yaml.dump(data, f)
    return path, load_config(path)


def merge(into: dict[str, Any], changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


class Proc:
    """``python -m ilup_controller ARGS`` with output in a log file shown on failure."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "ilup_controller", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.p.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.p.wait(timeout_s)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self._log.close()


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


@dataclass
class Received:
    topic: str
    payload: dict[str, Any]
    at_s: float


@dataclass
class Subscriber:
    """Collects every message under ``<prefix>/<cart>/#``; reconnects when the broker restarts."""

    port: int
    pattern: str
    messages: list[Received] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, timeout=2) as client:
                    await client.subscribe(self.pattern, qos=1)
                    self.connected.set()
                    async for m in client.messages:
                        assert isinstance(m.payload, bytes)
                        self.messages.append(
                            Received(m.topic.value, json.loads(m.payload), loop.time())
                        )
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    def of(self, suffix: str, since_s: float = 0.0) -> list[Received]:
        return [m for m in self.messages if m.topic.endswith(suffix) and m.at_s >= since_s]


async def read_signal(cfg: CartConfig, port_of: dict[str, int], signal_name: str) -> float:
    """Read one signal straight from the simulator's Modbus server (the ground truth)."""
    sig = cfg.signals[signal_name]
    dev = cfg.devices[sig.device]
    client = AsyncModbusTcpClient("127.0.0.1", port=port_of[sig.device], timeout=1, retries=0)
    try:
        if not await client.connect():
            raise ConnectionError(f"simulator {sig.device} not listening on {port_of[sig.device]}")
        if sig.table == "input":
            rr = await client.read_input_registers(
                sig.address, count=sig.register_count, device_id=dev.unit_id
            )
        else:
            rr = await client.read_holding_registers(
                sig.address, count=sig.register_count, device_id=dev.unit_id
            )
        assert not rr.isError(), rr
        return decode(sig, rr.registers)
    finally:
        client.close()


def operator_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ilup ARGS -c CFG` as the operator op1 (the test carts' anonymous broker)."""
    return subprocess.run(
        [sys.executable, "-m", "ilup_controller", *args, "-c", str(cfg), "--username", "op1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def wall_deadline(seconds: float) -> float:
    return time.monotonic() + seconds


@contextlib.asynccontextmanager
async def session(sub: Subscriber | None = None) -> AsyncIterator[list[Proc]]:
    """Processes a test starts, with an optional subscriber running and connected. On a failure
    each process's log tail is printed; everything is stopped on the way out."""
    task = asyncio.create_task(sub.run()) if sub is not None else None
    with processes() as procs:
        try:
            if sub is not None:
                await asyncio.wait_for(sub.connected.wait(), 5)
            yield procs
        except BaseException:
            for p in procs:
                print(f"---- {p.log_path.name} ----\n{p.log()[-4000:]}")
            raise
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
