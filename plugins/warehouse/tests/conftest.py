"""Real peers for the warehouse sinks: a throwaway PostgreSQL cluster on 127.0.0.1, DuckDB and
SQLite files, and fakesnow's Snowflake server (the real connector talks HTTP to it).

PostgreSQL is skipped with a reason when it is not installed, unless WAYPOST_REQUIRE_SERVERS=1
(as in CI), where a missing server fails the tests instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from waypost.testing import free_port

sys.path.insert(0, str(Path(__file__).parent))  # warehouse_peers, for the test modules

from warehouse_peers import SQL_KINDS

PG_USER = "waypost"
PG_PASSWORD = "pg-Secret-4711"  # must never show up in a repr or a log line
SNOWFLAKE_PASSWORD = "sf-Secret-0815"


def _server_missing(reason: str) -> None:
    if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (WAYPOST_REQUIRE_SERVERS=1 forbids skipping)")
    pytest.skip(reason)


def _need(module: str) -> None:
    """Skip (or fail, under WAYPOST_REQUIRE_SERVERS=1) when a driver of the test group is absent."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        _server_missing(f"{module} is not installed (it is in the test dependency group)")


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    # Debian and Ubuntu keep them off PATH, one directory per major version.
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    return candidates[0].parent if candidates else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster made for this test session in a temp dir, listening on 127.0.0.1
    (and a socket in the temp dir), password-protected; removed afterwards."""
    _need("psycopg")
    bindir = _pg_bindir()
    if bindir is None:
        _server_missing("PostgreSQL is not installed (no initdb): apt-get install postgresql")
    assert bindir is not None
    base = Path(tempfile.mkdtemp(prefix="waypost-pg-"))
    data, sockets, pwfile = base / "data", base / "sock", base / "pw"
    sockets.mkdir()
    pwfile.write_text(PG_PASSWORD + "\n")
    prefix: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the server programs as the postgres user.
        if shutil.which("runuser") is None or _uid("postgres") is None:
            _server_missing("running as root without a postgres user to run PostgreSQL as")
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        for path in (sockets, pwfile):
            shutil.chown(path, "postgres")
    port = free_port()

    def run(*args: str) -> None:
        done = subprocess.run(
            [*prefix, *args], check=False, capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}\n{done.stderr}")

    run(
        str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile),
        "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-locale",
    )  # fmt: skip
    options = f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c full_page_writes=off"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w",
        "start")  # fmt: skip
    try:
        yield f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        try:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _uid(user: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


@pytest.fixture(scope="session")
def fakesnow_url() -> Iterator[str]:
    """fakesnow's HTTP server on 127.0.0.1: the real connector logs in and queries through it."""
    fakesnow = pytest.importorskip("fakesnow", reason="fakesnow needs Python 3.11+")
    # fakesnow's server() imports its submodule ``fakesnow.server``, which then takes the
    # function's place on the package: a second session fixture (the collector's tests load
    # these fixtures too) takes the function from where the first call left it.
    start = vars(fakesnow).setdefault("_server_function", fakesnow.server)
    with start() as kwargs:
        yield f"http://{kwargs['host']}:{kwargs['port']}"


# --- backends of the sql sink ---------------------------------------------------------------


@dataclass
class Backend:
    """One database the ``sql`` sink writes to, and a way for tests to read it back."""

    kind: str
    url: str
    table: str = field(default_factory=lambda: f"events_{uuid.uuid4().hex[:10]}")

    def config(self, **overrides: Any) -> dict[str, Any]:
        return {"url": self.url, "table": self.table, "create_table": True, **overrides}

    def engine(self) -> Any:
        import sqlalchemy as sa

        url = self.url.replace("postgresql://", "postgresql+psycopg://", 1)
        options: dict[str, Any] = {}
        if self.kind == "duckdb":
            options["poolclass"] = sa.pool.NullPool
        return sa.create_engine(url, **options)

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        import sqlalchemy as sa

        engine = self.engine()
        try:
            with engine.begin() as conn:
                result = conn.execute(sa.text(sql), params)
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            engine.dispose()

    def rows(self) -> list[dict[str, Any]]:
        """Every stored row, JSON columns decoded (compared by value, not by text)."""
        out = []
        for row in self.query(
            f"SELECT id, name, timestamp, instance_id, properties, context, received_at "
            f"FROM {self.table}"
        ):
            record = dict(zip(("id", "name", "timestamp", "instance_id", "properties",
                               "context", "received_at"), row, strict=True))  # fmt: skip
            for key in ("properties", "context"):
                if isinstance(record[key], str):
                    record[key] = json.loads(record[key])
            record["id"] = str(record["id"])
            out.append(record)
        return out

    def column_types(self) -> dict[str, str]:
        if self.kind == "sqlite":
            return {r[1]: str(r[2]).upper() for r in self.query(f"PRAGMA table_info({self.table})")}
        return {
            str(r[0]): str(r[1]).upper()
            for r in self.query(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = :t",
                t=self.table,
            )
        }


@pytest.fixture
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """``make_backend(kind)``: a SQLite file, a DuckDB file or the PostgreSQL cluster."""

    def make(kind: str) -> Backend:
        if kind == "sqlite":
            return Backend(kind, f"sqlite:///{tmp_path / 'events.db'}")
        if kind == "duckdb":
            _need("duckdb_engine")
            return Backend(kind, f"duckdb:///{tmp_path / 'events.duckdb'}")
        return Backend(kind, request.getfixturevalue("postgres_url"))

    return make


@pytest.fixture(params=SQL_KINDS)
def backend(request: pytest.FixtureRequest, make_backend: Any) -> Backend:
    """Each database of the ``sql`` sink in turn: a SQLite file, a DuckDB file, PostgreSQL."""
    return make_backend(request.param)  # type: ignore[no-any-return]


# --- Snowflake (fakesnow) ---------------------------------------------------------------------


@dataclass
class SnowflakeDb:
    """A database of its own on the fakesnow server, and the real connector to read it."""

    url: str
    database: str = field(default_factory=lambda: f"db_{uuid.uuid4().hex[:10]}")
    schema: str = "events"
    table: str = "waypost_events"
    password: str = SNOWFLAKE_PASSWORD

    def config(self, **overrides: Any) -> dict[str, Any]:
        return {
            "account": "fakesnow", "user": "fake", "password": self.password, "host": self.url,
            "database": self.database, "schema": self.schema, "table": self.table,
            "create_table": True, **overrides,
        }  # fmt: skip

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import urllib.parse

        import snowflake.connector

        parsed = urllib.parse.urlsplit(self.url)
        conn = snowflake.connector.connect(
            account="fakesnow", user="fake", password="x", host=parsed.hostname,
            port=parsed.port, protocol="http", database=self.database, schema=self.schema,
            network_timeout=5,
        )  # fmt: skip
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
        finally:
            conn.close()

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for row in self.query(
            "SELECT id, name, timestamp, instance_id, properties, context, received_at "
            f"FROM {self.table}"
        ):
            record = dict(zip(("id", "name", "timestamp", "instance_id", "properties",
                               "context", "received_at"), row, strict=True))  # fmt: skip
            for key in ("properties", "context"):
                if isinstance(record[key], str):  # VARIANT comes back as JSON text
                    record[key] = json.loads(record[key])
            out.append(record)
        return out


@pytest.fixture
def snowflake_db(fakesnow_url: str) -> SnowflakeDb:
    return SnowflakeDb(fakesnow_url)
