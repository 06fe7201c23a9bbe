"""What is stored at a caller's request (``durability: sync``, after SIGTERM, a scheduled job)
is built and written by the worker, never on the caller's thread, and the caller waits for it no
longer than its bound; what the outbox is slow to take is waited for, what it fails to take is
kept or counted, and what shutdown leaves in memory is counted, never built or sent after it.

Faults are real where they can be (a write lock held by another connection, a destination that
is down, hooks that block); a slow disk and a write that fails for another reason than the disk
are injected at the storage's seam, the only place they can be made to happen at will.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from faultkit import make, pending_rows, run_scenario, show, wait_until

import waypost
from waypost import processes
from waypost.testing import free_port

MARGIN = 2.0
"""Seconds a call may overrun its bound on a busy machine; real overruns are far larger."""


class Hooks:
    """A before_send hook that notes the thread it runs on, and holds events named ``block``
    until released."""

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.blocked = threading.Event()

    @waypost.hookimpl
    def waypost_before_send(self, event: waypost.Event) -> waypost.Event:
        self.threads.add(threading.current_thread().name)
        if event.name == "block":
            self.blocked.set()
            self.release.wait(30)
        return event


class Keeper(waypost.Sink):
    """Delivers at once, and notes what it was sent."""

    type = "keeper"
    delivered: list[str] = []

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        Keeper.delivered.extend(e.id for e in events)
        return waypost.SendResult.ok()


@pytest.fixture
def make_tel(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []
    counter = itertools.count()
    Keeper.delivered = []

    def factory(**section: Any) -> Any:
        plugins = section.pop("plugins", ())
        sink_classes = section.pop("sink_classes", [Keeper])
        section.setdefault("notice", {"enabled": False})
        section.setdefault("sinks", {"k": {"type": "keeper"}})
        tel = waypost.Telemetry(
            app="stores",
            data_dir=tmp_path / f"d{next(counter)}",
            env=clean_env,
            plugins=plugins,
            sink_classes=sink_classes,
            config={"telemetry": section},
        )
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.shutdown(2)


@contextlib.contextmanager
def sigterm_kept(tel: Any) -> Iterator[list[int]]:
    """SIGTERM sent to this process, whose own handler only notes it: waypost's, chained
    before it, keeps everything from then on."""
    noted: list[int] = []
    chained = processes._previous
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
    try:
        processes.install_sigterm(tel._process)  # over the host's handler, as at start
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(lambda: noted, 5), "the host's handler did not run"
        yield noted
    finally:
        processes.uninstall_sigterm(tel._process)
        signal.signal(signal.SIGTERM, previous)
        processes._previous = chained


def stored(tel: Any) -> int:
    return int(tel.status().counters.stored)


# --- stored at a caller's request, on the worker ----------------------------------------------


def test_durability_sync_stores_each_event_before_track_returns_with_hooks_on_the_worker(
    make_tel: Callable[..., Any],
) -> None:
    hooks = Hooks()
    tel = make_tel(plugins=[hooks], outbox={"durability": "sync"})
    caller = threading.current_thread().name
    for i in range(20):
        tel.track("sync_event", {"i": i})
        assert stored(tel) == i + 1, (i, tel.status().counters)
    assert hooks.threads and caller not in hooks.threads, hooks.threads
    assert tel.flush(10) is True
    assert len(Keeper.delivered) == 20


def test_durability_sync_waits_for_a_stuck_hook_no_longer_than_its_bound(
    make_tel: Callable[..., Any],
) -> None:
    hooks = Hooks()
    tel = make_tel(plugins=[hooks], outbox={"durability": "sync", "buffer": 20})
    try:
        started = time.monotonic()
        tel.track("block", {})
        first = time.monotonic() - started
        assert hooks.blocked.is_set()
        # The worker is stuck in the hook: later calls neither wait again nor grow the
        # buffer past its bound (five times outbox.buffer); past it they are counted.
        started = time.monotonic()
        for i in range(500):
            tel.track("after", {"i": i})
        rest = time.monotonic() - started
        st = tel.status()
    finally:
        hooks.release.set()
    figures = {"first": first, "rest": rest, "buffered": st.buffered,
               "dropped": st.counters.dropped}  # fmt: skip
    assert first < 2.0 + MARGIN, show(figures)
    assert rest < 2.0 + MARGIN, show(figures)  # one more wait for room, at most
    assert st.buffered <= 5 * 20, show(figures)
    assert st.counters.dropped.get("buffer_full", 0) == 500 - st.buffered, show(figures)


def test_a_scheduled_job_is_stored_by_the_worker_before_its_run_is_recorded(
    make_tel: Callable[..., Any],
) -> None:
    hooks = Hooks()
    tel = make_tel(plugins=[hooks])
    caller = threading.current_thread().name
    assert tel.send_heartbeat(force=True) is True
    assert stored(tel) == 1, tel.status().counters
    assert hooks.threads and caller not in hooks.threads, hooks.threads


def test_a_scheduled_job_is_stored_even_when_the_worker_takes_it_before_the_store_is_asked(
    make_tel: Callable[..., Any],
) -> None:
    # The worker's own drain (a batch due, a burst) may take the job's event between its append
    # and the wait for it to be stored: made to happen here, that drain must store it too.
    tel = make_tel()
    pipeline = tel.pipeline
    own_store_now = pipeline.store_now

    def taken_first(*args: Any, **kwargs: Any) -> bool:
        pipeline.wait_drained(pipeline.request_drain(), time.monotonic() + 5)
        assert not pipeline.buffer
        return bool(own_store_now(*args, **kwargs))

    pipeline.store_now = taken_first
    assert tel.send_heartbeat(force=True) is True
    assert stored(tel) == 1, tel.status().counters


def test_after_sigterm_each_event_is_stored_by_the_worker_and_the_buffer_stays_bounded(
    make_tel: Callable[..., Any],
) -> None:
    hooks = Hooks()
    tel = make_tel(plugins=[hooks], outbox={"buffer": 20}, batch={"interval": 60})
    caller = threading.current_thread().name
    for i in range(30):
        tel.track("before", {"i": i})
    with sigterm_kept(tel):
        for i in range(10):
            before = stored(tel)
            tel.track("after", {"i": i})
            assert stored(tel) == before + 1, tel.status().counters
        assert caller not in hooks.threads, hooks.threads
        # Now the worker sticks in a hook: the buffer is still bounded, as in a burst.
        try:
            tel.track("block", {})
            for i in range(500):
                tel.track("later", {"i": i})
            st = tel.status()
        finally:
            hooks.release.set()
    assert st.buffered <= 5 * 20, (st.buffered, st.counters.dropped)
    assert st.counters.dropped.get("buffer_full", 0) > 0, st.counters.dropped


def test_consent_back_after_sigterm_still_keeps_everything(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel(batch={"interval": 60}, mode="opt-in")
    tel.set_consent(True)
    with sigterm_kept(tel):
        tel.set_consent(False)
        tel.set_consent(True)
        tel.track("after", {})
        assert stored(tel) == 1, tel.status().counters


# --- shutdown -----------------------------------------------------------------------------------


def test_shutdown_counts_what_the_worker_holds_and_never_hands_it_on_after(
    make_tel: Callable[..., Any],
) -> None:
    hooks = Hooks()
    tel = make_tel(plugins=[hooks])
    data_dir = Path(tel.data_dir)
    worker = tel.pipeline.worker
    tel.track("block", {})
    for i in range(9):
        tel.track("held", {"i": i})
    assert hooks.blocked.wait(10)
    started = time.monotonic()
    ok = tel.shutdown(1.0)
    elapsed = time.monotonic() - started
    dropped = tel.status().counters.dropped
    hooks.release.set()
    worker.join(10)
    assert not worker.is_alive()
    assert ok is False and elapsed < 1.0 + MARGIN, (ok, elapsed)
    assert dropped.get("shutdown") == 10, dropped
    # Built after shutdown gave up on them: neither sent nor stored.
    assert Keeper.delivered == [] and pending_rows(data_dir) == 0, Keeper.delivered


# --- an outbox that is slow, or fails -----------------------------------------------------------


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}/ingest"


def slow_writes(tel: Any, seconds: float, count: int) -> list[int]:
    """Make the next ``count`` outbox writes each take ``seconds`` (a slow disk's fsync),
    holding the write transaction meanwhile; the list counts those made."""
    storage = tel.pipeline.outbox.storage
    original = storage.write
    made: list[int] = []

    @contextlib.contextmanager
    def write() -> Iterator[sqlite3.Connection]:
        with original() as db:
            if len(made) < count:
                made.append(1)
                time.sleep(seconds)
            yield db

    storage.write = write
    return made


def test_what_the_worker_stores_after_shutdown_counted_it_is_not_counted_lost(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel(outbox={"durability": "sync"})
    data_dir = Path(tel.data_dir)
    worker = tel.pipeline.worker
    assert wait_until(lambda: tel.status().storage.state == "ok", 10)
    made = slow_writes(tel, 4.0, 1)  # the worker's write of the event outlasts shutdown
    tel.track("slow", {})  # returns after its own bound, the write still under way
    ok = tel.shutdown(1.0)  # counts what the worker holds: it is writing it
    worker.join(15)
    for thread in threading.enumerate():  # then the outbox is closed
        if thread.name == "waypost-close-outbox":
            thread.join(10)
    st = tel.status()
    figures = {"shutdown": ok, "slow_writes": len(made), "stored": st.counters.stored,
               "dropped": st.counters.dropped, "pending": pending_rows(data_dir)}  # fmt: skip
    assert not worker.is_alive() and len(made) == 1, show(figures)
    # The write ended after shutdown had counted the event as lost: it is in the outbox (the
    # next start delivers it), so it is stored, and no longer counted as lost.
    assert figures["pending"] == 1 and st.counters.stored == 1, show(figures)
    assert st.counters.dropped == {}, show(figures)


def test_a_slow_but_working_outbox_is_waited_for_not_dropped(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    tel = make(down_url(), tmp_path / "d", outbox={"buffer": 20})
    try:
        assert wait_until(lambda: tel.status().storage.state == "ok", 10)
        made = slow_writes(tel, 3.0, 3)  # each longer than the 2 s a full buffer waits
        for i in range(200):
            tel.track("slow_disk", {"i": i})
            if i % 20 == 19:  # a chunk at a time: the sink's queue (20) fills, and waits
                assert wait_until(lambda: tel.status().buffered == 0, 30)
        ok = tel.flush(8)  # the sink is down: at the deadline, all is stored
        st = tel.status()
    finally:
        tel.shutdown(5)
    figures = {"flush": ok, "slow_writes": len(made), "dropped": st.counters.dropped,
               "pending": pending_rows(tmp_path / "d")}  # fmt: skip
    assert len(made) == 3, show(figures)
    assert st.counters.dropped == {}, show(figures)
    assert ok is True and figures["pending"] == 200, show(figures)


def failing_adds(tel: Any, fails: Callable[[Sequence[waypost.Event], Sequence[str]], bool]) -> None:
    """Make ``outbox.add`` fail, with an error that is not the disk's, when ``fails`` says."""
    outbox = tel.pipeline.outbox
    original = outbox.add

    def add(events: Sequence[waypost.Event], sinks: Sequence[str], **kw: Any) -> None:
        if fails(events, sinks):
            raise ValueError("a defect in writing these events")
        original(events, sinks, **kw)

    outbox.add = add


def test_what_the_storer_stores_for_a_sink_not_made_after_shutdown_counted_it_is_counted_once(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel(sinks={"k": {"type": "keeper"}, "gone": {"type": "no_such_plugin"}})
    data_dir = Path(tel.data_dir)
    storer, outbox = tel.pipeline.storer, tel.pipeline.outbox
    own_add = outbox.add
    writing = threading.Event()

    def slow_add(events: Any, sinks: Any) -> Any:
        if "gone" in sinks:  # the storer's write of what waits for the sink not made
            writing.set()
            time.sleep(3.0)
        return own_add(events, sinks)

    outbox.add = slow_add
    for i in range(5):
        tel.track("kept", {"i": i})
    assert writing.wait(10)
    ok = tel.shutdown(1.0)  # counts what waits in memory: the storer is writing it
    storer.join(15)
    for thread in threading.enumerate():  # then the outbox is closed
        if thread.name == "waypost-close-outbox":
            thread.join(10)
    st = tel.status()
    figures = {"shutdown": ok, "stored": st.counters.stored, "dropped": st.counters.dropped,
               "pending": pending_rows(data_dir)}  # fmt: skip
    assert not storer.is_alive(), show(figures)
    # The write ended after shutdown counted the events as lost; it went on with no more.
    assert figures["stored"] == figures["pending"], show(figures)
    assert figures["stored"] + sum(figures["dropped"].values()) == 5, show(figures)


class Holder(waypost.Sink):
    """Holds a batch with an event named ``block`` until released; delivers the rest."""

    type = "holder"
    sending = threading.Event()
    release = threading.Event()

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        if any(e.name == "block" for e in events):
            Holder.sending.set()
            Holder.release.wait(30)
        return waypost.SendResult.ok()


@pytest.fixture
def held(make_tel: Callable[..., Any]) -> Iterator[Any]:
    """A Telemetry whose one sink is a Holder, released at the end."""
    Holder.sending.clear()
    Holder.release.clear()
    yield make_tel(sink_classes=[Holder], batch={"interval": 0.2}, sinks={"h": {"type": "holder"}})
    Holder.release.set()


def spilled_behind_a_held_batch(tel: Any) -> None:
    """A batch the sink holds, then 50 events named ``spilled`` waiting behind it (the storer
    writes them, and the batch leased, once they have waited ``batch.interval``)."""
    tel.track("block", {})
    assert Holder.sending.wait(10)
    for i in range(50):
        tel.track("spilled", {"i": i})


def test_what_a_sink_spills_after_shutdown_counted_it_is_counted_once(held: Any) -> None:
    tel = held
    data_dir = Path(tel.data_dir)
    storer, outbox = tel.pipeline.storer, tel.pipeline.outbox
    own_add = outbox.add
    writing, go = threading.Event(), threading.Event()

    def held_add(events: Any, sinks: Any, **kw: Any) -> Any:
        if any(e.name == "spilled" for e in events) and not writing.is_set():
            writing.set()  # the storer's spill of what waits behind the held batch
            go.wait(15)
        return own_add(events, sinks, **kw)

    outbox.add = held_add
    try:
        spilled_behind_a_held_batch(tel)
        assert writing.wait(10)
        ok = tel.shutdown(1.0)  # counts what the sink holds: the spill is writing it
        counted = dict(tel.status().counters.dropped)
    finally:
        go.set()
        Holder.release.set()
    storer.join(15)
    for runner in tel.pipeline.runners:
        for thread in runner.threads:
            thread.join(15)
    for thread in threading.enumerate():  # then the outbox is closed
        if thread.name == "waypost-close-outbox":
            thread.join(10)
    st = tel.status()
    pending = pending_rows(data_dir)
    figures = {"shutdown": ok, "counted at shutdown": counted, "stored": st.counters.stored,
               "dropped": st.counters.dropped, "pending": pending}  # fmt: skip
    assert not storer.is_alive(), show(figures)
    # The spill ended after shutdown counted its events as lost: they are in the outbox (the
    # next start delivers them), so they are no longer counted as lost; nothing began after.
    assert pending is not None and pending + sum(st.counters.dropped.values()) == 50, show(figures)


def test_a_spill_whose_batch_in_flight_is_refused_counts_what_it_stored_before(held: Any) -> None:
    tel = held
    data_dir = Path(tel.data_dir)
    outbox = tel.pipeline.outbox
    own_add = outbox.add
    steps: list[str] = []  # "fresh" once the waiting events are written, then "refused"

    def add(events: Any, sinks: Any, **kw: Any) -> Any:
        if "lease_seconds" in kw and steps != ["fresh", "refused"]:
            if steps == ["fresh"]:  # right after the waiting events, in the same spill
                steps.append("refused")
            raise ValueError("a defect in writing the batch in flight")
        own_add(events, sinks, **kw)
        if any(e.name == "spilled" for e in events) and not steps:
            steps.append("fresh")

    outbox.add = add
    spilled_behind_a_held_batch(tel)
    assert wait_until(lambda: steps == ["fresh", "refused"], 15), steps
    # The 50 written before the batch in flight was refused are in the outbox: stored.
    assert wait_until(lambda: stored(tel) >= 50, 10), (stored(tel), pending_rows(data_dir))


def test_an_event_the_outbox_fails_on_never_stops_the_storer_for_a_sink_not_made(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel(sinks={"k": {"type": "keeper"}, "gone": {"type": "no_such_plugin"}})
    failing_adds(
        tel, lambda events, sinks: "gone" in sinks and any(e.name == "poison" for e in events)
    )
    tel.track("poison", {})
    assert wait_until(lambda: tel.status().counters.dropped.get("outbox_error") == 1, 10), (
        tel.status().counters
    )
    tel.track("fine", {})
    assert tel.flush(10) is False  # the poison event was lost, and said so
    gone = {s.name: s for s in tel.status().sinks}["gone"]
    assert gone.pending == 1 and gone.in_memory == 0, gone


class Holding(waypost.Sink):
    """Holds its first batch until released (a slow destination); delivers the others."""

    type = "holding"
    release = threading.Event()
    delivered: list[str] = []

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        if any(e.name == "block" for e in events):
            Holding.release.wait(30)
        Holding.delivered.extend(e.id for e in events)
        return waypost.SendResult.ok()


def test_a_spill_that_fails_for_another_reason_than_the_disk_keeps_the_events(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    Holding.release, Holding.delivered = threading.Event(), []
    tel = waypost.Telemetry(
        app="stores",
        data_dir=tmp_path / "d",
        env=clean_env,
        sink_classes=[Holding],
        config={"telemetry": {"notice": {"enabled": False}, "batch": {"interval": 0.2},
                              "sinks": {"h": {"type": "holding"}}}},
    )  # fmt: skip
    try:
        adds: list[int] = []
        failing_adds(tel, lambda events, sinks: not adds.append(len(events)) and len(adds) <= 5)
        tel.track("block", {})
        assert wait_until(lambda: tel.status().sinks[0].in_memory == 0, 10)  # in flight
        for i in range(30):  # wait in memory behind it, then are spilled: the writes fail
            tel.track("behind", {"i": i})
        assert wait_until(lambda: len(adds) > 5, 10), adds
        Holding.release.set()
        ok = tel.flush(10)
        st = tel.status()
    finally:
        Holding.release.set()
        tel.shutdown(5)
    assert ok is True and len(set(Holding.delivered)) == 31, (ok, adds, st.counters)
    assert st.counters.dropped == {}, st.counters.dropped


def test_durability_sync_delivers_from_memory_when_a_write_fails_for_another_reason(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel(outbox={"durability": "sync"})
    failing_adds(tel, lambda events, sinks: True)
    for i in range(5):
        tel.track("unstored", {"i": i})
    assert wait_until(lambda: len(Keeper.delivered) == 5, 10), Keeper.delivered
    assert tel.status().counters.dropped == {}


def test_status_shows_what_waits_in_memory_for_a_sink_not_made(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel(sinks={"k": {"type": "keeper"}, "gone": {"type": "no_such_plugin"}})
    path = Path(tel.data_dir) / "outbox.sqlite3"
    assert wait_until(path.exists, 10)
    holder = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as another process would hold it
        for i in range(5):
            tel.track("kept", {"i": i})

        def gone() -> Any:
            return {s.name: s for s in tel.status().sinks}["gone"]

        assert wait_until(lambda: gone().in_memory == 5, 10), gone()
        assert tel.status().pending()["gone"]["in_memory"] == 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert wait_until(lambda: gone().in_memory == 0 and gone().pending == 5, 15), gone()


def test_shutdown_beside_a_hung_send_puts_the_stored_rows_into_the_main_file(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    Holding.release, Holding.delivered = threading.Event(), []
    data = tmp_path / "d"
    tel = waypost.Telemetry(
        app="stores",
        data_dir=data,
        env=clean_env,
        sink_classes=[Holding],
        config={"telemetry": {"notice": {"enabled": False}, "batch": {"interval": 0.05},
                              "sinks": {"h": {"type": "holding"}}}},
    )  # fmt: skip
    try:
        tel.track("block", {})
        assert wait_until(lambda: tel.status().sinks[0].in_memory == 0, 10)  # in flight
        for i in range(49):
            tel.track("behind", {"i": i})
        assert tel.flush(2.0) is True  # stored: the send hangs
        assert tel.shutdown(1.0) is False  # the sink is still busy
        # The main file alone (a copy, a -wal lost) holds them.
        copy = tmp_path / "copy.sqlite3"
        copy.write_bytes((data / "outbox.sqlite3").read_bytes())
        with contextlib.closing(sqlite3.connect(copy)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            rows = (
                db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] if "outbox" in tables else 0
            )
    finally:
        Holding.release.set()
    assert rows == 50, rows


# --- status while shutdown closes the outbox --------------------------------------------------


def test_status_from_other_threads_while_shutdown_closes_the_outbox_never_crashes(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """Closing the outbox let go of every thread's connection at once, one a status() call was
    reading through: the process died of a segmentation fault."""
    figures = run_scenario(
        f"""
        import threading, time
        rounds = statuses = 0
        for n in range(12):
            tel = make({down_url()!r}, {str(tmp_path)!r} + f"/d{{n}}")
            for i in range(100):
                tel.track("closing", {{"i": i}})
            stop = threading.Event()
            counts = []
            def poll():
                while not stop.is_set():
                    tel.status()
                    counts.append(1)
            pollers = [threading.Thread(target=poll) for _ in range(2)]
            for poller in pollers:
                poller.start()
            time.sleep(0.05)
            tel.shutdown(2)
            time.sleep(0.05)
            stop.set()
            for poller in pollers:
                poller.join(10)
            rounds, statuses = rounds + 1, statuses + len(counts)
        report(rounds=rounds, statuses=statuses)
        """,
        clean_env,
        timeout=240,
    )
    assert figures.get("rounds") == 12 and figures["statuses"] > 0, show(figures)
