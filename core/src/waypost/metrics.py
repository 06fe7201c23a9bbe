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

import bisect
import enum
import importlib.metadata as md
import itertools
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from waypost.errors import ConfigError, PluginError, TrackError, WaypostError
from waypost.pipeline import LogOnce
from waypost.privacy import Scrubber, parse_bool

if TYPE_CHECKING:
    from waypost.privacy import Rule

__all__ = [
    "DEFAULT_BUCKETS",
    "GROUP",
    "MANDATORY",
    "OPTIONAL",
    "Counter",
    "Gauge",
    "Histogram",
    "Instrument",
    "Label",
    "MetricData",
    "MetricExporter",
    "MetricInfo",
    "MetricListener",
    "MetricRegistry",
    "Point",
    "UpDownCounter",
    "prometheus_enabled",
]

log = logging.getLogger("waypost.metrics")

GROUP = "waypost.metrics"
PROMETHEUS_ENV = "PROMETHEUS_ENABLED"
# OpenTelemetry's default explicit bucket boundaries.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0,
    7500.0, 10000.0,
)  # fmt: skip
MAX_SERIES = 1000
_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]{0,199}$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,99}$")
_RESERVED_PREFIX = "waypost_"


class Label(str, enum.Enum):
    """Whether a declared label must be given on every recording."""

    MANDATORY = "mandatory"
    OPTIONAL = "optional"


MANDATORY = Label.MANDATORY
OPTIONAL = Label.OPTIONAL

LabelValues = tuple[str | None, ...]  # in declaration order; None: an optional label left out


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: its identity and shape, without values."""

    name: str
    kind: str  # counter, up_down_counter, gauge, histogram
    description: str = ""
    unit: str = ""
    labels: tuple[str, ...] = ()
    mandatory: frozenset[str] = frozenset()
    buckets: tuple[float, ...] = ()
    builtin: bool = False

    @property
    def shape(self) -> tuple[Any, ...]:
        return (self.kind, self.unit, self.labels, self.mandatory, self.buckets)

    def label_dict(self, values: LabelValues) -> dict[str, str]:
        return {k: v for k, v in zip(self.labels, values, strict=True) if v is not None}


@dataclass(frozen=True)
class Point:
    """One series of a metric: its labels and its current value. Histograms carry per-bucket
    counts (not cumulative; one more than there are bounds, the last for values above them)."""

    labels: dict[str, str]
    value: float = 0.0
    bucket_counts: tuple[int, ...] = ()
    count: int = 0
    sum: float = 0.0
    min: float = math.nan
    max: float = math.nan


@dataclass(frozen=True)
class MetricData:
    """A metric and its points at one collection (what exporters read)."""

    info: MetricInfo
    points: list[Point]
    start_time: float
    time: float


class MetricListener(Protocol):
    """Mirrors instruments elsewhere (the OpenTelemetry plugin). Both methods are optional."""

    def on_declare(self, info: MetricInfo) -> None: ...

    def on_record(self, info: MetricInfo, value: float, labels: LabelValues) -> None: ...


class MetricExporter(Protocol):
    """What an exporter plugin's ``attach(registry, settings)`` returns."""

    def destinations(self) -> list[dict[str, Any]]:
        """Where the metrics go: dicts with ``name``, ``target``, ``leaves_machine``,
        ``active`` and ``reason``."""
        ...

    def close(self, timeout: float = 5.0) -> None: ...


# --- instruments ------------------------------------------------------------------------------


