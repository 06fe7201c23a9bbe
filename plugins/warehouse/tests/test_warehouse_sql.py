"""The ``sql`` sink against real databases: SQLite and DuckDB files, and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from waypost.errors import ConfigError
from waypost.events import Event
from waypost.sinks import SinkContext
from waypost.testing import delivery_imports, make_event, make_events, send_batch
from waypost_warehouse import COLUMNS, SqlConfig, SqlSink
from waypost_warehouse.sql import _row

Backend = Any  # conftest.Backend, handed out by the ``backend`` fixture


def password_of(url: str) -> str:
    from sqlalchemy.engine import make_url

    password = make_url(url).password
    assert password
    return str(password)


def make_sink(tmp_path: Path, **config: Any) -> SqlSink:
    context = SinkContext(
        app="testapp", version="1.0.0", instance_id="5db51f99-c6fb-4340-9c19-78adce58cc1b",
        data_dir=tmp_path, strict=True,
    )  # fmt: skip
    return SqlSink("warehouse", SqlConfig.model_validate(config), context)


def opened(tmp_path: Path, **config: Any) -> SqlSink:
    sink = make_sink(tmp_path, **config)
    sink.open()
    return sink


def test_a_retried_burst_stores_every_event_once(backend: Backend, tmp_path: Path) -> None:
    sink = opened(tmp_path, **backend.config())
    try:
        events = make_events(600)
        for start in range(0, 600, 200):
            result = send_batch(sink, events[start : start + 200])
            assert not result.retry and not result.failed, result
        # The core retries a batch whose answer it never saw; and batches overlap after a crash.
        assert send_batch(sink, events[:200]).failed == {}
        late = make_events(10, name="late")
        overlap = send_batch(sink, events[150:450] + late)
        assert not overlap.retry and not overlap.failed
    finally:
        sink.close()
    ids = [r["id"] for r in backend.rows()]
    assert sorted(ids) == sorted(e.id for e in events + late)


def test_columns_hold_the_envelope_with_json_by_value(backend: Backend, tmp_path: Path) -> None:
    properties = {
        "runSeconds": 45,
        "ratio": 0.25,
        "ok": True,
        "missing": None,
        "tags": ["a", "b", {"deep": [1, 2, 3]}],
        "text": "Grüße, 東京 \"quoted\" 'single' \\ back",
    }
    event = make_event("run", properties, time_=1_750_000_000.123)
    sink = opened(tmp_path, **backend.config())
    try:
        before = dt.datetime.now(dt.timezone.utc)
        assert send_batch(sink, [event]).failed == {}
    finally:
        sink.close()
    (row,) = backend.rows()
    assert row["id"] == event.id
    assert row["name"] == "run"
    assert row["instance_id"] == event.instance_id
    assert backend.query(f"SELECT distinct_id FROM {backend.table}") == [(event.instance_id,)]
    assert row["properties"] == properties
    assert row["context"] == event.context
    stamp = row["timestamp"]
    if isinstance(stamp, str):  # SQLite keeps UTC text
        stamp = dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.timezone.utc)
    assert stamp.tzinfo is not None
    assert abs(stamp.timestamp() - event.time) < 1e-3
    received = row["received_at"]
    if isinstance(received, str):
        received = dt.datetime.fromisoformat(received).replace(tzinfo=dt.timezone.utc)
    assert received >= before - dt.timedelta(seconds=1)

    types = backend.column_types()
    assert set(types) == set(COLUMNS)
    expected = {
        "postgresql": {"id": "UUID", "timestamp": "TIMESTAMP WITH TIME ZONE", "context": "JSONB"},
        "duckdb": {"id": "UUID", "timestamp": "TIMESTAMP WITH TIME ZONE", "context": "JSON"},
        "sqlite": {"id": "VARCHAR(36)", "timestamp": "DATETIME", "context": "JSON"},
    }[backend.kind]
    for column, type_ in expected.items():
        assert types[column] == type_, (column, types)
    assert types["context"] == types["properties"]


def test_missing_table_is_a_clear_open_error(backend: Backend, tmp_path: Path) -> None:
    sink = make_sink(tmp_path, **backend.config(create_table=False))
    with pytest.raises(ConfigError) as raised:
        sink.open()
    message = str(raised.value)
    assert backend.table in message and "does not exist" in message
    assert "create_table: true" in message
    sink.close()


def test_missing_columns_are_named(backend: Backend, tmp_path: Path) -> None:
    backend.query(
        f"CREATE TABLE {backend.table} (id VARCHAR(36) PRIMARY KEY, name VARCHAR(255), "
        "properties VARCHAR(100))"
    )
    sink = make_sink(tmp_path, **backend.config(create_table=False))
    with pytest.raises(ConfigError) as raised:
        sink.open()
    message = str(raised.value)
    assert f"table {backend.table} lacks the columns " in message
    assert "timestamp, instance_id, distinct_id, context, received_at:" in message
    sink.close()
    # create_table does not alter an existing table: the check still names what is missing.
    with pytest.raises(ConfigError, match="lacks the columns timestamp, instance_id"):
        opened(tmp_path, **backend.config(create_table=True))


def test_create_table_then_an_existing_table_is_accepted(backend: Backend, tmp_path: Path) -> None:
    first = opened(tmp_path, **backend.config(create_table=True))
    assert send_batch(first, make_events(3)).failed == {}
    first.close()
    second = opened(tmp_path, **backend.config(create_table=False))
    assert send_batch(second, make_events(2)).failed == {}
    second.close()
    assert len(backend.rows()) == 5


def test_a_dropped_table_is_a_permanent_sql_error(backend: Backend, tmp_path: Path) -> None:
    secret_value = "prop-value-never-in-reasons"
    sink = opened(tmp_path, **backend.config())
    try:
        backend.query(f"DROP TABLE {backend.table}")
        events = [make_event("e", {"v": secret_value}) for _ in range(3)]
        result = send_batch(sink, events)
        assert set(result.failed) == {e.id for e in events}
        assert not result.retry
        reason = next(iter(result.failed.values()))
        assert reason.startswith(f"insert into {backend.table} failed: ")
        assert backend.table in reason
        assert secret_value not in reason
    finally:
        sink.close()


@pytest.mark.parametrize(
    "backend", ["duckdb", pytest.param("postgresql", marks=pytest.mark.server)], indirect=True
)
def test_a_value_quoted_in_a_database_error_is_not_repeated(
    backend: Backend, tmp_path: Path
) -> None:
    # These databases store the id as UUID: a malformed id makes the database quote it back.
    sink = opened(tmp_path, **backend.config())
    try:
        bad = Event(id="not-a-uuid-private-4711", name="x", time=1.0, instance_id="i",
                    properties={}, context={})  # fmt: skip
        result = send_batch(sink, [bad])
        reason = result.failed[bad.id]
        assert "not-a-uuid-private-4711" not in reason
        assert "…" in reason
    finally:
        sink.close()


def test_relative_file_paths_live_in_the_data_dir(tmp_path: Path) -> None:
    sink = opened(tmp_path, url="sqlite:///sub/events.db", create_table=True)
    assert send_batch(sink, make_events(2)).failed == {}
    sink.close()
    assert (tmp_path / "sub" / "events.db").exists()


def test_sqlite_rows_are_what_sqlalchemy_itself_would_write(tmp_path: Path) -> None:
    """SQLite is written through the DB-API with values made by the sink: the text in each
    column is the text SQLAlchemy's own types bind (readers and the collector's dashboard
    parse it), a context several events share included."""
    import sqlalchemy as sa
    from sqlalchemy.dialects.sqlite import insert

    from waypost.events import dumps
    from waypost_warehouse.sql import _table

    shared = {"app": {"name": "testapp", "version": "1.0.0"}, "os": {"type": "Linux"}}
    # Microseconds rounded half to even, one of them up into the next second.
    times = [1_750_000_000.0000005 + i / 7 for i in range(4)] + [1_750_000_000.9999996]
    events = [
        Event(e.id, e.name, t, e.instance_id, e.properties, shared, e.distinct_id)
        for t, e in zip(times, make_events(5), strict=True)
    ]
    sink = opened(tmp_path, url="sqlite:///events.db", create_table=True)
    try:
        assert send_batch(sink, events).failed == {}
    finally:
        sink.close()
    now = dt.datetime(2026, 12, 2, 5, 6, 7, 890, tzinfo=dt.timezone.utc)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'events.db'}", json_serializer=dumps)
    reference = _table("reference", None)
    with engine.begin() as conn:
        reference.create(conn)
        conn.execute(insert(reference), [_row(e, now) for e in events])
    engine.dispose()
    db = sqlite3.connect(tmp_path / "events.db")
    try:
        columns = "id, name, timestamp, instance_id, distinct_id, properties, context"
        ours = db.execute(f"SELECT {columns} FROM waypost_events ORDER BY id").fetchall()
        theirs = db.execute(f"SELECT {columns} FROM reference ORDER BY id").fetchall()
        received = [r[0] for r in db.execute("SELECT received_at FROM waypost_events")]
        made = db.execute("SELECT received_at FROM reference").fetchone()[0]
    finally:
        db.close()
    assert ours == theirs and len(ours) == 5
    assert made == "2026-12-02 05:06:07.000890"
    assert all(len(r) == len(made) and r.startswith("20") and r[10] == " " for r in received)


@pytest.mark.server
def test_postgresql_url_without_driver_uses_psycopg(postgres_url: str, tmp_path: Path) -> None:
    sink = opened(tmp_path, url=postgres_url, table="driverless", create_table=True)
    try:
        assert "postgresql+psycopg://waypost:***@127.0.0.1" in repr(sink)
        assert password_of(postgres_url) not in repr(sink)
        assert send_batch(sink, make_events(1)).failed == {}
    finally:
        sink.close()


@pytest.mark.server
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_one_connection_reused_and_reopened_after_failure(backend: Backend, tmp_path: Path) -> None:
    def sessions() -> set[int]:
        rows = backend.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'waypost' "
            "AND pid <> pg_backend_pid()"
        )
        return {int(r[0]) for r in rows}

    earlier = sessions()  # other tests' sessions may still be on their way out
    sink = opened(tmp_path, **backend.config())
    try:
        for _ in range(5):
            assert send_batch(sink, make_events(10)).failed == {}
        first = sessions() - earlier
        assert len(first) == 1
        # The server drops the session (a restart, a failover, an idle timeout ...).
        backend.query("SELECT pg_terminate_backend(:pid)", pid=next(iter(first)))
        result = send_batch(sink, make_events(10))
        assert not result.failed and not result.retry, result
        assert len(sessions() - earlier - first) == 1
    finally:
        sink.close()
    assert len(backend.rows()) == 60


@pytest.mark.server
def test_refused_password_is_a_clear_open_error(postgres_url: str, tmp_path: Path) -> None:
    wrong = postgres_url.replace(password_of(postgres_url), "not-the-password")
    sink = make_sink(tmp_path, url=wrong, create_table=True)
    with pytest.raises(ConfigError) as raised:
        sink.open()
    assert "password authentication failed" in str(raised.value)
    assert "not-the-password" not in str(raised.value)
    sink.close()


def test_a_locked_sqlite_file_is_retryable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    sink = opened(tmp_path, url=f"sqlite:///{path}", create_table=True, timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        events = make_events(3)
        result = send_batch(sink, events)
        assert set(result.retry) == {e.id for e in events}, result
        assert "locked" in next(iter(result.retry.values()))
        holder.execute("ROLLBACK")
        assert send_batch(sink, events).retry == {}
    finally:
        holder.close()
        sink.close()


def test_url_is_secret_in_config_and_masked_in_messages(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.engine import make_url

    from waypost_warehouse.sql import masked

    secret = password_of(postgres_url)
    caplog.set_level(logging.DEBUG)
    config = SqlConfig.model_validate({"url": postgres_url})
    assert secret not in repr(config) and secret not in str(config)
    assert secret not in config.model_dump_json()
    with pytest.raises(ValueError, match="SQLAlchemy URL"):
        SqlConfig.model_validate({"url": f"not a url {secret}"})
    assert masked(make_url(postgres_url)).startswith("postgresql://waypost:***@127.0.0.1:")
    assert secret not in masked(make_url(f"postgresql://u@h/db?password={secret}"))
    assert secret not in caplog.text


def test_render_shows_rows_without_sending(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, url=f"sqlite:///{tmp_path / 'never.db'}")
    rendered = sink.render(make_events(2))
    assert rendered["table"] == "waypost_events"
    assert [sorted(r) for r in rendered["rows"]] == [sorted(COLUMNS)] * 2
    assert not (tmp_path / "never.db").exists()


def test_missing_driver_names_the_extra(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, url="mysql+nosuchdriver://u:p@127.0.0.1/db")
    with pytest.raises(ConfigError, match="no driver for mysql"):
        sink.open()


def per_user(backend: Backend) -> list[tuple[Any, int]]:
    """Events per distinct id, as an analyst counts them in SQL."""
    rows = backend.query(f"SELECT distinct_id, COUNT(*) FROM {backend.table} GROUP BY distinct_id")
    return sorted(((who, int(n)) for who, n in rows), key=lambda r: str(r[0]))


def test_distinct_id_is_stored_so_users_can_be_counted(backend: Backend, tmp_path: Path) -> None:
    sink = opened(tmp_path, **backend.config())
    events = [
        *make_events(3, distinct_id="user-a"),
        *make_events(2, distinct_id="user-b"),
        *make_events(1),  # none set: the instance id, as every destination counts it
        *make_events(2, distinct_id="u" * 300),  # wider than the column: its digest
    ]
    try:
        assert send_batch(sink, events).failed == {}
    finally:
        sink.close()
    digest = "sha256:" + hashlib.sha256(b"u" * 300).hexdigest()
    assert per_user(backend) == [
        ("5db51f99-c6fb-4340-9c19-78adce58cc1b", 1), (digest, 2), ("user-a", 3), ("user-b", 2)
    ]  # fmt: skip


def table_before_distinct_id(backend: Backend, tmp_path: Path) -> str:
    """A table of the layout before distinct_id, holding one event: returns its id."""
    sink = opened(tmp_path, **backend.config())
    old = make_event("old")
    assert send_batch(sink, [old]).failed == {}
    sink.close()
    backend.query(f"ALTER TABLE {backend.table} DROP COLUMN distinct_id")
    assert "distinct_id" not in backend.column_types()
    return old.id


def test_create_table_adds_distinct_id_to_an_existing_table(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_id = table_before_distinct_id(backend, tmp_path)
    sink = opened(tmp_path, **backend.config(create_table=True))
    try:
        assert send_batch(sink, make_events(2, distinct_id="user-a")).failed == {}
    finally:
        sink.close()
    assert "distinct_id" in backend.column_types()
    assert per_user(backend) == [(None, 1), ("user-a", 2)]  # the old row has none
    assert len(backend.rows()) == 3 and old_id in {r["id"] for r in backend.rows()}
    assert "has no distinct_id" not in caplog.text
    # Opened again (another process, a restart): nothing left to add.
    again = opened(tmp_path, **backend.config(create_table=True))
    assert send_batch(again, make_events(1, distinct_id="user-b")).failed == {}
    again.close()
    # The migration note's backfill gives the old row the id it was counted by.
    backend.query(f"UPDATE {backend.table} SET distinct_id = instance_id WHERE distinct_id IS NULL")
    assert per_user(backend) == [
        ("5db51f99-c6fb-4340-9c19-78adce58cc1b", 1), ("user-a", 2), ("user-b", 1)
    ]  # fmt: skip


def test_without_create_table_an_old_table_is_written_without_distinct_id(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table_before_distinct_id(backend, tmp_path)
    caplog.set_level(logging.WARNING, logger="waypost.sinks")
    sink = opened(tmp_path, **backend.config(create_table=False))
    try:
        assert sink.render(make_events(1))["rows"][0].keys() == set(COLUMNS) - {"distinct_id"}
        assert send_batch(sink, make_events(2, distinct_id="user-a")).failed == {}
    finally:
        sink.close()
    assert "distinct_id" not in backend.column_types()  # never altered unasked
    assert len(backend.rows()) == 3
    (warning,) = [r.getMessage() for r in caplog.records if "has no distinct_id" in r.getMessage()]
    assert f"ALTER TABLE {backend.table} ADD COLUMN distinct_id VARCHAR(255)" in warning
    assert "create_table is off" in warning


def test_open_and_send_import_nothing(backend: Backend, tmp_path: Path) -> None:
    """``open()``, ``send()`` and ``close()`` run on delivery threads, where an import that a
    ``fork()`` cuts across leaves its lock held in the child: SQLAlchemy, the dialect and its
    driver are imported when the sink is built (``open()`` imported them before)."""
    assert delivery_imports("sql", backend.config(), tmp_path, events=3) == []
    assert len(backend.rows()) == 3
