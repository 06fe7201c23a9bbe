"""``GET /metrics``: the collector in Prometheus text. Counts come from the ledger (so every
process sharing the data dir reports the same totals), depths from the spool, latencies from
this process."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PromCollector

if TYPE_CHECKING:
    from waypost_collector.intake import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Families(PromCollector):
    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self.collector
        totals = c.ledger.totals()
        events = CounterMetricFamily(
            "waypost_collector_events",
            "Events received, by app and outcome (accepted, duplicate, refused, retry).",
            labels=["app", "outcome", "reason"],
        )
        requests = CounterMetricFamily(
            "waypost_collector_requests_refused",
            "Whole requests refused, by app and reason.",
            labels=["app", "reason"],
        )
        for app, entry in sorted(totals.items()):
            for outcome in ("accepted", "duplicate", "retry"):
                events.add_metric([app, outcome, ""], entry[outcome])
            for reason, n in sorted(entry["refused"].items()):
                events.add_metric([app, "refused", reason], n)
            for reason, n in sorted(entry["requests_refused"].items()):
                requests.add_metric([app, reason], n)
        yield events
        yield requests
        depth = GaugeMetricFamily(
            "waypost_collector_spool_rows",
            "Rows in the spool (each a batch of up to 100 events), by storage sink and state.",
            labels=["storage", "state"],
        )
        for sink, states in sorted(c.spool.depth().items()):
            for state, n in sorted(states.items()):
                depth.add_metric([sink, state], n)
        yield depth
        lag = c.spool.lag()
        yield GaugeMetricFamily(
            "waypost_collector_storage_lag_seconds",
            "Age of the oldest batch not yet in storage (0 when the spool is empty).",
            value=lag or 0.0,
        )
        up = GaugeMetricFamily(
            "waypost_collector_storage_up",
            "1 when a storage sink is delivering (not failing or refusing to open).",
            labels=["storage", "type"],
        )
        for snap in c.spool.storage_state():
            up.add_metric([snap["name"], snap["type"]], 1.0 if snap["state"] == "ok" else 0.0)
        yield up


class Metrics:
    """The registry of one collector app (never the global one: several apps may share a
    process, in tests)."""

    def __init__(self, collector: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Families(collector))
        self.ack_seconds = Histogram(
            "waypost_collector_ack_seconds",
            "Seconds from a batch's arrival to its answer, in this process.",
            ["app"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
