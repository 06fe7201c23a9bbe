"""``Telemetry``: the object an application holds. ``track`` only buffers; everything else
happens on background threads, behind the privacy gate."""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from waypost import config as _config
from waypost.config import TelemetryConfig
from waypost.errors import (
    ConfigError,
    MissingVariableError,
    PluginError,
    TrackError,
    WaypostError,
)
from waypost.events import Event, Payload, base_context, coerce, uuid7
from waypost.pipeline import Counters, Item, LogOnce, Pipeline
from waypost.plugins import PluginManager
from waypost.privacy import Decision, Scrubber, StoredConsent, level_allows, resolve_consent
from waypost.retry import Backoff
from waypost.schedule import Clock, Job, Scheduler, parse_time_of_day
from waypost.sinks import Sink, SinkContext

log = logging.getLogger("waypost")

_LIVE: weakref.WeakSet[Telemetry] = weakref.WeakSet()
_now = time.time
_FORK_KEEP: list[Any] = []  # parent-process resources a forked child must never close


def _after_fork_in_child() -> None:
    for tel in list(_LIVE):
        tel._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_data_dir(app: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("waypost", appauthor=False)) / app


def _installations_file() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("waypost", appauthor=False)) / "installations.json"


def _recall_installation(config_file: str) -> dict[str, str] | None:
    """The app name and data dir an application last used with this config file, so that
    ``waypost --config FILE`` works on the application's own data dir."""
    import json

    try:
        known = json.loads(_installations_file().read_text(encoding="utf-8"))
        entry = known.get(str(Path(config_file).resolve()))
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("data_dir") else None


def _remember_installation(config_file: str, app: str, data_dir: Path) -> None:
    import json

    path = _installations_file()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    key = str(Path(config_file).resolve())
    entry = {"app": app, "data_dir": str(data_dir.resolve())}
    if known.get(key) == entry:
        return
    known[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("waypost: cannot record the installation: %s", exc)


class SinkStatus(BaseModel):
    name: str
    type: str
    state: str
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    dropped_by_destination: int = 0
    pending: int = 0
    last_success: _dt.datetime | None = None
    last_error: str | None = None
    last_error_at: _dt.datetime | None = None
    error: str | None = None
    deprecated: str | None = None
    in_memory: int = 0


class CounterStatus(BaseModel):
    accepted: int = 0
    stored: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    dropped: dict[str, int] = {}


class Status(BaseModel):
    """What ``status()`` and ``waypost status --json`` report."""

    app: str
    version: str
    enabled: bool
    running: bool
    rule: str
    reason: str
    mode: str
    level: str
    debug: bool
    strict: bool
    config_file: str | None
    config_error: str | None = None
    data_dir: str
    instance_id: str | None
    sinks: list[SinkStatus]
    buffered: int
    outbox_pending_events: int
    outbox: dict[str, dict[str, int]]
    counters: CounterStatus


def _ts(value: float | None) -> _dt.datetime | None:
    return None if value is None else _dt.datetime.fromtimestamp(value, _dt.timezone.utc)


def _unix_seconds(timestamp: Any) -> float:
    """An event's time as Unix seconds: a number, or a datetime (naive is taken as UTC)."""
    if isinstance(timestamp, _dt.datetime):
        aware = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=_dt.timezone.utc)
        return aware.timestamp()
    if isinstance(timestamp, (str, bytes)):  # float("1e9") would pass; a time is not text
        raise TypeError("must be Unix seconds or a datetime, not text")
    when = float(timestamp)
    if not math.isfinite(when):
        raise ValueError("must be a finite number of Unix seconds")
    return when


