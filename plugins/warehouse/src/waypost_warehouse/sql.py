"""The ``sql`` sink: events into a table of any database SQLAlchemy reaches.

PostgreSQL, SQLite and DuckDB write each batch with one ``INSERT ... ON CONFLICT (id) DO
NOTHING`` in one transaction, so a retried batch never duplicates rows. Other dialects
(Redshift, BigQuery, MySQL ...) read which ids of the batch already exist and insert the rest,
in one transaction. SQLAlchemy, the URL's dialect and its driver are imported when a sink is
built (on the application's thread, never on a delivery thread), not when the plugin loads.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, SecretStr, field_validator

from waypost.errors import ConfigError, PermanentError, RetryableError, SinkError
from waypost.events import Event, dumps
from waypost.sinks import SendResult, Sink, SinkConfig, clean_message
from waypost.sinks.masking import MASK, is_secret_name
from waypost.sinks.table import (
    COLUMNS,
    TableLayoutError,
    distinct_id_of,
    no_table,
    settle_added,
    table_label,
)

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import URL, Connection, Engine

README = "the waypost-warehouse README"
ON_CONFLICT_DIALECTS = ("postgresql", "sqlite", "duckdb")
"""Dialects whose ``INSERT ... ON CONFLICT (id) DO NOTHING`` makes writes idempotent."""

_FILE_DIALECTS = ("sqlite", "duckdb")
_EXTRAS = {"postgresql": "postgres", "duckdb": "duckdb"}

# SQLSTATE classes (PostgreSQL and others that follow the standard) that a retry can fix:
# connection exceptions, transaction rollback (serialisation, deadlock), insufficient
# resources, object not in prerequisite state (lock not available), operator intervention
# (shutdown, cancel, statement timeout), system errors.
_RETRY_SQLSTATE = ("08", "40", "53", "55", "57", "58", "HV")
_TRANSIENT_FATAL = ("starting up", "shutting down", "too many", "recovery", "terminating")
_RETRY_SQLITE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN")


class SqlConfig(SinkConfig):
    """Settings of the ``sql`` sink."""

    model_config = ConfigDict(populate_by_name=True)

    url: SecretStr = Field(
        description="SQLAlchemy URL, e.g. postgresql://user:pass@host/db, sqlite:///events.db, "
        "duckdb:///events.duckdb; a relative file path is taken inside the data dir."
    )
    table: str = Field(default="waypost_events", min_length=1, description="Table name.")
    schema_: str | None = Field(
        default=None, alias="schema", description="Schema of the table (the default if unset)."
    )
    create_table: bool = Field(
        default=False, description="Create the table if it does not exist (else it is checked)."
    )

    @field_validator("url")
    @classmethod
    def _parses(cls, value: SecretStr) -> SecretStr:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value.get_secret_value())
        except ArgumentError:
            # The message must not echo the URL: it may hold a password.
            raise ValueError(
                "is not a SQLAlchemy URL (dialect[+driver]://user:password@host/database)"
            ) from None
        return value


def masked(url: URL) -> str:
    """The URL with its password, and any secret-looking query value, replaced by ``***``."""
    query = {k: (MASK if is_secret_name(k) else v) for k, v in url.query.items()}
    return str(url.set(query=query).render_as_string(hide_password=True))


class SqlSink(Sink[SqlConfig]):
    """Writes events into one table through SQLAlchemy; one transaction per batch."""

    type = "sql"
    max_batch_size = 500

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _import_for(self._url(files=False))
        self._engine: Engine | None = None
        self._table: sa.Table | None = None
        self._absent: tuple[str, ...] = ()  # columns of ADDED_COLUMNS the table lacks
        self._ready = False
        self._where = "(not opened)"

    @property
    def label(self) -> str:
        """The table as messages name it: ``schema.table``."""
        return table_label(self.config.table, self.config.schema_)

    def __repr__(self) -> str:
        return f"<SqlSink {self.name!r} type='sql' {self._where} table={self.label!r}>"

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        import sqlalchemy as sa

        url = self._url()
        self._where = masked(url)
        for name, value in (("password", url.password), *url.query.items()):
            if isinstance(value, str) and is_secret_name(name):  # as SQLAlchemy parsed them
                self.masker.add(value)
        backend = url.get_backend_name()
        try:
            self._engine = sa.create_engine(url, **self._engine_options(url))
        except (ImportError, sa.exc.NoSuchModuleError) as exc:
            extra = _EXTRAS.get(backend)
            hint = f"pip install 'waypost-warehouse[{extra}]'" if extra else "install its driver"
            raise ConfigError(
                f"no driver for {url.drivername} ({type(exc).__name__}: {exc}): {hint}"
            ) from None
        self._table = _table(self.config.table, self.config.schema_)
        self._ready = False
        try:
            self._prepare()
        except sa.exc.SQLAlchemyError as exc:
            error = self._classify(f"checking table {self.label}", exc)
            if not error.retryable:
                raise ConfigError(error.reason) from None
            # The database is unreachable for now: open anyway, the first send says so and the
            # core retries it; the table is checked once the database answers.

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()
        self._ready = False

    # --- sending ----------------------------------------------------------------------------

    def render(self, events: Sequence[Event]) -> Any:
        now = _dt.datetime.now(_dt.timezone.utc)
        return {
            "table": self.label,
            "idempotency": "insert, skipping ids already present",
            "rows": [
                {
                    **_row(e, now, self._absent),
                    "timestamp": e.iso_timestamp,
                    "received_at": now.isoformat(),
                }
                for e in events
            ],
        }

    def send(self, events: Sequence[Event]) -> SendResult:
        import sqlalchemy as sa

        if self._engine is None or self._table is None:
            raise RetryableError("the sql sink is not open")
        try:
            if not self._ready:
                self._prepare()
            now = _dt.datetime.now(_dt.timezone.utc)
            with self._engine.begin() as conn:
                if conn.dialect.name == "sqlite":
                    self._write_sqlite(conn, events, now)
                else:
                    self._write(conn, [_row(e, now, self._absent) for e in events])
        except TableLayoutError as exc:
            raise PermanentError(str(exc)) from None
        except sa.exc.SQLAlchemyError as exc:
            raise self._classify(f"insert into {self.label}", exc) from None
        return SendResult.ok()

    def _write(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        import sqlalchemy as sa

        table = self._table
        assert table is not None
        dialect = conn.dialect.name
        if dialect in ("postgresql", "duckdb"):  # SQLite has _write_sqlite
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            conn.execute(pg_insert(table).on_conflict_do_nothing(index_elements=["id"]), rows)
        else:
            ids = [r["id"] for r in rows]
            present = set(conn.scalars(sa.select(table.c.id).where(table.c.id.in_(ids))))
            fresh = [r for r in rows if r["id"] not in present]
            if fresh:
                conn.execute(sa.insert(table), fresh)

    def _write_sqlite(self, conn: Connection, events: Sequence[Event], now: _dt.datetime) -> None:
        """SQLite: one prepared statement through the DB-API, each value the text SQLAlchemy's
        types would bind (times in UTC without their offset, JSON), a context that several
        events share serialised once: a fraction of the CPU of ``_write``'s path."""
        table = self._table
        assert table is not None
        quote = conn.dialect.identifier_preparer
        sql = (
            f"INSERT INTO {quote.format_table(table)} "
            f"({', '.join(quote.format_column(c) for c in table.columns)}) "
            f"VALUES ({', '.join('?' * len(table.columns))}) ON CONFLICT (id) DO NOTHING"
        )
        keep = [COLUMNS.index(c.name) for c in table.columns]
        whole = keep == list(range(len(COLUMNS)))
        texts: dict[int, str] = {}
        seconds: dict[float, str] = {}

        def text(value: Any) -> str:
            found = texts.get(id(value))
            if found is None:
                found = texts[id(value)] = dumps(value)
            return found

        def moment(t: float) -> str:
            # datetime.fromtimestamp's microseconds (rounded half to even) and its wall time.
            fraction, second = math.modf(t)
            micro = round(fraction * 1e6)
            if micro >= 1_000_000:
                second, micro = second + 1, micro - 1_000_000
            elif micro < 0:
                second, micro = second - 1, micro + 1_000_000
            head = seconds.get(second)
            if head is None:
                head = seconds[second] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            return f"{head}.{micro:06d}"

        received = now.isoformat(" ", "microseconds")[:26]
        values = []
        for e in events:
            row = (
                e.id, e.name, moment(e.time), e.instance_id, distinct_id_of(e),
                text(e.properties), text(e.context), received,
            )  # fmt: skip
            values.append(row if whole else tuple(row[i] for i in keep))
        conn.exec_driver_sql(sql, values)

    # --- helpers ----------------------------------------------------------------------------

    def _url(self, *, files: bool = True) -> URL:
        """The configured URL with its driver chosen and (``files``) a relative database file
        placed in the data dir, its folder made."""
        from sqlalchemy.engine import make_url

        url = make_url(self.config.url.get_secret_value())
        if url.drivername in ("postgresql", "postgres"):
            # A bare postgresql:// would mean psycopg2 to SQLAlchemy; prefer psycopg 3 when it
            # is installed (the [postgres] extra).
            psycopg = importlib.util.find_spec("psycopg") is not None
            url = url.set(drivername="postgresql+psycopg" if psycopg else "postgresql")
        backend = url.get_backend_name()
        database = url.database
        if files and backend in _FILE_DIALECTS and database and database != ":memory:":
            path = Path(database).expanduser()
            if not path.is_absolute():
                path = self.context.data_dir / path
                path.parent.mkdir(parents=True, exist_ok=True)
            url = url.set(database=str(path))
        return url

    def _engine_options(self, url: URL) -> dict[str, Any]:
        timeout = self.config.timeout
        options: dict[str, Any] = {"json_serializer": dumps, "pool_pre_ping": True}
        backend, driver = url.get_backend_name(), url.get_driver_name()
        if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
            connect: dict[str, Any] = {"connect_timeout": max(1, math.ceil(timeout))}
            if "options" not in url.query:
                connect["options"] = f"-c statement_timeout={int(timeout * 1000)}"
            connect["application_name"] = "waypost"
            options["connect_args"] = connect
            options["pool_size"] = 1
        elif backend == "sqlite":
            options["connect_args"] = {"timeout": timeout}
        elif backend == "duckdb" and url.database not in (None, "", ":memory:"):
            # Hold the file only while writing, so other processes can open it in between.
            from sqlalchemy.pool import NullPool

            options["poolclass"] = NullPool
        return options

    def _prepare(self) -> None:
        """Create the table (``create_table``) or check that it has every column; a table
        that lacks only columns added to the layout later is altered to add them
        (``create_table``) or written without them."""
        import sqlalchemy as sa

        engine = self._engine
        assert engine is not None
        table = _table(self.config.table, self.config.schema_)
        with engine.begin() as conn:
            if not sa.inspect(conn).has_table(table.name, schema=table.schema):
                if not self.config.create_table:
                    raise no_table(self.label, README)
                table.create(conn, checkfirst=True)

        def add(columns: list[str]) -> None:
            try:
                with engine.begin() as conn:
                    for column in columns:
                        _add_column(conn, table, column)
            except sa.exc.SQLAlchemyError as exc:
                raise self._classify(f"adding {', '.join(columns)}", exc) from None

        def found() -> list[str]:
            probe = sa.select(sa.text("*")).select_from(table).where(sa.false())
            with engine.begin() as conn:
                return list(conn.execute(probe).keys())

        self._absent = settle_added(self, self.label, found, add, SinkError, README)
        self._table = _table(self.config.table, self.config.schema_, without=self._absent)
        self._ready = True

    def _classify(self, what: str, exc: sa.exc.SQLAlchemyError) -> SinkError:
        """A retryable or permanent error naming the database's cause, never the values."""
        import sqlalchemy as sa

        orig = getattr(exc, "orig", None)
        cause = orig if isinstance(orig, BaseException) else exc
        known = (self.config.table, self.config.schema_ or "", *COLUMNS)
        retry = _retryable(exc)
        # A statement's own error (no driver's cause) ends with the SQL and its values: cut.
        bare = isinstance(exc, sa.exc.StatementError) and orig is None
        text = str(exc).split("[SQL:")[0] if bare else str(cause)
        message = self.mask(clean_message(text, known, redact=not retry))
        if retry:
            if self._engine is not None:
                self._engine.dispose()  # the next batch connects afresh
            self._ready = False
            return RetryableError(f"{what} at {self._where}: {type(cause).__name__}: {message}")
        return PermanentError(f"{what} failed: {type(cause).__name__}: {message}")


