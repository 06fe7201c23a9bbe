"""The built-in health metrics (``waypost_*``), computed from ``status()`` when read."""

from __future__ import annotations

from typing import Any

from waypost.metrics.instruments import MetricInfo, Point


def _health(name: str, kind: str, description: str, unit: str = "", *labels: str) -> MetricInfo:
    return MetricInfo(name, kind, description, unit, labels, frozenset(labels), builtin=True)


HEALTH: tuple[MetricInfo, ...] = (
    _health("waypost_telemetry_enabled", "gauge", "1 when usage telemetry is on, 0 when off"),
    _health("waypost_events_accepted", "counter", "Events accepted by track()", "{event}"),
    _health("waypost_events_stored", "counter", "Events written to the outbox", "{event}"),
    _health("waypost_events_delivered", "counter", "Events delivered", "{event}", "sink"),
    _health("waypost_events_retried", "counter", "Deliveries to retry", "{event}", "sink"),
    _health("waypost_events_failed", "counter", "Events refused for good", "{event}", "sink"),
    _health(
        "waypost_events_dropped", "counter", "Events or recordings dropped", "{event}", "reason"
    ),
    _health(
        "waypost_buffered_events",
        "gauge",
        "Events held only in memory: the buffer and the sinks' queues",
        "{event}",
    ),
    _health("waypost_outbox_pending", "gauge", "Records waiting for delivery", "{record}", "sink"),
    _health(
        "waypost_sink_up",
        "gauge",
        "1 when a sink delivers or is idle, else 0; absent while telemetry is off",
        "",
        "sink",
    ),
)
HEALTH_TTL = 1.0  # one scrape reads status() once, however many instruments ask


def health_points(status: Any) -> dict[str, list[Point]]:
    counters = status.counters
    sinks = status.sinks
    return {
        "waypost_telemetry_enabled": [Point({}, 1.0 if status.enabled else 0.0)],
        "waypost_events_accepted": [Point({}, float(counters.accepted))],
        "waypost_events_stored": [Point({}, float(counters.stored))],
        "waypost_events_delivered": [Point({"sink": s.name}, float(s.delivered)) for s in sinks],
        "waypost_events_retried": [Point({"sink": s.name}, float(s.retried)) for s in sinks],
        "waypost_events_failed": [Point({"sink": s.name}, float(s.failed)) for s in sinks],
        "waypost_events_dropped": [
            Point({"reason": reason}, float(n)) for reason, n in sorted(counters.dropped.items())
        ],
        "waypost_buffered_events": [
            Point({}, float(status.buffered + sum(s.in_memory for s in sinks)))
        ],
        "waypost_outbox_pending": [Point({"sink": s.name}, float(s.pending)) for s in sinks],
        # Off (DO_NOT_TRACK, consent withdrawn) is no outage: no point, so an alert on
        # waypost_sink_up == 0 does not fire for every opted-out installation.
        "waypost_sink_up": [
            Point({"sink": s.name}, 1.0 if s.state in ("ok", "idle") else 0.0)
            for s in sinks
            if status.enabled
        ],
    }
