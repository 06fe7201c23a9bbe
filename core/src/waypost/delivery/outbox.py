"""The durable outbox: SQLite in WAL mode, one row per (event, sink instance).

Rows are ``pending`` until their sink delivers them (then deleted, or kept as ``sent`` for
``outbox.keep_sent``) or refuses them for good (``failed``, kept for inspection until
``outbox.max_age``). A sink leases the rows it is sending, so several processes sharing one
data dir never send the same row at once; a lease held by a process that died is void. A
lease names its process by PID, start time and boot (``waypost.processes.owner``), so a new
process that got the dead one's PID is not taken for it.

Every use of SQLite passes ``waypost.processes.GATE`` (in :class:`Storage`): ``fork()`` waits
for it, so a child never inherits SQLite's lock state in the middle of a transaction.

The file itself is kept by :class:`~waypost.delivery.storage.Storage`: a write it cannot make
now (a full disk, a read-only data dir, a lock held too long) raises
:class:`~waypost.delivery.storage.StorageUnavailable`, and a deleted, replaced or corrupt file
is repaired on the way (:meth:`Outbox.health` says what happened).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from waypost.delivery.storage import Health, Storage, StorageUnavailable
from waypost.events import NO_REMARKS, Event, dumps, remarks_of
from waypost.privacy.secrets import sanitise
from waypost.processes import owner, owner_alive

__all__ = ["FILENAME", "Health", "Outbox", "Record", "StorageUnavailable"]

T = TypeVar("T")

FILENAME = "outbox.sqlite3"
_IN_CHUNK = 900
"""Row ids per ``IN (...)`` list: within SQLite's oldest limit of 999 parameters."""
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
  id INTEGER PRIMARY KEY,
  body TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY,
  sink TEXT NOT NULL,
  event_id TEXT NOT NULL,
  name TEXT NOT NULL,
  time REAL NOT NULL,
  body TEXT NOT NULL,
  context_id INTEGER NOT NULL,
  remarks TEXT,
  state TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  next_at REAL NOT NULL DEFAULT 0,
  lease_pid INTEGER NOT NULL DEFAULT 0,
  lease_owner TEXT NOT NULL DEFAULT '',
  lease_until REAL NOT NULL DEFAULT 0,
  last_error TEXT,
  created_at REAL NOT NULL,
  done_at REAL,
  receipt TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_event_sink ON outbox (event_id, sink);
-- Leases take a sink's due rows, earliest due first (then oldest): this index finds them
-- without reading the rows that are not due (a sink retrying a backlog has many) and gives
-- that order without a sort.
DROP INDEX IF EXISTS outbox_due;
DROP INDEX IF EXISTS outbox_pending;
CREATE INDEX IF NOT EXISTS outbox_due_at ON outbox (sink, state, next_at, seq);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_at);
"""


@dataclass
class Record:
    """One outbox row, as ``waypost show`` and the admin page list it."""

    seq: int
    sink: str
    event_id: str
    name: str
    timestamp: float
    state: str
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    properties: dict[str, Any]
    remarks: list[str]
    receipt: str | None = None
    """The destination's reference to the submission that delivered it (a collector's
    receipt, Firefly III's uuid), when it answered one."""

    def as_dict(self) -> dict[str, Any]:
        from datetime import datetime, timezone

        def iso(t: float | None) -> str | None:
            if not t:
                return None
            return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

        return {
            "seq": self.seq,
            "sink": self.sink,
            "event_id": self.event_id,
            "name": self.name,
            "timestamp": iso(self.timestamp),
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt": iso(self.next_at) if self.state == "pending" else None,
            "last_error": self.last_error,
            "stored_at": iso(self.created_at),
            "properties": self.properties,
            "remarks": self.remarks,
            "receipt": self.receipt,
        }


