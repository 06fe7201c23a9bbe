"""Time budgets: ``flush(timeout)`` does all it can before its deadline (retries that fall due
are made within the call, ``Retry-After`` honoured) and never runs hooks, scrubbers or sinks on
the caller's thread, so it returns within its timeout whatever they do.

No speed is asserted here: a bound is the budget plus a generous margin (2 s), for a busy
machine. How fast things are belongs to ``bench/``.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from faultkit import make, show

import waypost
from waypost.testing import RecordingServer, Request, Response

MARGIN = 2.0
"""Seconds a call may overrun its budget on a busy machine; real overruns are far larger."""


def ids_of(requests: list[Request]) -> set[str]:
    return {e["id"] for r in requests if r.body and r.json() for e in r.json()}


def flaky(pattern: Sequence[Response | None]) -> Callable[[Request], Response]:
    """Answers by the request's place in a repeating pattern (None: 200 OK)."""
    counter = itertools.count()
    lock = threading.Lock()

    def respond(request: Request) -> Response:
        with lock:
            i = next(counter)
        answer = pattern[i % len(pattern)]
        return Response(200, {}) if answer is None else answer

    return respond


FAILURES = [
    Response(503, "busy", headers={"Retry-After": "1"}),
    None,
    Response(429, "slow down"),
    None,
    Response(reset=True),
    None,
    Response(500, "oops"),
    None,
]


