"""Keeping the outbox's SQLite file usable whatever happens to it.

:class:`Storage` owns the file and the connections to it (one per thread). Every write runs in
a transaction bounded by a deadline (the caller's remaining budget, or :data:`BACKGROUND_WAIT`
on waypost's own threads), so a lock held by another process costs a bounded wait, never a
frozen host. A write the storage refuses raises :class:`StorageUnavailable` naming why; the
callers keep their events in memory and try again. What the file suffers is detected and
repaired where it can be:

- **full disk**: ``disk_full`` until a write succeeds again;
- **read-only** data dir or file: ``read_only``; reads still work (the rows are shown), writes
  are refused at once, and the directory is looked at again now and then;
- **deleted or replaced** under a running process (the file, its ``-wal`` or ``-shm``): seen by
  the file's identity before each transaction; the rows this process still reads through its
  open connection are copied into a new file at the path;
- **corrupt** (truncated, a bad header, a bad page, not a database at all): moved aside as
  ``outbox.sqlite3.corrupt-<UTC time>`` for the operator, the rows that can still be read
  salvaged into a new file, and one log line.

:meth:`Storage.health` says which of these applies, for ``status()``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waypost.logs import get_logger
from waypost.processes import FORK_KEEP, GATE

log = get_logger(__name__)

BACKGROUND_WAIT = 2.0
"""Seconds a write on waypost's own threads waits for the lock before it gives up for now."""
RECHECK = 10.0
"""Seconds between looks at a read-only or unusable data dir, to see if it can be written."""
SALVAGE_CHUNK = 500
LOG_PERIOD = 60.0
"""Seconds between two log lines for the same trouble with the file."""
ROOM = 64 * 1024
"""Bytes free on the data dir's filesystem under which a full disk is still called full after
a write succeeded (a small write reuses pages the -wal already holds and needs none)."""

_PRIMARY_CODES = {
    5: "locked",  # SQLITE_BUSY
    6: "locked",  # SQLITE_LOCKED
    8: "read_only",  # SQLITE_READONLY
    10: "io",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "disk_full",  # SQLITE_FULL
    14: "cantopen",  # SQLITE_CANTOPEN
    26: "corrupt",  # SQLITE_NOTADB
}
_MESSAGES = (
    ("database or disk is full", "disk_full"),
    ("readonly", "read_only"),
    ("read-only", "read_only"),
    ("locked", "locked"),
    ("busy", "locked"),
    ("malformed", "corrupt"),
    ("not a database", "corrupt"),
    ("no such table", "missing"),
    ("no such column", "corrupt"),
    ("disk i/o error", "io"),
    ("unable to open", "cantopen"),
)


def classify(exc: BaseException) -> str:
    """What an SQLite error says of the file: ``disk_full``, ``read_only``, ``locked``,
    ``corrupt``, ``missing`` (the schema is gone: a new file), ``io``, ``cantopen``, or
    ``other``."""
    if isinstance(exc, OSError):
        import errno

        return {errno.ENOSPC: "disk_full", errno.EROFS: "read_only", errno.EACCES: "read_only",
                errno.EPERM: "read_only"}.get(exc.errno or 0, "io")  # fmt: skip
    message = str(exc).lower()
    for text, kind in _MESSAGES:  # the message first: "no such table" has no code of its own
        if text in message:
            return kind
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return _PRIMARY_CODES.get(code & 0xFF, "other")
    return "other"


_WAL_WRITE_LOCK = 120
"""The byte of a WAL file's ``-shm`` that a writer locks (SQLite's ``WALINDEX_LOCK_OFFSET``)."""

_FLOCK = "hhqqi4x"
"""Linux's ``struct flock``: type, whence, start, length, pid."""


