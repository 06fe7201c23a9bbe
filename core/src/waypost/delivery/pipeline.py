"""The delivery pipeline: buffer -> worker (gate, envelope) -> each sink's queue in memory ->
its delivery threads, each inside its own error boundary, with retries and a circuit breaker;
and the storer, which writes to the outbox what cannot go at once.

The worker writes the outbox only when asked to store at once (``durability: sync``, SIGTERM,
a scheduled job): a slow, full, locked or broken outbox holds up the storer, and the worker as
far as it waits for room in memory. The host never waits for the worker, nor so for the disk,
before the buffer holds ``HOLD`` times ``outbox.buffer`` items (a caller that asks to store at
once waits STALL seconds at most): a burst waits there, as ``track`` made it, while the worker
builds it at the pace of the sinks and the storer. Events the outbox cannot take stay
in memory (each sink's queue is bounded by ``outbox.buffer``); past that bound they are
dropped and counted under the outbox's trouble (``disk_full``, ``read_only``, ...)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from waypost.delivery.backoff import Backoff
from waypost.delivery.outbox import Outbox
from waypost.delivery.runner import SPILL_CHUNK, Runner, Settings
from waypost.delivery.storage import StorageUnavailable
from waypost.errors import SinkContractError
from waypost.events import Event, coerce, dumps
from waypost.logs import get_logger
from waypost.sinks import Sink, SinkConfig
from waypost.status import Counters, LogOnce

log = get_logger(__name__)

Item = tuple[Any, Any, float, "str | None", "str | None"]
"""What ``track`` buffers: (name or payload, properties, unix time, level, distinct id)."""
FIELDS = 5
"""Entries an event takes in the buffer: an :data:`Item`'s fields, one after the other. A burst
then adds no object for the garbage collector to visit but the properties' copy (none, when
its values are plain), where one tuple an event made every full collection of a 50,000-event
burst visit 50,000 more objects (and start sooner): the slowest ``track()`` calls were those
collections, 25-41 ms of them. ``track`` adds an event's entries in one ``deque.extend``,
which no other thread interleaves; only the worker takes them, from the other end."""


LINGER = 0.05
"""Seconds the worker waits between drains while a burst goes on."""
HOLD = 5
"""How many times ``outbox.buffer`` the buffer holds in a burst before ``track`` waits for the
worker (which is woken at a batch): a buffered event is what ``track`` made (the name, a copy
of the properties, the time), a few hundred bytes."""
CHUNK = 1000
"""The most events the worker builds at once before handing them on: small enough that the
sinks start soon."""
CHUNK_SECONDS = 0.05
"""About how long the worker builds at once: slow hooks or scrubbers (5 ms an event) make the
chunks smaller, down to 10 events, so that the sinks get what is built as it is built."""
FIRST_CHUNK = 50
"""The first chunk, before the pace is known; each next one is at most four times the last."""
STALL = 2.0
"""Seconds ``track`` waits for room in a full buffer before it drops instead."""
STUCK = 10.0
"""Seconds the storer may go without storing anything, on an outbox that takes writes, before
the worker waiting for room in memory drops instead (a write of a slow disk is waited for)."""
STORAGE_RETRY = 1.0
"""Seconds between attempts to write what the outbox refused (a full disk, a lock)."""
DROP_REASONS = {
    "disk_full": "disk_full",
    "read_only": "read_only",
    "locked": "outbox_locked",
    "unavailable": "outbox_error",
}
"""Why events were dropped, by what kept the outbox from taking them."""


class Pipeline:
    """Owns the buffer, the worker thread, the outbox and the runners of one Telemetry."""

    def __init__(
        self,
        *,
        outbox: Outbox | None,
        sinks: Sequence[Sink],
        build: Callable[[list[Item]], list[Event]],
        counters: Counters,
        batch_interval: float,
        batch_size: int,
        buffer_size: int,
        backoff: Backoff,
        max_attempts: int | None,
        breaker_threshold: int,
        keep_sent: float,
        retention: Callable[[], None],
        startup: Callable[[], None] | None = None,
        debug: bool = False,
        strict: bool = False,
        sync: bool = False,
        on_control: Callable[[str, dict[str, Any]], None] | None = None,
        paused_for: Callable[[], float] | None = None,
        kept_for: Mapping[str, SinkConfig] | None = None,
    ) -> None:
        self.outbox = outbox
        self.kept_for = dict(kept_for or {}) if outbox is not None else {}
        """Configured sinks that cannot be made now (plugin missing, secret unset), with their
        routing: their events are kept in the outbox until a later start can make them."""
        self.sync = sync
        self.build = build
        self.counters = counters
        self.interval = batch_interval
        self.wake_at = batch_size
        self.buffer_size = buffer_size
        self.hold_at = HOLD * buffer_size
        """Events the buffer may hold before ``track`` waits for the worker."""
        self.retention = retention
        self.startup = startup
        self.debug = debug
        self.strict = strict
        self.log_once = LogOnce(log)
        settings = Settings(
            outbox=outbox,
            backoff=backoff,
            max_attempts=max_attempts,
            breaker_threshold=breaker_threshold,
            keep_sent=keep_sent,
            buffer_size=buffer_size,
            counters=counters,
            log_once=self.log_once,
            count_stored=self.count_stored,
            contract_error=self.contract_error,
            batch_interval=batch_interval,
            wake_storer=self.wake_storer,
            progress=self.progress,
            storage_refused=self.storage_refused,
            stored_after_all=self._stored_after_all,
            on_control=on_control,
            paused_for=paused_for,
        )
        self.runners = [Runner(sink, settings) for sink in sinks]
        self._contract_errors: list[SinkContractError] = []
        self._reset_sync()

    def _reset_sync(self) -> None:
        self.buffer: deque[Any] = deque()
        """:data:`FIELDS` entries an event (see :meth:`buffered`)."""
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = False
        self.worker: threading.Thread | None = None
        self.last_housekeeping = 0.0
        self._linger = False
        self._room = threading.Condition()
        self._stalled = False
        self._stored_lock = threading.Lock()
        self.storer: threading.Thread | None = None
        self._storer_wake = threading.Event()
        self._storage_retry_at = 0.0  # monotonic: the outbox refused a write; try again then
        self._started_up = self.startup is None
        self._drains = threading.Condition()
        self._drain_requested = 0
        self._drain_done = 0
        self._asking: set[StoreAsk] = set()  # callers waiting for what they track to be stored
        self._progress = threading.Condition()
        self._lost_reported = 0  # events lost (counted) that a flush has reported already
        self._store_behind = 0  # a store_now() ticket the worker did not reach in time
        self._taking = threading.Lock()  # held while the worker moves a chunk to accepted
        # Taken from the buffer, not yet handed to the sinks or stored; once abandoned, what
        # shutdown counted of it as _counted_as while the worker was writing it: the write may
        # still succeed (the event is stored, then no longer counted as lost).
        self._in_hand = 0
        self._chunk = FIRST_CHUNK  # what the worker builds at once (fewer while hooks are slow)
        self._abandoned = False  # shutdown counted what is left: take and hand on no more
        self._counted_as = "shutdown"
        # Events for sinks that could not be made, on their way to the outbox: the storer
        # writes them (the worker only when it stores at once). _kept_room guards the queue and
        # its count; _kept_write is held by whoever writes its head (the storer, a spill).
        self._kept: deque[tuple[list[Event], tuple[str, ...]]] = deque()
        self._kept_n = 0
        self._kept_counted = 0  # what shutdown counted as lost of it while its head was written
        self._kept_room = threading.Condition()
        self._kept_write = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.worker = threading.Thread(target=self._work, name="waypost-worker", daemon=True)
        self.worker.start()
        if not self.debug:
            self.storer = threading.Thread(target=self._store, name="waypost-storer", daemon=True)
            self._storer_wake.set()  # its start-up work at once
            self.storer.start()
            for runner in self.runners:
                runner.start()

    def after_fork(self) -> None:
        """In a forked child: the parent's threads, locks, sink instances and buffered events
        are not ours; the child starts its own threads."""
        self._reset_sync()
        self.log_once.after_fork()  # its lock may have been held by a parent's thread
        if self.outbox is not None:
            self.outbox.after_fork()
        for runner in self.runners:
            runner.after_fork()
        self.start()

    def keep_everything(self) -> None:
        """From now on every event is stored in the outbox as it is handed over, and what is
        held in memory now is stored: the process may end at any moment (SIGTERM came). The
        worker builds and stores what is buffered (hooks never run on the caller's thread);
        the caller waits STALL seconds at most."""
        self.sync = True
        self.interval = min(self.interval, LINGER)
        deadline = time.monotonic() + STALL
        self.store_now(deadline)
        self.spill(deadline)

    def contract_error(self, error: SinkContractError) -> None:
        self.log_once(f"contract:{error}", "waypost: %s", error, level=logging.ERROR)
        if self.strict:
            self._contract_errors.append(error)

    def raise_contract_errors(self) -> None:
        if self._contract_errors:
            error = self._contract_errors[0]
            self._contract_errors.clear()
            raise error

    # --- the worker -------------------------------------------------------------------------

    def nudge(self) -> None:
        """Called by ``track`` when the buffer reached a batch, or holds ``outbox.buffer``."""
        buffer = self.buffer
        wake = self.wake
        full = self.hold_at * FIELDS
        if len(buffer) < full:
            if not wake.is_set():  # once: every call of a burst goes through here
                wake.set()
            return
        # The host outran the sinks and the storer by HOLD times outbox.buffer: never grow
        # more, hold the caller back until the worker takes its next chunk. The caller never
        # runs the worker's code (hooks, sinks); should the worker be stuck, after STALL
        # seconds the oldest event buffered is dropped (counted) for each one added.
        wake.set()
        if not self._stalled:
            with self._room:
                room = self._room.wait_for(lambda: len(buffer) < full, timeout=STALL)
            if room:
                return
            self._stalled = True
        with self._taking:  # the worker takes under it too: the oldest event goes, whole
            if len(buffer) < full:
                return
            for _ in range(FIELDS):
                buffer.popleft()
        self.counters.drop("buffer_full")
        self.log_once(
            "buffer-full",
            "waypost: the worker has taken nothing for %g s; events are dropped while the "
            "buffer is full (%d events: %d times outbox.buffer)",
            STALL,
            self.hold_at,
            HOLD,
            level=logging.ERROR,
        )

    def on_own_thread(self) -> bool:
        """Whether the caller runs on one of this pipeline's threads (in a hook, a scrubber or
        a sink), which a flush or a shutdown cannot wait for."""
        me = threading.current_thread()
        if me is self.worker or me is self.storer:
            return True
        return any(me in runner.threads for runner in self.runners)

    def accepted(self) -> tuple[int, int]:
        """Events the worker has taken so far and those buffered now, read together: the
        worker takes a chunk under the same lock, so their sum never dips meanwhile."""
        with self._taking:
            return self.counters.accepted, self.buffered()

    def buffered(self) -> int:
        """Events in the buffer now (the worker may be taking one: it is counted whole)."""
        return -(-len(self.buffer) // FIELDS)

    def count_stored(self, n: int) -> None:
        with self._stored_lock:
            self.counters.stored += n

    def _work(self) -> None:
        while True:
            self.wake.wait(self._next_wait())
            self.wake.clear()
            try:
                with self._drains:
                    asked = self._drain_requested
                stored = self.drain()  # stores what it takes while a caller asks (_dispatch)
                with self._drains:
                    self._drain_done = max(self._drain_done, asked)
                    if self.debug:
                        self._drain_done = max(self._drain_done, self._drain_requested)
                    for ask in list(self._asking):
                        ask.failed = ask.failed or not stored
                        if ask.ticket and ask.ticket <= self._drain_done:
                            self._asking.discard(ask)  # served
                    self._drains.notify_all()
            except Exception as exc:
                self.log_once(
                    f"worker:{type(exc).__name__}",
                    "waypost: worker error %s: %s",
                    type(exc).__name__,
                    exc,
                    level=logging.ERROR,
                )
                time.sleep(0.5)
            if self.stopping and (not self.buffer or self._abandoned):
                return

    def _pace(self, n: int, seconds: float) -> None:
        """Size the next chunk so that building it takes about CHUNK_SECONDS."""
        paced = int(CHUNK_SECONDS * n / seconds) if n and seconds > 0 else CHUNK
        self._chunk = max(10, min(CHUNK, 4 * max(n, 10), paced))

    def abandoned(self) -> bool:
        """Shutdown counted what is left in memory as lost: nothing more is taken or handed on."""
        return self._abandoned

    def _next_wait(self) -> float:
        """Until the next drain: ``batch.interval``; sooner while a burst goes on (the last
        drain took a full batch); not at all when a batch is already buffered or a flush
        asks."""
        if len(self.buffer) >= self.wake_at * FIELDS or self._drain_requested > self._drain_done:
            return 0.0
        return min(self.interval, LINGER) if self._linger else self.interval

    def ask_to_store(self) -> StoreAsk:
        """Have everything the worker takes from now on stored, until :meth:`store_now` (given
        what this returns) is served: asked before an event is buffered, so that no drain of
        the worker's own hands it to the sinks in memory alone before the store is asked."""
        ask = StoreAsk()
        with self._drains:
            self._asking.add(ask)
        return ask

    def store_now(self, deadline: float | None = None, ask: StoreAsk | None = None) -> bool:
        """Have the worker build what is buffered now and store it in the outbox, on its own
        thread (hooks and scrubbers never run on the caller's), while the caller waits until
        ``deadline`` (monotonic; STALL seconds from now by default): called by ``track`` under
        ``durability: sync`` or once SIGTERM came, and by a scheduled job before its run is
        recorded (``ask``: from :meth:`ask_to_store` before it tracked). True when all of it
        is stored. Once a wait ran out, the next calls do not wait until the worker has caught
        up; the buffer stays bounded as in a burst."""
        worker = self.worker
        mine = worker is None or worker.ident == threading.get_ident()  # a hook that tracks
        if mine or self._drain_done < self._store_behind:
            if ask is not None:
                with self._drains:
                    self._asking.discard(ask)
            if mine:
                self.wake.set()
            else:
                self.nudge()
            return False
        ask = ask or self.ask_to_store()
        ticket = self.request_drain()
        ask.ticket = ticket  # served by the first drain that begins after this
        if not self.wait_drained(
            ticket, time.monotonic() + STALL if deadline is None else deadline
        ):
            self._store_behind = ticket
            return False
        return not ask.failed

    def request_drain(self) -> int:
        """Ask the worker to build and hand on everything buffered now; a ticket for
        :meth:`wait_drained`."""
        with self._drains:
            self._drain_requested += 1
            ticket = self._drain_requested
        self.wake.set()
        return ticket

    def wait_drained(self, ticket: int, deadline: float) -> bool:
        """Wait (until ``deadline``, monotonic) for the worker to have done the drain of
        ``ticket``."""
        with self._drains:
            while self._drain_done < ticket:
                left = deadline - time.monotonic()
                if left <= 0 or self.worker is None or not self.worker.is_alive():
                    return self._drain_done >= ticket
                self._drains.wait(min(left, 0.25))
        return True

    # --- the storer -------------------------------------------------------------------------

    def wake_storer(self) -> None:
        self._storer_wake.set()

    def progress(self) -> None:
        """A batch ended (or something was stored): a flush waiting may look again."""
        with self._progress:
            self._progress.notify_all()

    def storage_refused(self, exc: Exception) -> None:
        """The outbox refused a write (``StorageUnavailable``), or failed in it with any other
        error: what it was for stays in memory; try again soon."""
        self._storage_retry_at = time.monotonic() + STORAGE_RETRY
        if isinstance(exc, StorageUnavailable):
            # The outbox logged the trouble itself (once); this is for whoever debugs.
            log.debug("waypost: the outbox cannot take events now (%s)", exc.reason)
            return
        self.log_once(
            f"outbox-failed:{type(exc).__name__}",
            "waypost: writing to the outbox failed (%s: %s); the events stay in memory",
            type(exc).__name__,
            exc,
            level=logging.ERROR,
        )

    def _store(self) -> None:
        """The storer's loop: write to the outbox what waited in memory for ``batch.interval``
        (a slow or stuck sink never holds more than that at risk of a crash), what a failing
        or lagging sink cannot take, and what the outbox refused before; watch for hung sends;
        housekeeping."""
        while not self.stopping:
            self._storer_wake.wait(self._storer_wait())
            self._storer_wake.clear()
            try:
                self._store_once()
            except Exception as exc:
                self.log_once(
                    f"storer:{type(exc).__name__}",
                    "waypost: storer error %s: %s",
                    type(exc).__name__,
                    exc,
                    level=logging.ERROR,
                )
                self._storer_wake.wait(0.5)

    def _storer_wait(self) -> float:
        wait = 0.01 if self._kept else min(self.interval, 1.0)
        oldest = [t for t in (r.oldest_in_memory() for r in self.runners) if t is not None]
        if oldest:
            wait = min(wait, max(0.01, min(oldest) + self.interval - time.monotonic()))
        if self._storage_retry_at:
            wait = max(wait, self._storage_retry_at - time.monotonic())
        return max(0.01, wait)

    def _store_once(self) -> None:
        outbox = self.outbox
        for runner in self.runners:
            runner.check_hung()
        if outbox is None:
            return
        if time.monotonic() < self._storage_retry_at:
            return
        if not self._started_up:
            self._run_startup()
        if not self._store_kept():
            return
        now = time.monotonic()
        older_than = now - self.interval
        for runner in self.runners:
            failing = bool(runner.breaker.failures or runner.open_error or runner.paused_for())
            everything = failing or runner.behind
            while not self.stopping:
                n = runner.spill(None if everything else older_than, limit=SPILL_CHUNK)
                if n == 0 or time.monotonic() < self._storage_retry_at:
                    break
                self.progress()
        if now - self.last_housekeeping > 60:
            self.last_housekeeping = now
            try:
                self.retention()
            except StorageUnavailable as exc:
                self.storage_refused(exc)

    def _run_startup(self) -> None:
        """What a starting instance does to the outbox (void dead leases, make retries due):
        on the storer, so that a locked or broken outbox never holds up ``Telemetry()``."""
        assert self.startup is not None
        try:
            self.startup()
        except StorageUnavailable as exc:
            self.storage_refused(exc)
            return
        self._started_up = True
        for runner in self.runners:
            runner.outbox_written()

    def spill(self, deadline: float | None = None) -> bool:
        """Store everything held in memory for the sinks (waiting for the lock no later than
        ``deadline``, monotonic); False if something is left only in memory."""
        outbox = self.outbox
        if outbox is None:
            return not any(runner.in_memory() for runner in self.runners)
        with outbox.budget(time.monotonic() + 2.0 if deadline is None else deadline):
            kept = self._store_kept(time.monotonic() + 2.0 if deadline is None else deadline)
            for runner in self.runners:
                while runner.spill(limit=SPILL_CHUNK * 10):
                    if deadline is not None and time.monotonic() >= deadline:
                        break
        return kept and not any(runner.in_memory() for runner in self.runners)

    def drain(self, *, store: bool = False) -> bool:
        """Build everything buffered and hand it to the sinks' threads, or (``store``, a sink
        behind, or ``durability: sync``) write it to the outbox; in debug mode, print it.
        False if some of what was to be stored could not be (it stays in memory)."""
        stored = True
        with self.lock:
            buffer = self.buffer
            moved = 0
            # What is buffered now, not what a busy host adds meanwhile: the worker gets back to
            # its other duties (storing what waited too long in memory) between drains.
            left = len(buffer) // FIELDS
            while left > 0 and buffer:
                items: list[Item] = []
                pop = buffer.popleft
                with self._taking:  # accepted and buffered are read together under it
                    if self.abandoned():
                        break
                    try:
                        for _ in range(min(left, self._chunk)):
                            items.append((pop(), pop(), pop(), pop(), pop()))  # FIELDS
                    except IndexError:
                        pass
                    self.counters.accepted += len(items)
                    self._in_hand = len(items)
                left -= len(items)
                with self._room:  # a caller held back by a full buffer may go on
                    self._stalled = False
                    self._room.notify_all()
                moved += len(items)
                try:
                    began = time.monotonic()
                    events = self.build(items)
                    self._pace(len(items), time.monotonic() - began)
                    with self._taking:
                        if self.abandoned():  # shutdown counted them as lost
                            continue
                        self._in_hand = len(events)
                    if not events:
                        continue
                    if self.debug:
                        self._print_debug(events)
                        continue
                    assert self.outbox is not None
                    stored = self._dispatch(events, store=store) and stored
                finally:
                    self._in_hand = 0
            self._linger = moved >= self.wake_at
        return stored

    def _dispatch(self, events: list[Event], *, store: bool) -> bool:
        """Hand events to each sink that takes them, in memory; with ``store`` (or
        ``durability: sync``) write them to the outbox first (one row per sink instance, in one
        transaction), keeping them in memory if it refuses. False if it refused any."""
        assert self.outbox is not None
        # Read once these events were taken: a caller asks before it buffers what it tracks.
        store = store or bool(self._asking)
        stored = True
        now = time.monotonic()
        runners = self.runners
        kept = self.kept_for
        groups: dict[tuple[tuple[Runner, ...], tuple[str, ...]], list[Event]]
        if all(r.sink.config.routes_all for r in runners) and all(
            c.routes_all for c in kept.values()
        ):
            groups = {(tuple(runners), tuple(kept)): events}
        else:
            groups = {}
            for event in events:
                key = (
                    tuple(r for r in runners if r.sink.config.accepts(event.name)),
                    tuple(name for name, c in kept.items() if c.accepts(event.name)),
                )
                groups.setdefault(key, []).append(event)
        for (targets, keep), group in groups.items():
            held = len(group)  # what the worker holds of it until it is handed on, or counted
            if not targets and not keep:
                self._hand_on(held, self.counters.drop, "no_sink", held)
                continue
            # Sinks configured but not made (plugin missing, secret unset) keep their events in
            # the outbox, for the first start that can make them: written by the storer, or
            # here with the rest when everything is stored at once (durability: sync, SIGTERM).
            stored_targets = bool(targets) and (store or self.sync)
            if keep and not (store or self.sync):
                if not self._keep(group, keep, held):
                    return stored  # shutdown counted what is left
                keep, held = (), 0
            names = ([r.name for r in targets] if stored_targets else []) + list(keep)
            if names:
                if self.abandoned():
                    return stored
                try:
                    self.outbox.add(group, names)
                except Exception as exc:  # refused (or a defect in the write): kept in memory
                    self.storage_refused(exc)
                    stored = False
                    if keep:
                        if not self._keep(group, keep, held):  # the storer tries again
                            return stored
                        held = 0
                else:
                    self.count_stored(len(group))
                    self._written(held)
                    held = 0
                    if stored_targets:
                        for runner in targets:
                            runner.outbox_written()
                        continue
            for runner in targets:
                if not runner.room() and not self._make_room(runner):
                    if not self._hand_on(held, self._drop_for, runner, len(group)):
                        return stored
                elif not self._hand_on(held, runner.offer, group, now):
                    return stored
                held = 0
        return stored

    def _hand_on(self, held: int, handover: Callable[..., object], *args: Any) -> bool:
        """Call ``handover(*args)`` (hand events to a sink's queue or the storer, or count them
        dropped) unless shutdown has counted what the worker holds, then False: every event is
        counted once. ``held``: how many of what the worker holds it hands on."""
        with self._taking:
            if self._abandoned:
                return False
            handover(*args)
            self._in_hand = max(0, self._in_hand - held)
        return True

    def _written(self, held: int) -> None:
        """The worker wrote ``held`` events it holds to the outbox: no longer in hand, or, if
        shutdown counted them as lost meanwhile, no longer counted (the next start delivers
        them)."""
        with self._taking:
            if not self._abandoned:
                self._in_hand = max(0, self._in_hand - held)
                return
            counted = min(held, self._in_hand)
            self._in_hand -= counted
        self._stored_after_all(counted)

    def _stored_after_all(self, counted: int) -> None:
        """``counted`` events shutdown counted as lost were written meanwhile: off that count."""
        if counted:
            self.counters.undrop(self._counted_as, counted)
            log.info(
                "waypost: %d events counted as lost at shutdown were stored after all", counted
            )

    def _drop_for(self, runner: Runner, n: int) -> None:
        reason, detail = self._drop_unstorable(n)
        self.log_once(
            f"drop:{reason}",
            "waypost: sink %r holds %d events in memory (outbox.buffer), and the outbox cannot "
            "take more (%s): %d events dropped",
            runner.name,
            self.buffer_size,
            detail,
            n,
            level=logging.ERROR,
        )

    def _keep(self, events: list[Event], sinks: tuple[str, ...], held: int) -> bool:
        """Hand events for sinks that could not be made to the storer. At most
        ``outbox.buffer`` wait in memory: past it the worker waits for the storer while it
        stores, and drops them (counted) when the outbox cannot take any now or has taken
        nothing for STUCK seconds. False if shutdown counted them first (``held``: how many of
        them the worker holds)."""
        watch = _Watch(self)
        with self._kept_room:
            while self._kept_n >= self.buffer_size:
                if watch.hopeless():
                    return self._hand_on(held, self._drop_kept, sinks, len(events))
                self.wake_storer()
                self._kept_room.wait(LINGER)
            if not self._hand_on(held, self._kept.append, (events, sinks)):
                return False
            self._kept_n += len(events)
        self.wake_storer()
        return True

    def _store_kept(self, deadline: float | None = None) -> bool:
        """Write what waits for sinks that could not be made (the storer; a spill, which waits
        for a write under way no later than ``deadline``, monotonic); False if some is left in
        memory (the outbox refused it, or the deadline came)."""
        outbox = self.outbox
        if outbox is None:
            return True
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._kept_write.acquire(timeout=wait):
            return not self._kept
        try:
            while True:
                with self._kept_room:
                    if not self._kept or self._abandoned:  # shutdown counted what is left
                        return not self._kept
                    head = self._kept[0]
                events, sinks = head
                try:
                    outbox.add(events, list(sinks))
                except StorageUnavailable as exc:
                    self.storage_refused(exc)
                    return False
                except Exception as exc:  # not the disk: these events would fail again
                    self.storage_refused(exc)
                    self._kept_done(head, written=False)
                else:
                    self.count_stored(len(events))
                    self._kept_done(head, written=True)
        finally:
            self._kept_write.release()

    def _kept_done(self, head: tuple[list[Event], tuple[str, ...]], *, written: bool) -> None:
        """The head of what waits for sinks not made was written, or failed for good: off the
        queue, counted once. Shutdown may have counted it as lost meanwhile: written, it is
        no longer; failed, it stays counted (consent withdrawn: discarded, not counted)."""
        events, sinks = head
        n = len(events)
        with self._kept_room:
            queued = bool(self._kept) and self._kept[0] is head
            if queued:
                self._kept.popleft()
                self._kept_n -= n
                self._kept_room.notify_all()
            counted = min(n, self._kept_counted)
            self._kept_counted -= counted
        if written:
            self._stored_after_all(counted)
        elif queued and not counted:
            self._drop_kept(sinks, n)

    def kept_in_memory(self) -> dict[str, int]:
        """Events waiting in memory for each sink that could not be made, on their way to the
        outbox (the storer writes them; they go with the process until it has)."""
        counts: dict[str, int] = {}
        with self._kept_room:
            for events, sinks in self._kept:
                for name in sinks:
                    counts[name] = counts.get(name, 0) + len(events)
        return counts

    def _drop_kept(self, sinks: tuple[str, ...], n: int) -> None:
        """Events for sinks that could not be made, which the outbox cannot take now."""
        reason, detail = self._drop_unstorable(n)
        self.log_once(
            f"drop-kept:{reason}",
            "waypost: %d events for sink(s) %s, which could not be made, are dropped: the outbox "
            "cannot take them (%s)",
            n,
            ", ".join(sinks),
            detail,
            level=logging.ERROR,
        )

    def memory_only(self) -> bool:
        """The outbox takes no writes now (full disk, read-only, locked): delivery from memory."""
        health = self.outbox.health() if self.outbox is not None else None
        return health is not None and health.memory_only

    def _drop_unstorable(self, n: int) -> tuple[str, str]:
        """Count ``n`` events dropped because the outbox cannot take them, under the reason
        for what is wrong with it; that reason and what to tell the operator."""
        reason, detail = self._unstorable()
        self.counters.drop(reason, n)
        return reason, detail

    def _unstorable(self, *, at_shutdown: bool = False) -> tuple[str, str]:
        """Why events cannot be stored now, and what to tell the operator: what is wrong with
        the outbox (``at_shutdown``, when it takes writes: the budget ran out first)."""
        outbox = self.outbox
        health = outbox.health() if outbox is not None else None
        if health is not None and health.memory_only:
            reason = DROP_REASONS.get(health.state, "outbox_error")
            return reason, health.detail or reason
        if at_shutdown:
            return "shutdown", "the shutdown budget ran out before they were stored"
        reason = DROP_REASONS["unavailable"]
        return reason, (health.detail if health is not None else None) or reason

    def _count_left_in_memory(self, deadline: float) -> None:
        """At shutdown, count what is still held only in memory once the threads have stopped:
        it goes with the process (the outbox could not take it, or the budget ran out first).
        From now on the worker takes and hands on nothing more (what it has in hand is counted
        here, and no longer if a write of it under way ends well). The outbox is asked, within
        ``deadline`` (monotonic), which of it it holds too."""
        reason, detail = self._unstorable(at_shutdown=True)
        with self._taking:
            self._abandoned = True
            self._counted_as = reason
            self.counters.drop(reason, self._in_hand)
            hand = self._in_hand
            n = self.buffered()
        with self._kept_room:
            # Counted as the storer sees it: a write of its head under way that ends well
            # takes that off the count again (_kept_done).
            kept = self._kept_counted = self._kept_n
            self.counters.drop(reason, kept)
        outbox = self.outbox
        for runner in self.runners:
            # What a spill is writing is counted as lost: one that ends well takes it off.
            ids, moving = runner.left_at_shutdown()
            n += len(ids) + moving
            if ids and outbox is not None:
                try:  # what is also in the outbox stays there
                    with outbox.budget(deadline):
                        n -= outbox.holding(runner.name, ids)
                except StorageUnavailable:
                    pass
        self.counters.drop(reason, n)
        if not n + hand + kept:
            return
        log.error(
            "waypost: %d events held only in memory are lost at shutdown, counted as %s: %s",
            n + hand + kept,
            reason,
            detail,
        )

    def _make_room(self, runner: Runner) -> bool:
        """Wait for room in a sink's full queue in memory while the outbox takes what it
        holds: the worker is slowed to the storer's pace, however slow (the host only once the
        buffer holds ``HOLD`` times ``outbox.buffer``), never made to wait on a stuck disk.
        When the outbox cannot take anything (full disk, read-only, locked) or has taken
        nothing for STUCK seconds, events past the bound are dropped, and counted under that
        cause. True if there is room now."""
        watch = _Watch(self)
        while not runner.wait_room(time.monotonic() + LINGER):
            if watch.hopeless():
                return False
        return True

    def _print_debug(self, events: list[Event]) -> None:
        for runner in self.runners:
            try:
                rendered = runner.sink.render(events)
                text = dumps(coerce(rendered))
            except Exception as exc:
                text = f"<render failed: {type(exc).__name__}: {exc}>"
            print(
                f"[waypost debug] sink {runner.name!r} (type {runner.sink.type}) would send "
                f"{len(events)} events (nothing sent): {text}",
                file=sys.stderr,
                flush=True,
            )

    # --- flush and shutdown -----------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Do all that can be done before ``timeout`` seconds have passed: the worker builds
        what is buffered (hooks and scrubbers run there, never on the caller's thread), the
        sinks send it, and retries that fall due before the deadline are made (honouring
        ``Retry-After``); then what is still in memory is stored. True only when every event
        accepted so far was delivered, refused for good or is stored, and none was lost since
        the last flush."""
        start = time.monotonic()
        since = time.time()
        deadline = start + max(0.0, timeout)
        # A slice of the budget is kept to store what is still in memory at the end.
        storing = min(1.0, 0.1 * max(0.0, timeout))
        drained = self.wait_drained(self.request_drain(), deadline - storing)
        if self.debug:
            return drained
        for runner in self.runners:
            if runner.threads:
                runner.request_pass()
        wall_deadline = time.time() + (deadline - time.monotonic())
        until = deadline - storing
        with self._progress:
            while time.monotonic() < until:
                # A starting instance's own work on the outbox first: until the storer has
                # voided dead processes' leases, their rows look taken (unless the outbox takes
                # no writes: then that work waits, and so does what is stored).
                started = self._started_up or self.memory_only()
                if started and all(r.settled(wall_deadline, since) for r in self.runners):
                    break
                self._progress.wait(min(0.1, max(0.0, until - time.monotonic())))
        stored = self.spill(deadline)
        ok = drained and stored and self.counters.lost() == self._lost_reported
        self._lost_reported = max(self._lost_reported, self.counters.lost())
        return ok

    def force_due(self, deadline: float | None = None) -> None:
        """Make every pending row due now and close open circuits ("submit now")."""
        if self.outbox is not None:
            try:
                with self.outbox.budget(time.monotonic() + 1.0 if deadline is None else deadline):
                    self.outbox.retry_now([r.name for r in self.runners])
            except StorageUnavailable as exc:
                self.storage_refused(exc)
        for runner in self.runners:
            runner.force_due()

    def shutdown(self, timeout: float, *, flush: bool = True) -> bool:
        """Stop the threads within ``timeout``; with ``flush``, deliver what can be first."""
        deadline = time.monotonic() + max(0.0, timeout)
        if flush:
            ok = self.flush(max(0.0, timeout * 0.9))
        else:  # consent withdrawn: what is not stored is discarded, by design
            ok = True
            with self._taking:
                self._abandoned = True
                self._in_hand = 0  # not counted: nothing to take back off the count
            with self._kept_room:
                self._kept.clear()
                self._kept_n = 0
                self._kept_room.notify_all()
            for runner in self.runners:
                runner.discard()
        self.stopping = True
        self.wake.set()
        self._storer_wake.set()
        for runner in self.runners:
            runner.halt()
        if self.worker is not None:
            self.worker.join(max(0.0, deadline - time.monotonic()))
        if self.storer is not None:
            self.storer.join(max(0.0, deadline - time.monotonic()))
        stuck = False
        closing: list[Runner] = []
        for runner in self.runners:
            for thread in runner.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if runner.alive:
                stuck = True
                log.warning(
                    "waypost: sink %r still busy at shutdown; its events stay in the outbox",
                    runner.name,
                )
            elif runner.opened:
                closing.append(runner)
            else:
                runner.sink.masker.release()  # its secrets no longer mask the process's texts
        if closing:  # a sink's close() (a producer's own flush) gets what is left, no more
            closer = threading.Thread(
                target=_close_sinks, args=(closing,), name="waypost-close", daemon=True
            )
            closer.start()
            closer.join(max(0.0, deadline - time.monotonic()))
            if closer.is_alive():
                log.warning("waypost: closing the sinks outlasted the shutdown budget")
        if flush:
            self._count_left_in_memory(deadline)
        busy = [t for t in (self.worker, self.storer) if t is not None and t.is_alive()]
        if self.outbox is not None and (stuck or busy):
            # The file stays open for a thread still using it, and SQLite copies its -wal into
            # the main file only when the last connection closes: done now, waiting for nobody
            # (else the rows would be in the -wal alone, should the process end first).
            self.outbox.checkpoint()
        if self.outbox is not None and not stuck:
            if busy:
                # A thread still inside an outbox write (waiting for a lock another process
                # holds) keeps its connection until its own wait ends; closing that connection
                # here would wait as long. It is closed once they are done, off the caller.
                threading.Thread(
                    target=_close_after,
                    args=(self.outbox, busy),
                    name="waypost-close-outbox",
                    daemon=True,
                ).start()
            else:
                try:  # nothing is in flight any more: what this process leased is due again
                    with self.outbox.budget(max(time.monotonic(), deadline)):
                        for runner in self.runners:  # outcomes refused before, if it takes them
                            runner.record_held()
                        self.outbox.release()
                except StorageUnavailable:
                    pass
                self.outbox.close()
        return ok and not stuck


class StoreAsk:
    """A caller waiting for what it tracks to be stored (:meth:`Pipeline.ask_to_store`): the
    worker stores all it takes while any is asked, and notes here whether all of it was."""

    __slots__ = ("failed", "ticket")

    def __init__(self) -> None:
        self.ticket = 0  # the drain it waits for, once it tracked; 0 until then
        self.failed = False  # a store while it was asked failed: some of it stays in memory


class _Watch:
    """Whether waiting for the storer to make room is hopeless: the outbox refuses writes
    (delivery from memory only), shutdown came, or nothing was stored for STUCK seconds. A
    slow but working outbox is waited for."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.stored = pipeline.counters.stored
        self.since = time.monotonic()

    def hopeless(self) -> bool:
        pipeline = self.pipeline
        if pipeline.stopping or pipeline.memory_only():
            return True
        now = time.monotonic()
        stored = pipeline.counters.stored
        if stored != self.stored:
            self.stored, self.since = stored, now
        return now - self.since >= STUCK


def _close_after(outbox: Outbox, threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()
    outbox.close()


def _close_sinks(runners: list[Runner]) -> None:
    for runner in runners:
        try:
            runner.sink.close()
        except BaseException as exc:  # on a thread of its own: nothing to raise to
            log.warning("waypost: sink %r failed to close: %r", runner.name, exc)
        # Done with: its secrets no longer mask the process's texts (a sink stuck at shutdown,
        # which may still log, keeps them known; its own reasons are masked either way).
        runner.sink.masker.release()
