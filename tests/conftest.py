"""Shared fixtures. Brokers and devices bind 127.0.0.1 on free ephemeral ports only."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from ilup_controller.broker import MosquittoProcess, mosquitto_binary

# pymodbus logs every retry and reconnect at INFO/DEBUG; keep test output readable.
logging.getLogger("pymodbus").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _own_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's daemons take their cart lock (runtime/lock.py) in the test's own runtime
    dir, so tests running at the same time on one computer never refuse each other."""
    monkeypatch.setenv("ILUP_RUNTIME_DIR", str(tmp_path / "run"))


@pytest.fixture
def mosquitto() -> Iterator[MosquittoProcess]:
    """A real mosquitto on 127.0.0.1:<free port>, stopped after the test.

    Never skipped: the MQTT tests are meaningless without a real broker, and CI installs one.
    """
    if mosquitto_binary() is None:
        pytest.fail(
            "mosquitto is not installed (looked on PATH and in /usr/sbin): "
            "apt-get install mosquitto",
            pytrace=False,
        )
    broker = MosquittoProcess()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
