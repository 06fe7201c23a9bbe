"""The Prometheus exposition: a ``prometheus_client`` collector that reads the registry at each
scrape, served on a loopback port or mounted by the host as a WSGI or ASGI app."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from waypost.metrics import MetricData, MetricRegistry


class RegistryCollector(Collector):
    """Turns :meth:`MetricRegistry.collect` into metric families at each scrape."""

    def __init__(self, registry: MetricRegistry) -> None:
        self.registry = registry

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; names are the registry's to keep unique

    def collect(self) -> Iterator[Metric]:
        for data in self.registry.collect():
            yield _family(data)


def _family(data: MetricData) -> Metric:
    info = data.info
    names = list(info.labels)
    family: Any
    if info.kind == "counter":
        family = CounterMetricFamily(info.name, info.description, labels=names)
    elif info.kind == "histogram":
        family = HistogramMetricFamily(info.name, info.description, labels=names)
    else:  # gauge, up_down_counter
        family = GaugeMetricFamily(info.name, info.description, labels=names)
    for point in data.points:
        values = [point.labels.get(n, "") for n in names]
        if info.kind == "histogram":
            buckets: list[tuple[str, float]] = []
            total = 0
            for bound, count in zip((*info.buckets, math.inf), point.bucket_counts, strict=True):
                total += count
                buckets.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
            family.add_metric(values, buckets, point.sum)
        else:
            family.add_metric(values, point.value)
    return family  # type: ignore[no-any-return]


def collector_registry(registry: MetricRegistry) -> CollectorRegistry:
    """A ``prometheus_client`` registry of its own (not the global one) holding the metrics."""
    target = CollectorRegistry(auto_describe=False)
    target.register(RegistryCollector(registry))
    return target


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
AsgiApp = Callable[..., Any]


def off_wsgi_app(reason: str) -> WsgiApp:
    body = f"the Prometheus exposition is off: {reason}\n".encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


def off_asgi_app(reason: str) -> AsgiApp:
    body = f"the Prometheus exposition is off: {reason}\n".encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app
