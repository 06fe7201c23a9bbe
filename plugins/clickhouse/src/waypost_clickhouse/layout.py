"""The events table: its columns, its DDL, and the check of a table that already exists.

``ReplacingMergeTree`` keeps one row per sorting key once parts are merged. The key is
``(name, toDate(timestamp), id)``: every copy of an event has the same name and time, so copies
share one key and collapse into one row, while the leading ``name`` and day let ClickHouse skip
most of the table for the queries people run (one event, a time range). ``FINAL`` in a query, or
counting ``uniqExact(id)``, counts each event once before the merges have run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from waypost.errors import ConfigError
from waypost.sinks.table import COLUMNS

__all__ = [
    "COLUMNS",
    "ENGINES",
    "TableLayoutError",
    "create_table_sql",
    "layout_problems",
]

INSERTED = COLUMNS[:-1]

ENGINES = ("ReplacingMergeTree", "Distributed")
"""Engines a table may have (by suffix: Replicated... and Shared... variants count): they keep
one row per event id, or (Distributed) leave it to the tables behind them."""

DEDUP_WINDOW = 1000
"""Inserts remembered per table, so a batch sent again with the same token is dropped at once."""


class TableLayoutError(ConfigError):
    """The events table lacks columns, or would keep duplicates (engine, sorting key)."""


def quote(identifier: str) -> str:
    """A ClickHouse identifier in backquotes."""
    return "`" + identifier.replace("\\", "\\\\").replace("`", "\\`") + "`"


def create_table_sql(
    database: str, table: str, properties: Literal["String", "JSON"] = "String"
) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for the events table."""
    return (
        f"CREATE TABLE IF NOT EXISTS {quote(database)}.{quote(table)} (\n"
        "  id UUID,\n"
        "  name LowCardinality(String),\n"
        "  timestamp DateTime64(3, 'UTC'),\n"
        "  instance_id String,\n"
        "  distinct_id String,\n"
        f"  properties {properties},\n"
        "  context String,\n"
        "  received_at DateTime64(3, 'UTC') DEFAULT now64(3)\n"
        ")\n"
        "ENGINE = ReplacingMergeTree\n"
        "PARTITION BY toYYYYMM(timestamp)\n"
        "ORDER BY (name, toDate(timestamp), id)\n"
        f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}"
    )


def layout_problems(
    label: str, columns: Iterable[str], engine: str, sorting_key: str
) -> TableLayoutError | None:
    """What is wrong with an existing table for this sink, as an error to raise, or None."""
    have = {c.lower() for c in columns}
    missing = [c for c in COLUMNS if c not in have]
    if missing:
        hint = (
            " (ALTER TABLE ... ADD COLUMN distinct_id String AFTER instance_id)"
            if missing == ["distinct_id"]
            else ""
        )
        return TableLayoutError(
            f"table {label} lacks the column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}: add {'them' if len(missing) > 1 else 'it'}{hint}, or point "
            "`table` at another table (the waypost-clickhouse README has the DDL)"
        )
    if not engine.endswith(ENGINES):
        return TableLayoutError(
            f"table {label} has the engine {engine}, which keeps every copy of a resent event: "
            "use ReplacingMergeTree ordered by a key that ends with id (the waypost-clickhouse "
            "README has the DDL)"
        )
    key = [part.strip() for part in sorting_key.split(",")]
    if not engine.endswith("Distributed") and "id" not in key:
        return TableLayoutError(
            f"table {label} is sorted by ({sorting_key}), without id: ReplacingMergeTree "
            "would merge different events, or keep copies of one. Sort it by a key that "
            "includes id, e.g. (name, toDate(timestamp), id)"
        )
    return None
