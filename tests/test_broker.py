"""Broker helpers: the MQTT probe, ensure_broker and the amqtt fallback's guard."""

from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path

import pytest

from ilup_controller.broker import (
    EmbeddedBroker,
    MosquittoProcess,
    _handshake,
    broker_answers,
    ensure_broker,
    free_port,
)


def test_probe_needs_a_real_mqtt_handshake(mosquitto: MosquittoProcess) -> None:
    assert broker_answers("127.0.0.1", mosquitto.port) is True
    # A port that accepts TCP but never speaks MQTT is not a broker.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        start_s = time.monotonic()
        assert broker_answers("127.0.0.1", silent.getsockname()[1], timeout_s=0.3) is False
        assert time.monotonic() - start_s < 1.0
    mosquitto.stop()
    assert broker_answers("127.0.0.1", mosquitto.port) is False


def test_ensure_broker_uses_a_running_broker(mosquitto: MosquittoProcess) -> None:
    assert ensure_broker("127.0.0.1", mosquitto.port) == ("127.0.0.1", mosquitto.port, None, "5")


def test_ensure_broker_starts_mosquitto_on_the_free_preferred_port() -> None:
    port = free_port()
    host, got_port, handle, protocol = ensure_broker("127.0.0.1", port)
    try:
        assert (host, got_port, protocol) == ("127.0.0.1", port, "5")
        assert isinstance(handle, MosquittoProcess)
        assert broker_answers(host, port) is True
    finally:
        if handle is not None:
            handle.stop()
    assert broker_answers(host, port) is False


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    # Outgoing connections take ports from the ephemeral range; a port from there can be gone
    # before the server binds it (a simulator once failed "Address already in use" in CI).
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == 300
    assert all(20000 <= p < low for p in ports), (min(ports), max(ports), low)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # and free


def test_mosquitto_refuses_a_port_in_use(mosquitto: MosquittoProcess) -> None:
    with pytest.raises(RuntimeError, match="already in use"):
        MosquittoProcess(mosquitto.port).start()


def test_embedded_broker_speaks_3_1_1_only_or_names_the_missing_package() -> None:
    if importlib.util.find_spec("amqtt") is None:
        with pytest.raises(RuntimeError, match="'amqtt' package"):
            EmbeddedBroker()
        return
    broker = EmbeddedBroker()
    broker.start(timeout_s=10.0)
    try:
        assert broker_answers("127.0.0.1", broker.port) is True
        assert _handshake("127.0.0.1", broker.port, 5, 0.5) is False
    finally:
        broker.stop()
