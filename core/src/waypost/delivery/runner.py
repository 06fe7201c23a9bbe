"""The per-sink runner: one sink instance's threads, its queue in memory, its batches in flight,
and the counters and circuit breaker behind its status.

A runner's locks: ``_signal`` (a condition: wake-ups and flush passes), ``_state`` (the queue,
the flights, the counters; ``_room`` is a condition on it), ``_spill_lock`` (held while a spill
writes the outbox) and ``_open_lock`` (one ``Sink.open`` at a time). Only ``_spill_lock`` and
``_state`` are ever held together, and only through :meth:`Runner._spill_then_state`, which
is the order; the pipeline's own locks are taken before any runner's, never after.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from waypost.delivery.boundary import call_send
from waypost.delivery.breaker import Breaker
from waypost.delivery.storage import StorageUnavailable
from waypost.delivery.waiting import Taken, Waiting
from waypost.events import Event
from waypost.logs import get_logger
from waypost.privacy.secrets import guard_loggers, sanitise
from waypost.processes import FORK_KEEP, GATE, warm_imports
from waypost.sinks import SendResult, Sink

if TYPE_CHECKING:
    from waypost.delivery.backoff import Backoff
    from waypost.delivery.outbox import Outbox
    from waypost.errors import SinkContractError
    from waypost.status import Counters, LogOnce

log = get_logger(__name__)


SPILL_CHUNK = 1000
"""Events written to the outbox per transaction: the lock is never held long."""
HUNG_GRACE = 1.0
"""Seconds past twice the sink's request timeout after which a ``send`` counts as hung."""
RECORD_RETRY = 1.0
"""Seconds between attempts to write an outcome the outbox refused."""


@dataclass(frozen=True)
class Settings:
    """What the runners of one pipeline share: its settings and services."""

    outbox: Outbox | None
    """None in debug mode, where runners print and never start."""
    backoff: Backoff
    max_attempts: int | None
    breaker_threshold: int
    keep_sent: float
    """Seconds delivered records stay in the outbox for inspection (0: not kept)."""
    buffer_size: int
    """How many events a sink's queue in memory holds before new ones go to the outbox."""
    counters: Counters
    log_once: LogOnce
    count_stored: Callable[[int], None]
    """Count events written to the outbox."""
    contract_error: Callable[[SinkContractError], None]
    """Report a sink that broke the plugin contract."""
    batch_interval: float
    """``batch.interval``: events waiting in memory longer than this are stale (the storer
    writes them to the outbox)."""
    wake_storer: Callable[[], None]
    """Ask the storer to write what waits in memory to the outbox now."""
    progress: Callable[[], None]
    """Tell a waiting flush that a batch ended."""
    storage_refused: Callable[[Exception], None]
    """The outbox refused a write (``StorageUnavailable``) or failed in it (any other error)."""
    """Report a write the outbox refused (the events stay in memory)."""
    stored_after_all: Callable[[int], None]
    """Events shutdown counted as lost were written meanwhile: take them off that count."""
    on_control: Callable[[str, dict[str, Any]], None] | None = None
    """Called with a sink's name and the control block its destination answered, if any."""
    paused_for: Callable[[], float] | None = None
    """Seconds this installation is asked to send nothing for (0: not paused)."""
    poll_interval: float = 5.0
    """Seconds between looks into the outbox when nothing says rows are due (other processes
    may have written some)."""
    lease_seconds: float = 120.0


@dataclass(eq=False)
class Flight:
    """A batch a sink sends straight from memory; ``stored`` once it is also in the outbox."""

    events: list[Event]
    since: float
    stored: bool = False


@dataclass(eq=False)
class Unrecorded:
    """What became of a batch whose rows are stored, and which the outbox refused to record
    (a full disk, another process's lock): the rows stay leased to this process, hidden from
    every reader of the outbox, until the rest of ``steps`` is written or the lease ends."""

    steps: list[Callable[[], None]]
    expires: float
    """Monotonic: the rows' lease has ended by then, and they are due again without it."""


def _write_steps(steps: list[Callable[[], None]]) -> None:
    """Write ``steps`` in order, each taken off the list once written (``StorageUnavailable``
    leaves the rest on it)."""
    while steps:
        steps[0]()
        steps.pop(0)


@dataclass(eq=False)
class Sending:
    """A ``send`` under way on one of the runner's threads (for the hang watch)."""

    started: float
    events: int
    hung: bool = False


