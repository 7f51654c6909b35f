"""The record's hash chain: appending rows to it (the recorder's writer thread) and checking it
(`ilup verify`, `ilup report`). The encoding itself is in store.py (``canonical_row``,
``link``, ``genesis_hash``); docs/security.md says what the chain protects against.

A record verifies *intact* when every row links to the one before it, positions run 1..N
without a hole, and the last row matches the ``chain_head`` meta row; it is *sealed* when the
writer closed cleanly (``chain_sealed``). An unsealed record is what a crash or ``kill -9``
leaves: intact up to its last commit, not tampered.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from ilup_controller.exitcodes import ExitCode
from ilup_controller.record.store import (
    CHAINED_TABLES,
    EventRow,
    RecordError,
    SampleRow,
    canonical_row,
    chained_insert,
    connect_read,
    genesis_hash,
    head_json,
    link,
    real_columns,
)

CHAINED_VERSION: Final = "2"  # the first schema_version with a chain
_TABLE_ORDER: Final = {t: i for i, t in enumerate(CHAINED_TABLES)}
_REORDER_SEARCHES: Final = 5  # failing rows whose true predecessor is searched for (O(n) each)


# --------------------------------------------------------------------------- writing


class ChainWriter:
    """Appends rows of a format-2 record to its chain, on the caller's connection and inside
    the caller's transaction; ``flush_head`` goes right before each COMMIT, so the head and the
    rows it counts are durable together. One writer per record at a time."""

    def __init__(
        self,
        rows: int,
        head: str,
        next_id: dict[str, int],
        real: dict[str, frozenset[str]],
    ) -> None:
        self.rows = rows
        self.head = head
        self._next_id = next_id
        self._real = real
        self._insert = {t: chained_insert(t) for t in CHAINED_TABLES}
        self._dirty = False

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> ChainWriter | None:
        """The chain of the record open on ``conn``; None for a format-1 record (no chain: its
        rows are appended unchained, so a daemon can finish a procedure begun before an upgrade)."""
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        if meta.get("schema_version") == "1":
            return None
        try:
            head = json.loads(meta["chain_head"])
            rows, last = int(head["rows"]), str(head["hash"])
            bytes.fromhex(last)
        except (KeyError, ValueError, TypeError):
            # A damaged head: continue from the last row in the file (verify names the damage).
            rows, last = 0, meta.get("chain_genesis") or genesis_hash(meta)
            for table in CHAINED_TABLES:
                r = conn.execute(
                    f"SELECT chain_n, chain_hash FROM {table} ORDER BY chain_n DESC LIMIT 1"
                ).fetchone()
                if r is not None and int(r[0]) > rows:
                    rows, last = int(r[0]), str(r[1])
        next_id = {
            t: int(conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}").fetchone()[0]) + 1
            for t in ("events", "gaps")
        }
        real = {t: real_columns(conn, t) for t in CHAINED_TABLES}
        return cls(rows, last, next_id, real)

    def sample(self, conn: sqlite3.Connection, row: SampleRow) -> None:
        self._append(conn, "samples", row)

    def event(self, conn: sqlite3.Connection, row: EventRow) -> None:
        """``row`` without its id (store.event_row): the id is assigned here, as it is hashed."""
        self._append(conn, "events", (self._take_id("events"), *row))

    def gap(
        self, conn: sqlite3.Connection, from_seq: int | None, to_seq: int | None, reason: str
    ) -> None:
        self._append(conn, "gaps", (self._take_id("gaps"), from_seq, to_seq, reason))

    def flush_head(self, conn: sqlite3.Connection) -> None:
        """Write the head (rows, last hash) in the open transaction, if rows were added."""
        if self._dirty:
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'chain_head'",
                (head_json(self.rows, self.head),),
            )
            self._dirty = False

    def seal(self, conn: sqlite3.Connection) -> None:
        """Mark a clean close in the open transaction: the head as it is now, and when."""
        self.flush_head(conn)
        seal = {"hash": self.head, "rows": self.rows, "t_utc": datetime.now(UTC).isoformat()}
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('chain_sealed', ?)",
            (json.dumps(seal, sort_keys=True),),
        )

    @staticmethod
    def unseal(conn: sqlite3.Connection) -> None:
        """The record is being appended to again (a resumed procedure): no longer sealed."""
        conn.execute("DELETE FROM meta WHERE key = 'chain_sealed'")

    def _take_id(self, table: str) -> int:
        n = self._next_id[table]
        self._next_id[table] = n + 1
        return n

    def _append(self, conn: sqlite3.Connection, table: str, values: tuple[Any, ...]) -> None:
        data = canonical_row(table, CHAINED_TABLES[table], values, self._real[table])
        n, h = self.rows + 1, link(self.head, data)
        conn.execute(self._insert[table], (*values, n, h))
        self.rows, self.head, self._dirty = n, h, True


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True, slots=True)
class Finding:
    """One way the record differs from what was written. ``problem``: changed, missing,
    reordered, duplicate, unchained, truncated, extra, head, seal, meta or damaged."""

    problem: str
    detail: str
    chain_n: int | None = None
    table: str | None = None
    key: int | None = None
    t_utc: str | None = None
    kind: str | None = None

    def text(self) -> str:
        where = "" if self.chain_n is None else f"row {self.chain_n}: "
        return f"{self.problem}: {where}{self.detail}"


@dataclass(slots=True)
class Verification:
    """What ``verify_record`` found. ``status``: intact (sealed), unsealed (intact up to the
    last commit; the writer did not close cleanly), tampered, no_chain (format 1) or
    unreadable."""

    path: Path
    status: str
    detail: str = ""
    schema_version: str | None = None
    rows: dict[str, int] = field(default_factory=dict)
    intact_rows: int = 0  # rows that verify before the first finding
    head_rows: int | None = None
    head_hash: str | None = None
    sealed_utc: str | None = None
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_checked(self) -> int:
        return sum(self.rows.values())

    @property
    def exit_code(self) -> ExitCode:
        if self.status in ("intact", "unsealed"):
            return ExitCode.OK
        if self.status == "tampered":
            return ExitCode.REJECTED
        return ExitCode.FAILURE

    def summary(self) -> str:
        """One line: the result, for `ilup verify` and the report."""
        tables = ", ".join(f"{t} {n}" for t, n in self.rows.items())
        head = f"head {self.head_rows} {(self.head_hash or '')[:16]}"
        match self.status:
            case "intact":
                return (
                    f"intact: {self.rows_checked} rows in the chain ({tables}), "
                    f"sealed {self.sealed_utc}; {head}"
                )
            case "unsealed":
                return (
                    f"intact up to row {self.intact_rows} ({tables}), not sealed "
                    f"(the recorder did not close cleanly: daemon crash, kill or write failure); "
                    f"{head}"
                )
            case "tampered":
                first = self.findings[0]
                return (
                    f"TAMPERED: {len(self.findings)} problem(s), intact up to row "
                    f"{self.intact_rows} of {self.rows_checked}; first: {first.text()}"
                )
            case "no_chain":
                return (
                    f"no hash chain: written before record format {CHAINED_VERSION} "
                    f"(schema_version {self.schema_version}); its integrity cannot be verified"
                )
        return f"unreadable: {self.detail}"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["rows_checked"] = self.rows_checked
        data["summary"] = self.summary()
        data["exit_code"] = int(self.exit_code)
        return data


@dataclass(frozen=True, slots=True)
class _Row:
    n: int
    table: str
    values: tuple[Any, ...]
    stored: str

    @property
    def key(self) -> int:
        return int(self.values[0])

    def finding(self, problem: str, detail: str) -> Finding:
        t_utc = kind = None
        if self.table == "samples":
            t_utc, kind = str(self.values[3]), "sample"
        elif self.table == "events":
            t_utc, kind = str(self.values[1]), str(self.values[2])
        else:
            kind = "gap"
        return Finding(problem, detail, self.n, self.table, self.key, t_utc, kind)

    def name(self) -> str:
        if self.table == "samples":
            return f"sample seq {self.key} at {self.values[3]}"
        if self.table == "events":
            return f"event id {self.key} ({self.values[2]}) at {self.values[1]}"
        return f"gap id {self.key}"


def verify_record(path: str | Path) -> Verification:
    """Check a record's chain, head, seal and genesis, and SQLite's own integrity check.
    Read-only; never raises for a bad record (the result says what is wrong)."""
    t0 = time.perf_counter()
    p = Path(path)
    try:
        conn = connect_read(p)
    except RecordError as e:
        return Verification(p, "unreadable", str(e))
    try:
        result = _verify(conn, p)
    except sqlite3.DatabaseError as e:
        result = Verification(p, "unreadable", f"not a readable procedure record: {e}")
    finally:
        conn.close()
    result.seconds = time.perf_counter() - t0
    return result


def _verify(conn: sqlite3.Connection, p: Path) -> Verification:
    # One read transaction: a record being written (a running daemon) is seen at one commit,
    # its head and its rows together.
    conn.execute("BEGIN")
    integrity = "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    version = meta.get("schema_version")
    if version == "1":
        return Verification(p, "no_chain", schema_version=version)
    if version != CHAINED_VERSION:
        return Verification(p, "unreadable", f"unknown schema_version {version!r}")
    v = Verification(p, "tampered", schema_version=version)
    found = v.findings
    if integrity != "ok":
        found.append(Finding("damaged", f"SQLite integrity check: {integrity}"))
    genesis = meta.get("chain_genesis", "")
    if genesis != genesis_hash(meta):
        found.append(
            Finding("meta", "the meta rows (cart, creation time, configuration) were changed")
        )
        genesis = genesis or genesis_hash(meta)
    rows: list[_Row] = []
    reals = {t: real_columns(conn, t) for t in CHAINED_TABLES}
    for table, columns in CHAINED_TABLES.items():
        cur = conn.execute(f"SELECT {', '.join(columns)}, chain_n, chain_hash FROM {table}")
        count = 0
        for r in cur:
            count += 1
            n, stored, values = r[-2], r[-1], tuple(r[:-2])
            row = _Row(n if isinstance(n, int) else -1, table, values, str(stored))
            if not isinstance(n, int) or not isinstance(stored, str):
                found.append(row.finding("unchained", f"{row.name()} has no chain position"))
                continue
            rows.append(row)
        v.rows[table] = count
    rows.sort(key=lambda r: (r.n, _TABLE_ORDER[r.table]))
    _walk(rows, genesis, reals, found)
    last_n, last_hash = (rows[-1].n, rows[-1].stored) if rows else (0, genesis)
    _check_head(meta, last_n, last_hash, rows[-1] if rows else None, v)
    v.intact_rows = _intact_prefix(rows, found)
    if not found:
        v.status = "intact" if v.sealed_utc is not None else "unsealed"
    return v


def _walk(
    rows: list[_Row], genesis: str, reals: dict[str, frozenset[str]], found: list[Finding]
) -> None:
    prev, expected = genesis, 1
    prev_row: _Row | None = None
    last_key: dict[str, int] = {}
    searches = 0
    for row in rows:
        if row.n < expected:
            found.append(row.finding("duplicate", f"{row.name()}: a second row at this position"))
            continue
        after_hole = row.n > expected
        if after_hole:
            before = "the start" if prev_row is None else prev_row.name()
            span = f"{expected}" if row.n == expected + 1 else f"{expected}..{row.n - 1}"
            found.append(
                Finding(
                    "missing",
                    f"row(s) {span} removed, between {before} and {row.name()}",
                    expected,
                )
            )
        data = canonical_row(row.table, CHAINED_TABLES[row.table], row.values, reals[row.table])
        if _link(prev, data) != row.stored and not after_hole:
            follows = None
            if searches < _REORDER_SEARCHES:
                searches += 1
                follows = next(
                    (o for o in rows if o is not row and _link(o.stored, data) == row.stored), None
                )
            if follows is not None:
                found.append(
                    row.finding(
                        "reordered",
                        f"{row.name()} was written right after {follows.name()} "
                        f"(now row {follows.n})",
                    )
                )
            else:
                found.append(
                    row.finding(
                        "changed",
                        f"{row.name()}: its content does not match its hash "
                        "(changed, or the row before it replaced)",
                    )
                )
        elif row.table in last_key and row.key <= last_key[row.table]:
            found.append(
                row.finding("reordered", f"{row.name()} comes after a higher {row.table} key")
            )
        last_key[row.table] = row.key
        prev, expected, prev_row = row.stored, row.n + 1, row


def _link(prev: str, data: bytes) -> str | None:
    """``link``, or None when the previous hash is not a hash at all (it was edited)."""
    try:
        return link(prev, data)
    except ValueError:
        return None


def _intact_prefix(rows: list[_Row], found: list[Finding]) -> int:
    """Rows (positions 1..k) before the first finding that names a position."""
    firsts = [f.chain_n for f in found if f.chain_n is not None]
    if firsts:
        return min(firsts) - 1
    return rows[-1].n if rows else 0


def _check_head(
    meta: dict[str, str], last_n: int, last_hash: str, last: _Row | None, v: Verification
) -> None:
    found = v.findings
    try:
        head = json.loads(meta["chain_head"])
        v.head_rows, v.head_hash = int(head["rows"]), str(head["hash"])
    except (KeyError, ValueError, TypeError):
        found.append(Finding("head", "the chain head (meta chain_head) is missing or damaged"))
        return
    end = "the start" if last is None else last.name()
    if v.head_rows > last_n:
        found.append(
            Finding(
                "truncated",
                f"the chain ends at row {last_n} ({end}) but its head says {v.head_rows}: "
                f"the last {v.head_rows - last_n} row(s) were removed",
                last_n + 1,
            )
        )
    elif v.head_rows < last_n:
        found.append(
            Finding(
                "extra",
                f"row(s) {v.head_rows + 1}..{last_n} are past the chain head (added afterwards)",
                v.head_rows + 1,
            )
        )
    elif v.head_hash != last_hash:
        found.append(Finding("head", f"the last row ({end}) does not match the chain head", last_n))
    sealed = meta.get("chain_sealed")
    if sealed is None:
        return
    try:
        seal = json.loads(sealed)
        rows, h, t_utc = int(seal["rows"]), str(seal["hash"]), str(seal["t_utc"])
    except (ValueError, KeyError, TypeError):
        found.append(Finding("seal", "the seal (meta chain_sealed) is damaged"))
        return
    if (rows, h) != (v.head_rows, v.head_hash):
        found.append(Finding("seal", f"the seal says {rows} rows, the head {v.head_rows}"))
    v.sealed_utc = t_utc
