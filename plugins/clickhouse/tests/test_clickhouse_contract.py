"""waypost's SinkContract for the clickhouse sink, with the embedded engine (chdb) as its peer:
a refusal is a CHECK constraint that no row meets (VIOLATED_CONSTRAINT), a retryable failure a
table dropped under the sink (UNKNOWN_TABLE; the sink makes it again for the next batch), what
arrived is read back with a query. The embedded engine cannot be made slow, and runs in this
process with no timeout of its own, so the slow-answer test does not apply to it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from waypost_clickhouse import create_table_sql

from waypost.testing import BasePeer, SinkContract, free_port
from waypost.testing.peer import Arrival, PeerCannot


class ChdbPeer(BasePeer):
    name = "the embedded ClickHouse engine"

    def __init__(self, engine: Any, database: str) -> None:
        self.engine = engine
        self.database = database
        self.table = f"{database}.waypost_events"

    def config(self) -> dict[str, Any]:
        return {"dsn": self.engine.dsn, "database": self.database}

    def unreachable_config(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": free_port()}

    def _table(self) -> None:
        command = self.engine.client.command
        command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        command(create_table_sql(self.database, "waypost_events"))

    def deliver(self) -> None:
        self._table()
        self.engine.client.command(f"ALTER TABLE {self.table} DROP CONSTRAINT IF EXISTS refuse")

    def permanent_failures(self) -> tuple[str, ...]:
        return ("VIOLATED_CONSTRAINT",)

    def refuse(self, failure: str) -> None:
        self.deliver()
        self.engine.client.command(f"ALTER TABLE {self.table} ADD CONSTRAINT refuse CHECK 0")

    def retryable_failures(self) -> tuple[str, ...]:
        return ("UNKNOWN_TABLE",)

    def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
        if retry_after is not None:
            raise PeerCannot("ClickHouse has no Retry-After")
        self.engine.client.command(f"DROP TABLE IF EXISTS {self.table}")

    def secrets(self) -> list[str]:
        # The dsn is a SecretStr as a whole (a server's carries a password), but a chdb path
        # is no secret; secrets over HTTP are checked in test_clickhouse_pipeline.py.
        return []

    def slow(self, seconds: float) -> None:
        raise PeerCannot("the embedded engine cannot be made slow (and has no timeout)")

    def received(self) -> list[Arrival]:
        try:
            rows = self.engine.query(f"SELECT toString(id), name, properties FROM {self.table}")
        except Exception:
            return []
        return [Arrival(r[0], r[1], json.loads(r[2])) for r in rows]


@pytest.fixture
def waypost_peer(engine: Any, database: str) -> ChdbPeer:
    return ChdbPeer(engine, database)


class TestClickHouseContract(SinkContract):
    sink_type = "clickhouse"
    honours_retry_after = False  # ClickHouse has no Retry-After
