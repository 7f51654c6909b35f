"""Which register carries which plant quantity: the simulator's half of the config bindings."""

from __future__ import annotations

from ilup_controller.config.models import CartConfig, DataType, Signal
from ilup_controller.modbus.codec import decode, encode
from sim.plant import Plant

_RAW_LIMITS: dict[DataType, tuple[float, float]] = {
    DataType.uint16: (0, 0xFFFF),
    DataType.int16: (-0x8000, 0x7FFF),
    DataType.uint32: (0, 0xFFFFFFFF),
    DataType.int32: (-0x80000000, 0x7FFFFFFF),
    DataType.float32: (-3.0e38, 3.0e38),
    DataType.bool: (0, 1),
}


def saturate(signal: Signal, value: float) -> float:
    """Clip to what the register can carry, as a real transducer saturates at full scale."""
    lo, hi = _RAW_LIMITS[signal.data_type]
    a, b = lo * signal.scale + signal.offset, hi * signal.scale + signal.offset
    return min(max(value, min(a, b)), max(a, b))


def quantise(signal: Signal, value: float) -> float:
    """The value a Modbus master would decode from this signal's register(s)."""
    return decode(signal, encode(signal, saturate(signal, value)))


def sensor_values(cfg: CartConfig, plant: Plant) -> dict[str, float]:
    """Current instrument readings keyed by the signal that carries each, saturated."""
    assert cfg.simulator is not None
    b = cfg.simulator.bindings
    s = plant.sensors()
    values: dict[str | None, float] = {
        b.flow: s.flow_ml_min,
        b.pa_pressure: s.pa_pressure_mmhg,
        b.perfusate_temperature: s.perfusate_temperature_c,
        b.water_temperature: s.water_temperature_c,
        b.pump_speed: s.pump_speed_rpm,
        b.reservoir_volume: s.reservoir_volume_ml,
    }
    return {n: saturate(cfg.signals[n], v) for n, v in values.items() if n is not None}


def apply_command(cfg: CartConfig, plant: Plant, signal: str, value: float) -> bool:
    """Pass a command written to ``signal`` to the model; False if it drives nothing."""
    assert cfg.simulator is not None
    b = cfg.simulator.bindings
    if signal == b.pump_speed_command:
        plant.set_pump_speed_command(value)
    elif signal == b.heater_power_command:
        plant.set_heater_power_command(value)
    else:
        return False
    return True