class Recorder:
    """Hook implementations that note the thread they run on, and can be slowed."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.threads: set[str] = set()

    @waypost.hookimpl
    def waypost_before_send(self, event: waypost.Event) -> waypost.Event:
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        return event


class ThreadNotingSink(waypost.Sink):
    """A sink that notes the thread each ``send`` runs on (and delivers at once)."""

    type = "thread_noting"
    threads: set[str] = set()
    delivered: list[str] = []

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        ThreadNotingSink.threads.add(threading.current_thread().name)
        ThreadNotingSink.delivered.extend(e.id for e in events)
        return waypost.SendResult.ok()


@pytest.fixture
def make_tel(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []
    counter = itertools.count()

    def factory(**section: Any) -> Any:
        plugins = section.pop("plugins", ())
        sinks = section.pop("sinks")
        section.setdefault("notice", {"enabled": False})
        tel = waypost.Telemetry(
            app="budgets",
            data_dir=tmp_path / f"d{next(counter)}",
            env=clean_env,
            plugins=plugins,
            sink_classes=[ThreadNotingSink, FlushingSink],
            config={"telemetry": {**section, "sinks": sinks}},
        )
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.shutdown(2)


def test_flush_makes_the_retries_that_fall_due_before_its_deadline(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with RecordingServer(flaky(FAILURES)) as server:
        tel = make(
            server.url + "/ingest",
            tmp_path / "d",
            retry={"initial": 0.2, "maximum": 2.0},
            batch={"interval": 1.0},
        )
        try:
            for i in range(5_000):
                tel.track("flaky", {"i": i})
            started = time.monotonic()
            ok = tel.flush(timeout=60)
            elapsed = time.monotonic() - started
            delivered = len(ids_of(server.requests))
            st = tel.status()
        finally:
            tel.shutdown(5)
    figures = {"flush": ok, "seconds": round(elapsed, 2), "delivered": delivered,
               "pending": st.outbox_pending_events, "dropped": st.counters.dropped}  # fmt: skip
    # Every retry falls due within seconds, long before the deadline: all were made.
    assert ok is True and delivered == 5_000, show(figures)
    assert elapsed < 60, figures


def test_flush_leaves_stored_only_what_falls_due_after_its_deadline(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    pattern = [Response(503, "later", headers={"Retry-After": "30"})]
    with RecordingServer(flaky(pattern)) as server:
        tel = make(server.url + "/ingest", tmp_path / "d")
        try:
            for i in range(200):
                tel.track("later", {"i": i})
            started = time.monotonic()
            ok = tel.flush(timeout=3)
            elapsed = time.monotonic() - started
        finally:
            tel.shutdown(2)
    with sqlite3.connect(tmp_path / "d" / "outbox.sqlite3") as db:
        rows = db.execute(
            "SELECT COUNT(*), MIN(CASE WHEN attempts > 0 THEN next_at END) FROM outbox "
            "WHERE state = 'pending'"
        )
        count, first_retry = rows.fetchone()
    # The destination asked for 30 s: waiting for it would pass the deadline, so the events are
    # stored (True: safe); the ones it refused are due no sooner than it asked, and nothing
    # more was sent meanwhile.
    assert ok is True and count == 200, (ok, count)
    assert first_retry >= time.time() + 25 - (time.monotonic() - started), first_retry
    assert len(server.requests) == 1, len(server.requests)
    assert elapsed < 3 + MARGIN, elapsed


def test_slow_hooks_never_run_on_the_callers_thread_nor_stretch_flush(
    make_tel: Callable[..., Any],
) -> None:
    hooks = Recorder(delay=0.005)
    ThreadNotingSink.threads = set()
    tel = make_tel(plugins=[hooks], sinks={"t": {"type": "thread_noting"}})
    for i in range(1_000):  # five seconds of hook work
        tel.track("slow_hook", {"i": i})
    started = time.monotonic()
    ok = tel.flush(1.0)
    elapsed = time.monotonic() - started
    caller = threading.current_thread().name
    assert elapsed < 1.0 + MARGIN, elapsed
    assert ok is False  # most events are still before the hook: not yet safe
    assert caller not in hooks.threads, hooks.threads
    assert caller not in ThreadNotingSink.threads, ThreadNotingSink.threads
    started = time.monotonic()
    tel.shutdown(1.0)
    assert time.monotonic() - started < 1.0 + MARGIN
    assert caller not in hooks.threads, hooks.threads


def test_behind_slow_hooks_the_sinks_get_what_is_built_as_it_is_built(
    make_tel: Callable[..., Any],
) -> None:
    hooks = Recorder(delay=0.005)
    ThreadNotingSink.delivered = []
    tel = make_tel(plugins=[hooks], sinks={"t": {"type": "thread_noting"}})
    for i in range(400):  # two seconds of hook work, all buffered at once
        tel.track("slow_hook", {"i": i})
    tel.flush(1.0)
    delivered = len(ThreadNotingSink.delivered)
    tel.shutdown(5.0)
    # Built in slices the sinks get at once, not one chunk of 400 they get after two seconds.
    assert delivered > 0, delivered
    assert len(ThreadNotingSink.delivered) == 400, len(ThreadNotingSink.delivered)


def test_a_big_value_never_stretches_flush(make_tel: Callable[..., Any]) -> None:
    tel = make_tel(sinks={"t": {"type": "thread_noting"}})
    tel.track("big", {"blob": "a b c d " * (5 * 2**20 // 8)})  # 5 MiB of text to scan
    started = time.monotonic()
    tel.flush(1.0)
    assert time.monotonic() - started < 1.0 + MARGIN


@pytest.mark.http_sink  # delivers through the http sink plugin
def test_flush_and_shutdown_hold_their_budget_when_the_sink_hangs(
    make_tel: Callable[..., Any],
) -> None:
    with RecordingServer(lambda r: Response(hang=True)) as server:
        tel = make_tel(sinks={"h": {"type": "http", "url": server.url + "/ingest", "timeout": 60}})
        for i in range(100):
            tel.track("hung", {"i": i})
        started = time.monotonic()
        ok = tel.flush(1.0)
        flush_s = time.monotonic() - started
        started = time.monotonic()
        tel.shutdown(1.0)
        shutdown_s = time.monotonic() - started
    assert flush_s < 1.0 + MARGIN, flush_s
    assert ok is True  # in flight, and stored (leased) meanwhile: safe
    assert shutdown_s < 1.0 + MARGIN, shutdown_s


class CallsBack:
    """A hook that calls ``flush`` or ``shutdown`` of the Telemetry it runs in, and notes what
    the call returned and how long it took."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.tel: Any = None
        self.calls: list[tuple[bool, float]] = []

    @waypost.hookimpl
    def waypost_before_send(self, event: waypost.Event) -> waypost.Event:
        if event.name == "call_back" and self.tel is not None:
            started = time.monotonic()
            result = getattr(self.tel, self.method)(30.0)
            self.calls.append((result, time.monotonic() - started))
        return event


