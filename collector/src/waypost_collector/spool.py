"""The spool and its handoff to storage, both the core's own: the outbox (SQLite, WAL,
``synchronous=FULL``) holds every accepted batch, and the core's delivery pipeline hands it to
the storage sinks with its retries, backoff and circuit breaker. A row leaves the spool only
when its sink reported it delivered, so a storage sink's success is what lets the spool forget
a batch (a sink whose acknowledgement means "durable", such as a Kafka producer with
``acks: all``, fits as it is).

One writer thread per process makes submissions durable a group at a time: several requests'
batches share one transaction (one fsync), then each request is answered. With ``ack: spool``
the rows it writes are leased to this process, and its handoff thread gives the events it still
holds in memory to storage, then deletes their rows: nothing is read back or decoded from the
spool. A row whose storage did not take it is handed to its runner (retries, backoff, circuit
breaker); rows of a process that died are no longer leased, and its runner (or the next
process's) delivers them from the spool.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from waypost.config import expand, validation_error
from waypost.delivery.backoff import Backoff
from waypost.delivery.boundary import call_send
from waypost.delivery.outbox import Outbox
from waypost.delivery.pipeline import Pipeline
from waypost.errors import ConfigError, PluginError
from waypost.events import NO_REMARKS, Event, remarks_of, uuid7
from waypost.events import dumps as core_dumps
from waypost.plugins import PluginManager
from waypost.sinks import SendResult, Sink, SinkContext
from waypost.status import Counters
from waypost_collector.config import CollectorConfig
from waypost_collector.ledger import REQUEST, Entry, Ledger, iso
from waypost_collector.wire import dumps as wire_dumps

log = logging.getLogger("waypost.collector")

SPOOL_DIR = "spool"
ERROR_HOLD = 10.0
"""Seconds a failed spool write keeps /readyz at 503 (unless a write succeeds sooner)."""
GROUP_EVENTS = 20_000
"""Events written in one transaction at most."""
HANDOFF_EVENTS = 5_000
"""Events the handoff gathers for one call to each storage sink (one transaction for SQL):
it takes what the writer queued, until it has this many."""
HANDOFF_BACKLOG = 20_000
"""Events waiting in memory for the handoff at most: past that, new rows are left to the
storage runners, which lease them from the spool."""


class SpoolError(Exception):
    """The spool could not make a batch durable (the request is answered 503)."""


def build_storage(
    config: CollectorConfig,
    *,
    version: str,
    plugins: PluginManager | None = None,
    env: Mapping[str, str] | None = None,
    specs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Sink]:
    """The storage sinks ``config.storage`` names (or the embedded default), or the sinks of
    ``specs`` (name -> settings with a ``type``), made through the plugin manager exactly as the
    core makes an application's sinks."""
    plugins = plugins or PluginManager()
    context = SinkContext(
        app="waypost-collector",
        version=version,
        instance_id="",
        data_dir=config.data_dir,
        strict=True,
    )
    sinks: dict[str, Sink] = {}
    chosen = config.storage_specs() if specs is None else specs
    section = "storage" if specs is None else "destinations"
    for name, spec in chosen.items():
        spec = dict(spec)
        sink_type = str(spec.pop("type"))
        key = f"collector.{section}.{name}"
        try:
            spec = expand(spec, os.environ if env is None else env, key)
            cls = plugins.load_sink_type(sink_type, key=key)
            try:
                sink_config = cls.Config.model_validate(spec)
            except ValidationError as exc:
                raise validation_error(exc, source=config.source, prefix=key) from None
        except ConfigError as exc:
            if exc.source is None:
                raise type(exc)(exc.reason, source=config.source, key=exc.key) from None
            raise
        except PluginError as exc:
            raise ConfigError(str(exc), source=config.source, key=key) from None
        sinks[name] = cls(name, sink_config, context)
    return sinks


def storage_lag(outbox: Outbox) -> float | None:
    """Seconds the oldest row still pending in ``outbox`` has waited; None when none is."""
    _, total = outbox.records(state="pending", limit=1)
    if not total:
        return None
    oldest, _ = outbox.records(state="pending", limit=1, offset=total - 1)  # newest first
    return max(0.0, time.time() - oldest[0].created_at) if oldest else None


