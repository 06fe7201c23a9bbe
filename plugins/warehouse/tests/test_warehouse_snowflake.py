"""The ``snowflake`` sink through the real connector, against fakesnow's server on loopback.

fakesnow is more lenient than Snowflake, so the statements checked here are the forms Snowflake
accepts (PARSE_JSON in the SELECT list over ``FROM VALUES``, never inside ``VALUES``), and JSON is
compared by value.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from waypost.errors import ConfigError
from waypost.sinks import SinkContext
from waypost.testing import delivery_imports, make_event, make_events, send_batch
from waypost_warehouse import COLUMNS, SnowflakeConfig, SnowflakeSink

pytest.importorskip("fakesnow", reason="fakesnow needs Python 3.11+")

SnowflakeDb = Any  # conftest.SnowflakeDb, handed out by the ``snowflake_db`` fixture


def make_sink(tmp_path: Path, **config: Any) -> SnowflakeSink:
    context = SinkContext(
        app="testapp", version="1.0.0", instance_id="5db51f99-c6fb-4340-9c19-78adce58cc1b",
        data_dir=tmp_path, strict=True,
    )  # fmt: skip
    return SnowflakeSink("warehouse", SnowflakeConfig.model_validate(config), context)


def opened(tmp_path: Path, **config: Any) -> SnowflakeSink:
    sink = make_sink(tmp_path, **config)
    sink.open()
    return sink


def test_a_retried_burst_stores_every_event_once(snowflake_db: SnowflakeDb, tmp_path: Path) -> None:
    sink = opened(tmp_path, **snowflake_db.config())
    try:
        events = make_events(450)
        for start in range(0, 450, 150):
            result = send_batch(sink, events[start : start + 150])
            assert not result.retry and not result.failed, result
        assert send_batch(sink, events[:150]).failed == {}
        late = make_events(5, name="late")
        again = send_batch(sink, events[100:300] + late)
        assert not again.retry and not again.failed
    finally:
        sink.close()
    ids = [r[0] for r in snowflake_db.query("SELECT id FROM waypost_events")]
    assert sorted(ids) == sorted(e.id for e in events + late)


def test_columns_hold_the_envelope_with_json_by_value(
    snowflake_db: SnowflakeDb, tmp_path: Path
) -> None:
    properties = {
        "runSeconds": 45,
        "ratio": 0.25,
        "ok": True,
        "missing": None,
        "tags": ["a", {"deep": [1, 2]}],
        "text": "Grüße 東京 'single' \"double\" %s %(x)s \\ back",
    }
    event = make_event("run", properties, time_=1_750_000_000.123)
    sink = opened(tmp_path, **snowflake_db.config())
    try:
        assert send_batch(sink, [event]).failed == {}
    finally:
        sink.close()
    (row,) = snowflake_db.rows()
    assert row["id"] == event.id and row["name"] == "run"
    assert row["instance_id"] == event.instance_id
    assert row["properties"] == properties
    assert row["context"] == event.context
    assert isinstance(row["timestamp"], dt.datetime) and row["timestamp"].tzinfo is not None
    assert abs(row["timestamp"].timestamp() - event.time) < 1e-3
    assert row["received_at"] is not None
    types = {
        str(r[0]).lower(): str(r[1]).upper()
        for r in snowflake_db.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'WAYPOST_EVENTS'"
        )
    }
    assert set(types) == set(COLUMNS)
    assert types["properties"] == types["context"] == "VARIANT"
    assert types["timestamp"] == types["received_at"] == "TIMESTAMP_TZ"


def test_statements_use_forms_snowflake_accepts(snowflake_db: SnowflakeDb, tmp_path: Path) -> None:
    sink = make_sink(tmp_path, **snowflake_db.config())
    (statement,) = sink.render(make_events(3))
    sql = statement["sql"]
    source, _, rest = sql.partition(" FROM VALUES ")
    values = rest[: rest.index(")) AS s") + 1]
    # PARSE_JSON runs over the VALUES rows, never inside them.
    assert "PARSE_JSON(column6)" in source and "PARSE_JSON(column7)" in source
    assert "PARSE_JSON" not in values
    assert values.count("(%s, %s, %s, %s, %s, %s, %s)") == 3
    assert sql.startswith("MERGE INTO events.waypost_events AS t USING (SELECT ")
    assert "ON t.id = s.id WHEN NOT MATCHED THEN INSERT" in sql
    assert len(statement["params"]) == 21


def test_large_batches_are_chunked(
    snowflake_db: SnowflakeDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from waypost_warehouse import snowflake as module

    monkeypatch.setattr(module, "CHUNK_ROWS", 7)
    monkeypatch.setattr(module, "CHUNK_CHARS", 4000)
    events = [make_event("big", {"pad": "x" * 900, "i": i}) for i in range(30)]
    sink = opened(tmp_path, **snowflake_db.config())
    try:
        statements = sink.render(events)
        assert len(statements) > 30 // 7
        assert all(len(s["params"]) // 7 <= 7 for s in statements)
        assert all(len(s["sql"]) + sum(len(str(p)) for p in s["params"]) < 4000 + 2000
                   for s in statements)  # fmt: skip
        assert send_batch(sink, events).failed == {}
    finally:
        sink.close()
    assert len(snowflake_db.rows()) == 30


def test_missing_table_is_a_clear_open_error(snowflake_db: SnowflakeDb, tmp_path: Path) -> None:
    snowflake_db.query("SELECT 1")  # creates the database and schema on the server
    sink = make_sink(tmp_path, **snowflake_db.config(create_table=False))
    with pytest.raises(ConfigError) as raised:
        sink.open()
    assert "events.waypost_events does not exist" in str(raised.value)
    assert "create_table: true" in str(raised.value)
    sink.close()


def test_missing_columns_are_named(snowflake_db: SnowflakeDb, tmp_path: Path) -> None:
    snowflake_db.query("CREATE TABLE waypost_events (id VARCHAR, name VARCHAR, context VARIANT)")
    sink = make_sink(tmp_path, **snowflake_db.config(create_table=False))
    with pytest.raises(ConfigError) as raised:
        sink.open()
    assert (
        "table events.waypost_events lacks the columns timestamp, instance_id, distinct_id, "
        "properties, received_at:" in str(raised.value)
    )
    sink.close()


def test_the_session_is_reused_and_reopened(snowflake_db: SnowflakeDb, tmp_path: Path) -> None:
    import fakesnow.server as fakesnow_server

    sink = opened(tmp_path, **snowflake_db.config())
    try:
        assert send_batch(sink, make_events(2)).failed == {}
        first = sink._conn
        assert send_batch(sink, make_events(2)).failed == {}
        assert sink._conn is first  # one login for many batches
        assert first is not None
        # The server forgets every session (a restart, an expiry): that batch is retried ...
        fakesnow_server.sessions.clear()
        lost = make_events(2)
        result = send_batch(sink, lost)
        assert set(result.retry) == {e.id for e in lost} and not result.failed, result
        # ... and the next one logs in afresh.
        assert send_batch(sink, lost).failed == {}
        assert sink._conn is not first
    finally:
        sink.close()
    assert len(snowflake_db.rows()) == 6


@pytest.mark.parametrize(
    ("errno", "sqlstate", "retryable"),
    [
        (606, "57P03", True),  # no active warehouse: suspended, or resuming
        (390114, "08001", True),  # session token expired
        (2003, "42S02", False),  # object does not exist
        (1003, "42000", False),  # syntax error
        (100069, "22P02", False),  # error parsing JSON
        (390100, "08004", False),  # incorrect username or password
    ],
)
def test_error_classification(tmp_path: Path, errno: int, sqlstate: str, retryable: bool) -> None:
    from snowflake.connector import errors

    sink = make_sink(tmp_path, account="acme", user="u", password="pw-123456")
    exc = errors.ProgrammingError(
        msg="Error parsing JSON: unknown keyword 'secret-value', pos 7", errno=errno,
        sqlstate=sqlstate, query="MERGE ... 'secret-value' ...",
    )  # fmt: skip
    error = sink._classify("merge into waypost_events", exc)
    assert error.retryable is retryable
    assert "secret-value" not in error.reason or retryable
    assert f"{errno:06d}" in error.reason


def test_config_needs_one_way_to_log_in(tmp_path: Path) -> None:
    base = {"account": "acme", "user": "u"}
    with pytest.raises(ValueError, match="no way to log in"):
        SnowflakeConfig.model_validate(base)
    with pytest.raises(ValueError, match="either password or private_key_file"):
        SnowflakeConfig.model_validate({**base, "password": "p", "private_key_file": "k.p8"})
    with pytest.raises(ValueError, match="only used with private_key_file"):
        SnowflakeConfig.model_validate({**base, "password": "p", "private_key_passphrase": "x"})
    with pytest.raises(ValueError, match="plain Snowflake identifier"):
        SnowflakeConfig.model_validate({**base, "password": "p", "table": "t; drop"})
    key = SnowflakeConfig.model_validate(
        {**base, "private_key_file": "k.p8", "private_key_passphrase": "pass-phrase-1"}
    )
    assert "pass-phrase-1" not in repr(key)
    browser = SnowflakeConfig.model_validate({**base, "authenticator": "externalbrowser"})
    assert browser.authenticator == "externalbrowser"
    with pytest.raises(ValueError, match="plain http"):
        SnowflakeConfig.model_validate(
            {**base, "password": "p", "host": "http://snowflake.example.com"}
        )


def test_reasons_do_not_repeat_values(snowflake_db: SnowflakeDb, tmp_path: Path) -> None:
    # A table whose id is a number: the MERGE fails on the value, which must not be echoed.
    snowflake_db.query(
        "CREATE TABLE waypost_events (id NUMBER, name VARCHAR, timestamp TIMESTAMP_TZ, "
        "instance_id VARCHAR, properties VARIANT, context VARIANT, received_at TIMESTAMP_TZ)"
    )
    sink = opened(tmp_path, **snowflake_db.config(create_table=False))
    try:
        event = make_event("e", {"v": 1})
        result = send_batch(sink, [event])
        reason = result.failed[event.id]
        assert reason.startswith("merge into events.waypost_events failed: ")
        assert event.id not in reason
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-7", reason)
    finally:
        sink.close()


def test_distinct_id_is_stored_and_added_to_an_older_table(
    snowflake_db: SnowflakeDb, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The layout before distinct_id, as the README's DDL had it.
    snowflake_db.query(
        "CREATE TABLE waypost_events (id VARCHAR(36) NOT NULL PRIMARY KEY, name VARCHAR NOT NULL,"
        " timestamp TIMESTAMP_TZ NOT NULL, instance_id VARCHAR NOT NULL, properties VARIANT,"
        " context VARIANT, received_at TIMESTAMP_TZ DEFAULT CURRENT_TIMESTAMP())"
    )
    caplog.set_level(logging.WARNING, logger="waypost.sinks")
    unaltered = opened(tmp_path, **snowflake_db.config(create_table=False))
    try:
        assert send_batch(unaltered, make_events(1, distinct_id="user-old")).failed == {}
    finally:
        unaltered.close()
    assert "ADD COLUMN distinct_id" in caplog.text and "create_table is off" in caplog.text
    sink = opened(tmp_path, **snowflake_db.config(create_table=True))
    try:
        events = [*make_events(2, distinct_id="user-a"), *make_events(1, distinct_id="user-b")]
        assert send_batch(sink, events).failed == {}
    finally:
        sink.close()
    counts = snowflake_db.query(
        "SELECT distinct_id, COUNT(*) FROM waypost_events GROUP BY distinct_id"
    )
    assert sorted(((who, int(n)) for who, n in counts), key=lambda r: str(r[0])) == [
        (None, 1), ("user-a", 2), ("user-b", 1)
    ]  # fmt: skip


def test_open_and_send_import_nothing(snowflake_db: SnowflakeDb, tmp_path: Path) -> None:
    """``open()``, ``send()`` and ``close()`` run on delivery threads, where an import that a
    ``fork()`` cuts across leaves its lock held in the child: the connector is imported when the
    sink is built (``open()`` imported it before)."""
    imported = delivery_imports("snowflake", snowflake_db.config(), tmp_path, events=3)
    assert imported == [], " ".join(imported)
    assert len(snowflake_db.rows()) == 3
