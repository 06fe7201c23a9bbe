"""The one table layout both sinks write, and the wording of their errors.

Error reasons go to the outbox, ``status()`` and logs, so they carry the database's cause but
never the bound values (event data) nor credentials: quoted text in a database message is kept
only when it names one of our own identifiers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from waypost.errors import ConfigError
from waypost.events import Event

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

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NOISE = ("DETAIL", "HINT", "CONTEXT", "LINE ", "QUERY", "WHERE", "^")


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


def without_added(label: str, missing: list[str], why: str) -> str:
    """The warning for a table written without the columns of ``ADDED_COLUMNS`` it lacks."""
    return (
        f"table {label} has no {', '.join(missing)} column ({why}): events are written "
        f"without it; add it (ALTER TABLE {label} ADD COLUMN distinct_id VARCHAR(255)) or set "
        "create_table: true, see the migration note in the waypost-warehouse README"
    )


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


def clean_message(
    message: str, known: Iterable[str], *, redact: bool = True, limit: int = 300
) -> str:
    """A database message fit for logs: detail lines dropped, whitespace folded, quoted text
    that is not one of the ``known`` identifiers replaced by ``'…'`` (unless ``redact`` is off:
    connection failures carry no values), cut to ``limit``."""
    names = {k.lower() for k in known if k}
    lines = [line.strip() for line in message.splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith(_NOISE))

    def keep(match: re.Match[str]) -> str:
        quoted = match.group(0)
        parts = [p.strip("\"'").lower() for p in quoted[1:-1].split(".")]
        if parts and all(p in names for p in parts):
            return quoted
        return quoted[0] + "…" + quoted[0]

    if redact:
        text = _QUOTED.sub(keep, text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
