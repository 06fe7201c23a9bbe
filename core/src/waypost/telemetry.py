"""``Telemetry``: the object an application holds, and the facade over waypost's parts. ``track``
only buffers; everything else happens on background threads, behind the privacy gate. Start-up
is :mod:`waypost.startup`'s, plugins :mod:`waypost.plugins`', schedules and the heartbeat
:mod:`waypost.heartbeat`'s, process hooks :mod:`waypost.processes`', the status
:mod:`waypost.status`'."""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from waypost import startup
from waypost.config import TelemetryConfig
from waypost.control import ControlState
from waypost.datadir import default_data_dir
from waypost.delivery.outbox import FILENAME as OUTBOX_FILE
from waypost.delivery.outbox import Outbox
from waypost.delivery.pipeline import Pipeline
from waypost.delivery.runner import Runner
from waypost.delivery.upkeep import OutboxUpkeep
from waypost.errors import PluginError, TrackError, WaypostError
from waypost.events import Payload
from waypost.gate import DEFAULT_LIMITS, Gate, check, event_time, one_line, show
from waypost.heartbeat import Schedules
from waypost.logs import get_logger
from waypost.plugins import PluginLoader, PluginManager
from waypost.privacy import Decision, Rule, Scrubber, StoredConsent, secrets
from waypost.processes import ProcessHooks
from waypost.schedule import Clock, Job, Scheduler
from waypost.sinks import Sink, SinkContext
from waypost.status import Counters, LogOnce, Status, snapshot

if TYPE_CHECKING:
    from waypost.metrics import MetricRegistry

__all__ = ["Status", "Telemetry", "default_data_dir", "running"]

log = get_logger(__name__)

_LIVE: weakref.WeakSet[Telemetry] = weakref.WeakSet()
_now = time.time


