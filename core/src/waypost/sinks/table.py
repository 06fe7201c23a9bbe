"""The events table every table sink writes (a warehouse, ClickHouse, a sink of your own): its
columns, the id destinations count by, and the checks of a table that already exists, with the
migration of a table made before a column was added to the layout.

Reasons go to the outbox, ``status()`` and logs: they name tables and columns, never values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from waypost.errors import ConfigError, SinkError
from waypost.events import Event
from waypost.sinks.base import Sink

__all__ = [
    "ADDED_COLUMNS",
    "COLUMNS",
    "DISTINCT_ID_LENGTH",
    "TableLayoutError",
    "distinct_id_of",
    "lacks_columns",
    "missing_columns",
    "no_table",
    "settle_added",
    "table_label",
]

COLUMNS: tuple[str, ...] = (
    "id",
    "name",
    "timestamp",
    "instance_id",
    "distinct_id",
    "properties",
    "context",
    "received_at",
)
"""Columns of the events table, in order (``received_at`` is the database's own time)."""

ADDED_COLUMNS: tuple[str, ...] = ("distinct_id",)
"""Columns added to the layout after tables were made without them. A table that lacks only
these is still written (without them); with ``create_table`` a sink adds them first (a
nullable column: a change of the table's metadata only, on every backend)."""

DISTINCT_ID_LENGTH = 255
"""The width of the ``distinct_id`` column."""


class TableLayoutError(ConfigError):
    """The events table is missing, or lacks columns, and ``create_table`` is off."""


def table_label(table: str, schema: str | None = None) -> str:
    """The table as statements and messages name it: ``[schema.]table``."""
    return f"{schema}.{table}" if schema else table


def missing_columns(found: Iterable[str]) -> list[str]:
    """Columns of the layout absent from ``found`` (compared case-insensitively)."""
    have = {c.lower() for c in found}
    return [c for c in COLUMNS if c not in have]


def distinct_id_of(event: Event) -> str:
    """The id destinations count by: the one the application set, or the instance id. One
    longer than the column is stored as ``sha256:`` and its digest, which counts the same."""
    who = event.distinct_id or event.instance_id
    if len(who) > DISTINCT_ID_LENGTH:
        return "sha256:" + hashlib.sha256(who.encode("utf-8", "surrogatepass")).hexdigest()
    return who


def no_table(label: str, readme: str) -> TableLayoutError:
    """The error for a table that does not exist; ``readme`` names the document with its DDL
    (``"the waypost-warehouse README"``)."""
    return TableLayoutError(
        f"table {label} does not exist: create it ({readme} has the DDL) or set create_table: true"
    )


def lacks_columns(label: str, missing: list[str], readme: str) -> TableLayoutError:
    """The error for a table that lacks ``missing`` columns of the layout."""
    many = len(missing) > 1
    return TableLayoutError(
        f"table {label} lacks the column{'s' if many else ''} {', '.join(missing)}: "
        f"add {'them' if many else 'it'} (see the layout in {readme}) "
        "or point `table` at another table"
    )


def settle_added(
    sink: Sink[Any],
    label: str,
    found: Callable[[], Iterable[str]],
    add: Callable[[list[str]], None],
    refused: type[SinkError],
    readme: str,
) -> tuple[str, ...]:
    """The columns of :data:`ADDED_COLUMNS` the table lacks, which it is written without.

    ``found()`` reads the table's columns; a table that lacks any other column of the layout
    raises :func:`lacks_columns`. With the sink's ``create_table`` the absent ones are added
    first (``add``); if that is ``refused`` (no right to alter the table, say), the table is
    looked at again: another process may have added them meanwhile. What it still lacks is said
    in a warning, with the statement that adds it.
    """

    def missing() -> list[str]:
        absent = missing_columns(found())
        if any(column not in ADDED_COLUMNS for column in absent):
            raise lacks_columns(label, absent, readme)
        return absent

    absent, why = missing(), "create_table is off"
    if absent and getattr(sink.config, "create_table", False):
        try:
            add(absent)
            return ()
        except refused as exc:
            why = exc.reason
        absent = missing()
    if absent:
        sink.context.logger.warning(
            "waypost: sink %r: table %s has no %s column (%s): events are written without it; "
            "add it (ALTER TABLE %s ADD COLUMN distinct_id VARCHAR(255)) or set create_table: "
            "true, see the migration note in %s",
            sink.name,
            label,
            ", ".join(absent),
            why,
            label,
            readme,
        )
    return tuple(absent)
