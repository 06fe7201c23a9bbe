"""Test helpers for applications and plugin authors (also a pytest plugin: its fixtures are
available in any project that installs waypost).

- :class:`RecordingServer` / :class:`Response`: a loopback HTTP peer with scripted answers.
- :func:`make_event`: an :class:`~waypost.Event` as the core would hand it to a sink.
- :func:`send_batch`: call a sink's ``send`` inside the core's error boundary.
- :class:`SinkContract`: subclass it in a sink's tests to prove the plugin contract.
- fixtures ``recording_server``, ``make_telemetry``, ``telemetry``, ``register_plugin``,
  ``clean_env`` (see :mod:`waypost.testing.plugin`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from waypost.delivery.boundary import call_send
from waypost.events import Event, base_context, uuid7
from waypost.sinks import SendResult, Sink
from waypost.testing.contract import SinkContract
from waypost.testing.server import RecordingServer, Request, Response, free_port

__all__ = [
    "RecordingServer",
    "Request",
    "Response",
    "SinkContract",
    "free_port",
    "make_event",
    "make_events",
    "send_batch",
]

_counter = itertools.count()
INSTANCE_ID = "5db51f99-c6fb-4340-9c19-78adce58cc1b"


def make_event(
    name: str = "test_event",
    properties: dict[str, Any] | None = None,
    *,
    time_: float | None = None,
    instance_id: str = INSTANCE_ID,
    distinct_id: str = "",
) -> Event:
    """An event as the core hands it to sinks (id a fresh UUIDv7)."""
    when = time.time() if time_ is None else time_
    props = {"n": next(_counter), "ok": True} if properties is None else properties
    return Event(
        id=uuid7(when),
        name=name,
        time=when,
        instance_id=instance_id,
        properties=props,
        context=base_context("testapp", "1.0.0"),
        distinct_id=distinct_id or instance_id,
    )


def make_events(n: int, name: str = "test_event", **kwargs: Any) -> list[Event]:
    """``n`` distinct events."""
    return [make_event(name, {"n": i, "ok": True}, **kwargs) for i in range(n)]


def send_batch(sink: Sink, events: Sequence[Event]) -> SendResult:
    """What the core would record for this batch: exceptions become per-event results, 413
    splits, garbage returned from ``send`` is a retryable contract error."""
    result, _reason, _contract = call_send(sink, events)
    return result
