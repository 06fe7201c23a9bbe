"""The databases of the warehouse tests as peers of ``waypost.testing.SinkContract``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from waypost.testing import (
    Arrival,
    BasePeer,
    PeerCannot,
    RecordingServer,
    Request,
    Response,
    free_port,
)

SQL_KINDS = ("sqlite", "duckdb", pytest.param("postgresql", marks=pytest.mark.server))
"""The databases of the ``sql`` sink; PostgreSQL needs its server (CI forbids the skip)."""

_HOP_BY_HOP = ("host", "connection", "content-length", "transfer-encoding", "keep-alive")

Backend = Any  # conftest.Backend
SnowflakeDb = Any  # conftest.SnowflakeDb


class _Hold:
    """Something a peer holds in a thread of its own (a lock, a process holding a file) until
    :meth:`release`, or until ``seconds`` pass."""

    def __init__(self, acquire: Callable[[], Callable[[], None]], seconds: float | None) -> None:
        self._done = threading.Event()
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                release = acquire()
            except BaseException as exc:  # handed to the test below
                failed.append(exc)
                ready.set()
                return
            ready.set()
            self._done.wait(seconds)
            release()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("the lock was not taken within 60 s")
        if failed:
            raise failed[0]

    def release(self) -> None:
        self._done.set()
        self._thread.join(60)


class _TablePeer(BasePeer):
    """What the database peers share: ``db`` (a ``Backend`` or ``SnowflakeDb``: ``table``,
    ``query()``), faults undone in reverse order, and the rows read back."""

    def __init__(self, db: Any, name: str) -> None:
        self.db = db
        self.name = name
        self._undo: list[Callable[[], None]] = []

    def deliver(self) -> None:
        while self._undo:
            self._undo.pop()()

    def received(self) -> list[Arrival]:
        rows = self.db.query(f"SELECT id, name, properties FROM {self.db.table}")
        return [Arrival(str(i), n, json.loads(p) if isinstance(p, str) else p) for i, n, p in rows]

    def _rename_table_away(self) -> None:
        table, query = self.db.table, self.db.query
        query(f"ALTER TABLE {table} RENAME TO {table}_gone")

        def undo() -> None:
            # A sink told create_table may have made a new one meanwhile (when it reconnects).
            query(f"DROP TABLE IF EXISTS {table}")
            query(f"ALTER TABLE {table}_gone RENAME TO {table}")

        self._undo.append(undo)

    def close(self) -> None:
        self.deliver()


class SqlPeer(_TablePeer):
    """A database of the ``sql`` sink as a :class:`~waypost.testing.Peer`: it refuses by
    renaming the table away (or with a trigger that aborts the insert), fails retryably with
    a lock another connection (or process) holds, or a server that asks for the transaction to
    be retried, and answers slowly by holding a lock for a while. Faults need the table, which
    the sink creates when it opens (``create_table: true``)."""

    def __init__(self, backend: Backend, down_url: str, secrets: list[str]) -> None:
        super().__init__(backend, f"the {backend.kind} database")
        self.backend = backend
        self._down_url = down_url
        self._secrets = secrets

    def config(self) -> dict[str, Any]:
        return self.backend.config()

    def unreachable_config(self) -> dict[str, Any]:
        return self.backend.config(url=self._down_url)

    def secrets(self) -> list[str]:
        return self._secrets

    # --- refusals ---------------------------------------------------------------------------

    def permanent_failures(self) -> list[str]:
        triggers = ["a trigger refuses the rows"] if self.backend.kind != "duckdb" else []
        return [*triggers, "the table is gone"]

    def refuse(self, failure: str) -> None:
        self.deliver()
        table, query = self.backend.table, self.backend.query
        if failure == "the table is gone":
            self._rename_table_away()
        elif self.backend.kind == "sqlite":
            query(
                f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
            self._undo.append(lambda: query(f"DROP TRIGGER refuse_{table}"))
        else:
            self._pg_trigger("23514", "refused by the test")  # check_violation

    def _pg_trigger(self, sqlstate: str, message: str) -> None:
        table, query = self.backend.table, self.backend.query
        query(
            f"CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{message}' USING ERRCODE = '{sqlstate}'; END $$"
        )
        query(
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION refuse_{table}()"
        )
        self._undo.append(lambda: query(f"DROP FUNCTION refuse_{table}() CASCADE"))

    # --- retryable failures -----------------------------------------------------------------

    def retryable_failures(self) -> list[str]:
        return {
            "sqlite": ["another connection holds the write lock"],
            "duckdb": ["another process holds the file"],
            "postgresql": ["the server asks for a retry (SQLSTATE 40001)"],
        }[self.backend.kind]

    def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
        if retry_after is not None:
            raise PeerCannot(f"{self.name} has no way to say Retry-After")
        self.deliver()
        if self.backend.kind == "postgresql":
            self._pg_trigger("40001", "could not serialize access (the test)")
        else:
            self._hold(None)

    def slow(self, seconds: float) -> None:
        self.deliver()
        self._hold(seconds)

    def _hold(self, seconds: float | None) -> None:
        acquire = {
            "sqlite": self._sqlite_lock,
            "duckdb": self._duckdb_process,
            "postgresql": self._pg_lock,
        }[self.backend.kind]
        hold = _Hold(acquire, seconds)
        self._undo.append(hold.release)

    def _sqlite_lock(self) -> Callable[[], None]:
        import sqlite3

        conn = sqlite3.connect(self.backend.url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")

        def release() -> None:
            conn.execute("ROLLBACK")
            conn.close()

        return release

    def _duckdb_process(self) -> Callable[[], None]:
        path = self.backend.url.removeprefix("duckdb:///")
        code = (
            f"import duckdb, sys; c = duckdb.connect({path!r}); print('held', flush=True); "
            "sys.stdin.read()"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

        def release() -> None:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(60)

        return release

    def _pg_lock(self) -> Callable[[], None]:
        import sqlalchemy as sa

        engine = self.backend.engine()
        conn = engine.connect()
        conn.execute(sa.text(f"LOCK TABLE {self.backend.table} IN ACCESS EXCLUSIVE MODE"))

        def release() -> None:
            conn.rollback()
            conn.close()
            engine.dispose()

        return release


def sql_peer(kind: str, make_backend: Any, tmp_path: Path) -> SqlPeer:
    backend = make_backend(kind)
    if kind == "postgresql":
        from sqlalchemy.engine import make_url

        url = make_url(backend.url)
        down = url.set(port=free_port()).render_as_string(hide_password=False)
        return SqlPeer(backend, down, [str(url.password)])
    # A file in a directory that does not exist: the database cannot be opened.
    missing = tmp_path / "missing-dir" / uuid.uuid4().hex / "x.db"
    return SqlPeer(backend, f"{kind}:///{missing}", [])


class SnowflakePeer(_TablePeer):
    """fakesnow's server as a :class:`~waypost.testing.Peer`, behind a proxy of the peer's own
    (a recording server that forwards each request): it refuses by renaming the table away,
    fails retryably with the proxy's 503, answers slowly by holding fakesnow's answers, and
    redirects to a recording server on 127.0.0.2."""

    def __init__(self, db: SnowflakeDb) -> None:
        super().__init__(db, "fakesnow")
        self.proxy = RecordingServer(self._forward).start()
        self._elsewhere: RecordingServer | None = None

    def config(self) -> dict[str, Any]:
        return self.db.config(host=self.proxy.url)

    def unreachable_config(self) -> dict[str, Any]:
        return self.db.config(host=f"http://127.0.0.1:{free_port()}")

    def deliver(self) -> None:
        super().deliver()
        self.proxy.responder = self._forward

    def retryable_failures(self) -> list[str]:
        return ["HTTP 503"]

    def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
        self.deliver()
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        self.proxy.responder = lambda request: Response(503, "busy", headers=headers)

    def slow(self, seconds: float) -> None:
        self.deliver()
        forward = self._forward
        self.proxy.responder = lambda request: dataclasses.replace(forward(request), delay=seconds)

    def redirect(self, status: int) -> None:
        self.deliver()
        if self._elsewhere is None:
            self._elsewhere = RecordingServer(host="127.0.0.2").start()
        target = self._elsewhere.url

        def answer(request: Request) -> Response:
            query = urllib.parse.urlencode(request.query, doseq=True)
            location = f"{target}{request.path}{'?' + query if query else ''}"
            return Response(status, b"", headers={"Location": location})

        self.proxy.responder = answer

    def redirected(self) -> int:
        return len(self._elsewhere.requests) if self._elsewhere is not None else 0

    def _forward(self, request: Request) -> Response:
        """The request as it came (body still compressed), to fakesnow; its answer as it
        went (compressed the same way)."""
        query = urllib.parse.urlencode(request.query, doseq=True)
        url = f"{self.db.url}{request.path}{'?' + query if query else ''}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        forwarded = urllib.request.Request(
            url, data=request.raw or None, headers=headers, method=request.method
        )
        try:
            with urllib.request.urlopen(forwarded, timeout=60) as answer:
                status, body, got = answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as exc:
            status, body, got = exc.code, exc.read(), exc.headers
        kept = {k: v for k, v in got.items() if k.lower() not in _HOP_BY_HOP}
        return Response(status, body, headers=kept)

    def close(self) -> None:
        super().close()
        self.proxy.stop()
        if self._elsewhere is not None:
            self._elsewhere.stop()

    def secrets(self) -> list[str]:
        return [self.db.password]

    def permanent_failures(self) -> list[str]:
        return ["the table is gone"]

    def refuse(self, failure: str) -> None:
        self.deliver()
        self._rename_table_away()
