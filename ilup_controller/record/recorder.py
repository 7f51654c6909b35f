"""The procedure recorder: a writer thread that owns the SQLite connection, fed by a bounded
queue, so the control tick never waits for the disk (shared/safety.md 5.2).

- ``sample()`` and ``event()`` never block: on a full queue the row is dropped and counted,
  and a gap row (from_seq..to_seq) is written once space returns.
- ``commit()`` is for anything acknowledged to the operator: it returns only once the row is
  committed (WAL, synchronous=FULL) and raises ``RecorderError`` otherwise.
- Samples are committed in batches (every 0.5 s or 100 rows: at most ~1 s lost on a crash);
  events and gaps are committed at once.
- A write or fsync error puts the recorder in failed state for good: no retry (after a failed
  fsync the kernel may have dropped the dirty pages, so a retry could "succeed" over lost data).
- Every row joins the record's hash chain as it is written (record/chain.py), and the chain head
  goes into the same transaction; a clean ``close()`` seals the record, reopening unseals it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from ilup_controller.config.models import CartConfig
from ilup_controller.mqtt.messages import Event, State
from ilup_controller.record.chain import ChainWriter
from ilup_controller.record.store import (
    INSERT_EVENT,
    INSERT_GAP,
    INSERT_SAMPLE,
    EventRow,
    RecordError,
    SampleRow,
    apply_pragmas,
    create_schema,
    event_row,
    sample_row,
)

log = logging.getLogger(__name__)

BATCH_S: Final = 0.5  # longest time a sample waits uncommitted
BATCH_ROWS: Final = 100  # most samples in one transaction
START_TIMEOUT_S: Final = 5.0


class RecorderError(Exception):
    """The record could not be created/opened, or a row was not committed."""


@dataclass(frozen=True, slots=True)
class _Sample:
    row: SampleRow


@dataclass(frozen=True, slots=True)
class _Event:
    row: EventRow
    done: concurrent.futures.Future[None] | None  # set for commit(): resolved once durable


@dataclass(frozen=True, slots=True)
class _Gap:
    from_seq: int | None
    to_seq: int | None
    reason: str


class _Stop:
    pass


_Item = _Sample | _Event | _Gap | _Stop


class _Channel:
    """FIFO to the writer. ``offer`` is bounded and never waits; ``force`` (commit() rows and
    the stop marker) may exceed the bound: each such row is awaited by its caller, so they are
    few, and an operator's acknowledged action must not be refused just because samples queue."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()

    def offer(self, item: _Item) -> bool:
        with self._cond:
            if len(self._items) >= self._maxsize:
                return False
            self._items.append(item)
            self._cond.notify()
            return True

    def force(self, item: _Item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout_s: float | None) -> _Item | None:
        """Next item, or None when ``timeout_s`` passed (or on a spurious wake-up)."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class _PendingGap:
    """Rows dropped since the queue was last known to have space."""

    first_seq: int | None = None
    last_seq: int | None = None
    samples: int = 0
    events: int = 0

    def item(self) -> _Gap:
        return _Gap(
            self.first_seq,
            self.last_seq,
            f"queue full: {self.samples} samples and {self.events} events dropped",
        )


class Recorder:
    """One procedure record file. Call ``sample``/``event``/``commit`` from one thread (the
    event loop); the writer thread owns the SQLite connection."""

    def __init__(
        self,
        path: Path,
        *,
        next_seq: int = 0,
        sample_every_ticks: int = 1,
        queue_size: int = 10000,
    ) -> None:
        if sample_every_ticks < 1 or queue_size < 1:
            raise ValueError("sample_every_ticks and queue_size must be >= 1")
        self.path = path
        self.sample_every_ticks = sample_every_ticks
        # Test hooks: the writer sleeps this long before each write (slow disk), and opens its
        # connection with this class (a subclass can inject I/O errors).
        self.write_delay_s = 0.0
        self.connection_class: type[sqlite3.Connection] = sqlite3.Connection
        # Read back from the writer's own connection once it is open.
        self.writer_pragmas: dict[str, str] = {}
        self._ch = _Channel(queue_size)
        self._next_seq = next_seq
        self._calls = 0
        self._gap: _PendingGap | None = None
        self._dropped_caller = 0  # counted by the caller's thread
        self._dropped_writer = 0  # counted by the writer thread
        self._failed: str | None = None
        self._closed = False
        self._ready = threading.Event()
        self._chain: ChainWriter | None = None  # the writer thread's (None: a format-1 record)
        self._sealed: tuple[int, str] | None = None  # (rows, head) once a clean close sealed it
        self._thread = threading.Thread(target=self._run, name=f"recorder:{path.name}", daemon=True)

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(
        cls,
        directory: str | Path,
        cart_id: str,
        config_json: str,
        *,
        sample_every_ticks: int = 1,
        queue_size: int = 10000,
    ) -> Recorder:
        """A new record ``<directory>/<cart_id>-<UTC timestamp>.sqlite`` with its meta rows."""
        d = Path(directory)
        now = datetime.now(UTC)
        try:
            d.mkdir(parents=True, exist_ok=True)
            path = _new_file(d, f"{cart_id}-{now:%Y%m%dT%H%M%SZ}")
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                apply_pragmas(conn)
                create_schema(
                    conn,
                    {
                        "cart_id": cart_id,
                        "created_utc": now.isoformat(),
                        "config_json": config_json,
                        "config_sha256": config_sha256(config_json),
                    },
                )
            finally:
                conn.close()
            _fsync_dir(d)
        except (OSError, sqlite3.Error, RecordError) as e:
            raise RecorderError(f"cannot create a record in {d}: {e}") from e
        log.info("record created", extra={"record": str(path), "cart_id": cart_id})
        return cls(path, sample_every_ticks=sample_every_ticks, queue_size=queue_size)

    @classmethod
    def from_config(cls, cfg: CartConfig) -> Recorder:
        """``create`` from the effective configuration (the MQTT password is not recorded)."""
        return cls.create(
            cfg.record.directory,
            cfg.cart_id,
            config_json_of(cfg),
            sample_every_ticks=cfg.record.sample_every_ticks,
            queue_size=cfg.record.queue_size,
        )

    @classmethod
    def reopen(
        cls,
        path: str | Path,
        *,
        config_json: str | None = None,
        sample_every_ticks: int = 1,
        queue_size: int = 10000,
    ) -> Recorder:
        """Append to an existing record after a restart. Sample numbers continue after the last
        one in the file. A different ``config_json`` is recorded as a ``config`` event (the meta
        rows keep the configuration the record was created with)."""
        p = Path(path)
        if not p.is_file():
            raise RecorderError(f"{p}: no such record file")
        try:
            conn = sqlite3.connect(p, isolation_level=None)
            try:
                apply_pragmas(conn)
                check = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
                if check != ["ok"]:
                    raise RecorderError(f"{p}: damaged: {'; '.join(check)}")
                (last_seq,) = conn.execute("SELECT MAX(seq) FROM samples").fetchone()
                (old_sha,) = conn.execute(
                    "SELECT value FROM meta WHERE key = 'config_sha256'"
                ).fetchone()
                if config_json is not None and config_sha256(config_json) != old_sha:
                    _record_config_change(conn, str(old_sha), config_json)
            finally:
                conn.close()
        except (sqlite3.Error, RecordError, TypeError) as e:
            raise RecorderError(f"cannot reopen {p}: {e}") from e
        next_seq = 0 if last_seq is None else int(last_seq) + 1
        log.info("record reopened", extra={"record": str(p), "next_seq": next_seq})
        return cls(
            p, next_seq=next_seq, sample_every_ticks=sample_every_ticks, queue_size=queue_size
        )

    def start(self) -> None:
        """Start the writer; raises if it cannot open the record."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RecorderError(f"{self.path}: writer did not start within {START_TIMEOUT_S} s")
        if self._failed is not None:
            raise RecorderError(self._failed)

    @property
    def sealed_head(self) -> tuple[int, str] | None:
        """(rows, head hash) of the chain once ``close()`` has sealed the record; None before,
        after a failed close, or for a format-1 record. Published at shutdown so that a copy of
        the head exists outside the record (``ilup verify`` compares against the seal)."""
        return self._sealed

    def close(self, timeout_s: float = 10.0) -> bool:
        """Write what is queued, commit and stop. False if the writer did not finish in time
        (it keeps writing in the background; rows not written by exit are lost)."""
        if self._closed:
            return not self._thread.is_alive()
        if self._gap is not None and self._failed is None:
            self._ch.force(self._gap.item())
            self._gap = None
        self._closed = True
        self._ch.force(_Stop())
        if not self._thread.is_alive():
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error(
                "recorder did not finish writing",
                extra={"record": str(self.path), "queued": len(self._ch), "timeout_s": timeout_s},
            )
            return False
        return True

    # ------------------------------------------------------------------ state for the alarm

    @property
    def dropped(self) -> int:
        """Samples and events not recorded (queue full, failed, or lost with a failed batch)."""
        return self._dropped_caller + self._dropped_writer

    @property
    def failed(self) -> str | None:
        """Why the recorder failed, or None while it works. Failure is final."""
        return self._failed

    @property
    def queue_depth(self) -> int:
        return len(self._ch)

    # ------------------------------------------------------------------ the caller's side

    def sample(self, state: State, *, t_mono_s: float | None = None) -> None:
        """Queue one tick's state (every ``sample_every_ticks``-th call); never blocks.
        ``t_mono_s``: the tick's monotonic time (default: now)."""
        self._calls += 1
        if (self._calls - 1) % self.sample_every_ticks:
            return
        seq = self._next_seq
        self._next_seq += 1
        if not self._writable():
            self._dropped_caller += 1
            return
        t = time.monotonic() if t_mono_s is None else t_mono_s
        if not (self._flush_gap() and self._ch.offer(_Sample(sample_row(seq, state, t)))):
            self._drop(seq=seq)

    def event(self, event: Event) -> None:
        """Queue an event that nobody waits on (committed promptly); never blocks."""
        if not self._writable():
            self._dropped_caller += 1
            return
        if not (self._flush_gap() and self._ch.offer(_Event(event_row(event), None))):
            self._drop(seq=None)

    async def commit(self, event: Event, *, timeout_s: float = 5.0) -> None:
        """Record ``event`` and return once it is committed to disk; raises RecorderError if
        the recorder has failed, is closed, or the commit fails or is not confirmed within
        ``timeout_s`` (then it may or may not be in the record: refuse the command)."""
        if self._failed is not None:
            raise RecorderError(f"recorder failed: {self._failed}")
        if self._closed or not self._thread.is_alive():
            raise RecorderError("recorder is not running")
        if self._gap is not None:
            self._ch.force(self._gap.item())  # keep the gap before this row
            self._gap = None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._ch.force(_Event(event_row(event), done))
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), timeout_s)
        except TimeoutError as e:
            raise RecorderError(
                f"event {event.kind} not confirmed on disk within {timeout_s} s"
            ) from e

    def _writable(self) -> bool:
        return self._failed is None and not self._closed

    def _flush_gap(self) -> bool:
        """Queue the pending gap row first; False while the queue is still full."""
        if self._gap is None:
            return True
        if not self._ch.offer(self._gap.item()):
            return False
        log.warning(
            "record queue has space again",
            extra={"record": str(self.path), "dropped": self.dropped},
        )
        self._gap = None
        return True

    def _drop(self, *, seq: int | None) -> None:
        self._dropped_caller += 1
        if self._gap is None:
            self._gap = _PendingGap()
            log.warning(
                "record queue full: dropping rows",
                extra={"record": str(self.path), "queue_depth": len(self._ch)},
            )
        g = self._gap
        if seq is None:
            g.events += 1
            return
        g.samples += 1
        g.last_seq = seq
        if g.first_seq is None:
            g.first_seq = seq

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, factory=self.connection_class)
            apply_pragmas(conn)
            self.writer_pragmas = {
                "journal_mode": str(conn.execute("PRAGMA journal_mode").fetchone()[0]),
                "synchronous": str(conn.execute("PRAGMA synchronous").fetchone()[0]),
            }
            # The WAL file now exists: make its directory entry durable too.
            _fsync_dir(self.path.parent)
            self._chain = ChainWriter.load(conn)
            if self._chain is not None:  # appended to again (a resumed procedure): not sealed
                conn.execute("BEGIN")
                self._chain.unseal(conn)
                conn.execute("COMMIT")
        except (OSError, sqlite3.Error, RecordError, ValueError, TypeError) as e:
            self._fail(f"cannot open {self.path}: {e}")
        self._ready.set()
        try:
            self._write_loop(conn)
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _write_loop(self, conn: sqlite3.Connection | None) -> None:
        batch = 0  # samples in the open transaction
        deadline = 0.0
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if batch else None
            item = self._ch.get(timeout)
            if conn is None or self._failed is not None:
                if isinstance(item, _Stop):
                    return
                self._discard(item)
                continue
            try:
                if item is None:
                    if batch and time.monotonic() >= deadline:
                        self._commit(conn)
                        batch = 0
                    continue
                if isinstance(item, _Stop):
                    if self._chain is not None:  # the last batch and the seal, together
                        if not conn.in_transaction:
                            conn.execute("BEGIN")
                        self._chain.seal(conn)
                    if conn.in_transaction:
                        conn.execute("COMMIT")
                    if self._chain is not None:
                        self._sealed = (self._chain.rows, self._chain.head)
                    batch = 0
                    return
                if (
                    isinstance(item, _Event)
                    and item.done is not None
                    and not item.done.set_running_or_notify_cancel()
                ):
                    continue  # the caller gave up before we started: not recorded
                if self.write_delay_s > 0.0:
                    time.sleep(self.write_delay_s)
                if not conn.in_transaction:
                    conn.execute("BEGIN")
                if isinstance(item, _Sample):
                    batch += 1  # counted first: lost with the transaction if this fails
                    if batch == 1:
                        deadline = time.monotonic() + BATCH_S
                    if self._chain is None:
                        conn.execute(INSERT_SAMPLE, item.row)
                    else:
                        self._chain.sample(conn, item.row)
                    if batch >= BATCH_ROWS:
                        self._commit(conn)
                        batch = 0
                    continue
                if isinstance(item, _Event):
                    _insert_event(conn, self._chain, item.row)
                elif self._chain is None:
                    conn.execute(INSERT_GAP, (item.from_seq, item.to_seq, item.reason))
                else:
                    self._chain.gap(conn, item.from_seq, item.to_seq, item.reason)
                self._commit(conn)
                batch = 0
                if isinstance(item, _Event) and item.done is not None:
                    item.done.set_result(None)
            except Exception as e:  # any failure to write (I/O or a bug) fails the recorder
                # What the failed transaction held is lost: count it, then stop writing.
                self._dropped_writer += batch + (1 if isinstance(item, _Event) else 0)
                batch = 0
                self._fail(f"write to {self.path} failed: {type(e).__name__}: {e}")
                if isinstance(item, _Event) and item.done is not None:
                    item.done.set_exception(RecorderError(self._failed))
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")

    def _commit(self, conn: sqlite3.Connection) -> None:
        """COMMIT, with the chain head of the rows written in this transaction."""
        if self._chain is not None:
            self._chain.flush_head(conn)
        conn.execute("COMMIT")

    def _discard(self, item: _Item | None) -> None:
        """After a failure: nothing more is written; commit() waiters get the error."""
        if isinstance(item, _Sample | _Event):
            self._dropped_writer += 1  # counted before a waiter is woken
        if (
            isinstance(item, _Event)
            and item.done is not None
            and item.done.set_running_or_notify_cancel()
        ):
            item.done.set_exception(RecorderError(f"recorder failed: {self._failed}"))

    def _fail(self, why: str) -> None:
        if self._failed is None:
            self._failed = why
            log.error("recorder failed", extra={"record": str(self.path), "error": why})


