"""The procedure recorder: every row lands, NULLs stay NULL, acknowledged rows are durable before
commit() returns, overflow and write failures are counted and visible, a SIGKILL never loses a
committed row nor damages the file."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from ilup_controller.config import load_config
from ilup_controller.config.models import Record
from ilup_controller.mqtt.messages import (
    DrugPhase,
    Event,
    Loop,
    Measured,
    Outputs,
    State,
    Targets,
    Timing,
)
from ilup_controller.record import Recorder, RecorderError, open_record
from ilup_controller.record.recorder import BATCH_S
from ilup_controller.record.store import SAMPLE_COLUMNS

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
CONFIG_JSON = '{"cart_id": "cart1", "procedure": {"drug_phase_s": 1800.0}}'
REPO = Path(__file__).resolve().parents[1]


def make_state(i: int, *, phase: str = "perfusion", missing: bool = False) -> State:
    """Tick ``i`` of a synthetic procedure; ``missing``: flow and temperature not read."""
    return State(
        t=T0 + timedelta(seconds=0.1 * i),
        seq=i,
        cart_id="cart1",
        phase=phase,
        simulated=True,
        measured=Measured(
            flow_ml_min=None if missing else 500.0 + i % 7,
            pressure_mmhg=12.5,
            temperature_c=None if missing else 36.9,
            water_temperature_c=38.25,
            pump_speed_rpm=15.125,
            reservoir_volume_ml=None,
        ),
        targets=Targets(
            flow_ml_min=500.0,
            flow_ramped_ml_min=480.0,
            pressure_limit_mmhg=25.0,
            temperature_c=37.0,
            temperature_ramped_c=36.5,
        ),
        outputs=Outputs(pump_speed_rpm=15.0, heater_pct=42.5),
        loop=Loop(pump_limited_by="flow", heater_limited_by="temperature"),
        drug_phase=DrugPhase(elapsed_s=0.1 * i, remaining_s=1800.0 - 0.1 * i),
        active_alarms=["flow_low"] if missing else [],
        timing=Timing(tick_period_s=0.1, ticks=i, overruns=0),
    )


def make_event(seq: int, kind: str = "marker", **kw: Any) -> Event:
    fields: dict[str, Any] = {"message": f"{kind} {seq}", **kw}
    return Event(t=T0 + timedelta(seconds=seq), seq=seq, cart_id="cart1", kind=kind, **fields)


def new_recorder(directory: Path, **kw: Any) -> Recorder:
    rec = Recorder.create(directory, "cart1", CONFIG_JSON, **kw)
    rec.start()
    return rec


def call_times_s(
    rec: Recorder, states: list[State], events: dict[int, Event] | None = None
) -> list[float]:
    """Duration of each sample() (+ event()) call, sorted; models are built beforehand and GC
    is off, so only the recorder's own work is timed."""
    events = events or {}
    times: list[float] = []
    gc.disable()
    try:
        for i, state in enumerate(states):
            t = time.perf_counter()
            rec.sample(state)
            if i in events:
                rec.event(events[i])
            times.append(time.perf_counter() - t)
    finally:
        gc.enable()
    return sorted(times)


def assert_never_waits(times: list[float], stall_s: float) -> None:
    """A call that waited for the writer would take about ``stall_s`` (the writer's delay per
    row); the worst call must be far below that. The 99th percentile shows the usual cost,
    the maximum only has to stay clear of OS preemption (a few ms on a loaded 2-CPU box)."""
    p99_s = times[int(0.99 * len(times))]
    assert p99_s < 1e-3, f"p99 {p99_s * 1e3:.3f} ms"
    assert times[-1] < stall_s / 3, f"worst call {times[-1] * 1e3:.1f} ms: it waited"


