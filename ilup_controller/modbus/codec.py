"""Engineering values <-> Modbus registers/bits for one configured signal.

engineering = raw * scale + offset. Bytes inside a register are always big-endian; only the order
of the two words of a 32-bit value is configurable. Nothing is ever clamped or wrapped: a value
that does not fit its register type, and a register image that is not a valid value (NaN/inf
float, wrong length, a "register" outside 0..65535), raise CodecError.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from ilup_controller.config.models import REGISTER_COUNT, DataType, Signal, Table

__all__ = [
    "INT_LIMITS",
    "CodecError",
    "decode",
    "decode_bit",
    "encode",
    "encode_bit",
    "is_bit_signal",
    "resolution",
]


class CodecError(ValueError):
    """A value cannot be represented in, or recovered from, a signal's registers."""


# Raw (register-side) range of each integer type.
INT_LIMITS: dict[DataType, tuple[int, int]] = {
    DataType.uint16: (0, 0xFFFF),
    DataType.int16: (-0x8000, 0x7FFF),
    DataType.uint32: (0, 0xFFFF_FFFF),
    DataType.int32: (-0x8000_0000, 0x7FFF_FFFF),
}

# struct format (big-endian) of the raw value of each register type.
_STRUCT: dict[DataType, str] = {
    DataType.uint16: ">H",
    DataType.int16: ">h",
    DataType.uint32: ">I",
    DataType.int32: ">i",
    DataType.float32: ">f",
}


def is_bit_signal(signal: Signal) -> bool:
    """True for coil/discrete signals (one bit, data_type bool)."""
    return signal.table in (Table.coil, Table.discrete)


def _require_register_signal(signal: Signal) -> None:
    if is_bit_signal(signal):
        raise CodecError(
            f"{signal.table} signal holds a bit; use encode_bit/decode_bit, not registers"
        )


def _words(raw_bytes: bytes, word_order: str) -> list[int]:
    words = [int.from_bytes(raw_bytes[i : i + 2], "big") for i in range(0, len(raw_bytes), 2)]
    if word_order == "little":
        words.reverse()
    return words


def resolution(signal: Signal, value: float) -> float:
    """Engineering size of one register step of ``signal`` near ``value`` (always > 0).

    Integer types: |scale|. float32: |scale| times the float32 spacing at the raw value.
    """
    if is_bit_signal(signal):
        return 1.0
    if signal.data_type is DataType.float32:
        raw = abs((float(value) - signal.offset) / signal.scale)
        # float32 keeps 24 significant bits, float64 53: its spacing is 2**29 float64 ulps.
        exponent = math.frexp(raw)[1] if raw >= 2.0**-126 else -125
        return abs(signal.scale) * 2.0 ** (exponent - 24)
    return abs(signal.scale)


def encode(signal: Signal, value: float) -> list[int]:
    """Registers (each 0..65535) that carry ``value`` for ``signal``.

    Integer types round (value - offset) / scale to the nearest integer.
    """
    _require_register_signal(signal)
    dtype = signal.data_type
    if not math.isfinite(value):
        raise CodecError(f"value {value!r} is not finite; cannot encode as {dtype}")
    raw = (float(value) - signal.offset) / signal.scale
    if not math.isfinite(raw):
        raise CodecError(f"value {value!r} overflows {dtype} (raw {raw!r})")
    raw_bytes: bytes
    if dtype is DataType.float32:
        try:
            raw_bytes = struct.pack(">f", raw)
        except OverflowError:
            raise CodecError(f"value {value!r} (raw {raw!r}) is out of range for {dtype}") from None
    else:
        raw_int = round(raw)
        low, high = INT_LIMITS[dtype]
        if not low <= raw_int <= high:
            raise CodecError(
                f"value {value!r} (raw {raw_int}) is out of range for {dtype} "
                f"(raw {low}..{high}, scale {signal.scale}, offset {signal.offset})"
            )
        raw_bytes = struct.pack(_STRUCT[dtype], raw_int)
    return _words(raw_bytes, signal.word_order)


def decode(signal: Signal, registers: Sequence[int]) -> float:
    """Engineering value carried by ``registers`` (exactly the signal's register count)."""
    _require_register_signal(signal)
    dtype = signal.data_type
    expected = REGISTER_COUNT[dtype]
    if len(registers) != expected:
        raise CodecError(f"{dtype} needs {expected} register(s), got {len(registers)}")
    for reg in registers:
        if isinstance(reg, bool) or not isinstance(reg, int) or not 0 <= reg <= 0xFFFF:
            raise CodecError(f"register value {reg!r} is not in 0..65535 (decoding {dtype})")
    words = list(registers)
    if signal.word_order == "little":
        words.reverse()
    raw_bytes = b"".join(w.to_bytes(2, "big") for w in words)
    (raw,) = struct.unpack(_STRUCT[dtype], raw_bytes)
    if dtype is DataType.float32 and not math.isfinite(raw):
        # A sensor module reports NaN/inf when its input is broken: a device fault, not a value.
        raise CodecError(f"{dtype} registers {list(registers)} hold {raw!r} (device fault)")
    value = float(raw) * signal.scale + signal.offset
    if not math.isfinite(value):
        raise CodecError(f"{dtype} raw {raw!r} overflows after scale {signal.scale}")
    return value


def encode_bit(signal: Signal, value: float | bool) -> bool:
    """Coil state for ``value``: a bool, or exactly 0/1."""
    if not is_bit_signal(signal):
        raise CodecError(f"{signal.table} signal holds {signal.data_type}; use encode/decode")
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise CodecError(f"value {value!r} is not a valid bool (expected True/False or 0/1)")


def decode_bit(signal: Signal, bit: object) -> bool:
    """Value of a coil/discrete input; anything but a bool (or int 0/1) is rejected."""
    if not is_bit_signal(signal):
        raise CodecError(f"{signal.table} signal holds {signal.data_type}; use encode/decode")
    if isinstance(bit, bool):
        return bit
    if isinstance(bit, int) and bit in (0, 1):
        return bool(bit)
    raise CodecError(f"bit value {bit!r} is not a valid bool")
