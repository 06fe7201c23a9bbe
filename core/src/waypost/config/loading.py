"""Loading the configuration: a YAML or TOML file under a ``telemetry:`` root, ``WAYPOST_...``
environment overrides and ``${VAR}`` expansion. Every error names the file, the key path and the
reason."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from waypost.config.files import check_shape, read_file
from waypost.config.models import TelemetryConfig
from waypost.config.validation import validation_error
from waypost.config.values import EnvValue, conform, from_json, parse_bool, plain
from waypost.errors import ConfigError, MissingVariableError

log = logging.getLogger(__name__)

ENV_PREFIX = "WAYPOST_"
DEFAULT_FILES = ("telemetry.yml", "telemetry.yaml", "telemetry.toml", "waypost.yml", "waypost.toml")


_REF_LIMIT = 8
"""How deep ``${A:-${B:-...}}`` defaults may nest."""


def expand(value: Any, env: Mapping[str, str], key: str = "telemetry") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string, recursively; a default may
    hold references itself (``${A:-${B}}``) and ``$${`` is a literal ``${``. A variable set to
    the empty string counts as unset. Values taken from ``WAYPOST_...`` variables are left as
    they are."""
    if isinstance(value, EnvValue):
        return value
    if isinstance(value, str):
        if "${" not in value:
            return value
        _expand_text(value, 0, env, key, depth=0, evaluate=False)  # the syntax first
        text, _ = _expand_text(value, 0, env, key, depth=0, evaluate=True)
        return text
    if isinstance(value, dict):
        return {k: expand(v, env, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand_text(
    text: str, pos: int, env: Mapping[str, str], key: str, *, depth: int, evaluate: bool
) -> tuple[str, int]:
    """Expand ``text`` from ``pos`` up to an unmatched ``}`` (inside a default) or the end;
    returns the expansion and where it stopped. ``evaluate`` false only finds the end (a
    default that is not used names no variable that must be set)."""
    out: list[str] = []
    i, n = pos, len(text)
    while i < n:
        ch = text[i]
        if ch == "$" and text.startswith("$${", i):
            out.append("${")
            i += 3
        elif ch == "$" and text.startswith("${", i):
            name = _NAME.match(text, i + 2)
            if name is None:
                raise ConfigError(
                    f"{text[i : i + 20]!r}: ${{ must start a reference such as ${{NAME}} or "
                    "${NAME:-default}; write $${ for a literal ${",
                    key=key,
                )
            j = name.end()
            default: str | None = None
            if text.startswith(":-", j) or text.startswith("-", j):
                j += 2 if text[j] == ":" else 1
                if depth >= _REF_LIMIT:
                    raise ConfigError(
                        f"defaults nested deeper than {_REF_LIMIT} levels (the limit)", key=key
                    )
                value = env.get(name.group()) if evaluate else None
                use_default = evaluate and not value
                default, j = _expand_text(text, j, env, key, depth=depth + 1, evaluate=use_default)
            if j >= n or text[j] != "}":
                raise ConfigError(
                    f"unterminated reference {text[i : i + 20]!r}: close it with }} (or write "
                    "$${ for a literal ${)",
                    key=key,
                )
            if evaluate:
                value = env.get(name.group())
                if value:
                    out.append(value)
                elif default is not None:
                    out.append(default)
                else:
                    raise MissingVariableError(
                        f"environment variable {name.group()} is not set", key=key
                    )
            i = j + 1
        elif ch == "}" and depth > 0:
            return "".join(out), i
        else:
            stops = (text.find("$", i + 1), text.find("}", i + 1))
            nxt = min((p for p in stops if p >= 0), default=n)
            out.append(text[i:nxt])
            i = nxt
    return "".join(out), i


_ENV_OTHER = {"HOME", "CONFIG", "APP", "DEBUG", "COLLECTOR_CONFIG"}
"""``WAYPOST_...`` variables that are not settings (the data dir, the config file, the CLI's
application name, debug mode, the collector's config file)."""


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``WAYPOST_LEVEL=all`` sets ``telemetry.level``; ``__`` nests: ``WAYPOST_SINKS__POSTHOG__
    API_KEY`` sets ``telemetry.sinks.posthog.api_key``. ``WAYPOST_HOME`` is the data dir.

    Each value is an :class:`~waypost.config.values.EnvValue`: text, until
    :func:`~waypost.config.values.conform` makes it what its field takes."""
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or raw == "":
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest in _ENV_OTHER:
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
            node[path[-1]] = EnvValue(raw, name)
    if env.get("WAYPOST_HOME"):
        out["data_dir"] = EnvValue(env["WAYPOST_HOME"], "WAYPOST_HOME")
    if env.get("WAYPOST_DEBUG"):
        out["debug"] = parse_bool(env["WAYPOST_DEBUG"]) is True  # anything else is off
    return out


def env_origins(overrides: Mapping[str, Any], prefix: str = "telemetry") -> dict[str, str]:
    """Key path -> the variable that set it, for error messages."""
    out: dict[str, str] = {}
    for key, value in overrides.items():
        path = f"{prefix}.{key}"
        if isinstance(value, EnvValue):
            out[path] = value.variable
        elif isinstance(value, Mapping):
            out.update(env_origins(value, path))
    return out


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
    notes: list[str] | None = None,
    sink_sources: dict[str, Any] | None = None,
) -> tuple[TelemetryConfig, str | None]:
    """Build the effective config and return it with the name of its source file (if any).

    ``notes`` receives the warnings that do not make the config invalid (a ``WAYPOST_...``
    variable that names no setting); without it they are logged. ``sink_sources`` receives
    each sink's settings as written, for :func:`conform` against the sink's own model when
    the sink is made (the config itself holds them as YAML 1.1 and the environment read
    them: ``0123`` is 83 there, the sink's text field takes ``"0123"``)."""
    env = os.environ if env is None else env
    if isinstance(config, TelemetryConfig):
        return config, None
    source: str | None = None
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        source = "<config>"
        check_shape(config, source)
        data = dict(config)
    else:
        source = str(config)
        data = read_file(config, marked=True)
    if "telemetry" in data:
        section = data["telemetry"]
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ConfigError("must be a mapping", source=source, key="telemetry")
        data = dict(section)
    elif source and source != "<config>" and data:
        found = ", ".join(str(k) for k in list(data)[:10])
        raise ConfigError(f"no 'telemetry' key at the top (found: {found})", source=source)
    from_env = env_overrides(env)
    data = merge(data, from_env)
    if overrides:
        data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    heard: list[str] = []
    try:
        # Sink settings are expanded and typed when each sink is made (by the sink's own
        # model), so a secret missing from this environment turns off that sink (or fails it,
        # in strict mode), not the whole config.
        sinks = data.pop("sinks", _ABSENT)
        data = {k: expand(v, env, f"telemetry.{k}") for k, v in data.items()}
        data = conform(TelemetryConfig, data, "telemetry", heard)
        if isinstance(sinks, EnvValue):
            sinks = from_json(sinks, dict, "telemetry.sinks")
        if sinks is not _ABSENT:
            if sink_sources is not None and isinstance(sinks, Mapping):
                sink_sources.update(sinks)
            data["sinks"] = plain(sinks)
    except ConfigError as exc:
        raise type(exc)(exc.reason, source=exc.source or source, key=exc.key) from None
    for note in heard:
        if notes is None:
            log.warning("waypost: %s", note)
        else:
            notes.append(note)
    try:
        return TelemetryConfig.model_validate(data), source
    except ValidationError as exc:
        raise validation_error(
            exc, source=source, prefix="telemetry", origins=env_origins(from_env)
        ) from None


_ABSENT: Any = object()
