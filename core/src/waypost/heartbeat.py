"""The heartbeat: a periodic snapshot of an installation in FlowForge's shape (instance id, os,
runtime and app versions, ``platform.counts`` / ``platform.config``), the scheduled job that
sends it, and an instance's schedules (:class:`Schedules`: ``tel.schedule``, ``tel.heartbeat``,
``tel.send_heartbeat``), with what a destination's control block does to the heartbeat."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

from typing_extensions import Required, Unpack

from waypost import config as _config
from waypost import datadir
from waypost.control import Control
from waypost.events import Payload, base_context
from waypost.instance import Instance
from waypost.schedule import Clock, Job, Scheduler, parse_time_of_day

if TYPE_CHECKING:
    from waypost.config import HeartbeatConfig, TelemetryConfig
    from waypost.control import ControlState
    from waypost.delivery.pipeline import Pipeline
    from waypost.gate import Gate
    from waypost.plugins import PluginManager

Facts = Callable[[], Mapping[str, Any]]
"""What an application gives a heartbeat: a callable that returns its counts and settings
(``{"platform": {"counts": {...}}}``)."""

NAME = "heartbeat"
"""The heartbeat's job name (``schedule.json``, ``status``)."""


def payload(
    *,
    app: str,
    version: str,
    instance_id: str | None,
    facts: Callable[[], Mapping[str, Any]] | None,
    plugins: PluginManager,
) -> dict[str, Any]:
    """The heartbeat: what the application's ``facts`` and the plugins' ``waypost_heartbeat``
    hooks add, merged into the installation's basics (nested dicts merge)."""
    ctx = base_context(app, version)
    out: dict[str, Any] = {
        "instanceId": instance_id,
        "os": ctx["os"],
        "env": {"python": ctx["python"], app: version, "waypost": ctx["waypost"]},
        "platform": {"counts": {}, "config": {}},
    }
    if facts is not None:
        out = _config.merge(out, facts())
    for extra in plugins.hook.waypost_heartbeat(facts=out):
        if isinstance(extra, Mapping):
            out = _config.merge(out, extra)
    return out


def job_from_config(callback: Callable[[], Any], config: HeartbeatConfig | None) -> Job:
    """The heartbeat job as ``telemetry.heartbeat`` describes it, for a run on demand
    (``waypost send-heartbeat``) when the application scheduled none: without a ``heartbeat:``
    section, its defaults (once a day)."""
    config = config or _config.HeartbeatConfig()
    return Job(name=NAME, callback=callback, every=config.every, event=config.event)


class When(TypedDict, total=False):
    """When a job runs: see :meth:`Schedules.schedule`."""

    every: Required[float | str]
    first_delay: float | str
    time_of_day: str | float | None
    jitter: float | str
    condition: Callable[[], bool] | None
    event: str | None


class HeartbeatWhen(TypedDict, total=False):
    """When the heartbeat runs and what it carries: see :meth:`Schedules.heartbeat`."""

    every: float | str
    first_delay: float | str
    time_of_day: str | float | None
    jitter: float | str
    condition: Callable[[], bool] | None
    facts: Callable[[], Mapping[str, Any]] | None
    event: str


class Host(Instance, Protocol):
    """What :class:`Schedules` reads of its instance (a :class:`waypost.Telemetry`)."""

    @property
    def clock(self) -> Clock: ...
    @property
    def gate(self) -> Gate | None: ...
    @property
    def control(self) -> ControlState | None: ...
    @property
    def pipeline(self) -> Pipeline | None: ...
    def track(self, event: str | Payload, properties: Mapping[str, Any] | None = None) -> None: ...