def config_json_of(cfg: CartConfig) -> str:
    """The effective configuration as recorded: canonical JSON, MQTT password masked."""
    data: dict[str, Any] = cfg.model_dump(mode="json")
    if data["mqtt"].get("password") is not None:
        data["mqtt"]["password"] = "***"
    return json.dumps(data, sort_keys=True)


def config_sha256(config_json: str) -> str:
    return hashlib.sha256(config_json.encode("utf-8")).hexdigest()


def _new_file(directory: Path, stem: str) -> Path:
    """Create ``stem.sqlite`` (or ``stem-2.sqlite``, ...) exclusively: never reuse a record."""
    for n in range(1, 1000):
        path = directory / (f"{stem}.sqlite" if n == 1 else f"{stem}-{n}.sqlite")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise RecorderError(f"no free record file name for {stem} in {directory}")


def _fsync_dir(directory: Path) -> None:
    """A new file's directory entry is durable only once the directory is fsync'd."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _insert_event(conn: sqlite3.Connection, chain: ChainWriter | None, row: EventRow) -> None:
    if chain is None:
        conn.execute(INSERT_EVENT, row)
    else:
        chain.event(conn, row)


def _record_config_change(conn: sqlite3.Connection, old_sha: str, config_json: str) -> None:
    new_sha = config_sha256(config_json)
    payload = json.dumps({"config_sha256": new_sha, "config_json": config_json})
    chain = ChainWriter.load(conn)
    conn.execute("BEGIN")
    _insert_event(
        conn,
        chain,
        (
            datetime.now(UTC).isoformat(),
            "config",
            None,
            None,
            None,
            None,
            f"configuration changed on restart: sha256 {old_sha[:12]} -> {new_sha[:12]}",
            None,
            None,
            None,
            payload,
        ),
    )
    if chain is not None:
        chain.flush_head(conn)
    conn.execute("COMMIT")
