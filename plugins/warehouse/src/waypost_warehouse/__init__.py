"""waypost sinks for warehouses: ``sql`` (PostgreSQL, DuckDB, SQLite and other SQLAlchemy
dialects) and ``snowflake``. Both write the same table layout (see the README) idempotently:
a retried batch never duplicates rows."""

from __future__ import annotations

from waypost.hookspecs import registering
from waypost.sinks.table import COLUMNS, TableLayoutError
from waypost_warehouse.snowflake import SnowflakeConfig, SnowflakeSink
from waypost_warehouse.sql import SqlConfig, SqlSink

__all__ = [
    "COLUMNS",
    "SnowflakeConfig",
    "SnowflakeSink",
    "SqlConfig",
    "SqlSink",
    "TableLayoutError",
    "register_sinks",
]


register_sinks = registering(SqlSink, SnowflakeSink)
