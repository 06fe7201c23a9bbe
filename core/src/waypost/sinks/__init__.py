"""Sinks: the contract every sink implements, and the toolkit that HTTP sinks share.

- :mod:`waypost.sinks.base`: :class:`Sink` (generic over its config model), :class:`SinkConfig`,
  :class:`HttpSinkConfig`, :class:`SendResult`, :class:`SinkContext`.
- :mod:`waypost.sinks.transport`: :class:`HttpTransport` (one httpx client per process,
  User-Agent, timeouts, redirects never followed, transport errors mapped once, secrets masked),
  :func:`raise_for_status`, :func:`parse_retry_after`, :func:`snippet`.
- :mod:`waypost.sinks.parts`: :func:`send_in_parts`, one batch sent as several requests.
- :mod:`waypost.sinks.masking`: :class:`Masker`, :func:`is_secret_name`, :func:`split_url`,
  :func:`mask_url`.
- :mod:`waypost.sinks.process`: :class:`ProcessLocal`, a resource a forked child rebuilds.

The transport imports httpx only when a sink builds one, so the core does not depend on it.
"""

from __future__ import annotations

from waypost.sinks.base import (
    HttpSinkConfig,
    SendResult,
    Sink,
    SinkConfig,
    SinkContext,
    check_endpoint,
    is_loopback_host,
)
from waypost.sinks.masking import MASK, Masker, UrlSecrets, is_secret_name, mask_url, split_url
from waypost.sinks.parts import Part, send_in_parts
from waypost.sinks.process import ProcessLocal
from waypost.sinks.transport import (
    RETRYABLE_STATUS,
    HttpTransport,
    parse_retry_after,
    raise_for_status,
    snippet,
    user_agent,
)

__all__ = [
    "MASK",
    "RETRYABLE_STATUS",
    "HttpSinkConfig",
    "HttpTransport",
    "Masker",
    "Part",
    "ProcessLocal",
    "SendResult",
    "Sink",
    "SinkConfig",
    "SinkContext",
    "UrlSecrets",
    "check_endpoint",
    "is_loopback_host",
    "is_secret_name",
    "mask_url",
    "parse_retry_after",
    "raise_for_status",
    "send_in_parts",
    "snippet",
    "split_url",
    "user_agent",
]
