"""The table sinks' toolkit (``waypost.sinks.table``) against a real SQLite database: the
layout's checks, the migration of a table made before ``distinct_id``, the id counted by."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from waypost.errors import PermanentError, SinkError
from waypost.events import Event
from waypost.sinks import SendResult, Sink, SinkConfig, SinkContext
from waypost.sinks.table import (
    COLUMNS,
    DISTINCT_ID_LENGTH,
    TableLayoutError,
    distinct_id_of,
    lacks_columns,
    no_table,
    settle_added,
    table_label,
)
from waypost.testing import make_event, make_events

README = "the acme README"
OLD_LAYOUT = [c for c in COLUMNS if c != "distinct_id"]


class TableConfig(SinkConfig):
    create_table: bool = False


class TableSink(Sink[TableConfig]):
    """A sink of this test that only settles its table's layout."""

    type = "table"

    def send(self, events: Sequence[Event]) -> SendResult:
        return SendResult.ok()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    yield conn
    conn.close()


def make_table(conn: sqlite3.Connection, columns: Sequence[str]) -> None:
    conn.execute(f"CREATE TABLE events ({', '.join(columns)})")


def found(conn: sqlite3.Connection) -> list[str]:
    return [row[1] for row in conn.execute("PRAGMA table_info(events)")]


def adder(
    conn: sqlite3.Connection, refuse: bool = False
) -> tuple[list[str], Callable[[list[str]], None]]:
    added: list[str] = []

    def add(columns: list[str]) -> None:
        if refuse:
            raise PermanentError("not allowed to alter events")
        for column in columns:
            conn.execute(f"ALTER TABLE events ADD COLUMN {column} VARCHAR(255)")
            added.append(column)

    return added, add


def sink(tmp_path: Path, create_table: bool) -> TableSink:
    context = SinkContext(app="t", version="1", instance_id="i", data_dir=tmp_path)
    return TableSink("wh", TableConfig(create_table=create_table), context)


def test_a_table_with_the_whole_layout_needs_nothing(
    db: sqlite3.Connection, tmp_path: Path
) -> None:
    make_table(db, COLUMNS)
    added, add = adder(db)
    absent = settle_added(sink(tmp_path, True), "events", lambda: found(db), add, SinkError, README)
    assert absent == () and added == []


def test_an_old_table_is_altered_with_create_table(db: sqlite3.Connection, tmp_path: Path) -> None:
    make_table(db, OLD_LAYOUT)
    added, add = adder(db)
    absent = settle_added(sink(tmp_path, True), "events", lambda: found(db), add, SinkError, README)
    assert absent == () and added == ["distinct_id"]
    assert "distinct_id" in found(db)


def test_an_old_table_is_written_without_the_column_and_said_so(
    db: sqlite3.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_table(db, OLD_LAYOUT)
    added, add = adder(db)
    with caplog.at_level(logging.WARNING, logger="waypost.sinks"):
        absent = settle_added(
            sink(tmp_path, False), "main.events", lambda: found(db), add, SinkError, README
        )
    assert absent == ("distinct_id",) and added == []
    assert "table main.events has no distinct_id column (create_table is off)" in caplog.text
    assert "ALTER TABLE main.events ADD COLUMN distinct_id" in caplog.text
    assert "see the migration note in the acme README" in caplog.text


def test_a_refused_alter_looks_again_and_says_why(
    db: sqlite3.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_table(db, OLD_LAYOUT)
    _, refusing = adder(db, refuse=True)
    with caplog.at_level(logging.WARNING, logger="waypost.sinks"):
        absent = settle_added(
            sink(tmp_path, True), "events", lambda: found(db), refusing, PermanentError, README
        )
    assert absent == ("distinct_id",)
    assert "(not allowed to alter events)" in caplog.text

    # Another process added the column meanwhile: looked at again, nothing is absent.
    def added_meanwhile(columns: list[str]) -> None:
        db.execute("ALTER TABLE events ADD COLUMN distinct_id VARCHAR(255)")
        raise PermanentError("not allowed to alter events")

    assert (
        settle_added(
            sink(tmp_path, True),
            "events",
            lambda: found(db),
            added_meanwhile,
            PermanentError,
            README,
        )
        == ()
    )


def test_a_table_lacking_other_columns_is_refused(db: sqlite3.Connection, tmp_path: Path) -> None:
    make_table(db, ["id", "name", "properties"])
    added, add = adder(db)
    with pytest.raises(TableLayoutError) as caught:
        settle_added(sink(tmp_path, True), "events", lambda: found(db), add, SinkError, README)
    assert added == []
    assert str(caught.value) == str(
        lacks_columns(
            "events", ["timestamp", "instance_id", "distinct_id", "context", "received_at"], README
        )
    )
    assert "lacks the columns timestamp, instance_id" in str(caught.value)
    assert "add them (see the layout in the acme README)" in str(caught.value)


def test_messages_and_labels() -> None:
    assert table_label("events") == "events"
    assert table_label("events", "analytics") == "analytics.events"
    assert str(no_table("a.b", README)) == (
        "table a.b does not exist: create it (the acme README has the DDL) "
        "or set create_table: true"
    )
    assert "lacks the column distinct_id: add it " in str(
        lacks_columns("t", ["distinct_id"], README)
    )


def test_distinct_id_fits_its_column() -> None:
    (anonymous,) = make_events(1)
    short = make_event("run", distinct_id="user-7")
    long = make_event("run", distinct_id="u" * (DISTINCT_ID_LENGTH + 1))
    assert distinct_id_of(short) == "user-7"
    assert distinct_id_of(anonymous) == anonymous.instance_id
    hashed = distinct_id_of(long)
    assert hashed.startswith("sha256:") and len(hashed) <= DISTINCT_ID_LENGTH
    assert hashed == distinct_id_of(long)
