"""MqttLink against a real mosquitto (fixture) with a real aiomqtt subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import MqttRecorder, Received, sample_state, wait_until
from pydantic import BaseModel

from ilup_controller.broker import MosquittoProcess
from ilup_controller.config.models import Mqtt
from ilup_controller.mqtt.link import CLOSE_TIMEOUT_S, MqttLink
from ilup_controller.mqtt.messages import State, Status

CART = "cart_t"
STATE_TOPIC = f"ilup/{CART}/state"
STATUS_TOPIC = f"ilup/{CART}/status"
EVENTS_TOPIC = f"ilup/{CART}/events"


class Note(BaseModel):
    n: int


def _cfg(port: int, **changes: object) -> Mqtt:
    values: dict[str, object] = {"host": "127.0.0.1", "port": port, "reconnect_max_s": 0.5}
    values.update(changes)
    return Mqtt.model_validate(values)


@contextlib.asynccontextmanager
async def _running(link: MqttLink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run())
    try:
        yield task
    finally:
        await link.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _is_status(online: bool) -> Callable[[Received], bool]:
    def match(m: Received) -> bool:
        return m.topic == STATUS_TOPIC and m.json()["online"] is online

    return match


async def test_state_rate_follows_the_period_not_the_offers(mosquitto: MosquittoProcess) -> None:
    period_s = 0.25
    window_s = 2.0
    link = MqttLink(
        _cfg(mosquitto.port, state_period_s=period_s), CART, simulated=True, version="t"
    )
    seq = 0

    async def offer_at_100_hz() -> None:
        nonlocal seq
        while True:
            link.offer_state(sample_state(seq, CART))
            seq += 1
            await asyncio.sleep(0.01)

    async with MqttRecorder(mosquitto.port, [STATE_TOPIC]) as rec, _running(link):
        offers = asyncio.create_task(offer_at_100_hz())
        try:
            first = await rec.first(lambda m: m.topic == STATE_TOPIC, 3.0, "first state")
            await asyncio.sleep(window_s)  # the measurement window itself, not a wait for a result
            in_window = [
                m for m in rec.on(STATE_TOPIC) if first.t_s < m.t_s <= first.t_s + window_s
            ]
        finally:
            offers.cancel()
    # At least 1 Hz (the contract), and not faster than 1/period although offered at 100 Hz.
    assert len(in_window) >= window_s * 1.0
    assert len(in_window) <= window_s / period_s + 2
    assert len(in_window) >= window_s / period_s - 3  # the period is honoured, not just 1 Hz
    seqs = [State.model_validate_json(m.payload).seq for m in in_window]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seq > 100  # the offers really ran at ~100 Hz meanwhile

    # Retained: a late subscriber gets the latest state at once, flagged retained.
    async with MqttRecorder(mosquitto.port, [STATE_TOPIC]) as late:
        got = await late.first(lambda m: m.topic == STATE_TOPIC, 2.0, "retained state")
    assert got.retain is True
    assert State.model_validate_json(got.payload).seq >= seqs[-1]


async def test_status_online_retained_for_a_late_subscriber(mosquitto: MosquittoProcess) -> None:
    link = MqttLink(_cfg(mosquitto.port), CART, simulated=True, version="9.9.9")
    async with _running(link):
        await wait_until(lambda: link.connected, 3.0, what="link connected")
        async with MqttRecorder(mosquitto.port, [STATUS_TOPIC]) as late:
            got = await late.first(lambda m: m.topic == STATUS_TOPIC, 2.0, "retained status")
    status = Status.model_validate_json(got.payload)
    assert got.retain is True
    assert status.online is True
    assert (status.cart_id, status.simulated, status.version) == (CART, True, "9.9.9")
    assert status.since is not None


async def test_close_publishes_offline_and_run_returns(mosquitto: MosquittoProcess) -> None:
    link = MqttLink(_cfg(mosquitto.port), CART, simulated=False, version="t")
    async with MqttRecorder(mosquitto.port, [STATUS_TOPIC]) as rec:
        task = asyncio.create_task(link.run())
        await rec.first(_is_status(True), 3.0, "online status")
        start_s = time.monotonic()
        await link.close()
        close_s = time.monotonic() - start_s
        offline = await rec.first(_is_status(False), 1.0, "offline status")
    assert close_s < CLOSE_TIMEOUT_S
    assert task.done()
    assert not task.cancelled()
    assert task.exception() is None
    assert link.connected is False
    assert Status.model_validate_json(offline.payload).cart_id == CART
    async with MqttRecorder(mosquitto.port, [STATUS_TOPIC]) as late:
        kept = await late.first(lambda m: m.topic == STATUS_TOPIC, 2.0, "retained status")
    assert kept.retain is True
    assert kept.json()["online"] is False


async def test_cancelling_run_still_publishes_offline(mosquitto: MosquittoProcess) -> None:
    link = MqttLink(_cfg(mosquitto.port), CART, simulated=True, version="t")
    async with MqttRecorder(mosquitto.port, [STATUS_TOPIC]) as rec:
        task = asyncio.create_task(link.run())
        await rec.first(_is_status(True), 3.0, "online status")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, CLOSE_TIMEOUT_S)
        await rec.first(_is_status(False), 1.0, "offline status")
    assert task.cancelled()


async def test_a_cancel_a_publish_swallowed_still_ends_the_link(
    mosquitto: MosquittoProcess,
) -> None:
    """Python 3.11's wait_for (inside aiomqtt's publish) drops a CancelledError when the publish
    completes in the same loop iteration as the cancel. The state publisher then went round its
    loop for ever, the session's TaskGroup waited for it, and the daemon's shutdown hung after
    "MQTT link ... did not stop within 2 s" (seen once in `make bench`, 50 Hz). Here every state
    publish takes 0.3 s and the first cancel that lands in one is swallowed: the link must still
    end, cancelled, within CLOSE_TIMEOUT_S."""
    link = MqttLink(_cfg(mosquitto.port, state_period_s=0.02), CART, simulated=True, version="t")
    publish = link._publish
    swallowed = 0

    async def slow_state_publish(client: Any, topic: str, payload: Any, **kw: Any) -> None:
        nonlocal swallowed
        try:
            await publish(client, topic, payload, **kw)
            if topic == STATE_TOPIC:
                await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            if topic != STATE_TOPIC or swallowed:
                raise
            swallowed += 1  # what wait_for does by accident when its inner call just finished

    link._publish = slow_state_publish  # type: ignore[method-assign]
    task = asyncio.create_task(link.run())
    await wait_until(lambda: link.connected, 3.0, what="link connected")
    link.offer_state(sample_state(1, CART))
    await asyncio.sleep(0.1)  # the state publisher is inside its 0.3 s publish
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S + 1.0)
    assert swallowed == 1
    assert task in done
    assert task.cancelled()


async def test_broker_outage_never_blocks_callers_and_link_recovers(
    mosquitto: MosquittoProcess,
) -> None:
    link = MqttLink(_cfg(mosquitto.port, state_period_s=0.1), CART, simulated=True, version="t")
    async with _running(link):
        link.offer_state(sample_state(0, CART))
        await wait_until(lambda: link.connected, 3.0, what="link connected")

        mosquitto.stop()
        await wait_until(lambda: not link.connected, 2.0, what="link notices the outage")
        durations_s: list[float] = []
        for i in range(1, 201):
            start_s = time.perf_counter()
            link.offer_state(sample_state(i, CART))
            link.publish_event("events", Note(n=i))
            durations_s.append(time.perf_counter() - start_s)
            if i % 20 == 0:
                await asyncio.sleep(0.005)  # let the link try to reconnect meanwhile
        # Blocking on the dead broker would take a connect timeout (seconds) per call; the
        # calls only queue. The ceiling leaves room for a VM preemption (CI saw one call take
        # 1.03 ms among 200 of ~20 us), the median shows the typical cost.
        assert max(durations_s) < 0.05
        assert statistics.median(durations_s) < 1e-4
        assert link.connected is False
        assert link.stats.last_error is not None

        mosquitto.start()  # same port
        await wait_until(lambda: link.connected, 0.5 + 3.0, what="link reconnects")
        assert link.stats.reconnects == 1
        async with MqttRecorder(mosquitto.port, [STATE_TOPIC]) as rec:
            link.offer_state(sample_state(500, CART))
            fresh = await rec.first(
                lambda m: m.topic == STATE_TOPIC and m.json()["seq"] == 500, 2.0, "state resumes"
            )
    assert fresh.retain is False


_LINK_SCRIPT = """
import asyncio, sys
from ilup_controller.config.models import Mqtt
from ilup_controller.mqtt.link import MqttLink

