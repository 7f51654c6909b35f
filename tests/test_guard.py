"""`ilup guard` proves its independence with real processes (issue 12 part 2).

The simulator runs in this test's event loop (SimulatedCart, the same code as `ilup sim`), so
the plant's true pressure, pump speed and heater power are read directly, every 5 ms. The guard,
the broken controller and the daemon are real processes talking Modbus TCP to it, and Mosquitto
a real broker. Figures are printed for the issue note (`pytest tests/test_guard.py -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from procs import Proc, Subscriber, read_signal, session, write_cart_config

from ilup_controller.broker import MosquittoProcess, free_port
from ilup_controller.config import CartConfig
from ilup_controller.config.loader import parse_yaml
from ilup_controller.guard.runner import limits_of
from sim.faults import parse_runtime_fault
from sim.runner import SimulatedCart

pytestmark = pytest.mark.integration

FULL_RPM = 25.0  # the broken controller's "full speed" (22 mmHg on an open line)


def guard_overrides(*, enables: bool, **extra: Any) -> dict[str, Any]:
    """config/guard.yaml on a free port; without enables: the weaker form."""
    text = Path("config/guard.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = parse_yaml(text, "config/guard.yaml")
    data["devices"]["safety_io"]["port"] = free_port()
    if not enables:
        del data["guard"]["pump_enable"], data["guard"]["heater_enable"]
        del data["simulator"]
    data["guard"].update(extra)
    return data


@dataclass
class Truth:
    """The plant sampled every 5 ms: (loop time, pressure, pump speed, heater W, pump cut)."""

    cart: SimulatedCart
    rows: list[tuple[float, float, float, float, bool]] = field(default_factory=list)

    def pump_cut(self) -> bool:
        p = self.cart.plant
        return not p.pump_enabled or p.pump_speed_command_rpm == 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            p = self.cart.plant
            self.rows.append(
                (
                    loop.time(),
                    p.line_pressure_mmhg,
                    p.pump_speed_rpm,
                    p.heater_delivered_w,
                    self.pump_cut(),
                )
            )
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def simulated(cfg: CartConfig) -> AsyncIterator[Truth]:
    cart = SimulatedCart(cfg)
    stop = asyncio.Event()
    runner = asyncio.create_task(cart.run(stop))
    truth = Truth(cart)
    sampler = asyncio.create_task(truth.run())
    try:
        yield truth
    finally:
        sampler.cancel()
        stop.set()
        await asyncio.gather(runner, sampler, return_exceptions=True)


def broken_controller(
    cfg_path: Path, log: Path, heater_pct: float = 0.0
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "tests/broken_controller.py",
            str(cfg_path),
            str(FULL_RPM),
            str(heater_pct),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("enables", [True, False], ids=["enable_channel", "weaker_form"])
async def test_guard_stops_a_broken_controller_against_an_occlusion(
    tmp_path: Path, mosquitto: MosquittoProcess, enables: bool
) -> None:
    cfg_path, cfg = write_cart_config(
        tmp_path, mosquitto.port, overrides=guard_overrides(enables=enables)
    )
    lim = limits_of(cfg)
    stop_mmhg = lim.pressure_stop_mmhg
    sub = Subscriber(mosquitto.port, f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/guard/#")
    async with simulated(cfg) as truth, session(sub) as procs:
        plant = truth.cart.plant
        double = broken_controller(cfg_path, tmp_path / "broken.log")
        try:
            procs.append(Proc(["guard", "-c", str(cfg_path)], tmp_path / "guard.log"))
            await wait_until(
                lambda: plant.pump_speed_rpm >= FULL_RPM - 0.5, 15, what="pump at full speed"
            )
            await wait_until(lambda: bool(sub.of("/guard")), 10, what="guard status")
            await wait_until(lambda: plant.line_pressure_mmhg > 21.0, 5, what="pressure settled")
            assert plant.line_pressure_mmhg < stop_mmhg - 5.0  # an open line: no hazard yet
            assert not truth.pump_cut()

            # Kinked line downstream of the sensor, the controller keeps full speed.
            t_occlusion = asyncio.get_running_loop().time()
            truth.cart.injector.apply(
                parse_runtime_fault(json.dumps({"kind": "occlusion", "factor": 2.5}).encode())
            )
            await wait_until(truth.pump_cut, 5, what="the guard cuts the pump")
            await asyncio.sleep(1.5)  # the controller goes on writing full speed
        finally:
            double.kill()
            double.wait()
        rows = [r for r in truth.rows if r[0] >= t_occlusion]
        cross = next(r for r in rows if r[1] >= stop_mmhg)
        cut = next(r for r in rows if r[4])
        before = [r for r in rows if cross[0] - 0.1 <= r[0] <= cross[0]]
        rate = (before[-1][1] - before[0][1]) / (before[-1][0] - before[0][0])
        reaction_s = cut[0] - cross[0]
        peak = max(r[1] for r in rows)
        after = [r for r in rows if r[0] >= cut[0] + 0.3]
        form = "enable channel" if enables else "weaker form (guard writes 0)"
        print(
            f"\nguard vs broken controller, {form}: true pressure crossed {stop_mmhg:g} mmHg "
            f"rising {rate:.1f} mmHg/s; pump cut {reaction_s * 1000:.0f} ms later (budget "
            f"{lim.budget_s:g} s + cycle {cfg.guard.cycle_s:g} s); true peak {peak:.2f} mmHg; "  # type: ignore[union-attr]
            f"pump speed afterwards max {max(r[2] for r in after):.2f} rpm"
        )
        assert reaction_s <= lim.budget_s + 2 * cfg.guard.cycle_s + 0.1  # type: ignore[union-attr]
        assert peak < stop_mmhg + 5.0
        if enables:  # the drive's run-enable is off: it does not turn, whatever it is told
            assert max(r[2] for r in after) == 0.0
            assert plant.pump_speed_command_rpm == FULL_RPM
        else:  # the guard's zeros against the controller's full speed: it barely turns
            assert max(r[2] for r in after) < 3.0
        events = [m.payload for m in sub.of("/guard/events")]
        latched = [e for e in events if e["kind"] == "latched"]
        assert len(latched) == 1
        assert latched[0]["message"].startswith("pump held off: PA pressure")
        status = sub.of("/guard")[-1].payload
        assert status["online"] is True
        assert "pump" in status["latched"]
        assert status["form"]["pump"] == ("enable" if enables else "command")
        if enables:
            await reset_through_the_cli(cfg_path, truth)


async def write_safe_values(cfg: CartConfig) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    from ilup_controller.modbus.codec import encode

    for name in (cfg.control.flow.command, cfg.control.temperature.command):
        sig = cfg.signals[name]
        dev = cfg.devices[sig.device]
        client = AsyncModbusTcpClient(dev.host, port=dev.port, timeout=1, retries=0)
        assert await client.connect()
        rsp = await client.write_registers(sig.address, encode(sig, 0.0), device_id=dev.unit_id)
        assert not rsp.isError()
        client.close()


async def reset_through_the_cli(cfg_path: Path, truth: Truth) -> None:
    """`ilup guard-reset`: refused while a pump hazard persists, then the enable closes."""
    plant = truth.cart.plant
    args = [sys.executable, "-m", "ilup_controller", "guard-reset", "-c", str(cfg_path)]
    truth.cart.injector.apply(parse_runtime_fault(b'{"kind": "air"}'))
    await asyncio.sleep(0.2)
    refused = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True)
    assert refused.returncode == 5, refused.stdout + refused.stderr
    assert "guard reset rejected: refused: air in the inflow line" in refused.stderr
    assert plant.pump_enabled is False
    truth.cart.injector.clear("all")
    await write_safe_values(truth.cart.cfg)  # the controller, restarted, writes its safe values
    await wait_until(lambda: plant.line_pressure_mmhg < 25.0, 10, what="occlusion drained")
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "guard reset ok"
    await wait_until(lambda: plant.pump_enabled, 1.0, what="the enable closed again")


@pytest.mark.parametrize("enables", [True, False], ids=["enable_channel", "weaker_form"])
async def test_guard_stops_a_stuck_heater_of_a_hung_daemon_and_the_daemon_alarms_without_guard(
    tmp_path: Path, mosquitto: MosquittoProcess, enables: bool
) -> None:
    """(b) The daemon SIGSTOPped while the heater element is stuck on: its heartbeat stops, the
    guard opens the heater contactor (the device watchdog alone zeroes a command the stuck
    element ignores). In the weaker form the guard writes heater 0 itself, which a stuck
    element ignores too: the limit the docs state. (c) The guard killed: the daemon raises
    guard_absent."""
    cfg_path, cfg = write_cart_config(
        tmp_path, mosquitto.port, ramp_s=2.0, overrides=guard_overrides(enables=enables)
    )
    assert cfg.guard is not None
    lim = limits_of(cfg)
    sub = Subscriber(mosquitto.port, f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/#")
    loop = asyncio.get_running_loop()

    def live_alarms(since_s: float) -> list[list[str]]:
        return [m.payload["active_alarms"] for m in sub.of("/state", since_s)]

    async with simulated(cfg) as truth, session(sub) as procs:
        plant = truth.cart.plant
        procs.append(guard := Proc(["guard", "-c", str(cfg_path)], tmp_path / "guard.log"))
        procs.append(daemon := Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        await wait_until(
            lambda: plant.heater_command_pct > 0.0 and plant.pump_speed_rpm > 3.0,
            30,
            what="daemon pumping and heating",
        )
        t_seen = loop.time()
        await asyncio.sleep(1.0)  # the daemon has seen the guard: no alarm about it
        assert live_alarms(t_seen)
        assert all("guard_absent" not in a for a in live_alarms(t_seen))

        # (b) Heater element stuck on, then the daemon hangs.
        truth.cart.injector.apply(parse_runtime_fault(b'{"kind": "heater_stuck_on"}'))
        t_stop = loop.time()
        daemon.signal(signal.SIGSTOP)
        heater_cmd = cfg.control.temperature.command
        ports = {name: dev.port for name, dev in cfg.devices.items()}
        try:
            if enables:

                def off_rows() -> list[float]:
                    return [r[0] for r in truth.rows if r[0] >= t_stop and r[3] == 0.0]

                await wait_until(lambda: bool(off_rows()), 5, what="heater at 0 W")
                t_off = off_rows()[0]
                await asyncio.sleep(1.0)
                # The element is stuck and the device watchdog zeroed its command long ago
                # (1 s): only the open contactor keeps it at 0 W.
                assert plant.heater_stuck_on
                assert plant.heater_enabled is False
                assert max(r[3] for r in truth.rows if r[0] >= t_off) == 0.0
                what = "heater at 0 W"
            else:
                # The heater's own watchdog zeroes its command register 1 s after the daemon's
                # last write, so the register no longer shows the heater on; the guard saw it
                # on after the daemon's last heartbeat, and latches it all the same (before
                # the register was zeroed, it latched nothing here: guard/decide.py).

                def latched_at() -> float | None:
                    return next(
                        (m.at_s for m in sub.of("/guard", t_stop) if m.payload["latched"]),
                        None,
                    )

                await wait_until(lambda: latched_at() is not None, 5, what="heater latched")
                t_off = latched_at() or 0.0
                assert await read_signal(cfg, ports, heater_cmd) == 0.0
                # The stuck element still at full power: the weaker form cannot stop what
                # ignores its command.
                assert plant.heater_delivered_w == plant.params.heater_power_w
                what = "heater latched, command 0 (element still stuck at full power)"
            await wait_until(
                lambda: "heater" in sub.of("/guard")[-1].payload["latched"], 2, what="status"
            )
            assert "heartbeat" in sub.of("/guard")[-1].payload["latched"]["heater"]
        finally:
            daemon.signal(signal.SIGCONT)
        off_s = t_off - t_stop
        budget_s = lim.heartbeat_s + lim.budget_s
        print(
            f"\nguard vs hung daemon: {what} {off_s * 1000:.0f} ms after SIGSTOP "
            f"(heartbeat {lim.heartbeat_s:g} s + budget {lim.budget_s:g} s)"
        )
        # The daemon's last heartbeat write may precede the SIGSTOP by up to one tick, and the
        # guard times the heartbeat from the cycle that saw it change.
        earliest_s = budget_s - cfg.control.tick_period_s
        assert earliest_s <= off_s <= budget_s + 2 * cfg.guard.cycle_s + 0.2

        # (c) The guard killed: the broker publishes its will, the daemon raises guard_absent.
        t_kill = loop.time()
        guard.signal(signal.SIGKILL)
        await wait_until(
            lambda: any("guard_absent" in a for a in live_alarms(t_kill)),
            10,
            what="guard_absent in the daemon's state",
        )
        first = next(
            m for m in sub.of("/state", t_kill) if "guard_absent" in m.payload["active_alarms"]
        )
        print(f"guard killed: daemon alarm guard_absent after {first.at_s - t_kill:.2f} s")
        assert first.at_s - t_kill <= cfg.guard.status_timeout_s + 1.0

        def alarm() -> list[dict[str, Any]]:
            return [
                a
                for m in sub.of("/alarms", t_kill)
                for a in m.payload["alarms"]
                if a["id"] == "guard_absent"
            ]

        await wait_until(lambda: bool(alarm()), 5, what="guard_absent on the alarms topic")
        assert alarm()[0]["priority"] == "medium"
        assert "not watching this cart" in alarm()[0]["message"]


async def test_guard_opens_the_contactor_of_a_welded_heater_under_a_live_daemon(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """A welded relay with a failed thermostat while the daemon runs: the daemon reads the water
    over its setpoint and commands 0, which changes nothing. The water's rise under that 0 counts
    as on (guard/decide.py), so the guard opens the heater contactor once the water hazard has
    lasted its budget; before, the 0 made the heater "off" and the water rose unchecked. The
    water cap is 37.5 degC and the bath 0.5 kg here, so it comes within seconds."""
    water_max_c = 37.5
    overrides = guard_overrides(enables=True, water_max_c=water_max_c)
    overrides["simulator"]["plant"] = {"water_mass_kg": 0.5}
    overrides["control"] = {"temperature": {"water_cap_c": water_max_c}}
    cfg_path, cfg = write_cart_config(tmp_path, mosquitto.port, ramp_s=2.0, overrides=overrides)
    assert cfg.guard is not None
    lim = limits_of(cfg)
    sub = Subscriber(mosquitto.port, f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/#")
    async with simulated(cfg) as truth, session(sub) as procs:
        plant = truth.cart.plant
        procs.append(Proc(["guard", "-c", str(cfg_path)], tmp_path / "guard.log"))
        procs.append(Proc(["run", "-c", str(cfg_path)], tmp_path / "daemon.log"))
        await wait_until(
            lambda: plant.heater_command_pct > 0.0 and plant.pump_speed_rpm > 3.0,
            30,
            what="daemon pumping and heating",
        )
        assert plant.water_c < water_max_c - 1.5, plant.water_c
        t_stuck = asyncio.get_running_loop().time()
        truth.cart.injector.apply(
            parse_runtime_fault(b'{"kind": "heater_stuck_on", "thermostat_failed": true}')
        )
        crossed: list[float] = []

        def cut() -> bool:
            if not crossed and plant.water_c >= water_max_c:
                crossed.append(asyncio.get_running_loop().time())
            return not plant.heater_enabled

        await wait_until(cut, 60, interval_s=0.01, what="heater contactor opened")
        t_cut = asyncio.get_running_loop().time()
        peak_c = plant.water_c
        await wait_until(
            lambda: "heater" in sub.of("/guard")[-1].payload["latched"], 2, what="status"
        )
        latched = sub.of("/guard")[-1].payload["latched"]
        assert list(latched) == ["heater"], latched
        assert latched["heater"].startswith("water "), latched
        # The daemon stayed alive: its state went on through the whole rise.
        assert len(sub.of("/state", t_cut - 3.0)) >= 3
        await asyncio.sleep(0.5)
        assert plant.heater_delivered_w == 0.0
        assert plant.heater_stuck_on
    assert crossed
    print(
        f"\nwelded heater, live daemon: water {water_max_c:g} degC crossed "
        f"{crossed[0] - t_stuck:.1f} s after the weld, contactor open "
        f"{(t_cut - crossed[0]) * 1000:.0f} ms later (budget {lim.budget_s:g} s), true water "
        f"{peak_c:.2f} degC then"
    )
    assert t_cut - crossed[0] <= lim.budget_s + 2 * cfg.guard.cycle_s + 0.3
    assert peak_c <= water_max_c + 0.2


async def test_a_restarted_guard_keeps_an_enable_it_finds_off(tmp_path: Path) -> None:
    """A guard that starts (or restarts) with an enable off latches it: it never releases what
    an earlier guard held off, until an operator resets it. In process, against the simulator."""
    from ilup_controller.guard.runner import Guard

    _, cfg = write_cart_config(tmp_path, free_port(), overrides=guard_overrides(enables=True))
    async with simulated(cfg) as truth:
        plant = truth.cart.plant
        await wait_until(lambda: truth.cart.servers.ports() != {}, 5, what="simulator serving")
        await asyncio.sleep(0.1)
        enable = cfg.signals["pump_run_enable"]
        guard = Guard(cfg)
        device = guard.devices[enable.device]
        assert await device.write(enable, False)  # as an earlier guard left it
        loop = asyncio.get_running_loop()
        d = await guard.cycle(loop.time())
        assert d.state.latched == {"pump": "held off when the guard started (enable found off)"}
        assert d.enabled == {"pump": False, "heater": True}
        await guard.cycle(loop.time() + 0.05)
        assert plant.pump_enabled is False  # not written back on
        assert plant.heater_enabled is True
        for dev in guard.devices.values():
            dev.close()


def test_the_simulated_enables_stop_the_pump_and_the_heater_whatever_their_commands() -> None:
    """sim/plant.py: a drive whose run-enable is off does not turn; an open heater contactor
    gives 0 W, even with the element stuck on."""
    from ilup_controller.config import load_config
    from sim.plant import Plant

    cfg = load_config("config/sim.yaml", ["config/guard.yaml"])
    assert cfg.simulator is not None
    plant = Plant(cfg.simulator.plant)
    plant.set_pump_speed_command(20.0)
    plant.set_heater_power_command(50.0)
    plant.step(2.0)
    assert plant.pump_speed_rpm == 20.0
    assert plant.heater_delivered_w == 400.0
    plant.pump_enabled = False
    plant.heater_enabled = False
    plant.heater_stuck_on = True
    water_c = plant.water_c
    plant.step(0.1)  # brakes at 200 rpm/s: 20 rpm stop within 0.1 s
    assert plant.pump_speed_rpm == 0.0
    assert plant.heater_delivered_w == 0.0
    plant.step(10.0)
    assert plant.pump_speed_rpm == 0.0
    assert plant.water_c < water_c  # no heat in, only losses


def test_an_mqtt_heartbeat_comes_from_the_daemon_state_seq() -> None:
    from ilup_controller.config import load_config
    from ilup_controller.guard.runner import Guard

    overlay = {"heartbeat": "mqtt", "heartbeat_signal": None}
    cfg = load_config("config/sim.yaml", ["config/guard.yaml"])
    cfg = cfg.model_copy(update={"guard": cfg.guard.model_copy(update=overlay)})  # type: ignore[union-attr]
    guard = Guard(cfg)
    assert "controller_heartbeat" not in {
        n for d in guard.devices.values() for b in d.blocks for n, *_ in b.members
    }
    assert guard.inputs({}, 1.0).heartbeat is None
    guard.mqtt_seq = 41
    x = guard.inputs({"pa_pressure": 200.0, "pump_speed_setpoint": 0.0}, 1.0)
    assert x.heartbeat == 41
    assert x.pressure_mmhg is None  # outside its signal range [-20, 150]: unreadable, not a value
    assert x.pump_on is False
    assert x.heater_on is True  # its command unreadable: counted as on


async def test_ilup_tune_counts_the_heartbeat_so_a_running_guard_lets_it_work(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """`ilup tune` drives the pump like the daemon does, so it counts the heartbeat register
    too: with the guard running, the flow step test completes and the guard latches nothing
    (without the count it latched the pump off: "controller heartbeat unchanged")."""
    cfg_path, cfg = write_cart_config(
        tmp_path, mosquitto.port, overrides=guard_overrides(enables=True)
    )
    sub = Subscriber(mosquitto.port, f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}/guard/#")
    out = tmp_path / "tuned.yaml"
    async with session(sub) as procs:
        procs.append(Proc(["sim", "-c", str(cfg_path), "--speed", "5"], tmp_path / "sim.log"))
        procs.append(Proc(["guard", "-c", str(cfg_path)], tmp_path / "guard.log"))
        await wait_until(lambda: bool(sub.of("/guard")), 15, what="guard status")
        tune = Proc(
            ["tune", "-c", str(cfg_path), "--loop", "flow", "--time-scale", "5", "-o", str(out)],
            tmp_path / "tune.log",
        )
        procs.append(tune)
        rc = await asyncio.to_thread(tune.wait, 120)
        assert rc == 0, tune.log()[-3000:]
        statuses = [m.payload for m in sub.of("/guard")]
    assert len(statuses) >= 5  # the guard was up and publishing throughout
    assert all(not s["latched"] for s in statuses), [s["latched"] for s in statuses if s["latched"]]
    assert out.exists()
