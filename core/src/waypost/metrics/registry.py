"""The registry of one instance's metrics (``tel.metrics``): declaring, recording support
(scrubbing label values, refusals), listeners, exporters, reading, and the rule that decides
whether the local Prometheus exposition is on."""

from __future__ import annotations

import importlib.metadata as md
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from waypost import plugins
from waypost.errors import ConfigError, PluginError, TrackError, WaypostError
from waypost.instance import Instance
from waypost.logs import get_logger
from waypost.metrics.health import HEALTH, HEALTH_TTL, health_points
from waypost.metrics.instruments import (
    MAX_SERIES,
    Counter,
    DisabledCounter,
    DisabledGauge,
    DisabledHistogram,
    DisabledUpDownCounter,
    Gauge,
    Histogram,
    Instrument,
    Label,
    LabelValues,
    MetricData,
    MetricInfo,
    Point,
    UpDownCounter,
    declared_info,
    shape_text,
)
from waypost.privacy import parse_bool
from waypost.status import LogOnce

if TYPE_CHECKING:
    from waypost.config import TelemetryConfig
    from waypost.plugins import ExporterFactory
    from waypost.privacy import Decision, Scrubber
    from waypost.status import Status

log = get_logger(__name__)

GROUP = plugins.METRICS_GROUP
"""Deprecated: exporters are registered by the ``register_metric_exporters`` hook."""
PROMETHEUS_ENV = "PROMETHEUS_ENABLED"


