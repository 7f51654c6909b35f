"""How many decimals each published value carries: the resolution of the register it comes
from (engineering value = raw * scale + offset, so scale 0.01 gives 2 decimals), or a fixed
precision for values the controller derives. Rounding to it removes float noise
(3.7800000000000002) from the state, the record, the CSV export and the report."""

from __future__ import annotations

from collections.abc import Mapping

from ilup_controller.config.models import CartConfig, DataType, Signal

# A float register (no integer raw step): 0.01 of its unit, finer than any sensor we use.
FLOAT_DECIMALS = 2
# Targets and setpoints the controller computes without a register behind them.
DERIVED_DECIMALS = 2
# Timers (drug phase): a tenth of a second.
TIME_DECIMALS = 1
_MAX_DECIMALS = 6


def _decimals_of(step: float) -> int:
    for n in range(_MAX_DECIMALS + 1):
        if abs(round(step, n) - step) <= 1e-9 * max(1.0, abs(step)):
            return n
    return _MAX_DECIMALS


def signal_decimals(sig: Signal) -> int:
    """Decimals of one raw step of ``sig`` in engineering units."""
    if sig.data_type is DataType.float32:
        return max(FLOAT_DECIMALS, _decimals_of(sig.offset))
    return max(_decimals_of(abs(sig.scale)), _decimals_of(sig.offset))


def field_decimals(cfg: CartConfig) -> dict[str, int]:
    """Decimals of every numeric column of a state sample, keyed by the record's column names
    (record/store.py SAMPLE_COLUMNS; the state's fields carry the same names)."""
    c = cfg.control

    def of(name: str | None, default: int = DERIVED_DECIMALS) -> int:
        sig = cfg.signals.get(name) if name is not None else None
        return default if sig is None else signal_decimals(sig)

    flow, pressure = of(c.flow.measured), of(c.pressure.measured)
    temperature, water = of(c.temperature.measured), of(c.temperature.water_measured)
    return {
        "t_mono_s": 3,
        "flow_ml_min": flow,
        "pressure_mmhg": pressure,
        "temperature_c": temperature,
        "water_temperature_c": water,
        "pump_speed_rpm_measured": of(c.flow.speed_measured),
        "reservoir_volume_ml": of(c.reservoir_measured),
        "flow_target_ml_min": flow,
        "flow_ramped_ml_min": flow,
        "pressure_limit_mmhg": pressure,
        "temperature_target_c": temperature,
        "temperature_ramped_c": temperature,
        "water_setpoint_c": water,
        "pump_speed_rpm": of(c.flow.command),
        "heater_pct": of(c.temperature.command),
        "drug_elapsed_s": TIME_DECIMALS,
        "drug_remaining_s": TIME_DECIMALS,
    }


def recorded_decimals(config_json: str | None) -> dict[str, int]:
    """field_decimals of a configuration as a record holds it (meta ``config_json``); empty
    (every value at DERIVED_DECIMALS) when it is missing or no longer validates."""
    if not config_json:
        return {}
    try:
        return field_decimals(CartConfig.model_validate_json(config_json))
    except ValueError:  # pydantic's ValidationError is a ValueError
        return {}


def at_resolution(value: float, key: str, decimals: Mapping[str, int]) -> float:
    """``value`` at the resolution of ``key`` (a SAMPLE_COLUMNS name)."""
    return round(value, decimals.get(key, DERIVED_DECIMALS)) + 0.0  # + 0.0: no "-0.0"


def rounded(value: float | None, key: str, decimals: Mapping[str, int]) -> float | None:
    """As at_resolution; None (a missing reading) stays None."""
    return None if value is None else at_resolution(value, key, decimals)
