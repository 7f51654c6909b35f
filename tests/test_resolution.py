"""Each value at its signal's resolution (config/resolution.py): the decimals of one raw step."""

from __future__ import annotations

import pytest

from ilup_controller.config import load_config
from ilup_controller.config.models import DataType, Signal, Table
from ilup_controller.config.resolution import (
    at_resolution,
    field_decimals,
    recorded_decimals,
    rounded,
    signal_decimals,
)
from ilup_controller.record.recorder import config_json_of


@pytest.mark.parametrize(
    ("data_type", "scale", "offset", "decimals"),
    [
        (DataType.int16, 0.01, 0.0, 2),
        (DataType.uint16, 0.1, 0.0, 1),
        (DataType.uint16, 1.0, 0.0, 0),
        (DataType.uint16, 0.05, 0.0, 2),
        (DataType.uint16, 10.0, 0.0, 0),
        (DataType.int16, 1.0, -0.5, 1),
        (DataType.float32, 1.0, 0.0, 2),
    ],
)
def test_decimals_of_one_raw_step(
    data_type: DataType, scale: float, offset: float, decimals: int
) -> None:
    sig = Signal(
        device="io", table=Table.input, address=0, data_type=data_type, scale=scale, offset=offset
    )
    assert signal_decimals(sig) == decimals


def test_sim_cart_fields_round_to_their_signals() -> None:
    cfg = load_config("config/sim.yaml")
    d = field_decimals(cfg)
    assert (d["pressure_mmhg"], d["temperature_c"], d["reservoir_volume_ml"]) == (2, 2, 0)
    assert (d["pump_speed_rpm"], d["heater_pct"], d["flow_ml_min"]) == (2, 1, 2)
    assert at_resolution(3.7800000000000002, "pressure_mmhg", d) == 3.78
    assert repr(at_resolution(173.45156860351562, "flow_ml_min", d)) == "173.45"
    assert repr(at_resolution(-0.001, "pressure_mmhg", d)) == "0.0"  # never "-0.0"
    assert rounded(None, "flow_ml_min", d) is None
    assert recorded_decimals(config_json_of(cfg)) == d  # the CSV and report see the same
    assert recorded_decimals("not json") == {}
