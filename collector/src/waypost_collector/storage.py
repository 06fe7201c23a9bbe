"""Reading the storage back, for the dashboard and the embedded storage's retention: the table
the ``sql`` sink writes (SQLite, DuckDB or PostgreSQL), queried with each dialect's own date
and JSON functions, so charts over a large table are computed by the database."""

from __future__ import annotations

import datetime as _dt
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from waypost.sinks import Sink

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine

DIALECTS = ("sqlite", "postgresql", "duckdb")


def _url(sink: Sink) -> URL | None:
    """The SQLAlchemy URL of an ``sql`` sink, a relative file taken inside its data dir (as the
    sink takes it); None for any other sink."""
    from sqlalchemy.engine import make_url

    if sink.type != "sql":
        return None
    url = make_url(sink.config.url.get_secret_value())  # type: ignore[attr-defined]
    if url.drivername in ("postgresql", "postgres"):
        found = importlib.util.find_spec("psycopg") is not None
        url = url.set(drivername="postgresql+psycopg" if found else "postgresql")
    backend = url.get_backend_name()
    if backend in ("sqlite", "duckdb") and url.database and url.database != ":memory:":
        path = Path(url.database).expanduser()
        if not path.is_absolute():
            url = url.set(database=str(sink.context.data_dir / path))
    return url


class Store:
    """One table of the warehouse layout, read with plain SQL."""

    def __init__(self, sink: Sink, url: URL) -> None:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        self.name = sink.name
        self.dialect = url.get_backend_name()
        schema = getattr(sink.config, "schema_", None)
        table = str(getattr(sink.config, "table", "waypost_events"))
        self.table = f'"{schema}"."{table}"' if schema else f'"{table}"'
        options: dict[str, Any] = {}
        if self.dialect in ("duckdb", "sqlite"):
            # Open the file only while reading, so the sink's own writes are never held up.
            options["poolclass"] = NullPool
        self.engine: Engine = sa.create_engine(url, **options)

    # --- dialect fragments ------------------------------------------------------------------

    def day(self, column: str = "timestamp") -> str:
        if self.dialect == "sqlite":
            return f"substr({column}, 1, 10)"
        if self.dialect == "postgresql":
            return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        return f"strftime(timezone('UTC', {column}), '%Y-%m-%d')"

    def week(self, column: str = "timestamp") -> str:
        """The Monday that starts the ISO week of ``column``, as YYYY-MM-DD."""
        if self.dialect == "sqlite":
            return f"date(substr({column}, 1, 10), '-6 days', 'weekday 1')"
        if self.dialect == "postgresql":
            return f"to_char(date_trunc('week', {column} AT TIME ZONE 'UTC'), 'YYYY-MM-DD')"
        return f"strftime(date_trunc('week', timezone('UTC', {column})), '%Y-%m-%d')"

    def json_text(self, column: str, *path: str) -> str:
        for part in path:
            if not part.isidentifier():
                raise ValueError(f"not a JSON key: {part!r}")
        if self.dialect == "sqlite":
            return f"json_extract({column}, '$.{'.'.join(path)}')"
        if self.dialect == "postgresql":
            return f"({column} #>> '{{{','.join(path)}}}')"
        return f"json_extract_string({column}, '$.{'.'.join(path)}')"

    # --- queries ----------------------------------------------------------------------------

    def statement(self, sql: str, params: dict[str, Any]) -> Any:
        """``sql`` with its times bound as the dialect stores them (SQLite keeps text)."""
        import sqlalchemy as sa

        times = [
            sa.bindparam(k, type_=sa.DateTime(timezone=True))
            for k, v in params.items()
            if isinstance(v, _dt.datetime)
        ]
        return sa.text(sql).bindparams(*times)

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(self.statement(sql, params), params)]

    def _app(self) -> str:
        return f"{self.json_text('context', 'app', 'name')} = :app"

    def active(self, app: str, since: _dt.datetime, *, per: str) -> list[tuple[str, int]]:
        """Distinct installations (instance ids) per day or per week since ``since``."""
        bucket = self.day() if per == "day" else self.week()
        rows = self.query(
            f"SELECT {bucket} AS b, COUNT(DISTINCT instance_id) FROM {self.table} "
            f"WHERE timestamp >= :since AND {self._app()} GROUP BY b ORDER BY b",
            since=since,
            app=app,
        )
        return [(str(b), int(n)) for b, n in rows]

    def shares(self, app: str, since: _dt.datetime, *path: str) -> list[tuple[str, int]]:
        """Distinct installations by the value of a context field, most first."""
        value = self.json_text("context", *path)
        rows = self.query(
            f"SELECT COALESCE({value}, '(unknown)') AS v, COUNT(DISTINCT instance_id) AS n "
            f"FROM {self.table} WHERE timestamp >= :since AND {self._app()} "
            "GROUP BY v ORDER BY n DESC, v",
            since=since,
            app=app,
        )
        return [(str(v), int(n)) for v, n in rows]

    def events_per_day(self, app: str, since: _dt.datetime) -> list[tuple[str, str, int]]:
        """(name, day, events) since ``since``."""
        rows = self.query(
            f"SELECT name, {self.day()} AS d, COUNT(*) FROM {self.table} "
            f"WHERE timestamp >= :since AND {self._app()} GROUP BY name, d ORDER BY d, name",
            since=since,
            app=app,
        )
        return [(str(name), str(d), int(n)) for name, d, n in rows]

    def apps(self) -> list[str]:
        app = self.json_text("context", "app", "name")
        return [str(r[0]) for r in self.query(f"SELECT DISTINCT {app} FROM {self.table}") if r[0]]

    def expire(self, before: _dt.datetime) -> int:
        params = {"before": before}
        with self.engine.begin() as conn:
            result = conn.execute(
                self.statement(f"DELETE FROM {self.table} WHERE timestamp < :before", params),
                params,
            )
            return int(result.rowcount or 0)

    def close(self) -> None:
        self.engine.dispose()


def open_store(sink: Sink) -> Store | None:
    """A reader of ``sink``'s table when it is an ``sql`` sink on a dialect the charts know."""
    url = _url(sink)
    if url is None or url.get_backend_name() not in DIALECTS:
        return None
    return Store(sink, url)


def prepare_embedded(sink: Sink) -> None:
    """Put the embedded storage's SQLite file in WAL mode (kept by the file), before its sink
    first opens it: one fsync per batch stored instead of several, and readers (the dashboard)
    never hold up the writer."""
    url = _url(sink)
    if url is None or url.get_backend_name() != "sqlite" or not url.database:
        return
    import sqlite3

    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(url.database, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL").fetchall()
    finally:
        db.close()


def expire_events(sink: Sink, *, before: float) -> int:
    """Delete ``sink``'s events older than ``before`` (Unix seconds); the embedded storage's
    retention. Nothing happens before the sink made its table."""
    import sqlalchemy as sa

    store = open_store(sink)
    if store is None:
        return 0
    try:
        return store.expire(_dt.datetime.fromtimestamp(before, _dt.timezone.utc))
    except sa.exc.SQLAlchemyError:
        return 0
    finally:
        store.close()
