"""Metrics: counters, up-down counters, gauges and histograms that the application declares,
kept in memory and read by exporters (the ``waypost-otel`` plugin) when they collect.

    from waypost.metrics import MANDATORY, OPTIONAL

    uploads = tel.metrics.counter(
        "files_uploaded", description="Files uploaded", unit="{file}",
        labels={"flow_id": MANDATORY, "kind": OPTIONAL},
    )
    uploads.add(1, {"flow_id": flow.id})

Pure Python: OpenTelemetry and Prometheus live in the plugin. Label values pass the same
scrubbers as event properties. An undeclared label or a missing mandatory one is refused:
:class:`waypost.TrackError` in strict mode, otherwise counted as dropped (reason
``metric_label``) and logged once.

Where metrics may go: telemetry off (``DO_NOT_TRACK``, consent, config) stops every push that
leaves the machine; the local Prometheus exposition is the operator's own and follows
``telemetry.metrics.prometheus.enabled`` (``PROMETHEUS_ENABLED`` overrides it), whatever the
consent. Exporters are named under ``telemetry.metrics`` (``otel: {host: ...}``) and loaded from
entry-point group ``waypost.metrics``.
"""

from __future__ import annotations

from waypost.metrics.instruments import (
    DEFAULT_BUCKETS,
    MANDATORY,
    MAX_SERIES,
    OPTIONAL,
    Counter,
    Gauge,
    Histogram,
    Instrument,
    Label,
    LabelValues,
    MetricData,
    MetricExporter,
    MetricInfo,
    MetricListener,
    Point,
    UpDownCounter,
)
from waypost.metrics.registry import GROUP, PROMETHEUS_ENV, MetricRegistry, prometheus_enabled

__all__ = [
    "DEFAULT_BUCKETS",
    "GROUP",
    "MANDATORY",
    "MAX_SERIES",
    "OPTIONAL",
    "PROMETHEUS_ENV",
    "Counter",
    "Gauge",
    "Histogram",
    "Instrument",
    "Label",
    "LabelValues",
    "MetricData",
    "MetricExporter",
    "MetricInfo",
    "MetricListener",
    "MetricRegistry",
    "Point",
    "UpDownCounter",
    "prometheus_enabled",
]
