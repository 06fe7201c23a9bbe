"""The ``clickhouse`` sink: each batch one insert into a ``ReplacingMergeTree`` keyed on the id.

It talks to a server over HTTP(S), or drives the embedded engine (chdb) in this process, both
through clickhouse-connect (imported in ``open()``, on the delivery thread: it is heavy). Each
insert carries a deduplication token made from the batch's ids. A batch that is sent again as it
was is dropped at once by the server (Replicated tables, or a table made by this sink with
``non_replicated_deduplication_window``). Any other copy of an event shares the event's sorting
key, so merges collapse it, and ``FINAL`` or ``uniqExact(id)`` count it once in the meantime.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import uuid
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from waypost.errors import ConfigError, PermanentError, RetryableError, SinkError
from waypost.events import Event, dumps
from waypost.sinks import SendResult, Sink, SinkConfig, SinkContext, keep_forever
from waypost_clickhouse.answers import BoundedPool
from waypost_clickhouse.config import ClickHouseConfig, Target
from waypost_clickhouse.layout import (
    COLUMNS,
    INSERTED,
    TableLayoutError,
    create_table_sql,
    layout_problems,
    quote,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

__all__ = ["RETRY_CODES", "ClickHouseSink"]

log = logging.getLogger("waypost.sinks.clickhouse")

RETRY_CODES = frozenset(
    {
        3,  # UNEXPECTED_END_OF_FILE
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        60,  # UNKNOWN_TABLE: created again (create_table) or by the operator
        81,  # UNKNOWN_DATABASE
        159,  # TIMEOUT_EXCEEDED
        173,  # CANNOT_ALLOCATE_MEMORY
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        225,  # NO_ZOOKEEPER
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        252,  # TOO_MANY_PARTS
        285,  # TOO_FEW_LIVE_REPLICAS
        286,  # UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
        319,  # UNKNOWN_STATUS_OF_INSERT
        394,  # QUERY_WAS_CANCELLED
        425,  # SYSTEM_ERROR
        439,  # CANNOT_SCHEDULE_TASK
        999,  # KEEPER_EXCEPTION
        1000,  # POCO_EXCEPTION
    }
)
"""ClickHouse error codes that a later attempt can overcome; other server errors are permanent."""

_LIVE: weakref.WeakSet[ClickHouseSink] = weakref.WeakSet()


def _before_fork() -> None:
    for sink in list(_LIVE):
        sink._release_for_fork()


def _after_fork_in_child() -> None:
    for sink in list(_LIVE):
        sink._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*(?:'|$)")  # or one the message's cut leaves open
_SPACE = re.compile(r"\s+")
_REFUSED_SETTINGS = ("insert_deduplication_token", "session_id")


class _ClickHouseError(Protocol):
    code: int | None
    name: str | None


class ClickHouseSink(Sink):
    """Inserts each batch into one ClickHouse table, created on demand."""

    type = "clickhouse"
    Config = ClickHouseConfig
    max_batch_size = 10_000  # ClickHouse wants few, large inserts: each makes a part
    config: ClickHouseConfig

    def __init__(self, name: str, config: SinkConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        refused = [k for k in self.config.settings if k in _REFUSED_SETTINGS]
        if refused:
            raise ConfigError(
                f"clickhouse sink {name!r}: settings.{refused[0]} is set per batch by the sink",
                key=f"telemetry.sinks.{name}",
            )
        self.target: Target = self.config.target(context.data_dir)
        self._secrets = sorted(self.config.secrets(), key=len, reverse=True)
        self._client: Client | None = None
        self._pool: BoundedPool | None = None  # the client's connections
        self._pid = 0
        self._engine_owner = 0  # the process that may open the embedded engine
        self._types: list[str] | None = None  # column types, known once the table is ready
        self._lock = threading.Lock()
        self._cc: Any = None
        self._errors: Any = None
        _LIVE.add(self)

    @property
    def label(self) -> str:
        return f"{self.target.database}.{self.config.table}"

    @property
    def destination(self) -> str:
        return f"{self.target.label}/{self.config.table}"

    # --- connecting -------------------------------------------------------------------------

    def open(self) -> None:
        self._load()
        try:
            self._ready(layout_errors=True)
        except RetryableError as exc:
            # Unreachable now: the batches are retried, and the next one connects again.
            log.info("clickhouse sink %r: %s", self.name, exc.reason)

    def _load(self) -> None:
        if self._cc is not None:
            return
        try:
            import clickhouse_connect
            from clickhouse_connect.driver import exceptions
        except ImportError as exc:
            raise ConfigError(f"the clickhouse sink needs clickhouse-connect: {exc}") from None
        if self.target.embedded:
            try:
                import chdb  # noqa: F401  (clickhouse-connect drives it)
            except ImportError:
                raise ConfigError(
                    "the embedded ClickHouse engine needs chdb: pip install "
                    "'waypost-clickhouse[embedded]' (or give a dsn or host of a server)"
                ) from None
        self._cc, self._errors = clickhouse_connect, exceptions

    def _ready(self, *, layout_errors: bool = False) -> Client:
        """The client of this process, connected, with the table checked (or created).
        A table that is wrong for the sink raises :class:`TableLayoutError` with
        ``layout_errors`` (at open), else a retryable error naming the fix."""
        self._load()
        with self._lock:
            if self._client is not None and self._pid != os.getpid():
                # The parent's: its connections are not ours, and freeing the client here
                # would close them: it is kept, unused.
                keep_forever(self._client)
                self._client, self._types = None, None
            if self._client is None:
                self._claim_engine()
                self._client = self._guard(self._connect)
                self._pid = os.getpid()
            if self._types is None:
                self._types = self._guard(self._prepare, layout_errors=layout_errors)
            return self._client

    def _claim_engine(self) -> None:
        """The embedded engine's directory is one process's at a time: the one that opened it
        first, as long as that process lives (a forked child leaves it to its parent)."""
        if not self.target.embedded:
            return
        owner = self._engine_owner
        if owner and owner != os.getpid() and _alive(owner):
            raise RetryableError(
                f"ClickHouse: the embedded engine at {self.target.path} belongs to process "
                f"{owner}; events of process {os.getpid()} wait in the outbox for it"
            )
        self._engine_owner = os.getpid()

    def _release_for_fork(self) -> None:
        """Before ``fork()``: close the embedded engine (the parent opens it again for its next
        batch). A child of a process with a running chdb engine hangs when it exits."""
        if not self.target.embedded or self._client is None or self._pid != os.getpid():
            return
        if not self._lock.acquire(timeout=self.config.timeout):
            log.warning(
                "clickhouse sink %r: a batch is still being written at fork(); the embedded "
                "engine stays open, and the child may hang when it exits",
                self.name,
            )
            return
        try:
            client, self._client, self._types = self._client, None, None
            if client is not None:
                client.close()
        except Exception as exc:
            log.debug("clickhouse sink %r: closing before fork: %s", self.name, exc)
        finally:
            self._lock.release()

    def _connect(self) -> Client:
        seconds = max(1, math.ceil(self.config.timeout))
        target = self.target
        if target.embedded:
            assert target.path is not None
            target.path.mkdir(parents=True, exist_ok=True)
            client: Client = self._cc.get_client(interface="chdb", path=str(target.path))
            return client
        options: dict[str, Any] = {
            "username": target.username,
            "password": target.password,
            "connect_timeout": seconds,
            "send_receive_timeout": seconds,
            "verify": self.config.verify,
            "autogenerate_session_id": False,  # one client is safe from several threads
            "show_clickhouse_errors": "scrub",  # no URL, no server version in messages
            "client_name": f"waypost/{self.context.app}",
        }
        if self.config.ca_cert:
            options["ca_cert"] = self.config.ca_cert
        options["pool_mgr"] = self._bounded_pool()
        if self.config.dsn is not None:
            client = self._cc.get_client(
                dsn=self.config.dsn.get_secret_value(),
                secure=target.secure,
                database=target.database,
                **options,
            )
        else:
            client = self._cc.get_client(
                host=target.host,
                port=target.port,
                secure=target.secure,
                database=target.database,
                **options,
            )
        client.compression = None  # answers come plain: a compressed one could be a bomb
        return client

    def _bounded_pool(self) -> BoundedPool:
        """This client's own urllib3 pool manager, made as clickhouse-connect makes one (the
        TLS options, a proxy from the environment), whose answers are read within bounds."""
        from clickhouse_connect.driver import httputil

        target = self.target
        verify, ca_cert = bool(self.config.verify), self.config.ca_cert or None
        if target.secure:
            proxy = httputil.check_env_proxy("https", target.host, target.port)
            inner = httputil.get_pool_manager(verify=verify, ca_cert=ca_cert, https_proxy=proxy)
        else:
            proxy = httputil.check_env_proxy("http", target.host, target.port)
            inner = httputil.get_pool_manager(http_proxy=proxy)
        self._pool = BoundedPool(inner, float(self.config.timeout))
        return self._pool

    def _prepare(self) -> list[str]:
        """Create the table if allowed and missing, check it, and return its column types."""
        client = self._client
        assert client is not None
        database, table = self.target.database, self.config.table
        if self.config.create_table:
            if self.target.embedded:
                client.command(f"CREATE DATABASE IF NOT EXISTS {quote(database)}")
            client.command(create_table_sql(database, table, self.config.properties_type))
        params = {"db": database, "table": table}
        found = client.query(
            "SELECT engine, sorting_key FROM system.tables "
            "WHERE database = {db:String} AND name = {table:String}",
            parameters=params,
        ).result_rows
        if not found:
            raise TableLayoutError(
                f"table {self.label} does not exist: create it (the waypost-clickhouse README "
                "has the DDL) or set create_table: true"
            )
        engine, sorting_key = found[0]
        rows = client.query(
            "SELECT name, type FROM system.columns "
            "WHERE database = {db:String} AND table = {table:String}",
            parameters=params,
        ).result_rows
        columns: dict[str, str] = {str(row[0]): str(row[1]) for row in rows}
        problem = layout_problems(self.label, columns, str(engine), str(sorting_key))
        if problem is not None:
            raise problem
        return [columns[c] for c in INSERTED]

    def _guard(self, step: Any, *, layout_errors: bool = False) -> Any:
        """Run a connect or prepare step; failures become the sink's errors."""
        try:
            return step()
        except SinkError:
            raise
        except TableLayoutError as exc:
            if layout_errors:
                raise
            # A table that would lose or double events: nothing is written until it is fixed.
            # The events wait in the outbox (retryable) and the reason says what to change.
            raise RetryableError(f"ClickHouse: {exc.reason}") from None
        except Exception as exc:
            # Before the insert, nothing is the events' fault: even a refused login or an
            # unknown database is retried (the events wait in the outbox), with its name.
            error = self._error(exc)
            raise RetryableError(f"{error.reason} (while connecting)") from None

    # --- writing ----------------------------------------------------------------------------

    def rows(self, events: Sequence[Event]) -> list[list[Any]]:
        return [
            [
                e.id,
                e.name,
                e.timestamp,
                e.instance_id,
                e.distinct_id or e.instance_id,
                dumps(e.properties),
                dumps(e.context),
            ]
            for e in events
        ]

    def render(self, events: Sequence[Event]) -> dict[str, Any]:
        return {
            "table": self.label,
            "columns": list(INSERTED),
            "rows": [
                {**dict(zip(INSERTED, row, strict=True)), "timestamp": e.iso_timestamp}
                for e, row in zip(events, self.rows(events), strict=True)
            ],
        }

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult()
        good: list[Event] = []
        for event in events:
            try:
                uuid.UUID(event.id)
            except (ValueError, TypeError, AttributeError):
                result.mark_failed(event, f"ClickHouse: id {event.id!r} is not a UUID")
                continue
            good.append(event)
        if not good:
            return result
        client = self._ready()
        token = hashlib.sha256("\n".join(e.id for e in good).encode()).hexdigest()
        settings = {**self.config.insert_settings(), "insert_deduplication_token": token}
        try:
            client.insert(
                self.config.table,
                self.rows(good),
                column_names=list(INSERTED),
                database=self.target.database,
                column_type_names=self._types,
                settings=settings,
            )
        except Exception as exc:
            error = self._error(exc)
            if getattr(exc, "code", None) in (60, 81) or isinstance(
                exc, self._errors.ProgrammingError
            ):
                with self._lock:
                    self._types = None  # checked (and created) again before the next batch
            raise error from None
        return result

    def _error(self, exc: Exception) -> SinkError:
        """A clickhouse-connect (or chdb) failure as the core's retryable or permanent error."""
        errors = self._errors
        code: int | None = getattr(exc, "code", None)
        name: str | None = getattr(exc, "name", None)
        if isinstance(exc, errors.OperationalError):
            where = "" if self.target.embedded else f" at {self.target.host}:{self.target.port}"
            return RetryableError(f"ClickHouse{where}: {self._clean(exc)}")
        if isinstance(exc, errors.DatabaseError) and code is not None:
            reason = f"ClickHouse: {name or f'code {code}'}: {self._clean(exc)}"
            if code in RETRY_CODES:
                return RetryableError(reason)
            return PermanentError(reason)
        if isinstance(exc, errors.DatabaseError):
            # An HTTP status without a ClickHouse error: a proxy or load balancer answered.
            status = re.search(r"HTTP status (\d{3})", str(exc))
            reason = f"ClickHouse: {self._clean(exc)}"
            if status and status.group(1)[0] == "4" and status.group(1) not in ("408", "429"):
                return PermanentError(reason)
            return RetryableError(reason)
        if isinstance(exc, errors.DataError):
            return PermanentError(
                f"ClickHouse: a value does not fit its column: {self._clean(exc)}"
            )
        return RetryableError(f"ClickHouse: {type(exc).__name__}: {self._clean(exc)}")

    def _clean(self, exc: Exception, limit: int = 300) -> str:
        """The error's message, fit for logs: quoted values (event data) replaced by '…',
        except the names of the table and its columns; secrets masked; cut to ``limit``. Only
        the head of a long message is looked at (a server's answer of a megabyte in it took
        150 MB to scrub whole)."""
        known = {self.config.table, self.target.database, *COLUMNS}
        head = 4 * limit + max((len(s) for s in self._secrets), default=0)
        text = _SPACE.sub(" ", str(exc)[:head]).strip()

        def keep(match: re.Match[str]) -> str:
            if len(match.group(0)) < 2 or not match.group(0).endswith("'"):
                return "'…'"
            inner = match.group(0)[1:-1]
            parts = inner.replace("`", "").split(".")
            return match.group(0) if all(p in known for p in parts) else "'…'"

        text = _QUOTED.sub(keep, text)
        for secret in self._secrets:
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def close(self) -> None:
        with self._lock:
            client, self._client, self._types = self._client, None, None
        if client is None:
            return
        if self._pid != os.getpid():
            keep_forever(client)  # the parent's: never closed or freed here
            return
        try:
            client.close()
            if self._pool is not None:
                self._pool.inner.clear()  # the client leaves a pool it was given open
        except Exception as exc:
            log.debug("clickhouse sink %r: close: %s", self.name, exc)

    def __repr__(self) -> str:
        return f"<ClickHouseSink {self.name!r} {self.destination}>"
