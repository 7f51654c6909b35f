"""The simulator's devices against a Modbus master we did not write: mbpoll (Debian's `mbpoll`),
run as a real process against `ilup sim` on free ports. It decodes the registers by the cart
file's map with its own code (PDU addresses, int16/uint16 scales, float32 in big-endian word
order) and drives the pump and heater the way a commissioning engineer's tool would, so the
device-side watchdog is checked without any of our Modbus client code in the loop."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Proc, processes, write_cart_config

from ilup_controller.broker import free_port
from ilup_controller.config import CartConfig

_VALUE = re.compile(r"^\[(\d+)\]:\s+(\S+)", re.MULTILINE)


def _mbpoll_args(cfg: CartConfig, signal: str) -> list[str]:
    """mbpoll's arguments for one signal, from the cart file's map (value to write not included)."""
    exe = shutil.which("mbpoll")
    assert exe is not None, "mbpoll is not installed (scripts/system-deps.sh installs it)"
    sig = cfg.signals[signal]
    dev = cfg.devices[sig.device]
    table = {"input": "3", "holding": "4"}[sig.table]
    if sig.data_type == "float32":
        table += ":float"
    args = [exe, "-m", "tcp", "-p", str(dev.port), "-a", str(dev.unit_id), "-0", "-1"]
    args += ["-t", table, "-r", str(sig.address), "-o", "1"]
    if sig.data_type == "float32":
        assert sig.word_order == "big"
        args.append("-B")
    return [*args, dev.host]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)


def mbpoll(cfg: CartConfig, signal: str, write: float | None = None) -> float:
    """Read (or write) one signal with mbpoll, from the cart file's map; the decoded value."""
    sig = cfg.signals[signal]
    args = _mbpoll_args(cfg, signal)
    if write is not None:
        args.append(str(round(write / sig.scale)))
    out = _run(args)
    assert out.returncode == 0, f"mbpoll {' '.join(args[1:])}: {out.stdout}{out.stderr}"
    if write is not None:
        assert "Written 1 references" in out.stdout, out.stdout
        return write
    found = _VALUE.findall(out.stdout)
    assert [int(ref) for ref, _ in found] == [sig.address], out.stdout
    raw = float(found[0][1])
    if sig.data_type == "int16" and raw >= 0x8000:  # mbpoll prints 16-bit registers unsigned
        raw -= 0x10000
    return raw if sig.data_type == "float32" else raw * sig.scale


def mean_of(cfg: CartConfig, signal: str, n: int = 5) -> float:
    return statistics.fmean(mbpoll(cfg, signal) for _ in range(n))


def drive(cfg: CartConfig, signal: str, value: float, seconds: float) -> None:
    """Write ``value`` every 0.3 s for ``seconds``, as a master that keeps its device alive."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        mbpoll(cfg, signal, write=value)
        time.sleep(0.3)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartConfig]:
    tmp = tmp_path_factory.mktemp("mbpoll")
    path, cfg = write_cart_config(tmp, free_port())
    with processes() as procs:
        procs.append(Proc(["sim", "-c", str(path)], tmp / "sim.log"))
        deadline = time.monotonic() + 20.0
        while True:
            try:
                mbpoll(cfg, "perfusate_temp")
                break
            except AssertionError as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"simulator not serving:\n{procs[0].log()[-3000:]}") from e
                time.sleep(0.2)
        yield cfg
        log = Path(tmp / "sim.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


def test_third_party_master_reads_the_declared_map(sim: CartConfig) -> None:
    """At rest (pump stopped, heater off) the plant is at its initial state: 34 degC perfusate
    and water, 800 mL in the reservoir, no flow, the line at the 3 mmHg outflow pressure plus
    the transducer's 0.3 mmHg zero offset."""
    plant = sim.simulator.plant if sim.simulator else None
    assert plant is not None
    assert abs(mean_of(sim, "perfusate_temp") - plant.initial_perfusate_c) < 0.05
    assert abs(mean_of(sim, "heater_water_temp") - plant.initial_water_c) < 0.05
    assert abs(mean_of(sim, "reservoir_volume") - plant.reservoir_volume_ml) < 5.0
    assert abs(mean_of(sim, "flow")) < 10.0  # float32, big-endian words; noise 3 mL/min
    at_rest_mmhg = plant.outflow_pressure_mmhg + plant.pressure_offset_mmhg
    assert abs(mean_of(sim, "pa_pressure") - at_rest_mmhg) < 0.5
    assert mbpoll(sim, "pump_speed") < 0.3  # the tacho's noise (0.05 rpm) around 0


