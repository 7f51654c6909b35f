"""The procedure record's SQLite schema, and reading a record back.

One file per procedure. WAL with ``synchronous=FULL`` so every commit survives power loss when
the storage honours flushes (shared/safety.md 5.2). Rows are only ever inserted: a correction is
a new event, never an UPDATE. NULL means the reading was missing, never 0.

Format 2 hash-chains every row (samples, events, gaps) in the order it was written: each row
carries ``chain_n`` (its position) and ``chain_hash`` = SHA-256(previous row's hash || the row's
canonical bytes, ``canonical_row``); the first row links to ``chain_genesis``, a hash over the
meta rows written at creation. The meta rows ``chain_head`` (rows and last hash, updated in
the transaction that adds rows) and ``chain_sealed`` (written when the writer closes cleanly)
are the only values ever rewritten (record/chain.py, docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilup_controller.mqtt.messages import Event, State

SCHEMA_VERSION = "2"  # 2: hash chain (record/chain.py); 1: no chain
READABLE_VERSIONS: tuple[str, ...] = ("1", "2")  # open_record, report, export, recovery
CHAIN_FORMAT = "sha256-json-1"

# Column order of the samples table (also the CSV header). ``seq`` is the record's own sample
# number: it runs on across daemon restarts and counts dropped samples too, so every hole in it
# is a gap (and has a row in ``gaps``). ``tick`` is the daemon's tick number (State.seq).
SAMPLE_COLUMNS: tuple[str, ...] = (
    "seq",
    "tick",
    "t_mono_s",
    "t_utc",
    "phase",
    "flow_ml_min",
    "pressure_mmhg",
    "temperature_c",
    "water_temperature_c",
    "pump_speed_rpm_measured",
    "reservoir_volume_ml",
    "flow_target_ml_min",
    "flow_ramped_ml_min",
    "pressure_limit_mmhg",
    "temperature_target_c",
    "temperature_ramped_c",
    "pump_speed_rpm",
    "heater_pct",
    "drug_elapsed_s",
    "active_alarms",
)

EVENT_COLUMNS: tuple[str, ...] = (
    "id",
    "t_utc",
    "kind",
    "alarm_id",
    "priority",
    "from_phase",
    "to_phase",
    "message",
    "operator",
    "value",
    "limit_value",
    "payload_json",
)

_SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE samples (
    seq INTEGER PRIMARY KEY,
    tick INTEGER NOT NULL,
    t_mono_s REAL NOT NULL,
    t_utc TEXT NOT NULL,
    phase TEXT NOT NULL,
    flow_ml_min REAL NULL,
    pressure_mmhg REAL NULL,
    temperature_c REAL NULL,
    water_temperature_c REAL NULL,
    pump_speed_rpm_measured REAL NULL,
    reservoir_volume_ml REAL NULL,
    flow_target_ml_min REAL NOT NULL,
    flow_ramped_ml_min REAL NOT NULL,
    pressure_limit_mmhg REAL NOT NULL,
    temperature_target_c REAL NOT NULL,
    temperature_ramped_c REAL NOT NULL,
    pump_speed_rpm REAL NOT NULL,
    heater_pct REAL NOT NULL,
    drug_elapsed_s REAL NOT NULL,
    active_alarms TEXT NOT NULL,
    chain_n INTEGER NOT NULL,
    chain_hash TEXT NOT NULL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    t_utc TEXT NOT NULL,
    kind TEXT NOT NULL,
    alarm_id TEXT NULL,
    priority TEXT NULL,
    from_phase TEXT NULL,
    to_phase TEXT NULL,
    message TEXT NOT NULL,
    operator TEXT NULL,
    value REAL NULL,
    limit_value REAL NULL,
    payload_json TEXT NOT NULL,
    chain_n INTEGER NOT NULL,
    chain_hash TEXT NOT NULL
);
CREATE TABLE gaps (
    id INTEGER PRIMARY KEY,
    from_seq INTEGER NULL,
    to_seq INTEGER NULL,
    reason TEXT NOT NULL,
    chain_n INTEGER NOT NULL,
    chain_hash TEXT NOT NULL
);
"""

