"""A deliberately broken controller for tests/test_guard.py: every 100 ms it writes a fixed
pump speed and heater power, refreshes both device watchdogs and counts the guard heartbeat,
whatever the pressure or temperature. It is what the device watchdogs cannot catch (it keeps
feeding them) and what `ilup guard` is for.

    python tests/broken_controller.py CART.yaml PUMP_RPM HEATER_PCT
"""

from __future__ import annotations

import asyncio
import sys

from pymodbus.client import AsyncModbusTcpClient

from ilup_controller.config import load_config
from ilup_controller.modbus.codec import encode


async def main(path: str, pump_rpm: float, heater_pct: float) -> None:
    cfg = load_config(path)
    c, g = cfg.control, cfg.guard
    writes: dict[str, float] = {c.flow.command: pump_rpm, c.temperature.command: heater_pct}
    for dev in cfg.devices.values():
        if dev.watchdog is not None:
            writes[dev.watchdog.signal] = dev.watchdog.timeout_s
    heartbeat = g.heartbeat_signal if g is not None else None
    clients: dict[str, AsyncModbusTcpClient] = {}
    for name, dev in cfg.devices.items():
        clients[name] = AsyncModbusTcpClient(dev.host, port=dev.port, timeout=0.25, retries=0)
        for _ in range(200):  # the simulator may still be starting
            if await clients[name].connect():
                break
            await asyncio.sleep(0.05)
    count = 0
    while True:
        values = dict(writes)
        if heartbeat is not None:
            values[heartbeat] = float(count % 65536)
        for name, value in values.items():
            sig = cfg.signals[name]
            dev = cfg.devices[sig.device]
            await clients[sig.device].write_registers(
                sig.address, encode(sig, value), device_id=dev.unit_id
            )
        count += 1
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
