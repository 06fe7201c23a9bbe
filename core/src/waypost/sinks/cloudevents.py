"""Events as CloudEvents (https://cloudevents.io, specification 1.0, JSON format), for a sink
that offers that format (the http and kafka sinks' ``format: cloudevents``)."""

from __future__ import annotations

from typing import Any

from waypost.events import Event

__all__ = ["cloudevent"]


def cloudevent(event: Event, source: str, type_prefix: str = "waypost.") -> dict[str, Any]:
    """``event`` as a CloudEvent: its id, ``source`` (a URI reference naming the sender, such
    as ``/waypost/<app>``), the type ``type_prefix`` + its name, its time, and the generic
    envelope as JSON ``data``."""
    return {
        "specversion": "1.0",
        "id": event.id,
        "source": source,
        "type": type_prefix + event.name,
        "time": event.iso_timestamp,
        "datacontenttype": "application/json",
        "data": event.to_dict(),
    }
