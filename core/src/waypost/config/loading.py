"""Loading the configuration: a YAML or TOML file under a ``telemetry:`` root, ``WAYPOST_...``
environment overrides and ``${VAR}`` expansion. Every error names the file, the key path and the
reason."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from waypost.config.models import TelemetryConfig
from waypost.config.validation import validation_error
from waypost.errors import ConfigError, MissingVariableError
from waypost.privacy.consent import parse_bool

ENV_PREFIX = "WAYPOST_"
DEFAULT_FILES = ("telemetry.yml", "telemetry.yaml", "telemetry.toml", "waypost.yml", "waypost.toml")


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
            raise ConfigError(f"invalid YAML: {_yaml_problem(exc)}", source=source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping with a 'telemetry' key", source=source)
    return data


def _yaml_problem(exc: Exception) -> str:
    """What is wrong and where (line and column), never the text of the line: PyYAML's own
    message quotes it, and the line may hold a secret."""
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    context = getattr(exc, "context", None)
    text = f"{problem}{_at(getattr(exc, 'problem_mark', None))}"
    if context:
        text += f" ({context}{_at(getattr(exc, 'context_mark', None))})"
    return text


def _at(mark: Any) -> str:
    line, column = getattr(mark, "line", None), getattr(mark, "column", None)
    if not (isinstance(line, int) and isinstance(column, int)):
        return ""
    return f" at line {line + 1}, column {column + 1}"


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
        out["debug"] = parse_bool(env["WAYPOST_DEBUG"]) is True
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