class Schedules:
    """One instance's periodic jobs, the heartbeat among them, and what it tracks at shutdown:
    each run's result is tracked and stored before the run is recorded as done."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.at_shutdown: list[Callable[[float], Any]] = []
        """See :meth:`Scheduling.on_shutdown`."""
        self.scheduler: Scheduler | None = None
        self.last_outcome: str | None = None
        """What the last :meth:`send` did (``sent``, ``skipped: ...``)."""
        self._facts: Callable[[], Mapping[str, Any]] | None = None
        self._every: float | None = None  # this installation's own heartbeat period
        self._shutdown_event = False  # the config's shutdown event is among at_shutdown

    def _new_scheduler(self) -> Scheduler:
        host = self.host
        return Scheduler(
            data_dir=host.data_dir, emit=self._emit_job, clock=host.clock, active=self._running
        )

    def _running(self) -> bool:
        return self.host.enabled

    def _emit_job(self, job: Job, payload: Any) -> bool:
        return self.emit(job.event or job.name, payload)

    def emit(self, name: str | None, payload: object, *, store: bool = True) -> bool:
        """Track what a job returned (a Payload, a dict of properties for event ``name``, a
        ``(name, properties)`` pair, or None: nothing) and, with ``store``, have the worker
        store it (waiting two seconds at most); False if not tracked."""
        host = self.host
        if not host.enabled or payload is None:
            return False
        if isinstance(payload, tuple):
            name, payload = payload
        # Stored before the run is recorded as done, by the worker (the job's own thread never
        # runs hooks), asked before it is tracked so that no drain takes it to memory alone.
        # Past the wait it is tracked all the same: delivered, or stored with the next batch.
        pipeline = host.pipeline if store else None
        ask = pipeline.ask_to_store() if pipeline is not None else None
        try:
            if isinstance(payload, Payload):
                host.track(payload)
            else:
                host.track(name or "event", cast("Mapping[str, Any] | None", payload))  # it checks
        finally:
            if pipeline is not None:
                pipeline.store_now(ask=ask)
        return True

    def shutdown(self, seconds_running: float) -> None:
        """Track what each :attr:`at_shutdown` callback returns."""
        if self.host.enabled:
            for callback in self.at_shutdown:
                # Not waited for: shutdown's own flush delivers or stores it, on its budget.
                self.emit(None, callback(seconds_running), store=False)

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
        """See :meth:`Scheduling.schedule`."""
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
        if self.host.enabled:
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
        """See :meth:`Scheduling.heartbeat`."""
        self._facts = facts
        gate, control = self.host.gate, self.host.control
        if gate is not None:  # before the job can first run: heartbeats are not sampled
            gate.heartbeats.add(event)
        own = _config.parse_duration(every)
        current = control.current if control is not None else None
        job = self.schedule(
            NAME,
            lambda: self.payload(facts),
            # Stretched before the job is added, so its first run already keeps the period.
            every=current.heartbeat_period(own) if current is not None else own,
            first_delay=first_delay,
            time_of_day=time_of_day,
            jitter=jitter,
            condition=condition,
            event=event,
        )
        self._every = own
        return job

    def payload(self, facts: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """See :meth:`Scheduling.heartbeat_payload`."""
        host = self.host
        if facts is not None:
            given = facts

            def facts_recorded() -> Mapping[str, Any]:
                value = given()
                self.record_facts(value)
                return value

            facts = facts_recorded
        else:
            stored = datadir.read_installation(host.data_dir).get("facts")
            if isinstance(stored, dict):
                facts = lambda: stored  # noqa: E731
        return payload(
            app=host.app,
            version=host.version,
            instance_id=host.instance_id or datadir.read_instance_id(host.data_dir),
            facts=facts,
            plugins=host.plugins,
        )

    def record_facts(self, facts: Mapping[str, Any]) -> None:
        """See :meth:`Scheduling.record_facts`."""
        if not self.host.enabled or not isinstance(facts, Mapping):
            return
        datadir.record_installation(self.host.data_dir, facts=dict(facts), facts_at=time.time())

    def send(self, *, force: bool = False) -> bool:
        """See :meth:`Scheduling.send_heartbeat`."""
        host = self.host
        if not host.enabled:
            # Off means off: no schedule file, no facts callback, no waypost_heartbeat hook.
            self.last_outcome = "skipped: telemetry is off"
            return False
        if self.scheduler is None or NAME not in self.scheduler.jobs:
            self.scheduler = self.scheduler or self._new_scheduler()
            job = job_from_config(lambda: self.payload(self._facts), host.config.heartbeat)
            control = host.control
            stored = control.current if control else Control.read(host.data_dir)
            if stored is not None:  # the cron job keeps the period a destination asked for
                job.every = stored.heartbeat_period(job.every)
            gate = host.gate
            if gate is not None and job.event:
                gate.heartbeats.add(job.event)  # never sampled out, from cron either
        else:
            job = self.scheduler.jobs[NAME]
        sent = self.scheduler.run(job, force=force)
        self.last_outcome = job.last_outcome
        return sent

    def start(self, config: TelemetryConfig) -> None:
        """What a starting instance's config schedules: the heartbeat, the shutdown event."""
        hb = config.heartbeat
        if hb is not None and hb.enabled:
            self.heartbeat(
                every=hb.every,
                first_delay=hb.first_delay,
                time_of_day=hb.time_of_day,
                jitter=hb.jitter,
                event=hb.event,
            )
        name = config.shutdown_event
        if name and not self._shutdown_event:  # once, however many times consent restarts it
            self._shutdown_event = True
            self.at_shutdown.append(lambda seconds: (name, {"timeRunning": int(seconds)}))

    def heartbeat_event(self) -> str | None:
        """The event of a heartbeat scheduled already (while telemetry was off), if any."""
        job = self.scheduler.jobs.get(NAME) if self.scheduler else None
        return job.event if job is not None else None

    def stop(self, timeout: float) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(timeout=timeout)

    def after_fork(self) -> None:
        if self.scheduler is not None:
            self.scheduler.after_fork()

    # --- instructions from the destination -------------------------------------------------

    def apply_control(self, control: Control) -> None:
        """Make the heartbeat less frequent if the control asks; nothing else changes here
        (sampling and pauses are the gate's and the runners')."""
        jobs = self.scheduler.jobs if self.scheduler is not None else {}
        job = jobs.get(NAME)
        if job is not None and self._every is not None:
            job.every = control.heartbeat_period(self._every)

    def control_status(self) -> dict[str, Any] | None:
        """The control block in force, as ``status()`` shows it (None without one)."""
        state = self.host.control
        control = state.current if state else Control.read(self.host.data_dir)
        if control is None:
            return None
        data = control.as_dict()
        job = (self.scheduler.jobs if self.scheduler is not None else {}).get(NAME)
        data["heartbeat_period"] = job.every if job is not None else None
        data["paused"] = control.paused()
        return data


