"""Two daemons with one cart_id on one broker (issue 8, defect 11): real `ilup run` processes,
each with its own simulator and record directory, against one mosquitto on a free port. They
share an MQTT client id, so the broker disconnects one whenever the other connects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import wait_until
from procs import Proc, Subscriber, session, write_cart_config

from ilup_controller.broker import MosquittoProcess
from ilup_controller.config.models import Mqtt
from ilup_controller.mqtt.link import CLASH_BACKOFF_S, MqttLink

pytestmark = pytest.mark.integration

WINDOW_S = 12.0
DETECT_BUDGET_S = 30.0  # generous: four Python processes on a loaded 2-core machine
# Once the clash is known each daemon reconnects at most every 0.8 x CLASH_BACKOFF_S (jitter):
# 2 link-ups each in 12 s, plus one each that may still be under way. Before: 60+.
MAX_LINK_UPS_IN_WINDOW = 6


def _link_ups(*daemons: Proc) -> int:
    return sum(d.log().count("MQTT link up") for d in daemons)


async def test_two_daemons_with_one_cart_id_raise_an_alarm_and_back_off(
    tmp_path: Path, mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        path, cfg = write_cart_config(
            tmp_path / name, mosquitto.port, overrides={"control": {"autostart": False}}
        )
        paths.append(path)
    prefix = f"{cfg.mqtt.topic_prefix}/{cfg.cart_id}"
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    loop = asyncio.get_running_loop()
    async with session(sub) as procs:
        for name, path in zip("ab", paths, strict=True):
            procs.append(Proc(["sim", "-c", str(path)], tmp_path / name / "sim.log"))
        # Two computers: each daemon has its own runtime dir, so the cart lock does not apply.
        monkeypatch.setenv("ILUP_RUNTIME_DIR", str(tmp_path / "a" / "run"))
        procs.append(a := Proc(["run", "-c", str(paths[0])], tmp_path / "a" / "daemon.log"))
        await wait_until(lambda: "daemon started" in a.log(), 30.0, 0.05, "daemon a started")
        monkeypatch.setenv("ILUP_RUNTIME_DIR", str(tmp_path / "b" / "run"))
        procs.append(b := Proc(["run", "-c", str(paths[1])], tmp_path / "b" / "daemon.log"))
        t_b = loop.time()

        def clash_alarm() -> bool:
            return any(
                al["id"] == "duplicate_cart_id" and al["priority"] == "high"
                for m in sub.of("/alarms")
                for al in m.payload["alarms"]
            )

        await wait_until(clash_alarm, DETECT_BUDGET_S, 0.05, "duplicate_cart_id on /alarms")
        detect_s = loop.time() - t_b
        alarm = next(
            al
            for m in sub.of("/alarms")
            for al in m.payload["alarms"]
            if al["id"] == "duplicate_cart_id"
        )
        assert f"another client uses cart_id {cfg.cart_id}" in alarm["message"]
        assert "Two clients use one cart_id" in alarm["message"]

        # The reconnect storm has stopped: count the link-ups of both daemons over 12 s.
        before = _link_ups(a, b)
        await asyncio.sleep(WINDOW_S)
        in_window = _link_ups(a, b) - before
        print(
            f"duplicate_cart_id on /alarms {detect_s:.1f} s after the second daemon started; "
            f"{in_window} link-ups of both daemons in {WINDOW_S:.0f} s "
            f"(clash back-off {CLASH_BACKOFF_S:g} s)"
        )
        assert in_window <= MAX_LINK_UPS_IN_WINDOW
        for d in (a, b):
            assert d.p.poll() is None, "a daemon exited"
        assert "MQTT identity clash" in a.log() + b.log()


# ----------------------------------------------------------------- MqttLink alone, in process


def _link(port: int) -> MqttLink:
    cfg = Mqtt.model_validate({"host": "127.0.0.1", "port": port, "reconnect_max_s": 0.5})
    return MqttLink(cfg, "cart_dup", simulated=True, version="t")


@contextlib.asynccontextmanager
async def _running(link: MqttLink) -> AsyncIterator[None]:
    task = asyncio.create_task(link.run())
    try:
        yield
    finally:
        await link.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_restart_and_broker_restart_are_not_a_clash(mosquitto: MosquittoProcess) -> None:
    first = _link(mosquitto.port)
    async with _running(first):
        await wait_until(lambda: first.connected, 5.0)
    # A new process finds its predecessor's retained status: that is not another client.
    second = _link(mosquitto.port)
    assert second.instance != first.instance
    async with _running(second):
        await wait_until(lambda: second.connected, 5.0)
        await asyncio.sleep(1.0)  # the retained status has been delivered and judged
        assert second.identity_clash == ""
        mosquitto.stop()  # a reconnect finds its own retained status (persistence) or none
        await wait_until(lambda: not second.connected, 5.0)
        mosquitto.start()
        await wait_until(lambda: second.connected, 10.0)
        await asyncio.sleep(1.0)
        assert second.identity_clash == ""


async def test_two_links_with_one_cart_id_both_see_the_clash(mosquitto: MosquittoProcess) -> None:
    one, two = _link(mosquitto.port), _link(mosquitto.port)
    loop = asyncio.get_running_loop()
    async with _running(one):
        await wait_until(lambda: one.connected, 5.0)
        t0 = loop.time()
        async with _running(two):
            took_s = await wait_until(
                lambda: bool(one.identity_clash and two.identity_clash), 10.0, 0.01, "both"
            )
            print(f"both links saw the clash {took_s:.2f} s after the second one started")
            assert two.instance in one.identity_clash
            assert one.instance in two.identity_clash
            assert loop.time() - t0 <= 10.0
