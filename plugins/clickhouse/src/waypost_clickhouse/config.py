"""Settings of the ``clickhouse`` sink: a server over HTTP(S), or the embedded engine (chdb)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from waypost.config import parse_bool
from waypost.sinks import SinkConfig, is_loopback_host

__all__ = ["ClickHouseConfig", "Target"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCHEMES = ("http", "https", "clickhouse", "chdb")


@dataclass(frozen=True)
class Target:
    """Where a config points: the embedded engine in the directory ``path``, or a server."""

    embedded: bool
    path: Path | None = None
    host: str = ""
    port: int = 0
    secure: bool = False
    username: str | None = None
    password: str = field(default="", repr=False)
    database: str = "default"
    options: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Where events go, without credentials."""
        if self.embedded:
            return f"chdb://{self.path}"
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}/{self.database}"


class ClickHouseConfig(SinkConfig):
    """Settings of a ``clickhouse`` sink. The DSN and the password are secrets."""

    model_config = ConfigDict(hide_input_in_errors=True)

    dsn: SecretStr | None = Field(
        default=None,
        description="https://user:password@host:8443/database, or chdb:///path/to/dir for the "
        "embedded engine (a relative path is taken inside the data dir).",
    )
    host: str | None = Field(default=None, description="Server host (instead of a dsn).")
    port: int | None = Field(default=None, ge=1, le=65535, description="8443, or 8123 plain.")
    secure: bool | None = Field(
        default=None, description="HTTPS; default on, except to a loopback host."
    )
    allow_http: bool = Field(default=False, description="Allow plain HTTP to a remote host.")
    verify: bool = Field(default=True, description="Check the server's TLS certificate.")
    ca_cert: str | None = Field(default=None, description="CA certificate file for TLS.")
    username: str | None = Field(default=None, description="User; default 'default'.")
    password: SecretStr | None = Field(default=None, description="Password of the user.")
    database: str | None = Field(default=None, description="Database; default 'default'.")
    table: str = Field(default="waypost_events", description="Table of events.")
    create_table: bool = Field(
        default=True, description="Create the table when it is missing (else it is checked)."
    )
    properties_type: Literal["String", "JSON"] = Field(
        default="String",
        description="Column type of properties in a table the sink creates: JSON text in a "
        "String, or ClickHouse's JSON type (server 25.3 or later).",
    )
    settings: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="ClickHouse settings for each insert, e.g. async_insert: 1.",
    )

    @field_validator("table", "database")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not _IDENTIFIER.match(value):
            raise ValueError(f"{value!r} is not a plain identifier (letters, digits, _)")
        return value

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        # Messages never echo the DSN: it may hold a password.
        parsed = urllib.parse.urlsplit(value.get_secret_value())
        if parsed.scheme not in _SCHEMES:
            raise ValueError(
                "dsn must start with https://, http:// (loopback), clickhouse:// or chdb://"
            )
        if parsed.scheme != "chdb" and not parsed.hostname:
            raise ValueError("dsn names no host")
        if parsed.scheme == "chdb" and _chdb_path(parsed, Path(".")) is None:
            raise ValueError(
                "an in-memory embedded engine loses every event when the process ends: give "
                "it a directory, chdb:///path/to/dir"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> ClickHouseConfig:
        if self.dsn is not None and self.host is not None:
            raise ValueError("set either dsn or host, not both")
        if self.dsn is None and self.host is None and (self.port or self.password):
            raise ValueError("port and password need a host (or a dsn)")
        target = self.target(Path("."))
        plain = not target.embedded and not target.secure and not self.allow_http
        if plain and not is_loopback_host(target.host):
            raise ValueError(
                f"plain HTTP to {target.host} would send events and the password "
                "unencrypted: use secure: true (https), or set allow_http: true if the "
                "network is trusted"
            )
        return self

    def target(self, data_dir: Path) -> Target:
        """The engine or server this config points at (relative chdb paths inside
        ``data_dir``). Without a dsn or host, the embedded engine in ``data_dir/clickhouse``."""
        if self.dsn is None and self.host is None:
            return Target(embedded=True, path=data_dir / "clickhouse", database=self._db(None))
        if self.dsn is None:
            assert self.host is not None
            secure = not is_loopback_host(self.host) if self.secure is None else self.secure
            return Target(
                embedded=False,
                host=self.host,
                port=self.port or (8443 if secure else 8123),
                secure=secure,
                username=self.username,
                password=self.password.get_secret_value() if self.password else "",
                database=self._db(None),
            )
        parsed = urllib.parse.urlsplit(self.dsn.get_secret_value())
        options = {k: v[0] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        path_db = urllib.parse.unquote(parsed.path.lstrip("/").split("/")[0]) or None
        if parsed.scheme == "chdb":
            return Target(embedded=True, path=_chdb_path(parsed, data_dir), database=self._db(None))
        secure = parsed.scheme == "https" or (
            parsed.scheme == "clickhouse"
            and (parse_bool(options.pop("secure", "")) is True or parsed.port in (443, 8443))
        )
        if self.secure is not None:
            secure = self.secure
        host = parsed.hostname or ""
        return Target(
            embedded=False,
            host=host,
            port=parsed.port or (8443 if secure else 8123),
            secure=secure,
            username=self.username or (urllib.parse.unquote(parsed.username or "") or None),
            password=(self.password.get_secret_value() if self.password else "")
            or urllib.parse.unquote(parsed.password or ""),
            database=self._db(path_db),
            options=options,
        )

    def _db(self, from_dsn: str | None) -> str:
        return self.database or from_dsn or "default"

    def secrets(self) -> list[str]:
        """Every secret this config holds (for masking): the password and the DSN's."""
        found = [self.password.get_secret_value()] if self.password else []
        if self.dsn is not None:
            parsed = urllib.parse.urlsplit(self.dsn.get_secret_value())
            if parsed.password:
                found += [parsed.password, urllib.parse.unquote(parsed.password)]
        return [s for s in found if s]

    def insert_settings(self) -> dict[str, Any]:
        return {k: (int(v) if isinstance(v, bool) else v) for k, v in self.settings.items()}


def _chdb_path(parsed: urllib.parse.SplitResult, data_dir: Path) -> Path | None:
    """``chdb:///abs/dir`` -> /abs/dir; ``chdb://rel/dir`` or ``chdb:rel/dir`` -> inside
    ``data_dir``; ``chdb://memory`` or ``chdb://:memory:`` -> None (in memory)."""
    location = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
    if location in ("", "memory", ":memory:") or parsed.netloc in ("memory", ":memory:"):
        return None
    path = Path(location)
    return path if path.is_absolute() else data_dir / path
