"""Configuration: YAML or TOML under a ``telemetry:`` root, ``WAYPOST_...`` environment
overrides and ``${VAR}`` expansion. Every error names the file, the key path and the reason."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from waypost.errors import ConfigError, MissingVariableError

ENV_PREFIX = "WAYPOST_"
DEFAULT_FILES = ("telemetry.yml", "telemetry.yaml", "telemetry.toml", "waypost.yml", "waypost.toml")
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
        default=10_000, ge=1, description="Events held in memory before they spill to the outbox."
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


class MetricsPrometheusConfig(_Model):
    """The local Prometheus exposition: the operator's own, not third-party telemetry."""

    enabled: bool = True
    port: int | None = Field(default=None, ge=0, le=65535, description="Serve /metrics here.")
    host: str = Field(default="127.0.0.1", description="Address to serve /metrics on.")


class MetricsConfig(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    prometheus: MetricsPrometheusConfig = Field(default_factory=MetricsPrometheusConfig)


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
    notice: NoticeConfig = Field(default_factory=NoticeConfig)
    shutdown_timeout: float = Field(default=3.0, ge=0, description="Budget at interpreter exit.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    heartbeat: HeartbeatConfig | None = Field(
        default=None, description="Send a heartbeat snapshot periodically."
    )
    shutdown_event: str | None = Field(
        default=None, description="Track this event with the run time at shutdown."
    )

    _dur = field_validator("shutdown_timeout", mode="before")(parse_duration)

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

    def sink_specs(self) -> dict[str, dict[str, Any]]:
        """Sink instances by name, each with its ``type`` (defaulting to the name)."""
        sinks = {"log": {}} if self.sinks is None else self.sinks
        return {name: {"type": name, **settings} for name, settings in sinks.items()}


# --- loading ----------------------------------------------------------------------------------


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML or TOML file into a dict (the ``telemetry:`` root is not removed)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=source) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}".replace("\n", " "), source=source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping with a 'telemetry' key", source=source)
    return data


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def expand(value: Any, env: Mapping[str, str], key: str = "telemetry") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string, recursively."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise MissingVariableError(f"environment variable {name} is not set", key=key)

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand(v, env, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_ENV_SKIP = {"HOME", "CONFIG", "APP", "DEBUG"}


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``WAYPOST_LEVEL=all`` sets ``telemetry.level``; ``__`` nests: ``WAYPOST_SINKS__POSTHOG__
    API_KEY`` sets ``telemetry.sinks.posthog.api_key``. ``WAYPOST_HOME`` is the data dir."""
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or raw == "":
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest in _ENV_SKIP:
            continue
        path = [part.lower() for part in rest.split("__") if part]
        if not path:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = _scalar(raw)
    if env.get("WAYPOST_HOME"):
        out["data_dir"] = env["WAYPOST_HOME"]
    if env.get("WAYPOST_DEBUG"):
        out["debug"] = _truthy(env["WAYPOST_DEBUG"])
    return out


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on", "y")


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def find_config(env: Mapping[str, str], cwd: Path | None = None) -> Path | None:
    """The config file to use when none is given: ``WAYPOST_CONFIG``, then a default name in
    the working directory."""
    if env.get("WAYPOST_CONFIG"):
        return Path(env["WAYPOST_CONFIG"])
    base = cwd or Path.cwd()
    for name in DEFAULT_FILES:
        if (base / name).is_file():
            return base / name
    return None


def load(
    config: str | os.PathLike[str] | Mapping[str, Any] | TelemetryConfig | None,
    env: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[TelemetryConfig, str | None]:
    """Build the effective config and return it with the name of its source file (if any)."""
    env = os.environ if env is None else env
    if isinstance(config, TelemetryConfig):
        return config, None
    source: str | None = None
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        data = dict(config)
        source = "<config>"
    else:
        source = str(config)
        data = read_file(config)
    if "telemetry" in data:
        section = data["telemetry"]
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ConfigError("must be a mapping", source=source, key="telemetry")
        data = dict(section)
    elif source and source != "<config>" and data:
        raise ConfigError(
            f"no 'telemetry' key at the top (found: {', '.join(map(str, data))})", source=source
        )
    data = merge(data, env_overrides(env))
    if overrides:
        data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        # Sink settings are expanded when each sink is made, so a secret missing from this
        # environment turns off that sink (or fails it, in strict mode), not the whole config.
        data = {
            k: (v if k == "sinks" else expand(v, env, f"telemetry.{k}")) for k, v in data.items()
        }
    except ConfigError as exc:
        raise type(exc)(exc.reason, source=source, key=exc.key) from None
    try:
        return TelemetryConfig.model_validate(data), source
    except ValidationError as exc:
        raise validation_error(exc, source=source, prefix="telemetry") from None


def validation_error(exc: ValidationError, *, source: str | None, prefix: str) -> ConfigError:
    """One ConfigError that lists each pydantic error with its full key path."""
    parts = []
    first_key = None
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "__root__")
        first_key = first_key or loc
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append((loc, msg))
    if len(parts) == 1:
        return ConfigError(parts[0][1], source=source, key=parts[0][0])
    detail = "; ".join(f"{loc}: {msg}" for loc, msg in parts)
    return ConfigError(detail, source=source)
