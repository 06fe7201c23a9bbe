"""The ``snowflake`` sink: events into a Snowflake table through snowflake-connector-python.

Each chunk of a batch is one ``MERGE`` whose source is a ``SELECT ... FROM VALUES``: JSON text
becomes ``VARIANT`` through ``PARSE_JSON`` in the SELECT list (Snowflake refuses ``PARSE_JSON``
inside ``VALUES``), and ``WHEN NOT MATCHED`` skips ids already stored, so a retried batch never
duplicates rows. The connector (its default ``pyformat`` binding) is imported when a sink is built.
"""

from __future__ import annotations

import contextlib
import math
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from waypost.errors import ConfigError, PermanentError, RetryableError, SinkError
from waypost.events import Event, dumps
from waypost.sinks import SendResult, Sink, SinkConfig, check_endpoint, clean_message
from waypost.sinks.parts import Chunk, pack, send_in_parts
from waypost.sinks.table import (
    COLUMNS,
    TableLayoutError,
    distinct_id_of,
    no_table,
    settle_added,
    table_label,
)
from waypost_warehouse.sql import README

if TYPE_CHECKING:
    from snowflake.connector import SnowflakeConnection

CHUNK_ROWS = 200
"""Rows per MERGE at most; a chunk also ends before its SQL text passes ``CHUNK_CHARS``."""
CHUNK_CHARS = 512 * 1024
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

_SOURCE = (
    ("id", "{} AS id", "id"),
    ("name", "{} AS name", "name"),
    ("timestamp", "CAST({} AS TIMESTAMP_TZ) AS ts", "ts"),
    ("instance_id", "{} AS instance_id", "instance_id"),
    ("distinct_id", "{} AS distinct_id", "distinct_id"),
    ("properties", "PARSE_JSON({}) AS properties", "properties"),
    ("context", "PARSE_JSON({}) AS context", "context"),
)
"""Each column a MERGE writes: its name, its expression in the source's SELECT list (of the
``VALUES`` column), and the source's name for it."""
# Errors a retry can fix besides connection failures: 606 is "no active warehouse" (suspended,
# or resuming), 390104/390111/390114 a session that is gone or expired (the next batch logs in
# again), 2500xx the connector's own connection failures; SQLSTATE class 57 is operator
# intervention (warehouse suspended, statement cancelled or timed out), 08 a connection exception.
_RETRY_ERRNO = (606, 390104, 390111, 390114, 250001, 250002, 250003)
_RETRY_SQLSTATE = ("08", "57")
# The connector's errors for an HTTP answer a retry can fix, and for an expired session.
_RETRY_ERRORS = frozenset(
    {"ServiceUnavailableError", "GatewayTimeoutError", "BadGatewayError", "InternalServerError",
     "RequestTimeoutError", "TooManyRequests", "OtherHTTPRetryableError",
     "RequestExceedMaxRetryError", "TokenExpiredError"}
)  # fmt: skip


def _identifier(value: str | None) -> str | None:
    if value is not None and not IDENTIFIER.match(value):
        raise ValueError(
            "must be a plain Snowflake identifier (letters, digits, _ and $, not starting "
            "with a digit)"
        )
    return value


