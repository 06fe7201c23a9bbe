"""The embedded ClickHouse engine (chdb) as the tests' peer, read back with queries.

chdb runs one engine per process, on one directory, so the whole test session shares one
engine in a temp dir; each test writes to a database of its own there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waypost_clickhouse import ClickHouseSink

from waypost.plugins import PluginManager
from waypost.sinks import SinkContext


@dataclass
class Engine:
    """The session's embedded engine: its DSN, and a client of its own to look inside."""

    dsn: str
    client: Any

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.client.query(sql).result_rows]

    def scalar(self, sql: str) -> Any:
        return self.query(sql)[0][0]


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    import clickhouse_connect

    path = tmp_path_factory.mktemp("chdb")
    client = clickhouse_connect.get_client(interface="chdb", path=str(path))
    yield Engine(f"chdb://{path}", client)
    client.close()


@pytest.fixture
def database(engine: Engine) -> str:
    """A database name for this test alone (the sink creates it)."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_sink(
    engine: Engine, database: str, tmp_path: Path
) -> Iterator[Callable[..., ClickHouseSink]]:
    """``make_sink(**settings)``: a clickhouse sink on the session's engine, this test's
    database, closed after the test."""
    made: list[ClickHouseSink] = []

    def factory(**settings: Any) -> ClickHouseSink:
        cls = PluginManager().load_sink_type("clickhouse")
        config = cls.Config.model_validate({"dsn": engine.dsn, "database": database, **settings})
        context = SinkContext(
            app="testapp", version="1.0.0", instance_id="i", data_dir=tmp_path, strict=True
        )
        sink = cls("test-clickhouse", config, context)
        assert isinstance(sink, ClickHouseSink)
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.close()
