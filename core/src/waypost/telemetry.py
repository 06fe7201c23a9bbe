"""``Telemetry``: the object an application holds, a facade over :mod:`waypost.startup`,
:mod:`~waypost.plugins`, :mod:`~waypost.heartbeat`, :mod:`~waypost.processes` and
:mod:`~waypost.status`. ``track`` only buffers; the rest happens on background threads."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from waypost import startup
from waypost.config import TelemetryConfig
from waypost.control import ControlState
from waypost.datadir import default_data_dir
from waypost.delivery.outbox import Outbox, Outboxes
from waypost.delivery.pipeline import FIELDS, Pipeline
from waypost.delivery.runner import Runner
from waypost.errors import TrackError
from waypost.events import Payload
from waypost.gate import DEFAULT_LIMITS, Gate, check, event_time, off_scrubber, one_line, show
from waypost.heartbeat import Schedules, Scheduling
from waypost.logs import get_logger
from waypost.plugins import PluginLoader, PluginManager
from waypost.privacy import Decision, Scrubber, StoredConsent, secrets
from waypost.processes import ProcessHooks
from waypost.schedule import Clock
from waypost.sinks import Sink
from waypost.status import Counters, LogOnce, Status, snapshot

if TYPE_CHECKING:
    from waypost.metrics import MetricRegistry

__all__ = ["Status", "Telemetry", "default_data_dir"]

log = get_logger(__name__)

_now = time.time


def _nothing() -> None:
    """What ``track`` calls on a pipeline that is not (or no longer) there."""


class Telemetry(Scheduling):
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
        self._on = False
        self._fast = False  # on, not strict, not sync: track takes its shortest path
        self._keys = DEFAULT_LIMITS.keys  # telemetry.limits.keys, checked before any copy
        self._kept = False  # SIGTERM came: every event is stored as it is tracked
        self._store_now: Callable[[], object] = _nothing
        self._lock = threading.RLock()
        self._closed = False
        self._shut: tuple[threading.Event, list[bool]] = (threading.Event(), [])
        """Set when the first shutdown ended, with its result: a second waits for it."""
        # What runs while telemetry is on (waypost.startup.start makes it).
        self.pipeline: Pipeline | None = None
        self.gate: Gate | None = None
        self.control: ControlState | None = None
        # The pipeline's methods that track calls: a host thread that passed the checks just
        # before consent was withdrawn calls a no-op, never a pipeline that is gone.
        self._nudge: Callable[[], object] = _nothing
        self.counters = Counters()
        self.instance_id: str | None = None
        self._log_once = LogOnce(log)
        self.plugins = PluginManager()
        self._metrics: MetricRegistry | None = None
        self.sinks: dict[str, Sink] = {}
        self.sink_errors: dict[str, tuple[str, str]] = {}
        self._notes: list[str] = []
        # This instance's secrets, known to the process's sanitiser until it shuts down (its
        # sinks' own, as long as each sink lives).
        self._secrets = secrets.SANITISER.hold()

        loaded = startup.load_config(
            config, self._env, strict=strict, debug=debug, hold=self._secrets
        )
        where = startup.locate(loaded, app=app, data_dir=data_dir, env=self._env)
        cfg = self.config = loaded.config
        self.config_file = loaded.file
        self.config_error = loaded.error
        self.config_warnings = loaded.warnings
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
        self._outboxes = Outboxes(self.data_dir)
        self._off_scrubber = functools.cache(lambda: off_scrubber(cfg, self.plugins))
        self.schedules = Schedules(self)
        """This instance's periodic jobs (the methods of :class:`Scheduling` use them)."""
        self._process = ProcessHooks(
            shutdown=self.shutdown,
            budget=cfg.shutdown_timeout,
            after_fork_in_child=self._after_fork_in_child,
            keep_everything=self._keep_everything,
        )
        self._sinks = startup.SinkMaker.of(loaded, self.plugins, self._env, self._secrets)

        # A loader that failed (not the config's fault) keeps telemetry off whatever is decided.
        self._failed = None if loaded.failure is None else Decision(False, "error", loaded.failure)
        self.decision = self._failed or startup.decide(self)
        self._plugins = PluginLoader(self.plugins, strict=self.strict, config_file=self.config_file)
        self.plugin_errors = self._plugins.errors
        """Plugins that failed (a module of ``telemetry.plugins`` that could not be imported, a
        hook that raised at start), by name, with the reason."""
        self._plugins.register_all(plugins, cfg.plugins, sink_classes, inspecting=not start)
        self._notice_callback = notice
        self._autostart = start
        if self.decision.enabled and self.config_error is None and start:
            self._start()
        if start and self.config_error is None and cfg.metrics.exports():
            _ = self.metrics  # exporters named in config start with the application

    # --- start and stop ---------------------------------------------------------------------

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
            self.decision = startup.start_failed(
                exc, strict=self.strict, plugin_errors=self.plugin_errors
            )

    def _start_parts(self) -> None:
        cfg = self.config
        sync = cfg.outbox.durability == "sync"
        run = startup.start(
            self, sinks=self._sinks, loader=self._plugins, schedules=self.schedules,
            log_once=self._log_once, notes=self._notes, notice=self._notice_callback,
        )  # fmt: skip
        self.instance_id, self.gate, self.control = run.instance_id, run.gate, run.control
        self.pipeline = pipeline = run.pipeline
        self._outboxes.running = run.outbox
        self._buffer = pipeline.buffer
        self._nudge, self._store_now = pipeline.nudge, pipeline.store_now  # for the hot path
        # Lengths of the buffer, which holds FIELDS entries an event.
        self._wake_at = min(cfg.batch.size, cfg.outbox.buffer) * FIELDS
        self._spill_at = cfg.outbox.buffer * FIELDS
        self._keys = cfg.limits.keys
        self._sync = sync
        pipeline.start()
        self._on = True
        self._fast = not self.strict and not self._sync and not self._kept
        if self._kept:  # consent came back after SIGTERM: the process is still ending
            pipeline.keep_everything()
        startup.record_installation(
            self.config_file, app=self.app, version=self._version_given, data_dir=self.data_dir
        )
        self._process.install(sigterm=cfg.handle_sigterm)
        self.schedules.start(cfg)

    def _make_sinks(self, *, tolerant: bool = False) -> None:
        """Make the configured sinks (see :meth:`waypost.startup.SinkMaker.make`)."""
        self._sinks.make(self, tolerant=tolerant)

    def _stop_running(self) -> None:
        """Consent was withdrawn: stop at once. Events not yet stored are discarded; the
        outbox keeps what it holds, unsent, until consent returns or an operator purges it."""
        self._on = self._fast = False
        self._nudge = self._store_now = _nothing
        self._process.forget()
        self.schedules.stop(timeout=1.0)
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.buffer.clear()
            pipeline.shutdown(2.0, flush=False)
        self._outboxes.running = None

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
            if type(properties) is dict:
                if len(properties) > self._keys:  # refused at a glance, never copied
                    self._too_many_keys(event, properties)
                    return
                properties = properties.copy()
            buffer = self._buffer
            buffer.extend((event, properties, _now(), level, distinct_id))
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
        if type(properties) is dict:
            if len(properties) > self._keys:
                self._too_many_keys(event, properties)
                return
            properties = properties.copy()
        buffer = self._buffer
        buffer.extend((event, properties, when, level, distinct_id))
        if self._sync or self._kept:  # stored by the worker before this returns (STALL at most)
            self._store_now()
        elif len(buffer) == self._wake_at or len(buffer) >= self._spill_at:
            self._nudge()

    def _too_many_keys(self, event: Any, properties: dict[str, Any]) -> None:
        gate = self.gate
        if gate is not None:
            gate.refuse_keys(event, properties)

    # --- flush, shutdown, processes ---------------------------------------------------------

    def flush(self, timeout: float = 5.0, *, force: bool = False) -> bool:
        """Process everything accepted so far and try to deliver it; True when all of it was
        delivered or is safely in the outbox. Returns within ``timeout`` seconds.

        ``force`` ("submit now") also makes retries due at once and closes open circuits.
        """
        pipeline = self.pipeline
        if pipeline is None or not self._on:
            return True
        if pipeline.on_own_thread():
            # A hook or a sink: what it would wait for is the thread it runs on.
            self._log_once(
                "flush:own-thread",
                "waypost: flush() called from waypost's own thread (a hook, a scrubber or a "
                "sink) returns False at once: that thread cannot wait for itself",
            )
            return False
        deadline = time.monotonic() + max(0.0, timeout)
        if force:  # within the budget: a held outbox lock takes a share of it, not more
            pipeline.force_due(time.monotonic() + min(1.0, timeout / 2))
        ok = pipeline.flush(max(0.0, deadline - time.monotonic()))
        if self.strict:
            pipeline.raise_contract_errors()
        return ok

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush, stop the threads and close the sinks, within ``timeout`` seconds. Events not
        delivered by then stay in the outbox for the next run. Safe to call twice.

        Called from waypost's own thread (a hook, a scrubber or a sink), which it would have to
        wait for, it runs on a thread of its own instead and returns False at once."""
        pipeline = self.pipeline
        if pipeline is not None and pipeline.on_own_thread():
            threading.Thread(
                target=self.shutdown, args=(timeout,), name="waypost-shutdown", daemon=True
            ).start()
            return False
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            ended, result = self._shut
            first, self._closed = not self._closed, True
        if not first:  # another call is at it (an exit meanwhile would cut it short): wait
            return ended.wait(max(0.0, timeout)) and all(result)
        try:
            ok = self._shutdown(deadline)
            result.append(ok)
            return ok
        finally:
            ended.set()

    def _shutdown(self, deadline: float) -> bool:
        timeout = max(0.0, deadline - time.monotonic())
        # A job that is running (a slow heartbeat query) gets a share of the budget, not a
        # budget of its own; if it finishes later, its event is not tracked.
        self.schedules.stop(timeout=min(1.0, timeout / 4))
        self.schedules.shutdown(self.clock.time() - self.started_at)
        with self._lock:
            on, self._on = self._on, False
            self._fast = False
        self._process.forget()
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

    def _after_fork_in_child(self) -> None:
        """The child starts afresh: its own locks, threads, sink instances and counters; what
        the parent had buffered is the parent's to send."""
        self._lock = threading.RLock()
        if not self._shut[0].is_set():  # a shutdown under way was the parent thread's
            self._shut = (threading.Event(), [])
            self._closed = False
        self._log_once.after_fork()
        self.counters.after_fork()
        if self.pipeline is not None and self._on:
            self.pipeline.after_fork()
            self._buffer = self.pipeline.buffer
            for runner in self.pipeline.runners:
                if runner.name in self.sinks:
                    self.sinks[runner.name] = runner.sink
        self.schedules.after_fork()

    def _keep_everything(self) -> None:
        """The host stops gracefully and may end the process without atexit (uvicorn raises
        SIGTERM again with the default handler): keep everything, from now on, in the outbox."""
        pipeline = self.pipeline
        if pipeline is None or not self._on:
            return
        with self._lock:
            self._kept = True  # each event stored as it is tracked, by the worker
            self._fast = False
        pipeline.keep_everything()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

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
        """The environment this instance reads (``os.environ`` at creation, or ``env``)."""
        return self._env

    def label_scrubber(self) -> Scrubber | None:
        """The scrubber metric label values pass (None when ``scrub.enabled`` is false): the
        gate's once telemetry has started; before that, one built from the config."""
        if self.gate is not None:
            return self.gate.scrubber
        return self._off_scrubber()  # built when first asked

    def set_consent(self, enabled: bool) -> Decision:
        """Store the administrator's choice (rule 4) and apply it at once where it decides.

        Returns the new decision: a higher rule (``DO_NOT_TRACK``, the app's variable, the config
        file) still wins over the stored choice.
        """
        StoredConsent(bool(enabled), self.config.policy_version, time.time()).write(self.data_dir)
        self.decision = self._failed or startup.decide(self)
        with self._lock:
            if self._closed or self.config_error is not None:
                return self.decision
            if self.decision.enabled and not self._on and self._autostart:
                self._start()
            elif not self.decision.enabled and self._on:
                self._stop_running()
        return self.decision

    def status(self) -> Status:
        """A snapshot: whether telemetry is on and which rule decided, sinks, depths, counters."""
        return snapshot(self, self._runners(), self.schedules.control_status(), self._notes)

    def open_outbox(self, *, read_only: bool = False) -> Outbox:
        """The outbox of this data dir: the running one, else opened to purge or, ``read_only``,
        to look (see :class:`waypost.delivery.outbox.Outboxes`)."""
        return self._outboxes.open(read_only=read_only)

    @property
    def outbox_(self) -> Outbox | None:
        """The outbox while telemetry runs (None in debug mode)."""
        return self._outboxes.running

    def has_outbox(self) -> bool:
        """Whether this data dir holds an outbox (without creating one)."""
        return self._outboxes.exists()

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
        return {name: list(r.receipts) for name, r in self._runners().items()}

    def _runners(self) -> dict[str, Runner]:
        pipeline = self.pipeline
        return {r.name: r for r in pipeline.runners} if pipeline is not None else {}

    def __repr__(self) -> str:
        return f"<Telemetry app={self.app!r} enabled={self._on} rule={self.decision.rule!r}>"