INSERT_SAMPLE = (
    f"INSERT INTO samples ({', '.join(SAMPLE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in SAMPLE_COLUMNS)})"
)
INSERT_EVENT = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS[1:])}) "
    f"VALUES ({', '.join('?' for _ in EVENT_COLUMNS[1:])})"
)
INSERT_GAP = "INSERT INTO gaps (from_seq, to_seq, reason) VALUES (?, ?, ?)"
GAP_COLUMNS: tuple[str, ...] = ("id", "from_seq", "to_seq", "reason")

# Format 2: the chain columns of every row table, after the table's own columns.
CHAIN_COLUMNS: tuple[str, ...] = ("chain_n", "chain_hash")
CHAINED_TABLES: dict[str, tuple[str, ...]] = {
    "samples": SAMPLE_COLUMNS,
    "events": EVENT_COLUMNS,
    "gaps": GAP_COLUMNS,
}
# Meta rows that change after creation (everything else is bound by the genesis hash).
MUTABLE_META: frozenset[str] = frozenset({"chain_genesis", "chain_head", "chain_sealed"})


def chained_insert(table: str) -> str:
    """INSERT of a whole format-2 row: the table's columns (with its id), then the chain's."""
    columns = CHAINED_TABLES[table] + CHAIN_COLUMNS
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def canonical_row(
    table: str, columns: Sequence[str], values: Sequence[Any], real: Set[str]
) -> bytes:
    """The bytes a row's hash covers: JSON ``{"row": {column: value}, "table": name}`` with
    sorted keys, no spaces, ASCII only, floats as Python's shortest round-trip repr. Values are
    taken as SQLite stores them: an integer in a REAL column is a float, a NaN is NULL."""
    row: dict[str, Any] = {}
    for c, v in zip(columns, values, strict=True):
        if isinstance(v, float) and math.isnan(v):
            v = None
        elif c in real and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        row[c] = v
    return json.dumps(
        {"row": row, "table": table}, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


def link(prev_hash: str, data: bytes) -> str:
    """One link of the chain: SHA-256 over the previous hash's 32 bytes and the row's bytes."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + data).hexdigest()


def genesis_hash(meta: Mapping[str, str]) -> str:
    """What the first row links to: a hash over the record's fixed meta rows (cart, creation
    time, configuration, format), so that changing any of them breaks the chain."""
    fixed = {k: v for k, v in meta.items() if k not in MUTABLE_META}
    data = json.dumps(fixed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"ilup record chain genesis\n" + data.encode("ascii")).hexdigest()


def real_columns(conn: sqlite3.Connection, table: str) -> frozenset[str]:
    """The REAL columns of ``table`` as the file declares them."""
    return frozenset(
        str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})") if str(r[2]) == "REAL"
    )


class RecordError(Exception):
    """The record cannot be opened, is damaged, or is not a procedure record."""


SampleRow = tuple[Any, ...]
EventRow = tuple[Any, ...]


def sample_row(seq: int, state: State, t_mono_s: float) -> SampleRow:
    """One samples row from the published State model (single source of truth)."""
    m, tg, o = state.measured, state.targets, state.outputs
    return (
        seq,
        state.seq,
        t_mono_s,
        state.t.isoformat(),
        state.phase,
        m.flow_ml_min,
        m.pressure_mmhg,
        m.temperature_c,
        m.water_temperature_c,
        m.pump_speed_rpm,
        m.reservoir_volume_ml,
        tg.flow_ml_min,
        tg.flow_ramped_ml_min,
        tg.pressure_limit_mmhg,
        tg.temperature_c,
        tg.temperature_ramped_c,
        o.pump_speed_rpm,
        o.heater_pct,
        state.drug_phase.elapsed_s,
        json.dumps(state.active_alarms),
    )


def event_row(event: Event) -> EventRow:
    """One events row (without id) from the published Event model; the whole model is kept."""
    return (
        event.t.isoformat(),
        event.kind,
        event.alarm_id,
        event.priority,
        event.from_phase,
        event.to_phase,
        event.message,
        event.operator,
        event.value,
        event.limit,
        event.model_dump_json(),
    )


def apply_pragmas(conn: sqlite3.Connection) -> None:
    """WAL + FULL on this connection, read back: a setting SQLite ignored is an error."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    conn.execute("PRAGMA synchronous=FULL")
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    if str(mode).lower() != "wal" or int(sync) != 2:
        raise RecordError(f"record needs journal_mode=wal, synchronous=2; got {mode}, {sync}")


