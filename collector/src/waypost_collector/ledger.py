"""The collector's ledger: SQLite (WAL) in the data dir, shared by the processes that share it.

- ``seen``: event ids already accepted (for ``retention.dedup``), each with its receipt, so a
  retried batch is counted as duplicates and stored once;
- ``receipts``: what each submission held (``waypost collector receipt ID``), with its time of
  arrival and the address's daily hash (never the address);
- ``counts``: per day, app, outcome and reason (``stats``, ``/metrics``, the dashboard).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILENAME = "ledger.sqlite3"
_CHUNK = 900  # ids per IN (...): within SQLite's oldest limit of 999 parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
  event_id TEXT PRIMARY KEY,
  receipt TEXT NOT NULL,
  at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
CREATE TABLE IF NOT EXISTS receipts (
  receipt TEXT PRIMARY KEY,
  app TEXT NOT NULL,
  at REAL NOT NULL,
  ip_hash TEXT,
  version TEXT,
  accepted INTEGER NOT NULL,
  duplicates INTEGER NOT NULL,
  refused INTEGER NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_at ON receipts (at);
CREATE TABLE IF NOT EXISTS counts (
  day TEXT NOT NULL,
  app TEXT NOT NULL,
  kind TEXT NOT NULL,
  reason TEXT NOT NULL,
  n INTEGER NOT NULL,
  PRIMARY KEY (day, app, kind, reason)
) WITHOUT ROWID;
"""

ACCEPTED, DUPLICATE, REFUSED, RETRY, REQUEST = (
    "accepted",
    "duplicate",
    "refused",
    "retry",
    "request",
)
"""Kinds of counts: events accepted, duplicates, events refused (by reason), events asked to
come back later (rate limits), whole requests refused (by reason)."""


def day_of(unix: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(unix))