class SnowflakeConfig(SinkConfig):
    """Settings of the ``snowflake`` sink. Authenticate with ``password``, a key pair
    (``private_key_file`` and ``private_key_passphrase``) or an ``authenticator``."""

    model_config = ConfigDict(populate_by_name=True)

    account: str = Field(min_length=1, description="Account identifier, e.g. myorg-myaccount.")
    user: str = Field(min_length=1, description="Login name.")
    password: SecretStr | None = Field(default=None, description="Password.")
    private_key_file: Path | None = Field(
        default=None, description="PEM file of the private key for key-pair authentication."
    )
    private_key_passphrase: SecretStr | None = Field(
        default=None, description="Passphrase of an encrypted private key file."
    )
    authenticator: str | None = Field(
        default=None,
        validate_default=True,
        description="e.g. externalbrowser (only where a person is present), oauth, "
        "or an Okta URL; the connector's default is snowflake (password).",
    )
    warehouse: str | None = Field(default=None, description="Warehouse that runs the MERGE.")
    database: str | None = Field(default=None, description="Database of the table.")
    schema_: str | None = Field(default=None, alias="schema", description="Schema of the table.")
    role: str | None = Field(default=None, description="Role to use.")
    table: str = Field(default="waypost_events", description="Table name.")
    create_table: bool = Field(
        default=False, description="Create the table if it does not exist (else it is checked)."
    )
    host: str | None = Field(
        default=None,
        description="Base URL, e.g. a private-link host; defaults to the account's own host.",
    )
    allow_http: bool = Field(
        default=False, validate_default=True, description="Allow http:// to a non-loopback host."
    )

    _check_names = field_validator("warehouse", "database", "schema_", "role", "table")(
        lambda cls, v: _identifier(v)
    )

    @field_validator("private_key_file")
    @classmethod
    def _one_secret(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("password") is not None:
            raise ValueError("give either password or private_key_file, not both")
        return value

    @field_validator("private_key_passphrase")
    @classmethod
    def _passphrase_needs_key(cls, value: SecretStr | None, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("private_key_file") is None:
            raise ValueError("is only used with private_key_file")
        return value

    @field_validator("authenticator")
    @classmethod
    def _some_login(cls, value: str | None, info: ValidationInfo) -> str | None:
        given = [k for k in ("password", "private_key_file") if info.data.get(k) is not None]
        if value is None and not given and "password" in info.data:
            raise ValueError(
                "no way to log in: set password, private_key_file or authenticator "
                "(e.g. externalbrowser)"
            )
        return value

    @field_validator("allow_http")
    @classmethod
    def _host_url(cls, value: bool, info: ValidationInfo) -> bool:
        host = info.data.get("host")
        if host is not None:
            check_endpoint(host, allow_http=value, what="host")
        return value


class SnowflakeSink(Sink[SnowflakeConfig]):
    """Merges events into one Snowflake table; one statement per chunk, autocommitted."""

    type = "snowflake"
    max_batch_size = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conn: SnowflakeConnection | None = None
        self._absent: tuple[str, ...] = ()  # columns of ADDED_COLUMNS the table lacks
        self._ready = False
        # The connector is imported here, on the thread that builds the sink, never on a
        # delivery thread (a fork during an import leaves the child with its lock held); a
        # missing connector is open()'s to report, with the extra that brings it.
        self._connector: ModuleType | None = None
        with contextlib.suppress(ImportError):
            import snowflake.connector
            import snowflake.connector.errors

            self._connector = snowflake.connector
        # What the connector imports on its first request: netrc (its vendored requests reads
        # ~/.netrc) and, where installed, OpenTelemetry's trace-context propagator.
        import netrc  # noqa: F401

        with contextlib.suppress(ImportError):
            import opentelemetry.trace.propagation.tracecontext  # noqa: F401

    @property
    def label(self) -> str:
        """The table as the SQL names it (in the session's database): ``[schema.]table``."""
        return table_label(self.config.table, self.config.schema_)

    def __repr__(self) -> str:
        return f"<SnowflakeSink {self.name!r} type='snowflake' account={self.config.account!r}>"

    # --- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        if self._connector is None:
            raise ConfigError(
                "snowflake-connector-python is not installed: "
                "pip install 'waypost-warehouse[snowflake]'"
            )
        self._ready = False
        try:
            self._prepare()
        except SinkError as exc:
            if not exc.retryable:
                raise ConfigError(exc.reason) from None
            # Unreachable for now: the first send reports it and the core retries.

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._ready = False
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken session must not fail close()
                conn.close()

    # --- sending ----------------------------------------------------------------------------

    def render(self, events: Sequence[Event]) -> Any:
        return [
            {"sql": sql, "params": params} for sql, params in map(self._merge, self._chunks(events))
        ]

    def send(self, events: Sequence[Event]) -> SendResult:
        if not self._ready:
            self._prepare()
        # A retry merges the chunks stored before a failure again, harmlessly.
        return send_in_parts(
            self._chunks(events),
            lambda chunk: self._execute(*self._merge(chunk), what=f"merge into {self.label}"),
        )

    # --- helpers ----------------------------------------------------------------------------

    def _chunks(self, events: Sequence[Event]) -> list[Chunk[list[Any]]]:
        """One MERGE per chunk, each under ``CHUNK_ROWS`` and ``CHUNK_CHARS``."""
        absent = self._absent
        rows = []
        for event in events:
            row = [
                event.id,
                event.name,
                event.timestamp.isoformat(timespec="microseconds"),
                event.instance_id,
                distinct_id_of(event),
                dumps(event.properties),
                dumps(event.context),
            ]
            if absent:
                kept = zip(_SOURCE, row, strict=True)
                row = [value for (column, _, _), value in kept if column not in absent]
            rows.append((event, row, sum(len(str(v)) for v in row) + 40))
        return pack(rows, CHUNK_CHARS, max_items=CHUNK_ROWS)

    def _merge(self, chunk: Chunk[list[Any]]) -> tuple[str, list[Any]]:
        """The MERGE statement of a chunk and its parameters."""
        source = [c for c in _SOURCE if c[0] not in self._absent]
        select = ", ".join(expr.format(f"column{i}") for i, (_, expr, _) in enumerate(source, 1))
        row = "(" + ", ".join(["%s"] * len(source)) + ")"
        values = ", ".join([row] * len(chunk.items))
        sql = (
            f"MERGE INTO {self.label} AS t USING (SELECT {select} FROM VALUES {values}) AS s "
            "ON t.id = s.id WHEN NOT MATCHED THEN INSERT "
            f"({', '.join(column for column, _, _ in source)}, received_at) "
            f"VALUES ({', '.join('s.' + name for _, _, name in source)}, CURRENT_TIMESTAMP())"
        )
        return sql, [value for row in chunk.items for value in row]

    def _create_sql(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.label} ("
            "id VARCHAR(36) NOT NULL PRIMARY KEY, name VARCHAR NOT NULL, "
            "timestamp TIMESTAMP_TZ NOT NULL, instance_id VARCHAR NOT NULL, "
            "distinct_id VARCHAR, properties VARIANT, context VARIANT, "
            "received_at TIMESTAMP_TZ DEFAULT CURRENT_TIMESTAMP())"
        )

    def _connect(self) -> SnowflakeConnection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        connector = self._connector
        assert connector is not None  # open() said so

        s = self.config
        seconds = max(1, math.ceil(s.timeout))
        kwargs: dict[str, Any] = {
            "account": s.account,
            "user": s.user,
            "application": "waypost",
            "login_timeout": seconds,
            "network_timeout": seconds,
            "socket_timeout": seconds,  # a slow answer is a retry after timeout, not a wait
            "session_parameters": {"QUERY_TAG": "waypost"},
        }
        for key in ("warehouse", "database", "role", "authenticator"):
            if getattr(s, key) is not None:
                kwargs[key] = getattr(s, key)
        if s.schema_ is not None:
            kwargs["schema"] = s.schema_
        if s.password is not None:
            kwargs["password"] = s.password.get_secret_value()
        if s.private_key_file is not None:
            kwargs["private_key_file"] = str(s.private_key_file.expanduser())
            if s.private_key_passphrase is not None:
                kwargs["private_key_file_pwd"] = s.private_key_passphrase.get_secret_value()
        if s.host:
            parsed = urllib.parse.urlsplit(s.host)
            kwargs["host"] = parsed.hostname
            kwargs["protocol"] = parsed.scheme
            kwargs["port"] = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            self._conn = connector.connect(**kwargs)
        except Exception as exc:
            raise self._classify(f"connecting to account {s.account}", exc) from None
        return self._conn

    def _execute(self, sql: str, params: Sequence[Any] | None, *, what: str) -> list[str]:
        """Run one statement; returns the column names of its result."""
        conn = self._connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, params, timeout=max(1, math.ceil(self.config.timeout)))
                return [str(d[0]) for d in cursor.description or ()]
        except Exception as exc:
            raise self._classify(what, exc) from None

    def _prepare(self) -> None:
        """Create the table (``create_table``) or check that it has every column; a table
        that lacks only columns added to the layout later is altered to add them
        (``create_table``) or written without them."""
        if self.config.create_table:
            self._execute(self._create_sql(), None, what=f"creating table {self.label}")

        def add(columns: list[str]) -> None:
            for column in columns:  # each of ADDED_COLUMNS is a VARCHAR
                sql = f"ALTER TABLE {self.label} ADD COLUMN {column} VARCHAR"
                self._execute(sql, None, what=f"adding {column} to {self.label}")

        try:
            self._absent = settle_added(
                self, self.label, self._columns, add, PermanentError, README
            )
        except TableLayoutError as exc:  # from send() too: the batch's permanent failure
            raise PermanentError(str(exc)) from None
        self._ready = True

    def _columns(self) -> list[str]:
        """The columns the table has."""
        try:
            return self._execute(
                f"SELECT * FROM {self.label} LIMIT 0", None, what=f"checking table {self.label}"
            )
        except PermanentError as exc:
            if "does not exist" in exc.reason:
                raise PermanentError(str(no_table(self.label, README))) from None
            raise

    def _classify(self, what: str, exc: Exception) -> SinkError:
        """Retryable for connection trouble and a suspended warehouse, else permanent; the
        reason holds the cause, never the statement's values or the credentials."""
        assert self._connector is not None
        errors = self._connector.errors
        s = self.config
        known = (s.table, s.schema_ or "", s.database or "", s.warehouse or "", "PUBLIC", *COLUMNS)
        if isinstance(exc, errors.Error):
            # raw_msg is the server's message alone (str(exc) adds the query id).
            code = f"{exc.errno:06d}" if isinstance(exc.errno, int) and exc.errno >= 0 else ""
            state = exc.sqlstate if exc.sqlstate and exc.sqlstate != "n/a" else ""
            # Refused credentials: retrying cannot fix them.
            refused = exc.errno in (390100, 390144, 390318) or state.startswith("28")
            retry = not refused and (
                isinstance(exc, (errors.OperationalError, errors.InterfaceError))
                or exc.errno in _RETRY_ERRNO
                or state[:2] in _RETRY_SQLSTATE
                or type(exc).__name__ in _RETRY_ERRORS
            )
            message = clean_message(str(exc.raw_msg or exc.msg or ""), known, redact=not retry)
            prefix = f"{code} ({state})" if state else code
            cause = message if message.startswith(prefix) else f"{prefix}: {message}"
        else:
            cause = clean_message(f"{type(exc).__name__}: {exc}", known)
            retry = isinstance(exc, (OSError, TimeoutError))
        if retry:
            self.close()  # the next batch logs in afresh
            return RetryableError(f"{what}: {self.mask(cause)}")
        return PermanentError(f"{what} failed: {self.mask(cause)}")
