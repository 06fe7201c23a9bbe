"""``Telemetry``: the object an application holds. ``track`` only buffers; everything else
happens on background threads, behind the privacy gate."""

from __future__ import annotations

import atexit
import datetime as _dt
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from waypost import config as _config
from waypost import datadir, heartbeat, processes
from waypost.config import TelemetryConfig
from waypost.control import Control, ControlState
from waypost.datadir import default_data_dir
from waypost.delivery.backoff import Backoff
from waypost.delivery.outbox import FILENAME as OUTBOX_FILE
from waypost.delivery.outbox import Outbox
from waypost.delivery.pipeline import Pipeline
from waypost.delivery.runner import Runner
from waypost.errors import (
    ConfigError,
    PluginError,
    TrackError,
    WaypostError,
)
from waypost.events import Payload
from waypost.gate import Gate, check, event_time, one_line, show
from waypost.logs import get_logger
from waypost.plugins import PluginManager
from waypost.privacy import (
    Decision,
    Rule,
    Scrubber,
    StoredConsent,
    notice,
    resolve_consent,
    secrets,
)
from waypost.schedule import Clock, Job, Scheduler, parse_time_of_day
from waypost.sinks import Sink, SinkConfig, SinkContext
from waypost.status import (
    Counters,
    CounterStatus,
    LogOnce,
    Status,
    StorageStatus,
    as_datetime,
    sink_status,
)

if TYPE_CHECKING:
    from waypost.metrics import MetricRegistry

__all__ = ["Status", "Telemetry", "default_data_dir"]

log = get_logger(__name__)

_LIVE: weakref.WeakSet[Telemetry] = weakref.WeakSet()
"""The instances that are running (for ``waypost.integrations``)."""
_now = time.time


def _import_beside(name: str, config_file: str | None, load: Callable[[str], Any]) -> Any:
    """Import a module the config names; one that is not on the path is looked for beside the
    config file too, as ``waypost manifest`` looks for ``schemas``: so the CLI finds an
    application's own plugin module when run from anywhere."""
    try:
        return load(name)
    except ModuleNotFoundError as exc:
        if config_file in (None, "<config>") or exc.name != name.partition(".")[0]:
            raise
        import sys

        beside = os.path.dirname(os.path.abspath(str(config_file)))
        if not os.path.exists(os.path.join(beside, exc.name)) and not os.path.exists(
            os.path.join(beside, exc.name + ".py")
        ):
            raise
        if beside not in sys.path:
            sys.path.append(beside)
        return load(name)


def _plugin_label(plugin: object) -> str:
    """A readable name for a plugin given in code: its module's name, or its class's."""
    name = getattr(plugin, "__name__", None)
    if isinstance(name, str):
        return name
    kind = type(plugin)
    return f"{kind.__module__}.{kind.__qualname__}"