class Instrument:
    """A declared metric. Recording never blocks on I/O; refusals follow the strict flag."""

    kind: ClassVar[str] = ""

    def __init__(self, registry: MetricRegistry, info: MetricInfo) -> None:
        self.info = info
        self.name = info.name
        self._registry = registry
        self._lock = threading.Lock()
        self._values: dict[LabelValues, Any] = {}
        self._allowed = frozenset(info.labels)
        self._clean: dict[tuple[Any, ...], LabelValues] = {}  # raw label values -> scrubbed

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} labels={list(self.info.labels)}>"

    # The hot path: validate labels (cached per distinct set), then update under the lock.
    def _key(self, labels: Any) -> LabelValues | None:
        info = self.info
        if not labels:
            if info.mandatory:
                missing = ", ".join(sorted(info.mandatory))
                self._refuse(
                    "metric_label",
                    f"metric {self.name!r}: missing mandatory label(s) {missing}",
                    f"missing:{missing}",
                )
                return None
            return (None,) * len(info.labels)
        if type(labels) is not dict and not isinstance(labels, Mapping):
            self._refuse(
                "metric_label",
                f"metric {self.name!r}: labels must be a mapping, not {type(labels).__name__}",
                "type",
            )
            return None
        if not self._allowed.issuperset(labels):
            extra = sorted(str(k) for k in labels if k not in self._allowed)
            declared = ", ".join(info.labels) or "none"
            self._refuse(
                "metric_label",
                f"metric {self.name!r}: label {extra[0]!r} is not declared (declared: "
                f"{declared}); declare it or leave it out",
                f"undeclared:{extra[0]}",
            )
            return None
        raw = tuple(map(labels.get, info.labels))
        try:
            return self._clean[raw]
        except KeyError:
            pass
        except TypeError:  # an unhashable value: checked and refused below
            pass
        clean: list[str | None] = []
        scrubber: Scrubber | None = None
        for name, value in zip(info.labels, raw, strict=True):
            if value is None:
                if name in info.mandatory:
                    self._refuse(
                        "metric_label",
                        f"metric {self.name!r}: missing mandatory label {name!r}",
                        f"missing:{name}",
                    )
                    return None
                clean.append(None)
                continue
            text = _label_text(value)
            if text is None:
                self._refuse(
                    "metric_label",
                    f"metric {self.name!r}: label {name!r} must be a string, number or boolean, "
                    f"not {type(value).__name__}",
                    f"type:{name}",
                )
                return None
            scrubber = scrubber or self._registry._current_scrubber()
            if scrubber is not None:
                text = scrubber.scrub_text(text, f"metrics.{self.name}.{name}", [])
            clean.append(text)
        key = tuple(clean)
        if len(self._clean) < 4 * self._registry.max_series:
            self._clean[raw] = key
        return key

    def _refuse(self, reason: str, message: str, cause: str) -> None:
        self._registry._refuse(reason, message, f"{self.name}:{cause}")

    def _number(self, value: Any) -> float | None:
        kind = type(value)
        if kind is float or kind is int or (isinstance(value, (int, float)) and kind is not bool):
            number = float(value)
        else:
            self._refuse(
                "metric_value",
                f"metric {self.name!r}: value must be a number, not {type(value).__name__}",
                "type",
            )
            return None
        if not math.isfinite(number):
            self._refuse("metric_value", f"metric {self.name!r}: {value!r} is not finite", "nan")
            return None
        return number

    def _room(self, key: LabelValues) -> bool:
        """Called under the lock for a new series: refuses past the registry's series limit."""
        if len(self._values) < self._registry.max_series:
            return True
        self._refuse(
            "metric_cardinality",
            f"metric {self.name!r} has {len(self._values)} label sets already (the limit is "
            f"{self._registry.max_series}): a label takes too many distinct values",
            "cardinality",
        )
        return False

    def _points(self) -> list[Point]:
        with self._lock:
            items = list(self._values.items())
        return [Point(self.info.label_dict(k), float(v)) for k, v in items]

    def _notify(self, value: float, key: LabelValues) -> None:
        self._registry._notify(self.info, value, key)

    def _reset_lock(self) -> None:
        self._lock = threading.Lock()


class _Sum(Instrument):
    _monotonic: ClassVar[bool] = True

    def add(self, value: float = 1, labels: Mapping[str, Any] | None = None) -> None:
        """Add ``value`` (for a counter, not negative) to the series named by ``labels``."""
        key = self._key(labels)
        if key is None:
            return
        number = self._number(value)
        if number is None:
            return
        if self._monotonic and number < 0:
            self._refuse(
                "metric_value",
                f"counter {self.name!r} only goes up: add({value!r}) is negative; declare an "
                "up_down_counter instead",
                "negative",
            )
            return
        if not self._registry._recording():
            return
        values = self._values
        with self._lock:
            if key in values:
                values[key] += number
            elif self._room(key):
                values[key] = number
            else:
                return
        if self._registry._listeners:
            self._notify(number, key)


class Counter(_Sum):
    """A monotonic sum (``add``): requests served, files uploaded."""

    kind = "counter"


class UpDownCounter(_Sum):
    """A sum that goes both ways (``add`` with any sign): active sessions, queue length."""

    kind = "up_down_counter"
    _monotonic = False


