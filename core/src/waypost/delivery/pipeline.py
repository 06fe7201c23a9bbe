"""The delivery pipeline: buffer -> worker (gate, envelope, outbox) -> one delivery thread per
sink instance, each inside its own error boundary, with retries and a circuit breaker."""

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
from waypost.delivery.runner import Runner, Settings
from waypost.errors import SinkContractError
from waypost.events import Event, coerce, dumps
from waypost.logs import get_logger
from waypost.sinks import Sink, SinkConfig
from waypost.status import Counters, LogOnce

log = get_logger(__name__)

Item = tuple[Any, Any, float, "str | None", "str | None"]
"""What ``track`` buffers: (name or payload, properties, unix time, level, distinct id)."""


LINGER = 0.05
"""Seconds the worker waits between drains while a burst goes on."""
STALL = 2.0
"""Seconds ``track`` waits for room in a full buffer before it drops instead."""


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
        self.retention = retention
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
            on_control=on_control,
            paused_for=paused_for,
        )
        self.runners = [Runner(sink, settings) for sink in sinks]
        self._contract_errors: list[SinkContractError] = []
        self._reset_sync()

    def _reset_sync(self) -> None:
        self.buffer: deque[Item] = deque()
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = False
        self.worker: threading.Thread | None = None
        self.last_housekeeping = 0.0
        self._linger = False
        self._room = threading.Condition()
        self._stalled = False
        self._stored_lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.worker = threading.Thread(target=self._work, name="waypost-worker", daemon=True)
        self.worker.start()
        if not self.debug:
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
        held in memory now is stored: the process may end at any moment (SIGTERM came)."""
        self.sync = True
        self.interval = min(self.interval, LINGER)
        self.drain(store=True)
        self.spill()

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
        """Called by ``track`` when the buffer reached a batch, or is full."""
        buffer = self.buffer
        if len(buffer) < self.buffer_size:
            self.wake.set()
            return
        # The host outruns the worker: never grow, hold the caller back until the worker takes
        # its next chunk (a few milliseconds). The caller never runs the worker's code (hooks,
        # sinks); should the worker be stuck, after STALL seconds it drops (counted) instead.
        self.wake.set()
        if not self._stalled:
            with self._room:
                room = self._room.wait_for(lambda: len(buffer) < self.buffer_size, timeout=STALL)
            if room:
                return
            self._stalled = True
        if len(buffer) >= self.buffer_size:
            try:
                buffer.pop()
            except IndexError:
                return
            self.counters.drop("buffer_full")
            self.log_once(
                "buffer-full",
                "waypost: the worker has taken nothing for %g s; events are dropped while the "
                "buffer (outbox.buffer = %d) is full",
                STALL,
                self.buffer_size,
                level=logging.ERROR,
            )

    def count_stored(self, n: int) -> None:
        with self._stored_lock:
            self.counters.stored += n

    def _work(self) -> None:
        while True:
            self.wake.wait(self._next_wait())
            self.wake.clear()
            try:
                self.drain()
                self.spill_stale()
                now = time.monotonic()
                if now - self.last_housekeeping > 60:
                    self.last_housekeeping = now
                    self.retention()
            except Exception as exc:
                self.log_once(
                    f"worker:{type(exc).__name__}",
                    "waypost: worker error %s: %s",
                    type(exc).__name__,
                    exc,
                    level=logging.ERROR,
                )
                time.sleep(0.5)
            if self.stopping and not self.buffer:
                return

    def _next_wait(self) -> float:
        """Until the next drain: ``batch.interval``; sooner while a burst goes on (the last
        drain took a full batch), and when events in memory are due to be stored; not at all
        when a batch is already buffered."""
        if len(self.buffer) >= self.wake_at:
            return 0.0
        wait = min(self.interval, LINGER) if self._linger else self.interval
        oldest = [t for t in (r.oldest_in_memory() for r in self.runners) if t is not None]
        if oldest:
            wait = min(wait, max(0.01, min(oldest) + self.interval - time.monotonic()))
        return wait

    def spill_stale(self) -> None:
        """Store what has waited in memory for ``batch.interval``: a slow or stuck sink never
        holds more than that much at risk of a crash."""
        older_than = time.monotonic() - self.interval
        for runner in self.runners:
            runner.spill(older_than)

    def spill(self) -> bool:
        """Store everything held in memory for the sinks; False if the outbox refused it.
        Each sink's own lock guards its queue: this never waits for a drain."""
        for runner in self.runners:
            runner.spill()
        return not any(runner.in_memory() for runner in self.runners)

    def drain(self, *, store: bool = False) -> bool:
        """Build everything buffered and hand it to the sinks' threads, or (``store``, a sink
        behind, or ``durability: sync``) write it to the outbox; in debug mode, print it."""
        with self.lock:
            buffer = self.buffer
            moved = 0
            # What is buffered now, not what a busy host adds meanwhile: the worker gets back to
            # its other duties (storing what waited too long in memory) between drains.
            left = len(buffer)
            while left > 0 and buffer:
                items: list[Item] = []
                pop = buffer.popleft
                try:
                    for _ in range(min(left, 1000)):  # small enough that sinks start on it soon
                        items.append(pop())
                except IndexError:
                    pass
                left -= len(items)
                with self._room:  # a caller held back by a full buffer may go on
                    self._stalled = False
                    self._room.notify_all()
                moved += len(items)
                self.counters.accepted += len(items)
                events = self.build(items)
                if not events:
                    continue
                if self.debug:
                    self._print_debug(events)
                    continue
                assert self.outbox is not None
                try:
                    self._dispatch(events, store=store)
                except Exception as exc:
                    self.counters.drop("outbox_error", len(events))
                    self.log_once(
                        "outbox-write",
                        "waypost: cannot write the outbox (%s): %d events lost",
                        exc,
                        len(events),
                        level=logging.ERROR,
                    )
            self._linger = moved >= self.wake_at
        return True

    def _dispatch(self, events: list[Event], *, store: bool) -> None:
        """Hand events to each sink that takes them: in memory to a healthy sink, else to the
        outbox (one row per sink instance), in one transaction."""
        assert self.outbox is not None
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
            if not targets and not keep:
                self.counters.drop("no_sink", len(group))
                continue
            deadline = time.monotonic() + min(self.interval, LINGER)
            stored = [r.name for r in targets if store or self.sync or not r.takes_fresh(deadline)]
            stored += keep
            if stored:
                self.outbox.add(group, stored)
                self.count_stored(len(group))
                for runner in targets:
                    if runner.name in stored:
                        runner.outbox_written()
            for runner in targets:
                if runner.name not in stored:
                    runner.offer(group, now)

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
        """Hand everything buffered to the sinks and wait (until ``timeout``) for them to send
        it; what is still in memory then is stored. True when nothing is left only in memory."""
        deadline = time.monotonic() + max(0.0, timeout)
        if not self._acquire(deadline):
            return False
        try:
            self.drain()  # everything buffered before this call (the host may add more)
        finally:
            self.lock.release()
        if self.debug:
            return True
        tickets = [(r, r.request_pass()) for r in self.runners if r.threads]
        for runner, ticket in tickets:
            runner.wait_pass(ticket, deadline)
        return self.spill()

    def _acquire(self, deadline: float) -> bool:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self.lock.acquire(blocking=False)
            if self.lock.acquire(timeout=min(left, 0.1)):
                return True

    def force_due(self) -> None:
        """Make every pending row due now and close open circuits ("submit now")."""
        if self.outbox is not None:
            self.outbox.retry_now([r.name for r in self.runners])
        for runner in self.runners:
            runner.force_due()

    def shutdown(self, timeout: float, *, flush: bool = True) -> bool:
        """Stop the threads within ``timeout``; with ``flush``, deliver what can be first."""
        deadline = time.monotonic() + max(0.0, timeout)
        if flush:
            ok = self.flush(max(0.0, timeout * 0.9))
        else:
            ok = True
            for runner in self.runners:
                runner.discard()
        self.stopping = True
        self.wake.set()
        for runner in self.runners:
            runner.halt()
        if self.worker is not None:
            self.worker.join(max(0.0, deadline - time.monotonic()))
        stuck = False
        for runner in self.runners:
            for thread in runner.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if runner.alive:
                stuck = True
                log.warning(
                    "waypost: sink %r still busy at shutdown; its events stay in the outbox",
                    runner.name,
                )
                continue
            try:
                if runner.opened:
                    runner.sink.close()
            except Exception as exc:
                log.warning("waypost: sink %r failed to close: %s", runner.name, exc)
        if self.outbox is not None and not stuck:
            self.outbox.close()
        return ok and not stuck
