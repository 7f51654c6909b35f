"""Acceptance with real processes: `ilup sim` and `ilup run` as subprocesses, Modbus over TCP
loopback, and a Mosquitto started by the test on a free port. Runs in real time."""

from __future__ import annotations

import asyncio
import itertools
import signal
from pathlib import Path

import pytest
from helpers import wait_until
from procs import Proc, Subscriber, processes, read_signal, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.config import CartConfig

pytestmark = pytest.mark.integration

TARGET = 500.0
BAND = 0.05 * TARGET


async def test_daemon_perfuses_the_simulator_and_survives_the_broker(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=4.0, target_ml_min=TARGET)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    loop = asyncio.get_running_loop()
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))

        def flow_in_band() -> bool:
            states = sub.of("/state")
            return bool(states) and _in_band(states[-1].payload["measured"]["flow_ml_min"])

        await wait_until(flow_in_band, 30, what="published flow within 5 % of 500 mL/min")
        status = sub.of("/status")[-1].payload
        assert status["online"] is True
        assert status["simulated"] is True

        # State at >= 1 Hz over a 3 s window, every one with the required fields.
        t0 = loop.time()
        await asyncio.sleep(3.0)
        window = sub.of("/state", since_s=t0)
        assert len(window) >= 3, len(window)
        gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(window)]
        assert max(gaps) <= 1.0, gaps
        last = window[-1].payload
        assert last["simulated"] is True
        assert last["phase"] == "perfusion"
        assert last["targets"]["flow_ml_min"] == TARGET
        assert {"flow_ml_min", "pressure_mmhg", "temperature_c"} <= last["measured"].keys()
        assert {"pump_speed_rpm", "heater_pct"} <= last["outputs"].keys()
        # A healthy circuit over real Modbus raises no alarm at all (false alarms fail too).
        raised = {a for m in sub.of("/state") for a in m.payload["active_alarms"]}
        assert raised == set(), raised
        seqs = [m.payload["seq"] for m in window]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)

        # Broker down for 3 s: control goes on (flow read straight from the simulator).
        mosquitto.stop()
        outage: list[float] = []
        for _ in range(15):
            outage.append(await read_signal(cfg, ports, "flow"))
            await asyncio.sleep(0.2)
        assert all(_in_band(f) for f in outage), outage
        mosquitto.start()
        t_back = loop.time()
        await wait_until(
            lambda: len(sub.of("/state", since_s=t_back)) >= 2,
            15,
            what="state resumes after the broker restarts",
        )
        resumed = sub.of("/state", since_s=t_back)
        assert resumed[-1].payload["seq"] > seqs[-1]
        assert _in_band(resumed[-1].payload["measured"]["flow_ml_min"])
        assert any(m.payload["online"] for m in sub.of("/status", since_s=t_back))

        # kill -9: the broker publishes the last will.
        t_kill = loop.time()
        daemon.signal(signal.SIGKILL)
        await wait_until(
            lambda: any(m.payload["online"] is False for m in sub.of("/status", t_kill)),
            1.5 * cfg.mqtt.keepalive_s + 2,
            what="last will {online: false}",
        )


async def test_sigterm_stops_the_pump_and_heater(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    sub = Subscriber(mosquitto.port, f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/status")
    pump_cmd = cfg.control.flow.command
    heater_cmd = cfg.control.temperature.command
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))

        async def pumping() -> bool:
            try:
                return await read_signal(cfg, ports, "pump_speed") > 10.0
            except ConnectionError:  # the simulator is still starting
                return False

        await wait_until(pumping, 30, interval_s=0.2, what="pump running above 10 rpm")
        assert await read_signal(cfg, ports, pump_cmd) > 5.0  # commanded on (its trim moves it)
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 10) == 0
        # Read back from the simulator: commands are zero and the pump really stopped.
        assert await read_signal(cfg, ports, pump_cmd) == 0.0
        assert await read_signal(cfg, ports, heater_cmd) == 0.0

        async def stopped() -> bool:
            return await read_signal(cfg, ports, "pump_speed") < 0.1

        await wait_until(stopped, 5, interval_s=0.1, what="pump speed back to zero")
        await wait_until(
            lambda: any(m.payload["online"] is False for m in sub.of("/status")),
            5,
            what="offline status after SIGTERM",
        )
        assert "Traceback" not in daemon.log()