_LIVE: weakref.WeakSet[MetricRegistry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for registry in list(_LIVE):
        registry._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _entry_points() -> dict[str, md.EntryPoint]:
    """The deprecated entry-point group ``waypost.metrics`` (``name = module:attach``)."""
    return plugins.entry_points(GROUP)


class MetricsHost(Instance, Protocol):
    """What a registry (and the exporters attached to it, through ``registry.telemetry``)
    reads of its :class:`waypost.Telemetry`."""

    @property
    def config_file(self) -> str | None: ...
    @property
    def env(self) -> Mapping[str, str]: ...
    @property
    def decision(self) -> Decision: ...

    def status(self) -> Status:
        """The instance's status (the health metrics are computed from it)."""
        ...

    def label_scrubber(self) -> Scrubber | None:
        """The scrubber label values pass, whether telemetry is on or off (None: off)."""
        ...


_I = TypeVar("_I", bound=Instrument)


def prometheus_enabled(config: TelemetryConfig, env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the local Prometheus exposition is on, and the rule that decided."""
    raw = env.get(PROMETHEUS_ENV)
    flag = parse_bool(raw)
    if flag is not None:
        return flag, f"{PROMETHEUS_ENV}={raw} is set in the environment"
    enabled = bool(config.metrics.prometheus.enabled)
    return enabled, f"telemetry.metrics.prometheus.enabled is {'true' if enabled else 'false'}"


class MetricRegistry:
    """The metrics of one :class:`waypost.Telemetry` (``tel.metrics``).

    Declare with :meth:`counter`, :meth:`up_down_counter`, :meth:`gauge`, :meth:`histogram`;
    exporters read :meth:`collect` and may mirror instruments through :meth:`add_listener`.
    """

    def __init__(
        self,
        telemetry: MetricsHost,
        *,
        max_series: int = MAX_SERIES,
        load_exporters: bool = True,
    ) -> None:
        self.telemetry = telemetry
        self.config = telemetry.config
        self.strict = telemetry.strict
        self.max_series = max_series
        self.env: Mapping[str, str] = telemetry.env
        self.prometheus_enabled, self.prometheus_rule = prometheus_enabled(self.config, self.env)
        self.start_time = time.time()
        self._lock = threading.RLock()
        self._instruments: dict[str, Instrument] = {}
        self.listeners: list[Any] = []
        self._exporters: dict[str, Any] = {}
        self._log_once = LogOnce(log)
        self._health_cache: tuple[float, dict[str, list[Point]]] = (-math.inf, {})
        self._closed = False
        _LIVE.add(self)
        if load_exporters:
            self._load_exporters()

    # --- declaring ----------------------------------------------------------------------------

    def counter(
        self,
        name: str,
        *,
        description: str = "",
        unit: str = "",
        labels: Mapping[str, Label | bool | str] | Iterable[str] = (),
    ) -> Counter:
        """A monotonic counter; ``labels`` maps each label to ``MANDATORY`` or ``OPTIONAL``."""
        declared = self._declare(Counter, name, description=description, unit=unit, labels=labels)
        return declared or DisabledCounter(self, MetricInfo(str(name), Counter.kind))

    def up_down_counter(
        self,
        name: str,
        *,
        description: str = "",
        unit: str = "",
        labels: Mapping[str, Label | bool | str] | Iterable[str] = (),
    ) -> UpDownCounter:
        """A sum that may go down."""
        declared = self._declare(
            UpDownCounter, name, description=description, unit=unit, labels=labels
        )
        return declared or DisabledUpDownCounter(self, MetricInfo(str(name), UpDownCounter.kind))

    def gauge(
        self,
        name: str,
        *,
        description: str = "",
        unit: str = "",
        labels: Mapping[str, Label | bool | str] | Iterable[str] = (),
    ) -> Gauge:
        """The last value set per label set."""
        declared = self._declare(Gauge, name, description=description, unit=unit, labels=labels)
        return declared or DisabledGauge(self, MetricInfo(str(name), Gauge.kind))

    def histogram(
        self,
        name: str,
        *,
        description: str = "",
        unit: str = "",
        labels: Mapping[str, Label | bool | str] | Iterable[str] = (),
        buckets: Iterable[float] | None = None,
    ) -> Histogram:
        """A distribution; ``buckets`` are the upper bounds (default: OpenTelemetry's)."""
        declared = self._declare(
            Histogram, name, description=description, unit=unit, labels=labels, buckets=buckets
        )
        return declared or DisabledHistogram(self, MetricInfo(str(name), Histogram.kind))

    def _declare(
        self,
        cls: type[_I],
        name: str,
        *,
        description: str,
        unit: str,
        labels: Mapping[str, Label | bool | str] | Iterable[str],
        buckets: Iterable[float] | None = None,
    ) -> _I | None:
        """The instrument declared (or the one already declared with the same shape); None
        when the declaration is refused in production (strict mode raises)."""
        try:
            info = declared_info(
                cls.kind, name, description=description, unit=unit, labels=labels, buckets=buckets
            )
            with self._lock:
                existing = self._instruments.get(name)
                if existing is not None:
                    if existing.info.shape != info.shape or not isinstance(existing, cls):
                        raise TrackError(
                            f"metric {name!r} is already declared as {shape_text(existing.info)}; "
                            f"it cannot be declared again as {shape_text(info)}"
                        )
                    return existing
                instrument = cls(self, info)
                self._instruments[name] = instrument
                listeners = list(self.listeners)
        except TrackError as exc:
            if self.strict:
                raise
            self.refuse("metric_declaration", str(exc), f"declare:{name}")
            return None
        for listener in listeners:
            self._call(listener, "on_declare", info)
        return instrument

    def get(self, name: str) -> Instrument | None:
        """A declared instrument by name."""
        return self._instruments.get(name)

    # --- recording support --------------------------------------------------------------------

    def recording(self) -> bool:
        """Whether values are kept: while some destination may read them, the operator's own
        local exposition, or pushes while telemetry is on."""
        return self.prometheus_enabled or bool(self.telemetry.enabled)

    def refuse(self, reason: str, message: str, key: str) -> None:
        """A refused declaration or recording: :class:`waypost.TrackError` in strict mode,
        otherwise counted as dropped (``reason``) and logged once per ``key``."""
        if self.strict:
            raise TrackError(message)
        self.telemetry.counters.drop(reason)
        self._log_once(f"{reason}:{key}", "waypost: metric recording dropped: %s", message)

    def label_scrubber(self) -> Scrubber | None:
        """The scrubber label values pass: the instance's (None when scrubbing is off)."""
        return self.telemetry.label_scrubber()

    # --- listeners and exporters --------------------------------------------------------------

    def add_listener(self, listener: Any, *, replay: bool = True) -> None:
        """Call ``listener.on_declare(info)`` for each metric (built-in ones first, then those
        declared so far when ``replay``, then each new one) and ``listener.on_record(info,
        value, labels)`` after each recording."""
        with self._lock:
            self.listeners = [*self.listeners, listener]
            known = list(self.infos()) if replay else []
        for info in known:
            self._call(listener, "on_declare", info)

    def remove_listener(self, listener: Any) -> None:
        with self._lock:
            self.listeners = [x for x in self.listeners if x is not listener]

    def notify(self, info: MetricInfo, value: float, key: LabelValues) -> None:
        """Tell each listener of a recording (a failing listener is logged, never raised)."""
        for listener in self.listeners:
            self._call(listener, "on_record", info, value, key)

    def _call(self, listener: Any, method: str, *args: Any) -> None:
        fn: Callable[..., Any] | None = getattr(listener, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # a listener must not break the host
            self._log_once(
                f"listener:{method}:{type(exc).__name__}",
                "waypost: metrics listener %r failed in %s: %s: %s",
                listener,
                method,
                type(exc).__name__,
                exc,
            )

    def attach(self, name: str, exporter: Any) -> None:
        """Keep an exporter (closed with the registry, listed in :meth:`destinations`)."""
        with self._lock:
            old = self._exporters.pop(name, None)
            self._exporters[name] = exporter
        if old is not None and old is not exporter:
            old.close()

    def exporter(self, name: str) -> Any:
        """An attached exporter by name (``registry.exporter("otel")``)."""
        return self._exporters.get(name)

    def _load_exporters(self) -> None:
        wanted = dict(self.config.metrics.model_extra or {})
        if not wanted:
            return
        for name, given in wanted.items():
            key = f"telemetry.metrics.{name}"
            settings = {} if given is None else given
            try:
                if not isinstance(settings, Mapping):
                    raise ConfigError(
                        f"must be a mapping of exporter settings, not {type(settings).__name__}",
                        key=key,
                    )
                attach, where = self._find_exporter(name, key)
                try:
                    exporter = attach(self, dict(settings))
                except WaypostError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"metrics exporter {name!r} ({where}) failed to start: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                self.attach(name, exporter)
            except WaypostError as exc:
                if isinstance(exc, ConfigError) and exc.source is None:
                    exc = ConfigError(exc.reason, source=self.telemetry.config_file, key=exc.key)
                if self.strict:
                    raise exc from None
                log.error("waypost: metrics exporter %r is off: %s", name, exc)

    def _find_exporter(self, name: str, key: str) -> tuple[ExporterFactory, str]:
        """The exporter ``name`` and where it comes from: a plugin's
        ``register_metric_exporters``, else the deprecated entry-point group."""
        pm = self.telemetry.plugins
        attach = pm.metric_exporter(name)
        if attach is not None:
            return attach, getattr(attach, "__module__", None) or "a plugin"
        old = _entry_points()
        if name in old:
            warnings.warn(
                f"metrics exporter {name!r} ({old[name].value}): {plugins.deprecated_group(GROUP)}",
                DeprecationWarning,
                stacklevel=2,
            )
            try:
                loaded: ExporterFactory = old[name].load()
            except Exception as exc:
                raise PluginError(
                    f"metrics exporter {name!r} ({old[name].value}) failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            return loaded, old[name].value
        installed = ", ".join(sorted({*pm.metric_exporters(), *old})) or "none"
        raise ConfigError(
            f"unknown metrics exporter {name!r}: installed exporters are {installed}; "
            f"pip install waypost-{name.replace('_', '-')}",
            key=key,
        )

    def destinations(self) -> list[dict[str, Any]]:
        """Where metrics go, as the attached exporters report it: ``name``, ``target``,
        ``leaves_machine``, ``active`` and ``reason`` (why on or off)."""
        out: list[dict[str, Any]] = []
        for name, exporter in list(self._exporters.items()):
            try:
                out.extend(exporter.destinations())
            except Exception as exc:
                out.append(
                    {
                        "name": name,
                        "target": None,
                        "leaves_machine": None,
                        "active": False,
                        "reason": f"error: {type(exc).__name__}: {exc}",
                    }
                )
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Close the exporters (a last push where one is due). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            exporters = list(self._exporters.values())
        deadline = time.monotonic() + timeout
        for exporter in exporters:
            try:
                exporter.close(max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("waypost: closing a metrics exporter failed: %s", exc)

    # --- reading ------------------------------------------------------------------------------

    def infos(self) -> list[MetricInfo]:
        """Every metric: the built-in health metrics, then the declared ones."""
        with self._lock:
            declared = [i.info for i in self._instruments.values()]
        return [*HEALTH, *declared]

    def points(self, name: str) -> list[Point]:
        """The current points of one metric (health metrics are computed now)."""
        instrument = self._instruments.get(name)
        if instrument is not None:
            return instrument.points()
        return self._health().get(name, [])

    def collect(self, *, builtin: bool = True) -> list[MetricData]:
        """A snapshot of every metric and its points, for exporters."""
        now = time.time()
        health = self._health() if builtin else {}
        out = []
        for info in self.infos():
            if info.builtin:
                if builtin:
                    out.append(MetricData(info, health.get(info.name, []), self.start_time, now))
                continue
            out.append(
                MetricData(info, self._instruments[info.name].points(), self.start_time, now)
            )
        return out

    def _health(self) -> dict[str, list[Point]]:
        at, cached = self._health_cache
        now = time.monotonic()
        if now - at < HEALTH_TTL:
            return cached
        try:
            points = health_points(self.telemetry.status())
        except Exception as exc:
            self._log_once(
                "health", "waypost: health metrics unavailable: %s: %s", type(exc).__name__, exc
            )
            points = {}
        self._health_cache = (now, points)
        return points

    def describe(self) -> list[dict[str, Any]]:
        """Every metric and where it goes, for ``waypost manifest`` and ``waypost status``."""
        active = [d["name"] for d in self.destinations() if d.get("active")]
        out = []
        for info in self.infos():
            entry: dict[str, Any] = {
                "name": info.name,
                "type": info.kind,
                "unit": info.unit,
                "description": info.description,
                "labels": [{"name": n, "mandatory": n in info.mandatory} for n in info.labels],
                "builtin": info.builtin,
                "destinations": list(active),
            }
            if info.kind == "histogram":
                entry["buckets"] = list(info.buckets)
            out.append(entry)
        return out

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        for instrument in list(self._instruments.values()):
            instrument.after_fork()

    def __repr__(self) -> str:
        return (
            f"<MetricRegistry metrics={len(self._instruments)} exporters={list(self._exporters)}>"
        )