def count(path: Path, sql: str, *args: Any) -> int:
    """A fresh connection (not the writer's) sees only committed rows."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(sql, args).fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- content


async def test_every_sample_and_event_is_recorded_with_nulls_and_meta(tmp_path: Path) -> None:
    rec = new_recorder(tmp_path)
    assert rec.path.name.startswith("cart1-")
    assert rec.path.suffix == ".sqlite"
    for i in range(500):
        rec.sample(make_state(i, missing=i % 10 == 3), t_mono_s=1000.0 + 0.1 * i)
        if i % 25 == 0:
            rec.event(make_event(i, "onset", alarm_id="flow_low", priority="medium", value=0.0))
    await rec.commit(make_event(9999, "phase", from_phase="perfusion", to_phase="washout"))
    assert rec.close(timeout_s=5.0)
    assert rec.dropped == 0
    assert rec.failed is None

    data = open_record(rec.path)
    s = data.samples
    assert data.integrity == "ok"
    assert s["seq"] == list(range(500))
    assert s["tick"] == list(range(500))
    assert s["t_mono_s"][123] == pytest.approx(1012.3)
    assert s["t_utc"][10] == (T0 + timedelta(seconds=1.0)).isoformat()
    missing = [i for i, v in enumerate(s["flow_ml_min"]) if v is None]
    assert missing == [i for i in range(500) if i % 10 == 3]  # NULL, never 0
    assert [i for i, v in enumerate(s["temperature_c"]) if v is None] == missing
    assert all(v is None for v in s["reservoir_volume_ml"])
    assert s["flow_ml_min"][4] == 504.0
    assert s["water_temperature_c"][0] == 38.25
    assert s["pump_speed_rpm_measured"][0] == 15.125
    assert (s["flow_ramped_ml_min"][0], s["temperature_ramped_c"][0]) == (480.0, 36.5)
    assert (s["pump_speed_rpm"][0], s["heater_pct"][0]) == (15.0, 42.5)
    assert s["drug_elapsed_s"][200] == pytest.approx(20.0)
    assert json.loads(s["active_alarms"][3]) == ["flow_low"]
    assert json.loads(s["active_alarms"][4]) == []

    assert len(data.events) == 21
    onset = data.events[0]
    assert (onset["kind"], onset["alarm_id"], onset["priority"]) == ("onset", "flow_low", "medium")
    assert onset["value"] == 0.0
    assert onset["limit_value"] is None
    assert Event.model_validate_json(onset["payload_json"]) == make_event(
        0, "onset", alarm_id="flow_low", priority="medium", value=0.0
    )
    last = data.events[-1]
    assert (last["kind"], last["from_phase"], last["to_phase"]) == ("phase", "perfusion", "washout")

    assert data.meta["cart_id"] == "cart1"
    assert data.meta["config_json"] == CONFIG_JSON
    assert data.meta["config_sha256"] == hashlib.sha256(CONFIG_JSON.encode()).hexdigest()
    assert data.meta["schema_version"] == "2"  # 2: hash-chained (test_record_integrity.py)
    assert datetime.fromisoformat(data.meta["created_utc"]).tzinfo is not None
    assert data.gaps == []


async def test_wal_and_synchronous_full_on_the_writer_connection(tmp_path: Path) -> None:
    rec = new_recorder(tmp_path)
    try:
        assert rec.writer_pragmas == {"journal_mode": "wal", "synchronous": "2"}
        conn = sqlite3.connect(rec.path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # in the file
        finally:
            conn.close()
    finally:
        rec.close()


async def test_commit_returns_only_once_the_row_is_visible_to_another_connection(
    tmp_path: Path,
) -> None:
    rec = new_recorder(tmp_path)
    rec.write_delay_s = 0.05  # the writer is slow: an early return would be caught
    try:
        for i in range(3):
            rec.sample(make_state(i))
        for seq in (1, 2, 3):
            await rec.commit(make_event(seq, "acknowledge", alarm_id="flow_low", operator="op1"))
            # Committed means: this event and every row queued before it.
            assert count(rec.path, "SELECT COUNT(*) FROM events") == seq
            assert count(rec.path, "SELECT COUNT(*) FROM samples") == 3
            assert (
                count(
                    rec.path,
                    "SELECT COUNT(*) FROM events WHERE json_extract(payload_json, '$.seq') = ?",
                    seq,
                )
                == 1
            )
    finally:
        rec.write_delay_s = 0.0
        assert rec.close()


async def test_samples_are_committed_in_batches_within_the_loss_window(tmp_path: Path) -> None:
    rec = new_recorder(tmp_path)
    try:
        rec.sample(make_state(0))
        t0 = time.monotonic()
        # Nothing forces a commit except the batch timer: the row must show up within 1 s.
        await wait_until(
            lambda: count(rec.path, "SELECT COUNT(*) FROM samples") == 1,
            timeout_s=1.0,
            what="a lone sample committed by the batch timer",
        )
        assert time.monotonic() - t0 >= BATCH_S * 0.5  # it was batched, not one commit per row
        for i in range(1, 251):
            rec.sample(make_state(i))
        await wait_until(
            lambda: count(rec.path, "SELECT COUNT(*) FROM samples") == 251,
            timeout_s=1.0,
            what="250 samples committed (100-row batches + timer)",
        )
    finally:
        rec.close()


async def test_decimation_keeps_every_nth_tick(tmp_path: Path) -> None:
    rec = new_recorder(tmp_path, sample_every_ticks=5)
    for i in range(100):
        rec.sample(make_state(i))
    assert rec.close()
    s = open_record(rec.path).samples
    assert s["tick"] == list(range(0, 100, 5))
    assert s["seq"] == list(range(20))


# --------------------------------------------------------------------------- overflow


async def test_full_queue_drops_are_counted_and_recorded_as_gaps_without_blocking(
    tmp_path: Path,
) -> None:
    rec = new_recorder(tmp_path, queue_size=50)
    rec.write_delay_s = 0.3  # slow disk: each row takes 0.3 s
    states = [make_state(i) for i in range(10_000)]
    events = {i: make_event(i) for i in range(500, 10_000, 1000)}
    assert_never_waits(call_times_s(rec, states, events), stall_s=0.3)
    assert rec.dropped > 9000
    assert rec.queue_depth <= 50 + 1
    rec.write_delay_s = 0.0
    await wait_until(lambda: rec.queue_depth == 0, timeout_s=5.0, what="queue drained")
    rec.sample(make_state(10_000))  # space is back: the pending gap row goes first
    dropped = rec.dropped
    assert rec.close()

    data = open_record(rec.path)
    present = set(data.samples["seq"])
    missing = set(range(10_001)) - present
    assert 10_000 in present
    covered: set[int] = set()
    for g in data.gaps:
        if g["from_seq"] is not None:
            covered |= set(range(g["from_seq"], g["to_seq"] + 1))
    assert covered == missing  # every dropped sample is inside a recorded gap, nothing else
    n_events = len(data.events)
    assert len(missing) + (10 - n_events) == dropped
    counts = [
        re.fullmatch(r"queue full: (\d+) samples and (\d+) events dropped", g["reason"])
        for g in data.gaps
    ]
    assert all(counts), [g["reason"] for g in data.gaps]
    assert sum(int(m[1]) for m in counts if m) == len(missing)
    assert sum(int(m[2]) for m in counts if m) == 10 - n_events


# --------------------------------------------------------------------------- failure


class _FlakyConnection(sqlite3.Connection):
    """Raises a disk I/O error on the statement named by ``fail_on`` once armed."""

    fail_on: str | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if self.fail_on is not None and sql.startswith(self.fail_on):
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, parameters)


@pytest.mark.parametrize("fail_on", ["INSERT", "COMMIT"])
async def test_write_error_fails_the_recorder_for_good(
    tmp_path: Path, fail_on: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(_FlakyConnection):
        pass

    rec = Recorder.create(tmp_path, "cart1", CONFIG_JSON)
    rec.connection_class = Flaky
    rec.start()
    for i in range(5):
        rec.sample(make_state(i))
    await rec.commit(make_event(1, "acknowledge"))  # works: committed with the 5 samples
    Flaky.fail_on = fail_on  # armed before the next rows, so the outcome is deterministic
    for i in range(5, 8):
        rec.sample(make_state(i))
    with (
        caplog.at_level(logging.ERROR, logger="ilup_controller.record.recorder"),
        pytest.raises(RecorderError, match="disk I/O error"),
    ):
        await rec.commit(make_event(2, "acknowledge"))
    assert rec.failed is not None
    assert "disk I/O error" in rec.failed
    assert any(
        r.levelno == logging.ERROR and "recorder failed" in r.message for r in caplog.records
    )
    lost = rec.dropped
    # INSERT fails on the first queued sample: it, and the event, are lost (the 2 samples behind
    # it are discarded too); COMMIT fails with 3 samples + the event in the transaction.
    assert lost == 4

    Flaky.fail_on = None  # the disk "recovers": no retry, the recorder stays failed
    assert_never_waits(call_times_s(rec, [make_state(i) for i in range(8, 1008)]), stall_s=0.3)
    rec.event(make_event(3))
    assert rec.dropped == lost + 1001
    with pytest.raises(RecorderError, match="recorder failed"):
        await rec.commit(make_event(4, "acknowledge"))
    assert rec.failed is not None
    assert rec.close()

    data = open_record(rec.path)  # what was committed before the failure is intact
    assert data.integrity == "ok"
    assert data.samples["seq"] == list(range(5))
    assert [json.loads(e["payload_json"])["seq"] for e in data.events] == [1]


async def test_commit_after_close_raises(tmp_path: Path) -> None:
    rec = new_recorder(tmp_path)
    assert rec.close()
    with pytest.raises(RecorderError, match="not running"):
        await rec.commit(make_event(1))
    rec.sample(make_state(0))
    assert rec.dropped == 1


def test_create_in_an_unusable_directory_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RecorderError, match="cannot create a record"):
        Recorder.create(blocker / "records", "cart1", CONFIG_JSON)


# --------------------------------------------------------------------------- restart


async def test_reopen_continues_the_sequence_and_records_a_config_change(tmp_path: Path) -> None:
    rec = new_recorder(tmp_path)
    for i in range(10):
        rec.sample(make_state(i))
    assert rec.close()

    same = Recorder.reopen(rec.path, config_json=CONFIG_JSON)
    same.start()
    same.sample(make_state(0))  # the daemon's tick count restarted at 0
    assert same.close()
    changed = '{"cart_id": "cart1", "procedure": {"drug_phase_s": 900.0}}'
    again = Recorder.reopen(rec.path, config_json=changed)
    again.start()
    again.sample(make_state(0))
    assert again.close()

    data = open_record(rec.path)
    assert data.samples["seq"] == list(range(12))
    assert data.samples["tick"] == [*range(10), 0, 0]
    assert [e["kind"] for e in data.events] == ["config"]
    payload = json.loads(data.events[0]["payload_json"])
    assert payload["config_sha256"] == hashlib.sha256(changed.encode()).hexdigest()
    assert payload["config_json"] == changed
    assert data.meta["config_json"] == CONFIG_JSON  # the original meta is never rewritten


def test_from_config_records_the_effective_config_without_the_password(tmp_path: Path) -> None:
    cfg = load_config(REPO / "config" / "sim.yaml")
    cfg = cfg.model_copy(
        update={
            "mqtt": cfg.mqtt.model_copy(update={"password": "s3cret-pw"}),
            "record": Record(directory=str(tmp_path / "rec"), sample_every_ticks=2),
        }
    )
    rec = Recorder.from_config(cfg)
    assert rec.path.parent == tmp_path / "rec"
    assert rec.sample_every_ticks == 2
    meta = open_record(rec.path).meta
    assert "s3cret-pw" not in meta["config_json"]
    config = json.loads(meta["config_json"])
    assert config["mqtt"]["password"] == "***"
    assert config["cart_id"] == cfg.cart_id
    assert config["record"]["sample_every_ticks"] == 2
    assert meta["config_sha256"] == hashlib.sha256(meta["config_json"].encode()).hexdigest()


# --------------------------------------------------------------------------- crash

_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from ilup_controller.mqtt.messages import Event, State
    from ilup_controller.record import Recorder

    state = State.model_validate_json(sys.argv[2])
    rec = Recorder.reopen(sys.argv[1])
    rec.start()

    async def main() -> None:
        print("ready", flush=True)
        i = 0
        while True:
            for k in range(3):  # samples ride along in the batch the event commits
                rec.sample(state.model_copy(update={"seq": 3 * i + k}))
            await rec.commit(Event(t=state.t, seq=i, cart_id="cart1", kind="marker", message="m"))
            print(i, flush=True)
            i += 1

    asyncio.run(main())
    """
)