async def main() -> None:
    cfg = Mqtt(host="127.0.0.1", port=int(sys.argv[1]), keepalive_s=int(sys.argv[3]))
    await MqttLink(cfg, sys.argv[2], simulated=True, version="child").run()

asyncio.run(main())
"""


async def test_kill_9_makes_the_broker_publish_the_will(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    keepalive_s = 2
    script = tmp_path / "link_child.py"
    script.write_text(_LINK_SCRIPT)
    async with MqttRecorder(mosquitto.port, [STATUS_TOPIC]) as rec:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            str(mosquitto.port),
            CART,
            str(keepalive_s),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await rec.first(_is_status(True), 10.0, "child online")
            child.kill()  # SIGKILL: no clean shutdown, no offline status from the child
            killed_s = asyncio.get_running_loop().time()
            will = await rec.first(
                _is_status(False),
                1.5 * keepalive_s + 1.0,
                "last will",
            )
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
    assert will.t_s - killed_s <= 1.5 * keepalive_s + 1.0
    will_status = json.loads(will.payload)
    assert len(will_status.pop("instance")) == 12  # the process's random id (duplicate_cart_id)
    assert will_status == Status(
        online=False, cart_id=CART, simulated=True, version="child"
    ).model_dump(mode="json", exclude={"instance"})


async def test_event_queue_overflow_drops_oldest(mosquitto: MosquittoProcess) -> None:
    queue_size = 5
    link = MqttLink(_cfg(mosquitto.port, queue_size=queue_size), CART, simulated=True, version="t")
    for n in range(12):  # link not running yet: everything waits in the queue
        link.publish_event("events", Note(n=n))
    assert link.stats.dropped == 12 - queue_size
    async with MqttRecorder(mosquitto.port, [EVENTS_TOPIC]) as rec, _running(link):
        await wait_until(lambda: len(rec.on(EVENTS_TOPIC)) >= queue_size, 3.0, what="events")
        # Acknowledged and off the queue (the subscriber can see them before the link has its
        # PUBACKs: an event queued then would still find the queue full).
        await wait_until(lambda: link.stats.queued == 0, 2.0, what="queue drained")
        # Later events go out too, in order, and the drop count does not move.
        link.publish_event("events", Note(n=100))
        await wait_until(lambda: len(rec.on(EVENTS_TOPIC)) >= queue_size + 1, 2.0, what="event 100")
    received = [m.json()["n"] for m in rec.on(EVENTS_TOPIC)]
    assert received == [7, 8, 9, 10, 11, 100]
    assert all(not m.retain for m in rec.on(EVENTS_TOPIC))
    assert link.stats.dropped == 7
    assert link.stats.published >= 1 + 6  # online status + six events


def test_publish_event_rejects_a_wildcard_topic() -> None:
    link = MqttLink(_cfg(1883), CART, simulated=True, version="t")
    with pytest.raises(ValueError, match="wildcard"):
        link.publish_event("alarms/#", Note(n=1))
    assert link.stats == (0, 0, 0, None, 0)


async def test_close_is_bounded_when_the_broker_hangs(mosquitto: MosquittoProcess) -> None:
    link = MqttLink(_cfg(mosquitto.port), CART, simulated=True, version="t")
    task = asyncio.create_task(link.run())
    try:
        await wait_until(lambda: link.connected, 3.0, what="link connected")
        mosquitto.pause()  # SIGSTOP: sockets stay open, nothing answers
        start_s = time.monotonic()
        await link.close()
        close_s = time.monotonic() - start_s
    finally:
        mosquitto.resume()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Bounded by the close timeout, not by the hung broker; the slack is for a loaded VM.
    assert close_s <= CLOSE_TIMEOUT_S + 0.5
    assert task.done()
