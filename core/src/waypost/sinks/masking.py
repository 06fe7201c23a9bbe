"""Secrets kept out of every text a sink produces, through the core's one sanitiser
(:mod:`waypost.privacy.secrets`): the names a plugin imports from the toolkit.

A sink's reasons reach logs, ``status()``, the outbox, the CLI and the admin page. Each reason
the toolkit builds passes :meth:`waypost.Sink.mask`, the sink's :class:`Masker`: it knows the
sink's configured secrets (``SecretStr`` fields, header values, URL credentials) in the forms an
answer echoes them, masks URL user info and secret-looking ``name=value`` pairs wherever they
stand, and runs the scrubbers. The process's sanitiser (the log lines of the libraries a sink
talks through, and every reason again) knows them as long as the sink lives: one sink's
secrets mask nothing of another's once it is gone. URLs are split from their credentials
(:func:`split_url`) before any request is made.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Any

from waypost.privacy.secrets import (
    MASK,
    SANITISER,
    UrlSecrets,
    basic_auth,
    is_secret_name,
    sanitise,
    secret_values,
    split_url,
)

__all__ = [
    "MASK",
    "Masker",
    "UrlSecrets",
    "basic_auth",
    "clean_message",
    "is_secret_name",
    "mask",
    "mask_url",
    "split_url",
]


def mask_url(text: str) -> str:
    """``text`` with URL user info and the values of secret-looking ``name=value`` pairs
    replaced by ``***`` wherever they stand in it (and everything else the sanitiser masks)."""
    return sanitise(text)


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with ``secrets`` (in every form an answer may echo them), every secret the
    process knows and URL credentials masked as ``***``: for texts that no sink's own
    :meth:`~waypost.Sink.mask` covers."""
    return sanitise(SANITISER.apart(secrets)(text))


class Masker:
    """A sink's masking function: its own secrets masked in every form an answer may echo
    them, then what the sanitiser finds by shape (URL user info, secret ``name=value`` pairs,
    the scrubbers' rules). While the masker lives (as long as its sink) the process's sanitiser
    (:func:`waypost.privacy.sanitise`) knows its secrets too."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._any = False
        self._own = SANITISER.apart()
        self._held = SANITISER.hold()
        weakref.finalize(self, self._held.release, wait=False)
        self.add_all(secrets)

    @classmethod
    def for_config(cls, config: Any) -> Masker:
        """A masker for every secret in a config: ``SecretStr`` values at any depth, the values
        of header maps and secret-named settings, and the credentials of URLs (including
        ``url_secrets``)."""
        return cls(secret_values(config))

    def add(self, secret: str) -> None:
        """Mask ``secret`` too (from now on, in this sink's texts and, while it lives, the
        process's)."""
        self.add_all((secret,))

    def add_all(self, secrets: Iterable[str]) -> None:
        found = [s for s in secrets if isinstance(s, str) and s]
        self._any = self._any or bool(found)
        self._own.add(found)
        self._held.add(found)

    def release(self) -> None:
        """Let the process's sanitiser forget these secrets (done when the masker is collected;
        this masker keeps masking them)."""
        self._held.release()

    def __bool__(self) -> bool:
        return self._any

    def __call__(self, text: str) -> str:
        return self._own(text)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NOISE = ("DETAIL", "HINT", "CONTEXT", "LINE ", "QUERY", "WHERE", "^")


def clean_message(
    message: str, known: Iterable[str], *, redact: bool = True, limit: int = 300
) -> str:
    """A database's error message fit for a reason: detail lines (``DETAIL``, ``HINT``,
    ``QUERY``...) dropped, the others joined in one line, quoted text that is not one of the
    ``known`` identifiers (the table, its columns) replaced by ``'…'``, since a database may
    quote the values of a row it refused, which are event data (unless ``redact`` is off:
    connection failures carry no values); cut to ``limit`` characters."""
    names = {k.lower() for k in known if k}
    lines = [line.strip() for line in message.splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith(_NOISE))

    def keep(match: re.Match[str]) -> str:
        quoted = match.group(0)
        parts = [p.strip("\"'").lower() for p in quoted[1:-1].split(".")]
        if parts and all(p in names for p in parts):
            return quoted
        return quoted[0] + "…" + quoted[0]

    if redact:
        text = _QUOTED.sub(keep, text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
