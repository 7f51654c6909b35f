"""Which register carries which plant quantity: the simulator's half of the config bindings."""

from __future__ import annotations

from ilup_controller.config.models import CartConfig, DataType, Signal
from ilup_controller.modbus.codec import decode, decode_bit, encode, encode_bit, is_bit_signal
from sim.plant import Plant, SensorChannel

_RAW_LIMITS: dict[DataType, tuple[float, float]] = {
    DataType.uint16: (0, 0xFFFF),
    DataType.int16: (-0x8000, 0x7FFF),
    DataType.uint32: (0, 0xFFFFFFFF),
    DataType.int32: (-0x80000000, 0x7FFFFFFF),
    DataType.float32: (-3.0e38, 3.0e38),
    DataType.bool: (0, 1),
}


def saturate(signal: Signal, value: float | bool) -> float | bool:
    """Clip to what the register can carry, as a real transducer saturates at full scale."""
    if is_bit_signal(signal):
        return value  # a bit is 0/1 already; encode_bit rejects anything else
    lo, hi = _RAW_LIMITS[signal.data_type]
    a, b = lo * signal.scale + signal.offset, hi * signal.scale + signal.offset
    return min(max(value, min(a, b)), max(a, b))


def quantise(signal: Signal, value: float | bool) -> float | bool:
    """The value a Modbus master would decode from this signal's register(s) or bit."""
    if is_bit_signal(signal):
        return decode_bit(signal, encode_bit(signal, value))
    return decode(signal, encode(signal, saturate(signal, value)))


def sensor_values(cfg: CartConfig, plant: Plant) -> dict[str, float | bool]:
    """Current instrument readings keyed by the signal that carries each, saturated.

    A dropped-out channel is left out, so its register (or virtual reading) is not refreshed
    and goes stale, as a dead input does on a real I/O module.
    """
    assert cfg.simulator is not None
    b = cfg.simulator.bindings
    s = plant.sensors()
    bound: dict[SensorChannel, str | None] = {
        "flow": b.flow,
        "pa_pressure": b.pa_pressure,
        "perfusate_temperature": b.perfusate_temperature,
        "water_temperature": b.water_temperature,
        "pump_speed": b.pump_speed,
        "reservoir_volume": b.reservoir_volume,
        "air_detected": b.air_detected,
    }
    return {
        name: saturate(cfg.signals[name], value)
        for channel, value in s.by_channel().items()
        if (name := bound[channel]) is not None and channel not in s.dropouts
    }


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