class Gauge(Instrument):
    """The last value set (``set``): a size, a temperature, a version in use."""

    kind = "gauge"

    def set(self, value: float, labels: Mapping[str, Any] | None = None) -> None:
        key = self._key(labels)
        if key is None:
            return
        number = self._number(value)
        if number is None or not self._registry._recording():
            return
        with self._lock:
            if key not in self._values and not self._room(key):
                return
            self._values[key] = number
        if self._registry._listeners:
            self._notify(number, key)


@dataclass
class _HistogramState:
    counts: list[int]
    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf


class Histogram(Instrument):
    """A distribution over fixed buckets (``record``): durations, sizes."""

    kind = "histogram"

    def record(self, value: float, labels: Mapping[str, Any] | None = None) -> None:
        key = self._key(labels)
        if key is None:
            return
        number = self._number(value)
        if number is None or not self._registry._recording():
            return
        bounds = self.info.buckets
        index = bisect.bisect_left(bounds, number)  # bucket i holds (bounds[i-1], bounds[i]]
        with self._lock:
            state = self._values.get(key)
            if state is None:
                if not self._room(key):
                    return
                state = self._values[key] = _HistogramState([0] * (len(bounds) + 1))
            state.counts[index] += 1
            state.count += 1
            state.sum += number
            state.min = min(state.min, number)
            state.max = max(state.max, number)
        if self._registry._listeners:
            self._notify(number, key)

    def _points(self) -> list[Point]:
        with self._lock:
            items = [
                (k, tuple(s.counts), s.count, s.sum, s.min, s.max) for k, s in self._values.items()
            ]
        return [
            Point(self.info.label_dict(k), total, counts, count, total, low, high)
            for k, counts, count, total, low, high in items
        ]


_KINDS: dict[str, type[Instrument]] = {
    cls.kind: cls for cls in (Counter, UpDownCounter, Gauge, Histogram)
}


class _Disabled:
    """Returned in production for a declaration that failed: accepts and ignores everything."""

    def __init__(self, name: str) -> None:
        self.name = name

    def add(self, value: float = 1, labels: Mapping[str, Any] | None = None) -> None:
        pass

    def set(self, value: float, labels: Mapping[str, Any] | None = None) -> None:
        pass

    def record(self, value: float, labels: Mapping[str, Any] | None = None) -> None:
        pass


def _label_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _label_text(value.value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return None


# --- built-in health metrics ------------------------------------------------------------------


def _health(name: str, kind: str, description: str, unit: str = "", *labels: str) -> MetricInfo:
    return MetricInfo(name, kind, description, unit, labels, frozenset(labels), builtin=True)


_HEALTH: tuple[MetricInfo, ...] = (
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
    _health("waypost_sink_up", "gauge", "1 when a sink delivers or is idle, else 0", "", "sink"),
)
_HEALTH_TTL = 1.0  # one scrape reads status() once, however many instruments ask


def _health_points(status: Any) -> dict[str, list[Point]]:
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
        "waypost_sink_up": [
            Point({"sink": s.name}, 1.0 if s.state in ("ok", "idle") else 0.0) for s in sinks
        ],
    }


# --- the registry -----------------------------------------------------------------------------