def test_sigkill_at_random_moments_loses_no_committed_row(tmp_path: Path) -> None:
    rng = random.Random(20250301)
    runs = 12
    paths = []
    for n in range(runs):
        rec = Recorder.create(tmp_path / f"run{n}", "cart1", CONFIG_JSON)
        rec.start()
        assert rec.close()
        paths.append(rec.path)
    state_json = make_state(0).model_dump_json()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t_start = time.monotonic()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(p), state_json],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in paths
    ]
    try:
        kill_at = []
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n", child.stderr and child.stderr.read()
            kill_at.append(time.monotonic() + rng.uniform(0.02, 0.6))
        for child, at in sorted(zip(children, kill_at, strict=True), key=lambda c: c[1]):
            time.sleep(max(0.0, at - time.monotonic()))
            child.send_signal(signal.SIGKILL)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    outputs = []
    for child in children:
        child.wait(timeout=10)
        assert child.stdout is not None  # dead: read to EOF (past what readline() buffered)
        outputs.append(child.stdout.read())
        child.stdout.close()
        if child.stderr is not None:
            child.stderr.close()
    assert time.monotonic() - t_start < 15.0

    total_committed = 0
    for child, path, out in zip(children, paths, outputs, strict=True):
        assert child.returncode == -signal.SIGKILL
        committed = [int(line) for line in out.splitlines() if line.strip().isdigit()]
        assert committed == list(range(len(committed)))
        total_committed += len(committed)
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            event_seqs = {
                r[0] for r in conn.execute("SELECT json_extract(payload_json, '$.seq') FROM events")
            }
            sample_seqs = [r[0] for r in conn.execute("SELECT seq FROM samples ORDER BY seq")]
        finally:
            conn.close()
        assert set(committed) <= event_seqs, f"{path}: committed events missing"
        if committed:
            # Every sample queued before the last acknowledged event is durable too.
            assert sample_seqs[: 3 * len(committed)] == list(range(3 * len(committed)))
        assert sample_seqs == list(range(len(sample_seqs)))  # a prefix: no hole
        assert open_record(path).integrity == "ok"  # the read path copes with a dead writer
    assert total_committed >= runs  # the kills did land mid-procedure, not before it began


def test_sample_columns_match_the_schema() -> None:
    assert SAMPLE_COLUMNS[:2] == ("seq", "tick")
    assert len(SAMPLE_COLUMNS) == len(set(SAMPLE_COLUMNS)) == 20
