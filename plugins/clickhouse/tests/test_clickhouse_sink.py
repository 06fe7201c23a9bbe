"""The clickhouse sink against the real embedded engine (chdb): rows as queried back, resends
counted once, the README's queries, table checks, errors and secrets."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from waypost_clickhouse import ClickHouseConfig, ClickHouseSink, TableLayoutError

from waypost.errors import ConfigError
from waypost.sinks import SinkContext
from waypost.testing import free_port, make_event, make_events, send_batch

MakeSink = Callable[..., ClickHouseSink]
README = Path(__file__).parents[1] / "README.md"


def _table(database: str) -> str:
    return f"{database}.waypost_events"


# --- what the table receives ----------------------------------------------------------------


def test_a_batch_becomes_rows(engine: Any, database: str, make_sink: MakeSink) -> None:
    sink = make_sink()
    sink.open()
    events = [
        make_event("signup", {"plan": "pro", "seats": 3}, distinct_id="user-7"),
        *make_events(4, name="run"),
    ]
    result = send_batch(sink, events)
    assert not result.retry and not result.failed, result
    rows = engine.query(
        "SELECT toString(id), name, timestamp, instance_id, distinct_id, properties, context, "
        f"received_at FROM {_table(database)} ORDER BY id"
    )
    assert sorted(r[0] for r in rows) == sorted(e.id for e in events)
    signup = next(r for r in rows if r[1] == "signup")
    event = events[0]
    stored = signup[2].replace(tzinfo=dt.timezone.utc).timestamp()
    assert stored == pytest.approx(event.time, abs=1e-3)
    assert signup[3] == event.instance_id and signup[4] == "user-7"
    assert json.loads(signup[5]) == {"plan": "pro", "seats": 3}
    assert json.loads(signup[6]) == event.context
    received = signup[7].replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - received).total_seconds()) < 600
    assert all(r[4] == r[3] for r in rows if r[1] == "run")  # no distinct id: the instance's


def test_the_table_is_a_replacing_merge_tree_keyed_on_the_id(
    engine: Any, database: str, make_sink: MakeSink
) -> None:
    make_sink().open()
    engine_name, sorting_key, partition_key = engine.query(
        "SELECT engine, sorting_key, partition_key FROM system.tables "
        f"WHERE database = '{database}' AND name = 'waypost_events'"
    )[0]
    assert engine_name == "ReplacingMergeTree"
    assert sorting_key == "name, toDate(timestamp), id"
    assert partition_key == "toYYYYMM(timestamp)"


def test_a_resent_batch_is_counted_once(engine: Any, database: str, make_sink: MakeSink) -> None:
    """The same batch again is dropped at insert (its token); a batch that overlaps an earlier
    one adds rows that ``FINAL`` and ``uniqExact(id)`` count once at once, and merges remove."""
    sink = make_sink()
    sink.open()
    events = make_events(50, name="run")
    for batch in (events, events, events[10:30], events[:5]):
        result = send_batch(sink, batch)
        assert not result.retry and not result.failed, result
    table = _table(database)
    assert engine.scalar(f"SELECT count() FROM {table} FINAL") == 50
    assert engine.scalar(f"SELECT uniqExact(id) FROM {table}") == 50
    assert engine.scalar(f"SELECT count() FROM {table}") == 75  # the identical resend: dropped
    engine.client.command(f"OPTIMIZE TABLE {table} FINAL")
    assert engine.scalar(f"SELECT count() FROM {table}") == 50


def test_the_readme_queries_answer(engine: Any, database: str, make_sink: MakeSink) -> None:
    """Every query in the README's "Querying" section runs and counts each event once, even
    with a batch sent twice and before any merge."""
    sink = make_sink()
    sink.open()
    runs = [
        make_event("run", {"flow": "a" if i % 2 else "b"}, distinct_id=f"u{i % 3}")
        for i in range(9)
    ]
    signups = [make_event("signup", {"plan": "pro"}, distinct_id="u9")]
    send_batch(sink, runs + signups)
    send_batch(sink, runs[:4])  # overlaps: four copies more, before any merge
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Querying") :]
    queries = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    results = {}
    for block in queries:
        for statement in (s.strip() for s in block.split(";")):
            body = "\n".join(
                line for line in statement.splitlines() if not line.strip().startswith("--")
            ).strip()
            if not body:
                continue
            first = statement.strip().splitlines()[0]
            label = first.removeprefix("--").strip() if first.startswith("--") else body
            results[label] = engine.query(body.replace("waypost_events", _table(database)))
    assert len(results) == 4, list(results)
    assert results["events per name, each counted once"] == [("run", 9), ("signup", 1)]
    assert results["distinct users per name"] == [("run", 3), ("signup", 1)]
    assert sorted(results["a property, from the JSON text"]) == [("a", 4), ("b", 5)]
    assert results["per day"][0][1:] == ("run", 9)


def test_properties_as_the_json_type(engine: Any, database: str, make_sink: MakeSink) -> None:
    sink = make_sink(properties_type="JSON")
    sink.open()
    event = make_event("signup", {"plan": "pro", "seats": 3, "meta": {"source": "cli"}})
    assert not send_batch(sink, [event]).failed
    table = _table(database)
    assert engine.query(
        f"SELECT properties.plan::String, properties.seats::Int64, properties.meta.source::String "
        f"FROM {table}"
    ) == [("pro", 3, "cli")]
    assert engine.scalar(
        f"SELECT type FROM system.columns WHERE database = '{database}' AND name = 'properties'"
    ).startswith("JSON")


# --- tables that exist already ------------------------------------------------------------


def _create(engine: Any, database: str, columns: str, engine_clause: str) -> None:
    engine.client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    engine.client.command(f"CREATE TABLE {_table(database)} ({columns}) ENGINE = {engine_clause}")


_FULL = (
    "id UUID, name String, timestamp DateTime64(3, 'UTC'), instance_id String, "
    "distinct_id String, properties String, context String, "
    "received_at DateTime64(3, 'UTC') DEFAULT now64(3)"
)


@pytest.mark.parametrize(
    ("columns", "engine_clause", "message"),
    [
        (
            _FULL.replace("distinct_id String, ", ""),
            "ReplacingMergeTree ORDER BY id",
            "lacks the column distinct_id: add it (ALTER TABLE",
        ),
        (_FULL, "MergeTree ORDER BY id", "has the engine MergeTree"),
        (_FULL, "ReplacingMergeTree ORDER BY (name, timestamp)", "without id"),
    ],
)
def test_a_table_that_would_lose_or_double_events_is_refused_at_open(
    engine: Any, database: str, make_sink: MakeSink, columns: str, engine_clause: str, message: str
) -> None:
    _create(engine, database, columns, engine_clause)
    sink = make_sink()
    with pytest.raises(TableLayoutError, match=re.escape(message)):
        sink.open()
    result = send_batch(sink, make_events(2))  # events wait for the fix, named in the reason
    cause = message.split(":", maxsplit=1)[0]
    assert result.retry and all(cause in r for r in result.retry.values())


def test_an_existing_table_of_the_right_shape_is_used(
    engine: Any, database: str, make_sink: MakeSink
) -> None:
    _create(engine, database, _FULL + ", extra UInt8 DEFAULT 7", "ReplacingMergeTree ORDER BY id")
    sink = make_sink(create_table=False)
    sink.open()
    assert not send_batch(sink, make_events(3)).failed
    assert engine.scalar(f"SELECT sum(extra) FROM {_table(database)}") == 21


def test_a_missing_table_without_create_table(database: str, make_sink: MakeSink) -> None:
    sink = make_sink(create_table=False)
    with pytest.raises(TableLayoutError, match="does not exist"):
        sink.open()


def test_a_table_dropped_under_the_sink_is_made_again(
    engine: Any, database: str, make_sink: MakeSink
) -> None:
    sink = make_sink()
    sink.open()
    assert not send_batch(sink, make_events(2)).retry
    engine.client.command(f"DROP TABLE {_table(database)}")
    events = make_events(3)
    first = send_batch(sink, events)
    assert set(first.retry) == {e.id for e in events}, first
    assert all("UNKNOWN_TABLE" in r for r in first.retry.values())
    again = send_batch(sink, events)  # the core's retry: the table is created first
    assert not again.retry and not again.failed, again
    assert engine.scalar(f"SELECT count() FROM {_table(database)}") == 3


# --- errors ---------------------------------------------------------------------------------


def test_an_error_no_retry_can_fix_is_permanent_with_its_name(
    make_sink: MakeSink,
) -> None:
    """A read-only session (the server refuses every write: like a user without INSERT)."""
    sink = make_sink()
    sink.open()
    readonly = make_sink(settings={"readonly": 1})
    readonly.open()
    events = make_events(3)
    result = send_batch(readonly, events)
    assert set(result.failed) == {e.id for e in events}, result
    assert all("READONLY" in r for r in result.failed.values())


def test_an_event_id_that_is_no_uuid_fails_alone(
    engine: Any, database: str, make_sink: MakeSink
) -> None:
    sink = make_sink()
    sink.open()
    events = make_events(3)
    events[1].id = "not-a-uuid"
    result = send_batch(sink, events)
    assert list(result.failed) == ["not-a-uuid"] and not result.retry
    assert engine.scalar(f"SELECT count() FROM {_table(database)}") == 2


def test_an_unreachable_server_is_retryable(tmp_path: Path) -> None:
    config = ClickHouseConfig(host="127.0.0.1", port=free_port(), timeout=2, password="pw-123456")
    context = SinkContext(app="testapp", version="1", instance_id="i", data_dir=tmp_path)
    sink = ClickHouseSink("down", config, context)
    try:
        sink.open()  # opens anyway: the batches are retried, not the configuration
        events = make_events(2)
        result = send_batch(sink, events)
        assert set(result.retry) == {e.id for e in events}, result
        where = f"ClickHouse at 127.0.0.1:{config.port}"
        assert all(r.startswith(where) for r in result.retry.values()), result
        assert not any("pw-123456" in r for r in result.retry.values())
    finally:
        sink.close()


# --- settings -------------------------------------------------------------------------------


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"plain HTTP to clickhouse\.example\.org"):
        ClickHouseConfig(host="clickhouse.example.org", secure=False)
    with pytest.raises(ValidationError, match="plain HTTP"):
        ClickHouseConfig(dsn="http://u:secret-pw@clickhouse.example.org:8123/db")
    with pytest.raises(ValidationError, match="either dsn or host"):
        ClickHouseConfig(dsn="https://h:8443", host="h")
    with pytest.raises(ValidationError, match="in-memory embedded engine"):
        ClickHouseConfig(dsn="chdb://memory")
    with pytest.raises(ValidationError, match="plain identifier"):
        ClickHouseConfig(table="events; DROP TABLE x")
    with pytest.raises(ValidationError) as info:
        ClickHouseConfig(dsn="ftp://u:very-secret-pw@h/db")
    assert "very-secret-pw" not in str(info.value)
    assert ClickHouseConfig(host="clickhouse.example.org", secure=False, allow_http=True)


def test_targets(tmp_path: Path) -> None:
    default = ClickHouseConfig().target(tmp_path)
    assert default.embedded and default.path == tmp_path / "clickhouse"
    relative = ClickHouseConfig(dsn="chdb://store/ch").target(tmp_path)
    assert relative.path == tmp_path / "store/ch"
    absolute = ClickHouseConfig(dsn="chdb:///var/lib/telemetry").target(tmp_path)
    assert absolute.path == Path("/var/lib/telemetry")
    cloud = ClickHouseConfig(host="abc.eu-west-1.aws.clickhouse.cloud", password="pw").target(
        tmp_path
    )
    assert (cloud.secure, cloud.port, cloud.username) == (True, 8443, None)
    assert cloud.database == "default"
    local = ClickHouseConfig(host="127.0.0.1").target(tmp_path)
    assert (local.secure, local.port) == (False, 8123)
    dsn = ClickHouseConfig(dsn="https://loader:p%40ss@ch.internal:9443/telemetry").target(tmp_path)
    assert (dsn.host, dsn.port, dsn.username, dsn.password, dsn.database) == (
        "ch.internal",
        9443,
        "loader",
        "p@ss",
        "telemetry",
    )
    assert dsn.label == "https://ch.internal:9443/telemetry"


@pytest.mark.parametrize(
    ("option", "secure"), [("secure=true", True), ("secure=Yes", True), ("secure=on", True),
                           ("secure=0", False), ("secure=no", False), ("", False)],
)  # fmt: skip
def test_the_dsn_secure_option_is_read_by_the_one_boolean_parser(
    tmp_path: Path, option: str, secure: bool
) -> None:
    target = ClickHouseConfig(dsn=f"clickhouse://127.0.0.1:9000/db?{option}").target(tmp_path)
    assert target.secure is secure


def test_per_batch_settings_cannot_be_set(tmp_path: Path) -> None:
    context = SinkContext(app="testapp", version="1", instance_id="i", data_dir=tmp_path)
    config = ClickHouseConfig(settings={"insert_deduplication_token": "x"})
    with pytest.raises(ConfigError, match="set per batch"):
        ClickHouseSink("x", config, context)


def test_render_shows_the_rows(make_sink: MakeSink, database: str) -> None:
    sink = make_sink()
    event = make_event("signup", {"plan": "pro"}, distinct_id="u-1")
    rendered = sink.render([event])
    assert rendered["table"] == _table(database)
    (row,) = rendered["rows"]
    assert row["id"] == event.id and row["distinct_id"] == "u-1"
    assert row["timestamp"] == event.iso_timestamp
    assert json.loads(row["properties"]) == {"plan": "pro"}


def test_close_is_clean(make_sink: MakeSink) -> None:
    never_opened = make_sink()
    never_opened.close()
    sink = make_sink()
    sink.open()
    send_batch(sink, make_events(1))
    sink.close()
    sink.close()
    assert not send_batch(sink, make_events(1)).retry  # connects again if used again


def test_the_embedded_engine_is_one_process_at_a_time(make_sink: MakeSink) -> None:
    """Another live process owns the engine: this one waits (retry); once that process is
    gone, this one takes the engine over."""
    import subprocess
    import sys

    sink = make_sink()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sink._engine_owner = other.pid
        events = make_events(2)
        result = send_batch(sink, events)
        assert all(f"belongs to process {other.pid}" in r for r in result.retry.values())
    finally:
        other.kill()
        other.wait()
    assert not send_batch(sink, events).retry


def test_secrets_stay_out_of_reprs_and_dumps(tmp_path: Path) -> None:
    config = ClickHouseConfig(dsn="https://loader:dsn-Secret-31@ch.internal:8443/t")
    other = ClickHouseConfig(host="ch.internal", password="pw-Secret-32")
    context = SinkContext(app="testapp", version="1", instance_id="i", data_dir=tmp_path)
    for cfg, secret in ((config, "dsn-Secret-31"), (other, "pw-Secret-32")):
        sink = ClickHouseSink("s", cfg, context)
        texts = [repr(cfg), str(cfg), cfg.model_dump_json(), repr(sink), sink.destination]
        texts.append(repr(sink.target))
        assert all(secret not in text for text in texts), texts