def _in_band(flow_ml_min: float | None) -> bool:
    return flow_ml_min is not None and abs(flow_ml_min - TARGET) <= BAND


async def _until_pumping(cfg: CartConfig, ports: dict[str, int]) -> None:
    """The simulator's tacho above 10 rpm: the daemon is perfusing it."""

    async def pumping() -> bool:
        try:
            return await read_signal(cfg, ports, "pump_speed") > 10.0
        except ConnectionError:
            return False

    await wait_until(pumping, 30, interval_s=0.2, what="pump running above 10 rpm")


async def _read_until(
    cfg: CartConfig, ports: dict[str, int], signals: tuple[str, ...], until_s: float
) -> list[list[float]]:
    """Each signal, read from the simulator every 0.1 s until the loop time ``until_s``."""
    loop = asyncio.get_running_loop()
    series: list[list[float]] = [[] for _ in signals]
    while loop.time() < until_s:
        for values, name in zip(series, signals, strict=True):
            values.append(await read_signal(cfg, ports, name))
        await asyncio.sleep(0.1)
    return series


async def test_hung_daemon_leaves_a_safe_circuit_and_does_not_restart_the_pump(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """kill -STOP the daemon mid-perfusion: the pump drive's own watchdog stops the pump. After
    kill -CONT the pump stays stopped, in safe_stop, with a high-priority alarm (issue 8.1)."""
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    wd = cfg.devices["pump"].watchdog
    assert wd is not None
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        await _until_pumping(cfg, ports)
        loop = asyncio.get_running_loop()
        daemon.signal(signal.SIGSTOP)
        t_stop = loop.time()

        async def stopped() -> bool:
            return await read_signal(cfg, ports, "pump_speed") < 0.1

        took = await wait_until(
            stopped,
            wd.timeout_s + 2.0,
            interval_s=0.05,
            what="pump stopped by its own watchdog",
        )
        # Watchdog timeout, plus the simulator's 20 ms update and the brake.
        assert took <= wd.timeout_s + 0.3, took
        assert loop.time() - t_stop >= wd.timeout_s - 0.1  # not earlier than the timeout
        await asyncio.sleep(max(0.0, 2.0 - (loop.time() - t_stop)))
        t_cont = loop.time()
        daemon.signal(signal.SIGCONT)

        def interrupted() -> bool:
            alarms = sub.of("/alarms", since_s=t_cont)
            return bool(alarms) and any(
                a["id"] == "control_interrupted" and a["priority"] == "high"
                for a in alarms[-1].payload["alarms"]
            )

        await wait_until(interrupted, 5, what="control_interrupted on the alarms topic")
        # The command register still holds the speed written before the stall until the resumed
        # daemon's first write (the link no longer rewrites that stale command itself:
        # tests/test_modbus_link.py); that write is 0, within a tick or two of the alarm.

        async def commanded_zero() -> bool:
            return await read_signal(cfg, ports, cfg.control.flow.command) == 0.0

        await wait_until(commanded_zero, 1.0, interval_s=0.02, what="pump commanded 0")
        # For 3 s after resuming: the pump neither turns nor is commanded.
        speeds, commands = await _read_until(
            cfg, ports, ("pump_speed", cfg.control.flow.command), t_cont + 3.0
        )
        assert max(speeds) < 0.5, speeds  # tacho noise around 0
        assert max(commands) == 0.0, commands
        # The first state after SIGCONT may be the one offered just before SIGSTOP; from the
        # first tick after the stall on, the phase is safe_stop and the pump command 0.
        states = sub.of("/state", since_s=t_cont)
        first = next(i for i, m in enumerate(states) if m.payload["phase"] == "safe_stop")
        assert all(m.payload["phase"] == "safe_stop" for m in states[first:])
        assert all(m.payload["outputs"]["pump_speed_rpm"] == 0.0 for m in states[first:])
        assert len(states) - first >= 2


async def test_frozen_devices_stop_the_procedure_and_the_pump_does_not_restart_when_they_thaw(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """kill -STOP the simulator (all three Modbus devices and the plant freeze, their sockets
    stay open) mid-perfusion for 4 s: the daemon raises pump_link_lost and heater_link_lost
    within a second (devices.*.watchdog: 1.0 s; the link alarm at 0.75 of it), goes to
    safe_stop, and after kill -CONT the devices answer again but the pump stays stopped and the
    heater off, the link alarms latched, until the operator resets and resumes."""
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    async with session(sub) as procs:
        procs.append(sim := Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        await _until_pumping(cfg, ports)
        loop = asyncio.get_running_loop()
        sim.signal(signal.SIGSTOP)
        t_stop = loop.time()

        def active(since_s: float) -> dict[str, str]:
            alarms = sub.of("/alarms", since_s=since_s)
            if not alarms:
                return {}
            return {a["id"]: a["presence"] for a in alarms[-1].payload["alarms"]}

        took = await wait_until(
            lambda: {"pump_link_lost", "heater_link_lost"} <= active(t_stop).keys(),
            5,
            what="pump_link_lost and heater_link_lost on the alarms topic",
        )
        assert took <= 1.0, took
        await asyncio.sleep(max(0.0, 4.0 - (loop.time() - t_stop)))
        sim.signal(signal.SIGCONT)
        t_cont = loop.time()
        # The devices answer again (device_comms clears), the procedure stays stopped.
        await wait_until(
            lambda: "device_comms" not in active(t_cont) and bool(active(t_cont)),
            5,
            what="device_comms cleared after the simulator resumes",
        )
        speeds, heater_pct = await _read_until(
            cfg, ports, ("pump_speed", cfg.control.temperature.command), t_cont + 4.0
        )
        assert max(speeds) < 0.5, speeds  # tacho noise around 0
        assert max(heater_pct) == 0.0, heater_pct
        presence = active(t_cont)
        assert presence["pump_link_lost"] == "latched", presence
        assert presence["heater_link_lost"] == "latched", presence
        states = sub.of("/state", since_s=t_cont + 1.0)
        assert len(states) >= 2
        assert all(m.payload["phase"] == "safe_stop" for m in states)
        assert all(m.payload["outputs"]["pump_speed_rpm"] == 0.0 for m in states)


async def test_daemon_refuses_to_start_when_a_device_watchdog_is_off(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port)
    ports = {name: dev.port for name, dev in cfg.devices.items()}
    with processes() as procs:
        procs.append(
            Proc(["sim", "-c", str(cfg_path), "--watchdog-off", "pump"], tmp_path / "sim.log")
        )
        procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        rc = await asyncio.to_thread(daemon.wait, 30)
        log = daemon.log()
        assert rc == 3, log
        assert (
            "refusing to start: device 'pump' watchdog register 'pump_watchdog' "
            "(holding 10) reads back 0 s after writing 1 s: the watchdog is off"
        ) in log
        assert await read_signal(cfg, ports, cfg.control.flow.command) == 0.0
        assert await read_signal(cfg, ports, "pump_speed") < 0.5  # tacho noise around 0


async def test_fault_over_mqtt_raises_the_alarm_on_the_alarms_topic(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path)], tmp_path / "sim.log"))
        procs.append(Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        await wait_until(
            lambda: any(m.payload.get("phase") == "perfusion" for m in sub.of("/state")),
            30,
            what="perfusion",
        )
        import aiomqtt

        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(
                f"{prefix}/sim/fault", b'{"kind": "air", "duration_s": 0.5}', qos=1
            )
        loop = asyncio.get_running_loop()
        t_sent = loop.time()

        def air_alarm() -> bool:
            return any(
                a["id"] == "air_detected" and a["priority"] == "high"
                for m in sub.of("/alarms", t_sent)
                for a in m.payload["alarms"]
            )

        took = await wait_until(air_alarm, 5, what="air_detected on the alarms topic")
        assert took < 1.0, took
        onset = [
            m.payload
            for m in sub.of("/events", t_sent)
            if m.payload["kind"] == "onset" and m.payload["alarm_id"] == "air_detected"
        ]
        assert len(onset) == 1
        assert "pump stopped" in onset[0]["message"]

        def pump_off() -> bool:
            states = sub.of("/state", t_sent + took + 0.2)
            return bool(states) and states[-1].payload["outputs"]["pump_speed_rpm"] == 0.0

        await wait_until(pump_off, 3, what="state shows the pump stopped")
