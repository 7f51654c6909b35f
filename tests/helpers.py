"""Small helpers shared by the tests (import with ``from helpers import wait_until``)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float,
    interval_s: float = 0.01,
    what: str | None = None,
) -> float:
    """Poll ``predicate`` (sync or async) until it is true; return the seconds it took.

    Raises TimeoutError naming the condition when it is still false after ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    start_s = loop.time()
    deadline_s = start_s + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return loop.time() - start_s
        if loop.time() >= deadline_s:
            name = what or getattr(predicate, "__qualname__", repr(predicate))
            raise TimeoutError(f"condition not met within {timeout_s} s: {name}")
        await asyncio.sleep(interval_s)