class Telemetry:
    """Collects events for one application and delivers them to the configured sinks.

    ``config`` is a path to a YAML/TOML file, a mapping (the ``telemetry`` section or a dict with
    that key), or None (the ``WAYPOST_CONFIG`` file or a ``telemetry.yml`` in the working
    directory if there is one, else the defaults: the ``log`` sink). ``strict=True`` raises on
    bad input (tests, development); otherwise bad input is counted and logged once, and the host
    is never interrupted.
    """

    def __init__(
        self,
        app: str | None = None,
        version: str | None = None,
        config: str | os.PathLike[str] | Mapping[str, Any] | TelemetryConfig | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        debug: bool | None = None,
        env: Mapping[str, str] | None = None,
        plugins: Iterable[object] = (),
        sink_classes: Iterable[type[Sink]] = (),
        notice: Callable[[str], None] | None = None,
        distinct_id: str | None = None,
        clock: Clock | None = None,
        start: bool = True,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self.clock = clock or Clock()
        self.started_at = self.clock.time()
        self.scheduler: Scheduler | None = None
        self.last_heartbeat_outcome: str | None = None
        self._heartbeat_facts: Callable[[], Mapping[str, Any]] | None = None
        self._shutdown_callbacks: list[Callable[[float], Any]] = []
        self._on = False
        self._fast = False  # on, not strict, not sync: track takes its shortest path
        self._lock = threading.RLock()
        self._closed = False
        self.pipeline: Pipeline | None = None
        self.outbox_: Any = None
        self.counters = Counters()
        self.instance_id: str | None = None
        self.config_error: str | None = None
        self._log_once = LogOnce(log)
        self.plugins = PluginManager()
        self._runners_by_name: dict[str, Any] = {}
        self.sinks: dict[str, Sink] = {}
        self.sink_errors: dict[str, tuple[str, str]] = {}

        overrides: dict[str, Any] = {}
        if strict is not None:
            overrides["strict"] = strict
        if debug is not None:
            overrides["debug"] = debug
        if config is None:
            found = _config.find_config(self._env)
            config = found if found is not None else None
        try:
            self.config, self.config_file = _config.load(config, self._env, overrides=overrides)
        except ConfigError as exc:
            if strict:
                raise
            self.config_error = str(exc)
            log.error("waypost: telemetry is off: %s", exc)
            self.config = TelemetryConfig(enabled=False, strict=False)
            self.config_file = str(config) if isinstance(config, (str, os.PathLike)) else None
        cfg = self.config
        from_file = self.config_file not in (None, "<config>")
        recalled = None
        if not (app or cfg.app or data_dir or cfg.data_dir or self._env.get("WAYPOST_HOME")):
            # An inspecting process (the CLI) with only the config file: use the data dir the
            # application itself used with this file, if it has run here.
            recalled = _recall_installation(str(self.config_file)) if from_file else None
        self.app = app or cfg.app or (recalled or {}).get("app") or "app"
        self.version = version or cfg.version or "0"
        self.strict = cfg.strict
        self.debug = cfg.debug
        self.distinct_id = distinct_id or cfg.distinct_id or ""
        configured = cfg.data_dir.expanduser() if cfg.data_dir else None
        if configured is None and recalled is not None:
            configured = Path(recalled["data_dir"])
        self.data_dir_source = (
            "argument" if data_dir else "WAYPOST_HOME" if self._env.get("WAYPOST_HOME")
            else "config" if cfg.data_dir else "recalled" if recalled
            else "default"
        )  # fmt: skip
        if configured is not None and not configured.is_absolute() and from_file:
            configured = Path(str(self.config_file)).resolve().parent / configured
        env_home = self._env.get("WAYPOST_HOME")
        self.data_dir = Path(
            data_dir or env_home or configured or default_data_dir(self.app)
        ).expanduser()

        self.decision = self._decide()
        for plugin in plugins:
            self.plugins.register_module(plugin)
        for module_name in cfg.plugins:
            self._register_plugin_module(module_name)
        for sink_class in sink_classes:
            self.plugins.register_sink(sink_class)
        self._notice_callback = notice
        self._autostart = start
        if self.decision.enabled and self.config_error is None and start:
            self._start()
        metrics = self.config.metrics
        if (
            start
            and self.config_error is None
            and (
                metrics.prometheus.port is not None
                or set(metrics.model_extra or ()) - {"prometheus"}
            )
        ):
            _ = self.metrics  # exporters named in config start with the application

    # --- set-up -----------------------------------------------------------------------------

    def _decide(self) -> Decision:
        if self.config_error is not None:
            return Decision(
                False, "config_error", f"the configuration is invalid: {self.config_error}"
            )
        if self.config.level == "off":
            base = resolve_consent(self.config, self._env, None, config_source=self.config_file)
            if base.rule in ("do_not_track", "app_env"):
                return base
            return Decision(False, "level", "telemetry.level is off")
        stored = StoredConsent.read(self.data_dir)
        source = self.config_file
        if self._env.get("WAYPOST_ENABLED"):
            source = f"the environment (WAYPOST_ENABLED={self._env['WAYPOST_ENABLED']})"
        return resolve_consent(self.config, self._env, stored, config_source=source)

    def _register_plugin_module(self, module_name: str) -> None:
        import importlib

        try:
            self.plugins.register_module(importlib.import_module(module_name), name=module_name)
        except Exception as exc:
            error = PluginError(
                f"error importing plugin {module_name!r}: {type(exc).__name__}: {exc}"
            )
            if self.strict:
                raise error from exc
            log.error("waypost: %s", error)

    def _start(self) -> None:
        cfg = self.config
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.instance_id = _instance_id(self.data_dir)
        except OSError as exc:
            self._fail_start(f"cannot use the data dir {self.data_dir}: {exc}")
            return
        if not self._show_notice():
            return
        self._make_sinks()  # first: sink plugins may implement the hooks below too
        self.context = base_context(self.app, self.version)
        for extra in self.plugins.call_chain("waypost_context", context=dict(self.context)):
            if isinstance(extra, Mapping):
                self.context = _config.merge(self.context, extra)
        extra_rules: list[Any] = []
        for _ in self.plugins.call_chain("register_scrubbers", register=extra_rules.append):
            pass
        self.scrubber = Scrubber.from_config(cfg, extra_rules) if cfg.scrub.enabled else None
        self._before_send = self.plugins.has_impls("waypost_before_send")
        outbox = None
        if not self.debug:
            from waypost.outbox import Outbox

            try:
                outbox = Outbox(self.data_dir, sync=cfg.outbox.durability == "sync")
                outbox.reclaim()
                outbox.retry_now([s for s in self.sinks])
            except Exception as exc:
                self._fail_start(f"cannot open the outbox in {self.data_dir}: {exc}")
                return
        self.outbox_ = outbox
        self.pipeline = Pipeline(
            outbox=outbox,
            sinks=list(self.sinks.values()),
            build=self._build,
            counters=self.counters,
            batch_interval=cfg.batch.interval,
            batch_size=cfg.batch.size,
            buffer_size=cfg.outbox.buffer,
            backoff=Backoff(initial=cfg.retry.initial, maximum=cfg.retry.maximum),
            max_attempts=cfg.retry.max_attempts,
            breaker_threshold=cfg.retry.breaker_threshold,
            keep_sent=cfg.outbox.keep_sent,
            retention=self._retention,
            debug=self.debug,
            strict=self.strict,
            sync=cfg.outbox.durability == "sync",
        )
        self._runners_by_name = {r.name: r for r in self.pipeline.runners}
        self._buffer = self.pipeline.buffer
        self._wake_at = min(cfg.batch.size, cfg.outbox.buffer)
        self._spill_at = cfg.outbox.buffer
        self._sync = cfg.outbox.durability == "sync"
        self.pipeline.start()
        self._on = True
        self._fast = not self.strict and not self._sync
        _LIVE.add(self)
        if self.config_file not in (None, "<config>") and self.data_dir_source == "default":
            _remember_installation(str(self.config_file), self.app, self.data_dir)
        atexit.register(self._at_exit)
        if cfg.heartbeat is not None and cfg.heartbeat.enabled:
            hb = cfg.heartbeat
            self.heartbeat(
                every=hb.every,
                first_delay=hb.first_delay,
                time_of_day=hb.time_of_day,
                jitter=hb.jitter,
                event=hb.event,
            )
        if cfg.shutdown_event:
            name = cfg.shutdown_event
            self.on_shutdown(lambda seconds: (name, {"timeRunning": int(seconds)}))

    def _fail_start(self, reason: str) -> None:
        if self.strict:
            raise WaypostError(reason)
        log.error("waypost: telemetry is off: %s", reason)
        self.decision = Decision(False, "error", reason)

    def _show_notice(self) -> bool:
        cfg = self.config
        if cfg.mode != "opt-out" or not cfg.notice.enabled or self.decision.rule != "default":
            return True
        marker = self.data_dir / "notice.json"
        try:
            if marker.read_text(encoding="utf-8").strip() == cfg.policy_version:
                return True
        except OSError:
            pass
        text = cfg.notice.text or (
            f"{self.app} collects anonymous usage telemetry to help improve it. Nothing personal "
            f"is collected. To opt out, set DO_NOT_TRACK=1"
            + (f" or {cfg.disable_env}=true" if cfg.disable_env else "")
            + ", or run `waypost consent off`."
        )
        try:
            if self._notice_callback is not None:
                self._notice_callback(text)
            else:
                print(text, file=sys.stderr, flush=True)
            marker.write_text(cfg.policy_version, encoding="utf-8")
        except Exception as exc:
            self._fail_start(f"the first-run notice could not be shown: {exc}")
            return False
        return True

    def _make_sinks(self, *, tolerant: bool = False) -> None:
        """Create the configured sinks; a sink that cannot be made is recorded in
        ``sink_errors`` (and raises in strict mode, unless ``tolerant``: inspection)."""
        context = SinkContext(
            app=self.app,
            version=self.version,
            instance_id=self.instance_id or "",
            data_dir=self.data_dir,
            strict=self.strict,
        )
        for name, spec in self.config.sink_specs().items():
            spec = dict(spec)
            sink_type = str(spec.pop("type"))
            key = f"telemetry.sinks.{name}"
            try:
                spec = _config.expand(spec, self._env, key)
                cls = self.plugins.load_sink_type(sink_type, key=key)
                try:
                    sink_config = cls.Config.model_validate(spec)
                except ValidationError as exc:
                    raise _config.validation_error(
                        exc, source=self.config_file, prefix=key
                    ) from None
                self.sinks[name] = cls(name, sink_config, context)
            except (ConfigError, PluginError) as exc:
                if isinstance(exc, ConfigError) and exc.source is None:
                    exc = type(exc)(exc.reason, source=self.config_file, key=exc.key)
                if self.strict and not (tolerant and isinstance(exc, MissingVariableError)):
                    raise exc from None
                self.sink_errors[name] = (sink_type, str(exc))
                log.error("waypost: sink %r is off: %s", name, exc)

    # --- the hot path -----------------------------------------------------------------------

    def track(
        self,
        event: str | Payload,
        properties: Mapping[str, Any] | None = None,
        *,
        level: str | None = None,
        distinct_id: str | None = None,
        timestamp: float | _dt.datetime | None = None,
    ) -> None:
        """Record an event: a name and properties, or a typed :class:`waypost.Payload`;
        ``timestamp`` (Unix seconds, or a datetime: naive is UTC) when it happened, if not now.

        Never blocks on I/O and never raises in production mode; in strict mode bad input
        raises :class:`waypost.TrackError` at once.
        """
        if self._fast and timestamp is None:
            # The common case in as few steps as possible: on, not strict, not sync.
            buffer = self._buffer
            buffer.append(
                (
                    event,
                    properties.copy() if type(properties) is dict else properties,
                    _now(),
                    level,
                    distinct_id,
                )
            )
            # Wake the worker once, as the buffer reaches a batch (an Event.set on every call
            # past that point tripled the cost of track), and spill when it is full.
            n = len(buffer)
            if n == self._wake_at or n >= self._spill_at:
                self.pipeline.nudge()  # type: ignore[union-attr]
            return
        if not self._on:
            return
        if self.strict:
            self._check(event, properties, level)
        if timestamp is None:
            when = time.time()
        else:
            try:
                when = _unix_seconds(timestamp)
            except (TypeError, ValueError, OverflowError) as exc:
                if self.strict:
                    raise TrackError(f"timestamp {timestamp!r}: {exc}") from None
                self.counters.drop("invalid")
                self._log_once(
                    "invalid:timestamp", "waypost: event dropped: timestamp %r: %s", timestamp, exc
                )
                return
        buffer = self._buffer
        buffer.append(
            (
                event,
                properties.copy() if type(properties) is dict else properties,
                when,
                level,
                distinct_id,
            )
        )
        if self._sync:
            self.pipeline.drain()  # type: ignore[union-attr]
        elif len(buffer) == self._wake_at or len(buffer) >= self._spill_at:
            self.pipeline.nudge()  # type: ignore[union-attr]

    def _check(self, event: Any, properties: Any, level: str | None) -> None:
        if level is not None and level not in ("error", "usage", "all"):
            raise TrackError(f"level must be error, usage or all, not {level!r}")
        if isinstance(event, Payload):
            if properties is not None:
                raise TrackError("pass either a Payload or a name with properties, not both")
            extra = event.undeclared()
            if extra:
                raise TrackError(
                    f"{type(event).__name__} got undeclared field(s) {', '.join(extra)}: only "
                    "declared fields may leave; declare them on the class or remove them"
                )
            return
        _check_name(event)
        if properties is not None:
            if not isinstance(properties, Mapping):
                raise TrackError(
                    f"properties of event {event!r} must be a mapping, "
                    f"not {type(properties).__name__}"
                )
            for key, value in properties.items():
                try:
                    coerce({key: value})
                except (TypeError, ValueError) as exc:
                    raise TrackError(f"event {event!r}: property {key!r}: {exc}") from None

    # --- the worker's side of the gate --------------------------------------------------------

    def _build(self, items: list[Item]) -> list[Event]:
        """Gate and envelope a batch of buffered items (runs on the worker thread)."""
        cfg = self.config
        configured = cfg.level
        instance_id = self.instance_id or ""
        context = self.context
        scrubber = self.scrubber
        default_who = self.distinct_id or instance_id
        usage_passes = level_allows(configured, "usage")
        out: list[Event] = []
        ids = uuid7.many([item[2] for item in items])  # track() let only finite times in
        for i, (event, properties, when, level, distinct_id) in enumerate(items):
            try:
                remarks: list[str] = []
                clean = False  # properties already JSON and scrubbed
                if type(event) is str and 0 < len(event) <= 200 and type(properties) is dict:
                    # The common case: a name and a plain dict (track's own copy, which is kept
                    # as it is when it holds only known-clean keys and JSON scalars).
                    name = event
                    clean = scrubber is not None and scrubber.as_is(properties)
                    props = properties if clean else coerce(properties)
                elif isinstance(event, Payload):
                    name = type(event).__event__
                    level = level or type(event).__level__
                    extra = event.undeclared()
                    if extra:
                        remarks.extend(f"undeclared@properties.{f}" for f in extra)
                    props = event.wire()
                else:
                    name = _check_name(event)
                    props = coerce(properties) if properties is not None else {}
                    if not isinstance(props, dict):
                        raise TrackError(
                            f"properties must be a mapping, not {type(properties).__name__}"
                        )
                if not (usage_passes if level is None else level_allows(configured, level)):
                    self.counters.drop("level")
                    continue
                who = distinct_id or default_who
                if scrubber is not None:
                    if not clean:
                        props = scrubber.scrub(props, "properties", remarks)
                    if who is not instance_id:  # an id the application chose may be personal
                        who = scrubber.scrub_text(who, "distinct_id", remarks)
                # Positional (the fields' order): a third cheaper than keywords, per event.
                built = Event(
                    ids[i], name, when, instance_id, props, context, who,
                    level or "usage", remarks,
                )  # fmt: skip
                if self._before_send:
                    result = self._apply_before_send(built)
                    if result is None:
                        self.counters.drop("before_send")
                        continue
                    built = result
                out.append(built)
            except Exception as exc:
                self.counters.drop("invalid")
                self._log_once(
                    f"invalid:{type(exc).__name__}",
                    "waypost: event dropped: %s: %s",
                    type(exc).__name__,
                    exc,
                )
        return out

    def _apply_before_send(self, event: Event) -> Event | None:
        context, distinct_id = event.context, event.distinct_id
        for result in self.plugins.call_chain("waypost_before_send", event=event):
            if result is False:
                return None
            if isinstance(result, Event):
                event = result
        # Whatever a hook did, the scrubbers have the last word on properties and the id;
        # the shared context may not be changed per event.
        props = coerce(event.properties)
        if self.scrubber is not None:
            props = self.scrubber.scrub(props, "properties", event.remarks)
            if event.distinct_id != distinct_id:
                event.distinct_id = self.scrubber.scrub_text(
                    str(event.distinct_id), "distinct_id", event.remarks
                )
        event.properties = props
        event.context = context
        return event

    def _retention(self) -> None:
        outbox = self.outbox_
        if outbox is None:
            return
        o = self.config.outbox
        dropped = outbox.enforce_retention(
            max_age=o.max_age, max_bytes=o.max_size_mb * 1024 * 1024, keep_sent=o.keep_sent
        )
        for reason in ("max_age", "max_size"):
            if dropped[reason]:
                self.counters.drop(reason, dropped[reason])
                log.warning(
                    "waypost: dropped %d undelivered records past outbox.%s",
                    dropped[reason],
                    "max_age" if reason == "max_age" else "max_size_mb",
                )
        outbox.reclaim()

    # --- flush, shutdown, fork --------------------------------------------------------------

    def flush(self, timeout: float = 5.0, *, force: bool = False) -> bool:
        """Process everything accepted so far and try to deliver it; True when all of it was
        delivered or is safely in the outbox. Returns within ``timeout`` seconds.

        ``force`` ("submit now") also makes retries due at once and closes open circuits.
        """
        pipeline = self.pipeline
        if pipeline is None or not self._on:
            return True
        if force:
            pipeline.force_due()
        ok = pipeline.flush(timeout)
        if self.strict:
            pipeline.raise_contract_errors()
        return ok

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush, stop the threads and close the sinks, within ``timeout`` seconds. Events not
        delivered by then stay in the outbox for the next run. Safe to call twice."""
        with self._lock:
            if self._closed:
                return True
            self._closed = True
        if self.scheduler is not None:
            self.scheduler.stop(timeout=min(1.0, timeout))
        if self._on:
            for callback in self._shutdown_callbacks:
                self._emit_payload(None, callback(self.clock.time() - self.started_at))
        with self._lock:
            on, self._on = self._on, False
            self._fast = False
        _LIVE.discard(self)
        try:
            atexit.unregister(self._at_exit)
        except Exception:
            pass
        registry = self.__dict__.get("_metrics")
        if registry is not None:
            try:
                registry.close(min(1.0, timeout))
            except Exception as exc:
                log.warning("waypost: closing metrics failed: %s", exc)
        if self.pipeline is None or not on:
            return True
        return self.pipeline.shutdown(timeout)

    def _at_exit(self) -> None:
        try:
            self.shutdown(self.config.shutdown_timeout)
        except Exception as exc:
            log.warning("waypost: shutdown at exit failed: %s", exc)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        if self.pipeline is not None and self._on:
            if self.outbox_ is not None:
                _FORK_KEEP.extend(self.outbox_._conns)
            self.pipeline.after_fork()
            self._buffer = self.pipeline.buffer
        if self.scheduler is not None:
            self.scheduler.after_fork()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- schedules and heartbeats ------------------------------------------------------------

    def schedule(
        self,
        name: str,
        callback: Callable[[], Any],
        *,
        every: float | str,
        first_delay: float | str = 0,
        time_of_day: str | float | None = None,
        jitter: float | str = 0,
        condition: Callable[[], bool] | None = None,
        event: str | None = None,
    ) -> Job:
        """Run ``callback`` periodically and track what it returns (a Payload, a dict of
        properties for event ``event or name``, or None to skip a run).

        ``every``/``first_delay``/``jitter`` take seconds or durations (``24h``); ``time_of_day``
        is ``"random"`` (picked now), ``"HH:MM"`` (UTC) or None. ``condition`` is asked before
        each run. At most one run per period per installation, whatever the number of processes
        sharing the data dir; a restart does not run it again before the period has passed.
        """
        parse = _config.parse_duration
        if self.scheduler is None:
            self.scheduler = Scheduler(
                data_dir=self.data_dir, emit=self._emit_job, clock=self.clock
            )
        job = Job(
            name=name,
            callback=callback,
            every=parse(every),
            first_delay=parse(first_delay),
            jitter=parse(jitter),
            time_of_day=parse_time_of_day(time_of_day, self.scheduler.rng),
            condition=condition,
            event=event,
        )
        if self._on:
            return self.scheduler.add(job)
        self.scheduler.jobs[name] = job  # kept for status; never runs while telemetry is off
        return job

    def heartbeat(
        self,
        *,
        every: float | str = "24h",
        first_delay: float | str = "30s",
        time_of_day: str | float | None = "random",
        jitter: float | str = 0,
        condition: Callable[[], bool] | None = None,
        facts: Callable[[], Mapping[str, Any]] | None = None,
        event: str = "heartbeat",
    ) -> Job:
        """Schedule the heartbeat snapshot (FlowForge's ping, see :meth:`heartbeat_payload`)."""
        self._heartbeat_facts = facts
        return self.schedule(
            "heartbeat",
            lambda: self.heartbeat_payload(facts),
            every=every,
            first_delay=first_delay,
            time_of_day=time_of_day,
            jitter=jitter,
            condition=condition,
            event=event,
        )

    def heartbeat_payload(
        self, facts: Callable[[], Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The heartbeat in FlowForge's shape: instance id, os, runtime and app versions, and
        ``platform.counts`` / ``platform.config`` contributed by the application (``facts``) and
        by plugins (hook ``waypost_heartbeat``)."""
        ctx = base_context(self.app, self.version)
        payload: dict[str, Any] = {
            "instanceId": self.instance_id or _read_instance_id(self.data_dir),
            "os": ctx["os"],
            "env": {"python": ctx["python"], self.app: self.version, "waypost": ctx["waypost"]},
            "platform": {"counts": {}, "config": {}},
        }
        if facts is not None:
            payload = _config.merge(payload, facts())
        for extra in self.plugins.call_chain("waypost_heartbeat", facts=payload):
            if isinstance(extra, Mapping):
                payload = _config.merge(payload, extra)
        return payload

    def send_heartbeat(self, *, force: bool = False) -> bool:
        """Send the heartbeat now (for cron: ``waypost send-heartbeat``). Unless ``force``, it
        is skipped when this installation already sent one within the period."""
        if self.scheduler is None or "heartbeat" not in self.scheduler.jobs:
            hb = self.config.heartbeat
            self.scheduler = self.scheduler or Scheduler(
                data_dir=self.data_dir, emit=self._emit_job, clock=self.clock
            )
            job = Job(
                name="heartbeat",
                callback=lambda: self.heartbeat_payload(self._heartbeat_facts),
                every=hb.every if hb else 0.0,
                event=hb.event if hb else "heartbeat",
            )
        else:
            job = self.scheduler.jobs["heartbeat"]
        sent = self.scheduler.run(job, force=force)
        self.last_heartbeat_outcome = job.last_outcome
        return sent

    def on_shutdown(self, callback: Callable[[float], Any]) -> None:
        """At shutdown, track what ``callback(seconds_running)`` returns (Langflow's shutdown
        payload): a Payload, a ``(name, properties)`` pair, or None."""
        self._shutdown_callbacks.append(callback)

    def _emit_job(self, job: Job, payload: Any) -> bool:
        return self._emit_payload(job.event or job.name, payload)

    def _emit_payload(self, name: str | None, payload: Any) -> bool:
        if not self._on or payload is None:
            return False
        if isinstance(payload, tuple):
            name, payload = payload
        if isinstance(payload, Payload):
            self.track(payload)
        else:
            self.track(name or "event", payload)
        if self.pipeline is not None:
            self.pipeline.drain(store=True)  # stored before the run is recorded as done
        return True

    # --- consent and status -----------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._on

    @property
    def metrics(self) -> Any:
        """The metric registry of this instance (see :mod:`waypost.metrics`)."""
        registry = self.__dict__.get("_metrics")
        if registry is None:
            from waypost.metrics import MetricRegistry

            registry = self.__dict__["_metrics"] = MetricRegistry(self)
        return registry

    def set_consent(self, enabled: bool) -> Decision:
        """Store the administrator's choice (rule 4) and apply it at once where it decides.

        Returns the new decision: a higher rule (``DO_NOT_TRACK``, the app's variable, the config
        file) still wins over the stored choice.
        """
        StoredConsent(bool(enabled), self.config.policy_version, time.time()).write(self.data_dir)
        self.decision = self._decide()
        with self._lock:
            if self._closed or self.config_error is not None:
                return self.decision
            if self.decision.enabled and not self._on and self._autostart:
                self._start()
            elif not self.decision.enabled and self._on:
                self._stop_running()
        return self.decision

    def _stop_running(self) -> None:
        """Consent was withdrawn: stop collecting and sending at once. Events not yet stored
        are discarded; what the outbox holds stays there, unsent, until consent returns or an
        operator purges it."""
        self._on = self._fast = False
        _LIVE.discard(self)
        atexit.unregister(self._at_exit)
        if self.scheduler is not None:
            self.scheduler.stop(timeout=1.0)
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.buffer.clear()
            pipeline.shutdown(2.0, flush=False)
        self.outbox_ = None
        self._runners_by_name = {}

    def status(self) -> Status:
        """A snapshot: whether telemetry is on and which rule decided, sinks, depths, counters."""
        outbox_counts: dict[str, dict[str, int]] = {}
        pending_events = 0
        outbox = self.outbox_
        if outbox is None and (self.data_dir / "outbox.sqlite3").exists():
            outbox = self.open_outbox()
        if outbox is not None:
            try:
                outbox_counts = outbox.counts()
                pending_events = outbox.pending_events()
            except Exception as exc:
                log.warning("waypost: cannot read the outbox: %s", exc)
        sinks = []
        names = list(self.config.sink_specs()) if self.config_error is None else []
        for name in names:
            runner = self._runners_by_name.get(name)
            pending = outbox_counts.get(name, {}).get("pending", 0)
            if runner is not None:
                snap = runner.snapshot()
                sinks.append(
                    SinkStatus(
                        **{
                            **snap,
                            "last_success": _ts(snap["last_success"]),
                            "last_error_at": _ts(snap["last_error_at"]),
                        },
                        pending=pending,
                    )
                )
            else:
                sink_type, error = self.sink_errors.get(
                    name, (str(self.config.sink_specs()[name]["type"]), None)
                )
                sinks.append(
                    SinkStatus(
                        name=name,
                        type=sink_type,
                        state="error" if error else ("off" if not self._on else "idle"),
                        error=error,
                        pending=pending,
                    )
                )
        totals = CounterStatus(
            accepted=self.counters.accepted + (len(self.pipeline.buffer) if self.pipeline else 0),
            stored=self.counters.stored,
            delivered=sum(s.delivered for s in sinks),
            retried=sum(s.retried for s in sinks),
            failed=sum(s.failed for s in sinks),
            dropped=dict(self.counters.dropped),
        )
        return Status(
            app=self.app,
            version=self.version,
            enabled=self.decision.enabled,
            running=self._on,
            rule=self.decision.rule,
            reason=self.decision.reason,
            mode=self.config.mode,
            level=self.config.level,
            debug=self.debug,
            strict=self.strict,
            config_file=self.config_file,
            config_error=self.config_error,
            data_dir=str(self.data_dir),
            instance_id=self.instance_id or _read_instance_id(self.data_dir),
            sinks=sinks,
            buffered=len(self.pipeline.buffer) if self.pipeline else 0,
            outbox_pending_events=pending_events,
            outbox=outbox_counts,
            counters=totals,
        )

    def open_outbox(self) -> Any:
        """The outbox of this data dir (opened read-write; for inspection and purge)."""
        if self.outbox_ is not None:
            return self.outbox_
        cached = self.__dict__.get("_inspect_outbox")
        if cached is None:
            from waypost.outbox import Outbox

            cached = self.__dict__["_inspect_outbox"] = Outbox(self.data_dir)
        return cached

    def __repr__(self) -> str:
        return f"<Telemetry app={self.app!r} enabled={self._on} rule={self.decision.rule!r}>"


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise TrackError(
            f"event name must be a non-empty string of at most 200 characters or a "
            f"waypost.Payload, not {name!r:.60}"
        )
    return name


def _read_instance_id(data_dir: Path) -> str | None:
    try:
        value = (data_dir / "instance_id").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value or None


def _instance_id(data_dir: Path) -> str:
    """The installation's random id: created once (atomically, even with several processes)."""
    import uuid

    path = data_dir / "instance_id"
    existing = _read_instance_id(data_dir)
    if existing:
        return existing
    tmp = data_dir / f".instance_id.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(str(uuid.uuid4()), encoding="utf-8")
    try:
        os.link(tmp, path)  # fails if another process won the race
    except FileExistsError:
        pass
    except OSError:
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    value = _read_instance_id(data_dir)
    if not value:
        raise OSError(f"cannot create {path}")
    return value