class FlushingSink(waypost.Sink):
    """A sink whose ``send`` calls its Telemetry's ``flush`` first."""

    type = "flushing"
    tel: Any = None
    calls: list[tuple[bool, float]] = []
    delivered: list[str] = []

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        started = time.monotonic()
        FlushingSink.calls.append((FlushingSink.tel.flush(30.0), time.monotonic() - started))
        FlushingSink.delivered.extend(e.id for e in events)
        return waypost.SendResult.ok()


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_flush_from_a_hook_returns_false_at_once_instead_of_waiting_for_itself(
    make_tel: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    hook = CallsBack("flush")
    tel = make_tel(plugins=[hook], sinks={"t": {"type": "thread_noting"}})
    hook.tel = tel
    ThreadNotingSink.delivered = []
    tel.track("call_back", {"i": 1})
    tel.track("call_back", {"i": 2})
    assert tel.flush(30.0) is True
    # Waiting for the worker it runs on would have taken the hook's whole 30 s budget, twice.
    assert [result for result, _ in hook.calls] == [False, False], hook.calls
    assert all(seconds < 30.0 / 2 for _, seconds in hook.calls), hook.calls
    assert len(ThreadNotingSink.delivered) == 2
    said = [r.getMessage() for r in caplog.records if "own thread" in r.getMessage()]
    assert len(said) == 1, said


def test_flush_from_a_sink_returns_false_at_once(make_tel: Callable[..., Any]) -> None:
    FlushingSink.calls, FlushingSink.delivered = [], []
    tel = make_tel(sinks={"f": {"type": "flushing"}})
    FlushingSink.tel = tel
    tel.track("sent", {"i": 1})
    assert tel.flush(30.0) is True
    assert len(FlushingSink.delivered) == 1
    assert [result for result, _ in FlushingSink.calls] == [False], FlushingSink.calls
    assert FlushingSink.calls[0][1] < 30.0 / 2, FlushingSink.calls


def test_shutdown_from_a_hook_shuts_down_off_the_worker_and_loses_nothing(
    make_tel: Callable[..., Any],
) -> None:
    hook = CallsBack("shutdown")
    tel = make_tel(plugins=[hook], sinks={"t": {"type": "thread_noting"}})
    hook.tel = tel
    ThreadNotingSink.delivered = []
    for i in range(20):
        tel.track("before", {"i": i})
    tel.track("call_back", {"i": 0})
    wait_for(lambda: len(hook.calls) == 1)
    # It could not join the thread it ran on: the shutdown went on beside it, and the event
    # that asked for it was sent rather than dropped as the hook's error.
    assert hook.calls[0][0] is False, hook.calls
    wait_for(lambda: len(ThreadNotingSink.delivered) == 21)
    assert tel.shutdown(10.0) is True  # a second call waits for the first and tells its result
    assert tel.status().counters.dropped == {}
    tel.track("after", {"i": 0})  # off now: not accepted
    assert len(ThreadNotingSink.delivered) == 21


def test_a_second_shutdown_waits_for_the_first(make_tel: Callable[..., Any]) -> None:
    hooks = Recorder(delay=0.005)
    ThreadNotingSink.delivered = []
    tel = make_tel(plugins=[hooks], sinks={"t": {"type": "thread_noting"}})
    for i in range(200):  # a second of hook work
        tel.track("slow_hook", {"i": i})
    first: list[bool] = []
    thread = threading.Thread(target=lambda: first.append(tel.shutdown(30.0)))
    thread.start()
    wait_for(lambda: tel._closed)
    # Before, the second call returned True at once while the first was still delivering
    # (an exit then cut it short).
    assert tel.shutdown(30.0) is True
    assert len(ThreadNotingSink.delivered) == 200
    thread.join(30)
    assert first == [True]
