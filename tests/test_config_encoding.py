"""check-config proves that every register the controller writes can carry what it writes.

Issue 8, defects 3 and 4: a watchdog timeout that encodes to raw 0 (watchdog off), a heater
command whose offset makes its safe value 0 unencodable, a pump command whose scale cannot reach
speed_max_rpm. Each must be refused at load with the key path, exit 4 (config error), no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from procs import merge
from ruamel.yaml import YAML

from ilup_controller.config import ConfigError, load_config
from ilup_controller.exitcodes import ExitCode

SIM = Path("config/sim.yaml")


def _ilup(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ilup_controller", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _broken(tmp_path: Path, changes: Mapping[str, Any]) -> Path:
    """config/sim.yaml with ``changes`` merged in (nested mappings key by key)."""
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(SIM.read_text(encoding="utf-8"))
    merge(data, changes)
    out = tmp_path / "cart.yaml"
    with out.open("w", encoding="utf-8") as f:
        yaml.dump(data, f)
    return out


def _pump_wd(timeout_s: float) -> dict[str, Any]:
    return {"devices": {"pump": {"watchdog": {"timeout_s": timeout_s}}}}


CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        # 0.001 s at 0.01 s per count is raw 0: the drive reads its watchdog as off.
        "watchdog_rounds_to_raw_0",
        _pump_wd(0.001),
        [
            "devices.pump.watchdog.timeout_s: 0.001 s encodes to raw 0 in signal "
            "'pump_watchdog' (uint16, scale 0.01, offset 0): the device would read its "
            "watchdog as off; the smallest timeout it can hold is 0.01 s"
        ],
    ),
    (
        # 0.004 s rounds to raw 0 as well (just under half a step).
        "watchdog_rounds_to_raw_0_just_under_half_step",
        _pump_wd(0.004),
        ["devices.pump.watchdog.timeout_s: 0.004 s encodes to raw 0"],
    ),
    (
        # 10 s at 0.0001 s per count is raw 100000 > 65535.
        "watchdog_out_of_register_range",
        {**_pump_wd(10.0), "signals": {"pump_watchdog": {"scale": 0.0001, "range": None}}},
        [
            "devices.pump.watchdog.timeout_s: 10 s does not fit signal 'pump_watchdog': "
            "value 10.0 (raw 100000) is out of range for uint16"
        ],
    ),
    (
        # An offset of 1 s makes 1 s raw 0: the register reads "off" although 1 s was meant.
        "watchdog_offset_makes_raw_0",
        {"signals": {"heater_watchdog": {"offset": 1.0}}},
        ["devices.heater.watchdog.timeout_s: 1 s encodes to raw 0 in signal 'heater_watchdog'"],
    ),
    (
        "watchdog_outside_signal_range",
        {**_pump_wd(30.0), "signals": {"pump_watchdog": {"range": [0, 20]}}},
        [
            "signals.pump_watchdog.range: [0, 20] does not contain "
            "devices.pump.watchdog.timeout_s = 30 s"
        ],
    ),
    (
        # Safe value 0 % is raw -100 on a uint16: the traceback of `ilup run` in the issue.
        "heater_offset_cannot_encode_0",
        {"signals": {"heater_power_setpoint": {"offset": 10.0, "range": None}}},
        [
            "signals.heater_power_setpoint.offset: command signal cannot encode its safe "
            "value 0: value 0.0 (raw -100) is out of range for uint16"
        ],
    ),
    (
        # 0.0001 rpm per count tops out at 6.5535 rpm; speed_max_rpm is 40.
        "pump_scale_cannot_encode_speed_max",
        {"signals": {"pump_speed_setpoint": {"scale": 0.0001, "range": [0, 6]}}},
        [
            "signals.pump_speed_setpoint.scale: command signal cannot encode "
            "control.flow.speed_max_rpm = 40: value 40.0 (raw 400000) is out of range "
            "for uint16",
            "signals.pump_speed_setpoint.range: [0, 6] does not contain "
            "control.flow.speed_max_rpm = 40",
        ],
    ),
    (
        # 0.001 % per count tops out at 65.535 %; heater_max_pct is 100 by default.
        "heater_scale_cannot_encode_heater_max",
        {"signals": {"heater_power_setpoint": {"scale": 0.001}}},
        [
            "signals.heater_power_setpoint.scale: command signal cannot encode "
            "control.temperature.heater_max_pct = 100: value 100.0 (raw 100000)"
        ],
    ),
    (
        "command_range_excludes_safe_value",
        {"signals": {"heater_power_setpoint": {"range": [5, 100]}}},
        ["signals.heater_power_setpoint.range: [5, 100] does not contain the safe value 0"],
    ),
    (
        # An int16 pump command at 0.01 rpm reaches 327.67 rpm: fine. speed_max 400 is not.
        "speed_max_beyond_int16",
        {
            "signals": {"pump_speed_setpoint": {"data_type": "int16", "range": None}},
            "control": {"flow": {"speed_max_rpm": 400.0}},
        },
        [
            "signals.pump_speed_setpoint.scale: command signal cannot encode "
            "control.flow.speed_max_rpm = 400: value 400.0 (raw 40000) is out of range "
            "for int16"
        ],
    ),
]


@pytest.mark.parametrize(("changes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_unencodable_written_values_are_refused_with_the_key_path(
    tmp_path: Path, changes: dict[str, Any], expected: list[str]
) -> None:
    bad = _broken(tmp_path, changes)
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    for line in expected:
        assert any(p.startswith(line) for p in exc.value.problems), (line, exc.value.problems)
    r = _ilup("check-config", str(bad))
    assert r.returncode == ExitCode.CONFIG, r.stderr
    for line in expected:
        assert line in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "changes",
    [
        _pump_wd(0.006),  # raw 1 = 0.01 s: within one step of 0.006 s, and not 0
        _pump_wd(60.0),
        {"signals": {"pump_speed_setpoint": {"data_type": "int16"}}},  # 327.67 rpm max
        {"control": {"flow": {"speed_max_rpm": 200.0}}},  # the top of range [0, 200]
        {"signals": {"heater_power_setpoint": {"data_type": "float32", "address": 2}}},
    ],
    ids=["wd_0.006", "wd_60", "pump_int16", "speed_max_200", "heater_float32"],
)
def test_encodable_edges_still_load(tmp_path: Path, changes: dict[str, Any]) -> None:
    load_config(_broken(tmp_path, changes))


def test_run_refuses_the_heater_offset_config_with_a_config_exit_not_a_traceback(
    tmp_path: Path,
) -> None:
    """Before: check-config said ok and `ilup run` died with CodecError (exit 1)."""
    bad = _broken(tmp_path, {"signals": {"heater_power_setpoint": {"offset": 10.0}}})
    r = _ilup("run", "-c", str(bad))
    assert r.returncode == ExitCode.CONFIG, r.stderr
    assert "signals.heater_power_setpoint.offset: command signal cannot encode" in r.stderr
    assert "Traceback" not in r.stderr
