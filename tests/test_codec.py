"""Register codec and read planning (pure functions, no I/O)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ilup_controller.config import load_config
from ilup_controller.config.models import DataType, Signal, Table
from ilup_controller.modbus.codec import (
    INT_LIMITS,
    CodecError,
    decode,
    decode_bit,
    encode,
    encode_bit,
)
from ilup_controller.modbus.plan import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    ReadBlock,
    decode_block,
    plan_reads,
)

INT_TYPES = [DataType.uint16, DataType.int16, DataType.uint32, DataType.int32]
REGISTER_TYPES = [*INT_TYPES, DataType.float32]
WORD_ORDERS = ["big", "little"]


def sig(
    data_type: DataType = DataType.uint16,
    *,
    table: Table = Table.holding,
    address: int = 0,
    word_order: str = "big",
    scale: float = 1.0,
    offset: float = 0.0,
    device: str = "dev",
    writable: bool = False,
) -> Signal:
    return Signal.model_validate(
        {
            "device": device,
            "table": table,
            "address": address,
            "data_type": data_type,
            "word_order": word_order,
            "scale": scale,
            "offset": offset,
            "writable": writable,
        }
    )


def coil(address: int = 0, table: Table = Table.coil) -> Signal:
    return sig(DataType.bool, table=table, address=address)


scales = st.one_of(
    st.floats(min_value=1e-3, max_value=1e3), st.floats(min_value=-1e3, max_value=-1e-3)
)
offsets = st.floats(min_value=-1e4, max_value=1e4)


# --------------------------------------------------------------------------- round trips


@given(
    dtype=st.sampled_from(INT_TYPES),
    word_order=st.sampled_from(WORD_ORDERS),
    scale=scales,
    offset=offsets,
    data=st.data(),
)
def test_integer_round_trip_within_half_lsb(
    dtype: DataType, word_order: str, scale: float, offset: float, data: st.DataObject
) -> None:
    s = sig(dtype, word_order=word_order, scale=scale, offset=offset)
    low, high = INT_LIMITS[dtype]
    ends = sorted((low * scale + offset, high * scale + offset))
    value = data.draw(st.floats(min_value=ends[0], max_value=ends[1]))
    regs = encode(s, value)
    assert len(regs) == s.register_count
    assert all(0 <= r <= 0xFFFF for r in regs)
    back = decode(s, regs)
    float_slack = 1e-9 * (abs(value) + abs(offset) + abs(scale))
    assert abs(back - value) <= abs(scale) / 2 + float_slack


@given(
    dtype=st.sampled_from(INT_TYPES),
    word_order=st.sampled_from(WORD_ORDERS),
    scale=scales,
    offset=offsets,
    regs=st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2),
)
def test_every_integer_register_image_survives_decode_encode(
    dtype: DataType, word_order: str, scale: float, offset: float, regs: list[int]
) -> None:
    s = sig(dtype, word_order=word_order, scale=scale, offset=offset)
    image = regs[: s.register_count]
    assert encode(s, decode(s, image)) == image


@given(
    word_order=st.sampled_from(WORD_ORDERS),
    scale=scales,
    offset=offsets,
    value=st.floats(min_value=-1e30, max_value=1e30),
)
def test_float32_round_trip_relative(
    word_order: str, scale: float, offset: float, value: float
) -> None:
    s = sig(DataType.float32, word_order=word_order, scale=scale, offset=offset)
    back = decode(s, encode(s, value))
    # float32 keeps 24 bits of the raw value; the offset is applied in float64.
    tolerance = 2.0**-23 * (abs(value) + abs(offset)) + 2.0**-140 * abs(scale)
    assert abs(back - value) <= tolerance


@given(raw=st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_unscaled_is_bit_exact(raw: float) -> None:
    s = sig(DataType.float32)
    regs = encode(s, raw)
    assert regs == list(struct.unpack(">HH", struct.pack(">f", raw)))
    assert decode(s, regs) == raw


@given(dtype=st.sampled_from(INT_TYPES), data=st.data())
def test_raw_outside_the_type_raises_never_wraps(dtype: DataType, data: st.DataObject) -> None:
    low, high = INT_LIMITS[dtype]
    raw = data.draw(
        st.one_of(st.integers(high + 1, high + 2**40), st.integers(low - 2**40, low - 1))
    )
    with pytest.raises(CodecError, match=str(dtype)):
        encode(sig(dtype), float(raw))


# --------------------------------------------------------------------------- known vectors


@pytest.mark.parametrize(
    ("dtype", "word_order", "scale", "offset", "value", "regs"),
    [
        (DataType.float32, "big", 1.0, 0.0, 37.5, [16918, 0]),
        (DataType.float32, "little", 1.0, 0.0, 37.5, [0, 16918]),
        (DataType.float32, "big", 1.0, 0.0, 1.5, [16320, 0]),
        (DataType.float32, "big", 1.0, 0.0, -2.25, [49168, 0]),
        (DataType.float32, "big", 1.0, 0.0, 512.5, [17408, 8192]),
        (DataType.float32, "little", 1.0, 0.0, 512.5, [8192, 17408]),
        (DataType.int16, "big", 1.0, 0.0, -1.0, [65535]),
        (DataType.int16, "big", 0.01, 0.0, -0.01, [65535]),
        (DataType.int16, "big", 1.0, 0.0, -32768.0, [0x8000]),
        (DataType.int16, "big", 0.01, 0.0, 36.5, [3650]),
        (DataType.uint16, "big", 0.01, 0.0, 12.34, [1234]),
        (DataType.uint16, "big", 0.1, -40.0, 25.0, [650]),
        (DataType.uint16, "big", 1.0, 0.0, 65535.0, [65535]),
        (DataType.int32, "big", 1.0, 0.0, -2.0, [65535, 65534]),
        (DataType.int32, "little", 1.0, 0.0, -2.0, [65534, 65535]),
        (DataType.uint32, "big", 1.0, 0.0, float(0x12345678), [0x1234, 0x5678]),
        (DataType.uint32, "little", 1.0, 0.0, float(0x12345678), [0x5678, 0x1234]),
        (DataType.uint32, "big", 1.0, 0.0, float(0xFFFFFFFF), [65535, 65535]),
    ],
)
def test_known_vectors(
    dtype: DataType, word_order: str, scale: float, offset: float, value: float, regs: list[int]
) -> None:
    s = sig(dtype, word_order=word_order, scale=scale, offset=offset)
    assert encode(s, value) == regs
    assert decode(s, regs) == pytest.approx(value, abs=1e-9)


def test_integer_encode_rounds_to_nearest() -> None:
    s = sig(DataType.uint16, scale=0.01)
    assert encode(s, 12.346) == [1235]
    assert encode(s, 12.344) == [1234]
    assert encode(sig(DataType.int16), -2.6) == [65533]  # -3


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("dtype", "scale", "value"),
    [
        (DataType.uint16, 1.0, -1.0),
        (DataType.uint16, 1.0, 65536.0),
        (DataType.uint16, 0.01, 655.36),
        (DataType.uint16, 0.01, -0.01),
        (DataType.int16, 1.0, 32768.0),
        (DataType.int16, 1.0, -32769.0),
        (DataType.uint32, 1.0, 4294967296.0),
        (DataType.int32, 1.0, -2147483649.0),
    ],
)
def test_out_of_range_raises_with_value_and_type(
    dtype: DataType, scale: float, value: float
) -> None:
    with pytest.raises(CodecError) as info:
        encode(sig(dtype, scale=scale), value)
    assert str(dtype) in str(info.value)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("dtype", REGISTER_TYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(dtype: DataType, value: float) -> None:
    with pytest.raises(CodecError, match=str(dtype)) as info:
        encode(sig(dtype), value)
    assert repr(value) in str(info.value)


def test_float32_overflow_is_refused() -> None:
    with pytest.raises(CodecError, match="float32"):
        encode(sig(DataType.float32), 1e39)
    with pytest.raises(CodecError, match="float32"):
        encode(sig(DataType.float32, scale=1e-3), 3.4e36)  # raw 3.4e39


@pytest.mark.parametrize(
    ("dtype", "regs"),
    [
        (DataType.uint16, []),
        (DataType.uint16, [1, 2]),
        (DataType.float32, [1]),
        (DataType.int32, [1, 2, 3]),
    ],
)
def test_decode_rejects_wrong_register_count(dtype: DataType, regs: list[int]) -> None:
    with pytest.raises(CodecError, match=f"{dtype} needs"):
        decode(sig(dtype), regs)


@pytest.mark.parametrize("bad", [65536, -1, 1 << 20])
def test_decode_rejects_registers_outside_16_bits(bad: int) -> None:
    with pytest.raises(CodecError, match=str(bad)):
        decode(sig(DataType.uint16), [bad])
    with pytest.raises(CodecError, match=str(bad)):
        decode(sig(DataType.float32), [0, bad])


@pytest.mark.parametrize(
    ("word_order", "regs"),
    [
        ("big", [0x7FC0, 0]),  # NaN
        ("big", [0x7F80, 0]),  # +inf
        ("big", [0xFF80, 0]),  # -inf
        ("little", [0, 0x7FC0]),
        ("little", [0, 0xFF80]),
    ],
)
def test_decode_rejects_non_finite_float32_as_device_fault(
    word_order: str, regs: list[int]
) -> None:
    with pytest.raises(CodecError, match="device fault"):
        decode(sig(DataType.float32, word_order=word_order), regs)


def test_decode_rejects_overflow_after_scaling() -> None:
    s = sig(DataType.float32, scale=1e300)
    with pytest.raises(CodecError, match="overflow"):
        decode(s, encode(sig(DataType.float32), 3e38))


def test_bits() -> None:
    c = coil()
    assert encode_bit(c, True) is True
    assert encode_bit(c, 0) is False
    assert encode_bit(c, 1.0) is True
    assert decode_bit(c, True) is True
    assert decode_bit(c, 0) is False
    with pytest.raises(CodecError, match=r"0\.5"):
        encode_bit(c, 0.5)
    with pytest.raises(CodecError, match="2"):
        decode_bit(c, 2)
    with pytest.raises(CodecError, match="encode_bit"):
        encode(c, 1.0)
    with pytest.raises(CodecError, match="encode/decode"):
        encode_bit(sig(DataType.uint16), True)


# --------------------------------------------------------------------------- read planning


def spans(blocks: list[ReadBlock]) -> list[tuple[Table, int, int]]:
    return [(b.table, b.start, b.count) for b in blocks]


def test_contiguous_signals_merge_into_one_request() -> None:
    signals = {
        "flow": sig(DataType.float32, table=Table.input, address=0),
        "p": sig(DataType.int16, table=Table.input, address=2),
        "t": sig(DataType.int16, table=Table.input, address=3),
        "v": sig(DataType.uint16, table=Table.input, address=4),
    }
    blocks = plan_reads(signals)
    assert spans(blocks) == [(Table.input, 0, 5)]
    assert [(m.name, m.offset) for m in blocks[0].members] == [
        ("flow", 0),
        ("p", 2),
        ("t", 3),
        ("v", 4),
    ]


def test_gap_and_table_split_requests() -> None:
    signals = {
        "a": sig(table=Table.input, address=0),
        "b": sig(table=Table.input, address=2),  # gap at 1
        "c": sig(DataType.int32, table=Table.input, address=3),
        "h": sig(table=Table.holding, address=0, writable=True),
        "k": coil(5),
        "d": coil(5, table=Table.discrete),
    }
    assert spans(plan_reads(signals)) == [
        (Table.input, 0, 1),
        (Table.input, 2, 3),
        (Table.holding, 0, 1),
        (Table.discrete, 5, 1),
        (Table.coil, 5, 1),
    ]


def test_register_requests_are_capped_at_125() -> None:
    signals = {f"r{i}": sig(table=Table.input, address=i) for i in range(130)}
    assert spans(plan_reads(signals)) == [
        (Table.input, 0, MAX_READ_REGISTERS),
        (Table.input, 125, 5),
    ]
    # A 32-bit value that would cross the cap starts a new request; it is never split.
    signals = {f"r{i}": sig(table=Table.input, address=i) for i in range(124)}
    signals["f"] = sig(DataType.float32, table=Table.input, address=124)
    assert spans(plan_reads(signals)) == [(Table.input, 0, 124), (Table.input, 124, 2)]


def test_bit_requests_are_capped_at_2000() -> None:
    signals = {f"c{i}": coil(i) for i in range(2001)}
    assert spans(plan_reads(signals)) == [(Table.coil, 0, MAX_READ_BITS), (Table.coil, 2000, 1)]


def test_plan_refuses_signals_of_two_devices() -> None:
    with pytest.raises(ValueError, match="one device"):
        plan_reads({"a": sig(device="one"), "b": sig(device="two", address=1)})


def test_sim_config_plans() -> None:
    cfg = load_config("config/sim.yaml")
    for device in cfg.devices:
        signals = {n: s for n, s in cfg.signals.items() if s.device == device}
        blocks = plan_reads(signals)
        assert sorted(m.name for b in blocks for m in b.members) == sorted(signals)
        for b in blocks:  # each request reads exactly the registers its members cover
            assert b.count == sum(m.signal.register_count for m in b.members)
    io = {n: s for n, s in cfg.signals.items() if s.device == "io"}
    # flow, pa_pressure, perfusate_temp, reservoir_volume: one request for input 0..4.
    assert (Table.input, 0, 5) in spans(plan_reads(io))


@st.composite
def signal_sets(draw: st.DrawFn) -> dict[str, Signal]:
    """Non-overlapping register signals of one device, in random tables and addresses."""
    used: set[tuple[Table, int]] = set()
    out: dict[str, Signal] = {}
    for i in range(draw(st.integers(1, 60))):
        table = draw(st.sampled_from([Table.input, Table.holding]))
        dtype = draw(st.sampled_from(REGISTER_TYPES))
        address = draw(st.integers(0, 400))
        regs = {
            (table, a)
            for a in range(
                address,
                address
                + (2 if dtype in (DataType.uint32, DataType.int32, DataType.float32) else 1),
            )
        }
        if regs & used:
            continue
        used |= regs
        out[f"s{i}"] = sig(dtype, table=table, address=address)
    return out


@given(signal_sets())
def test_plan_covers_each_signal_once_without_gaps(signals: dict[str, Signal]) -> None:
    blocks = plan_reads(signals)
    seen = [m.name for b in blocks for m in b.members]
    assert sorted(seen) == sorted(signals)
    for b in blocks:
        assert 1 <= b.count <= MAX_READ_REGISTERS
        covered: set[int] = set()
        for m in b.members:
            s = signals[m.name]
            assert s.table is b.table
            assert b.start + m.offset == s.address
            assert m.offset + s.register_count <= b.count
            covered |= set(range(s.address, s.address + s.register_count))
        assert covered == set(range(b.start, b.start + b.count))  # no unmapped register read


def test_decode_block_isolates_a_bad_signal() -> None:
    signals = {
        "flow": sig(DataType.float32, table=Table.input, address=0),
        "p": sig(DataType.int16, table=Table.input, address=2, scale=0.01),
        "v": sig(DataType.uint16, table=Table.input, address=3),
    }
    (block,) = plan_reads(signals)
    result = decode_block(block, [0x7FC0, 0, 1234, 800])  # flow is NaN
    assert result.values == {"p": pytest.approx(12.34), "v": 800.0}
    assert set(result.errors) == {"flow"}
    assert "device fault" in str(result.errors["flow"])
    # A short reply fails only the members it does not cover.
    short = decode_block(block, [16918, 0, 1234])
    assert short.values == {"flow": 37.5, "p": pytest.approx(12.34)}
    assert set(short.errors) == {"v"}


def test_decode_block_bits_ignores_byte_padding() -> None:
    signals = {"a": coil(0), "b": coil(1), "c": coil(2)}
    (block,) = plan_reads(signals)
    assert block.count == 3
    result = decode_block(block, [True, False, True, False, False, False, False, False])
    assert result.values == {"a": True, "b": False, "c": True}
    assert result.errors == {}
