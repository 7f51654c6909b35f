"""Rate limiters for setpoints and actuator commands."""

from __future__ import annotations


def approach(current: float, target: float, max_rise: float, max_fall: float) -> float:
    """Move ``current`` toward ``target`` by at most ``max_rise`` up or ``max_fall`` down."""
    if target > current:
        return min(target, current + max_rise)
    return max(target, current - max_fall)
