"""Record integrity (issue 12 part 4): the recorder hash-chains every row, and `ilup verify`
names a changed byte, a removed row (middle or last), reordered rows and rewritten meta; a
record from a crashed writer is "unsealed", not tampered; a resumed record continues the chain;
a format-1 record has no chain and still opens."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_recorder import CONFIG_JSON, REPO, make_event, make_state

from ilup_controller.cli import main
from ilup_controller.config import load_config
from ilup_controller.config.models import Record
from ilup_controller.exitcodes import ExitCode
from ilup_controller.record import Recorder, chain, open_record
from ilup_controller.record.chain import Verification, verify_record
from ilup_controller.record.report import render_report
from ilup_controller.record.store import _SCHEMA, INSERT_SAMPLE, sample_row
from ilup_controller.runtime.recovery import open_procedure

MARKER = "drug in: melphalan 40 mg"


@dataclass(frozen=True)
class Written:
    path: Path
    rows: dict[str, int]


async def write_record(directory: Path, n_samples: int = 300) -> Written:
    """A real record by the real recorder: samples, alarm events, a gap (10 samples dropped
    from a full queue), an operator marker committed like an acknowledged command; closed."""
    rec = Recorder.create(directory, "cart1", CONFIG_JSON, queue_size=20)
    for i in range(30):  # the writer is not running yet: 20 queued, 10 dropped (a gap)
        rec.sample(make_state(i), t_mono_s=0.1 * i)
    rec.start()
    await rec.commit(make_event(0, "phase", from_phase="priming", to_phase="perfusion"))
    events = 1  # committed: the queue has drained, the gap row is written before it
    for i in range(30, n_samples):
        rec.sample(make_state(i), t_mono_s=0.1 * i)
        if i % 10 == 0:  # committed: the queue (20) never overflows again
            await rec.commit(make_event(i, "onset", alarm_id="flow_low", priority="medium"))
            events += 1
    await rec.commit(make_event(n_samples, "marker", message=MARKER, operator="op1"))
    assert rec.close()
    assert rec.dropped == 10
    return Written(rec.path, {"samples": n_samples - 10, "events": events + 1, "gaps": 1})


@pytest.fixture
async def record(tmp_path: Path) -> Written:
    return await write_record(tmp_path / "records")


def sql(path: Path, *statements: str, args: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    try:
        for s in statements:
            conn.execute(s, args if "?" in s else ())
        conn.commit()
    finally:
        conn.close()


def one(path: Path, query: str, *args: Any) -> Any:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, args).fetchone()
    finally:
        conn.close()


def only(v: Verification, problem: str) -> None:
    assert v.status == "tampered", v.summary()
    assert v.exit_code == ExitCode.REJECTED == 5
    assert [f.problem for f in v.findings] == [problem], [f.text() for f in v.findings]


# --------------------------------------------------------------------------- intact


async def test_a_closed_record_verifies_intact_and_sealed(record: Written) -> None:
    v = verify_record(record.path)
    assert v.status == "intact", v.summary()
    assert v.exit_code == ExitCode.OK
    assert v.rows == record.rows == {"samples": 290, "events": 29, "gaps": 1}
    assert v.rows_checked == v.intact_rows == v.head_rows == 320
    assert v.findings == []
    assert v.sealed_utc is not None
    (last_hash,) = one(
        record.path,
        "SELECT chain_hash FROM (SELECT chain_n, chain_hash FROM samples UNION ALL "
        "SELECT chain_n, chain_hash FROM events UNION ALL SELECT chain_n, chain_hash FROM gaps) "
        "ORDER BY chain_n DESC LIMIT 1",
    )
    assert v.head_hash == last_hash
    # Every position 1..N once, across the three tables, in the order written.
    (n, lo, hi) = one(
        record.path,
        "SELECT COUNT(DISTINCT chain_n), MIN(chain_n), MAX(chain_n) FROM (SELECT chain_n FROM "
        "samples UNION ALL SELECT chain_n FROM events UNION ALL SELECT chain_n FROM gaps)",
    )
    assert (n, lo, hi) == (320, 1, 320)
    assert v.seconds < 1.0


# --------------------------------------------------------------------------- tampering


async def test_one_changed_byte_in_an_event_is_named(record: Written) -> None:
    event_id, chain_n, t_utc = one(
        record.path, "SELECT id, chain_n, t_utc FROM events WHERE kind = 'marker'"
    )
    sql(
        record.path,
        "UPDATE events SET message = ? WHERE kind = 'marker'",
        args=(MARKER.replace("40 mg", "10 mg"),),  # one byte: '4' -> '1'
    )
    v = verify_record(record.path)
    only(v, "changed")
    f = v.findings[0]
    assert (f.chain_n, f.table, f.key, f.kind, f.t_utc) == (
        chain_n,
        "events",
        event_id,
        "marker",
        t_utc,
    )
    assert v.intact_rows == chain_n - 1
    assert f"event id {event_id} (marker)" in v.summary()


def test_one_flipped_byte_in_the_file_is_named(tmp_path: Path) -> None:
    """A hex editor, not SQL: SQLite itself does not notice (no page checksums), the chain does."""
    record = asyncio.run(write_record(tmp_path))
    assert not Path(f"{record.path}-wal").exists()  # checkpointed on close: all in the file
    raw = bytearray(record.path.read_bytes())
    at = raw.find(b"melphalan")
    assert at > 0
    raw[at] ^= 0x01  # 'm' -> 'l'
    record.path.write_bytes(bytes(raw))
    assert open_record(record.path).integrity == "ok"
    v = verify_record(record.path)
    only(v, "changed")
    assert (v.findings[0].table, v.findings[0].kind) == ("events", "marker")


async def test_a_removed_middle_row_is_missing(record: Written) -> None:
    (chain_n,) = one(record.path, "SELECT chain_n FROM samples WHERE seq = 150")
    sql(record.path, "DELETE FROM samples WHERE seq = 150")
    v = verify_record(record.path)
    only(v, "missing")
    f = v.findings[0]
    assert f.chain_n == chain_n
    assert "sample seq 149" in f.detail
    assert "between" in f.detail
    assert v.intact_rows == chain_n - 1
    assert v.rows["samples"] == 289


async def test_a_removed_last_row_is_truncated(record: Written) -> None:
    (last_n,) = one(record.path, "SELECT MAX(chain_n) FROM events")
    assert last_n == 320  # the marker, committed last
    sql(record.path, "DELETE FROM events WHERE chain_n = 320")
    v = verify_record(record.path)
    only(v, "truncated")
    assert v.findings[0].chain_n == 320
    assert "the last 1 row(s) were removed" in v.findings[0].detail
    assert v.intact_rows == 319


async def test_swapped_rows_are_reordered(record: Written) -> None:
    (a,) = one(record.path, "SELECT chain_n FROM samples WHERE seq = 102")
    (b,) = one(record.path, "SELECT chain_n FROM samples WHERE seq = 103")
    sql(
        record.path,
        f"UPDATE samples SET chain_n = {b} WHERE seq = 102",
        f"UPDATE samples SET chain_n = {a} WHERE seq = 103",
    )
    v = verify_record(record.path)
    assert v.status == "tampered"
    first = v.findings[0]
    assert (first.problem, first.chain_n, first.key) == ("reordered", a, 103)
    assert "written right after sample seq 102" in first.detail


async def test_rewritten_configuration_is_named(record: Written) -> None:
    sql(
        record.path,
        "UPDATE meta SET value = ? WHERE key = 'config_json'",
        args=(CONFIG_JSON.replace("1800.0", "900.0"),),
    )
    only(verify_record(record.path), "meta")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ("UPDATE samples SET chain_hash = 'not a hash' WHERE seq = 50", "changed"),
        ("UPDATE events SET chain_n = 'x' WHERE id = 3", "unchained"),
        ("INSERT INTO gaps (from_seq, to_seq, reason, chain_n, chain_hash) "
         "VALUES (1, 2, 'forged', 321, 'ab')", "extra"),
        ("UPDATE meta SET value = 'garbage' WHERE key = 'chain_head'", "head"),
        ("UPDATE meta SET value = '{' WHERE key = 'chain_sealed'", "seal"),
        ("DELETE FROM meta WHERE key = 'chain_genesis'", "meta"),
    ],
)  # fmt: skip
async def test_vandalised_chain_data_is_named_never_a_crash(
    record: Written, edit: str, problem: str
) -> None:
    sql(record.path, edit)
    v = verify_record(record.path)
    assert v.status == "tampered", v.summary()
    assert problem in [f.problem for f in v.findings], [f.text() for f in v.findings]


# --------------------------------------------------------------------------- crash and resume

_CRASH = textwrap.dedent(
    """
    import asyncio, os, sys
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from test_recorder import CONFIG_JSON, make_event, make_state
    from ilup_controller.record import Recorder

    async def main():
        rec = Recorder.create(Path(sys.argv[1]), "cart1", CONFIG_JSON)
        rec.start()
        for i in range(100):
            rec.sample(make_state(i))
        await rec.commit(make_event(100, "marker", message="last words"))
        print(rec.path, flush=True)
        os._exit(0)  # like kill -9: no close, no seal

    asyncio.run(main())
    """
)


async def test_a_crashed_record_is_unsealed_and_a_resumed_one_continues_the_chain(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _CRASH, str(tmp_path), str(REPO / "tests")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    path = Path(out.stdout.strip())
    crashed = verify_record(path)
    assert crashed.status == "unsealed", crashed.summary()
    assert crashed.exit_code == ExitCode.OK
    assert crashed.findings == []
    assert crashed.intact_rows == crashed.head_rows == 101
    assert "intact up to row 101" in crashed.summary()
    assert "not sealed" in crashed.summary()

    # The daemon's restart: reopen, append (a changed config is an event), close cleanly.
    changed = CONFIG_JSON.replace("1800.0", "900.0")
    rec = Recorder.reopen(path, config_json=changed)
    rec.start()
    for i in range(100, 150):
        rec.sample(make_state(i))
    await rec.commit(make_event(200, "marker", message="resumed"))
    writing = verify_record(path)  # while the writer is open: not sealed
    assert writing.status == "unsealed", writing.summary()
    assert writing.intact_rows == 153
    assert rec.close()

    resumed = verify_record(path)
    assert resumed.status == "intact", resumed.summary()
    assert resumed.rows == {"samples": 150, "events": 3, "gaps": 0}
    assert resumed.head_rows == 153
    # The config event is row 102: it links to the crashed writer's last row (101).
    (kind, n) = one(path, "SELECT kind, chain_n FROM events WHERE id = 2")
    assert (kind, n) == ("config", 102)
    assert open_record(path).samples["seq"] == list(range(150))


async def test_a_format_1_record_has_no_chain_and_still_opens_and_appends(
    tmp_path: Path,
) -> None:
    """Records written before format 2: verify says so (exit 1, not 5); the daemon still reads
    them (recovery, report) and can finish a procedure begun before an upgrade."""
    path = tmp_path / "cart1-20250301T080000Z.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    chain_columns = r",\n    chain_n INTEGER NOT NULL,\n    chain_hash TEXT NOT NULL"
    v1_schema = re.sub(chain_columns, "", _SCHEMA)
    assert "chain" not in v1_schema
    conn.executescript(v1_schema)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [
            ("schema_version", "1"),
            ("cart_id", "cart1"),
            ("config_json", CONFIG_JSON),
            ("config_sha256", "x"),
            ("created_utc", "2025-03-01T08:00:00+00:00"),
        ],
    )
    conn.execute(INSERT_SAMPLE, sample_row(0, make_state(0), 0.0))
    conn.close()

    v = verify_record(path)
    assert v.status == "no_chain"
    assert v.exit_code == ExitCode.FAILURE == 1
    assert "written before record format 2" in v.summary()
    rec = Recorder.reopen(path)
    rec.start()
    rec.sample(make_state(1))
    await rec.commit(make_event(1, "marker"))
    assert rec.close()
    data = open_record(path)
    assert data.samples["seq"] == [0, 1]
    assert [e["kind"] for e in data.events] == ["marker"]
    assert verify_record(path).status == "no_chain"


# --------------------------------------------------------------------------- CLI and report


async def test_ilup_verify_exit_codes_and_json(
    record: Written, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(record.path)]) == ExitCode.OK
    assert "intact: 320 rows in the chain" in capsys.readouterr().out
    assert main(["verify", "--json", str(record.path)]) == ExitCode.OK
    data = json.loads(capsys.readouterr().out)
    assert (data["status"], data["rows_checked"], data["exit_code"]) == ("intact", 320, 0)

    tampered = tmp_path / "tampered.sqlite"
    tampered.write_bytes(record.path.read_bytes())
    sql(tampered, "DELETE FROM samples WHERE seq = 200")
    assert main(["verify", str(tampered)]) == ExitCode.REJECTED
    err = capsys.readouterr().err
    assert "TAMPERED" in err
    assert "missing: row" in err
    assert "sample seq 199" in err
    # Several records: the worst result decides.
    assert main(["verify", str(record.path), str(tampered)]) == ExitCode.REJECTED
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "nothing.sqlite")]) == ExitCode.FAILURE


async def test_report_shows_the_verification(record: Written, tmp_path: Path) -> None:
    html = render_report(record.path, tmp_path / "ok.html", png_dir=None).read_text()
    assert "intact: 320 rows in the chain" in html
    assert 'id="chain-warning"' not in html
    sql(record.path, "UPDATE samples SET flow_ml_min = 999.0 WHERE seq = 42")
    html = render_report(record.path, tmp_path / "bad.html", png_dir=None).read_text()
    warning = re.search(r'id="chain-warning">([^<]*)<', html)
    assert warning is not None
    assert "TAMPERED" in warning.group(1)
    assert "sample seq 42" in warning.group(1)


async def test_a_record_being_written_is_read_at_one_commit(
    record: Written, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running daemon commits while `ilup verify` reads: the head (read first) and the rows
    (read after) come from the same commit, so the live record is not reported tampered."""
    columns = chain.real_columns
    committed: list[bool] = []

    def a_commit_meanwhile(conn: sqlite3.Connection, table: str) -> frozenset[str]:
        if not committed:  # after the meta rows were read, before the rows are
            committed.append(True)
            w = sqlite3.connect(record.path, isolation_level=None)
            writer = chain.ChainWriter.load(w)
            assert writer is not None
            w.execute("BEGIN")
            writer.unseal(w)
            writer.sample(w, sample_row(300, make_state(300), 30.0))
            writer.flush_head(w)
            w.execute("COMMIT")
            w.close()
        return columns(conn, table)

    monkeypatch.setattr(chain, "real_columns", a_commit_meanwhile)
    during = verify_record(record.path)
    monkeypatch.setattr(chain, "real_columns", columns)
    assert committed
    assert during.status == "intact", during.summary()
    assert during.rows_checked == 320
    after = verify_record(record.path)
    assert after.status == "unsealed", after.summary()
    assert after.rows_checked == after.head_rows == 321


async def test_continuing_a_tampered_unfinished_record_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(REPO / "config" / "sim.yaml")
    cfg = cfg.model_copy(update={"record": Record(directory=str(tmp_path))})
    rec = Recorder.from_config(cfg)
    rec.start()
    for i in range(20):
        rec.sample(make_state(i))
    await rec.commit(make_event(0, "phase", from_phase="priming", to_phase="perfusion"))
    assert rec.close()
    assert open_procedure(cfg).restored is not None  # intact: continued, nothing logged
    assert "does not verify" not in caplog.text
    sql(rec.path, "DELETE FROM samples WHERE seq = 5")
    caplog.set_level(logging.CRITICAL, logger="ilup.recovery")
    opening = open_procedure(cfg)
    assert opening.restored is not None  # still continued: the operator decides
    assert opening.recorder.path == rec.path
    assert "does not verify" in caplog.text
    assert "missing: row 6" in caplog.text
