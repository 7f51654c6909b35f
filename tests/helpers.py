"""Helpers shared by the tests: ``from helpers import wait_until, MqttRecorder, sample_state``.

(pytest puts tests/ on sys.path because tests/ has no __init__.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import aiomqtt

from ilup_controller.mqtt.messages import (
    DrugPhase,
    Loop,
    Measured,
    Outputs,
    State,
    Targets,
    Timing,
)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 3.0,
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


# --------------------------------------------------------------------------- MQTT


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    t_s: float  # loop.time() at arrival

    def json(self) -> Any:
        return json.loads(self.payload)


class MqttRecorder:
    """A real aiomqtt subscriber that records every message it gets, for assertions.

    ``async with MqttRecorder(port, ["ilup/+/status"]) as rec:`` subscribes (QoS 1) before the
    body runs. A broker that goes away ends the recording (``rec.error`` says why).
    """

    def __init__(
        self,
        port: int,
        topics: Sequence[str],
        *,
        host: str = "127.0.0.1",
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
    ) -> None:
        self.port = port
        self.host = host
        self.topics = list(topics)
        self.protocol = protocol
        self.messages: list[Received] = []
        self.error: Exception | None = None
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._client = aiomqtt.Client(self.host, self.port, protocol=self.protocol, timeout=3)
        await self._client.__aenter__()
        for topic in self.topics:
            await self._client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._collect(self._client))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _collect(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for m in client.messages:
                payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                self.messages.append(Received(m.topic.value, payload, m.retain, loop.time()))
        except aiomqtt.MqttError as exc:
            self.error = exc

    def on(self, topic: str, *, live_only: bool = False) -> list[Received]:
        return [m for m in self.messages if m.topic == topic and not (live_only and m.retain)]

    async def first(
        self, match: Callable[[Received], bool], timeout_s: float, what: str = "message"
    ) -> Received:
        """The first recorded message (already received or arriving) that ``match`` accepts."""
        found: list[Received] = []

        def check() -> bool:
            found[:] = [m for m in self.messages if match(m)][:1]
            return bool(found)

        await wait_until(check, timeout_s, interval_s=0.005, what=what)
        return found[0]


def sample_state(seq: int = 0, cart_id: str = "cart_t", **changes: Any) -> State:
    """A plausible perfusing State; ``changes`` replace top-level fields."""
    fields: dict[str, Any] = {
        "t": datetime.now(UTC),
        "seq": seq,
        "cart_id": cart_id,
        "phase": "perfusing",
        "simulated": True,
        "measured": Measured(
            flow_ml_min=498.7,
            pressure_mmhg=18.4,
            temperature_c=36.2,
            water_temperature_c=38.9,
            pump_speed_rpm=15.1,
            reservoir_volume_ml=790.0,
        ),
        "targets": Targets(
            flow_ml_min=500.0,
            flow_ramped_ml_min=450.0,
            pressure_limit_mmhg=25.0,
            temperature_c=37.0,
            temperature_ramped_c=36.5,
        ),
        "outputs": Outputs(pump_speed_rpm=15.2, heater_pct=42.5),
        "loop": Loop(
            pump_limited_by="flow", heater_limited_by="temperature", water_setpoint_c=39.0
        ),
        "drug_phase": DrugPhase(elapsed_s=0.0, remaining_s=1800.0),
        "active_alarms": [],
        "timing": Timing(tick_period_s=0.1, ticks=seq, overruns=0),
    }
    fields.update(changes)
    return State(**fields)