def _event_id(event: Event) -> str:
    return event.id


PACK_NAME = "waypost.collector.batch"
"""The name of a spool row that holds a batch of events, not one event."""
PACK_LEVEL = "waypost.collector.batch"
"""The level of such a row: what tells it from an event, since every event the collector
accepts is given the level ``usage`` (a client's event of that name is one event)."""
PACK_EVENTS = 100
"""Events in one spool row at most: writing and deleting the spool costs a few rows a request,
not a row an event (each row updates the outbox's four indexes)."""
_PACKED = "events"


def pack(events: Sequence[Event], now: float) -> Event:
    """One spool row's event holding ``events`` (their contexts written once each)."""
    index: dict[int, int] = {}
    contexts: list[dict[str, Any]] = []
    rows = []
    for e in events:
        k = index.get(id(e.context))
        if k is None:
            k = index[id(e.context)] = len(contexts)
            contexts.append(e.context)
        rows.append((e.id, e.name, e.time, e.instance_id, e.distinct_id, e.level,
                     e.properties, k, remarks_of(e)))  # fmt: skip
    doc = {"contexts": contexts, "events": rows}
    try:
        body = wire_dumps(doc).decode()
    except (TypeError, ValueError):  # what orjson cannot write (an int past 64 bits)
        body = core_dumps(doc)
    return Event(uuid7(now), PACK_NAME, now, "", {_PACKED: body}, {}, "", PACK_LEVEL)


def _packs(events: Sequence[Event], now: float) -> list[tuple[Event, list[Event]]]:
    """``events`` in spool rows of :data:`PACK_EVENTS`: (the row's event, the events)."""
    chunks = [list(events[i : i + PACK_EVENTS]) for i in range(0, len(events), PACK_EVENTS)]
    return [(pack(chunk, now), chunk) for chunk in chunks]


def unpack(event: Event) -> list[Event] | None:
    """The events a spool row's event holds; None if it is one event (not a pack)."""
    if event.level != PACK_LEVEL or not isinstance(event.properties.get(_PACKED), str):
        return None
    doc = json.loads(event.properties[_PACKED])  # (the rare path; every int kept exact)
    contexts = doc["contexts"]
    return [
        Event(i, name, t, instance_id, properties, contexts[k], distinct_id, level, r or NO_REMARKS)
        for i, name, t, instance_id, distinct_id, level, properties, k, r in doc["events"]
    ]


def fold(result: SendResult, packs: Mapping[str, list[Event]]) -> SendResult:
    """A sink's result for the events of ``packs`` (pack id -> events), as the result for the
    packs: one retried if any of its events is to be retried (storage keeps one row per event,
    so those it has are written again harmlessly), else failed if any was refused for good."""
    inner = {e.id: pack_id for pack_id, events in packs.items() for e in events}
    out = SendResult(retry_after=result.retry_after, receipt=result.receipt, control=result.control)
    for source, target in ((result.retry, out.retry), (result.failed, out.failed)):
        for event_id, reason in source.items():
            pack_id = inner.get(event_id, event_id)
            if pack_id == event_id:
                target[event_id] = reason  # an event on its own row
            elif pack_id not in out.retry and pack_id not in target:
                n = sum(1 for e in packs[pack_id] if e.id in source)
                target[pack_id] = f"{n} of {len(packs[pack_id])} events: {reason}"
    for pack_id in out.retry:
        out.failed.pop(pack_id, None)
    for event_id, reason in result.dropped_by_destination.items():
        if event_id not in inner:
            out.dropped_by_destination[event_id] = reason
    return out


