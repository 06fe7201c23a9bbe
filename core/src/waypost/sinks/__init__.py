"""Sinks: the contract every sink implements, and the toolkit that HTTP sinks share.

- :mod:`waypost.sinks.base`: :class:`Sink` (generic over its config model), :class:`SinkConfig`,
  :class:`HttpSinkConfig`, :class:`SendResult`, :class:`SinkContext`.
- :mod:`waypost.sinks.transport`: :class:`HttpTransport` (one httpx client per process,
  User-Agent, timeouts, redirects never followed, transport errors mapped once, secrets masked),
  :func:`raise_for_status`, :func:`parse_retry_after`, :func:`snippet`, and
  :func:`requests_session` (with :func:`body_limit` and :func:`requests_errors`) for a sink
  on a vendor's requests-based layer.
- :mod:`waypost.sinks.parts`: :func:`send_in_parts`, one batch sent as several requests, and
  :func:`pack`, which cuts a batch into requests under a vendor's count and size limits.
- :mod:`waypost.sinks.masking`: :func:`mask`, :class:`Masker`, :func:`is_secret_name`,
  :func:`split_url`, :func:`mask_url`, and :func:`clean_message` for a database's errors.
- :mod:`waypost.sinks.process`: :class:`ProcessLocal`, a resource a forked child rebuilds, and
  :func:`keep_forever` for a client a child inherited and must never free.
- :mod:`waypost.sinks.cloudevents`: :func:`~waypost.sinks.cloudevents.cloudevent`, an event as a
  CloudEvent.
- :mod:`waypost.sinks.table`: the events table a table sink writes (its ``COLUMNS``, the
  ``distinct_id`` it counts by, the checks of an existing table and its added-column migration).

The transport imports httpx only when a sink builds one, so the core does not depend on it.
"""

from __future__ import annotations

from waypost.sinks.base import (
    HttpSinkConfig,
    Resource,
    SendResult,
    Sink,
    SinkConfig,
    SinkContext,
    check_endpoint,
    destination_of,
    is_loopback_host,
    not_blank,
)
from waypost.sinks.masking import (
    MASK,
    Masker,
    UrlSecrets,
    basic_auth,
    clean_message,
    is_secret_name,
    mask,
    mask_url,
    split_url,
)
from waypost.sinks.parts import (
    Chunk,
    Part,
    pack,
    send_in_parts,
    sift,
)
from waypost.sinks.process import (
    ProcessLocal,
    keep_forever,
)
from waypost.sinks.transport import (
    RESERVED_HEADERS,
    RETRYABLE_STATUS,
    Answers,
    BodyOverLimit,
    HttpTransport,
    body_limit,
    check_headers,
    json_object,
    parse_retry_after,
    raise_for_status,
    requests_errors,
    requests_session,
    snippet,
    user_agent,
)

__all__ = [
    "MASK",
    "RESERVED_HEADERS",
    "RETRYABLE_STATUS",
    "Answers",
    "BodyOverLimit",
    "Chunk",
    "HttpSinkConfig",
    "HttpTransport",
    "Masker",
    "Part",
    "ProcessLocal",
    "Resource",
    "SendResult",
    "Sink",
    "SinkConfig",
    "SinkContext",
    "UrlSecrets",
    "basic_auth",
    "body_limit",
    "check_endpoint",
    "check_headers",
    "clean_message",
    "destination_of",
    "is_loopback_host",
    "is_secret_name",
    "json_object",
    "keep_forever",
    "mask",
    "mask_url",
    "not_blank",
    "pack",
    "parse_retry_after",
    "raise_for_status",
    "requests_errors",
    "requests_session",
    "send_in_parts",
    "sift",
    "snippet",
    "split_url",
    "user_agent",
]
