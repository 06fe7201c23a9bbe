"""The privacy gate as the worker applies it: buffered items become validated, levelled,
scrubbed and enveloped events; then the ``waypost_before_send`` chain, whose result the
scrubbers see again. ``track`` only checks its input (in strict mode) with :func:`check`."""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from waypost import config as _config
from waypost.config import LimitsConfig
from waypost.errors import PluginError, TrackError
from waypost.events import (
    NAME_MAX,
    NO_REMARKS,
    Event,
    Payload,
    base_context,
    coerce,
    name_problem,
    normalise_name,
    uuid7,
)
from waypost.logs import get_logger
from waypost.privacy import Rule, Scrubber, level_allows

if TYPE_CHECKING:
    from waypost.config import TelemetryConfig
    from waypost.control import Control, ControlState
    from waypost.delivery.pipeline import Item
    from waypost.plugins import PluginManager
    from waypost.status import Counters, LogOnce

log = get_logger(__name__)
_now = time.time


_LEVELS = ("error", "usage", "all")
_LAST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
_ID_MAX = 200


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages; a value whose repr
    raises is shown by its type."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(value: Any) -> str:
    """``str(value)`` for a log line: characters that are not printable (a line break that
    would forge a second line) escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


_REDACTION = re.compile(r"\[REDACTED:[^\]]*\]")


DEFAULT_LIMITS = LimitsConfig()
_CLEAN_TEXT = 256
"""The longest text the scrubber remembers as clean (``Scrubber.as_is`` takes no other)."""


class TooLarge(ValueError):
    """An event past one of ``telemetry.limits`` (the message names the key)."""


def check_name(name: Any, limit: int = NAME_MAX) -> str:
    """``name`` if it follows the event-name rule (:func:`waypost.events.name_problem`) and
    has at most ``limit`` characters (``telemetry.limits.name``); otherwise a
    :class:`TrackError` saying what is wrong. A name too long is refused at a glance."""
    if not isinstance(name, str):
        raise TrackError(
            f"event name must be a string or a waypost.Payload, not {type(name).__name__} "
            f"{show(name)}"
        )
    if len(name) > limit:
        raise TrackError(
            f"event name {show(name)} is longer than {limit} characters (telemetry.limits.name)"
        )
    problem = name_problem(name)
    if problem is not None:
        raise TrackError(
            f"event name {show(name)} {problem} (the rule: 1 to {NAME_MAX} printable "
            "characters, no control, bidirectional or line-break characters, no space at "
            "either end)"
        )
    return name


def check_distinct_id(distinct_id: Any) -> str:
    """A ``distinct_id`` given to ``track``: a printable string of at most 200 characters."""
    if type(distinct_id) is not str:
        raise TrackError(
            f"distinct_id must be a string, not {type(distinct_id).__name__} {show(distinct_id)}"
        )
    if len(distinct_id) > _ID_MAX or not distinct_id.isprintable():
        raise TrackError(
            f"distinct_id {show(distinct_id)} must be at most {_ID_MAX} printable characters"
        )
    return distinct_id


def bounded(
    properties: Any, limits: LimitsConfig = DEFAULT_LIMITS, remarks: list[str] | None = None
) -> Any:
    """``properties`` within ``limits``, before anything scans them: a text value longer than
    ``limits.value`` is cut to it (with a remark ``truncated@properties.<path>``), and an
    object or list with more than ``limits.keys`` entries, nesting deeper than
    ``limits.depth`` or (estimated as JSON) heavier than ``limits.event_bytes`` raises
    :class:`TooLarge`. Each check costs a ``len()``, so the work is bounded by the limits,
    never by what was passed: a million keys are refused at a glance. The input is not
    changed; a container holding a truncated text is copied."""
    budget = [0]
    return _bound(properties, limits, remarks if remarks is not None else [], (), 1, budget)


_Path = tuple[tuple[bool, Any], ...]
"""Where a value sits: (is a list index, key or index) from the properties down; made into
text only for a remark or an error, so a key whose ``str()`` raises costs nothing here."""


def _path(parts: _Path) -> str:
    out = ["properties"]
    for index, key in parts:
        if index:
            out.append(f"[{key}]")
            continue
        try:
            out.append(f".{key}")
        except Exception:
            out.append(f".<{type(key).__name__}>")
    return "".join(out)


def _check_size(value: Any, limits: LimitsConfig, path: _Path, depth: int, what: str) -> None:
    """An object or list within ``limits.depth`` and ``limits.keys``, or :class:`TooLarge`."""
    if depth > limits.depth:
        raise TooLarge(f"nested deeper than {limits.depth} levels (telemetry.limits.depth)")
    if len(value) > limits.keys:
        raise TooLarge(
            f"{_path(path)} has {len(value):,} {what}, more than {limits.keys:,} "
            "(telemetry.limits.keys)"
        )


def _too_heavy(limits: LimitsConfig) -> TooLarge:
    return TooLarge(
        f"properties are larger than {limits.event_bytes:,} bytes (telemetry.limits.event_bytes)"
    )


def _bound(
    value: Any, limits: LimitsConfig, remarks: list[str], path: _Path, depth: int, budget: list[int]
) -> Any:
    kind = type(value)
    if kind is str:
        if len(value) > limits.value:
            remarks.append(f"truncated@{_path(path)}")
            value = value[: limits.value]
        budget[0] += len(value) + 3
    elif kind is dict or isinstance(value, Mapping):
        _check_size(value, limits, path, depth, "keys")
        out: dict[Any, Any] | None = None
        for key, item in value.items():
            budget[0] += (len(key) if type(key) is str else 8) + 4
            kept = _bound(item, limits, remarks, (*path, (False, key)), depth + 1, budget)
            if kept is not item:
                if out is None:
                    out = dict(value)
                out[key] = kept
            if budget[0] > limits.event_bytes:
                raise _too_heavy(limits)
        return value if out is None else out
    elif kind is list or kind is tuple or isinstance(value, (list, tuple, set, frozenset)):
        _check_size(value, limits, path, depth, "items")
        items: list[Any] | None = None
        for i, item in enumerate(value):
            kept = _bound(item, limits, remarks, (*path, (True, i)), depth + 1, budget)
            budget[0] += 1
            if kept is not item:
                if items is None:
                    items = list(value)
                items[i] = kept
            if budget[0] > limits.event_bytes:
                raise _too_heavy(limits)
        return value if items is None else items
    else:
        budget[0] += 8
    return value


def unix_seconds(timestamp: Any) -> float:
    """An event's time as Unix seconds: a number, or a datetime (naive is taken as UTC)."""
    if isinstance(timestamp, _dt.datetime):
        aware = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=_dt.timezone.utc)
        return aware.timestamp()
    if isinstance(timestamp, (str, bytes, bool)):  # float("1e9") would pass; True is not a time
        raise TypeError(f"must be Unix seconds or a datetime, not {type(timestamp).__name__}")
    when = float(timestamp)
    if not math.isfinite(when):
        raise ValueError("must be a finite number of Unix seconds")
    return when