_LIVE: weakref.WeakSet[MetricRegistry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for registry in list(_LIVE):
        registry._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _entry_points() -> dict[str, md.EntryPoint]:
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def prometheus_enabled(config: Any, env: Mapping[str, str]) -> tuple[bool, str]:
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
        telemetry: Any,
        *,
        max_series: int = MAX_SERIES,
        load_exporters: bool = True,
    ) -> None:
        self.telemetry = telemetry
        self.config = telemetry.config
        self.strict = bool(getattr(telemetry, "strict", False))
        self.max_series = max_series
        self.env: Mapping[str, str] = getattr(telemetry, "_env", None) or os.environ
        self.prometheus_enabled, self.prometheus_rule = prometheus_enabled(self.config, self.env)
        self.start_time = time.time()
        self._lock = threading.RLock()
        self._instruments: dict[str, Instrument] = {}
        self._listeners: list[Any] = []
        self._exporters: dict[str, Any] = {}
        self._own_scrubber: Scrubber | None = None
        self._own_built = False
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
        return self._declare(Counter, name, description=description, unit=unit, labels=labels)  # type: ignore[return-value]

    def up_down_counter(
        self,
        name: str,
        *,
        description: str = "",
        unit: str = "",
        labels: Mapping[str, Label | bool | str] | Iterable[str] = (),
    ) -> UpDownCounter:
        """A sum that may go down."""
        return self._declare(UpDownCounter, name, description=description, unit=unit, labels=labels)  # type: ignore[return-value]

    def gauge(
        self,
        name: str,
        *,
        description: str = "",
        unit: str = "",
        labels: Mapping[str, Label | bool | str] | Iterable[str] = (),
    ) -> Gauge:
        """The last value set per label set."""
        return self._declare(Gauge, name, description=description, unit=unit, labels=labels)  # type: ignore[return-value]

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
        return self._declare(
            Histogram, name, description=description, unit=unit, labels=labels, buckets=buckets
        )  # type: ignore[return-value]

    def _declare(
        self,
        cls: type[Instrument],
        name: str,
        *,
        description: str,
        unit: str,
        labels: Mapping[str, Label | bool | str] | Iterable[str],
        buckets: Iterable[float] | None = None,
    ) -> Instrument | _Disabled:
        try:
            info = _info(
                cls.kind, name, description=description, unit=unit, labels=labels, buckets=buckets
            )
            with self._lock:
                existing = self._instruments.get(name)
                if existing is not None:
                    if existing.info.shape != info.shape:
                        raise TrackError(
                            f"metric {name!r} is already declared as {_shape_text(existing.info)}; "
                            f"it cannot be declared again as {_shape_text(info)}"
                        )
                    return existing
                instrument = cls(self, info)
                self._instruments[name] = instrument
                listeners = list(self._listeners)
        except TrackError as exc:
            if self.strict:
                raise
            self._refuse("metric_declaration", str(exc), f"declare:{name}")
            return _Disabled(str(name))
        for listener in listeners:
            self._call(listener, "on_declare", info)
        return instrument

    def get(self, name: str) -> Instrument | None:
        """A declared instrument by name."""
        return self._instruments.get(name)

    # --- recording support --------------------------------------------------------------------

    def _recording(self) -> bool:
        # Values are kept while some destination may read them: the operator's own local
        # exposition, or pushes while telemetry is on.
        return self.prometheus_enabled or bool(self.telemetry.enabled)

    def _refuse(self, reason: str, message: str, key: str) -> None:
        if self.strict:
            raise TrackError(message)
        self.telemetry.counters.drop(reason)
        self._log_once(f"{reason}:{key}", "waypost: metric recording dropped: %s", message)

    def _current_scrubber(self) -> Scrubber | None:
        scrubber: Scrubber | bool | None = getattr(self.telemetry, "scrubber", False)
        if scrubber is not False:  # the running pipeline's own scrubber (None: scrub is off)
            return scrubber if isinstance(scrubber, Scrubber) else None
        if not self._own_built:
            self._own_scrubber, self._own_built = self._build_scrubber(), True
        return self._own_scrubber

    def _build_scrubber(self) -> Scrubber | None:
        """Telemetry off has no pipeline and so no scrubber; local exposition still needs one."""
        if not self.config.scrub.enabled:
            return None
        extra: list[Rule] = []
        plugins = getattr(self.telemetry, "plugins", None)
        if plugins is not None:
            try:
                for _ in plugins.call_chain("register_scrubbers", register=extra.append):
                    pass
            except Exception as exc:
                log.warning("waypost: a register_scrubbers hook failed: %s", exc)
        return Scrubber.from_config(self.config, extra)

    # --- listeners and exporters --------------------------------------------------------------

    def add_listener(self, listener: Any, *, replay: bool = True) -> None:
        """Call ``listener.on_declare(info)`` for each metric (built-in ones first, then those
        declared so far when ``replay``, then each new one) and ``listener.on_record(info,
        value, labels)`` after each recording."""
        with self._lock:
            self._listeners = [*self._listeners, listener]
            known = list(self.infos()) if replay else []
        for info in known:
            self._call(listener, "on_declare", info)

    def remove_listener(self, listener: Any) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not listener]

    def _notify(self, info: MetricInfo, value: float, key: LabelValues) -> None:
        for listener in self._listeners:
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
        eps: dict[str, md.EntryPoint] | None = None
        for name, given in wanted.items():
            key = f"telemetry.metrics.{name}"
            settings = {} if given is None else given
            try:
                if not isinstance(settings, Mapping):
                    raise ConfigError(
                        f"must be a mapping of exporter settings, not {type(settings).__name__}",
                        key=key,
                    )
                eps = _entry_points() if eps is None else eps
                if name not in eps:
                    installed = ", ".join(sorted(eps)) or "none"
                    raise ConfigError(
                        f"unknown metrics exporter {name!r}: installed exporters are {installed}; "
                        f"pip install waypost-{name.replace('_', '-')}",
                        key=key,
                    )
                try:
                    attach = eps[name].load()
                    exporter = attach(self, dict(settings))
                except WaypostError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"metrics exporter {name!r} ({eps[name].value}) failed to start: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                self.attach(name, exporter)
            except WaypostError as exc:
                if isinstance(exc, ConfigError) and exc.source is None:
                    exc = ConfigError(
                        exc.reason, source=getattr(self.telemetry, "config_file", None), key=exc.key
                    )
                if self.strict:
                    raise exc from None
                log.error("waypost: metrics exporter %r is off: %s", name, exc)

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
        return [*_HEALTH, *declared]

    def points(self, name: str) -> list[Point]:
        """The current points of one metric (health metrics are computed now)."""
        instrument = self._instruments.get(name)
        if instrument is not None:
            return instrument._points()
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
                MetricData(info, self._instruments[info.name]._points(), self.start_time, now)
            )
        return out

    def _health(self) -> dict[str, list[Point]]:
        at, cached = self._health_cache
        now = time.monotonic()
        if now - at < _HEALTH_TTL:
            return cached
        try:
            points = _health_points(self.telemetry.status())
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
            instrument._reset_lock()

    def __repr__(self) -> str:
        return (
            f"<MetricRegistry metrics={len(self._instruments)} exporters={list(self._exporters)}>"
        )


