"""waypost-otel: waypost's metrics for Prometheus scraping and OTLP/HTTP push.

Switched on by config (entry point ``otel`` in group ``waypost.metrics``)::

    telemetry:
      metrics:
        prometheus: {enabled: true}          # PROMETHEUS_ENABLED overrides
        otel:
          host: http://127.0.0.1:4318        # OTLP/HTTP push, only while telemetry is on
          interval: 60s
          prometheus_port: 9464              # local exposition on 127.0.0.1:9464

or in code: ``waypost_otel.attach(tel.metrics, {"host": ...})``. A host that serves HTTP itself
mounts :func:`wsgi_app` or :func:`asgi_app` instead of opening a port.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from prometheus_client import make_asgi_app, make_wsgi_app, start_http_server
from pydantic import ValidationError

from waypost.config import validation_error
from waypost.metrics import MetricRegistry
from waypost_otel.config import OtelMetricsConfig
from waypost_otel.prometheus import (
    AsgiApp,
    RegistryCollector,
    WsgiApp,
    collector_registry,
    off_asgi_app,
    off_wsgi_app,
)

__all__ = [
    "OtelExporter",
    "OtelMetricsConfig",
    "RegistryCollector",
    "asgi_app",
    "attach",
    "collector_registry",
    "wsgi_app",
]

log = logging.getLogger("waypost.metrics.otel")
NAME = "otel"


class OtelExporter:
    """The exporter ``attach`` returns: the local Prometheus exposition and the OTLP push."""

    def __init__(self, registry: MetricRegistry, config: OtelMetricsConfig) -> None:
        self.registry = registry
        self.config = config
        self.prometheus = collector_registry(registry)
        self.mounted = False
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.bridge: Any = None
        self._closed = False
        self._lock = threading.Lock()
        port = config.prometheus_port
        if port is None:  # the core's own key, where the core declares it
            port = getattr(registry.config.metrics.prometheus, "port", None)
        self.port: int | None = port
        if port is not None and registry.prometheus_enabled:
            self._serve(config.prometheus_host, port)
        if config.endpoint is not None and registry.telemetry.enabled:
            # Built only while telemetry is on: with it off no thread runs and no socket opens.
            from waypost_otel.otlp import OtlpBridge

            self.bridge = OtlpBridge(registry, config)
        ref = weakref.ref(self)
        self._exit_hook = lambda: _close_at_exit(ref)
        atexit.register(self._exit_hook)

    def _serve(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.prometheus)
        self.port = int(self._server.server_port)
        log.info("waypost: Prometheus metrics on %s", self.prometheus_url)

    @property
    def prometheus_url(self) -> str | None:
        """Where the exposition answers (``None`` when it is not served on a port)."""
        if self._server is None:
            return None
        host = self.config.prometheus_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def flush(self, timeout: float = 10.0) -> bool:
        """Push now (a no-op while telemetry is off or no ``host`` is set)."""
        return True if self.bridge is None else bool(self.bridge.flush(timeout))

    def wsgi_app(self) -> WsgiApp:
        """The exposition as a WSGI app for the host to mount (404 while it is switched off)."""
        if not self.registry.prometheus_enabled:
            return off_wsgi_app(self.registry.prometheus_rule)
        self.mounted = True
        return make_wsgi_app(self.prometheus)

    def asgi_app(self) -> AsgiApp:
        """The exposition as an ASGI app for the host to mount (404 while it is switched off)."""
        if not self.registry.prometheus_enabled:
            return off_asgi_app(self.registry.prometheus_rule)
        self.mounted = True
        return make_asgi_app(self.prometheus)

    def destinations(self) -> list[dict[str, Any]]:
        registry = self.registry
        tel = registry.telemetry
        served = self._server is not None
        if not registry.prometheus_enabled:
            prom_reason = f"off: {registry.prometheus_rule}"
        elif served or self.mounted:
            prom_reason = f"on: {registry.prometheus_rule}; the operator's own, kept local"
        else:
            prom_reason = "not served: set prometheus_port or mount wsgi_app()/asgi_app()"
        out = [
            {
                "name": "prometheus",
                "target": self.prometheus_url or ("mounted by the host" if self.mounted else None),
                "leaves_machine": False,
                "active": registry.prometheus_enabled and (served or self.mounted),
                "reason": prom_reason,
            }
        ]
        if self.config.endpoint is not None:
            enabled = bool(tel.enabled)
            if not enabled:
                reason = f"off: telemetry is off ({tel.decision.reason})"
            elif self.bridge is None:
                reason = "off: telemetry was off when metrics started; restart to push"
            else:
                reason = f"on: every {self.config.interval:g}s while telemetry is on"
            out.append(
                {
                    "name": "otlp",
                    "target": self.config.endpoint,
                    "leaves_machine": True,
                    "active": enabled and self.bridge is not None,
                    "reason": reason,
                }
            )
        return out

    def close(self, timeout: float = 5.0) -> None:
        """A last push (if telemetry is on), then stop serving. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._exit_hook)
        if self.bridge is not None:
            try:
                self.bridge.close(timeout)
            except Exception as exc:
                log.warning("waypost: closing the OTLP push failed: %s", exc)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __repr__(self) -> str:
        return f"<OtelExporter prometheus={self.prometheus_url} otlp={self.config.endpoint}>"


def _close_at_exit(ref: weakref.ReferenceType[OtelExporter]) -> None:
    exporter = ref()
    if exporter is not None:
        exporter.close(float(getattr(exporter.registry.config, "shutdown_timeout", 3.0)))


def attach(registry: MetricRegistry, settings: Mapping[str, Any] | None = None) -> OtelExporter:
    """Start the exporter for ``registry`` (the ``waypost.metrics`` entry point ``otel``)."""
    try:
        config = OtelMetricsConfig.model_validate(dict(settings or {}))
    except ValidationError as exc:
        raise validation_error(
            exc,
            source=getattr(registry.telemetry, "config_file", None),
            prefix=f"telemetry.metrics.{NAME}",
        ) from None
    exporter = OtelExporter(registry, config)
    registry.attach(NAME, exporter)
    return exporter


def _exporter_for(registry: MetricRegistry) -> OtelExporter:
    exporter = registry.exporter(NAME)
    if isinstance(exporter, OtelExporter):
        return exporter
    return attach(registry, {})


def wsgi_app(registry: MetricRegistry) -> WsgiApp:
    """The registry's Prometheus exposition as a WSGI app (attaches the exporter if needed)."""
    return _exporter_for(registry).wsgi_app()


def asgi_app(registry: MetricRegistry) -> AsgiApp:
    """The registry's Prometheus exposition as an ASGI app (attaches the exporter if needed)."""
    return _exporter_for(registry).asgi_app()