def running() -> list[Telemetry]:
    """The instances of this process that are running (for ``waypost.integrations``)."""
    return list(_LIVE)


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
        self._shutdown_callbacks: list[Callable[[float], Any]] = []
        self._on = False
        self._fast = False  # on, not strict, not sync: track takes its shortest path
        self._keys = DEFAULT_LIMITS.keys  # telemetry.limits.keys, checked before any copy
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
        self._log_once = LogOnce(log)
        self.plugins = PluginManager()
        self._runners_by_name: dict[str, Runner] = {}
        self.gate: Gate | None = None
        self.control: ControlState | None = None
        self._metrics: MetricRegistry | None = None
        self._purge_outbox: Outbox | None = None
        self._read_outbox: Outbox | None = None
        self._off_scrubber: tuple[Scrubber | None] | None = None  # built when first asked
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
        self._sink_maker = startup.SinkMaker(
            cfg,
            loaded.sink_sources,
            self.plugins,
            self._env,
            self.config_file,
            self.config_warnings,
            self._secrets,
        )
        self._jobs = Schedules(self, self._emit_payload)
        self._process = ProcessHooks(
            at_exit=self._at_exit,
            after_fork_in_child=self._after_fork_in_child,
            on_sigterm=self._on_sigterm,
            sigterm_budget=float(cfg.shutdown_timeout),
        )

        self.decision = self._decide()
        self._plugins = PluginLoader(self.plugins, strict=self.strict, config_file=self.config_file)
        self.plugin_errors = self._plugins.errors
        """Plugins that failed (a module of ``telemetry.plugins`` that could not be imported, a
        hook that raised at start), by name, with the reason."""
        for plugin in plugins:
            self._plugins.register(plugin)
        for module_name in cfg.plugins:
            self._plugins.register_named(module_name, inspecting=not start)
        for sink_class in sink_classes:
            self._plugins.register_sink(sink_class)
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

    # --- start and stop ---------------------------------------------------------------------

    def _decide(self) -> Decision:
        return startup.decide(
            self.config,
            self._env,
            data_dir=self.data_dir,
            config_file=self.config_file,
            config_error=self.config_error,
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
        self.instance_id = startup.prepare_data_dir(self.data_dir, self._notes)
        failed = startup.show_notice(
            cfg,
            app=self.app,
            data_dir=self.data_dir,
            rule=self.decision.rule,
            show=self._notice_callback,
            notes=self._notes,
        )
        if failed is not None:
            raise WaypostError(secrets.sanitise(failed))
        self._make_sinks()  # first: sink plugins may implement the hooks below too
        self.gate = gate = Gate.create(
            cfg,
            self.plugins,
            app=self.app,
            version=self.version,
            instance_id=self.instance_id,
            distinct_id=self.distinct_id,
            counters=self.counters,
            log_once=self._log_once,
            on_error=self._plugins.hook_failed,
        )
        self.control = control = gate.control = ControlState(self.data_dir)
        control.listeners.append(self._jobs.apply_control)
        scheduled = self._jobs.heartbeat_event()
        if scheduled:  # scheduled while telemetry was off
            gate.heartbeats.add(scheduled)
        sync = cfg.outbox.durability == "sync"
        upkeep = OutboxUpkeep(
            lambda: self.outbox_, cfg.outbox, self.counters, sinks=self.sinks, started=time.time()
        )
        # Never raises: an outbox that cannot be used now says why in its health, and events
        # are kept in memory meanwhile.
        self.outbox_ = None if self.debug else Outbox(self.data_dir, sync=sync)
        self.pipeline = pipeline = startup.make_pipeline(
            cfg,
            outbox=self.outbox_,
            sinks=self.sinks,
            sink_errors=self.sink_errors,
            gate=gate,
            control=control,
            counters=self.counters,
            upkeep=upkeep,
            debug=self.debug,
            strict=self.strict,
        )
        self._runners_by_name = {r.name: r for r in pipeline.runners}
        self._buffer = pipeline.buffer
        self._nudge, self._drain = pipeline.nudge, pipeline.drain  # for the hot path
        self._wake_at = min(cfg.batch.size, cfg.outbox.buffer)
        self._spill_at = cfg.outbox.buffer
        self._keys = cfg.limits.keys
        self._sync = sync
        pipeline.start()
        self._on = True
        self._fast = not self.strict and not self._sync
        _LIVE.add(self)
        startup.record_installation(
            self.config_file, app=self.app, version=self._version_given, data_dir=self.data_dir
        )
        self._process.install(sigterm=cfg.handle_sigterm)
        hb = cfg.heartbeat
        if hb is not None and hb.enabled:
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
        made, errors = self._sink_maker.make(context, tolerant=tolerant)
        self.sinks.update(made)
        self.sink_errors.update(errors)

    def _stop_running(self) -> None:
        """Consent was withdrawn: stop collecting and sending at once. Events not yet stored
        are discarded; what the outbox holds stays there, unsent, until consent returns or an
        operator purges it."""
        self._on = self._fast = False
        self._nudge = self._drain = _nothing
        self._forget_process()
        self._jobs.stop(timeout=1.0)
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.buffer.clear()
            pipeline.shutdown(2.0, flush=False)
        self.outbox_ = None
        self._runners_by_name = {}

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
            buffer.append((event, properties, _now(), level, distinct_id))
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
        buffer.append((event, properties, when, level, distinct_id))
        if self._sync:
            self._drain()
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
        # A job that is running (a slow heartbeat query) gets a share of the budget, not a
        # budget of its own; if it finishes later, its event is not tracked.
        self._jobs.stop(timeout=min(1.0, timeout / 4))
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

    def on_shutdown(self, callback: Callable[[float], Any]) -> None:
        """At shutdown, track what ``callback(seconds_running)`` returns (Langflow's shutdown
        payload): a Payload, a ``(name, properties)`` pair, or None."""
        self._shutdown_callbacks.append(callback)

    def _emit_payload(self, name: str | None, payload: object) -> bool:
        if not self._on or payload is None:
            return False
        if isinstance(payload, tuple):
            name, payload = payload
        if isinstance(payload, Payload):
            self.track(payload)
        else:
            self.track(name or "event", cast("Mapping[str, Any] | None", payload))  # track checks
        if self.pipeline is not None:
            self.pipeline.drain(store=True)  # stored before the run is recorded as done
        return True

    def _forget_process(self) -> None:
        """No more at-exit, at-fork or SIGTERM work for this instance."""
        _LIVE.discard(self)
        self._process.forget()

    def _at_exit(self) -> None:
        try:
            self.shutdown(self.config.shutdown_timeout)
        except Exception as exc:
            log.warning("waypost: shutdown at exit failed: %s", exc)

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
        self._jobs.after_fork()

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

    # --- schedules and heartbeats (waypost.heartbeat) ---------------------------------------

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
        return self._jobs.schedule(
            name,
            callback,
            every=every,
            first_delay=first_delay,
            time_of_day=time_of_day,
            jitter=jitter,
            condition=condition,
            event=event,
        )

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
        return self._jobs.heartbeat(
            every=every,
            first_delay=first_delay,
            time_of_day=time_of_day,
            jitter=jitter,
            condition=condition,
            facts=facts,
            event=event,
        )

    def heartbeat_payload(
        self, facts: Callable[[], Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The heartbeat in FlowForge's shape: instance id, os, runtime and app versions, and
        ``platform.counts`` / ``platform.config`` contributed by the application (``facts``) and
        by plugins (hook ``waypost_heartbeat``).

        What ``facts`` returns is recorded in the data dir (see :meth:`record_facts`); without
        ``facts``, the facts recorded last are used: a heartbeat sent by cron (``waypost
        send-heartbeat``) carries the application's counts."""
        return self._jobs.payload(facts)

    def record_facts(self, facts: Mapping[str, Any]) -> None:
        """Record the application's heartbeat facts (``{"platform": {"counts": {...}}}``) in
        the data dir, for a heartbeat another process sends: ``waypost send-heartbeat`` from
        cron merges them into its payload. Call it when the counts change, or let
        ``heartbeat(facts=...)`` record what it sends. Nothing is written while telemetry is
        off; the facts pass the privacy gate when a heartbeat carries them."""
        self._jobs.record_facts(facts)

    def send_heartbeat(self, *, force: bool = False) -> bool:
        """Send the heartbeat now (for cron: ``waypost send-heartbeat``). Unless ``force``, it
        is skipped when this installation already sent one within the period."""
        return self._jobs.send(force=force)

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler of this instance's jobs (None until something is scheduled)."""
        return self._jobs.scheduler

    @property
    def last_heartbeat_outcome(self) -> str | None:
        """What the last :meth:`send_heartbeat` did."""
        return self._jobs.last_outcome

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

    def status(self) -> Status:
        """A snapshot: whether telemetry is on and which rule decided, sinks, depths, counters."""
        pipeline = self.pipeline
        return snapshot(
            self,
            runners=self._runners_by_name,
            buffered=len(pipeline.buffer) if pipeline else 0,
            control=self._jobs.control_status(),
            notes=self._notes,
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