def event_time(timestamp: Any, earliest: float, ahead: float) -> float:
    """``timestamp`` as Unix seconds if it lies from ``earliest`` to ``ahead`` seconds after
    now (``telemetry.timestamps``); otherwise ``ValueError`` (or ``TypeError``) saying why."""
    when = unix_seconds(timestamp)
    latest = _now() + ahead
    if earliest <= when <= latest:
        return when
    units = (unit for unit, scale in _UNITS if earliest <= when / scale <= latest)
    hint = next((f" ({unit}? pass seconds)" for unit in units), "")
    start = _dt.datetime.fromtimestamp(earliest, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    later = f"{ahead / 86400:g} day(s)" if ahead >= 86400 else f"{ahead:g} s"
    raise ValueError(
        f"{when:g} is outside the times accepted{hint}: from {start} UTC to {later} ahead of "
        "now (telemetry.timestamps.earliest lets older events in, for a backfill)"
    )


_UNITS = (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))


def check(
    event: Any,
    properties: Any,
    level: Any,
    distinct_id: Any = None,
    limits: LimitsConfig = DEFAULT_LIMITS,
) -> None:
    """What strict mode refuses at once, in ``track``: a bad level, name, id or property, a
    payload whose fields do not hold their declared types, an event past
    ``telemetry.limits``."""
    if level is not None and (type(level) is not str or level not in _LEVELS):
        raise TrackError(f"level must be error, usage or all, not {show(level)}")
    if distinct_id is not None:
        check_distinct_id(distinct_id)
    if isinstance(event, Payload):
        if properties is not None:
            raise TrackError("pass either a Payload or a name with properties, not both")
        extra = event.undeclared()
        if extra:
            raise TrackError(
                f"{type(event).__name__} got undeclared field(s) {', '.join(extra)}: only "
                "declared fields may leave; declare them on the class or remove them"
            )
        check_name(type(event).__event__)
        try:
            event.wire()
        except Exception as exc:
            raise TrackError(f"event {type(event).__event__!r}: {exc}") from None
        return
    check_name(event, limits.name)
    if properties is None:
        return
    if not isinstance(properties, Mapping):
        raise TrackError(
            f"properties of event {event!r} must be a mapping, not {type(properties).__name__}"
        )
    key: Any = None
    try:
        bounded(properties, limits)  # first: a million keys are refused before any is read
        for key, value in properties.items():
            coerce({key: value})
    except TooLarge as exc:
        raise TrackError(f"event {event!r} is refused: {exc}") from None
    except Exception as exc:
        where = "properties" if key is None else f"property {show(key)}"
        raise TrackError(
            f"event {event!r}: {where}: {type(exc).__name__}: {one_line(exc)}"
        ) from None


