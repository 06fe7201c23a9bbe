"""Pydantic's validation errors as one :class:`waypost.ConfigError` naming every key path."""

from __future__ import annotations

from pydantic import ValidationError

from waypost.errors import ConfigError


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
