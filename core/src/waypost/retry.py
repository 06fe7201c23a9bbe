"""Retry policy and error classification: the one place that decides what is retried and when."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

from waypost.errors import PayloadTooLarge, PermanentError, RetryableError

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def raise_for_status(
    status: int,
    headers: Mapping[str, str] | None = None,
    body: str = "",
    *,
    what: str = "",
    retry_after: float | None = None,
) -> None:
    """Classify an HTTP answer: return on 2xx, else raise the matching ``SinkError``.

    408, 425, 429 and 5xx are retryable (honouring ``Retry-After``), 413 asks the core to split
    the batch, every other status is permanent. The body's first 300 characters go in the reason.
    ``retry_after`` (seconds) stands in for the header when a client library parsed it already.
    """
    if 200 <= status < 300:
        return
    snippet = " ".join(body.split())[:300]
    reason = f"{what + ': ' if what else ''}HTTP {status}{': ' + snippet if snippet else ''}"
    if status == 413:
        raise PayloadTooLarge(reason)
    if status in RETRYABLE_STATUS or status >= 500:
        wait = (
            retry_after
            if retry_after is not None
            else parse_retry_after(_header(headers, "Retry-After"))
        )
        raise RetryableError(reason, retry_after=wait)
    raise PermanentError(reason)


# Backoff moved to waypost.delivery.backoff; importable from here as before.
from waypost.delivery.backoff import Backoff  # noqa: E402, F401