def build_scrubber(config: TelemetryConfig, plugins: PluginManager) -> Scrubber | None:
    """The scrubber of this configuration with the rules plugins register; None when
    ``telemetry.scrub.enabled`` is false. A plugin whose ``register_scrubbers`` raises, or
    registers a rule that does not compile, is a :class:`PluginError`: telemetry does not
    start without the rules it meant to apply."""
    if not config.scrub.enabled:
        return None
    extra_rules: list[Rule] = []
    pending: list[Any] = []

    def failed(plugin: str, exc: Exception) -> None:
        raise PluginError(
            f"plugin {plugin!r}: register_scrubbers raised {type(exc).__name__}: {exc} "
            "(telemetry does not start without its rules)",
            plugin=plugin,
        ) from exc

    for plugin, _ in plugins.call_each("register_scrubbers", failed, register=pending.append):
        for rule in pending:
            _check_rule(rule, plugin)
        extra_rules += pending
        pending.clear()
    return Scrubber.from_config(config, extra_rules)


def off_scrubber(config: TelemetryConfig, plugins: PluginManager) -> Scrubber | None:
    """The scrubber metric label values pass while telemetry has not started (the operator's
    local Prometheus exposition works with telemetry off): a ``register_scrubbers`` hook that
    fails is logged and left out, as nothing else depends on it."""
    extra: list[Rule] = []
    try:
        plugins.hook.register_scrubbers(register=extra.append)
    except Exception as exc:
        log.warning("waypost: a register_scrubbers hook failed: %s", exc)
    return Scrubber.from_config(config, extra) if config.scrub.enabled else None


def _check_rule(rule: Any, plugin: str) -> None:
    if not isinstance(rule, Rule):
        raise PluginError(
            f"plugin {plugin!r}: register_scrubbers registered {type(rule).__name__}, not a "
            "waypost.privacy.Rule",
            plugin=plugin,
        )
    try:
        re.compile(rule.pattern, rule.flags)
    except Exception as exc:  # re.error, or a pattern or flags of the wrong type
        problem = str(exc) if isinstance(exc, re.error) else f"{type(exc).__name__}: {exc}"
        raise PluginError(
            f"plugin {plugin!r}: scrubbing rule {rule.name!r} has an invalid pattern: {problem} "
            "(telemetry does not start without it)",
            plugin=plugin,
        ) from None


