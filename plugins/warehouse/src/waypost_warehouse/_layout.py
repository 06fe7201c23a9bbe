"""The one table layout both sinks write, and the wording of their errors.

Error reasons go to the outbox, ``status()`` and logs, so they carry the database's cause but
never the bound values (event data) nor credentials: quoted text in a database message is kept
only when it names one of our own identifiers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any

from waypost.errors import ConfigError, SinkError
from waypost.events import Event
from waypost.sinks import Sink

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
"""Columns of the events table, in order (see the README for the DDL of each backend)."""

ADDED_COLUMNS: tuple[str, ...] = ("distinct_id",)
"""Columns added to the layout after tables were made without them. A table that lacks only
these is still written (without them); with ``create_table`` the sink adds them first (a
nullable column: a change of the table's metadata only, on every backend)."""

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class TableLayoutError(ConfigError):
    """The events table is missing, or lacks columns, and ``create_table`` is off."""


def missing_columns(found: Iterable[str]) -> list[str]:
    """Columns of the layout absent from ``found`` (compared case-insensitively)."""
    have = {c.lower() for c in found}
    return [c for c in COLUMNS if c not in have]


DISTINCT_ID_LENGTH = 255
"""The width of the ``distinct_id`` column."""


def distinct_id_of(event: Event) -> str:
    """The id destinations count by: the one the application set, or the instance id. One
    longer than the column is stored as ``sha256:`` and its digest, which counts the same."""
    who = event.distinct_id or event.instance_id
    if len(who) > DISTINCT_ID_LENGTH:
        return "sha256:" + hashlib.sha256(who.encode("utf-8", "surrogatepass")).hexdigest()
    return who


def settle_added(
    sink: Sink[Any],
    label: str,
    missing: Callable[[], list[str]],
    add: Callable[[list[str]], None],
    refused: type[SinkError],
) -> tuple[str, ...]:
    """The columns of ``ADDED_COLUMNS`` the table lacks (``missing()``), which it is written
    without. With ``create_table`` they are added first (``add``); if that is ``refused`` (no
    right to alter the table, say), the table is looked at again: another process may have
    added them meanwhile. What it still lacks is said in a warning."""
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
            "true, see the migration note in the waypost-warehouse README",
            sink.name,
            label,
            ", ".join(absent),
            why,
            label,
        )
    return tuple(absent)


def no_table(label: str) -> TableLayoutError:
    return TableLayoutError(
        f"table {label} does not exist: create it (the waypost-warehouse README has the DDL) "
        "or set create_table: true"
    )


def lacks_columns(label: str, missing: list[str]) -> TableLayoutError:
    return TableLayoutError(
        f"table {label} lacks the column{'s' if len(missing) > 1 else ''} "
        f"{', '.join(missing)}: add {'them' if len(missing) > 1 else 'it'} "
        "(see the layout in the waypost-warehouse README) or point `table` at another table"
    )
