"""A device that answers, but too late, is a device that does not answer (issue 8, defect 6).

Real simulator Modbus TCP servers and real DeviceLinks over loopback; the slowness is the
simulator's own ``device_slow`` fault. The daemon's ``device_comms`` condition is
``silent_devices`` over the links' health, evaluated here the same way the daemon does.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import wait_until
from test_modbus_link import CONFIG, Rig

from ilup_controller.core.monitor import silent_devices
from ilup_controller.modbus.link import DEFAULT_POLL_PERIOD_S
from sim.faults import FaultInjector
from sim.plant import Plant

STALE_S = CONFIG.control.stale_after_s  # 1.0 s in config/sim.yaml
IO_TIMEOUT_S = CONFIG.devices["io"].timeout_s  # 0.25 s
SLOW_REPLY_S = 0.3  # the reply comes, 50 ms after the timeout
IO_SIGNALS = [n for n, s in CONFIG.signals.items() if s.device == "io"]


def io_down(rig: Rig) -> bool:
    loop = asyncio.get_running_loop()
    h = rig.links["io"].health
    return bool(silent_devices(loop.time(), {"io": (h.last_ok_t, h.last_error)}, STALE_S))


async def test_slow_device_is_reported_down_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ilup.modbus")
    assert CONFIG.simulator is not None
    rig = Rig()
    await rig.start()
    injector = FaultInjector(Plant(CONFIG.simulator.plant), rig.sim, devices=CONFIG.devices)
    loop = asyncio.get_running_loop()
    try:
        await wait_until(lambda: set(rig.store) >= set(CONFIG.signals), 3.0)
        await asyncio.sleep(0.3)
        assert not io_down(rig)
        caplog.clear()

        injector.handle_runtime_message(
            b'{"kind": "device_slow", "device": "io", "delay_s": %.2f}' % SLOW_REPLY_S
        )
        t_fault = loop.time()
        # Down within stale_after_s + one poll period (+ 0.3 s for a loaded 2-core machine).
        detect_s = await wait_until(lambda: io_down(rig), STALE_S + 3.0, 0.005, "io down")
        print(f"slow device reported down after {detect_s:.3f} s (stale_after_s {STALE_S})")
        assert detect_s <= STALE_S + DEFAULT_POLL_PERIOD_S + 0.3

        # 3 s of slowness: it stays down (a late reply never counts as a good one) ...
        flaps = 0
        while loop.time() - t_fault < 3.0:
            flaps += not io_down(rig)
            await asyncio.sleep(0.02)
        assert flaps == 0
        for name in IO_SIGNALS:  # ... and no late reply ever became a reading
            assert rig.store[name].t <= t_fault + IO_TIMEOUT_S, name
        h = rig.links["io"].health
        assert h.decode_errors == 0
        assert h.last_error is not None
        assert "no reply within 0.25 s" in h.last_error, h.last_error

        # The log names the cause once, not once per request.
        io_warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.getMessage().startswith("device io:")
        ]
        print("warnings:", io_warnings)
        assert not any("invalid value" in m for m in io_warnings), io_warnings
        assert 1 <= len(io_warnings) <= 2, io_warnings
        assert "no reply within 0.25 s" in io_warnings[0]

        injector.handle_runtime_message(b'{"clear": "device_slow", "device": "io"}')
        t_clear = loop.time()
        max_backoff_s = CONFIG.devices["io"].reconnect_max_s
        recover_s = await wait_until(
            lambda: not io_down(rig), max_backoff_s + 2.0, 0.005, "io answers again"
        )
        print(f"recovered {recover_s:.3f} s after the fault was cleared")
        assert rig.store["flow"].t > t_clear
        summary = [r.getMessage() for r in caplog.records if "link up after" in r.getMessage()]
        assert len(summary) == 1, summary
        assert "failed request" in summary[0], summary
    finally:
        await rig.close()