def _info(
    kind: str,
    name: Any,
    *,
    description: Any,
    unit: Any,
    labels: Any,
    buckets: Iterable[float] | None,
) -> MetricInfo:
    if not isinstance(name, str) or not _NAME.match(name):
        raise TrackError(
            f"metric name {name!r:.60} is invalid: use letters, digits and underscores, starting "
            "with a letter (at most 200 characters)"
        )
    if name.startswith(_RESERVED_PREFIX):
        raise TrackError(f"metric name {name!r}: the prefix {_RESERVED_PREFIX!r} is waypost's own")
    if not isinstance(description, str) or not isinstance(unit, str):
        raise TrackError(f"metric {name!r}: description and unit must be strings")
    if isinstance(labels, Mapping):
        specs = dict(labels)
    elif isinstance(labels, str):
        raise TrackError(f"metric {name!r}: labels must be a mapping or a list of names")
    else:
        specs = dict.fromkeys(labels, MANDATORY)
    names: list[str] = []
    mandatory: set[str] = set()
    for label, spec in specs.items():
        if not isinstance(label, str) or not _LABEL.match(label) or label.startswith("__"):
            raise TrackError(f"metric {name!r}: label name {label!r} is invalid")
        if label == "le" and kind == "histogram":
            raise TrackError(f"metric {name!r}: 'le' is the bucket label of a histogram")
        if spec is True or spec == Label.MANDATORY:
            mandatory.add(label)
        elif not (spec is False or spec == Label.OPTIONAL):
            raise TrackError(
                f"metric {name!r}: label {label!r} must be MANDATORY or OPTIONAL, not {spec!r}"
            )
        names.append(label)
    bounds: tuple[float, ...] = ()
    if kind == "histogram":
        try:
            bounds = tuple(float(b) for b in (DEFAULT_BUCKETS if buckets is None else buckets))
        except (TypeError, ValueError):
            raise TrackError(f"histogram {name!r}: buckets must be numbers") from None
        increasing = all(a < b for a, b in itertools.pairwise(bounds))
        if not bounds or not increasing or not all(math.isfinite(b) for b in bounds):
            raise TrackError(
                f"histogram {name!r}: buckets must be finite and strictly increasing, not "
                f"{list(bounds)}"
            )
    elif buckets is not None:
        raise TrackError(f"metric {name!r}: only histograms take buckets")
    return MetricInfo(
        name, kind, description, unit, tuple(names), frozenset(mandatory), bounds, builtin=False
    )


def _shape_text(info: MetricInfo) -> str:
    labels = ", ".join(f"{n}{' (mandatory)' if n in info.mandatory else ''}" for n in info.labels)
    text = f"a {info.kind} with unit {info.unit!r} and labels [{labels}]"
    if info.buckets:
        text += f" and buckets {list(info.buckets)}"
    return text