def _import_for(url: URL) -> None:
    """Import what ``open()`` and ``send()`` need for ``url``: SQLAlchemy's engine, pool and
    insert constructs, the dialect and its driver (a missing driver is ``open()``'s to report,
    with the extra that brings it)."""
    import sqlalchemy.dialects.postgresql
    import sqlalchemy.dialects.sqlite
    import sqlalchemy.pool  # noqa: F401
    from sqlalchemy.exc import NoSuchModuleError

    try:
        dialect = url.get_dialect()
        dialect.import_dbapi()
    except (ImportError, NoSuchModuleError):
        pass


def _retryable(exc: sa.exc.SQLAlchemyError) -> bool:
    import sqlalchemy as sa

    if isinstance(exc, (sa.exc.DisconnectionError, sa.exc.TimeoutError)):
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return sqlstate[:2] in _RETRY_SQLSTATE
    text = str(orig)
    if "FATAL:" in text and not any(t in text for t in _TRANSIENT_FATAL):
        # libpq reports a refused login (password, pg_hba.conf, unknown role or database)
        # without an SQLSTATE: the server answered, and retrying will not change its mind.
        return False
    sqlite_error = getattr(orig, "sqlite_errorname", None)
    if isinstance(sqlite_error, str):
        return sqlite_error.startswith(_RETRY_SQLITE)
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.InternalError))


