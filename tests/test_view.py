"""The live view: the pure frame renderer, and watch() against a real broker and MqttLink."""

from __future__ import annotations

import asyncio
import contextlib
import io

import aiomqtt
import pytest
from helpers import sample_state, wait_until
from rich.console import Console, RenderableType

from ilup_controller import view
from ilup_controller.broker import MosquittoProcess
from ilup_controller.config.models import Mqtt
from ilup_controller.mqtt.link import MqttLink
from ilup_controller.mqtt.messages import DrugPhase, Loop, Measured, Outputs, State, Status
from ilup_controller.mqtt.topics import Topics
from ilup_controller.view import STALE_AFTER_S, render_state, watch

CART = "cart_v"
ONLINE = Status(online=True, cart_id=CART, simulated=True, version="1.2.3")


def _text(renderable: RenderableType) -> str:
    console = Console(record=True, width=120, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def _fresh(state: State) -> str:
    """The view of ``state`` received 0.4 s ago from an online daemon, broker connected."""
    return _text(render_state(state, ONLINE, now_s=100.4, received_at_s=100.0, broker_ok=True))


def _row(text: str, label: str) -> list[str]:
    """The cells after ``label`` on its table line, panel borders removed."""
    line = next(line for line in text.splitlines() if label in line)
    rest = line.split(label, 1)[1]
    return [cell for cell in rest.split() if cell != "\u2502"]


def test_fresh_state_shows_values_against_targets() -> None:
    state = sample_state(1234, CART, outputs=Outputs(pump_speed_rpm=15.2, heater_pct=61.0))
    text = _fresh(state)
    assert "STALE" not in text
    # measured, setpoint (ramped) or command, target or limit, unit
    assert _row(text, "Flow") == ["499", "450", "500", "mL/min"]
    assert _row(text, "PA pressure") == ["18.4", "-", "25.0", "mmHg"]
    assert _row(text, "Perfusate temp") == ["36.20", "36.50", "37.00", "degC"]
    assert _row(text, "Heater water") == ["38.90", "39.00", "-", "degC"]
    assert _row(text, "Pump speed") == ["15.1", "15.2", "-", "rpm"]
    assert _row(text, "Heater power") == ["-", "61", "-", "%"]
    assert "pump limited by: flow" in text
    assert "phase perfusing" in text
    assert "seq 1234" in text
    assert "state age 0.4 s" in text
    assert "alarms: none" in text
    assert "drug phase: 0:00 min at target, 30:00 min remaining" in text
    assert "daemon online" in text
    assert "v1.2.3" in text
    assert "broker: connected" in text


def test_a_rewarming_loop_that_slowed_its_integral_says_so() -> None:
    """After bursts of warming the rate loop runs at half its integral gain: the line under the
    values says so next to what limits the heater; at full gain nothing is added."""
    loop = Loop(
        pump_limited_by="flow",
        heater_limited_by="temperature",
        water_setpoint_c=39.0,
        rate_integral_scale=0.5,
    )
    text = _fresh(sample_state(7, CART, loop=loop))
    assert "heater limited by: temperature    rewarm integral x0.5 (warming came in bursts)" in text
    assert "rewarm integral" not in _fresh(sample_state(8, CART))


def test_a_paused_drug_timer_is_shown_as_paused() -> None:
    # In perfusion off target the timer stands still: the view says so, not just a number.
    frames = {
        counting: _fresh(
            sample_state(
                1,
                CART,
                phase="perfusion",
                drug_phase=DrugPhase(elapsed_s=600.0, remaining_s=1200.0, counting=counting),
            )
        )
        for counting in (True, False)
    }
    assert (
        "drug phase: 10:00 min at target, 20:00 min remaining (PAUSED: off target)"
        in (frames[False])
    )
    assert "PAUSED" not in frames[True]
    # Done, and still in perfusion without auto_advance: the timer stopped, nothing is paused.
    done = _fresh(
        sample_state(
            1,
            CART,
            phase="perfusion",
            drug_phase=DrugPhase(elapsed_s=1800.0, remaining_s=0.0, counting=False),
        )
    )
    assert "drug phase: 30:00 min at target, 0:00 min remaining" in done
    assert "PAUSED" not in done


def test_state_older_than_the_limit_is_stale_never_current() -> None:
    state = sample_state(7, CART)
    at_limit = _text(render_state(state, ONLINE, 10.0 + STALE_AFTER_S, 10.0, True))
    assert "STALE" not in at_limit
    text = _text(render_state(state, ONLINE, 10.0 + STALE_AFTER_S + 0.5, 10.0, True))
    assert "STALE: no new state for 3.5 s" in text
    # Every measured number carries the STALE label right next to it.
    assert "499 STALE" in text
    assert "18.4 STALE" in text
    assert "36.20 STALE" in text
    assert "state age" not in text


def test_retained_state_of_unknown_age_is_stale() -> None:
    text = _text(render_state(sample_state(3, CART), ONLINE, 50.0, None, True))
    assert "STALE: retained state of unknown age" in text


def test_missing_reading_is_not_shown_as_zero() -> None:
    measured = Measured(flow_ml_min=None, pressure_mmhg=12.0, temperature_c=35.0)
    text = _text(render_state(sample_state(1, CART, measured=measured), ONLINE, 1.0, 0.9, True))
    assert _row(text, "Flow")[:3] == ["no", "reading", "450"]


def test_offline_daemon_broker_down_and_alarms_are_shown() -> None:
    state = sample_state(9, CART, active_alarms=["pressure_stop", "sensor_stale:flow"])
    offline = Status(online=False, cart_id=CART)
    text = _text(render_state(state, offline, 5.0, 4.9, broker_ok=False))
    assert "DAEMON OFFLINE" in text
    assert "BROKER DISCONNECTED" in text
    assert "ALARMS: pressure_stop, sensor_stale:flow" in text


def test_nothing_received_yet() -> None:
    text = _text(render_state(None, None, 0.0, None, broker_ok=True))
    assert "No state received yet" in text
    assert "status unknown" in text


async def _publish_states(link: MqttLink) -> None:
    seq = 0
    while True:
        link.offer_state(sample_state(seq, CART))
        seq += 1
        await asyncio.sleep(0.05)


async def test_watch_once_shows_a_live_state(
    mosquitto: MosquittoProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = Mqtt(host="127.0.0.1", port=mosquitto.port, state_period_s=0.2)
    link = MqttLink(cfg, CART, simulated=True, version="1.2.3")
    runner = asyncio.create_task(link.run())
    offers = asyncio.create_task(_publish_states(link))
    try:
        code = await watch("127.0.0.1", mosquitto.port, "ilup", CART, once=True)
    finally:
        offers.cancel()
        await link.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    out = capsys.readouterr().out
    assert code == 0
    assert "state age" in out
    assert "STALE" not in out
    assert "daemon online" in out


async def test_watch_once_without_a_daemon_returns_1(
    mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(view, "ONCE_WAIT_S", 0.3)
    code = await watch("127.0.0.1", mosquitto.port, "ilup", CART, once=True, protocol="3.1.1")
    assert code == 1
    assert "No state received yet" in capsys.readouterr().out


async def test_watch_returns_0_when_cancelled(mosquitto: MosquittoProcess) -> None:
    task = asyncio.create_task(watch("127.0.0.1", mosquitto.port, "ilup", CART, refresh_s=0.05))
    await asyncio.sleep(0.2)  # let it draw a few frames; the result does not depend on it
    task.cancel()
    assert await asyncio.wait_for(task, 2.0) == 0


async def test_ctrl_c_ends_the_view_even_when_the_broker_does_not_ack_the_disconnect(
    mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in `ilup demo` left the view hung for good, twice in a full test run: the
    follower's client, leaving on the cancel, got no disconnect acknowledgement in its 3 s and
    aiomqtt raised MqttError in place of the CancelledError; the follower took it for a broker
    outage and reconnected, and `watch` waited for it forever. Here every disconnect "times
    out" that way, against the real broker: the view still ends within 1 s of the timeout."""
    real_aexit = aiomqtt.Client.__aexit__
    exits = [0]

    async def disconnect_times_out(self: aiomqtt.Client, *exc: object) -> None:
        await real_aexit(self, *exc)  # type: ignore[arg-type]
        exits[0] += 1
        raise aiomqtt.MqttError("Operation timed out")  # what aiomqtt raises after `timeout`

    monkeypatch.setattr(aiomqtt.Client, "__aexit__", disconnect_times_out)
    latest = view._Latest()
    follower = asyncio.create_task(
        view._follow(latest, Topics("ilup", CART), "127.0.0.1", mosquitto.port, "5", None, None)
    )
    try:
        await wait_until(lambda: latest.broker_ok, 3.0, what="view connected")
        follower.cancel()
        done, _ = await asyncio.wait({follower}, timeout=1.0)
        assert follower in done, "the follower reconnected after its cancel"
        assert follower.cancelled()
        assert exits == [1]  # it left once, and did not connect again
    finally:
        monkeypatch.undo()  # a follower still running (the defect) can then be cancelled
        follower.cancel()
        await asyncio.wait({follower}, timeout=5.0)


async def test_follower_reconnects_after_a_broker_restart(mosquitto: MosquittoProcess) -> None:
    latest = view._Latest()
    topics = Topics("ilup", CART)
    follower = asyncio.create_task(
        view._follow(latest, topics, "127.0.0.1", mosquitto.port, "5", None, None)
    )
    try:
        await wait_until(lambda: latest.broker_ok, 3.0, what="view connected")
        mosquitto.stop()
        await wait_until(lambda: not latest.broker_ok, 2.0, what="view notices the outage")
        assert latest.detail is not None
        mosquitto.start()
        await wait_until(lambda: latest.broker_ok, 4.0, what="view reconnected")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


def test_sparkline_scales_to_the_window_and_marks_gaps() -> None:
    from ilup_controller.view import sparkline

    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0, None, 5.0]) == "▁ ▁"
    assert sparkline([None, None]) == ""


def test_trend_column_shows_the_recent_values() -> None:
    from ilup_controller.view import trend_of

    history = [sample_state(i, CART) for i in range(5)]
    history = [
        s.model_copy(update={"measured": s.measured.model_copy(update={"flow_ml_min": 100.0 * i})})
        for i, s in enumerate(history)
    ]
    trend = trend_of(history)
    assert trend["flow"] == "▁▃▅▇█"
    text = _text(render_state(history[-1], ONLINE, 10.0, 9.5, True, trend=trend))
    assert "▁▃▅▇█" in _row(text, "Flow")[-1]


def test_the_guard_is_shown_watching_holding_off_or_offline() -> None:
    from ilup_controller.client import guard_line
    from ilup_controller.mqtt.messages import GuardStatus

    state = sample_state(1, CART)
    form = {"pump": "enable", "heater": "command"}
    watching = GuardStatus(online=True, cart_id=CART, form=form)
    text = _text(render_state(state, ONLINE, 1.0, 0.9, True, guard=watching))
    assert "guard: watching (heater by command, pump by enable)" in text
    held = GuardStatus(
        online=True, cart_id=CART, form=form, latched={"pump": "PA pressure 31.0 >= 30 mmHg"}
    )
    text = _text(render_state(state, ONLINE, 1.0, 0.9, True, guard=held))
    assert "guard: pump HELD OFF: PA pressure 31.0 >= 30 mmHg" in text
    gone = GuardStatus(online=False, cart_id=CART)
    assert "guard: OFFLINE" in _text(render_state(state, ONLINE, 1.0, 0.9, True, guard=gone))
    # `ilup status` prints the same from the retained status.
    assert guard_line(held.model_dump(mode="json")).endswith(
        "pump HELD OFF: PA pressure 31.0 >= 30 mmHg"
    )
    assert guard_line(watching.model_dump(mode="json")) == (
        "guard: online (heater by command, pump by enable), nothing held off"
    )
    assert guard_line(gone.model_dump(mode="json")).startswith("guard: OFFLINE")
