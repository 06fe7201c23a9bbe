"""The configuration's models: the ``telemetry:`` section and its parts, as pydantic models
that refuse unknown keys, and the duration values they take (``30s``, ``24h``)."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from waypost.config.values import flag, is_flag_field
from waypost.events import name_problem
from waypost.privacy.secrets import masked


def _event_name(value: str | None) -> str | None:
    problem = None if value is None else name_problem(value)
    if problem is not None:
        raise ValueError(f"event name {value!r} {problem}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``30s``, ``5m``, ``24h``, ``7d``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (e.g. 30, 30s, 5m, 24h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _flags(cls, value: Any, info: ValidationInfo) -> Any:
        # Booleans through the project's one parser (pydantic's own takes t, f, y and n too).
        return flag(value) if info.field_name and is_flag_field(cls, info.field_name) else value


class BatchConfig(_Model):
    size: int = Field(default=500, ge=1, description="Events per batch handed to a sink.")
    interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between the worker's drains; the longest an unsent event waits in "
        "memory before it is stored too.",
    )

    _dur = field_validator("interval", mode="before")(parse_duration)


class OutboxConfig(_Model):
    max_age: float = Field(default=7 * 86400.0, gt=0, description="Oldest undelivered event kept.")
    max_size_mb: float = Field(default=512, gt=0, description="Largest outbox file kept.")
    keep_sent: float = Field(
        default=0, ge=0, description="Keep delivered records this long for inspection (0: drop)."
    )
    durability: Literal["batch", "sync"] = Field(
        default="batch",
        description="batch: unsent events reach the outbox within two batch.interval; sync: inside "
        "track().",
    )
    buffer: int = Field(
        default=10_000,
        ge=1,
        description="Events each sink's queue holds in memory before they spill to the outbox "
        "(the buffer in front of the worker holds five times as many before track() waits).",
    )

    _dur = field_validator("max_age", "keep_sent", mode="before")(parse_duration)


class RetryConfig(_Model):
    initial: float = Field(default=1.0, gt=0, description="First backoff, seconds.")
    maximum: float = Field(default=300.0, gt=0, description="Longest backoff, seconds.")
    max_attempts: int | None = Field(
        default=None, ge=1, description="Give up after this many attempts (default: until max_age)."
    )
    breaker_threshold: int = Field(
        default=5, ge=1, description="Failed batches in a row that open a sink's circuit."
    )

    _dur = field_validator("initial", "maximum", mode="before")(parse_duration)


class LimitsConfig(_Model):
    """What one event may hold, checked before anything scans it. The defaults follow the
    vendors' own limits: PostHog takes 900 KiB an event, Amplitude 1 MB a request, Mixpanel
    2 MB; Amplitude's SDKs refuse more than 1,000 properties. (GA4's much tighter limits stay
    in its plugin.)"""

    name: int = Field(
        default=200,
        ge=1,
        le=200,
        description="Characters in an event name (the rule's 200 at most).",
    )
    value: int = Field(
        default=65_536,
        ge=1,
        description="Characters in one text value; a longer one is truncated (a remark says so).",
    )
    keys: int = Field(
        default=1_000,
        ge=1,
        description="Keys in one object (or items in one list); past it the event is refused.",
    )
    depth: int = Field(
        default=32, ge=1, le=100, description="Objects and lists nested in one another."
    )
    event_bytes: int = Field(
        default=900 * 1024,
        ge=256,
        description="Encoded size of an event's properties; past it the event is refused.",
    )


class ScrubConfig(_Model):
    enabled: bool = True
    disable: list[str] = Field(default_factory=list, description="Built-in rules to switch off.")
    patterns: dict[str, str] = Field(
        default_factory=dict, description="Extra rules: name -> regular expression."
    )
    keys: list[str] = Field(
        default_factory=list, description="Extra property names whose values are always redacted."
    )

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {name!r} is not a valid regular expression: {exc}"
                ) from None
        return patterns


class NoticeConfig(_Model):
    enabled: bool = True
    text: str | None = Field(default=None, description="The notice; a default names the app.")


class HeartbeatConfig(_Model):
    """A periodic snapshot (FlowForge's ping): sent ``first_delay`` after start, then every
    ``every`` at ``time_of_day`` (``random``: picked at start; ``HH:MM`` UTC; null: no fixed
    time), at most once per period per installation."""

    enabled: bool = True
    event: str = "heartbeat"
    every: float = Field(default=86400.0, gt=0)
    first_delay: float = Field(default=30.0, ge=0)
    time_of_day: str | None = "random"
    jitter: float = Field(default=0.0, ge=0)

    _dur = field_validator("every", "first_delay", "jitter", mode="before")(parse_duration)

    _name = field_validator("event")(_event_name)

    @field_validator("time_of_day")
    @classmethod
    def _time_of_day(cls, value: str | None) -> str | None:
        if value is None or value == "random":
            return value
        hours, sep, minutes = value.partition(":")
        if not (sep and hours.isdigit() and minutes.isdigit() and int(hours) < 24
                and int(minutes) < 60):  # fmt: skip
            raise ValueError(f"{value!r} is not a time of day: HH:MM (UTC), random or null")
        return value


class MetricsPrometheusConfig(_Model):
    """The local Prometheus exposition: the operator's own, not third-party telemetry."""

    enabled: bool = True
    port: int | None = Field(default=None, ge=0, le=65535, description="Serve /metrics here.")
    host: str = Field(default="127.0.0.1", description="Address to serve /metrics on.")


class MetricsConfig(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    prometheus: MetricsPrometheusConfig = Field(default_factory=MetricsPrometheusConfig)

    def exports(self) -> bool:
        """Whether an exporter is configured (a Prometheus port, or another exporter by name):
        such exporters start with the application."""
        return self.prometheus.port is not None or bool(
            set(self.model_extra or ()) - {"prometheus"}
        )

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():  # exporters' settings: plain mappings
            yield name, (value if name == "prometheus" else masked(value, name=name or ""))


_MASKED = ("sinks", "metrics")
"""The settings of the telemetry section that hold plain mappings (plugins' settings)."""


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class TimestampsConfig(_Model):
    """The times ``track(..., timestamp=...)`` accepts: from ``earliest`` to ``ahead`` of now.
    Anything else is refused (strict mode) or dropped and counted."""

    earliest: _dt.datetime = Field(
        default=_dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc),
        description="The oldest event time accepted (UTC); set it earlier to backfill history "
        "(1970-01-01 at the earliest).",
    )
    ahead: float = Field(
        default=86400.0, ge=0, le=366 * 86400, description="How far ahead of now a time may be."
    )

    _dur = field_validator("ahead", mode="before")(parse_duration)

    @field_validator("earliest", mode="before")
    @classmethod
    def _date(cls, value: Any) -> Any:
        if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
            return _dt.datetime(value.year, value.month, value.day, tzinfo=_dt.timezone.utc)
        return value

    @field_validator("earliest")
    @classmethod
    def _since_epoch(cls, value: _dt.datetime) -> _dt.datetime:
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        if value < _EPOCH:
            raise ValueError("must be 1970-01-01 or later (event ids count from there)")
        if value.year > 9000:
            raise ValueError("must be a time before the year 9000")
        return value


class TelemetryConfig(_Model):
    """The ``telemetry:`` section."""

    app: str | None = Field(default=None, description="Application name (also set in code).")
    version: str | None = Field(default=None, description="Application version.")
    enabled: bool | None = Field(
        default=None, description="On or off for this installation; overrides the admin choice."
    )
    mode: Literal["opt-out", "opt-in"] = "opt-out"
    disable_env: str | None = Field(default=None, description="App's opt-out variable (true=off).")
    enable_env: str | None = Field(default=None, description="App's opt-in variable (true=on).")
    level: Literal["off", "error", "usage", "all"] = "usage"
    policy_version: str = Field(default="1", description="Bump to ask for consent again (opt-in).")
    schemas: list[str] = Field(default_factory=list, description="Modules declaring Payloads.")
    plugins: list[str] = Field(default_factory=list, description="Modules with hook impls.")
    sinks: dict[str, dict[str, Any]] | None = Field(
        default=None, description="Sink instances by name; no sinks key means the log sink."
    )
    data_dir: Path | None = None
    strict: bool = False
    debug: bool = False
    distinct_id: str | None = Field(default=None, description="Id to count by (instance id).")
    batch: BatchConfig = Field(default_factory=BatchConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    scrub: ScrubConfig = Field(default_factory=ScrubConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    notice: NoticeConfig = Field(default_factory=NoticeConfig)
    shutdown_timeout: float = Field(default=3.0, ge=0, description="Budget at interpreter exit.")
    handle_sigterm: bool = Field(
        default=True,
        description="Deliver or store what is in memory when SIGTERM comes (docs/servers.md).",
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    heartbeat: HeartbeatConfig | None = Field(
        default=None, description="Send a heartbeat snapshot periodically."
    )
    shutdown_event: str | None = Field(
        default=None, description="Track this event with the run time at shutdown."
    )
    timestamps: TimestampsConfig = Field(
        default_factory=TimestampsConfig, description="The event times track() accepts."
    )

    _dur = field_validator("shutdown_timeout", mode="before")(parse_duration)
    _name = field_validator("shutdown_event")(_event_name)

    @field_validator("sinks", mode="before")
    @classmethod
    def _sinks(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError("must be a mapping of sink names to their settings")
        out: dict[str, dict[str, Any]] = {}
        for name, settings in value.items():
            if settings is None:
                settings = {}
            if not isinstance(settings, Mapping):
                raise ValueError(f"sink {name!r} must be a mapping, not {type(settings).__name__}")
            out[str(name)] = dict(settings)
        return out

    # Sink and exporter settings are plain mappings until a plugin types them: what a repr or
    # a dump shows of them is masked (secret names, header maps, URL credentials).
    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, (masked(value, name=name or "") if name in _MASKED else value)

    @model_serializer(mode="wrap")
    def _dump_masked(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in _MASKED:
                if data.get(name) is not None:
                    data[name] = masked(data[name], name=name)
        return data

    def sink_specs(self) -> dict[str, dict[str, Any]]:
        """Sink instances by name, each with its ``type`` (defaulting to the name)."""
        sinks = {"log": {}} if self.sinks is None else self.sinks
        return {name: {"type": name, **settings} for name, settings in sinks.items()}
