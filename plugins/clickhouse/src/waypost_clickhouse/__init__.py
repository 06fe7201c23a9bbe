"""waypost-clickhouse: delivers waypost events into a ClickHouse table, over HTTP(S) or to the
embedded engine (chdb). The table is a ``ReplacingMergeTree`` keyed on the event id, so a resent
event is counted once (see the README for the layout and how to query it)."""

from __future__ import annotations

from collections.abc import Callable

from waypost import Sink, hookimpl
from waypost_clickhouse.config import ClickHouseConfig
from waypost_clickhouse.layout import COLUMNS, TableLayoutError, create_table_sql
from waypost_clickhouse.sink import RETRY_CODES, ClickHouseSink

__all__ = [
    "COLUMNS",
    "RETRY_CODES",
    "ClickHouseConfig",
    "ClickHouseSink",
    "TableLayoutError",
    "create_table_sql",
    "register_sinks",
]


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(ClickHouseSink)