class Gate:
    """Turns buffered items into events (on the worker thread, a batch at a time)."""

    def __init__(
        self,
        *,
        level: str,
        instance_id: str,
        context: dict[str, Any],
        scrubber: Scrubber | None,
        distinct_id: str,
        plugins: PluginManager,
        counters: Counters,
        log_once: LogOnce,
        limits: LimitsConfig = DEFAULT_LIMITS,
    ) -> None:
        self.level = level
        self.limits = limits
        # Scrubber.as_is takes only flat dicts of remembered short texts and scalars: within
        # these limits such a dict needs no other check than its number of keys.
        self._as_is_fits = limits.value >= _CLEAN_TEXT and limits.event_bytes >= limits.keys * (
            2 * _CLEAN_TEXT + 8
        )
        self.instance_id = instance_id
        self.context = context
        self.scrubber = scrubber
        self.distinct_id = distinct_id
        self.plugins = plugins
        self.counters = counters
        self._log_once = log_once
        self._before_send = plugins.before_send_chain()
        self.context_remarks: list[str] = []
        """What the scrubbers took out of the shared context; each event carries them."""
        if scrubber is not None:
            self.context = scrubber.scrub(context, "context", self.context_remarks)
            if self.context_remarks:
                shown = self.context_remarks[:5]
                more = len(self.context_remarks) - len(shown)
                log.warning(
                    "waypost: the context was scrubbed (%s%s): a waypost_context hook added "
                    "personal data or a secret",
                    ", ".join(shown),
                    f" and {more} more" if more else "",
                )
        self.control: ControlState | None = None
        """The control a destination sent (``waypost.control``): its ``sample`` applies here."""
        self.heartbeats: set[str] = set()
        """Event names of heartbeats, which a control's ``sample`` never drops."""
        self._good_names: set[str] = set()

    @classmethod
    def create(
        cls,
        config: TelemetryConfig,
        plugins: PluginManager,
        *,
        app: str,
        version: str,
        instance_id: str,
        distinct_id: str,
        counters: Counters,
        log_once: LogOnce,
        on_error: Callable[[str, str, Exception], None] | None = None,
    ) -> Gate:
        """The gate of a starting instance: the context (with what ``waypost_context`` hooks
        add) and the scrubber (with the rules of ``register_scrubbers`` hooks). A context hook
        that raises, or returns what is not JSON, goes to ``on_error(plugin, what, exc)`` and
        adds nothing (without ``on_error`` it raises)."""

        def failed(plugin: str, exc: Exception, what: str = "waypost_context raised") -> None:
            if on_error is None:
                raise exc
            on_error(plugin, what, exc)

        context = coerce(base_context(app, version))  # ValueError for an app name not UTF-8
        for plugin, results in plugins.call_each("waypost_context", failed, context=dict(context)):
            for extra in results:
                if not isinstance(extra, Mapping):
                    continue
                try:
                    # What leaves is JSON: a value that cannot be made JSON is refused here,
                    # once, rather than failing every event that carries the context.
                    context = _config.merge(context, coerce(dict(extra)))
                except (TypeError, ValueError, RecursionError) as exc:
                    failed(plugin, exc, "context from a waypost_context hook refused:")
        return cls(
            level=config.level,
            instance_id=instance_id,
            context=context,
            scrubber=build_scrubber(config, plugins),
            distinct_id=distinct_id,
            plugins=plugins,
            counters=counters,
            log_once=log_once,
            limits=config.limits,
        )

    def build(self, items: list[Item]) -> list[Event]:
        """Gate and envelope a batch of buffered items (runs on the worker thread)."""
        control = self.control.current if self.control is not None else None
        if control is not None and control.sample is not None and control.sample < 1:
            # A pause is the runners' (events wait in the outbox); sampling drops here.
            return self._sampled(self._build(items), control)
        return self._build(items)

    def _sampled(self, events: list[Event], control: Control) -> list[Event]:
        kept = [e for e in events if control.keeps(e.id, heartbeat=e.name in self.heartbeats)]
        self.counters.drop("control_sample", len(events) - len(kept))
        return kept

    def _build(self, items: list[Item]) -> list[Event]:
        configured = self.level
        instance_id = self.instance_id
        context = self.context
        scrubber = self.scrubber
        default_who = self.distinct_id or instance_id
        usage_passes = level_allows(configured, "usage")
        context_remarks = self.context_remarks
        good_names = self._good_names
        limits = self.limits
        name_limit, keys_limit = limits.name, limits.keys
        as_is = scrubber.as_is if scrubber is not None and self._as_is_fits else None
        out: list[Event] = []
        ids = uuid7.many([item[2] for item in items])  # track() let only finite times in
        for i, (event, properties, when, level, distinct_id) in enumerate(items):
            try:
                remarks: list[str] = []
                clean = False  # properties already JSON and scrubbed
                if type(event) is str and type(properties) is dict:
                    # The common case: a name seen before and a plain dict (track's own copy,
                    # which is kept as it is when it holds only known-clean keys and JSON
                    # scalars).
                    # (Its length first: looking a huge name up would hash all of it.)
                    known = len(event) <= name_limit and event in good_names
                    name = event if known else self._name(event, remarks)
                    clean = (
                        as_is is not None and len(properties) <= keys_limit and as_is(properties)
                    )
                    props = properties if clean else coerce(bounded(properties, limits, remarks))
                elif isinstance(event, Payload):
                    name = self._name(type(event).__event__, remarks)
                    level = level or type(event).__level__
                    extra = event.undeclared()
                    if extra:
                        remarks.extend(f"undeclared@properties.{f}" for f in extra)
                    props = bounded(event.wire(), limits, remarks)
                else:
                    name = (
                        self._name(event, remarks)
                        if type(event) is str
                        else check_name(event, name_limit)
                    )
                    if properties is None:
                        props = {}
                    else:
                        if not isinstance(properties, Mapping):
                            raise TrackError(
                                f"properties must be a mapping, not {type(properties).__name__}"
                            )
                        props = coerce(bounded(properties, limits, remarks))
                if level is None:
                    if not usage_passes:
                        self.counters.drop("level")
                        continue
                elif type(level) is not str or level not in _LEVELS:
                    raise TrackError(f"level must be error, usage or all, not {show(level)}")
                elif not level_allows(configured, level):
                    self.counters.drop("level")
                    continue
                if distinct_id is not None and type(distinct_id) is not str:
                    check_distinct_id(distinct_id)  # raises: an id is text
                if context_remarks:
                    remarks[:0] = context_remarks
                who = distinct_id or default_who
                if scrubber is not None:
                    scrubbed = scrubber.scrub_text(name, "name", remarks)  # remembered if clean
                    if scrubbed is not name:
                        kept = self._safe_name(scrubbed)
                        if kept is None:
                            continue
                        name = kept
                    if not clean:
                        props = scrubber.scrub(props, "properties", remarks)
                    if who is not instance_id:  # an id the application chose may be personal
                        who = scrubber.scrub_text(who, "distinct_id", remarks)
                if who is not default_who:
                    # After the scrubbers: a secret pasted as the id goes out redacted.
                    check_distinct_id(who)
                # Positional (the fields' order): a third cheaper than keywords, per event.
                built = Event(
                    ids[i], name, when, instance_id, props, context, who,
                    level or "usage", remarks or NO_REMARKS,
                )  # fmt: skip
                if self._before_send:
                    result = self._apply_before_send(built)
                    if result is None:
                        self.counters.drop("before_send")
                        continue
                    built = result
                out.append(built)
            except TooLarge as exc:
                self._refused(event, exc)
            except Exception as exc:
                self.counters.drop("invalid")
                self._log_once(
                    f"invalid:{type(exc).__name__}",
                    "waypost: event dropped: %s: %s",
                    type(exc).__name__,
                    one_line(exc),
                )
        return out

    def _refused(self, event: Any, exc: TooLarge) -> None:
        self.counters.drop("too_large")
        self._log_once(
            f"too_large:{str(exc).rsplit('(', 1)[-1]}",
            "waypost: event %.200r refused: %s",
            event if isinstance(event, str) else type(event).__name__,
            exc,
        )

    def refuse_keys(self, event: Any, properties: Mapping[Any, Any]) -> None:
        """Count and log an event that ``track`` refused before copying its properties: they
        hold more than ``limits.keys`` keys (a copy of a million keys would hold every thread
        of the host for tens of milliseconds)."""
        try:
            _check_size(properties, self.limits, (), 1, "keys")
        except TooLarge as exc:
            self._refused(event, exc)

    def _safe_name(self, scrubbed: str, *, count: bool = True) -> str | None:
        """The name the scrubbers made of an event's name, or None (counted as dropped with
        reason ``unsafe_name``) when nothing of it is left but redactions."""
        if _REDACTION.sub("", scrubbed).strip(" _-.:/"):
            return scrubbed
        if count:
            self.counters.drop("unsafe_name")
        self._log_once(
            "unsafe_name",
            "waypost: event dropped: its name is nothing but personal data or a secret",
        )
        return None

    def _name(self, name: str, remarks: list[str]) -> str:
        """The name an event goes out under: as it is when it follows the rule (and then
        remembered, so the next check is a set lookup), normalised with a remark when that
        makes it follow the rule, else a :class:`TrackError`."""
        if len(name) > self.limits.name:
            check_name(name, self.limits.name)  # raises at a glance: no scan of a huge name
        if name_problem(name) is None:
            if len(self._good_names) >= 4096:  # names made up per event must not grow this
                self._good_names.clear()
            self._good_names.add(name)
            return name
        fixed = normalise_name(name)
        if name_problem(fixed) is not None:
            check_name(name)  # raises, saying what is wrong with it
        remarks.append("normalised@name")
        self._log_once(
            "name:normalised",
            "waypost: event name %s normalised to %r (%s)",
            show(name),
            fixed,
            name_problem(name),
        )
        return fixed

    def _apply_before_send(self, event: Event) -> Event | None:
        context, distinct_id, name = event.context, event.distinct_id, event.name
        for hook in self._before_send:
            result = hook(event)
            if result is False:
                return None
            if isinstance(result, Event):
                event = result  # the next implementation sees the replacement
        # Whatever a hook did, the envelope still follows the rules (a name, a time with a
        # four-digit year, an id that is text), the limits and the scrubbers have the last word
        # on properties and the id, and the shared context may not be changed per event.
        check_name(event.name, self.limits.name)
        if type(event.time) not in (int, float) or not 0 <= event.time <= _LAST_TIME:
            raise TrackError(f"waypost_before_send set the time to {show(event.time)}")
        if event.distinct_id:
            check_distinct_id(event.distinct_id)
        props = coerce(bounded(event.properties, self.limits, event.remarks))
        if self.scrubber is not None:
            props = self.scrubber.scrub(props, "properties", event.remarks)
            if event.distinct_id != distinct_id:
                event.distinct_id = self.scrubber.scrub_text(
                    str(event.distinct_id), "distinct_id", event.remarks
                )
            if event.name != name:
                scrubbed = self._safe_name(
                    self.scrubber.scrub_text(str(event.name), "name", event.remarks), count=False
                )  # dropped, and counted, as the hook's doing
                if scrubbed is None:
                    return None
                event.name = scrubbed
        event.properties = props
        event.context = context
        return event