class Outbox:
    """Thread-safe access to the outbox file: one SQLite connection per thread."""

    def __init__(self, data_dir: Path, *, sync: bool = False, inspect: bool = False) -> None:
        """``inspect``: read the file as it is, never write, create or repair it."""
        self.path = Path(data_dir) / FILENAME
        self.sync = sync
        self._context_ids: dict[str, int] = {}
        self._context_generation = -1
        self.storage = Storage(
            self.path,
            schema=_SCHEMA,
            required=("contexts", "outbox"),
            # An outbox made by an older version lacks these.
            columns=(
                ("outbox", "lease_owner", "TEXT NOT NULL DEFAULT ''"),
                ("outbox", "receipt", "TEXT"),
            ),
            sync=sync,
            on_recover=_recover,
            inspect=inspect,
        )

    # --- the file ---------------------------------------------------------------------------

    def health(self) -> Health:
        """What is wrong with the file, if anything (see :class:`Storage`)."""
        return self.storage.health()

    def budget(self, deadline: float) -> contextlib.AbstractContextManager[None]:
        """Bound this thread's waits for the lock by ``deadline`` (monotonic) in the block."""
        return self.storage.budget(deadline)

    def time_left(self) -> float:
        """Seconds this thread may still wait for the lock (its budget, else the default)."""
        return max(0.0, self.storage.deadline() - time.monotonic())

    @property
    def read_only(self) -> bool:
        return self.storage.read_only

    @property
    def inspecting(self) -> bool:
        """Opened to look at from outside (``waypost status``, telemetry off): its health says
        what a process using the file would find."""
        return self.storage.inspect

    @property
    def _conns(self) -> list[sqlite3.Connection]:
        return self.storage.parent_connections()

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction; once more if the file was repaired meanwhile."""
        for attempt in (0, 1):
            try:
                with self.storage.write() as db:
                    if self._context_generation != self.storage.generation:
                        self._context_ids = {}
                        self._context_generation = self.storage.generation
                    return fn(db)
            except StorageUnavailable as exc:
                if not exc.recovered or attempt:
                    raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self.storage.read() as db:
            yield db

    def after_fork(self) -> None:
        """Forget the parent's connections (never use them in a child)."""
        self._context_ids = {}
        self.storage.after_fork()

    def close(self) -> None:
        self.storage.close()

    def checkpoint(self) -> bool:
        """Put what the -wal holds into the main file (see :meth:`Storage.checkpoint`)."""
        return self.storage.checkpoint()

    # --- writing ----------------------------------------------------------------------------

    def _context_id(self, db: sqlite3.Connection, context: dict[str, Any]) -> int:
        body = dumps(context)
        cid = self._context_ids.get(body)
        if cid is None:
            db.execute("INSERT OR IGNORE INTO contexts (body) VALUES (?)", (body,))
            row = db.execute("SELECT id FROM contexts WHERE body = ?", (body,)).fetchone()
            cid = int(row[0])
            self._context_ids[body] = cid
        return cid

    def add(
        self,
        events: Sequence[Event],
        sinks: Sequence[str],
        *,
        now: float | None = None,
        lease_seconds: float = 0.0,
    ) -> None:
        """Store events for every sink in one transaction (a duplicate id is ignored).

        With ``lease_seconds``, the rows are leased to this process at once: events a sink of
        this process is sending right now, stored so that a crash cannot lose them.
        """
        if not events or not sinks:
            return
        now = time.time() if now is None else now
        me = owner()
        lease = (os.getpid(), me, now + lease_seconds) if lease_seconds else (0, "", 0.0)

        def write(db: sqlite3.Connection) -> None:
            rows = [(sink, *row, now, *lease) for row in self._rows(db, events) for sink in sinks]
            # A row this process leased before (a batch whose outcome could not be written,
            # back in memory since) takes the new lease, or none; anyone else's stays as it is.
            db.executemany(
                "INSERT INTO outbox (sink, event_id, name, time, body, context_id, "
                "remarks, created_at, lease_pid, lease_owner, lease_until) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event_id, sink) DO UPDATE SET lease_pid = excluded.lease_pid, "
                "lease_owner = excluded.lease_owner, "
                "lease_until = excluded.lease_until "
                "WHERE outbox.state = 'pending' AND outbox.lease_owner = ?",
                [(*row, me) for row in rows],
            )

        self._write(write)

    def release(self) -> int:
        """Void this process's leases (at shutdown: whatever it was sending is due again)."""
        return self._write(
            lambda db: (
                db.execute(
                    "UPDATE outbox SET lease_until = 0, lease_pid = 0, lease_owner = '' "
                    "WHERE lease_owner = ?",
                    (owner(),),
                ).rowcount
            )
        )

    def settle(
        self,
        sink: str,
        outcomes: Sequence[tuple[Event, str, float, str | None]],
        *,
        now: float | None = None,
        receipt: str | None = None,
    ) -> None:
        """Record what became of events a sink sent from memory: (event, state, next attempt,
        reason), state ``pending`` (to retry), ``failed`` or ``sent``. An event already stored
        (spilled while it was in flight) has its row updated; otherwise a row is made. The
        ``sent`` ones keep the destination's ``receipt``."""
        if not outcomes:
            return
        now = time.time() if now is None else now

        def write(db: sqlite3.Connection) -> None:
            stored = self._rows(db, [event for event, _, _, _ in outcomes])
            rows = []
            for row, (_, state, next_at, reason) in zip(stored, outcomes, strict=True):
                done_at = None if state == "pending" else now
                error = reason[:1000] if reason else None
                kept = receipt if state == "sent" else None
                rows.append((sink, *row, now, state, next_at, error, done_at, kept))
            db.executemany(
                "INSERT INTO outbox (sink, event_id, name, time, body, context_id, remarks, "
                "created_at, state, next_at, last_error, done_at, receipt, attempts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT (event_id, sink) DO UPDATE SET state = excluded.state, "
                "next_at = excluded.next_at, last_error = excluded.last_error, "
                "done_at = excluded.done_at, receipt = excluded.receipt, "
                "attempts = attempts + 1, lease_until = 0, lease_pid = 0, lease_owner = ''",
                rows,
            )

        self._write(write)

    def forget(self, sink: str, event_ids: Iterable[str]) -> None:
        """Delete the rows of ``sink`` for these events (delivered after they were stored)."""
        params = [(event_id, sink) for event_id in event_ids]
        if params:
            self._write(
                lambda db: db.executemany(
                    "DELETE FROM outbox WHERE event_id = ? AND sink = ?", params
                )
            )

    def _rows(
        self, db: sqlite3.Connection, events: Sequence[Event]
    ) -> list[tuple[str, str, float, str, int, str | None]]:
        """(event id, name, time, body, context id, remarks) of each event, as stored."""
        rows = []
        ctx_cache: dict[int, int] = {}
        for e in events:
            key = id(e.context)
            cid = ctx_cache.get(key)
            if cid is None:
                cid = ctx_cache[key] = self._context_id(db, e.context)
            body = dumps(
                {
                    "properties": e.properties,
                    "instance_id": e.instance_id,
                    "distinct_id": e.distinct_id,
                    "level": e.level,
                }
            )
            held = remarks_of(e)
            remarks = dumps(held) if held else None
            rows.append((e.id, e.name, e.time, body, cid, remarks))
        return rows

    # --- delivery ---------------------------------------------------------------------------

    def lease(
        self, sink: str, limit: int, *, lease_seconds: float, now: float | None = None
    ) -> list[tuple[int, int, Event]]:
        """Take up to ``limit`` due rows of ``sink`` for this process, earliest due first."""
        now = time.time() if now is None else now

        def write(db: sqlite3.Connection) -> list[Any]:
            rows = db.execute(
                "SELECT o.seq, o.event_id, o.name, o.time, o.body, c.body, o.remarks, o.attempts "
                "FROM outbox o LEFT JOIN contexts c ON c.id = o.context_id "
                "WHERE o.sink = ? AND o.state = 'pending' AND o.next_at <= ? "
                "AND o.lease_until <= ? ORDER BY o.next_at, o.seq LIMIT ?",
                (sink, now, now, limit),
            ).fetchall()
            seqs = [r[0] for r in rows]
            for i in range(0, len(seqs), _IN_CHUNK):
                chunk = seqs[i : i + _IN_CHUNK]
                db.execute(
                    "UPDATE outbox SET lease_pid = ?, lease_owner = ?, lease_until = ? "
                    f"WHERE seq IN ({','.join('?' * len(chunk))})",
                    (os.getpid(), owner(), now + lease_seconds, *chunk),
                )
            return rows

        rows = self._write(write)
        if not rows:
            return []
        out = []
        contexts: dict[str, dict[str, Any]] = {}
        for seq, event_id, name, ts, body, ctx, remarks, attempts in rows:
            data = json.loads(body)
            context = contexts.get(ctx)
            if context is None:
                context = contexts[ctx] = json.loads(ctx) if ctx else {}
            out.append(
                (
                    seq,
                    attempts,
                    Event(
                        id=event_id,
                        name=name,
                        time=ts,
                        instance_id=data["instance_id"],
                        properties=data["properties"],
                        context=context,
                        distinct_id=data.get("distinct_id") or "",
                        level=data.get("level", "usage"),
                        remarks=json.loads(remarks) if remarks else NO_REMARKS,
                    ),
                )
            )
        return out

    def delivered(
        self,
        seqs: Iterable[int],
        *,
        keep: bool,
        now: float | None = None,
        receipt: str | None = None,
    ) -> None:
        """Rows delivered: deleted, or (``keep``) kept as ``sent`` with the destination's
        ``receipt``."""
        now = time.time() if now is None else now
        params = [(s,) for s in seqs]
        if not params:
            return

        def write(db: sqlite3.Connection) -> None:
            if keep:
                db.executemany(
                    "UPDATE outbox SET state = 'sent', done_at = ?, lease_until = 0, "
                    "last_error = NULL, receipt = ? WHERE seq = ?",
                    [(now, receipt, s) for (s,) in params],
                )
            else:
                seqs = [s for (s,) in params]
                for i in range(0, len(seqs), _IN_CHUNK):
                    chunk = seqs[i : i + _IN_CHUNK]
                    db.execute(
                        f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(chunk))})", chunk
                    )

        self._write(write)

    def retry(self, items: Iterable[tuple[int, float, str]]) -> None:
        """Schedule rows again: (seq, next attempt time, reason)."""
        params = [(next_at, reason[:1000], seq) for seq, next_at, reason in items]
        if not params:
            return
        self._write(
            lambda db: db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ?, "
                "lease_until = 0, lease_pid = 0, lease_owner = '' WHERE seq = ?",
                params,
            )
        )

    def failed(self, items: Iterable[tuple[int, str]], *, now: float | None = None) -> None:
        """Mark rows refused for good: (seq, reason)."""
        now = time.time() if now is None else now
        params = [(reason[:1000], now, seq) for seq, reason in items]
        if not params:
            return
        self._write(
            lambda db: db.executemany(
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ?, "
                "done_at = ?, lease_until = 0, lease_pid = 0, lease_owner = '' "
                "WHERE seq = ?",
                params,
            )
        )

    def reclaim(self, *, now: float | None = None) -> int:
        """Void leases held by processes that no longer exist (a PID that is running again
        for another process counts as gone); returns how many rows."""
        now = time.time() if now is None else now
        with self._read() as db:
            holders = db.execute(
                "SELECT DISTINCT lease_pid, lease_owner FROM outbox "
                "WHERE lease_until > ? AND lease_owner != ?",
                (now, owner()),
            ).fetchall()
        dead = [(pid, who) for pid, who in holders if not owner_alive(who, pid)]
        if not dead:
            return 0

        def write(db: sqlite3.Connection) -> int:
            return sum(
                db.execute(
                    "UPDATE outbox SET lease_until = 0, lease_pid = 0, lease_owner = '' "
                    "WHERE lease_pid = ? AND lease_owner = ? AND lease_until > 0",
                    (pid, who),
                ).rowcount
                for pid, who in dead
            )

        return self._write(write)

    def retry_now(self, sinks: Iterable[str] | None = None, *, before: float | None = None) -> int:
        """Make every pending row due now (a restart or ``waypost flush`` is a retry point);
        with ``before`` (Unix time), only the rows stored before then."""
        names = None if sinks is None else list(sinks)
        clause = "state = 'pending' AND next_at > 0"
        params: list[Any] = []
        if before is not None:
            clause += " AND created_at < ?"
            params.append(before)

        def write(db: sqlite3.Connection) -> int:
            if names is None:
                return db.execute(f"UPDATE outbox SET next_at = 0 WHERE {clause}", params).rowcount
            return sum(
                db.execute(
                    f"UPDATE outbox SET next_at = 0 WHERE sink = ? AND {clause}", [s, *params]
                ).rowcount
                for s in names
            )

        return self._write(write)

    def next_due(
        self, sink: str, *, now: float | None = None, tracked_before: float | None = None
    ) -> float | None:
        """When the earliest pending row of ``sink`` that nobody has leased becomes due (None
        if there is none); with ``tracked_before``, only rows of events that happened before
        then. Leased rows come back when their lease ends; the poll looks again by then."""
        now = time.time() if now is None else now
        query = (
            "SELECT next_at FROM outbox WHERE sink = ? AND state = 'pending' AND lease_until <= ?"
        )
        params: list[Any] = [sink, now]
        if tracked_before is not None:
            query += " AND time <= ?"
            params.append(tracked_before)
        with self._read() as db:
            row = db.execute(query + " ORDER BY next_at LIMIT 1", params).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def holding(self, sink: str, ids: Collection[str]) -> int:
        """How many of ``ids`` (distinct) the outbox holds pending for ``sink``."""
        held = 0
        unique = list(ids)
        with self._read() as db:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                row = db.execute(
                    "SELECT COUNT(*) FROM outbox WHERE sink = ? AND state = 'pending' "
                    f"AND event_id IN ({marks})",
                    (sink, *chunk),
                ).fetchone()
                held += int(row[0])
        return held

    # --- inspection and housekeeping --------------------------------------------------------

    def sink_rows(self) -> dict[str, dict[str, Any]]:
        """Per sink, what its rows say, whichever process wrote them (``waypost status`` is not
        the application): ``pending``, ``retrying`` (pending and tried before), ``refused``
        (failed for good, kept until ``outbox.max_age``), ``last_success`` (the newest kept
        ``sent`` row), ``last_error`` and ``last_error_at`` (of the newest row with an error;
        the time is known for a refused row only)."""
        out: dict[str, dict[str, Any]] = {}
        with self._read() as db:
            rows = db.execute(
                "SELECT sink, SUM(state = 'pending'), SUM(state = 'pending' AND attempts > 0), "
                "SUM(state = 'failed'), MAX(CASE WHEN state = 'sent' THEN done_at END) "
                "FROM outbox GROUP BY sink"
            ).fetchall()
            errors = db.execute(
                "SELECT sink, last_error, state, done_at FROM outbox WHERE seq IN "
                "(SELECT MAX(seq) FROM outbox WHERE last_error IS NOT NULL GROUP BY sink)"
            ).fetchall()
        for sink, pending, retrying, refused, last_success in rows:
            out[sink] = {
                "pending": int(pending or 0),
                "retrying": int(retrying or 0),
                "refused": int(refused or 0),
                "last_success": last_success,
                "last_error": None,
                "last_error_at": None,
            }
        for sink, error, state, done_at in errors:
            if sink in out:
                out[sink]["last_error"] = error
                out[sink]["last_error_at"] = done_at if state == "failed" else None
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Row counts by sink and state."""
        out: dict[str, dict[str, int]] = {}
        with self._read() as db:
            for sink, state, n in db.execute(
                "SELECT sink, state, COUNT(*) FROM outbox GROUP BY sink, state"
            ):
                out.setdefault(sink, {})[state] = n
        return out

    def pending_events(self) -> int:
        """Distinct events that some sink has still to deliver."""
        with self._read() as db:
            row = db.execute(
                "SELECT COUNT(DISTINCT event_id) FROM outbox WHERE state = 'pending'"
            ).fetchone()
        return int(row[0])

    def records(
        self,
        *,
        sink: str | None = None,
        state: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Record], int]:
        """A page of records, newest first, and the total that match the filters."""
        where, params = [], []
        for column, value in (("sink", sink), ("state", state), ("name", name)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as db:
            total = db.execute(f"SELECT COUNT(*) FROM outbox {clause}", params).fetchone()[0]
            rows = db.execute(
                "SELECT seq, sink, event_id, name, time, state, attempts, next_at, last_error, "
                f"created_at, body, remarks, receipt FROM outbox {clause} ORDER BY seq DESC "
                "LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        records = [
            Record(
                seq=r[0],
                sink=r[1],
                event_id=r[2],
                name=r[3],
                timestamp=r[4],
                state=r[5],
                attempts=r[6],
                next_at=r[7],
                last_error=sanitise(r[8]) if r[8] else r[8],  # a row of any process, any age
                created_at=r[9],
                properties=json.loads(r[10]).get("properties", {}),
                remarks=json.loads(r[11]) if r[11] else [],
                receipt=r[12],
            )
            for r in rows
        ]
        return records, int(total)

    def purge(self, *, sent_only: bool) -> int:
        """Delete every record, or only the delivered ones kept for inspection."""
        if sent_only:
            return self._write(
                lambda db: db.execute("DELETE FROM outbox WHERE state = 'sent'").rowcount
            )
        return self._write(lambda db: db.execute("DELETE FROM outbox").rowcount)

    def enforce_retention(
        self, *, max_age: float, max_bytes: float, keep_sent: float, now: float | None = None
    ) -> dict[str, int]:
        """Drop what is past the limits, oldest first; returns counts by reason."""
        now = time.time() if now is None else now
        dropped = {"max_age": 0, "max_size": 0, "sent_expired": 0}

        def expire(db: sqlite3.Connection) -> None:
            dropped["max_age"] = db.execute(
                "DELETE FROM outbox WHERE state != 'sent' AND created_at < ?", (now - max_age,)
            ).rowcount
            dropped["sent_expired"] = db.execute(
                "DELETE FROM outbox WHERE state = 'sent' AND done_at < ?", (now - keep_sent,)
            ).rowcount

        self._write(expire)
        size = self.size_bytes()
        if size > max_bytes:
            with self._read() as db:
                total = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            if total:
                excess = int(total * (1 - max_bytes / size)) + 1
                dropped["max_size"] = self._write(
                    lambda db: (
                        db.execute(
                            "DELETE FROM outbox WHERE seq IN "
                            "(SELECT seq FROM outbox ORDER BY state = 'pending', seq LIMIT ?)",
                            (excess,),
                        ).rowcount
                    )
                )
        return dropped

    def size_bytes(self) -> int:
        with self._read() as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            size = db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)


def _recover(db: sqlite3.Connection, rows: dict[str, list[dict[str, Any]]]) -> int:
    """Put the rows read from a file that had to be replaced into the new one (in a
    transaction the caller holds); returns how many outbox rows went in."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
    context_ids: dict[Any, int] = {}
    for row in rows.get("contexts", []):
        body = row.get("body")
        if not isinstance(body, str):
            continue
        db.execute("INSERT OR IGNORE INTO contexts (body) VALUES (?)", (body,))
        found = db.execute("SELECT id FROM contexts WHERE body = ?", (body,)).fetchone()
        context_ids[row.get("id")] = int(found[0])
    fallback: int | None = None
    n = 0
    for row in rows.get("outbox", []):
        values = {k: v for k, v in row.items() if k in columns and k != "seq"}
        cid = context_ids.get(values.get("context_id"))
        if cid is None:  # its context could not be read: an empty one
            if fallback is None:
                db.execute("INSERT OR IGNORE INTO contexts (body) VALUES ('{}')")
                fallback = int(
                    db.execute("SELECT id FROM contexts WHERE body = '{}'").fetchone()[0]
                )
            cid = fallback
        values["context_id"] = cid
        if not {"sink", "event_id", "name", "time", "body", "created_at"} <= values.keys():
            continue
        names = ", ".join(values)
        marks = ", ".join("?" * len(values))
        n += db.execute(
            f"INSERT OR IGNORE INTO outbox ({names}) VALUES ({marks})",
            list(values.values()),
        ).rowcount
    return n


class Outboxes:
    """The outbox of an instance's data dir: the one it runs (``running``), else opened
    read-write (to purge) or read-only (to look: ``status``, ``show``; read as it is, nothing
    written, created or repaired), each opened once, when first asked."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.running: Outbox | None = None
        self._read: Outbox | None = None
        self._write: Outbox | None = None

    def open(self, *, read_only: bool = False) -> Outbox:
        if self.running is not None:
            return self.running
        if read_only:
            if self._read is None:
                self._read = Outbox(self.data_dir, inspect=True)
            return self._read
        if self._write is None:
            self._write = Outbox(self.data_dir)
        return self._write

    def exists(self) -> bool:
        """Whether the data dir holds an outbox (without creating one)."""
        return self.running is not None or (self.data_dir / FILENAME).exists()
