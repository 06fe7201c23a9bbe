"""Delivery against a real local HTTP peer that fails on purpose."""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import waypost
import waypost.errors
from waypost.delivery.pipeline import HOLD
from waypost.delivery.waiting import Taken, Waiting
from waypost.events import remarks_of
from waypost.testing import RecordingServer, Request, Response, free_port


def ids_of(requests: list[Request]) -> list[str]:
    return [e["id"] for r in requests if r.body for e in r.json()]


def url_sink(url: str, **extra: Any) -> dict[str, Any]:
    return {"dest": {"type": "urltest", "url": f"{url}/ingest", **extra}}


def test_burst_to_a_healthy_server_arrives_exactly_once(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    tel = make_telemetry(sinks=url_sink(recording_server.url))
    for i in range(5000):
        tel.track("burst", {"i": i, "a": "x", "b": 1.5, "c": True, "d": None})
    assert tel.flush(timeout=60)
    ids = ids_of(recording_server.requests)
    assert len(ids) == 5000 and len(set(ids)) == 5000
    st = tel.status()
    assert st.counters.accepted == 5000 and st.sinks[0].delivered == 5000
    assert st.outbox_pending_events == 0
    assert max(len(r.json()) for r in recording_server.requests) <= 100  # the sink's max batch


def pending_rows(tel: Any) -> dict[str, int]:
    return {state: n for state, n in tel.open_outbox().counts().get("dest", {}).items()}


def test_a_healthy_sink_sends_from_memory_and_writes_nothing(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    # What is stored has a cause: a failed attempt, an event that waited batch.interval in
    # memory, a flush whose time ran out. None of them can happen here, however busy the
    # machine: an hour's interval, a request timeout far past any scheduling delay, and a flush
    # that ends as soon as all is delivered, long before its timeout.
    tel = make_telemetry(
        sinks=url_sink(recording_server.url, timeout=300), config={"batch": {"interval": 3600}}
    )
    for i in range(1000):
        tel.track("fast", {"i": i})
    assert tel.flush(timeout=600)
    st = tel.status()
    assert st.sinks[0].retried == 0 and st.sinks[0].failed == 0, st.sinks[0]
    assert st.sinks[0].delivered == 1000 and st.sinks[0].in_memory == 0
    assert st.counters.stored == 0 and pending_rows(tel) == {}
    assert len(set(ids_of(recording_server.requests))) == 1000


def test_delivered_events_are_kept_for_inspection_when_asked(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    tel = make_telemetry(
        sinks=url_sink(recording_server.url), config={"outbox": {"keep_sent": "1h"}}
    )
    for i in range(150):
        tel.track("kept", {"i": i})
    assert tel.flush(timeout=30)
    records, total = tel.open_outbox().records(state="sent", limit=200)
    assert total == 150 and {r.properties["i"] for r in records} == set(range(150))
    assert pending_rows(tel) == {"sent": 150}


def test_a_slow_answer_is_stored_while_in_flight_and_forgotten_once_delivered(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    # Slower than batch.interval (0.05 s): the batch is stored while its request is out. A
    # request timeout no busy machine reaches: a timed-out request would be sent again.
    recording_server.responder = lambda r: Response(200, {}, delay=0.6)
    tel = make_telemetry(sinks=url_sink(recording_server.url, timeout=300))
    for i in range(250):
        tel.track("slow", {"i": i})
    assert tel.flush(timeout=600)
    st = tel.status()
    assert st.sinks[0].delivered == 250 and st.counters.stored > 0
    assert pending_rows(tel) == {}
    counts = collections.Counter(ids_of(recording_server.requests))
    assert len(counts) == 250 and set(counts.values()) == {1}


def test_flaky_server_loses_nothing(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    recording_server.answer(
        Response(503, "busy", headers={"Retry-After": "0"}),
        Response(429, "slow down", headers={"Retry-After": "0"}),
        Response(reset=True),
        Response(502),
        Response(200, {}, delay=2.0),  # slower than the sink's timeout: retried
        Response(500),
    )
    tel = make_telemetry(sinks=url_sink(recording_server.url, timeout=0.5))
    for i in range(1000):
        tel.track("flaky", {"i": i})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tel.flush(timeout=5)
        if tel.status().outbox_pending_events == 0:
            break
    ok = [r for r in recording_server.requests]
    received = set(ids_of(ok))
    assert tel.status().outbox_pending_events == 0
    assert len(received) == 1000
    st = tel.status().sinks[0]
    assert st.retried > 0 and st.delivered == 1000 and st.failed == 0


def test_connection_refused_then_the_server_comes_up(urlsink: str, make_telemetry: Any) -> None:
    port = free_port()
    tel = make_telemetry(sinks=url_sink(f"http://127.0.0.1:{port}"))
    for i in range(50):
        tel.track("later", {"i": i})
    assert tel.flush(timeout=5)  # stored safely, not delivered
    st = tel.status()
    assert st.outbox_pending_events == 50 and st.sinks[0].delivered == 0
    assert "connection failed" in (st.sinks[0].last_error or "")
    with RecordingServer(port=port) as server:
        assert server.wait_for(lambda reqs: len(set(ids_of(reqs))) == 50, timeout=30)
    assert len(set(ids_of(server.requests))) == 50


def test_retry_after_is_honoured(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    recording_server.answer(Response(503, headers={"Retry-After": "2"}))
    tel = make_telemetry(sinks=url_sink(recording_server.url))
    tel.track("once")
    assert recording_server.wait_for(lambda reqs: len(reqs) >= 2, timeout=20)
    first, second = recording_server.requests[:2]
    assert second.at - first.at >= 1.9


def test_retry_after_as_http_date(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    from email.utils import formatdate

    recording_server.answer(
        Response(429, headers={"Retry-After": formatdate(time.time() + 3, usegmt=True)})
    )
    tel = make_telemetry(sinks=url_sink(recording_server.url))
    tel.track("once")
    assert recording_server.wait_for(lambda reqs: len(reqs) >= 2, timeout=20)
    first, second = recording_server.requests[:2]
    assert second.at - first.at >= 1.5


def test_permanent_error_is_not_retried_and_is_recorded(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    recording_server.responder = lambda r: Response(400, {"error": "bad event"})
    tel = make_telemetry(
        sinks=url_sink(recording_server.url), config={"outbox": {"keep_sent": "1h"}}
    )
    for i in range(5):
        tel.track("refused", {"i": i})
    tel.flush(timeout=10)
    time.sleep(0.5)
    tel.flush(timeout=5)
    assert len(recording_server.requests) == 1
    st = tel.status()
    assert st.sinks[0].failed == 5 and st.counters.dropped == {"refused:dest": 5}
    assert "HTTP 400" in (st.sinks[0].last_error or "")
    records, total = tel.open_outbox().records(state="failed")
    assert total == 5 and all("bad event" in (r.last_error or "") for r in records)


def test_too_large_batches_are_split(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    def limit(request: Request) -> Response:
        return Response(413, "too large") if len(request.json()) > 10 else Response(200, {})

    recording_server.responder = limit
    tel = make_telemetry(sinks=url_sink(recording_server.url))
    for i in range(100):
        tel.track("big", {"i": i})
    assert tel.flush(timeout=30)
    delivered = [r for r in recording_server.requests if len(r.json()) <= 10]
    assert sorted(ids_of(delivered)) == sorted(set(ids_of(delivered)))
    assert len(set(ids_of(delivered))) == 100


def test_one_event_too_large_is_refused_alone(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    def limit(request: Request) -> Response:
        big = any(len(json.dumps(e)) > 5000 for e in request.json())
        return Response(413) if big else Response(200, {})

    recording_server.responder = limit
    tel = make_telemetry(sinks=url_sink(recording_server.url))
    tel.track("small", {"x": 1})
    tel.track("huge", {"x": "y" * 10_000})
    tel.track("small", {"x": 2})
    tel.flush(timeout=10)
    st = tel.status().sinks[0]
    assert st.delivered == 2 and st.failed == 1
    assert "too large" in (st.last_error or "")


def test_shutdown_returns_in_time_against_a_hanging_server(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any, tmp_path: Any
) -> None:
    recording_server.responder = lambda r: Response(hang=True)
    data_dir = tmp_path / "hang"
    tel = make_telemetry(sinks=url_sink(recording_server.url, timeout=60), data_dir=data_dir)
    for i in range(20):
        tel.track("stuck", {"i": i})
    assert recording_server.wait_for(lambda reqs: True, timeout=1) or True
    started = time.monotonic()
    tel.shutdown(timeout=2)
    assert time.monotonic() - started < 3.0
    # What was not delivered is still in the outbox for the next run.
    later = make_telemetry(sinks=url_sink(recording_server.url), data_dir=data_dir, start=False)
    assert later.status().outbox_pending_events == 20


def test_overflow_spills_to_the_outbox_instead_of_dropping(
    urlsink: str, make_telemetry: Any
) -> None:
    tel = make_telemetry(
        sinks=url_sink(f"http://127.0.0.1:{free_port()}"),
        config={"outbox": {"buffer": 100}, "batch": {"interval": 30, "size": 100_000}},
    )
    for i in range(5000):
        tel.track("spill", {"i": i})
    # The buffer in front of the worker holds at most HOLD times outbox.buffer.
    assert tel.status().buffered <= HOLD * 100
    assert tel.flush(timeout=10)
    st = tel.status()
    assert st.counters.accepted == 5000 and st.counters.stored == 5000
    assert st.outbox_pending_events == 5000 and not st.counters.dropped


def test_one_failing_sink_never_delays_another(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any, tmp_path: Any
) -> None:
    hanging = RecordingServer(lambda r: Response(hang=True)).start()
    try:
        out = tmp_path / "fast.jsonl"
        tel = make_telemetry(
            sinks={
                "slow": {"type": "urltest", "url": f"{hanging.url}/x", "timeout": 30},
                "fast": {"type": "urltest", "url": f"{recording_server.url}/x"},
                "file": {"type": "jsonl", "path": str(out)},
            }
        )
        for i in range(200):
            tel.track("iso", {"i": i})
        assert recording_server.wait_for(lambda reqs: len(set(ids_of(reqs))) == 200, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            not out.exists() or out.read_text().count("\n") < 200
        ):
            time.sleep(0.05)
        assert out.read_text().count("\n") == 200
        tel.shutdown(timeout=1)
    finally:
        hanging.stop()


class Garbage(waypost.Sink):
    type = "garbage"

    def send(self, events: Any) -> Any:
        return "ok!"


def test_a_sink_returning_garbage_is_a_clear_error(make_telemetry: Any, caplog: Any) -> None:
    strict = make_telemetry(sinks={"g": {"type": "garbage"}}, sink_classes=[Garbage])
    strict.track("x")
    with pytest.raises(waypost.errors.SinkContractError, match="returned 'ok!' from send"):
        strict.flush(timeout=5)
    loose = make_telemetry(sinks={"g": {"type": "garbage"}}, sink_classes=[Garbage], strict=False)
    loose.track("x")
    assert loose.flush(timeout=5)  # kept in the outbox, retried later
    st = loose.status()
    assert st.outbox_pending_events == 1 and "expected a waypost.SendResult" in (
        st.sinks[0].last_error or ""
    )
    assert "expected a waypost.SendResult" in caplog.text


def test_duplicate_ids_only_after_timeouts(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    tel = make_telemetry(sinks=url_sink(recording_server.url))
    for i in range(300):
        tel.track("dedup", {"i": i})
    assert tel.flush(timeout=20)
    counts = collections.Counter(ids_of(recording_server.requests))
    assert set(counts.values()) == {1}


def test_events_are_routed_per_sink_instance(make_telemetry: Any, tmp_path: Any) -> None:
    pages, pings = tmp_path / "pages.jsonl", tmp_path / "pings.jsonl"
    tel = make_telemetry(
        sinks={
            "frontend": {"type": "jsonl", "path": str(pages), "events": ["$pageview", "page_*"]},
            "ping": {
                "type": "jsonl",
                "path": str(pings),
                "exclude_events": ["$pageview", "page_*"],
            },
        }
    )
    for name in ("$pageview", "page_leave", "heartbeat", "run"):
        tel.track(name)
    assert tel.flush(5)
    read = lambda p: [json.loads(x)["name"] for x in p.read_text().splitlines()]  # noqa: E731
    assert read(pages) == ["$pageview", "page_leave"]
    assert read(pings) == ["heartbeat", "run"]


class GatePlugin:
    """A ``waypost_before_send`` hook that holds the worker until the gate opens."""

    def __init__(self) -> None:
        import threading

        self.gate = threading.Event()
        self.entered = threading.Event()

    @waypost.hookimpl
    def waypost_before_send(self, event: Any) -> None:
        self.entered.set()
        self.gate.wait(30)


def test_a_stuck_worker_holds_track_back_for_a_bounded_time_then_drops_counted(
    make_telemetry: Any, tmp_path: Any
) -> None:
    from waypost.delivery import pipeline

    plugin = GatePlugin()
    tel = make_telemetry(
        sinks={"jsonl": {"path": str(tmp_path / "out.jsonl")}},
        plugins=[plugin],
        strict=False,
        config={"outbox": {"buffer": 50}, "batch": {"size": 10}},
    )
    held = pipeline.HOLD * 50  # what the buffer holds before track waits
    try:
        tel.track("held", {"i": -1})
        assert plugin.entered.wait(10)  # the worker is inside the hook, stuck
        # A burst of HOLD times outbox.buffer waits in the buffer: nothing dropped, no wait.
        for i in range(held - 1):
            tel.track("held", {"i": i})
        assert tel.status().counters.dropped == {}
        started = time.monotonic()
        for i in range(held - 1, held + 149):
            tel.track("held", {"i": i})
        took = time.monotonic() - started
        # Past that, one wait of STALL seconds, then drops without waiting.
        assert pipeline.STALL <= took < pipeline.STALL + 3
        dropped = tel.status().counters.dropped.get("buffer_full", 0)
        assert 0 < dropped <= 150
    finally:
        plugin.gate.set()
    # Events were lost since the last flush: it says so once; the next one finds all safe.
    assert tel.flush(timeout=10) is False
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) + dropped == held + 150
    assert tel.flush(timeout=10) is True


def test_a_sink_runs_one_thread_when_idle_and_more_under_a_burst(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    import threading

    def threads() -> int:
        return sum(t.name == "waypost-sink-dest" for t in threading.enumerate())

    recording_server.responder = lambda r: Response(200, {}, delay=0.2)
    tel = make_telemetry(sinks=url_sink(recording_server.url, concurrency=3))
    tel.track("one")
    assert tel.flush(timeout=10)
    assert threads() == 1
    for i in range(1000):  # ten batches of the sink's 100
        tel.track("burst", {"i": i})
    assert tel.flush(timeout=30)
    assert threads() == 3
    assert len(set(ids_of(recording_server.requests))) == 1001


def test_a_host_that_never_pauses_still_gets_a_slow_sink_events_stored_in_time(
    urlsink: str, recording_server: RecordingServer, make_telemetry: Any
) -> None:
    import threading

    # The sink is stuck on its answers and the host never pauses: what waits in memory (in
    # flight or queued) is still stored, oldest first, by the storer (batch.interval is
    # 0.05 s). No timing is asserted: the oldest event held only in memory must move on,
    # again and again, while nothing can be delivered.
    release = threading.Event()

    def stuck(request: Request) -> Response:
        release.wait(120)
        return Response(200, {})

    recording_server.responder = stuck
    tel = make_telemetry(sinks=url_sink(recording_server.url, timeout=120), strict=False)
    runner = tel.pipeline.runners[0]
    stop = threading.Event()
    tracked = 0

    def host() -> None:
        nonlocal tracked
        while not stop.is_set():
            tel.track("steady", {"i": tracked})
            tracked += 1

    def oldest() -> float:
        since = runner.oldest_in_memory()
        return float("inf") if since is None else since

    thread = threading.Thread(target=host)
    thread.start()
    try:
        # A batch under way (from memory, or leased from the outbox once stored).
        assert wait_until(lambda: bool(runner.sending)), "no batch went out"
        moves = []
        for _ in range(3):
            assert wait_until(lambda: oldest() < float("inf")), "nothing in memory"
            before = oldest()
            moved = wait_until(lambda b=before: oldest() > b)
            moves.append((before, oldest()))
            assert moved, ("the oldest event held only in memory was never stored", moves)
        assert not recording_server.requests  # nothing was answered: all of that was storing
    finally:
        stop.set()
        release.set()
        thread.join()
    assert tel.status().counters.stored > 0 and tracked > 0


def wait_until(predicate: Any, timeout: float = 60.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds (generous: a busy machine)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_flush_on_a_healthy_sink_returns_once_stored_events_arrived(
    urlsink: str, waypost_make_telemetry: Any, tmp_path: Any
) -> None:
    """A row the sink's thread has just leased is hidden from every reader of the outbox, so
    the flush must count it in flight from the moment it is taken: True on a healthy sink then
    means the stored events arrived, not that they were out of sight for an instant."""
    # Stored by a run whose sink could not be made (its plugin not installed): rows nobody
    # has leased, as a run that has ended leaves them.
    missing = {"dest": {"type": "urltest_not_installed", "url": "http://127.0.0.1:9/x"}}
    switching = sys.getswitchinterval()
    with RecordingServer() as server:
        up = {"dest": {"type": "urltest", "url": f"{server.url}/x"}}
        for round_ in range(8):
            data_dir = tmp_path / f"round-{round_}"
            first = waypost_make_telemetry(sinks=missing, data_dir=data_dir, strict=False)
            for i in range(150):
                first.track("held", {"round": round_, "i": i})
            first.shutdown(timeout=5)
            assert first.status().outbox_pending_events == 150  # stored, none delivered
            second = waypost_make_telemetry(sinks=up, data_dir=data_dir)
            sys.setswitchinterval(1e-5)  # threads switch often: the gaps between steps show
            try:
                assert second.flush(timeout=30)
                arrived = {
                    e["properties"]["i"]
                    for r in server.requests
                    for e in r.json()
                    if e["properties"]["round"] == round_
                }
            finally:
                sys.setswitchinterval(switching)
            assert len(arrived) == 150, f"round {round_}: {len(arrived)} of 150 had arrived"
            second.shutdown(timeout=5)


def test_accepted_never_dips_while_the_worker_takes_a_chunk(
    make_telemetry: Any, tmp_path: Any
) -> None:
    import threading

    # status() reads what the worker has taken and what is buffered together: an event on its
    # way from the buffer to the worker is counted once, never missing from both.
    tel = make_telemetry(sinks={"jsonl": {"path": str(tmp_path / "out.jsonl")}}, strict=False)
    done = threading.Event()

    def host() -> None:
        for i in range(60_000):
            tel.track("burst", {"i": i})
        done.set()

    thread = threading.Thread(target=host)
    thread.start()
    seen = [tel.status().counters.accepted]
    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        seen.append(tel.status().counters.accepted)
    thread.join(60)
    assert tel.flush(60)
    seen.append(tel.status().counters.accepted)
    dips = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
    assert not dips, (len(seen), dips[:5])
    assert seen[-1] == 60_000


def test_a_locked_outbox_holds_up_no_sink_for_the_events_of_one_that_could_not_be_made(
    waypost_make_telemetry: Any, tmp_path: Any
) -> None:
    import sqlite3

    # Another process holds the outbox's write lock. The events for a sink that could not be
    # made (its plugin not installed) wait in memory for the storer; the worker hands the
    # others on at once, nothing is dropped, and they are stored once the lock is let go.
    out = tmp_path / "out.jsonl"
    sinks = {
        "now": {"type": "jsonl", "path": str(out)},
        "later": {"type": "urltest_not_installed", "url": "http://127.0.0.1:9/x"},
    }
    data_dir = tmp_path / "d"
    tel = waypost_make_telemetry(sinks=sinks, data_dir=data_dir, strict=False)
    tel.track("warm")
    assert tel.flush(timeout=30)
    lines = lambda: out.read_text().splitlines() if out.exists() else []  # noqa: E731
    holder = sqlite3.connect(data_dir / "outbox.sqlite3", timeout=30, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for i in range(20):
            tel.track("run", {"i": i})
        assert wait_until(lambda: len(lines()) == 21)
        assert tel.status().counters.dropped == {}
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert tel.flush(timeout=30)
    later = next(s for s in tel.status().sinks if s.name == "later")
    assert later.pending == 21
    assert tel.status().counters.dropped == {}


class Holding(waypost.Sink):
    """Sends nothing until released: its first batches hang in ``send`` and every later event
    waits in the sink's queue in memory (a real sink, in memory)."""

    type = "holding"
    max_batch_size = 100
    release = threading.Event()

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        Holding.release.wait(120)
        return waypost.SendResult.ok()


def test_events_waiting_in_memory_add_about_one_object_each_for_the_garbage_collector(
    waypost_make_telemetry: Any,
) -> None:
    # Every full collection the host makes visits each GC-tracked object: an event waiting in
    # memory is the event itself (its properties of JSON scalars are not tracked), with no
    # (time, event) pair and no empty remarks list of its own (the host's other threads waited
    # 14-22 ms beside a burst for collections that visited three objects per event).
    Holding.release.clear()
    tel = waypost_make_telemetry(
        sinks={"h": {"type": "holding"}},
        config={"batch": {"interval": 3600, "size": 100}, "outbox": {"buffer": 50_000}},
        sink_classes=[Holding],
    )
    runner = tel.pipeline.runners[0]
    try:
        for i in range(100):  # a batch: the worker takes it at once, the sink opens, it hangs
            tel.track("first", {"i": i})
        assert wait_until(lambda: bool(runner.sending)), "no batch went out"
        gc.collect()
        before = len(gc.get_objects())
        n = 20_000
        for i in range(n):
            tel.track("waiting", {"i": i, "ok": True})
        assert wait_until(lambda: runner.in_memory() == n + 100), runner.in_memory()
        gc.collect()
        per_event = (len(gc.get_objects()) - before) / n
        assert per_event < 1.5, per_event
        assert tel.status().counters.stored == 0  # all of it waited in memory
    finally:
        Holding.release.set()
    assert tel.flush(timeout=60)
    assert tel.status().sinks[0].delivered == n + 100


class Blocking:
    """A ``before_send`` hook that holds the worker until released: what ``track`` adds then
    stays in the buffer."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    @waypost.hookimpl
    def waypost_before_send(self, event: waypost.Event) -> waypost.Event:
        self.entered.set()
        self.release.wait(120)
        return event


def test_events_in_the_buffer_add_no_object_for_the_garbage_collector(
    waypost_make_telemetry: Any, tmp_path: Path
) -> None:
    # A burst the worker has not taken yet: 50,000 events buffered were 50,000 tuples, which
    # every full collection visited (the slowest track() calls of a burst were those
    # collections, 25-41 ms); now an event's fields lie in the buffer one after the other.
    hook = Blocking()
    tel = waypost_make_telemetry(
        sinks={"j": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")}},
        config={"batch": {"interval": 3600, "size": 100}, "outbox": {"buffer": 50_000}},
        plugins=[hook],
        strict=False,  # track's shortest path
    )
    try:
        for i in range(100):  # a batch: the worker takes it and waits in the hook
            tel.track("first", {"i": i})
        assert hook.entered.wait(30), "the worker never reached the hook"
        gc.collect()
        before = len(gc.get_objects())
        n = 20_000
        for i in range(n):
            tel.track("buffered", {"i": i, "ok": True})
        gc.collect()
        per_event = (len(gc.get_objects()) - before) / n
        assert per_event < 0.1, per_event
        assert tel.pipeline.buffered() >= n  # and what of the first batch is not taken yet
    finally:
        hook.release.set()
    assert tel.flush(timeout=60)
    status = tel.status()
    assert status.sinks[0].delivered == n + 100, status.sinks[0]
    assert status.counters.dropped == {}


@pytest.mark.parametrize("stalled", [False, True], ids=["worker-running", "worker-stalled"])
def test_events_tracked_by_many_threads_at_once_arrive_whole(
    waypost_make_telemetry: Any, tmp_path: Path, stalled: bool
) -> None:
    # Eight threads track at once while the worker takes events (and, stalled, while a full
    # buffer drops its oldest event for each one added): no event may get another's fields.
    hook = Blocking()
    if not stalled:
        hook.release.set()
    out = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(
        sinks={"j": {"type": "jsonl", "path": str(out)}},
        config={"batch": {"size": 100}, "outbox": {"buffer": 100}},
        plugins=[hook],
        strict=False,
    )
    threads, each = 8, 2_000

    def burst(k: int) -> None:
        for i in range(each):
            tel.track(f"thread{k}", {"k": k, "i": i}, distinct_id=f"user{k}")

    started = [threading.Thread(target=burst, args=(k,)) for k in range(threads)]
    for thread in started:
        thread.start()
    if stalled:  # a full buffer, the worker held in the hook past STALL: drops begin
        assert wait_until(lambda: tel.status().counters.dropped.get("buffer_full", 0) > 100)
        hook.release.set()
    for thread in started:
        thread.join(120)
    assert tel.flush(timeout=60) is not None
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        k = row["properties"]["k"]
        assert row["name"] == f"thread{k}" and row["distinct_id"] == f"user{k}", row
    seen = {(row["properties"]["k"], row["properties"]["i"]) for row in rows}
    assert len(seen) == len(rows)  # none twice
    dropped = tel.status().counters.dropped
    assert len(rows) + dropped.get("buffer_full", 0) == threads * each, (len(rows), dropped)
    assert set(dropped) <= {"buffer_full"}, dropped
    assert bool(dropped) is stalled


def test_an_event_without_remarks_gets_its_own_list_when_one_is_asked_for() -> None:
    made = [waypost.Event(f"e{i}", "x", 1.0, "inst", {}, {}) for i in range(2)]
    assert all(not gc.is_tracked(remarks_of(e)) for e in made)  # nothing made yet
    made[0].remarks.append("email@properties.owner")
    assert made[0].remarks == ["email@properties.owner"] and made[1].remarks == []
    made[1].remarks.append("ipv4@properties.peer")
    assert made[0].remarks == ["email@properties.owner"]
    assert made[1].remarks == ["ipv4@properties.peer"]
    copied = dataclasses.replace(made[0], name="y")
    assert copied.remarks == ["email@properties.owner"] and made[0] != copied
    assert waypost.Event("a", "x", 1.0, "i", {}, {}) == waypost.Event("a", "x", 1.0, "i", {}, {})
    given = ["truncated@properties.blob"]
    assert waypost.Event("a", "x", 1.0, "i", {}, {}, remarks=given).remarks is given


def test_the_queue_in_memory_keeps_each_events_arrival_time_through_takes_and_put_backs() -> None:
    def made(n: int, tag: str) -> list[waypost.Event]:
        return [waypost.Event(f"{tag}{i}", "x", 1.0, "inst", {}, {}) for i in range(n)]

    queue = Waiting()
    queue.add(made(3, "a"), 10.0)
    queue.add([], 15.0)  # nothing offered: no mark
    queue.add(made(2, "b"), 20.0)
    queue.add(made(4, "c"), 30.0)
    assert len(queue) == 9 and queue.oldest() == 10.0
    first = queue.take(4)  # across a group: the rest of it keeps its time
    assert [e.id for e in first.events] == ["a0", "a1", "a2", "b0"]
    assert queue.oldest() == 20.0
    stale = queue.take(100, older_than=25.0)  # only what got there by then
    assert [e.id for e in stale.events] == ["b1"] and queue.oldest() == 30.0
    queue.put_back(stale)
    queue.put_back(first)
    assert [e.id for e in queue] == ["a0", "a1", "a2", "b0", "b1", "c0", "c1", "c2", "c3"]
    assert [e.id for e in queue.take(100, older_than=20.0).events] == ["a0", "a1", "a2", "b0", "b1"]
    assert not queue.take(100, older_than=29.0) and len(queue) == 4
    queue.put_back(Taken.since(5.0, made(1, "r")))
    assert queue.oldest() == 5.0 and [e.id for e in queue.take(2).events] == ["r0", "c0"]
    queue.clear()
    assert not queue and not queue.take(10)
