"""The collector's configuration: a ``collector:`` section in YAML or TOML, ``${VAR}`` expanded.

Errors name the file, the key path and the reason, as the core's do (they are the core's
:class:`waypost.ConfigError`, made by :func:`waypost.config.validation_error`).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from waypost.config import ScrubConfig, expand, parse_duration, read_file, validation_error
from waypost.errors import ConfigError

ROOT = "collector"
DEFAULT_FILES = ("collector.yml", "collector.yaml", "collector.toml")
APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EMBEDDED = "events"
"""Name of the embedded default storage: the ``sql`` sink on a SQLite file in the data dir."""
EMBEDDED_SPEC: dict[str, Any] = {
    "type": "sql",
    "url": "sqlite:///events.sqlite3",
    "create_table": True,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\s*(?:ms|s|m|h|d|w)?)\s*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _duration(value: Any) -> Any:
    return None if value is None else parse_duration(value)


class Rate(_Model):
    """``count`` per ``per`` seconds, written ``"600/m"`` (or ``/s``, ``/h``, ``/d``, ``/10m``)."""

    count: int = Field(ge=1)
    per: float = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _RATE.match(value)
            if not match:
                raise ValueError(f"{value!r} is not a rate (e.g. 600/m, 10/s, 5000/h)")
            per = match.group(2).strip() or "1s"
            if per[0].isalpha():
                per = "1" + per
            return {"count": int(match.group(1)), "per": parse_duration(per)}
        return value

    def __str__(self) -> str:
        return f"{self.count}/{self.per:g}s"


class AppConfig(_Model):
    """One application whose installations send here."""

    token: SecretStr | None = Field(
        default=None, description="Bearer token the app's http sink sends (none: no token)."
    )
    signing_secret: SecretStr | None = Field(
        default=None, description="Verify X-Waypost-Signature with this secret (required if set)."
    )
    signature_tolerance: float = Field(
        default=300.0, gt=0, description="Seconds a signed request's timestamp may be off."
    )
    schemas: list[str] = Field(
        default_factory=list, description="Modules declaring the app's waypost.Payload classes."
    )
    accept_undeclared: bool = Field(
        default=False, description="Accept events and fields the schemas do not declare."
    )
    ping_event: str = Field(
        default="ping", min_length=1, max_length=200, description="Event name of a ping."
    )
    scrub: bool = Field(default=True, description="Scrub free-form properties on arrival.")

    _dur = field_validator("signature_tolerance", mode="before")(_duration)

    @field_validator("signing_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("signing_secret must be at least 16 characters")
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value()
            if len(text) < 8 or any(ch.isspace() or not ch.isprintable() for ch in text):
                raise ValueError("token must be at least 8 printable characters without spaces")
        return value


class Limits(_Model):
    max_body: int = Field(
        default=1_048_576, ge=1024, description="Largest request body as received, bytes."
    )
    max_decoded: int = Field(
        default=16_777_216, ge=1024, description="Largest body once gzip is undone, bytes."
    )
    max_events: int = Field(default=1000, ge=1, description="Events per request at most.")
    max_event_bytes: int = Field(
        default=65_536, ge=256, description="Largest event (its JSON), bytes."
    )
    per_installation: Rate | None = Field(
        default_factory=lambda: Rate(count=6000, per=3600.0),
        description="Events per installation (instance id), per process; null: no limit.",
    )
    per_address: Rate | None = Field(
        default_factory=lambda: Rate(count=600, per=60.0),
        description="Requests per client address, per process; null: no limit.",
    )
    max_future: float = Field(
        default=86400.0, ge=0, description="How far ahead of the clock an event's time may be."
    )
    max_spool_mb: float = Field(
        default=4096, gt=0, description="Past this size the spool takes nothing more (503)."
    )
    min_free_mb: float = Field(
        default=64, ge=0, description="Below this much free disk the spool takes nothing more."
    )

    _dur = field_validator("max_future", mode="before")(_duration)


class Retention(_Model):
    dedup: float = Field(
        default=7 * 86400.0, gt=0, description="How long event ids are remembered as seen."
    )
    receipts: float = Field(default=7 * 86400.0, gt=0, description="How long receipts are kept.")
    spool: float = Field(
        default=30 * 86400.0, gt=0, description="Oldest undelivered batch kept in the spool."
    )
    counts: float = Field(
        default=400 * 86400.0, gt=0, description="How long daily counts (stats) are kept."
    )
    events: float | None = Field(
        default=400 * 86400.0,
        description="Embedded storage only: events older than this are deleted (null: never).",
    )

    _dur = field_validator("dedup", "receipts", "spool", "counts", "events", mode="before")(
        _duration
    )


class ControlBlock(_Model):
    """Instructions for the fleet. Each can only make a client send less, or less often."""

    heartbeat_every: float | None = Field(
        default=None, gt=0, description="Seconds between heartbeats (a client never goes faster)."
    )
    sample: float | None = Field(
        default=None, ge=0, le=1, description="Share of non-heartbeat events a client sends."
    )
    pause_until: _dt.datetime | None = Field(
        default=None, description="Send nothing until then (UTC)."
    )

    _dur = field_validator("heartbeat_every", mode="before")(_duration)

    @field_validator("pause_until")
    @classmethod
    def _utc(cls, value: _dt.datetime | None) -> _dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value

    def as_wire(self) -> dict[str, Any]:
        """The block as clients receive it: only what is set."""
        out: dict[str, Any] = {}
        if self.heartbeat_every is not None:
            out["heartbeat_every"] = self.heartbeat_every
        if self.sample is not None:
            out["sample"] = self.sample
        if self.pause_until is not None:
            out["pause_until"] = (
                self.pause_until.astimezone(_dt.timezone.utc)
                .isoformat(timespec="seconds")
                .replace("+00:00", "Z")
            )
        return out


class AppControl(ControlBlock):
    """An app's control block, optionally overridden per version range (PEP 440 specifiers such
    as ``"<2.0"`` or ``">=1.4,<1.6"``; the first range that matches wins)."""

    versions: dict[str, ControlBlock] = Field(default_factory=dict)

    @field_validator("versions")
    @classmethod
    def _specifiers(cls, value: dict[str, ControlBlock]) -> dict[str, ControlBlock]:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        for spec in value:
            try:
                SpecifierSet(spec)
            except InvalidSpecifier:
                raise ValueError(
                    f"{spec!r} is not a version range (e.g. '<2.0', '>=1.4,<1.6')"
                ) from None
        return value


class DashboardConfig(_Model):
    username: str = Field(default="admin", min_length=1, description="HTTP Basic user name.")
    password: SecretStr | None = Field(
        default=None, description="HTTP Basic password; none: the dashboard refuses everyone."
    )

    @field_validator("password")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 12:
            raise ValueError("the dashboard password must be at least 12 characters")
        return value


class CollectorConfig(_Model):
    """The ``collector:`` section."""

    data_dir: Path = Field(
        default=Path("collector-data"),
        description="Spool, ledger, salts and the embedded storage; relative to the config file.",
    )
    apps: dict[str, AppConfig] = Field(description="Applications, by the name in their URL.")
    ip: Literal["hash", "drop"] = Field(
        default="hash", description="hash: keep a daily-salted hash of the address; drop: nothing."
    )
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list,
        description="Peers whose X-Forwarded-For is read (load balancers); nobody else's is.",
    )
    ack: Literal["spool", "storage"] = Field(
        default="spool",
        description="spool: answer once the spool has a batch; storage: once storage has it "
        "(the spool keeps only what storage did not take).",
    )
    limits: Limits = Field(default_factory=Limits)
    retention: Retention = Field(default_factory=Retention)
    control: dict[str, AppControl] = Field(default_factory=dict)
    storage: dict[str, dict[str, Any]] | None = Field(
        default=None, description="waypost sinks by name; none: the embedded SQLite storage."
    )
    destinations: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Sinks that `waypost collector consume --to` loads from a kafka storage "
        "sink; the collector's intake never writes to them.",
    )
    scrub: ScrubConfig = Field(default_factory=ScrubConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)

    _source: str | None = PrivateAttr(default=None)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [ipaddress.ip_network(str(v), strict=False) for v in value]
        return value

    @field_validator("apps")
    @classmethod
    def _app_names(cls, value: dict[str, AppConfig]) -> dict[str, AppConfig]:
        if not value:
            raise ValueError("name at least one application")
        for name in value:
            if not APP_NAME.match(name):
                raise ValueError(
                    f"app name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                    "(it is a path segment of the URL)"
                )
        return value

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        return {} if value is None else cls._storage(value)

    @field_validator("storage", mode="before")
    @classmethod
    def _storage(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value:
            raise ValueError("must be a mapping of sink names to their settings (or left out)")
        out: dict[str, dict[str, Any]] = {}
        for name, settings in value.items():
            settings = {} if settings is None else settings
            if not isinstance(settings, Mapping):
                raise ValueError(f"sink {name!r} must be a mapping, not {type(settings).__name__}")
            out[str(name)] = dict(settings)
        return out

    @model_validator(mode="after")
    def _control_apps(self) -> CollectorConfig:
        unknown = [name for name in self.control if name not in self.apps]
        if unknown:
            raise ValueError(
                f"control names app {unknown[0]!r}, which is not in collector.apps "
                f"(apps: {', '.join(self.apps)})"
            )
        return self

    @property
    def source(self) -> str | None:
        """The config file this was read from, if any."""
        return self._source

    @property
    def embedded_storage(self) -> bool:
        return self.storage is None

    def storage_specs(self) -> dict[str, dict[str, Any]]:
        """Storage sinks by name, each with its ``type`` (defaulting to the name)."""
        if self.storage is None:
            return {EMBEDDED: dict(EMBEDDED_SPEC)}
        return {name: {"type": name, **settings} for name, settings in self.storage.items()}

    def destination_specs(self) -> dict[str, dict[str, Any]]:
        """Destination sinks by name (for ``consume --to``), each with its ``type``."""
        return {name: {"type": name, **settings} for name, settings in self.destinations.items()}


def find_config(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """``WAYPOST_COLLECTOR_CONFIG``, else ``collector.yml`` (or ``.yaml``, ``.toml``) here."""
    env = os.environ if env is None else env
    if env.get("WAYPOST_COLLECTOR_CONFIG"):
        return Path(env["WAYPOST_COLLECTOR_CONFIG"])
    base = cwd or Path.cwd()
    for name in DEFAULT_FILES:
        if (base / name).is_file():
            return base / name
    return None


def load_config(
    config: str | os.PathLike[str] | Mapping[str, Any] | CollectorConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> CollectorConfig:
    """Read and check the config: a file (YAML or TOML), a mapping (with or without the
    ``collector`` key), or None (``WAYPOST_COLLECTOR_CONFIG`` or ``collector.yml`` here)."""
    env = os.environ if env is None else env
    if isinstance(config, CollectorConfig):
        return config
    if config is None:
        found = find_config(env)
        if found is None:
            raise ConfigError(
                "no config given: pass --config FILE (or set WAYPOST_COLLECTOR_CONFIG, or put "
                "a collector.yml in this directory)"
            )
        config = found
    source: str | None
    if isinstance(config, Mapping):
        data: dict[str, Any] = dict(config)
        source = "<config>"
        if ROOT in data:
            data = data[ROOT]
    else:
        source = str(config)
        raw = read_file(config)
        if ROOT not in raw:
            found_keys = ", ".join(map(str, raw)) or "nothing"
            raise ConfigError(f"no 'collector' key at the top (found: {found_keys})", source=source)
        data = raw[ROOT]
    if not isinstance(data, Mapping):
        raise ConfigError("must be a mapping", source=source, key=ROOT)
    try:
        data = {k: expand(v, env, f"{ROOT}.{k}") for k, v in data.items()}
    except ConfigError as exc:
        raise type(exc)(exc.reason, source=source, key=exc.key) from None
    try:
        result = CollectorConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, source=source, prefix=ROOT) from None
    data_dir = result.data_dir.expanduser()
    if not data_dir.is_absolute() and source not in (None, "<config>"):
        data_dir = Path(str(source)).resolve().parent / data_dir
    result = result.model_copy(update={"data_dir": data_dir})
    result._source = source
    return result
