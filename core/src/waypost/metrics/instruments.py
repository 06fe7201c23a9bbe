"""Instruments: what a metric is (:class:`MetricInfo`), its points, and the counters, up-down
counters, gauges and histograms an application declares; recording never blocks on I/O."""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from waypost.errors import TrackError

if TYPE_CHECKING:
    from waypost.privacy import Scrubber

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


class Owner(Protocol):
    """What an instrument needs of its registry (:class:`waypost.metrics.MetricRegistry`)."""

    max_series: int
    """The most label sets one metric may hold."""
    listeners: list[Any]
    """The listeners told of each recording (see ``MetricRegistry.add_listener``)."""

    def recording(self) -> bool:
        """Whether values are kept now (some destination may read them)."""
        ...

    def refuse(self, reason: str, message: str, key: str) -> None:
        """A recording or declaration refused: raise in strict mode, else count and log once."""
        ...

    def label_scrubber(self) -> Scrubber | None:
        """The scrubber label values pass (None: scrubbing is off)."""
        ...

    def notify(self, info: MetricInfo, value: float, key: LabelValues) -> None:
        """Tell the listeners of a recording."""
        ...


class Instrument:
    """A declared metric. Recording never blocks on I/O; refusals follow the strict flag."""

    kind: ClassVar[str] = ""

    def __init__(self, registry: Owner, info: MetricInfo) -> None:
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
            scrubber = scrubber or self._registry.label_scrubber()
            if scrubber is not None:
                text = scrubber.scrub_text(text, f"metrics.{self.name}.{name}", [])
            clean.append(text)
        key = tuple(clean)
        if len(self._clean) < 4 * self._registry.max_series:
            self._clean[raw] = key
        return key

    def _refuse(self, reason: str, message: str, cause: str) -> None:
        self._registry.refuse(reason, message, f"{self.name}:{cause}")

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

    def points(self) -> list[Point]:
        """The current points: one per label set recorded."""
        with self._lock:
            items = list(self._values.items())
        return [Point(self.info.label_dict(k), float(v)) for k, v in items]

    def _notify(self, value: float, key: LabelValues) -> None:
        self._registry.notify(self.info, value, key)

    def after_fork(self) -> None:
        """In a forked child: the parent's lock may have been held at the fork."""
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
        if not self._registry.recording():
            return
        values = self._values
        with self._lock:
            if key in values:
                values[key] += number
            elif self._room(key):
                values[key] = number
            else:
                return
        if self._registry.listeners:
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
        if number is None or not self._registry.recording():
            return
        with self._lock:
            if key not in self._values and not self._room(key):
                return
            self._values[key] = number
        if self._registry.listeners:
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
        if number is None or not self._registry.recording():
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
        if self._registry.listeners:
            self._notify(number, key)

    def points(self) -> list[Point]:
        with self._lock:
            items = [
                (k, tuple(s.counts), s.count, s.sum, s.min, s.max) for k, s in self._values.items()
            ]
        return [
            Point(self.info.label_dict(k), total, counts, count, total, low, high)
            for k, counts, count, total, low, high in items
        ]


# What a declaration that failed returns in production: an instrument of the kind asked for
# that accepts and ignores everything (strict mode raises instead).


class DisabledCounter(Counter):
    def add(self, value: float = 1, labels: Mapping[str, Any] | None = None) -> None:
        """Ignored: the declaration of this counter failed (see the log)."""


class DisabledUpDownCounter(UpDownCounter):
    def add(self, value: float = 1, labels: Mapping[str, Any] | None = None) -> None:
        """Ignored: the declaration of this counter failed (see the log)."""


class DisabledGauge(Gauge):
    def set(self, value: float, labels: Mapping[str, Any] | None = None) -> None:
        """Ignored: the declaration of this gauge failed (see the log)."""


class DisabledHistogram(Histogram):
    def record(self, value: float, labels: Mapping[str, Any] | None = None) -> None:
        """Ignored: the declaration of this histogram failed (see the log)."""


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


def declared_info(
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


def shape_text(info: MetricInfo) -> str:
    labels = ", ".join(f"{n}{' (mandatory)' if n in info.mandatory else ''}" for n in info.labels)
    text = f"a {info.kind} with unit {info.unit!r} and labels [{labels}]"
    if info.buckets:
        text += f" and buckets {list(info.buckets)}"
    return text
