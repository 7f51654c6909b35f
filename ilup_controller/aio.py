"""asyncio helpers shared by the edges (Modbus links, the live view, the guard)."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that was lost on the way.

    It is lost two ways. Python 3.11's ``asyncio.wait_for`` returns the result and drops the
    CancelledError when the awaited call completes in the same loop iteration as the cancel
    (fixed in 3.12): under CPU load a cancelled Modbus link ran on forever. And a library can
    raise its own error while leaving on the cancel: aiomqtt raises MqttError when the broker
    does not acknowledge the disconnect within the client's timeout, and the live view took it
    for an outage, reconnected, and Ctrl-C never ended `ilup demo`. A loop that catches such
    errors calls this before going round again; the task's pending-cancel count still shows
    the cancel.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError
