"""What an instance counts and reports: the counters, the once-a-minute log line, the models of
``status()`` (``waypost status --json``) and the snapshot that fills them (:func:`snapshot`)."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, field_validator

from waypost.datadir import read_instance_id
from waypost.instance import Instance
from waypost.logs import get_logger
from waypost.privacy.secrets import sanitise

if TYPE_CHECKING:
    from waypost.delivery.outbox import Outbox
    from waypost.delivery.pipeline import Pipeline
    from waypost.delivery.runner import Runner
    from waypost.privacy import Decision

log = get_logger(__name__)


class LogOnce:
    """Logs the first occurrence of a cause, then at most once a minute with a count."""

    def __init__(self, logger: logging.Logger, period: float = 60.0) -> None:
        self.logger = logger
        self.period = period
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """In a forked child: the lock may have been held by a parent's thread."""
        self._lock = threading.Lock()

    def __call__(self, key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._seen.get(key, (0.0, -1))
            if suppressed >= 0 and now - last < self.period:
                self._seen[key] = (last, suppressed + 1)
                return
            self._seen[key] = (now, 0)
        if suppressed > 0:
            message += f" ({suppressed} more like this since the last report)"
        self.logger.log(level, message, *args)


LOSSES = frozenset(
    {"disk_full", "read_only", "outbox_locked", "outbox_error", "buffer_full", "shutdown"}
)
"""Reasons for a drop that lose an event the application tracked (not a choice: a level, a
hook, a limit, a refusal): a flush that sees one of these counted reports False."""


@dataclass
class Counters:
    """Process-wide counters; ``dropped`` is keyed by reason."""

    accepted: int = 0
    stored: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # Host threads, the worker, the storer and every sink's threads drop at once: a read and
    # a write of the count without it would lose some of them.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.dropped[reason] = self.dropped.get(reason, 0) + n

    def undrop(self, reason: str, n: int) -> None:
        """``n`` events counted as dropped for ``reason`` were kept after all (stored by a
        write that ended after shutdown had counted them)."""
        if n:
            with self._lock:
                left = self.dropped.get(reason, 0) - n
                if left > 0:
                    self.dropped[reason] = left
                else:
                    self.dropped.pop(reason, None)

    def after_fork(self) -> None:
        """In a forked child: counts of its own, from zero."""
        self._lock = threading.Lock()
        self.accepted = self.stored = 0
        self.dropped = {}

    def lost(self) -> int:
        """Events lost so far (dropped for one of :data:`LOSSES`)."""
        dropped = self.dropped
        return sum(dropped.get(reason, 0) for reason in LOSSES)


def _sanitised(text: str | None) -> str | None:
    """Reasons pass the sanitiser wherever they come from (a runner, the outbox, a config)."""
    return sanitise(text) if text else text


class SinkStatus(BaseModel):
    name: str
    type: str
    state: str
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    dropped_by_destination: int = 0
    pending: int = 0
    refused: int = 0
    """Records the destination refused for good, kept in the outbox until ``outbox.max_age``
    (by any process sharing it; ``failed`` counts this process's only)."""
    last_success: _dt.datetime | None = None
    last_error: str | None = None
    last_error_at: _dt.datetime | None = None
    error: str | None = None
    deprecated: str | None = None
    in_memory: int = 0

    _clean = field_validator("last_error", "error")(_sanitised)


class StorageStatus(BaseModel):
    """The outbox's file: ``state`` ``ok``, or what keeps it from taking events
    (``disk_full``, ``read_only``, ``locked``, ``unavailable``); ``memory_only`` when events are
    then delivered from memory only (and lost if the process ends); corrupt files moved aside
    and other repairs, newest last."""

    state: str = "ok"
    memory_only: bool = False
    detail: str | None = None
    since: _dt.datetime | None = None
    moved_aside: list[str] = []
    notes: list[str] = []


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
    config_warnings: list[str] = []
    """Settings that were ignored (a ``WAYPOST_...`` variable naming no setting)."""
    plugin_errors: dict[str, str] = {}
    """Plugins (or their parts) left out, by plugin name, with the reason."""
    data_dir: str
    instance_id: str | None
    sinks: list[SinkStatus]
    buffered: int
    outbox_pending_events: int
    outbox: dict[str, dict[str, int]]
    counters: CounterStatus
    control: dict[str, Any] | None = None
    """The last control block a destination answered (``waypost.control``), with the sink it
    came through (``source``) and what it changes here (``heartbeat_every``: the period in
    force; ``paused``)."""
    storage: StorageStatus = StorageStatus()
    notes: list[str] = []
    """Anything else an operator should know: an instance id that could not be kept, ..."""

    _clean = field_validator("config_error", "reason")(_sanitised)

    @field_validator("config_warnings", "notes")
    @classmethod
    def _clean_lines(cls, lines: list[str]) -> list[str]:
        return [sanitise(line) for line in lines]

    @field_validator("plugin_errors")
    @classmethod
    def _clean_reasons(cls, reasons: dict[str, str]) -> dict[str, str]:
        return {name: sanitise(reason) for name, reason in reasons.items()}

    def pending(self) -> dict[str, dict[str, Any]]:
        """Each sink that still holds events (stored, or only in memory): how many, its state
        and why they wait (its error, else its last failure)."""
        return {
            s.name: {
                "pending": s.pending,
                "in_memory": s.in_memory,
                "state": s.state,
                "why": s.error or s.last_error,
            }
            for s in self.sinks
            if s.pending or s.in_memory
        }

    def lost(self) -> dict[str, int]:
        """Events the application tracked that could not be kept, by reason."""
        return {k: v for k, v in self.counters.dropped.items() if k in LOSSES}


def as_datetime(value: float | None) -> _dt.datetime | None:
    return None if value is None else _dt.datetime.fromtimestamp(value, _dt.timezone.utc)


def sink_status(
    name: str,
    sink_type: str,
    *,
    runner: Runner | None,
    error: str | None,
    pending: int,
    running: bool,
    rows: Mapping[str, Any] | None = None,
    enabled: bool | None = None,
    in_memory: int = 0,
) -> SinkStatus:
    """One sink's status: its runner's snapshot while it runs, completed by what its outbox
    ``rows`` say (:meth:`Outbox.sink_rows`: written by any process); else, from the rows
    alone, ``error`` (it could not be made), ``off`` (telemetry is off: ``enabled`` false, or
    not ``running`` when ``enabled`` is not given), ``retrying`` (pending rows tried before),
    ``pending`` or ``idle``; ``in_memory``: events held for it, without a runner, on their way
    to the outbox."""
    rows = rows or {}
    from_rows = {
        "refused": int(rows.get("refused", 0)),
        "last_success": rows.get("last_success"),
        "last_error": rows.get("last_error"),
        "last_error_at": rows.get("last_error_at"),
    }
    if runner is not None:
        snap = runner.snapshot()
        for key in ("last_success", "last_error", "last_error_at"):
            if snap[key] is None:
                snap[key] = from_rows[key]
        return SinkStatus(
            **{
                **snap,
                "last_success": as_datetime(snap["last_success"]),
                "last_error_at": as_datetime(snap["last_error_at"]),
            },
            pending=pending,
            refused=from_rows["refused"],
        )
    on = running if enabled is None else enabled
    if error:
        state = "error"
    elif not on:
        state = "off"
    elif rows.get("retrying"):
        state = "retrying"
    else:
        state = "pending" if pending else "idle"
    return SinkStatus(
        name=name,
        type=sink_type,
        state=state,
        error=error,
        pending=pending,
        refused=from_rows["refused"],
        last_success=as_datetime(from_rows["last_success"]),
        last_error=from_rows["last_error"],
        last_error_at=as_datetime(from_rows["last_error_at"]),
        in_memory=in_memory,
    )


class Source(Instance, Protocol):
    """What :func:`snapshot` reads of an instance (a :class:`waypost.Telemetry`)."""

    @property
    def decision(self) -> Decision: ...
    @property
    def config_file(self) -> str | None: ...
    @property
    def config_error(self) -> str | None: ...
    @property
    def config_warnings(self) -> list[str]: ...
    @property
    def plugin_errors(self) -> dict[str, str]: ...
    @property
    def sink_errors(self) -> dict[str, tuple[str, str]]: ...
    @property
    def debug(self) -> bool: ...
    @property
    def outbox_(self) -> Outbox | None: ...
    @property
    def pipeline(self) -> Pipeline | None: ...
    def has_outbox(self) -> bool: ...
    def open_outbox(self, *, read_only: bool = False) -> Outbox: ...


def snapshot(
    source: Source,
    runners: Mapping[str, Runner],
    control: dict[str, Any] | None,
    notes: list[str],
) -> Status:
    """``source``'s status now: whether it is on and which rule decided, its sinks (``runners``
    by sink name while it runs), depths, counters, the ``control`` block in force, ``notes``."""
    pipeline = source.pipeline
    # What the worker has taken and what is buffered, read together: never a dip.
    taken, buffered = pipeline.accepted() if pipeline else (source.counters.accepted, 0)
    kept = pipeline.kept_in_memory() if pipeline else {}
    outbox_counts: dict[str, dict[str, int]] = {}
    rows: dict[str, dict[str, Any]] = {}
    pending_events = 0
    storage = StorageStatus()
    try:
        outbox = source.outbox_
        if outbox is None and source.has_outbox():
            outbox = source.open_outbox(read_only=True)
    except Exception as exc:  # status answers whatever the data dir holds
        outbox = None
        storage = StorageStatus(state="unavailable", detail=f"{type(exc).__name__}: {exc}")
    running = source.enabled
    data_dir = Path(source.data_dir)
    if outbox is None and data_dir.exists() and not data_dir.is_dir():
        storage = StorageStatus(
            state="unavailable",
            memory_only=True,
            detail=f"the data dir {data_dir} is not a directory: a process using it delivers "
            "events from memory only and can store nothing",
        )
    if outbox is not None:
        unreadable: str | None = None
        try:
            outbox_counts = outbox.counts()
            rows = outbox.sink_rows()
            pending_events = outbox.pending_events()
        except Exception as exc:
            log.warning("waypost: cannot read the outbox: %s", exc)
            unreadable = f"cannot read the outbox: {exc}"
        health = outbox.health()
        memory_only = health.memory_only and (running or outbox.inspecting)
        if health.state == "ok" and unreadable is not None:
            # A corrupt file: the next process using it moves it aside and stores anew.
            health.state, health.detail, memory_only = "unavailable", unreadable, False
        storage = StorageStatus(
            state=health.state,
            # Seen from outside (the CLI), it says what a process using the data dir would do.
            memory_only=memory_only,
            detail=health.detail,
            since=as_datetime(health.since),
            moved_aside=health.moved_aside,
            notes=health.notes,
        )
    config, decision = source.config, source.decision
    specs = config.sink_specs() if source.config_error is None else {}
    sinks = [
        sink_status(
            name,
            str(spec["type"]),
            runner=runners.get(name),
            error=source.sink_errors.get(name, ("", None))[1],
            pending=outbox_counts.get(name, {}).get("pending", 0),
            running=running,
            rows=rows.get(name),
            enabled=decision.enabled,
            in_memory=kept.get(name, 0),
        )
        for name, spec in specs.items()
    ]
    counters = source.counters
    totals = CounterStatus(
        accepted=taken + buffered,
        stored=counters.stored,
        delivered=sum(s.delivered for s in sinks),
        retried=sum(s.retried for s in sinks),
        failed=sum(s.failed for s in sinks),
        dropped=dict(counters.dropped),
    )
    return Status(
        app=source.app,
        version=source.version,
        enabled=decision.enabled,
        running=running,
        rule=decision.rule,
        reason=decision.reason,
        mode=config.mode,
        level=config.level,
        debug=source.debug,
        strict=source.strict,
        config_file=source.config_file,
        config_error=source.config_error,
        config_warnings=list(source.config_warnings),
        plugin_errors=dict(source.plugin_errors),
        data_dir=str(source.data_dir),
        instance_id=source.instance_id or read_instance_id(source.data_dir),
        sinks=sinks,
        buffered=buffered,
        outbox_pending_events=pending_events,
        outbox=outbox_counts,
        counters=totals,
        control=control,
        storage=storage,
        notes=list(notes),
    )