def head_json(rows: int, last_hash: str) -> str:
    """The ``chain_head`` meta value: rows in the chain and the last row's hash."""
    return json.dumps({"hash": last_hash, "rows": rows}, sort_keys=True)


def create_schema(conn: sqlite3.Connection, meta: dict[str, str]) -> None:
    """Tables and meta rows of a new record, in one transaction (``conn`` in autocommit mode,
    ``isolation_level=None``, so BEGIN/COMMIT are ours)."""
    conn.execute("BEGIN")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        rows = {**meta, "schema_version": SCHEMA_VERSION, "chain_format": CHAIN_FORMAT}
        genesis = genesis_hash(rows)
        rows["chain_genesis"] = genesis
        rows["chain_head"] = head_json(0, genesis)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(rows.items()))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@dataclass
class RecordData:
    """A whole record in memory: samples by column, events and gaps as dicts."""

    path: Path
    meta: dict[str, str]
    samples: dict[str, list[Any]]
    events: list[dict[str, Any]]
    gaps: list[dict[str, Any]]
    integrity: str = "ok"
    warnings: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return len(self.samples["seq"])


def connect_read(path: Path) -> sqlite3.Connection:
    """Read-only connection (a report never writes to the record)."""
    if not path.is_file():
        raise RecordError(f"{path}: no such record file")
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise RecordError(f"{path}: cannot open: {e}") from e


def open_record(path: str | Path, *, allow_damaged: bool = False) -> RecordData:
    """Load a record; ``PRAGMA integrity_check`` must say ok unless ``allow_damaged``."""
    p = Path(path)
    conn = connect_read(p)
    try:
        try:
            checks = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as e:
            raise RecordError(f"{p}: not a readable SQLite record: {e}") from e
        integrity = "; ".join(checks)
        if integrity != "ok" and not allow_damaged:
            raise RecordError(f"{p}: integrity check failed: {integrity}")
        try:
            meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            cur = conn.execute(f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM samples ORDER BY seq")
            rows = cur.fetchall()
            events = [
                dict(zip(EVENT_COLUMNS, r, strict=True))
                for r in conn.execute(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events ORDER BY id")
            ]
            gaps = [
                {"id": r[0], "from_seq": r[1], "to_seq": r[2], "reason": r[3]}
                for r in conn.execute("SELECT id, from_seq, to_seq, reason FROM gaps ORDER BY id")
            ]
        except sqlite3.Error as e:
            raise RecordError(f"{p}: not a procedure record: {e}") from e
    finally:
        conn.close()
    if meta.get("schema_version") not in READABLE_VERSIONS:
        raise RecordError(
            f"{p}: schema_version {meta.get('schema_version')!r}, expected one of "
            f"{', '.join(READABLE_VERSIONS)}"
        )
    columns: dict[str, list[Any]] = {c: [] for c in SAMPLE_COLUMNS}
    for row in rows:
        for c, v in zip(SAMPLE_COLUMNS, row, strict=True):
            columns[c].append(v)
    warnings = [] if integrity == "ok" else [f"integrity check: {integrity}"]
    return RecordData(p, meta, columns, events, gaps, integrity, warnings)
