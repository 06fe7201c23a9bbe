"""The OpenTelemetry side: one MeterProvider per registry, an instrument per metric, and a
periodic OTLP/HTTP push that sends nothing while telemetry is off."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

import waypost
from waypost.metrics import LabelValues, MetricInfo, MetricRegistry
from waypost.sinks.transport import bounded_session
from waypost_otel.config import OtelMetricsConfig

log = logging.getLogger("waypost.metrics.otel")


class GatedExporter(MetricExporter):
    """Delegates to the OTLP exporter only while ``allowed()`` holds (telemetry on): with
    ``DO_NOT_TRACK`` or consent withdrawn, a due push is skipped and nothing leaves."""

    def __init__(self, inner: MetricExporter, allowed: Callable[[], bool]) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.allowed = allowed
        self.skipped = 0
        self.exported = 0
        self.failed = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if not self.allowed():
            self.skipped += 1
            return MetricExportResult.SUCCESS
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is MetricExportResult.SUCCESS:
            self.exported += 1
        else:
            self.failed += 1
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class OtlpBridge:
    """Mirrors the registry onto an OpenTelemetry MeterProvider.

    Counters, up-down counters and gauges become observable instruments whose callbacks read
    the registry at each collection (so values recorded before the bridge started count);
    histograms become OpenTelemetry histograms with the declared buckets, fed by the
    registry's ``on_record`` notifications.
    """

    def __init__(
        self,
        registry: MetricRegistry,
        config: OtelMetricsConfig,
        *,
        exporter: MetricExporter | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        tel = registry.telemetry
        assert config.endpoint is not None
        inner = exporter or OTLPMetricExporter(
            endpoint=config.endpoint,
            headers=config.header_values(),
            timeout=config.timeout,
            # Answers read within bounds (1 MiB, the timeout), redirects never followed.
            session=bounded_session(config.timeout),
        )
        self.exporter = GatedExporter(inner, lambda: bool(tel.enabled))
        self.reader = PeriodicExportingMetricReader(
            self.exporter,
            export_interval_millis=config.interval * 1000,
            export_timeout_millis=config.timeout * 1000,
        )
        attributes: dict[str, Any] = {
            "service.name": tel.app,
            "service.version": tel.version,
            "telemetry.sdk.name": "waypost",
            "telemetry.sdk.version": waypost.__version__,
        }
        if getattr(tel, "instance_id", None):
            attributes["service.instance.id"] = tel.instance_id
        # shutdown_on_exit=False: the SDK's own exit hook waits up to 30 s; ours is bounded.
        self.provider = MeterProvider(
            metric_readers=[self.reader],
            resource=Resource.create(attributes),
            shutdown_on_exit=False,
        )
        self.meter = self.provider.get_meter("waypost", waypost.__version__)
        self._histograms: dict[str, Any] = {}
        self._declared: set[str] = set()
        registry.add_listener(self)

    # --- MetricListener -----------------------------------------------------------------------

    def on_declare(self, info: MetricInfo) -> None:
        if info.name in self._declared:
            return
        self._declared.add(info.name)
        meter = self.meter
        if info.kind == "histogram":
            self._histograms[info.name] = meter.create_histogram(
                info.name,
                unit=info.unit,
                description=info.description,
                explicit_bucket_boundaries_advisory=list(info.buckets),
            )
            return
        create = {
            "counter": meter.create_observable_counter,
            "up_down_counter": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }[info.kind]
        create(
            info.name,
            callbacks=[self._observe(info.name)],
            unit=info.unit,
            description=info.description,
        )

    def on_record(self, info: MetricInfo, value: float, labels: LabelValues) -> None:
        histogram = self._histograms.get(info.name)
        if histogram is not None:
            histogram.record(value, info.label_dict(labels))

    def _observe(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        registry = self.registry

        def callback(options: CallbackOptions) -> Sequence[Observation]:
            return [Observation(p.value, p.labels) for p in registry.points(name)]

        return callback

    # --- lifecycle ----------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Collect and push now (skipped while telemetry is off); False if the push failed."""
        failed = self.exporter.failed
        ok = self.provider.force_flush(timeout_millis=timeout * 1000)
        return bool(ok) and self.exporter.failed == failed

    def close(self, timeout: float = 5.0) -> None:
        self.registry.remove_listener(self)
        self.provider.shutdown(timeout_millis=max(timeout, 0.001) * 1000)