class Scheduling:
    """The schedule and heartbeat methods of :class:`waypost.Telemetry`, on its
    :class:`Schedules` (``schedules``)."""

    schedules: Schedules

    def schedule(self, name: str, callback: Callable[[], Any], **when: Unpack[When]) -> Job:
        """Run ``callback`` periodically and track what it returns (a Payload, a dict of
        properties for event ``event or name``, or None to skip a run).

        ``every``/``first_delay``/``jitter`` take seconds or durations (``24h``); ``time_of_day``
        is ``"random"`` (picked now), ``"HH:MM"`` (UTC) or None. ``condition`` is asked before
        each run. At most one run per period per installation, whatever the number of processes
        sharing the data dir; a restart does not run it again before the period has passed.
        """
        return self.schedules.schedule(name, callback, **when)

    def heartbeat(self, **when: Unpack[HeartbeatWhen]) -> Job:
        """Schedule the heartbeat snapshot (FlowForge's ping, see :meth:`heartbeat_payload`). A
        destination's control block may make it less frequent, never more."""
        return self.schedules.heartbeat(**when)

    def heartbeat_payload(self, facts: Facts | None = None) -> dict[str, Any]:
        """The heartbeat in FlowForge's shape: instance id, os, runtime and app versions, and
        ``platform.counts`` / ``platform.config`` contributed by the application (``facts``) and
        by plugins (hook ``waypost_heartbeat``).

        What ``facts`` returns is recorded in the data dir (see :meth:`record_facts`); without
        ``facts``, the facts recorded last are used: a heartbeat sent by cron (``waypost
        send-heartbeat``) carries the application's counts."""
        return self.schedules.payload(facts)

    def record_facts(self, facts: Mapping[str, Any]) -> None:
        """Record the application's heartbeat facts (``{"platform": {"counts": {...}}}``) in
        the data dir, for a heartbeat another process sends: ``waypost send-heartbeat`` from
        cron merges them into its payload. Call it when the counts change, or let
        ``heartbeat(facts=...)`` record what it sends. Nothing is written while telemetry is
        off; the facts pass the privacy gate when a heartbeat carries them."""
        self.schedules.record_facts(facts)

    def send_heartbeat(self, *, force: bool = False) -> bool:
        """Send the heartbeat now (for cron: ``waypost send-heartbeat``). Unless ``force``, it
        is skipped when this installation already sent one within the period."""
        return self.schedules.send(force=force)

    def on_shutdown(self, callback: Callable[[float], Any]) -> None:
        """At shutdown, track what ``callback(seconds_running)`` returns (Langflow's shutdown
        payload): a Payload, a ``(name, properties)`` pair, or None."""
        self.schedules.at_shutdown.append(callback)

    @property
    def scheduler(self) -> Scheduler | None:
        """What runs the jobs (None until one is scheduled)."""
        return self.schedules.scheduler

    @property
    def last_heartbeat_outcome(self) -> str | None:
        """What the last :meth:`send_heartbeat` did (``sent``, ``skipped: ...``)."""
        return self.schedules.last_outcome
