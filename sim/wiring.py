"""Which register carries which plant quantity: the simulator's half of the config bindings."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

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


Quantiser = Callable[[float | bool], float | bool]
_F32 = struct.Struct(">f")


def compile_quantiser(signal: Signal) -> Quantiser:
    """``quantise`` for one signal, as a closure over its constants (the virtual-time harness
    calls it ~10 times per tick). Same arithmetic as ``quantise``, so the same bits; anything
    unusual (non-finite, out of range, a bit) takes ``quantise`` itself, which raises as the
    codec does."""
    if is_bit_signal(signal):
        return lambda value: quantise(signal, value)
    scale, offset = signal.scale, signal.offset
    lo, hi = _RAW_LIMITS[signal.data_type]
    a, b = lo * scale + offset, hi * scale + offset
    sat_lo, sat_hi = min(a, b), max(a, b)

    if signal.data_type is DataType.float32:

        def fast_float(value: float | bool) -> float | bool:
            v = min(max(value, sat_lo), sat_hi)
            raw = (float(v) - offset) / scale
            if not math.isfinite(raw):
                return quantise(signal, value)
            try:
                (raw32,) = _F32.unpack(_F32.pack(raw))
            except OverflowError:
                return quantise(signal, value)
            out = float(raw32) * scale + offset
            return out if math.isfinite(out) else quantise(signal, value)

        return fast_float

    def fast_int(value: float | bool) -> float | bool:
        v = min(max(value, sat_lo), sat_hi)
        raw = (float(v) - offset) / scale
        if not math.isfinite(raw):
            return quantise(signal, value)
        raw_int = round(raw)
        if not lo <= raw_int <= hi:
            return quantise(signal, value)
        return float(raw_int) * scale + offset

    return fast_int


def sensor_values(cfg: CartConfig, plant: Plant) -> dict[str, float | bool]:
    """Current instrument readings keyed by the signal that carries each, saturated.

    A dropped-out channel is left out, so its register (or virtual reading) is not refreshed
    and goes stale, as a dead input does on a real I/O module.
    """
    bound = sensor_bindings(cfg)
    s = plant.sensors()
    return {
        name: saturate(cfg.signals[name], value)
        for channel, value in s.by_channel().items()
        if (name := bound.get(channel)) is not None and channel not in s.dropouts
    }


def sensor_bindings(cfg: CartConfig) -> dict[SensorChannel, str]:
    """Instrument channel -> the signal that carries it, for every bound channel."""
    assert cfg.simulator is not None
    b = cfg.simulator.bindings
    bound: dict[SensorChannel, str | None] = {
        "flow": b.flow,
        "pa_pressure": b.pa_pressure,
        "perfusate_temperature": b.perfusate_temperature,
        "water_temperature": b.water_temperature,
        "pump_speed": b.pump_speed,
        "reservoir_volume": b.reservoir_volume,
        "air_detected": b.air_detected,
    }
    return {channel: name for channel, name in bound.items() if name is not None}


def enable_signals(cfg: CartConfig) -> dict[str, bool]:
    """The enable coils (the guard's channels) and their state at power-up: closed (True)."""
    assert cfg.simulator is not None
    b = cfg.simulator.bindings
    return {name: True for name in (b.pump_enable, b.heater_enable) if name is not None}


def apply_command(cfg: CartConfig, plant: Plant, signal: str, value: float) -> bool:
    """Pass a command written to ``signal`` to the model; False if it drives nothing."""
    assert cfg.simulator is not None
    b = cfg.simulator.bindings
    if signal == b.pump_speed_command:
        plant.set_pump_speed_command(value)
    elif signal == b.heater_power_command:
        plant.set_heater_power_command(value)
    elif signal == b.pump_enable:
        plant.pump_enabled = bool(value)
    elif signal == b.heater_enable:
        plant.heater_enabled = bool(value)
    else:
        return False
    return True