def _write_lock_holder(path: Path) -> int | None:
    """The process that holds the write lock of the SQLite file ``path`` (in WAL mode), seen
    twice 0.1 s apart (not a write passing by), or None: none, or this platform cannot tell
    (only Linux's lock records are read). Asks the kernel (``F_GETLK``): nothing is locked
    or written."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl
    import struct

    def holder() -> int | None:
        try:
            fd = os.open(f"{path}-shm", os.O_RDONLY)
        except OSError:  # no process has the file open in WAL mode, or it cannot be read
            return None
        try:
            asked = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _WAL_WRITE_LOCK, 1, 0)
            kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, asked))
        except OSError:
            return None
        finally:
            os.close(fd)
        return pid if kind != fcntl.F_UNLCK and pid > 0 else None

    first = holder()
    if first is None:
        return None
    time.sleep(0.1)
    return holder()


class StorageUnavailable(Exception):
    """The outbox cannot take this write now. ``kind``: ``disk_full``, ``read_only``,
    ``locked`` or ``unavailable``; ``recovered``: the file was repaired or replaced meanwhile,
    so the same write may be tried once more at once."""

    def __init__(self, kind: str, reason: str, *, recovered: bool = False) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.recovered = recovered


@dataclass
class Health:
    """What is wrong with the storage, if anything (``state`` ``ok`` when nothing is)."""

    state: str = "ok"
    detail: str | None = None
    since: float | None = None
    moved_aside: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def memory_only(self) -> bool:
        """Nothing can be stored now: events wait (and are delivered) in memory only."""
        return self.state != "ok"


class Storage:
    """One SQLite file in WAL mode and this process's connections to it.

    ``schema`` is run (with the write lock) when the file lacks ``required`` tables;
    ``on_recover`` is called with the rows read from a file that had to be replaced (its
    ``outbox`` and ``contexts`` tables, as lists of dicts), to put them into the new one.
    """

    def __init__(
        self,
        path: Path,
        *,
        schema: str,
        required: tuple[str, ...],
        columns: tuple[tuple[str, str, str], ...] = (),
        sync: bool = False,
        on_recover: Callable[[sqlite3.Connection, dict[str, list[dict[str, Any]]]], int]
        | None = None,
        inspect: bool = False,
    ) -> None:
        self.path = path
        self.schema = schema
        self.required = required
        self.columns = columns  # (table, column, type): added to a file that lacks them
        self.sync = sync
        self.on_recover = on_recover
        self.generation = 0
        self._health = Health()
        self._health_lock = threading.Lock()
        self._logged: dict[str, float] = {}  # monotonic: when each state was last logged
        self._reset_sync()
        self._read_only = False
        self._ready = False  # the schema is in place
        self._next_look = 0.0  # monotonic: when to look at a read-only dir again
        self._identity: tuple[Any, ...] | None = None
        self._primary: sqlite3.Connection | None = None
        # Inspection (status, show, while telemetry is off or from another process) reads the
        # file as it is: no schema work, no repair, nothing written, not even a -wal file.
        self.inspect = inspect
        if inspect:
            self._read_only, self._next_look = True, math.inf
            self._look_from_outside()
            return
        with contextlib.suppress(StorageUnavailable):
            # Quick: an existing outbox needs no lock to open; only a new file (or an older one
            # lacking an index) waits, briefly, for another process's lock.
            self._open(time.monotonic() + 0.25)

    def _reset_sync(self) -> None:
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.RLock()  # connections, identity and repairs
        # Threads of this process queue here to write (and a repair holds it too); reentrant:
        # a write may find the file gone and repair it on the way.
        self._write_lock = threading.RLock()
        self._budget = threading.local()
        # Connections a thread is reading through now (how many reads), and those of them
        # close() left to be closed by the last of those reads: closing a connection under
        # another thread's read crashes the process (a status() call during shutdown).
        self._use_lock = threading.Lock()
        self._reading: dict[sqlite3.Connection, int] = {}
        self._closing: set[sqlite3.Connection] = set()

    # --- health ----------------------------------------------------------------------------

    def health(self) -> Health:
        with self._health_lock:
            h = self._health
            return Health(h.state, h.detail, h.since, list(h.moved_aside), list(h.notes))

    def _set_health(self, state: str, detail: str | None) -> None:
        with self._health_lock:
            h = self._health
            if h.state != state:
                h.since = time.time() if state != "ok" else None
                # One line per trouble, not one per flap: a nearly full disk takes a small
                # write now and then, and a lock comes and goes.
                now = time.monotonic()
                if state != "ok" and now - self._logged.get(state, -LOG_PERIOD) >= LOG_PERIOD:
                    self._logged[state] = now
                    log.error("waypost: the outbox %s: %s", self.path, detail)
                elif state == "ok" and now - self._logged.get("ok", -LOG_PERIOD) >= LOG_PERIOD:
                    self._logged["ok"] = now
                    log.warning("waypost: the outbox %s can be written again", self.path)
            h.state, h.detail = state, detail

    def _note(self, text: str, *, aside: str | None = None) -> None:
        with self._health_lock:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._health.notes = [*self._health.notes[-9:], f"{stamp}: {text}"]
            if aside is not None:
                self._health.moved_aside.append(aside)

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _free(self) -> int | None:
        """Bytes free for this process on the data dir's filesystem (None: cannot tell)."""
        try:
            fs = os.statvfs(self.path.parent)
        except OSError:
            return None
        return fs.f_bavail * fs.f_frsize

    def _has_room(self) -> bool:
        free = self._free()
        return free is None or free >= ROOM

    def _look_from_outside(self) -> None:
        """Inspection: what a process using this data dir would find, without writing (a
        read-only data dir or file, a full disk)."""
        directory = self.path.parent
        if not directory.is_dir():
            return
        writable = os.access(directory, os.W_OK) and (
            not self.path.exists() or os.access(self.path, os.W_OK)
        )
        if not writable:
            self._health = Health(
                "read_only",
                f"the data dir {directory} is read-only: a process using it delivers events "
                "from memory only; nothing can be stored, and the records already stored "
                "cannot be sent until it is writable",
                time.time(),
            )
        elif not self._has_room():
            self._health = Health(
                "disk_full",
                f"the disk of the data dir {directory} is full ({self._free()} bytes free): "
                "a process using it keeps events in memory only",
                time.time(),
            )
        elif (holder := _write_lock_holder(self.path)) is not None:
            self._health = Health(
                "locked",
                f"another process (pid {holder}) holds the outbox's write lock: a process "
                "using the data dir waits for it no longer than its budget and keeps events "
                "in memory meanwhile",
                time.time(),
            )

    # --- budgets ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def budget(self, deadline: float) -> Iterator[None]:
        """Bound every wait for the lock in this block by ``deadline`` (monotonic)."""
        before = getattr(self._budget, "deadline", None)
        self._budget.deadline = deadline if before is None else min(before, deadline)
        try:
            yield
        finally:
            self._budget.deadline = before

    def deadline(self) -> float:
        """The monotonic time this thread's waits for the lock end: its budget's, else
        ``BACKGROUND_WAIT`` from now."""
        deadline = getattr(self._budget, "deadline", None)
        return time.monotonic() + BACKGROUND_WAIT if deadline is None else float(deadline)

    # --- opening ---------------------------------------------------------------------------

    def _new_connection(self, *, read_only: bool = False) -> sqlite3.Connection:
        if read_only:
            # The rows of a read-only file, WAL included where SQLite can map it; otherwise
            # the main file as it is. Inspection without a -wal file (no process has the file
            # open) reads the main file as it is: mode=ro would create the -wal and -shm.
            if self.inspect and not os.path.exists(f"{self.path}-wal"):
                return sqlite3.connect(
                    f"file:{self.path}?immutable=1", uri=True, check_same_thread=False
                )
            try:
                db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, timeout=1.0, check_same_thread=False
                )
                db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            except sqlite3.Error:
                db = sqlite3.connect(
                    f"file:{self.path}?immutable=1", uri=True, check_same_thread=False
                )
            return db
        db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=1000")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync else 'NORMAL'}")
        except BaseException:
            db.close()
            raise
        return db

    def _open(self, deadline: float) -> None:
        """Open (or create) the file, repairing what must be; raises StorageUnavailable when
        it cannot be used now (health says why)."""
        with self._lock, GATE.section("opening the outbox"):
            self._ready = False
            try:
                self._open_writable(deadline)
            except StorageUnavailable as exc:
                if exc.kind == "read_only":
                    self._enter_read_only(exc.reason)
                else:
                    self._set_health(exc.kind, exc.reason)
                raise
            self._read_only = False

    def _open_writable(self, deadline: float) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._refused(exc, f"cannot create the data dir {directory}") from None
        if os.path.lexists(self.path) and not self.path.is_file():
            self._quarantine(f"{self.path.name} is not a file")
        if not os.access(directory, os.W_OK):
            raise StorageUnavailable("read_only", f"the data dir {directory} is read-only")
        for attempt in range(3):
            try:
                db = self._new_connection()
                tables = {
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
            except sqlite3.Error as exc:
                kind = classify(exc)
                if kind == "corrupt" and attempt < 2:
                    self._quarantine(str(exc))
                    continue
                raise self._refused(exc, f"cannot open {self.path}") from None
            break
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self._primary = db
        self._conns.append(db)
        self._identity = self._stat()
        self.generation += 1
        if not set(self.required) <= tables or not self._schema_current(db):
            self._ensure_schema(db, deadline)
        self._ready = True

    def _schema_current(self, db: sqlite3.Connection) -> bool:
        """Whether the schema's indexes are all there (an older file lacks the new ones)."""
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        for table, column, _ in self.columns:
            if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                return False
        import re

        wanted = set(re.findall(r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)", self.schema))
        dropped = set(re.findall(r"DROP INDEX IF EXISTS (\w+)", self.schema))
        return wanted <= names and not (dropped & names)

    def _ensure_schema(self, db: sqlite3.Connection, deadline: float) -> None:
        self._set_busy(db, deadline)
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._refused(exc, "cannot create the outbox tables") from None
        try:
            for statement in self.schema.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, column, kind in self.columns:
                if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            raise self._refused(exc, "cannot create the outbox tables") from None

    def _enter_read_only(self, reason: str) -> None:
        self._read_only = True
        self._next_look = time.monotonic() + RECHECK
        self._set_health(
            "read_only",
            f"{reason}: events are delivered from memory only; nothing can be stored, and the "
            "records already stored cannot be sent until it is writable",
        )

    def _stat(self) -> tuple[Any, ...] | None:
        """The file's identity: (device, inode) of it, its -wal and its -shm."""
        ids: list[Any] = []
        for suffix in ("", "-wal", "-shm"):
            try:
                st = os.stat(f"{self.path}{suffix}")
            except OSError:
                ids.append(None)
                continue
            ids.append((st.st_dev, st.st_ino))
        return None if ids[0] is None else tuple(ids)

    def _refused(self, exc: BaseException, what: str) -> StorageUnavailable:
        kind = classify(exc)
        state = {"disk_full": "disk_full", "read_only": "read_only", "locked": "locked"}.get(
            kind, "unavailable"
        )
        return StorageUnavailable(state, f"{what}: {exc}")

    # --- connections -----------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, to read (raises StorageUnavailable when there is none)."""
        local = self._local
        db: sqlite3.Connection | None = getattr(local, "db", None)
        if db is not None and getattr(local, "generation", -1) == self.generation:
            return db
        if db is not None:  # a connection to a file that has been replaced since
            with contextlib.suppress(Exception):
                db.close()
            local.db = None
        with self._lock:
            if self._read_only and time.monotonic() >= self._next_look:
                self._look_again()
            if not self._ready and not self._read_only:
                self._open(self.deadline())
            if self._read_only:
                db = self._read_only_connection()
            else:
                try:
                    db = self._new_connection()
                except sqlite3.Error as exc:
                    raise self._refused(exc, f"cannot open {self.path}") from None
            self._conns.append(db)
            local.db, local.generation = db, self.generation
        return db

    def _read_only_connection(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise StorageUnavailable("read_only", self._health.detail or f"no {self.path}")
        try:
            return self._new_connection(read_only=True)
        except sqlite3.Error as exc:
            raise self._refused(exc, f"cannot read {self.path}") from None

    def _look_again(self) -> None:
        self._next_look = time.monotonic() + RECHECK
        if os.access(self.path.parent, os.W_OK):
            try:
                self._open(time.monotonic() + 0.5)
            except StorageUnavailable:
                return
            self._set_health("ok", None)

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, for reads; SQLite errors become StorageUnavailable (a
        corrupt file is repaired on the way)."""
        with GATE.section("reading the outbox"):
            # Inspection opens a connection a look: one kept open would go on showing the
            # file as it was.
            if self.inspect:
                db = self._read_only_connection()
            else:
                db = self.connection()
                while not self._use(db, 1):  # close() came since: this thread opens another
                    db = self.connection()
            try:
                yield db
            except sqlite3.Error as exc:
                raise self._failed(exc, "cannot read the outbox") from None
            finally:
                if self.inspect:
                    db.close()
                else:
                    self._use(db, -1)

    def _use(self, db: sqlite3.Connection, step: int) -> bool:
        """A read through ``db`` begins (1) or ends (-1); the last to end closes it if
        close() came meanwhile. False when a read cannot begin through it: close() took it
        (and closes it) before this read said it began."""
        with self._use_lock:
            if step > 0 and db not in self._conns:
                return False
            n = self._reading.get(db, 0) + step
            if n > 0:
                self._reading[db] = n
                return True
            self._reading.pop(db, None)
            if db not in self._closing:
                return True
            self._closing.discard(db)
        with contextlib.suppress(sqlite3.Error):
            db.close()
        return True

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), within this thread's budget."""
        deadline = self.deadline()
        if self._read_only:
            with self._lock:
                if time.monotonic() >= self._next_look:
                    self._look_again()
            if self._read_only:
                raise StorageUnavailable("read_only", self._health.detail or "read-only")
        # Threads of one process queue here for the write lock: SQLite's own busy handler
        # would make them sleep and poll (up to 100 ms a turn) while another thread writes.
        if not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise StorageUnavailable("locked", "another thread held the outbox past the budget")
        try:
            with GATE.section("writing the outbox"):
                self._check_identity()
                db = self.connection()
                self._set_busy(db, deadline)
                try:
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise self._failed(exc, "cannot start a write") from None
                try:
                    yield db
                    db.execute("COMMIT")
                except sqlite3.Error as exc:
                    _rollback(db)
                    raise self._failed(exc, "cannot write the outbox") from None
                except BaseException:
                    _rollback(db)
                    raise
            # Still holding the lock: the next writer's failure (a full disk) is never undone
            # by this success, nor is a full disk called writable while it has no room.
            state = self._health.state
            if state in ("locked", "unavailable") or (state == "disk_full" and self._has_room()):
                self._set_health("ok", None)
        finally:
            self._write_lock.release()

    @staticmethod
    def _set_busy(db: sqlite3.Connection, deadline: float) -> None:
        ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        db.execute(f"PRAGMA busy_timeout={ms}")

    def _failed(self, exc: sqlite3.Error, what: str) -> StorageUnavailable:
        """Turn an SQLite error into StorageUnavailable, repairing the file where that helps."""
        kind = classify(exc)
        if self.inspect:  # a repair is the running process's business
            return StorageUnavailable("unavailable", f"{what}: {exc}")
        if kind == "corrupt":
            recovered = self._quarantine(str(exc))
            return StorageUnavailable("unavailable", f"{what}: {exc}", recovered=recovered)
        if kind == "missing":
            recovered = self._rescue(f"its tables are gone ({exc})")
            return StorageUnavailable("unavailable", f"{what}: {exc}", recovered=recovered)
        refused = self._refused(exc, what)
        if refused.kind == "read_only":
            self._enter_read_only(refused.reason)
        elif refused.kind == "disk_full":
            self._set_health("disk_full", f"the disk is full ({exc}); events wait in memory")
        elif refused.kind == "locked":
            self._set_health("locked", f"another process holds the outbox's lock ({exc})")
        else:
            self._set_health("unavailable", refused.reason)
        return refused

    # --- repairs ---------------------------------------------------------------------------

    def _check_identity(self) -> None:
        """Before a write: is the file at the path still the one this process opened?"""
        if self._identity is None:
            return
        now = self._stat()
        if now == self._identity:
            return
        known = self._identity
        if now is not None and now[0] == known[0]:
            # Same file: a -wal or -shm appeared (made by SQLite) or went (deleted by someone).
            gone = [
                s
                for s, a, b in zip(("-wal", "-shm"), known[1:], now[1:], strict=True)
                if a and a != b
            ]
            if not gone:
                self._identity = now
                return
            self._rescue(f"its {' and '.join(gone)} file was deleted or replaced while in use")
            return
        self._rescue(
            "it was deleted while in use" if now is None else "it was replaced while in use"
        )

    def _rescue(self, why: str) -> bool:
        """The file at the path is not (all of) the one this process has open: copy what the
        open connection still reads into a new file there. True when the new file is ready."""
        return self._with_write_lock(self._rescue_locked, why)

    def _with_write_lock(self, repair: Callable[[str], bool], why: str) -> bool:
        """``repair(why)`` holding this process's write lock; False when the lock is not free
        within the caller's budget."""
        if not self._write_lock.acquire(timeout=max(0.0, self.deadline() - time.monotonic())):
            return False
        try:
            return repair(why)
        finally:
            self._write_lock.release()

    def _rescue_locked(self, why: str) -> bool:
        with self._lock:
            rows = self._dump(self._primary)
            old = self._identity
            self._close_all()
            # The old file's -wal and -shm (ours: same identity) must not be applied to a new
            # main file.
            for suffix, ident in zip(
                ("-wal", "-shm"), (old or (None, None, None))[1:], strict=True
            ):
                with contextlib.suppress(OSError):
                    st = os.stat(f"{self.path}{suffix}")
                    if ident == (st.st_dev, st.st_ino):
                        os.unlink(f"{self.path}{suffix}")
            try:
                self._open(self.deadline())
                restored = self._restore(rows)
            except StorageUnavailable as exc:
                log.error("waypost: the outbox %s: %s, and cannot be recreated: %s",
                          self.path, why, exc)  # fmt: skip
                return False
        text = f"the outbox {self.path.name}: {why}; recreated with the {restored} records "
        text += "this process still held"
        self._note(text)
        log.error("waypost: %s (%s)", text, self.path)
        return True

    def _quarantine(self, why: str) -> bool:
        """Move a corrupt file aside (with its -wal), salvage its readable rows into a new one.
        True when the new file is ready."""
        return self._with_write_lock(self._quarantine_locked, why)

    def _quarantine_locked(self, why: str) -> bool:
        with self._lock:
            self._close_all()
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            n = 1
            while os.path.lexists(aside):
                n += 1
                aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            try:
                os.replace(self.path, aside)
            except OSError as exc:
                self._set_health(
                    "unavailable",
                    f"the outbox is corrupt ({why}) and cannot be moved aside ({exc}): events "
                    "are kept in memory only",
                )
                return False
            with contextlib.suppress(OSError):
                os.replace(f"{self.path}-wal", f"{aside}-wal")
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}-shm")
            rows = self._salvage(aside)
            try:
                self._open(self.deadline())
                restored = self._restore(rows)
            except StorageUnavailable:
                restored = 0
                ready = False
            else:
                ready = True
        text = (f"the outbox was corrupt ({why}); moved aside to {aside.name}, {restored} "
                "records salvaged into a new outbox")  # fmt: skip
        self._note(text, aside=str(aside))
        log.error("waypost: %s (%s)", text, self.path.parent)
        return ready

    def _close_all(self) -> None:
        """Let go of the file: the primary connection now; each thread's own when it next
        asks (a connection another thread is reading through is not pulled from under it)."""
        self.generation += 1
        self._ready = False
        self._identity = None
        if self._primary is not None:
            with contextlib.suppress(Exception):
                self._primary.close()
        self._primary = None

    def _dump(self, db: sqlite3.Connection | None) -> dict[str, list[dict[str, Any]]]:
        """Every row of the required tables that ``db`` can still read."""
        out: dict[str, list[dict[str, Any]]] = {}
        if db is None:
            return out
        for table in self.required:
            try:
                cursor = db.execute(f"SELECT * FROM {table}")
                names = [d[0] for d in cursor.description]
                out[table] = [dict(zip(names, row, strict=True)) for row in cursor]
            except sqlite3.Error:
                out.setdefault(table, [])
        return out

    def _salvage(self, path: Path) -> dict[str, list[dict[str, Any]]]:
        """The rows that can still be read from a corrupt file, a chunk at a time; a chunk
        that cannot be read is read again one row at a time, so that a bad page costs only the
        rows it held. A file whose 100-byte header is junk is read through a copy with a
        header of SQLite's own."""
        out = self._salvage_from(path)
        if any(out.values()) or not path.is_file():
            return out
        copy = path.with_name(path.name + ".header")
        try:
            for page_size in _PAGE_SIZES:
                if not _copy_with_header(path, copy, page_size):
                    break
                out = self._salvage_from(copy)
                if any(out.values()):
                    break
        finally:
            with contextlib.suppress(OSError):
                os.unlink(copy)
        return out

    def _salvage_from(self, path: Path) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {t: [] for t in self.required}
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5)
            # A schema naming a page past the end (a truncated file) is then no reason to
            # refuse every read; nothing is written through this connection.
            db.execute("PRAGMA writable_schema=ON")
        except sqlite3.Error:
            return out
        try:
            for table in self.required:
                out[table] = _salvage_table(db, table)
        finally:
            db.close()
        return out

    def _restore(self, rows: dict[str, list[dict[str, Any]]]) -> int:
        if not rows or self.on_recover is None or not any(rows.values()):
            return 0
        db = self.connection()
        self._set_busy(db, self.deadline())
        try:
            db.execute("BEGIN IMMEDIATE")
            n = self.on_recover(db, rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            log.error("waypost: cannot restore %s records into the new outbox: %s",
                      sum(len(v) for v in rows.values()), exc)  # fmt: skip
            return 0
        return n

    # --- lifecycle -------------------------------------------------------------------------

    def after_fork(self) -> None:
        """Forget the parent's connections: never used, never closed in a child."""
        FORK_KEEP.extend(self._conns)
        if self._primary is not None:
            FORK_KEEP.append(self._primary)
        self._reset_sync()
        self._primary = None
        self._ready = False  # opened again when the child first uses it
        self.generation += 1

    def parent_connections(self) -> list[sqlite3.Connection]:
        return list(self._conns)

    def checkpoint(self) -> bool:
        """Copy what the -wal holds into the main file, without waiting for any reader or
        writer (``PASSIVE``); True when all of it was copied. For a shutdown that cannot close
        the file (a thread still uses it): SQLite checkpoints only when the last connection
        closes, and the rows would stay in the -wal alone."""
        if self._read_only:
            return False
        try:
            with GATE.section("checkpointing the outbox"):
                db = self.connection()
                row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except (sqlite3.Error, StorageUnavailable):
            return False
        return row is not None and row[0] == 0 and row[1] == row[2]

    def close(self) -> None:
        """Close every connection; one another thread is reading through now is closed by
        that read when it ends."""
        with self._lock:
            conns, self._conns = self._conns, []
            self._primary = None
            self._local = threading.local()
            self.generation += 1
            self._ready = False
        with self._use_lock:
            busy = {db for db in conns if db in self._reading}
            self._closing |= busy
        with GATE.section("closing the outbox"):
            for db in conns:
                if db not in busy:
                    with contextlib.suppress(sqlite3.Error):
                        db.close()


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back if a transaction is open (a failed COMMIT may already have ended it)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _salvage_table(db: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    """What can be read of ``table`` in a corrupt file, in rowid order."""
    rows: list[dict[str, Any]] = []
    try:
        top = db.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        top = None  # the rightmost pages are gone (a truncated file): read until nothing is
    last, failures = 0, 0
    while failures < 50:
        try:
            cursor = db.execute(
                f"SELECT rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid "
                f"LIMIT {SALVAGE_CHUNK}",
                (last,),
            )
            names = [d[0] for d in cursor.description][1:]
            chunk = cursor.fetchall()
        except sqlite3.Error:
            failures += 1
            # One row at a time through the window: only the rows on a bad page are lost.
            found = 0
            for rowid in range(last + 1, last + SALVAGE_CHUNK + 1):
                try:
                    cursor = db.execute(f"SELECT rowid, * FROM {table} WHERE rowid = ?", (rowid,))
                    row = cursor.fetchone()
                except sqlite3.Error:
                    continue
                if row is not None:
                    names = [d[0] for d in cursor.description][1:]
                    rows.append(dict(zip(names, row[1:], strict=True)))
                    found += 1
            last += SALVAGE_CHUNK
            if (top is None and not found) or (top is not None and last >= top):
                break
            continue
        if not chunk:
            break
        rows.extend(dict(zip(names, row[1:], strict=True)) for row in chunk)
        last = chunk[-1][0]
    return rows


_PAGE_SIZES = (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512)
"""Page sizes to try under a junk header, SQLite's default first."""


def _copy_with_header(path: Path, copy: Path, page_size: int) -> bool:
    """Copy ``path`` to ``copy`` with the 100-byte header of an empty database of
    ``page_size`` (the schema and the rows are in the pages: page 1 holds the schema after its
    header). False when the copy cannot be made."""
    empty = copy.with_name(copy.name + "-empty")
    try:
        with contextlib.closing(sqlite3.connect(empty)) as db:
            db.execute(f"PRAGMA page_size={page_size}")
            db.execute("VACUUM")
        header = bytearray(empty.read_bytes()[:100])
        # The page count from the file's size; no free list (the pages are read, not reused).
        header[28:32] = bytes(4)
        header[32:40] = bytes(8)
        header[92:96] = (int.from_bytes(header[24:28], "big") + 1).to_bytes(4, "big")
        with open(path, "rb") as src, open(copy, "wb") as dst:
            src.seek(100)
            dst.write(bytes(header))
            shutil.copyfileobj(src, dst)
    except (OSError, sqlite3.Error):
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(empty)
    return True