def _nothing() -> None:
    """What ``track`` calls on a pipeline that is not (or no longer) there."""


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
        # The pipeline's methods that track calls: a host thread that passed the checks just
        # before consent was withdrawn calls a no-op, never a pipeline that is gone.
        self._nudge: Callable[[], object] = _nothing
        self._drain: Callable[[], object] = _nothing
        self.outbox_: Outbox | None = None
        self.counters = Counters()
        self.instance_id: str | None = None
        self.config_error: str | None = None
        self._log_once = LogOnce(log)
        self.plugins = PluginManager()
        self._runners_by_name: dict[str, Runner] = {}
        self.gate: Gate | None = None
        self.control: ControlState | None = None
        self._heartbeat_every: float | None = None  # this installation's own period
        self._metrics: MetricRegistry | None = None
        self._purge_outbox: Outbox | None = None
        self._read_outbox: Outbox | None = None
        self._off_scrubber: tuple[Scrubber | None] | None = None  # built when first asked
        self.sinks: dict[str, Sink] = {}
        self.sink_errors: dict[str, tuple[str, str]] = {}
        self.plugin_errors: dict[str, str] = {}
        """Plugins that failed (a module of ``telemetry.plugins`` that could not be imported, a
        hook that raised at start), by name, with the reason."""
        self._notes: list[str] = []
        # This instance's secrets, known to the process's sanitiser until it shuts down (its
        # sinks' own, as long as each sink lives).
        self._secrets = secrets.SANITISER.hold()

        overrides: dict[str, Any] = {}
        if strict is not None:
            overrides["strict"] = strict
        if debug is not None:
            overrides["debug"] = debug
        if config is None:
            found = _config.find_config(self._env)
            config = found if found is not None else None
        secrets.guard_loggers()
        self.config_warnings: list[str] = []
        self._sink_sources: dict[str, Any] = {}
        try:
            self.config, self.config_file = _config.load(
                config,
                self._env,
                overrides=overrides,
                notes=self.config_warnings,
                sink_sources=self._sink_sources,
            )
            self._secrets.add_config(self.config)  # literal secrets; ${...} when sinks are made
        except Exception as exc:
            if not isinstance(exc, ConfigError):  # a bug or a resource limit, not a bad value
                exc = ConfigError(f"cannot be loaded: {type(exc).__name__}: {exc}", source=(
                    str(config) if isinstance(config, (str, os.PathLike)) else None))  # fmt: skip
            if strict:
                raise exc from None
            self.config_error = str(exc)
            log.error("waypost: telemetry is off: %s", exc)
            self.config = TelemetryConfig(enabled=False, strict=False)
            self.config_file = str(config) if isinstance(config, (str, os.PathLike)) else None
        for note in self.config_warnings:
            log.warning("waypost: %s", note)
        cfg = self.config
        try:
            where = datadir.locate(
                app=app, data_dir=data_dir, config=cfg, config_file=self.config_file, env=self._env
            )
        except Exception as exc:  # e.g. ~user/ of a user who does not exist
            error = ConfigError(f"cannot locate the data dir: {exc}", key="telemetry.data_dir")
            if cfg.strict:
                raise error from None
            self.config_error = self.config_error or str(error)
            log.error("waypost: telemetry is off: %s", error)
            where = datadir.Location(app or "app", default_data_dir(app or "app"), "default")
        self.app = where.app
        self._version_given = version or cfg.version
        self.version = self._version_given or "0"
        self.strict = cfg.strict
        self.debug = cfg.debug
        self.distinct_id = distinct_id or cfg.distinct_id or ""
        self.data_dir_source = where.source
        self.data_dir: Path = where.data_dir
        self._earliest = cfg.timestamps.earliest.timestamp()
        self._ahead = cfg.timestamps.ahead

        self.decision = self._decide()
        for plugin in plugins:
            self._register_plugin(plugin)
        for module_name in cfg.plugins:
            self._register_plugin_module(module_name, inspecting=not start)
        for sink_class in sink_classes:
            try:
                self.plugins.register_sink(sink_class)
            except PluginError as exc:
                self._plugin_failed(repr(sink_class), exc)
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

    def _register_plugin_module(self, module_name: str, *, inspecting: bool) -> None:
        """Import and register a module of ``telemetry.plugins``. A failure raises in strict
        mode, except for an instance that only inspects (``start=False``: the CLI), where it is
        recorded in ``plugin_errors``: the operator must still see and switch off telemetry."""
        import importlib

        try:
            module = _import_beside(module_name, self.config_file, importlib.import_module)
        except Exception as exc:
            self._plugin_failed(
                module_name,
                PluginError(f"error importing plugin {module_name!r}: {type(exc).__name__}: {exc}"),
                exc,
                inspecting=inspecting,
            )
            return
        self._register_plugin(module, module_name, inspecting=inspecting)

    def _register_plugin(
        self, plugin: object, name: str | None = None, *, inspecting: bool = False
    ) -> None:
        """Register hook implementations given in code or named in ``telemetry.plugins``; one
        that cannot be registered (its ``register_sinks`` raises, a misspelt hook) is reported
        and its sinks are off."""
        label = name or _plugin_label(plugin)
        if name is None and self.plugins.pm.get_plugin(label) is not None:
            label = f"{label}#{id(plugin):x}"  # two instances of one class
        try:
            self.plugins.register_module(plugin, name=label)
        except Exception as exc:
            error = exc if isinstance(exc, PluginError) else PluginError(
                f"plugin {label!r} could not be registered: {type(exc).__name__}: {exc}",
                plugin=label)  # fmt: skip
            self._plugin_failed(label, error, exc, inspecting=inspecting)

    def _plugin_failed(self, plugin: str, error: PluginError, cause: BaseException | None = None,
                       consequence: str = "", *, inspecting: bool = False) -> None:  # fmt: skip
        """A plugin failed: raise at once in strict mode (unless the instance only inspects:
        the CLI); otherwise report it in ``status()`` (``plugin_errors``) with one log line,
        and go on without that part."""
        if self.strict and not inspecting:
            raise error from cause
        message = f"{error}{consequence}"
        previous = self.plugin_errors.get(plugin)
        self.plugin_errors[plugin] = f"{previous}; {message}" if previous else message
        log.error("waypost: %s", message)

    def _hook_failed(self, plugin: str, what: str, exc: Exception) -> None:
        """``what`` went wrong with a hook of ``plugin`` (``waypost_context raised``)."""
        self._plugin_failed(
            plugin,
            PluginError(f"plugin {plugin!r}: {what} {type(exc).__name__}: {exc}", plugin=plugin),
            exc,
            consequence=" (what it adds is left out)",
        )

    def _start(self) -> None:
        """Start collecting; in production, anything that fails on the way (a plugin, the data
        dir, a thread that cannot start) leaves telemetry off with the reason in ``status()``."""
        try:
            self._start_parts()
        except Exception as exc:
            if self._on or self.pipeline is not None:
                try:
                    self._stop_running()
                except Exception as stop_exc:
                    log.warning("waypost: stopping after a failed start: %s", stop_exc)
            if self.strict:
                if isinstance(exc, WaypostError):
                    raise
                raise WaypostError(
                    f"telemetry could not start: {type(exc).__name__}: {exc}"
                ) from exc
            reason = secrets.sanitise(
                str(exc) if isinstance(exc, WaypostError) else f"{type(exc).__name__}: {exc}"
            )
            if isinstance(exc, PluginError):
                self.plugin_errors.setdefault(exc.plugin or "start", reason)
            log.error("waypost: telemetry is off: %s", reason)
            self.decision = Decision(False, "error", reason)

    def _start_parts(self) -> None:
        cfg = self.config
        # Nothing found in the data dir stops telemetry: what cannot be read is replaced,
        # what cannot be written is kept in memory (status says so).
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._notes.append(f"cannot create the data dir {self.data_dir}: {exc}")
            log.warning("waypost: %s", self._notes[-1])
        self.instance_id, note = datadir.instance_id_or_temporary(self.data_dir)
        if note:
            self._notes.append(note)
        if not self._show_notice():
            return
        self._make_sinks()  # first: sink plugins may implement the hooks below too
        self.gate = Gate.create(
            cfg,
            self.plugins,
            app=self.app,
            version=self.version,
            instance_id=self.instance_id,
            distinct_id=self.distinct_id,
            counters=self.counters,
            log_once=self._log_once,
            on_error=self._hook_failed,
        )
        self.control = ControlState(self.data_dir)
        self.control.listeners.append(self._apply_control)
        self.gate.control = self.control
        scheduled = self.scheduler.jobs.get(heartbeat.NAME) if self.scheduler else None
        if scheduled is not None and scheduled.event:  # scheduled while telemetry was off
            self.gate.heartbeats.add(scheduled.event)
        outbox = None
        self._started_wall = time.time()
        if not self.debug:
            # Never raises: an outbox that cannot be used now says why in its health, and
            # events are kept in memory meanwhile.
            outbox = Outbox(self.data_dir, sync=cfg.outbox.durability == "sync")
        self.outbox_ = outbox
        self.pipeline = Pipeline(
            outbox=outbox,
            sinks=list(self.sinks.values()),
            build=self.gate.build,
            counters=self.counters,
            batch_interval=cfg.batch.interval,
            batch_size=cfg.batch.size,
            buffer_size=cfg.outbox.buffer,
            backoff=Backoff(initial=cfg.retry.initial, maximum=cfg.retry.maximum),
            max_attempts=cfg.retry.max_attempts,
            breaker_threshold=cfg.retry.breaker_threshold,
            keep_sent=cfg.outbox.keep_sent,
            retention=self._retention,
            startup=self._outbox_startup if outbox is not None else None,
            debug=self.debug,
            strict=self.strict,
            sync=cfg.outbox.durability == "sync",
            on_control=self._receive_control,
            paused_for=self.control.paused_for,
            kept_for=self._kept_for(),
        )
        self._runners_by_name = {r.name: r for r in self.pipeline.runners}
        self._buffer = self.pipeline.buffer
        self._nudge, self._drain = self.pipeline.nudge, self.pipeline.drain  # for the hot path
        self._wake_at = min(cfg.batch.size, cfg.outbox.buffer)
        self._spill_at = cfg.outbox.buffer
        self._sync = cfg.outbox.durability == "sync"
        self.pipeline.start()
        self._on = True
        self._fast = not self.strict and not self._sync
        _LIVE.add(self)
        self._record_installation()
        atexit.register(self._at_exit)
        processes.follow_forks(self)
        processes.at_multiprocessing_exit(self, Telemetry._at_exit)
        if cfg.handle_sigterm:
            processes.install_sigterm(self)
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

    def _record_installation(self) -> None:
        """Leave what the CLI (another process, perhaps cron) needs to send as this application
        does: per user, which data dir this config file serves (``waypost --app NAME`` from
        anywhere); in the data dir, the name, version and config file."""
        from_file = self.config_file not in (None, "<config>")
        config_file = str(Path(str(self.config_file)).resolve()) if from_file else None
        if config_file is not None:
            datadir.remember_installation(config_file, self.app, self.data_dir)
        datadir.record_installation(
            self.data_dir, app=self.app, version=self._version_given, config_file=config_file
        )

    def _kept_for(self) -> dict[str, SinkConfig]:
        """The configured sinks that could not be made, with the routing their config asks
        (``events``, ``exclude_events``; everything if even that is wrong): their events are
        kept in the outbox, within its limits, for the start that can make them."""
        specs = self.config.sink_specs()
        kept: dict[str, SinkConfig] = {}
        for name in self.sink_errors:
            spec = specs.get(name, {})
            try:
                kept[name] = SinkConfig(
                    events=spec.get("events"), exclude_events=spec.get("exclude_events") or []
                )
            except Exception:
                kept[name] = SinkConfig()
        return kept

    def _fail_start(self, reason: str) -> None:
        reason = secrets.sanitise(reason)
        if self.strict:
            raise WaypostError(reason)
        log.error("waypost: telemetry is off: %s", reason)
        self.decision = Decision(False, "error", reason)

    def _show_notice(self) -> bool:
        try:
            note = notice.show_once(
                self.config,
                app=self.app,
                data_dir=self.data_dir,
                rule=self.decision.rule,
                show=self._notice_callback,
            )
        except Exception as exc:
            self._fail_start(f"the first-run notice could not be shown: {exc}")
            return False
        if note:
            self._notes.append(note)
            log.warning("waypost: %s", note)
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
        specs: dict[str, Mapping[str, Any]] = {}
        for name, spec in self.config.sink_specs().items():
            source = self._sink_sources.get(name)
            # As written (typed by the sink's own model in make_sinks), with the type resolved.
            specs[name] = {**source, "type": spec["type"]} if isinstance(source, Mapping) else spec
        made, errors = self.plugins.make_sinks(
            specs,
            context=context,
            env=self._env,
            config_file=self.config_file,
            strict=self.strict,
            tolerant=tolerant,
            notes=self.config_warnings,
            secrets=self._secrets,
        )
        self.sinks.update(made)
        self.sink_errors.update(errors)
        secrets.guard_loggers()  # the sinks' modules may have made loggers of their own

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
        ``timestamp`` (Unix seconds, or a datetime: naive is UTC) when it happened, if not now:
        from ``telemetry.timestamps.earliest`` (2000-01-01) to a day ahead of now.

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
                self._nudge()
            return
        if not self._on:
            return
        if self.strict:
            check(event, properties, level, distinct_id, self.config.limits)
        if timestamp is None:
            when = time.time()
        else:
            try:
                when = event_time(timestamp, self._earliest, self._ahead)
            except Exception as exc:  # a datetime whose tzinfo raises is refused the same way
                if self.strict:
                    raise TrackError(f"timestamp {show(timestamp)}: {exc}") from None
                self.counters.drop("invalid")
                self._log_once(
                    "invalid:timestamp",
                    "waypost: event dropped: timestamp %s: %s",
                    show(timestamp),
                    one_line(exc),
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
            self._drain()
        elif len(buffer) == self._wake_at or len(buffer) >= self._spill_at:
            self._nudge()

    def _outbox_startup(self) -> None:
        """What a starting instance does to the outbox: void the leases of processes that
        died, and make every pending row due (a restart is a retry point). Runs on the storer
        (raises StorageUnavailable while the outbox cannot be written: tried again later)."""
        outbox = self.outbox_
        if outbox is not None:
            outbox.reclaim()
            # Only what an earlier run left: this process's own retries keep their backoff.
            outbox.retry_now(list(self.sinks), before=self._started_wall)

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
        deadline = time.monotonic() + max(0.0, timeout)
        if force:  # within the budget: a held outbox lock takes a share of it, not more
            pipeline.force_due(time.monotonic() + min(1.0, timeout / 2))
        ok = pipeline.flush(max(0.0, deadline - time.monotonic()))
        if self.strict:
            pipeline.raise_contract_errors()
        return ok

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush, stop the threads and close the sinks, within ``timeout`` seconds. Events not
        delivered by then stay in the outbox for the next run. Safe to call twice."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            if self._closed:
                return True
            self._closed = True
        if self.scheduler is not None:
            # A job that is running (a slow heartbeat query) gets a share of the budget, not a
            # budget of its own; if it finishes later, its event is not tracked.
            self.scheduler.stop(timeout=min(1.0, timeout / 4))
        if self._on:
            for callback in self._shutdown_callbacks:
                self._emit_payload(None, callback(self.clock.time() - self.started_at))
        with self._lock:
            on, self._on = self._on, False
            self._fast = False
        self._forget_process()
        registry = self._metrics
        if registry is not None:
            try:
                registry.close(min(1.0, max(0.0, deadline - time.monotonic()) / 4))
            except Exception as exc:
                log.warning("waypost: closing metrics failed: %s", exc)
        try:
            if self.pipeline is None or not on:
                return True
            return self.pipeline.shutdown(max(0.0, deadline - time.monotonic()))
        finally:
            self._secrets.release()  # a sink still sending holds its own

    def _forget_process(self) -> None:
        """No more at-exit, at-fork or SIGTERM work for this instance."""
        _LIVE.discard(self)
        try:
            atexit.unregister(self._at_exit)
        except Exception:
            pass
        processes.forget_forks(self)
        processes.uninstall_sigterm(self)

    def _at_exit(self) -> None:
        try:
            self.shutdown(self.config.shutdown_timeout)
        except Exception as exc:
            log.warning("waypost: shutdown at exit failed: %s", exc)

    # Around fork() (waypost.processes calls these for every running instance).

    def _before_fork(self) -> None:
        # multiprocessing may have been imported since start: its children get a finalizer.
        processes.at_multiprocessing_exit(self, Telemetry._at_exit)

    def _after_fork_in_parent(self) -> None:
        pass

    def _after_fork_in_child(self) -> None:
        """The child starts afresh: its own locks, threads, sink instances and counters; what
        the parent had buffered is the parent's to send."""
        self._lock = threading.RLock()
        self._log_once.after_fork()
        self.counters.after_fork()
        if self.pipeline is not None and self._on:
            self.pipeline.after_fork()
            self._buffer = self.pipeline.buffer
            for runner in self.pipeline.runners:
                if runner.name in self.sinks:
                    self.sinks[runner.name] = runner.sink
        if self.scheduler is not None:
            self.scheduler.after_fork()

    # SIGTERM (see waypost.processes.install_sigterm).

    @property
    def sigterm_budget(self) -> float:
        return float(self.config.shutdown_timeout)

    def _on_sigterm(self, ends_now: bool) -> None:
        if ends_now:  # the process ends when this returns: deliver what can be, as at exit
            self._at_exit()
            return
        # The host stops gracefully and may end the process without atexit (uvicorn raises
        # SIGTERM again with the default handler): keep everything, from now on, in the outbox.
        pipeline = self.pipeline
        if pipeline is None or not self._on:
            return
        with self._lock:
            self._sync = True
            self._fast = False
        pipeline.keep_everything()

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
            self.scheduler = self._new_scheduler()
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
        """Schedule the heartbeat snapshot (FlowForge's ping, see :meth:`heartbeat_payload`).
        A destination's control block may make it less frequent, never more."""
        self._heartbeat_facts = facts
        if self.gate is not None:  # before the job can first run: heartbeats are not sampled
            self.gate.heartbeats.add(event)
        own = _config.parse_duration(every)
        control = self.control.current if self.control is not None else None
        job = self.schedule(
            heartbeat.NAME,
            lambda: self.heartbeat_payload(facts),
            # Stretched before the job is added, so its first run already keeps the period.
            every=control.heartbeat_period(own) if control is not None else own,
            first_delay=first_delay,
            time_of_day=time_of_day,
            jitter=jitter,
            condition=condition,
            event=event,
        )
        self._heartbeat_every = own
        return job

    def heartbeat_payload(
        self, facts: Callable[[], Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The heartbeat in FlowForge's shape: instance id, os, runtime and app versions, and
        ``platform.counts`` / ``platform.config`` contributed by the application (``facts``) and
        by plugins (hook ``waypost_heartbeat``).

        What ``facts`` returns is recorded in the data dir (see :meth:`record_facts`); without
        ``facts``, the facts recorded last are used: a heartbeat sent by cron (``waypost
        send-heartbeat``) carries the application's counts."""
        if facts is not None:
            given = facts

            def facts_recorded() -> Mapping[str, Any]:
                value = given()
                self.record_facts(value)
                return value

            facts = facts_recorded
        else:
            stored = datadir.read_installation(self.data_dir).get("facts")
            if isinstance(stored, dict):
                facts = lambda: stored  # noqa: E731
        return heartbeat.payload(
            app=self.app,
            version=self.version,
            instance_id=self.instance_id or datadir.read_instance_id(self.data_dir),
            facts=facts,
            plugins=self.plugins,
        )

    def record_facts(self, facts: Mapping[str, Any]) -> None:
        """Record the application's heartbeat facts (``{"platform": {"counts": {...}}}``) in
        the data dir, for a heartbeat another process sends: ``waypost send-heartbeat`` from
        cron merges them into its payload. Call it when the counts change, or let
        ``heartbeat(facts=...)`` record what it sends. Nothing is written while telemetry is
        off; the facts pass the privacy gate when a heartbeat carries them."""
        if not self._on or not isinstance(facts, Mapping):
            return
        datadir.record_installation(self.data_dir, facts=dict(facts), facts_at=time.time())

    def send_heartbeat(self, *, force: bool = False) -> bool:
        """Send the heartbeat now (for cron: ``waypost send-heartbeat``). Unless ``force``, it
        is skipped when this installation already sent one within the period."""
        if not self._on:
            # Off means off: no schedule file, no facts callback, no waypost_heartbeat hook.
            self.last_heartbeat_outcome = "skipped: telemetry is off"
            return False
        if self.scheduler is None or heartbeat.NAME not in self.scheduler.jobs:
            self.scheduler = self.scheduler or self._new_scheduler()
            job = heartbeat.job_from_config(
                lambda: self.heartbeat_payload(self._heartbeat_facts), self.config.heartbeat
            )
            stored = self.control.current if self.control else Control.read(self.data_dir)
            if stored is not None:  # the cron job keeps the period a destination asked for
                job.every = stored.heartbeat_period(job.every)
            if self.gate is not None and job.event:
                self.gate.heartbeats.add(job.event)  # never sampled out, from cron either
        else:
            job = self.scheduler.jobs[heartbeat.NAME]
        sent = self.scheduler.run(job, force=force)
        self.last_heartbeat_outcome = job.last_outcome
        return sent

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(
            data_dir=self.data_dir, emit=self._emit_job, clock=self.clock, active=self._running
        )

    def _running(self) -> bool:
        return self._on

    # --- instructions from the destination -------------------------------------------------

    def _receive_control(self, sink: str, block: dict[str, Any]) -> None:
        """A sink's destination answered a control block (on the sink's thread)."""
        if self.control is not None:
            self.control.receive(block, source=sink)

    def _apply_control(self, control: Control) -> None:
        """Make the heartbeat less frequent if the control asks; nothing else changes here
        (sampling and pauses are the gate's and the runners')."""
        jobs = self.scheduler.jobs if self.scheduler is not None else {}
        job = jobs.get(heartbeat.NAME)
        if job is not None and self._heartbeat_every is not None:
            job.every = control.heartbeat_period(self._heartbeat_every)

    def _control_status(self) -> dict[str, Any] | None:
        control = self.control.current if self.control else Control.read(self.data_dir)
        if control is None:
            return None
        data = control.as_dict()
        job = (self.scheduler.jobs if self.scheduler is not None else {}).get(heartbeat.NAME)
        data["heartbeat_period"] = job.every if job is not None else None
        data["paused"] = control.paused()
        return data

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
    def metrics(self) -> MetricRegistry:
        """The metric registry of this instance (see :mod:`waypost.metrics`)."""
        registry = self._metrics
        if registry is None:
            from waypost.metrics import MetricRegistry

            registry = self._metrics = MetricRegistry(self)
        return registry

    @property
    def env(self) -> Mapping[str, str]:
        """The environment this instance reads (``os.environ`` at creation, or the ``env``
        given)."""
        return self._env

    def label_scrubber(self) -> Scrubber | None:
        """The scrubber metric label values pass (None when ``scrub.enabled`` is false): the
        gate's once telemetry has started; before that, one built from the config, since the
        operator's local Prometheus exposition works with telemetry off."""
        if self.gate is not None:
            return self.gate.scrubber
        if self._off_scrubber is None:
            extra: list[Rule] = []
            try:
                self.plugins.hook.register_scrubbers(register=extra.append)
            except Exception as exc:
                log.warning("waypost: a register_scrubbers hook failed: %s", exc)
            enabled = self.config.scrub.enabled
            self._off_scrubber = (Scrubber.from_config(self.config, extra) if enabled else None,)
        return self._off_scrubber[0]

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
        self._nudge = self._drain = _nothing
        self._forget_process()
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
        rows: dict[str, dict[str, Any]] = {}
        pending_events = 0
        storage = StorageStatus()
        try:
            outbox = self.outbox_
            if outbox is None and self.has_outbox():
                outbox = self.open_outbox(read_only=True)
        except Exception as exc:  # status answers whatever the data dir holds
            outbox = None
            storage = StorageStatus(state="unavailable", detail=f"{type(exc).__name__}: {exc}")
        if outbox is not None:
            try:
                outbox_counts = outbox.counts()
                rows = outbox.sink_rows()
                pending_events = outbox.pending_events()
            except Exception as exc:
                log.warning("waypost: cannot read the outbox: %s", exc)
            health = outbox.health()
            storage = StorageStatus(
                state=health.state,
                memory_only=health.memory_only and self._on,
                detail=health.detail,
                since=as_datetime(health.since),
                moved_aside=health.moved_aside,
                notes=health.notes,
            )
        specs = self.config.sink_specs() if self.config_error is None else {}
        sinks = [
            sink_status(
                name,
                str(spec["type"]),
                runner=self._runners_by_name.get(name),
                error=self.sink_errors.get(name, ("", None))[1],
                pending=outbox_counts.get(name, {}).get("pending", 0),
                running=self._on,
                rows=rows.get(name),
                enabled=self.decision.enabled,
            )
            for name, spec in specs.items()
        ]
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
            config_warnings=list(self.config_warnings),
            plugin_errors=dict(self.plugin_errors),
            data_dir=str(self.data_dir),
            instance_id=self.instance_id or datadir.read_instance_id(self.data_dir),
            sinks=sinks,
            buffered=len(self.pipeline.buffer) if self.pipeline else 0,
            outbox_pending_events=pending_events,
            outbox=outbox_counts,
            counters=totals,
            control=self._control_status(),
            storage=storage,
            notes=list(self._notes),
        )

    def open_outbox(self, *, read_only: bool = False) -> Outbox:
        """The outbox of this data dir: the running instance's, or else opened read-write (to
        purge) or, ``read_only``, to look (``status``, ``show``: read as it is, nothing written,
        created or repaired, as with telemetry off)."""
        if self.outbox_ is not None:
            return self.outbox_
        if read_only:
            if self._read_outbox is None:
                self._read_outbox = Outbox(self.data_dir, inspect=True)
            return self._read_outbox
        if self._purge_outbox is None:
            self._purge_outbox = Outbox(self.data_dir)
        return self._purge_outbox

    def has_outbox(self) -> bool:
        """Whether this data dir holds an outbox (without creating one)."""
        return self.outbox_ is not None or (self.data_dir / OUTBOX_FILE).exists()

    def inspect_sinks(self, *, tolerant: bool = True) -> dict[str, Sink]:
        """The configured sinks of an instance that was not started (``start=False``), made
        now if they were not: for inspection (``waypost status``, ``test-sink``, ``manifest``).
        ``tolerant``: a sink that cannot be made (its plugin missing or broken, its secret not
        in this environment) is reported in ``status()``, not raised, even in strict mode."""
        if not self.sinks and not self.sink_errors and self.config_error is None:
            self._make_sinks(tolerant=tolerant)
        return self.sinks

    def receipts(self) -> dict[str, list[str]]:
        """The last receipts (destination ids for what was delivered) of each running sink."""
        return {name: list(r.receipts) for name, r in self._runners_by_name.items()}

    def __repr__(self) -> str:
        return f"<Telemetry app={self.app!r} enabled={self._on} rule={self.decision.rule!r}>"
