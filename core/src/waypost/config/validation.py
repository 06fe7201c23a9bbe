"""Pydantic's validation errors as one :class:`waypost.ConfigError` naming every key path."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from waypost.errors import ConfigError


def validation_error(
    exc: ValidationError,
    *,
    source: str | None,
    prefix: str,
    origins: Mapping[str, str] | None = None,
) -> ConfigError:
    """One ConfigError that lists each pydantic error with its full key path; ``origins``
    (key path -> environment variable) names the variable behind a value that came from one."""
    origins = origins or {}
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
        loc, msg = parts[0]
        if loc in origins:
            return ConfigError(msg, source=f"{origins[loc]} in the environment", key=loc)
        return ConfigError(msg, source=source, key=loc)
    detail = "; ".join(
        (f"{loc} (from {origins[loc]})" if loc in origins else loc) + f": {msg}"
        for loc, msg in parts
    )
    return ConfigError(detail, source=source)