@dataclass
class Entry:
    """One submission as the ledger records it."""

    receipt: str
    app: str
    at: float
    ip_hash: str | None
    version: str | None
    accepted: list[tuple[str, str]]  # (event id, name)
    duplicates: list[tuple[str, str]]
    refused: list[dict[str, Any]]
    retry: list[str] = field(default_factory=list)
    control: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """Thread-safe: one connection per thread; writes come from the spool's one writer thread
    (and housekeeping), so they rarely wait on each other."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # A crash of the process loses nothing (WAL); a power cut may lose the last
            # receipts, which costs a duplicate count, never an event: the spool is FULL.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._lock:
                self._conns.append(db)
            try:
                os.chmod(self.path, 0o600)
            except OSError:
                pass
        return db

    def after_fork(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns = []

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for db in conns:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # --- the intake's writes ------------------------------------------------------------------

    def seen(self, ids: Sequence[str]) -> set[str]:
        """Which of these event ids were accepted before."""
        db = self._db()
        found: set[str] = set()
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            found.update(
                r[0]
                for r in db.execute(
                    f"SELECT event_id FROM seen WHERE event_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
            )
        return found

    def record(
        self, entries: Sequence[Entry], tallies: Iterable[tuple[str, str, str, int]] = ()
    ) -> None:
        """Write submissions (their ids as seen, their receipts, their counts) and request
        tallies ``(app, kind, reason, n)`` in one transaction."""
        counts: dict[tuple[str, str, str, str], int] = {}
        now = time.time()
        seen_rows: list[tuple[str, str, float]] = []
        receipt_rows = []
        for e in entries:
            day = day_of(e.at)
            seen_rows.extend((event_id, e.receipt, e.at) for event_id, _ in e.accepted)
            for kind, n in ((ACCEPTED, len(e.accepted)), (DUPLICATE, len(e.duplicates))):
                if n:
                    counts[(day, e.app, kind, "")] = counts.get((day, e.app, kind, ""), 0) + n
            for r in e.refused:
                key = (day, e.app, REFUSED, str(r["reason"]))
                counts[key] = counts.get(key, 0) + 1
            if e.retry:
                key = (day, e.app, RETRY, "rate_limited")
                counts[key] = counts.get(key, 0) + len(e.retry)
            body = {
                "accepted": e.accepted,
                "duplicates": e.duplicates,
                "refused": e.refused,
                "retry": e.retry,
                "control": e.control,
            }
            receipt_rows.append(
                (
                    e.receipt, e.app, e.at, e.ip_hash, e.version, len(e.accepted),
                    len(e.duplicates), len(e.refused), json.dumps(body, separators=(",", ":")),
                )
            )  # fmt: skip
        for app, kind, reason, n in tallies:
            key = (day_of(now), app, kind, reason)
            counts[key] = counts.get(key, 0) + n
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO seen (event_id, receipt, at) VALUES (?, ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET receipt = excluded.receipt, at = excluded.at",
                seen_rows,
            )
            db.executemany(
                "INSERT OR REPLACE INTO receipts (receipt, app, at, ip_hash, version, accepted, "
                "duplicates, refused, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                receipt_rows,
            )
            db.executemany(
                "INSERT INTO counts (day, app, kind, reason, n) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (day, app, kind, reason) DO UPDATE SET n = n + excluded.n",
                [(*key, n) for key, n in counts.items()],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- reading --------------------------------------------------------------------------

    def arrivals(self, ids: Sequence[str]) -> dict[str, tuple[float, str, str | None]]:
        """For each known event id: (time received, receipt, address hash)."""
        db = self._db()
        out: dict[str, tuple[float, str, str | None]] = {}
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            rows = db.execute(
                "SELECT s.event_id, r.at, r.receipt, r.ip_hash FROM seen s "
                "JOIN receipts r ON r.receipt = s.receipt "
                f"WHERE s.event_id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for event_id, at, receipt, ip_hash in rows:
                out[event_id] = (at, receipt, ip_hash)
        return out

    def receipt(self, receipt: str) -> dict[str, Any] | None:
        """What a submission held, or None if the ledger does not know it (any more)."""
        row = (
            self._db()
            .execute(
                "SELECT receipt, app, at, ip_hash, version, accepted, duplicates, refused, body "
                "FROM receipts WHERE receipt = ?",
                (receipt,),
            )
            .fetchone()
        )
        if row is None:
            return None
        body = json.loads(row[8])
        return {
            "receipt": row[0],
            "app": row[1],
            "received_at": iso(row[2]),
            "ip_hash": row[3],
            "version": row[4],
            "accepted": row[5],
            "duplicates": row[6],
            "refused": row[7],
            "events": [
                *({"id": i, "name": n, "outcome": "accepted"} for i, n in body["accepted"]),
                *({"id": i, "name": n, "outcome": "duplicate"} for i, n in body["duplicates"]),
            ],
            "refusals": body["refused"],
            "retry": body.get("retry", []),
            "control": body.get("control", {}),
        }

    def counts(self, *, since_day: str | None = None) -> list[tuple[str, str, str, str, int]]:
        """(day, app, kind, reason, n) rows, oldest day first."""
        sql = "SELECT day, app, kind, reason, n FROM counts"
        params: tuple[str, ...] = ()
        if since_day:
            sql += " WHERE day >= ?"
            params = (since_day,)
        return [tuple(r) for r in self._db().execute(sql + " ORDER BY day", params)]

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per app: accepted, duplicates, retry, refused by reason, requests refused by reason."""
        out: dict[str, dict[str, Any]] = {}
        rows = self._db().execute(
            "SELECT app, kind, reason, SUM(n) FROM counts GROUP BY app, kind, reason"
        )
        for app, kind, reason, n in rows:
            entry = out.setdefault(
                app,
                {ACCEPTED: 0, DUPLICATE: 0, RETRY: 0, REFUSED: {}, "requests_refused": {}},
            )
            if kind in (ACCEPTED, DUPLICATE, RETRY):
                entry[kind] += int(n)
            elif kind == REFUSED:
                entry[REFUSED][reason] = int(n)
            elif kind == REQUEST:
                entry["requests_refused"][reason] = int(n)
        return out

    def sizes(self) -> dict[str, int]:
        db = self._db()
        return {
            "seen": int(db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]),
            "receipts": int(db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]),
        }

    # --- housekeeping -----------------------------------------------------------------------

    def expire(
        self, *, dedup: float, receipts: float, counts: float, now: float | None = None
    ) -> dict[str, int]:
        """Forget ids, receipts and counts past their retention."""
        now = time.time() if now is None else now
        db = self._db()
        out = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            out["seen"] = db.execute("DELETE FROM seen WHERE at < ?", (now - dedup,)).rowcount
            out["receipts"] = db.execute(
                "DELETE FROM receipts WHERE at < ?", (now - receipts,)
            ).rowcount
            out["counts"] = db.execute(
                "DELETE FROM counts WHERE day < ?", (day_of(now - counts),)
            ).rowcount
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out


def iso(unix: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds and a ``Z``."""
    moment = _dt.datetime.fromtimestamp(unix, _dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
