"""Plain data passed between the edges and the deterministic core."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def value_type(cls: type[_T]) -> type[_T]:
    """A slotted dataclass that the type checker treats as frozen, for what the core builds
    every tick (readings, conditions, measurements, the tick's result).

    ``mypy --strict`` (part of ``make test``) rejects any assignment to a field, as it does for
    ``frozen=True``; at run time the instance is built without frozen's per-field
    ``object.__setattr__``. The core builds about 50 of these per tick, and with frozen=True
    the virtual-time harness ran 20 % slower (540x against 650x real time). Not hashable.
    """
    return dataclass(slots=True)(cls)


@value_type
class Reading:
    """One decoded engineering value and the monotonic time (s) it was acquired."""

    value: float
    t: float


# Latest reading of each signal, by signal name. A signal that was never read, or whose last
# read failed, is absent: the core never sees a made-up value (an error is never recorded as 0).
Readings = Mapping[str, Reading]