class Arrivals:
    """What this process knows of the events it accepted lately (event id -> time received,
    receipt, address hash), so the handoff to storage seldom asks the ledger."""

    def __init__(self, size: int = 200_000) -> None:
        self.size = size
        self._known: dict[str, tuple[float, str, str | None]] = {}
        self._lock = threading.Lock()

    def add(self, entries: Sequence[Entry]) -> None:
        with self._lock:
            known = self._known
            for e in entries:
                for event_id, _ in e.accepted:
                    known[event_id] = (e.at, e.receipt, e.ip_hash)
            if len(known) > self.size:  # the oldest half goes (dicts keep insertion order)
                for key in list(itertools.islice(known, len(known) - self.size // 2)):
                    del known[key]

    def find(self, ids: Sequence[str]) -> dict[str, tuple[float, str, str | None]]:
        with self._lock:
            known = self._known
            return {i: known[i] for i in ids if i in known}


class StampedSink(Sink):
    """A storage sink, given each event with what the collector knows of its arrival in
    ``context.collector``: ``received_at`` (ISO 8601), ``receipt`` and, with ``ip: hash``, the
    address's daily hash. The spool keeps events as they came; this comes from the ledger."""

    def __init__(self, inner: Sink, ledger: Ledger, recent: Arrivals | None = None) -> None:
        super().__init__(inner.name, inner.config, inner.context)
        self.inner = inner
        self.ledger = ledger
        self.recent = recent if recent is not None else Arrivals()
        self.type = inner.type  # type: ignore[misc]
        self.deprecated = inner.deprecated  # type: ignore[misc]
        self.rows_hold_batches = True
        """Whether the last rows leased held batches (see pack()), not one event each (rows
        written before rows held batches)."""
        self.from_memory: Sink = _Sending(self)
        """This sink for events the spool holds in memory (not rows leased from it)."""

    @property
    def concurrency(self) -> int:
        return self.inner.concurrency

    @property
    def batch_size(self) -> int:
        # Rows leased from the spool at once: a sink's batch of events, in rows of a batch each
        # (see pack()), or of one event each while the rows leased last were such.
        if self.rows_hold_batches:
            return max(1, self.inner.batch_size // PACK_EVENTS)
        return self.inner.batch_size

    @property
    def destination(self) -> str:
        return self.inner.destination

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def stamp(self, events: Sequence[Event]) -> list[Event]:
        known = self.recent.find([e.id for e in events])
        missing = [e.id for e in events if e.id not in known]
        if missing:  # accepted by another process, or before a restart
            known.update(self.ledger.arrivals(missing))
        now = time.time()
        out = []
        # The events of one submission and one installation share their stamped context (one
        # object, so a sink serialises it once).
        contexts: dict[tuple[int, float, str | None, str | None], dict[str, Any]] = {}
        for e in events:
            at, receipt, ip_hash = known.get(e.id, (now, None, None))
            key = (id(e.context), at, receipt, ip_hash)
            context = contexts.get(key)
            if context is None:
                stamp: dict[str, Any] = {"received_at": iso(at)}
                if receipt:
                    stamp["receipt"] = receipt
                if ip_hash:
                    stamp["ip_hash"] = ip_hash
                context = contexts[key] = {**e.context, "collector": stamp}
            out.append(
                Event(
                    e.id, e.name, e.time, e.instance_id, e.properties, context, e.distinct_id,
                    e.level, e.remarks if remarks_of(e) else NO_REMARKS,
                )
            )  # fmt: skip
        return out

    def send(self, events: Sequence[Event]) -> SendResult:
        flat, packs = self._unpacked(events)
        self.rows_hold_batches = bool(packs) or not events
        if not packs:
            return self._send(flat)
        # Within the core's boundary: a 413 splits the events, not the rows that hold them.
        result, _, _ = call_send(_Sending(self), flat)
        return fold(result, packs)

    def _send(self, events: Sequence[Event]) -> SendResult:
        # In id order: collectors writing overlapping batches into one database then take
        # their row locks in the same order, and never deadlock on each other.
        return self.inner.send(self.stamp(sorted(events, key=_event_id)))

    @staticmethod
    def _unpacked(events: Sequence[Event]) -> tuple[list[Event], dict[str, list[Event]]]:
        flat: list[Event] = []
        packs: dict[str, list[Event]] = {}
        for e in events:
            held = unpack(e)
            if held is None:
                flat.append(e)
            else:
                packs[e.id] = held
                flat.extend(held)
        return flat, packs

    def render(self, events: Sequence[Event]) -> Any:
        return self.inner.render(self.stamp(self._unpacked(events)[0]))

    def __repr__(self) -> str:
        return repr(self.inner)


class _Sending(Sink):
    """A stamped sink's events as its inner sink takes them, for the core's boundary."""

    def __init__(self, stamped: StampedSink) -> None:
        super().__init__(stamped.name, stamped.config, stamped.context)
        self.stamped = stamped

    def send(self, events: Sequence[Event]) -> SendResult:
        return self.stamped._send(events)


_Handed = tuple[tuple[str, ...], list[tuple[Event, list[Event]]]]
"""What the writer gives the handoff: storage sinks, and spool rows with the events they hold."""


@dataclass(eq=False)
class Submission:
    """A checked batch waiting to be made durable; ``future`` gets (accepted, duplicate) ids."""

    entry: Entry
    events: list[Event]
    future: concurrent.futures.Future[tuple[list[Event], list[Event]]]


class Spool:
    """The outbox as the collector's spool, the storage runners behind it, and the writer."""

    def __init__(
        self,
        config: CollectorConfig,
        sinks: Mapping[str, Sink],
        ledger: Ledger,
        *,
        max_bytes: float,
        housekeeping: Any = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.dir = config.data_dir / SPOOL_DIR
        self.max_bytes = max_bytes
        self.housekeeping = housekeeping
        self.outbox = Outbox(self.dir, sync=True)
        self.counters = Counters()
        self.recent = Arrivals()
        self.sinks = [StampedSink(s, ledger, self.recent) for s in sinks.values()]
        self.pipeline = self._pipeline()
        self.direct = config.ack == "storage"
        self._queue: queue.SimpleQueue[Submission | tuple[str, str, str, int] | None] = (
            queue.SimpleQueue()
        )
        self._writer: threading.Thread | None = None
        self._handoff: queue.SimpleQueue[_Handed | None] = queue.SimpleQueue()
        self._handoff_thread: threading.Thread | None = None
        self._handoff_waiting = 0  # events queued for the handoff (written by the writer only)
        self._handoff_done = 0  # of those, handed over (written by the handoff thread only)
        self._stranded: list[tuple[str, list[tuple[Event, list[Event]]]]] = []
        self.handed = 0
        """Events storage took from the handoff (never read back from the spool)."""
        self._started = False
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_write: float | None = None
        self._full_checked = 0.0
        self._full = False
        if hasattr(os, "register_at_fork"):
            import weakref

            ref = weakref.ref(self)

            def forked() -> None:
                spool = ref()
                if spool is not None:
                    spool.after_fork()

            os.register_at_fork(after_in_child=forked)

    @property
    def _runners(self) -> dict[str, Any]:
        return {r.name: r for r in self.pipeline.runners}

    def _pipeline(self) -> Pipeline:
        return Pipeline(
            outbox=self.outbox,
            sinks=self.sinks,
            build=lambda items: [],
            counters=self.counters,
            batch_interval=1.0,
            batch_size=500,
            buffer_size=10_000,
            backoff=Backoff(initial=0.5, maximum=30.0),  # storage is ours and near: back soon
            max_attempts=None,
            breaker_threshold=5,
            keep_sent=0.0,
            retention=self._housekeeping,
            sync=True,
        )

    def after_fork(self) -> None:
        """In a forked child (gunicorn ``--preload``): never the parent's SQLite connections,
        locks or threads; the child starts its own on its first request or lifespan."""
        self.outbox.after_fork()
        self.ledger.after_fork()
        self._queue = queue.SimpleQueue()
        self._handoff = queue.SimpleQueue()
        self._handoff_thread = None
        self._handoff_waiting = self._handoff_done = 0
        self._stranded = []
        self._lock = threading.Lock()
        self._writer = None
        if self._started:
            self._started = False
            self.pipeline = self._pipeline()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self.outbox.reclaim()  # leases of a process that died (kill -9) are void
        self.outbox.retry_now([s.name for s in self.sinks])  # a restart is a retry point
        self.pipeline.start()
        self._writer = threading.Thread(
            target=self._write_loop, name="waypost-collector-spool", daemon=True
        )
        self._writer.start()
        if not self.direct:
            self._handoff_thread = threading.Thread(
                target=self._handoff_loop, name="waypost-collector-handoff", daemon=True
            )
            self._handoff_thread.start()

    @property
    def running(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish the writes queued so far, then hand what can be handed to storage within
        ``timeout``; the rest stays in the spool for the next start."""
        deadline = time.monotonic() + timeout
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(max(0.0, deadline - time.monotonic()))
        if self._handoff_thread is not None:  # before the runners stop: rows it holds leased
            self._handoff.put(None)
            self._handoff_thread.join(max(0.0, deadline - time.monotonic()))
        ok = self.pipeline.shutdown(max(0.0, deadline - time.monotonic()))
        self.ledger.close()
        return ok

    # --- taking batches -----------------------------------------------------------------------

    def submit(
        self, entry: Entry, events: list[Event]
    ) -> concurrent.futures.Future[tuple[list[Event], list[Event]]]:
        """Queue a checked batch; the future resolves once it is durable (or fails)."""
        future: concurrent.futures.Future[tuple[list[Event], list[Event]]] = (
            concurrent.futures.Future()
        )
        if not self.running:
            future.set_exception(SpoolError("the spool is not running"))
            return future
        self._queue.put(Submission(entry, events, future))
        return future

    def tally(self, app: str, reason: str, n: int = 1) -> None:
        """Count a whole request refused (written with the next group, never waited for)."""
        self._queue.put((app, REQUEST, reason, n))

    def full(self) -> bool:
        """Whether the spool must refuse more (over its size, or the disk nearly full)."""
        now = time.monotonic()
        if now - self._full_checked > 2.0:
            self._full_checked = now
            try:
                free = shutil.disk_usage(self.dir).free
                low = free < self.config.limits.min_free_mb * 1024 * 1024
                self._full = low or self.outbox.size_bytes() > self.max_bytes
            except OSError:
                self._full = True
        return self._full

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            group: list[Submission] = []
            tallies: list[tuple[str, str, str, int]] = []
            events = 0
            item: Submission | tuple[str, str, str, int] | None = first
            while item is not None:
                if isinstance(item, Submission):
                    group.append(item)
                    events += len(item.events)
                else:
                    tallies.append(item)
                if events >= GROUP_EVENTS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
            try:
                self._commit(group, tallies)
            except Exception as exc:  # never let the writer die: answer, log, go on
                log.error("waypost collector: spool writer error %s: %s", type(exc).__name__, exc)
                for sub in group:
                    if not sub.future.done():
                        sub.future.set_exception(SpoolError(str(exc)))

    def _commit(self, group: list[Submission], tallies: list[tuple[str, str, str, int]]) -> None:
        if not group:
            if tallies:
                self._record([], tallies)
            return
        ids = [e.id for sub in group for e in sub.events]
        try:
            seen = self.ledger.seen(ids) if ids else set()
        except Exception as exc:  # dedup is best effort here: storage writes are idempotent
            log.warning("waypost collector: cannot read the ledger: %s", exc)
            seen = set()
        taken: set[str] = set()
        results: list[tuple[Submission, list[Event], list[Event]]] = []
        fresh_all: list[Event] = []
        for sub in group:
            fresh, dups = [], []
            for event in sub.events:
                if event.id in seen or event.id in taken:
                    dups.append(event)
                else:
                    taken.add(event.id)
                    fresh.append(event)
            results.append((sub, fresh, dups))
            fresh_all.extend(fresh)
        entries = []
        for sub, fresh, dups in results:
            sub.entry.accepted = [(e.id, e.name) for e in fresh]
            sub.entry.duplicates = [(e.id, e.name) for e in dups]
            entries.append(sub.entry)
        self.recent.add(entries)  # the stamps storage is given, before it is given them
        try:
            stored = self._store(fresh_all)
        except Exception as exc:
            self.last_error, self.last_error_at = f"{type(exc).__name__}: {exc}", time.time()
            log.error("waypost collector: cannot write the spool: %s", self.last_error)
            for sub in group:
                sub.future.set_exception(SpoolError(self.last_error))
            self._record([], tallies)
            return
        self.last_write = time.time()
        # Durable now: the ledger comes second, so a crash in between costs at most a
        # duplicate count (storage writes are idempotent), never an event.
        self._record(entries, tallies)
        for runner in self.pipeline.runners:
            if runner.name in stored:
                runner.outbox_due_at = 0.0
                runner.wake()
        for sub, fresh, dups in results:
            sub.future.set_result((fresh, dups))

    def _store(self, events: list[Event]) -> set[str]:
        """Make events durable for every storage sink that takes them: in the spool, or (with
        ``ack: storage``) in storage itself, the spool keeping only what storage did not take.
        Returns the sinks whose spool was written."""
        if not events:
            return set()
        sinks = self.sinks
        if all(s.config.routes_all for s in sinks):
            groups = {tuple(s.name for s in sinks): events}
        else:
            groups = {}
            for event in events:
                key = tuple(s.name for s in sinks if s.config.accepts(event.name))
                groups.setdefault(key, []).append(event)
        written: set[str] = set()
        for names, group in groups.items():
            if not names:
                continue
            if not self.direct:
                written.update(self._spool(names, group))
                continue
            for name in names:
                result = self._send_now(name, group)
                left = group if result is None else self._refused(group, result)
                if left:
                    now = time.time()
                    self.outbox.add([p for p, _ in _packs(left, now)], [name], now=now)
                    written.add(name)
        return written

    def _spool(self, names: tuple[str, ...], events: list[Event]) -> list[str]:
        """``ack: spool``: write ``events`` for these sinks, a row per :data:`PACK_EVENTS`;
        the sinks whose runner is delivering get them from the handoff, their rows leased
        meanwhile. Returns the other sinks."""
        now = time.time()
        packs = _packs(events, now)
        rows = [p for p, _ in packs]
        room = self._handoff_waiting - self._handoff_done + len(events) <= HANDOFF_BACKLOG
        alive = self._handoff_thread is not None and self._handoff_thread.is_alive()
        hand = [n for n in names if room and alive and self._ready(n)] if events else []
        rest = [n for n in names if n not in hand]
        if hand:
            lease = self._runners[hand[0]].settings.lease_seconds
            self.outbox.add(rows, hand, now=now, lease_seconds=lease)
        if rest:
            self.outbox.add(rows, rest, now=now)
        if hand:
            self._handoff_waiting += len(events)
            self._handoff.put((tuple(hand), packs))
        return rest

    def _ready(self, name: str) -> bool:
        """Whether a storage sink's runner is open and delivering (not failing or held)."""
        runner = self._runners[name]
        return bool(runner.opened and runner.state == "ok")

    def _send_now(self, name: str, events: list[Event]) -> SendResult | None:
        """Hand events to one sink from here, inside the core's error boundary; None when its
        runner is not ready (the spool keeps them, the runner and its backoff have them)."""
        if not self._ready(name):
            return None
        sink = self._runners[name].sink
        result, reason, _ = call_send(getattr(sink, "from_memory", sink), events)
        if result.retry or result.failed:
            self.pipeline.log_once(
                f"direct:{name}",
                "waypost collector: storage %r did not take a batch (%s); the spool keeps it",
                name,
                reason or next(iter({**result.retry, **result.failed}.values()), "refused"),
            )
        return result

    @staticmethod
    def _refused(events: list[Event], result: SendResult) -> list[Event]:
        if not (result.retry or result.failed):
            return []
        refused = result.retry.keys() | result.failed.keys()
        return [e for e in events if e.id in refused]

    # --- the handoff (ack: spool) -----------------------------------------------------------

    def _handoff_loop(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._handoff.get(timeout=1.0 if self._stranded else None)
            except queue.Empty:
                self._give_back()
                continue
            if item is None:
                break
            items, n = [item], sum(len(held) for _, held in item[1])
            while n < HANDOFF_EVENTS:
                try:
                    item = self._handoff.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                items.append(item)
                n += sum(len(held) for _, held in item[1])
            by_sink: dict[str, list[tuple[Event, list[Event]]]] = {}
            for names, packs in items:
                for name in names:
                    by_sink.setdefault(name, []).extend(packs)
            for name, packs in by_sink.items():
                try:
                    self._hand(name, packs)
                except Exception as exc:  # never let the handoff die (a full disk)
                    log.error(
                        "waypost collector: handoff to storage %r failed: %s: %s",
                        name, type(exc).__name__, exc,
                    )  # fmt: skip
                    self._stranded.append((name, packs))
                    n -= sum(len(held) for _, held in packs)
            self._handoff_done += n
            self._give_back()

    def _give_back(self) -> None:
        """Rows whose handoff failed midway (the spool could not be written): their leases
        voided, as soon as the spool takes it, so that their runner delivers them."""
        while self._stranded:
            name, packs = self._stranded[0]
            try:
                self.outbox.settle(name, [(p, "pending", time.time(), None) for p, _ in packs])
            except Exception:
                return  # still not: a second later
            self._stranded.pop(0)
            self._handoff_done += sum(len(held) for _, held in packs)
            self._runners[name].outbox_written()

    def _hand(self, name: str, packs: list[tuple[Event, list[Event]]]) -> None:
        """Give storage ``name`` the events of spool rows leased to this process, then delete
        the rows. What it did not take goes back to the spool as rows of their own (of the
        events it asked to retry or refused), to its runner; if it was not delivering, the
        rows themselves go to its runner."""
        runner = self._runners[name]
        events = [e for _, held in packs for e in held]
        result = self._send_now(name, events)
        now = time.time()
        if result is None:  # the runner is not delivering now: it takes them, due at once
            self.outbox.settle(name, [(p, "pending", now, None) for p, _ in packs], now=now)
            runner.outbox_written()
            return
        retry_at = now + runner.settings.backoff.delay(1, result.retry_after)
        outcomes: list[tuple[Event, str, float, str | None]] = [
            (e, "pending", retry_at, result.retry[e.id])
            if e.id in result.retry
            else (e, "failed", 0.0, result.failed[e.id])
            for e in self._refused(events, result)
        ]
        if outcomes:  # before their rows go: a crash in between sends them again, no loss
            self.outbox.settle(name, outcomes, now=now)
            runner.outbox_written()
        self.outbox.forget(name, [p.id for p, _ in packs])
        self.handed += len(events) - len(outcomes)

    def _record(self, entries: list[Entry], tallies: list[tuple[str, str, str, int]]) -> None:
        if not entries and not tallies:
            return
        try:
            self.ledger.record(entries, tallies)
        except Exception as exc:
            log.error("waypost collector: cannot write the ledger: %s", exc)

    # --- state ------------------------------------------------------------------------------

    def depth(self) -> dict[str, dict[str, int]]:
        """Spool rows by storage sink and state."""
        return self.outbox.counts()

    def lag(self) -> float | None:
        """Seconds the oldest batch not yet in storage has waited (None: the spool is empty)."""
        return storage_lag(self.outbox)

    def storage_state(self) -> list[dict[str, Any]]:
        return [r.snapshot() for r in self.pipeline.runners]

    def ready(self) -> tuple[bool, list[str]]:
        """Whether to take traffic: the spool is writable (and not full), storage answers."""
        problems = []
        if not self.running:
            problems.append("the spool writer is not running")
        if not os.access(self.dir, os.W_OK):
            problems.append(f"the spool directory {self.dir} is not writable")
        if self.full():
            problems.append("the spool is full (limits.max_spool_mb or the disk)")
        failed_at = self.last_error_at or 0.0
        if failed_at > (self.last_write or 0.0) and time.time() - failed_at < ERROR_HOLD:
            problems.append(f"the last spool write failed: {self.last_error}")
        for runner in self.pipeline.runners:
            if runner.state in ("error", "circuit_open"):
                why = runner.open_error or runner.last_error or runner.state
                problems.append(f"storage {runner.name!r} is unreachable: {why}")
        return not problems, problems

    # --- housekeeping -------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        retention = self.config.retention
        try:
            self.ledger.expire(
                dedup=retention.dedup, receipts=retention.receipts, counts=retention.counts
            )
            self.outbox.enforce_retention(max_age=retention.spool, max_bytes=math.inf, keep_sent=0)
            self.outbox.reclaim()
            if self.housekeeping is not None:
                self.housekeeping()
        except Exception as exc:
            log.warning("waypost collector: housekeeping failed: %s", exc)