class Runner:
    """Delivers one sink instance's events, on its own threads (one per batch in flight:
    ``Sink.concurrency``).

    Fresh events come from memory (``fresh``) and never touch the disk when they are delivered
    at once; what is retried, refused, kept for inspection, or still in memory after
    ``batch.interval`` goes to the outbox, and the outbox's due rows are leased from there.
    """

    def __init__(self, sink: Sink, settings: Settings) -> None:
        self.settings = settings
        self.sink = sink
        self.name = sink.name
        self.delivered = 0
        self.retried = 0
        self.failed = 0
        self.dropped_by_destination = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.breaker = Breaker(settings.breaker_threshold, settings.backoff)
        self.opened = False
        self.open_error: str | None = None
        self.opening_since: float | None = None  # monotonic: while open() runs
        self.boundary_error: str | None = None  # the last batch broke the plugin contract
        self.hung_error: str | None = None
        self.memory_retry_at = 0.0  # wall clock: a failed batch held in memory is tried again
        self.refused_at = 0.0  # wall clock: the outbox last refused one of this sink's writes
        self.receipts: deque[str] = deque(maxlen=20)
        self._reset_sync()

    def _reset_sync(self) -> None:
        self._signal = threading.Condition()  # wake-ups (_wakes) and flush passes (tickets)
        self._wakes = 0
        self.stop = False
        self.threads: list[threading.Thread] = []
        self._busy = 0
        self._turns = 0  # batches taken so far (settled() sees whether one began meanwhile)
        self._storing = 0  # spills writing events they took from memory (for settled())
        self._moving: list[Event] = []  # what those spills write: in neither place until done
        self._moving_counted = 0  # what shutdown counted as lost of it while it was written
        self._counted = False  # shutdown counted what is left in memory: no spill begins
        self._state = threading.Lock()
        self._room = threading.Condition(self._state)  # notified as the queue in memory shrinks
        self.behind = False
        self._open_lock = threading.Lock()
        self._spill_lock = threading.RLock()  # re-entered by spill() through the helper below
        self._requested = 0
        self._completed = 0
        self.fresh = Waiting()  # arrival times kept per offered group, not per event
        self.flights: set[Flight] = set()
        self.outbox_due_at = 0.0  # monotonic: when the outbox may next hold due rows for us
        # Someone wrote rows for us or asks for a look (a flush): set by them, cleared by this
        # sink's thread before it looks, so that a request made during a look is never lost.
        self._look_now = True
        self._turn = False
        self.sending: dict[int, Sending] = {}  # by thread ident
        self._unrecorded: deque[Unrecorded] = deque()  # under _state
        self._record_lock = threading.Lock()  # one thread writes them at a time
        self._record_at = 0.0  # monotonic: when to try writing them again

    @contextmanager
    def _spill_then_state(self) -> Iterator[None]:
        """The runner's lock order: ``_spill_lock``, then ``_state``. Every place that holds
        both takes them here (a spill that holds ``_spill_lock`` while it writes re-enters it)."""
        with self._spill_lock, self._state:
            yield

    @property
    def state(self) -> str:
        if (self.open_error and not self.opened) or self.boundary_error or self.hung_error:
            return "error"
        if self.breaker.is_open():
            return "circuit_open"
        if self.breaker.failures:
            return "retrying"
        return "ok"

    # --- thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread; more start as batches queue up, to ``Sink.concurrency`` in all."""
        self._add_threads(1)

    def _add_threads(self, n: int) -> None:
        with self._state:  # thread.start() returns once the thread runs: never held for long
            live = [t for t in self.threads if t.is_alive()]
            n = min(n, self._allowed() - len(live))
            for _ in range(n):
                thread = threading.Thread(
                    target=self._run, name=f"waypost-sink-{self.name}", daemon=True
                )
                thread.start()
                live.append(thread)
            self.threads = live

    def _allowed(self) -> int:
        """Threads this runner may have: its concurrency, plus one for each hung ``send``."""
        return max(1, self.sink.concurrency) + sum(1 for s in self.sending.values() if s.hung)

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def request_pass(self) -> int:
        self._look_now = True  # a flush looks in the outbox too
        with self._signal:
            self._requested += 1
            ticket = self._requested
            self._wakes += 1
            self._signal.notify_all()
        return ticket

    def wait_pass(self, ticket: int, deadline: float) -> bool:
        with self._signal:
            while self._completed < ticket:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return self._completed >= ticket
                self._signal.wait(min(left, 0.5))
        return True

    def _complete_pass(self) -> None:
        with self._signal:
            if self._completed < self._requested:
                self._completed = self._requested
                self._signal.notify_all()

    def _run(self) -> None:
        # The boundary: nothing escapes a sink's thread, not even a BaseException (a sink that
        # raises SystemExit must not end delivery for good); the loop goes on.
        while not self.stop:
            try:
                self._loop()
            except BaseException as exc:
                self.settings.log_once(
                    f"runner:{self.name}:{type(exc).__name__}",
                    "waypost: sink %r: internal error %s: %s",
                    self.name,
                    type(exc).__name__,
                    exc,
                    level=logging.ERROR,
                )
                self._sleep(1.0, self._wakes)
                continue
            break
        self._complete_pass()

    def _loop(self) -> None:
        settings = self.settings
        outbox = settings.outbox
        assert outbox is not None  # runners start only when the outbox exists
        idle_wait = settings.poll_interval
        breaker = self.breaker
        while not self.stop:
            if len([t for t in self.threads if t.is_alive()]) > self._allowed():
                return  # a thread that came back from a hang, now one too many
            seen = self._wakes  # before looking for work: a wake-up after this is not missed
            try:
                if self._unrecorded and time.monotonic() >= self._record_at:
                    self.record_held()
                if not self.opened:
                    # Opened when there is something to send, not before: a process that forks
                    # soon after starting (gunicorn --preload) has built no client to share.
                    wait = self._until_work(outbox)
                    if wait > 0:
                        self._idle()
                        self._sleep(wait, seen)
                        continue
                if not self.opened and not self._open():
                    self._idle()
                    self._sleep(min(30.0, max(1.0, breaker.remaining())), seen)
                    continue
                held = breaker.remaining()
                if held > 0:
                    self._idle()
                    self._sleep(held, seen)
                    continue
                paused = self.paused_for()
                if paused > 0:  # the destination asked for a pause: what waits is stored
                    if self.fresh and not self.memory_only:
                        settings.wake_storer()
                    self._idle()
                    self._sleep(min(paused, 60.0), seen)
                    continue
                now = time.time()
                if breaker.failures and self.fresh and not self.memory_only:
                    settings.wake_storer()  # a failing sink retries from the outbox
                # Fresh events first; when the outbox has rows due, every other batch. The
                # outbox is read only when rows may be due: it is written for this sink, a
                # retry falls due, a flush asks, or every poll interval (other processes).
                self._turn = not self._turn
                outbox_wait = 0.0 if self._look_now else self.outbox_due_at - time.monotonic()
                flight = None if outbox_wait <= 0 and self._turn else self._take_fresh()
                if flight is not None:
                    try:
                        self._deliver_fresh(flight)
                    finally:
                        with self._state:
                            self._busy -= 1
                        settings.progress()
                    continue
                if outbox_wait > 0:
                    self._idle()
                    self._sleep(min(outbox_wait, self._memory_wait()), seen)
                    continue
                self._look_now = False  # before the look: a request from now on comes after it
                # Busy from before the lease: a leased row is hidden from every reader of the
                # outbox, so a flush must see it in flight from the moment it is taken.
                with self._state:
                    self._busy += 1
                    self._turns += 1
                try:
                    leased_at = time.monotonic()  # no later than the lease's start
                    try:
                        leased = outbox.lease(
                            self.name, self.sink.batch_size, lease_seconds=settings.lease_seconds
                        )
                        due = None if leased else outbox.next_due(self.name)
                    except StorageUnavailable:
                        self.refused_at = time.time()
                        leased, due = [], time.time() + 1.0  # the outbox is unusable now: later
                    if not leased:
                        wait = idle_wait if due is None else max(0.01, min(idle_wait, due - now))
                        self.outbox_due_at = time.monotonic() + wait
                        continue
                    self.outbox_due_at = 0.0  # more may be due: look again next turn
                    with self._state:
                        backlog = len(leased) == self.sink.batch_size and self._busy >= len(
                            self.threads
                        )
                    if backlog:
                        self._add_threads(1)  # a backlog: more batches in flight at once
                    self._deliver(leased, leased_at)
                finally:
                    with self._state:
                        self._busy -= 1
                    settings.progress()
            except Exception as exc:
                self.settings.log_once(
                    f"runner:{self.name}:{type(exc).__name__}",
                    "waypost: sink %r: internal error %s: %s",
                    self.name,
                    type(exc).__name__,
                    exc,
                    level=logging.ERROR,
                )
                self._sleep(1.0, seen)

    @property
    def memory_only(self) -> bool:
        """Whether nothing can be stored now (read-only data dir, full disk, ...): a failed
        batch then waits in memory and is retried from there."""
        outbox = self.settings.outbox
        return outbox is not None and outbox.health().memory_only

    def _memory_wait(self) -> float:
        """Seconds until events held in memory after a failure may be tried again."""
        if not self.fresh:
            return 3600.0
        return max(0.01, self.memory_retry_at - time.time())

    def _until_work(self, outbox: Outbox) -> float:
        """0 when this sink has events to send, else the seconds until it may have (rows of
        another process are looked for every poll interval)."""
        if self.fresh:
            return 0.0
        try:
            due = outbox.next_due(self.name)
        except StorageUnavailable:
            return 1.0  # nothing to read from now; events in memory wake the thread
        poll = self.settings.poll_interval
        return poll if due is None else max(0.0, min(poll, due - time.time()))

    def _idle(self) -> None:
        """Nothing to take now: the flush pass is complete once no batch is in flight."""
        with self._state:
            busy = self._busy or self.fresh
        if not busy:
            self._complete_pass()

    def _sleep(self, seconds: float, seen: int) -> None:
        """Sleep until woken after ``seen`` (the wake count when this turn began), or a stop;
        while outcomes wait to be written, no longer than until the next try."""
        if self._unrecorded:
            seconds = min(seconds, max(0.01, self._record_at - time.monotonic()))
        with self._signal:
            self._signal.wait_for(lambda: self._wakes != seen or self.stop, timeout=seconds)

    def outbox_written(self) -> None:
        """Rows for this sink were just written to the outbox: look there now."""
        self._look_now = True
        self.wake()

    def force_due(self) -> None:
        """ "Submit now": close the circuit and look into the outbox at once."""
        self.breaker.close()
        self.outbox_written()

    def halt(self) -> None:
        """Ask the threads to end (each finishes the batch it is sending)."""
        self.stop = True
        self.wake()

    def wake(self, threads: int | None = None) -> None:
        """Wake this runner's threads (all, or as many as ``threads``): new events, a flush,
        a stop."""
        with self._signal:
            self._wakes += 1
            if threads is None:
                self._signal.notify_all()
            else:
                self._signal.notify(threads)

    def _open(self) -> bool:
        with self._open_lock:
            if self.opened:
                return True
            return self._open_once()

    def after_fork(self) -> None:
        """In a forked child: this process's own sink instance, threads and counters. The
        parent's instance holds the parent's connections (a client, a pool, sockets): it is kept,
        never used or closed here, so that nothing is sent on the parent's connections."""
        FORK_KEEP.append(self.sink)
        old = self.sink
        try:
            self.sink = type(old)(old.name, old.config, old.context)
        except Exception as exc:
            log.warning(
                "waypost: sink %r cannot be made again after fork(), so this process shares "
                "its parent's: %s: %s",
                old.name,
                type(exc).__name__,
                exc,
            )
        self.opened = False
        self.open_error = None
        self.breaker = Breaker(self.settings.breaker_threshold, self.settings.backoff)
        self.delivered = self.retried = self.failed = self.dropped_by_destination = 0
        self.last_success = self.last_error = self.last_error_at = None
        self.receipts.clear()
        self._reset_sync()
        self._look_now = True

    def _open_once(self) -> bool:
        try:
            # What open() imports and builds is never forked across.
            with GATE.section(f"opening sink {self.name!r}"):
                warm_imports()
                self.opening_since = time.monotonic()
                try:
                    self.sink.open()
                finally:
                    self.opening_since = None
        except BaseException as exc:
            self.open_error = sanitise(f"{type(exc).__name__}: {exc}")
            self.breaker.open_failed()
            self.settings.log_once(
                f"open:{self.name}", "waypost: sink %r cannot start: %s", self.name, self.open_error
            )
            return False
        guard_loggers()  # the loggers of what open() imported (a vendor's SDK) sanitise too
        self.opened = True
        self.open_error = None
        self.breaker.succeeded()
        return True

    # --- events in memory -------------------------------------------------------------------

    def _limit(self) -> int:
        """How many events may wait in memory: ``outbox.buffer``, or, while the sink is
        behind (the storer writes what waited too long), two of the storer's chunks: events
        then wait for the disk in the host's ``track`` (slowed to the storer's pace), not in
        memory, where a crash would lose them. While the outbox can take nothing (a full disk,
        a read-only data dir), there is no disk to wait for: the whole ``outbox.buffer``."""
        size = self.settings.buffer_size
        return min(size, 2 * SPILL_CHUNK) if self.behind and not self.memory_only else size

    def room(self) -> bool:
        """Whether this sink's queue in memory has room for more events."""
        return len(self.fresh) < self._limit()

    def wait_room(self, deadline: float) -> bool:
        """Wait (until ``deadline``, monotonic) for room in the queue in memory: the sink's
        threads send, the storer writes to the outbox. True if there is room."""
        if self.room():
            return True
        self.behind = True
        self.settings.wake_storer()
        with self._room:
            return (
                self._room.wait_for(
                    lambda: len(self.fresh) < self._limit() or self.stop,
                    timeout=max(0.0, deadline - time.monotonic()),
                )
                and not self.stop
            )

    def offer(self, events: list[Event], now: float) -> None:
        """Hand fresh events to this sink's threads (and, should it fail or fall behind, to
        the storer: they stay in memory until one of them takes them)."""
        with self._state:  # the events and their arrival mark go in together
            self.fresh.add(events, now)
        if self.breaker.failures or self.open_error or self.paused_for() > 0:
            if not self.memory_only:
                self.settings.wake_storer()
            return
        batches = -(-len(self.fresh) // self.sink.batch_size)
        idle = len(self.threads) - self._busy
        if 0 < len(self.threads) < self.sink.concurrency and batches > idle:
            self._add_threads(batches - idle)  # a burst: more batches in flight at once
        self.wake(batches)  # a thread per batch waiting

    def paused_for(self) -> float:
        """Seconds the destination asked this installation to send nothing for (0: none):
        meanwhile what waits goes to the outbox."""
        paused_for = self.settings.paused_for
        return paused_for() if paused_for is not None else 0.0

    def _take_fresh(self) -> Flight | None:
        fresh = self.fresh
        with self._state:
            if not fresh:
                return None
            if self.breaker.failures and not (
                self.memory_only and time.time() >= self.memory_retry_at
            ):
                return None  # a failing sink retries from the outbox, with its backoff
            since = fresh.oldest()
            flight = Flight(fresh.take(self.sink.batch_size).events, since)
            self.flights.add(flight)
            self._busy += 1
            self._turns += 1
            if time.monotonic() - since < self.settings.batch_interval:
                self.behind = False  # it takes events before they go stale: caught up
            self._room.notify_all()
        return flight

    def _requeue(self, taken: Taken) -> None:
        """Put events back at the front of the queue in memory, in their order."""
        with self._state:
            self.fresh.put_back(taken)

    def in_memory(self) -> int:
        """Events of this sink held only in memory: waiting, or in flight and not stored."""
        with self._state:
            return len(self.fresh) + sum(len(f.events) for f in self.flights if not f.stored)

    def left_at_shutdown(self) -> tuple[set[str], int]:
        """At shutdown: the ids of the events waiting or in flight only in memory (some may
        also be stored: a batch stored leased whose outcome could not be written is back in
        memory), and how many a spill is writing now, counted as lost. From now on no spill
        begins, and one under way that ends well takes what it wrote off that count."""
        with self._state:
            self._counted = True
            ids = {event.id for event in self.fresh}
            ids.update(e.id for f in self.flights if not f.stored for e in f.events)
            self._moving_counted = len(self._moving)
        return ids, self._moving_counted

    def oldest_in_memory(self) -> float | None:
        """When the oldest event held only in memory got there (monotonic), if any."""
        with self._state:
            times = [f.since for f in self.flights if not f.stored]
            if self.fresh:
                times.append(self.fresh.oldest())
        return min(times) if times else None

    def spill(
        self,
        older_than: float | None = None,
        *,
        flights: bool = True,
        limit: int | None = None,
    ) -> int:
        """Store what this sink holds only in memory (or only what got there before
        ``older_than``, monotonic; at most ``limit`` waiting events) in the outbox. Batches in
        flight are stored leased to this process, so that nobody sends them twice; their
        outcome updates the rows. When the outbox refuses the write, everything stays in
        memory as it was (nothing is lost) and 0 is returned."""
        outbox = self.settings.outbox
        if outbox is None:
            return 0
        # _spill_lock, not _state, is held while writing: a slow disk (or another process's
        # write) holds up only a batch ending now, which must find its rows in place. Another
        # thread's spill may hold it while it waits for the outbox's lock on its own budget:
        # this one waits no longer than its own (a flush, a shutdown), and moves nothing.
        if not self._spill_lock.acquire(timeout=outbox.time_left()):
            return 0
        try:
            return self._spill_held(outbox, older_than, flights, limit)
        finally:
            self._spill_lock.release()

    def _spill_held(
        self, outbox: Outbox, older_than: float | None, flights: bool, limit: int | None
    ) -> int:
        with self._spill_then_state():
            if self._counted:  # shutdown counted what is left: it stays as counted
                return 0
            fresh = self.fresh
            waiting = fresh.take(len(fresh) if limit is None else limit, older_than)
            if waiting:
                if older_than is not None:
                    self.behind = True  # events went stale waiting for the sink
                self._room.notify_all()
            flying: list[Flight] = []
            for flight in self.flights if flights else ():
                if not flight.stored and (older_than is None or flight.since <= older_than):
                    flight.stored = True
                    flying.append(flight)
            if not waiting and not flying:
                return 0
            # Neither in memory nor in the outbox until the write ends: a flush waits.
            self._storing += 1
        events = waiting.events
        in_flight = [e for f in flying for e in f.events]
        with self._state:  # for a shutdown that counts what this process holds meanwhile
            self._moving = events + in_flight
        n, refused = 0, False  # written so far; the outbox refused the rest
        try:
            if events:
                outbox.add(events, [self.name])
                waiting = Taken()
                n = len(events)
            if in_flight:
                outbox.add(in_flight, [self.name], lease_seconds=self.settings.lease_seconds)
                n += len(in_flight)
        except Exception as exc:  # refused (or a defect in the write): the rest stays in memory
            with self._state:
                for flight in flying:
                    flight.stored = False
            self._requeue(waiting)
            self._refused(exc)
            refused = True
        finally:
            with self._state:
                self._storing -= 1
                self._moving = []
                counted = min(n, self._moving_counted)  # in the outbox: not lost after all
                self._moving_counted = 0
        if n:
            self._look_now = True
            self.settings.count_stored(n)
            self.settings.stored_after_all(counted)
            self.wake()
        return 0 if refused else n

    def discard(self) -> None:
        """Forget the events waiting in memory (consent was withdrawn)."""
        with self._state:
            self.fresh.clear()
            self._room.notify_all()

    # --- one batch ----------------------------------------------------------------------------

    def _deliver_fresh(self, flight: Flight) -> None:
        events = flight.events
        leased_at = time.monotonic()  # a spill stores the batch leased no earlier than this
        result, batch_error = self._send(events)
        retry, failed, ok = self._classify(events, {}, result)
        now = time.time()
        settings = self.settings
        keep = settings.keep_sent > 0
        outcomes: list[tuple[Event, str, float, str | None]] = [
            (events[i], "pending", next_at, reason) for i, next_at, reason in retry
        ]
        outcomes += [(events[i], "failed", 0.0, reason) for i, reason in failed]
        delivered: list[tuple[Event, str, float, str | None]] = [
            (events[i], "sent", 0.0, None) for i in ok
        ]
        ok_ids = [events[i].id for i in ok]
        outbox = settings.outbox
        assert outbox is not None
        name, receipt = self.name, result.receipt
        # The batch stays among the flights until its outcome is written: until then a flush or
        # the worker may still store it (leased), and nothing is left only in memory.
        with self._spill_then_state():  # a spill writing this batch has finished
            stored = flight.stored
        steps: list[Callable[[], None]] = []
        if stored and not keep:
            steps.append(lambda: outbox.forget(name, ok_ids))
        written = outcomes + (delivered if keep else [])
        if written:
            steps.append(lambda: outbox.settle(name, written, now=now, receipt=receipt))
        refused: StorageUnavailable | None = None
        try:
            _write_steps(steps)
        except StorageUnavailable as exc:
            refused = exc
        with self._spill_then_state():
            self.flights.discard(flight)
            late = flight.stored and not stored
            # Never stored: what is to be retried stays in memory, tried again from there after
            # the backoff or stored as soon as the outbox takes it. A batch stored (leased)
            # meanwhile is in the outbox: its outcome is written later, never sent twice.
            requeued = refused is not None and not flight.stored and bool(retry)
            if requeued:
                self.fresh.put_back(Taken.since(flight.since, [events[i] for i, _, _ in retry]))
        if refused is None and written and not stored and not late:
            settings.count_stored(len(retry) + len(failed))  # (a spill that stored it counted)
        if late:  # stored while its outcome was being written: the delivered rows go too
            if keep:
                steps.append(lambda: outbox.settle(name, delivered, now=now, receipt=receipt))
            else:
                steps.append(lambda: outbox.forget(name, ok_ids))
            if refused is None:
                try:
                    _write_steps(steps)
                except StorageUnavailable as exc:
                    refused = exc
        if refused is not None:
            if requeued:
                self.memory_retry_at = min(next_at for _, next_at, _ in retry)
            elif flight.stored:
                self._hold(steps, leased_at)
            self._refused(refused)
        if retry:
            self.outbox_due_at = min(self.outbox_due_at, time.monotonic() + 0.01)
        self._account(events, result, batch_error, len(ok), len(retry), failed, now)
        if self.breaker.failures and not self.memory_only:
            # The sink is failing: what waits in memory goes to the outbox and its backoff.
            self.settings.wake_storer()

    def _deliver(self, leased: list[tuple[int, int, Event]], leased_at: float) -> None:
        events = [e for _, _, e in leased]
        attempts = {i: a for i, (_, a, _) in enumerate(leased)}
        result, batch_error = self._send(events)
        retry, failed, ok = self._classify(events, attempts, result)
        now = time.time()
        outbox = self.settings.outbox
        assert outbox is not None
        keep, receipt = self.settings.keep_sent > 0, result.receipt
        sent = [leased[i][0] for i in ok]
        again = [(leased[i][0], next_at, reason) for i, next_at, reason in retry]
        refused = [(leased[i][0], reason) for i, reason in failed]
        steps: list[Callable[[], None]] = [
            lambda: outbox.delivered(sent, keep=keep, now=now, receipt=receipt),
            lambda: outbox.retry(again),
            lambda: outbox.failed(refused, now=now),
        ]
        try:
            _write_steps(steps)
        except StorageUnavailable as exc:  # the rows stay leased: written on a later turn
            self._hold(steps, leased_at)
            self._refused(exc)
        self._account(events, result, batch_error, len(ok), len(retry), failed, now)

    def _refused(self, exc: Exception) -> None:
        """The outbox refused (or failed in) one of this sink's writes."""
        self.refused_at = time.time()
        self.settings.storage_refused(exc)

    def _hold(self, steps: list[Callable[[], None]], leased_at: float) -> None:
        """Keep what the outbox refused of a stored batch's outcome, for :meth:`record_held`."""
        with self._state:
            self._unrecorded.append(Unrecorded(steps, leased_at + self.settings.lease_seconds))
        self._record_at = time.monotonic() + RECORD_RETRY

    def record_held(self) -> bool:
        """Write the outcomes the outbox refused before (the rows are leased to this process
        until then, hidden from a flush and from this sink); one whose lease has ended is
        forgotten, its rows due again. True when none is left."""
        if not self._record_lock.acquire(blocking=False):
            return False  # another of this runner's threads is writing them
        try:
            while True:
                now = time.monotonic()
                with self._state:
                    while self._unrecorded and self._unrecorded[0].expires <= now:
                        self._unrecorded.popleft()
                    if not self._unrecorded:
                        return True
                    head = self._unrecorded[0]
                try:
                    _write_steps(head.steps)
                except StorageUnavailable as exc:
                    self._record_at = time.monotonic() + RECORD_RETRY
                    self._refused(exc)
                    return False
                with self._state:
                    self._unrecorded.popleft()
                self._look_now = True  # rows to retry may be due now
                self.settings.progress()
        finally:
            self._record_lock.release()

    def _classify(
        self, events: Sequence[Event], attempts: dict[int, int], result: SendResult
    ) -> tuple[list[tuple[int, float, str]], list[tuple[int, str]], list[int]]:
        """Sort a batch's events (by index) into retry (when, why), failed (why) and ok."""
        now = time.time()
        policy = self.settings.backoff
        max_attempts = self.settings.max_attempts
        retry: list[tuple[int, float, str]] = []
        failed: list[tuple[int, str]] = []
        ok: list[int] = []
        seen: set[str] = set()
        for i, event in enumerate(events):
            if event.id in seen:
                continue
            seen.add(event.id)
            tried = attempts.get(i, 0)
            if event.id in result.failed:
                failed.append((i, result.failed[event.id]))
            elif event.id in result.retry:
                reason = result.retry[event.id]
                if max_attempts is not None and tried + 1 >= max_attempts:
                    failed.append((i, f"gave up after {tried + 1} attempts: {reason}"))
                else:
                    delay = policy.delay(
                        max(tried + 1, self.breaker.failures + 1), result.retry_after
                    )
                    retry.append((i, now + delay, reason))
            else:
                ok.append(i)
        return retry, failed, ok

    def _account(
        self,
        events: Sequence[Event],
        result: SendResult,
        batch_error: str | None,
        ok: int,
        retried: int,
        failed: list[tuple[int, str]],
        now: float,
    ) -> None:
        """Counters, breaker and log lines for one batch."""
        counters, log_once = self.settings.counters, self.settings.log_once
        with self._state:  # several threads may finish batches at once
            ids = {e.id for e in events}
            dropped = [i for i in result.dropped_by_destination if i in ids]
            # Events the destination accepted but said it dropped leave the outbox (resending would
            # not help) and count as dropped, not delivered.
            self.delivered += ok - len(dropped)
            self.retried += retried
            self.failed += len(failed)
            self.dropped_by_destination += len(dropped)
            if failed:
                counters.drop(f"refused:{self.name}", len(failed))
            if dropped:
                counters.drop(f"destination:{self.name}", len(dropped))
            if result.receipt:
                self.receipts.append(result.receipt)
                log.info("waypost: sink %r: receipt %s", self.name, result.receipt)
            if ok:
                self.last_success = now
            if retried or failed:
                sample = result.retry or result.failed
                reason = batch_error or next(iter(sample.values()), "failed")
                self.last_error, self.last_error_at = reason, now
            if retried and not ok:
                self.breaker.batch_failed(result.retry_after)
                self._room.notify_all()  # a worker waiting for room stores instead
                log_once(
                    f"retry:{self.name}",
                    "waypost: sink %r: %d events will be retried: %s",
                    self.name,
                    retried,
                    self.last_error,
                )
            elif ok:
                self.breaker.succeeded()
            if failed:
                log_once(
                    f"failed:{self.name}",
                    "waypost: sink %r refused %d events for good: %s",
                    self.name,
                    len(failed),
                    failed[0][1],
                )
        on_control = self.settings.on_control
        if result.control is not None and on_control is not None:
            try:
                on_control(self.name, result.control)
            except Exception as exc:  # the boundary: a control that cannot be kept is ignored
                log_once(f"control:{self.name}", "waypost: sink %r: control ignored: %s",
                         self.name, exc)  # fmt: skip

    def _send(self, events: Sequence[Event]) -> tuple[SendResult, str | None]:
        me = threading.get_ident()
        sending = self.sending[me] = Sending(time.monotonic(), len(events))
        try:
            result, reason, contract = call_send(self.sink, events)
        finally:
            self.sending.pop(me, None)
            if sending.hung and not any(s.hung for s in self.sending.values()):
                self.hung_error = None
        self.boundary_error = None if contract is None else str(contract)
        if contract is not None:
            self.settings.contract_error(contract)
        return result, reason

    def check_hung(self) -> None:
        """Called now and then by the storer: a ``send`` that has not returned in twice the
        sink's timeout (and a grace) is hung. Status says so, and a thread replaces it, so the
        sink's other events still go."""
        limit = 2 * float(getattr(self.sink.config, "timeout", 10.0)) + HUNG_GRACE
        now = time.monotonic()
        opening = self.opening_since
        if opening is not None and now - opening > limit and not self.open_error:
            self.open_error = f"open() hung: no answer for {now - opening:.0f} s"
        found = False
        for sending in list(self.sending.values()):
            if not sending.hung and now - sending.started > limit:
                sending.hung = found = True
                self.hung_error = (
                    f"send() hung: no answer for {now - sending.started:.0f} s "
                    f"(timeout {limit - HUNG_GRACE:g} s); another thread carries on"
                )
                self.settings.log_once(
                    f"hung:{self.name}", "waypost: sink %r: %s", self.name, self.hung_error,
                    level=logging.ERROR,
                )  # fmt: skip
        if found:
            self._add_threads(1)
            self.wake()

    def settled(self, deadline: float, since: float) -> bool:
        """Whether a flush that began at ``since`` has nothing more to wait for from this sink
        before ``deadline`` (both wall clock): nothing in memory or in flight, no outcome
        waiting to be written (its rows are leased until then), and no stored row of an event
        tracked before the flush falls due before the deadline (or the sink's circuit stays
        open past it). Events tracked since (by this process or another one
        sharing the outbox) are the next flush's business."""
        with self._state:
            if self.fresh or self.flights or self._busy or self._storing:
                return False
            turns = self._turns
            unrecorded = bool(self._unrecorded)
        # Wall clock, as the outbox's; a pause the destination asked for holds like a circuit.
        open_until = time.time() + max(self.breaker.remaining(), self.paused_for())
        if open_until > deadline or not self.alive:
            return True
        outbox = self.settings.outbox
        if outbox is None:
            return True
        # An outbox that takes no writes holds its rows back: once it refused one of this
        # sink's writes since the flush began (the sink tries at once when it has something
        # to write), not before: the trouble may be over since its last write failed.
        if outbox.health().memory_only and self.refused_at >= since:
            return True
        if unrecorded:  # rows leased to this process until their outcome is written
            return False
        try:
            due = outbox.next_due(self.name, tracked_before=since)
        except StorageUnavailable:
            return True
        with self._state:
            # A batch taken while the outbox was read is hidden from that read: look again.
            if self._turns != turns or self._busy:
                return False
        return due is None or max(due, open_until) > deadline

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.sink.type,
            "state": self.state,
            "delivered": self.delivered,
            "retried": self.retried,
            "failed": self.failed,
            "dropped_by_destination": self.dropped_by_destination,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "error": self.hung_error or self.boundary_error or self.open_error,
            "deprecated": self.sink.deprecated,
            "in_memory": self.in_memory(),
        }
