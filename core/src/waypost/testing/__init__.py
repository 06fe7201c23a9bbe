"""Test helpers for applications and plugin authors (also a pytest plugin: its fixtures are
available in any project that installs waypost).

- :class:`RecordingServer` / :class:`Response`: a loopback HTTP server with scripted answers.
- :class:`Peer`, :class:`BasePeer`, :class:`HttpPeer`, :class:`Arrival`, :class:`PeerCannot`:
  the destinations the contract suite drives, whatever their transport.
- :func:`make_event`: an :class:`~waypost.Event` as the core would hand it to a sink.
- :func:`send_batch`: call a sink's ``send`` inside the core's error boundary.
- :class:`SinkContract`: subclass it in a sink's tests to prove the plugin contract.
- :func:`delivery_imports`: what a sink imports in ``open()``/``send()``/``close()`` (none).
- fixtures ``waypost_recording_server``, ``waypost_make_telemetry``, ``waypost_telemetry``,
  ``waypost_register_plugin``, ``waypost_clean_env``, ``waypost_peer`` (see
  :mod:`waypost.testing.plugin`).
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
from waypost.testing.imports import delivery_imports
from waypost.testing.peer import Arrival, BasePeer, HttpPeer, Peer, PeerCannot
from waypost.testing.server import RecordingServer, Request, Response, free_port

__all__ = [
    "Arrival",
    "BasePeer",
    "HttpPeer",
    "Peer",
    "PeerCannot",
    "RecordingServer",
    "Request",
    "Response",
    "SinkContract",
    "delivery_imports",
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
    """An event as the core hands it to sinks: a fresh UUIDv7 ``id``, the ``context`` of an
    app ``testapp`` 1.0.0 on this machine, ``properties`` as given (default
    ``{"n": <counter>, "ok": True}``). ``time_`` is Unix seconds (default now).
    ``distinct_id`` is the id the application gave (``tel.track(..., distinct_id=...)``);
    left empty, it is the instance id, as in the core."""
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
    """``n`` distinct events named ``name``, properties ``{"n": i, "ok": True}``; other
    keyword arguments go to :func:`make_event`."""
    return [make_event(name, {"n": i, "ok": True}, **kwargs) for i in range(n)]


def send_batch(sink: Sink, events: Sequence[Event]) -> SendResult:
    """What the core would record for this batch: exceptions become per-event results, 413
    splits, garbage returned from ``send`` is a retryable contract error."""
    result, _reason, _contract = call_send(sink, events)
    return result
