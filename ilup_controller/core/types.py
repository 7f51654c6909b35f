"""Plain data passed between the edges and the deterministic core."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reading:
    """One decoded engineering value and the monotonic time (s) it was acquired."""

    value: float
    t: float


# Latest reading of each signal, by signal name. A signal that was never read, or whose last
# read failed, is absent: the core never sees a made-up value (an error is never recorded as 0).
Readings = Mapping[str, Reading]