def test_pump_runs_while_written_and_its_watchdog_stops_it(sim: CartConfig) -> None:
    """30 rpm x 33 mL/rev = 990 mL/min while mbpoll keeps writing; 1 s after its last write the
    drive's own watchdog stops the pump (sim.yaml: pump watchdog 1.0 s)."""
    mbpoll(sim, "pump_watchdog", write=1.0)
    assert mbpoll(sim, "pump_watchdog") == pytest.approx(1.0)
    drive(sim, "pump_speed_setpoint", 30.0, seconds=4.0)
    assert mbpoll(sim, "pump_speed") == pytest.approx(30.0, abs=0.5)
    expected_ml_min = 30.0 * sim.control.flow.stroke_volume_ml_per_rev
    assert mean_of(sim, "flow", 3) == pytest.approx(expected_ml_min, rel=0.05)
    assert mbpoll(sim, "pa_pressure") > 5.0  # the lung is perfused
    time.sleep(2.5)  # no write: watchdog 1 s, then the drive's stop
    assert mbpoll(sim, "pump_speed") < 0.3  # the tacho's noise (0.05 rpm) around 0
    assert abs(mean_of(sim, "flow")) < 10.0
    # Its speed register reads what it does (it kept the 30 rpm command before, sim/watchdog.py).
    assert mbpoll(sim, "pump_speed_setpoint") == 0.0


def test_a_setpoint_outside_the_maps_range_is_refused_as_a_real_drive_would(
    sim: CartConfig,
) -> None:
    """650 rpm (raw 65000) to a drive mapped 0-200 rpm: Modbus exception 3, illegal data value,
    and nothing runs; the register keeps its last value. Before, the simulated drive took it and
    slewed to 15.5 rpm in 0.5 s."""
    mbpoll(sim, "pump_watchdog", write=1.0)
    sig = sim.signals["pump_speed_setpoint"]
    assert sig.range == (0.0, 200.0)
    before_rpm = mbpoll(sim, "pump_speed_setpoint")
    out = _run([*_mbpoll_args(sim, "pump_speed_setpoint"), str(round(650.0 / sig.scale))])
    assert out.returncode != 0
    assert "Illegal data value" in out.stdout + out.stderr, out.stdout + out.stderr
    assert mbpoll(sim, "pump_speed_setpoint") == before_rpm
    time.sleep(0.5)
    assert mbpoll(sim, "pump_speed") < 0.3  # the tacho's noise (0.05 rpm) around 0
    # A value inside the range is taken as before (mbpoll asserts "Written 1 references").
    mbpoll(sim, "pump_speed_setpoint", write=0.0)


def test_heater_heats_while_written_and_its_watchdog_switches_it_off(sim: CartConfig) -> None:
    """100 % of 800 W into 3 kg of water warms it 0.064 degC/s while mbpoll keeps writing; after
    its last write the heater's watchdog switches it off within 1 s and the water stops rising.
    Off, it only loses heat: about 95 W at 34.35 degC (6 W/K to the 22 degC room, 60 W/K through
    the exchanger to the 34 degC perfusate), 0.0076 degC/s, so about -0.04 degC over the 5 s
    between the two means below (a clean-clone run measured -0.052)."""
    mbpoll(sim, "heater_watchdog", write=1.0)
    before_c = mean_of(sim, "heater_water_temp")
    drive(sim, "heater_power_setpoint", 100.0, seconds=6.0)
    heated_c = mean_of(sim, "heater_water_temp")
    assert heated_c - before_c > 0.25  # at least 0.25 of the 0.38-0.45 degC expected
    time.sleep(1.5)  # watchdog 1 s after the last write
    assert mbpoll(sim, "heater_power_setpoint") == 0.0  # off, and its register says so
    off_c = mean_of(sim, "heater_water_temp", 8)
    time.sleep(4.0)
    later_c = mean_of(sim, "heater_water_temp", 8)
    # Heating on, 4 s would add 0.26 degC (the watchdog left off: +0.23 measured). Off, the water
    # does not rise beyond 3 x the noise of the difference of two means of 8 (0.01), and falls no
    # faster than about 3 x its losses.
    assert -0.15 < later_c - off_c < 0.03
