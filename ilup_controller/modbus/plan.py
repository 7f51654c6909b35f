"""Group the signals of one device into as few read requests as Modbus allows.

Contiguous (or overlapping) address ranges of one table merge into one request, up to 125
registers or 2000 bits (the protocol limits of function codes 1-4); a gap splits the request,
because real devices often refuse reads of unmapped addresses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ilup_controller.config.models import Signal, Table
from ilup_controller.modbus.codec import CodecError, decode, decode_bit

__all__ = [
    "MAX_READ_BITS",
    "MAX_READ_REGISTERS",
    "BlockMember",
    "BlockResult",
    "ReadBlock",
    "decode_block",
    "plan_reads",
]

MAX_READ_REGISTERS = 125
MAX_READ_BITS = 2000

# Deterministic request order: registers first (the usual sensor data), then bits.
_TABLE_ORDER: tuple[Table, ...] = (Table.input, Table.holding, Table.discrete, Table.coil)


class BlockMember(NamedTuple):
    name: str
    offset: int  # position of the signal's first register/bit inside the block
    signal: Signal


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers/bits of ``table`` from ``start``."""

    table: Table
    start: int
    count: int
    members: tuple[BlockMember, ...]

    @property
    def is_bits(self) -> bool:
        return self.table in (Table.coil, Table.discrete)


@dataclass(frozen=True, slots=True)
class BlockResult:
    """Decoded values of a block; a signal that failed to decode is in ``errors`` instead."""

    values: dict[str, float | bool]
    errors: dict[str, CodecError]


def _cap(table: Table) -> int:
    return MAX_READ_BITS if table in (Table.coil, Table.discrete) else MAX_READ_REGISTERS


def plan_reads(signals: Mapping[str, Signal]) -> list[ReadBlock]:
    """Read requests covering every signal in ``signals`` (all of one device)."""
    devices = {s.device for s in signals.values()}
    if len(devices) > 1:
        raise ValueError(f"plan_reads takes the signals of one device, got {sorted(devices)}")
    blocks: list[ReadBlock] = []
    for table in _TABLE_ORDER:
        ordered = sorted(
            ((name, sig) for name, sig in signals.items() if sig.table is table),
            key=lambda item: (item[1].address, item[0]),
        )
        cap = _cap(table)
        start = end = 0  # end is exclusive
        members: list[tuple[str, Signal]] = []
        for name, sig in ordered:
            sig_end = sig.address + sig.register_count
            if members and sig.address <= end and max(end, sig_end) - start <= cap:
                end = max(end, sig_end)
                members.append((name, sig))
                continue
            if members:
                blocks.append(_block(table, start, end, members))
            start, end, members = sig.address, sig_end, [(name, sig)]
        if members:
            blocks.append(_block(table, start, end, members))
    return blocks


def _block(table: Table, start: int, end: int, members: list[tuple[str, Signal]]) -> ReadBlock:
    return ReadBlock(
        table=table,
        start=start,
        count=end - start,
        members=tuple(BlockMember(name, sig.address - start, sig) for name, sig in members),
    )


def decode_block(block: ReadBlock, data: Sequence[int] | Sequence[bool]) -> BlockResult:
    """Decode each member of ``block`` from the request's reply.

    Bit replies are padded to whole bytes by the protocol, so ``data`` may be longer than
    ``block.count``; a shorter reply fails only the members it does not cover.
    """
    values: dict[str, float | bool] = {}
    errors: dict[str, CodecError] = {}
    for member in block.members:
        sig = member.signal
        lo = member.offset
        hi = lo + sig.register_count
        if hi > len(data):
            errors[member.name] = CodecError(
                f"reply has {len(data)} {'bits' if block.is_bits else 'registers'}, "
                f"{member.name} needs positions {lo}..{hi - 1}"
            )
            continue
        try:
            if block.is_bits:
                values[member.name] = decode_bit(sig, data[lo])
            else:
                values[member.name] = decode(sig, data[lo:hi])
        except CodecError as e:
            errors[member.name] = e
    return BlockResult(values=values, errors=errors)