def _columns() -> list[sa.Column[Any]]:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql

    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    uuid = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql", "duckdb")
    return [
        sa.Column("id", uuid, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False),
        # Nullable: rows written before the column was added have none.
        sa.Column("distinct_id", sa.String(255)),
        sa.Column("properties", json),
        sa.Column("context", json),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.current_timestamp(),
        ),
    ]


def _table(name: str, schema: str | None, without: Sequence[str] = ()) -> sa.Table:
    import sqlalchemy as sa

    columns = [c for c in _columns() if c.name not in without]
    return sa.Table(name, sa.MetaData(), *columns, schema=schema)


def _add_column(conn: Connection, table: sa.Table, name: str) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for one column of the layout, in the dialect's words."""
    import sqlalchemy as sa

    (column,) = [c for c in _columns() if c.name == name]
    preparer = conn.dialect.identifier_preparer
    kind = column.type.compile(dialect=conn.dialect)
    conn.execute(
        sa.text(
            f"ALTER TABLE {preparer.format_table(table)} "
            f"ADD COLUMN {preparer.format_column(column)} {kind}"
        )
    )


def _row(event: Event, now: _dt.datetime, absent: Sequence[str] = ()) -> dict[str, Any]:
    row = {
        "id": event.id,
        "name": event.name,
        "timestamp": event.timestamp,
        "instance_id": event.instance_id,
        "distinct_id": distinct_id_of(event),
        "properties": event.properties,
        "context": event.context,
        "received_at": now,
    }
    for column in absent:
        del row[column]
    return row
