"""A drift-free periodic tick on the event loop's monotonic clock.

Deadlines are absolute (start + k * period), as in Klipper's timers: a late tick does not push
later ones back. When a tick is missed entirely, it is counted as an overrun and skipped rather
than run in a burst to catch up.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(slots=True)
class TickStats:
    ticks: int = 0
    overruns: int = 0
    max_lateness_s: float = 0.0


class Ticker:
    def __init__(self, period_s: float) -> None:
        if not period_s > 0:
            raise ValueError("period_s must be > 0")
        self.period_s = period_s
        self.stats = TickStats()

    async def ticks(self) -> AsyncIterator[float]:
        """Yield the scheduled deadline of each tick (the tick's time), forever."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        k = 0
        while True:
            deadline = start + k * self.period_s
            now = loop.time()
            if now < deadline:
                await asyncio.sleep(deadline - now)
                now = loop.time()
            late = now - deadline
            if late >= self.period_s:
                missed = math.floor(late / self.period_s)
                self.stats.overruns += missed
                k += missed
                deadline = start + k * self.period_s
                late = now - deadline
            self.stats.max_lateness_s = max(self.stats.max_lateness_s, late)
            self.stats.ticks += 1
            yield deadline
            k += 1
