"""Configuration: good files load, bad files name the key path and exit 4 without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from ilup_controller.config import ConfigError, load_config
from ilup_controller.exitcodes import ExitCode

SIM = Path("config/sim.yaml")


def _ilup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ilup_controller", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _variant(tmp_path: Path, edit: str, value: object) -> Path:
    """config/sim.yaml with one key (dotted path) replaced, or deleted when value is ...."""
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(SIM.read_text())
    *parents, leaf = edit.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    out = tmp_path / "cart.yaml"
    with out.open("w") as f:
        yaml.dump(data, f)
    return out


@pytest.mark.parametrize("path", ["config/sim.yaml", "config/cart.example.yaml"])
def test_shipped_configs_are_valid(path: str) -> None:
    r = _ilup("check-config", path)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize(
    ("edit", "value", "expected"),
    [
        (
            "control.flow.pid",
            {"kp": -1.0},
            "control.flow.pid.kp: Input should be greater than or equal to 0",
        ),
        (
            "control.flow.target_ml_min",
            "fast",
            "control.flow.target_ml_min: Input should be a valid number",
        ),
        (
            "devices.pump.unit_id",
            300,
            "devices.pump.unit_id: Input should be less than or equal to 247",
        ),
        ("devices.io.colour", "red", "devices.io.colour: unknown key"),
        # A typo names the key it is closest to, through maps (devices, signals) and optionals.
        ("devices.io.unitid", 2, "devices.io.unitid: unknown key (did you mean unit_id?)"),
        (
            "devices.pump.watchdog.timeout",
            1.0,
            "devices.pump.watchdog.timeout: unknown key (did you mean timeout_s?)",
        ),
        ("signals.flow.scal", 2.0, "signals.flow.scal: unknown key (did you mean scale?)"),
        (
            "control.temperature.ramp_c_per_mn",
            0.4,
            "control.temperature.ramp_c_per_mn: unknown key (did you mean ramp_c_per_min?)",
        ),
        (
            "control.flow.measured",
            "flow_meter_2",
            "control.flow.measured: no signal named 'flow_meter_2'",
        ),
        (
            "control.temperature.command",
            "flow",
            "control.temperature.command: signal 'flow' is not writable",
        ),
        ("signals.flow.device", "nowhere", "signals.flow.device: no device named 'nowhere'"),
        (
            "signals.pa_pressure.address",
            0,
            "signals.pa_pressure.address: register input 0 on 'io' is also used by 'flow'",
        ),
        ("control.pressure", ..., "control.pressure: required key is missing"),
        (
            "control.temperature.water_cap_c",
            45.0,
            "control.temperature.water_cap_c: Input should be less than or equal to 42",
        ),
        (
            "control.pressure.stop_mmhg",
            20.0,
            "control.pressure: stop_mmhg must be above limit_mmhg",
        ),
        (
            "control.tick_period_s",
            0.5,
            "control: flow.pid (kp 0.02, ki 0.04, kd 0) with tick_period_s 0.5 s and "
            "flow.stroke_volume_ml_per_rev 33: the flow trim would correct 132 % of a flow "
            "error in one tick",
        ),
        (
            "control.temperature.window_rate_c_per_min",
            0.6,
            "control.temperature.window_rate_c_per_min: 0.6 degC/min must lie between "
            "control.temperature.ramp_c_per_min (0.48) and alarms.heating_rate_c_per_min (0.5)",
        ),
    ],
)
def test_bad_config_names_the_key_path(
    tmp_path: Path, edit: str, value: object, expected: str
) -> None:
    bad = _variant(tmp_path, edit, value)
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert any(p.startswith(expected) for p in exc.value.problems), exc.value.problems
    r = _ilup("check-config", str(bad))
    assert r.returncode == ExitCode.CONFIG
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SIM.read_text().replace("unit_id: 1", "unit_id: 1, bogus: 1"))
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert [p for p in exc.value.problems if p.endswith("unknown key")] == [
        "devices.io.bogus: unknown key",
        "devices.pump.bogus: unknown key",
        "devices.heater.bogus: unknown key",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cart_id: a\ncart_id: b\n", 'line 2, column 1: found duplicate key "cart_id"'),
        ("cart_id: [unclosed\n", "line 2"),
        ("- just\n- a list\n", "the top level must be a mapping"),
    ],
)
def test_malformed_yaml(tmp_path: Path, text: str, expected: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = _ilup("check-config", str(bad))
    assert r.returncode == ExitCode.CONFIG
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file() -> None:
    r = _ilup("check-config", "no/such/cart.yaml")
    assert r.returncode == ExitCode.CONFIG
    assert "no/such/cart.yaml: 1 configuration error(s)\n  file not found" in r.stderr
