"""flush(timeout) makes every retry that falls due before its deadline, also of a batch whose
outcome the outbox could not record at once.

A sink sends rows it leased from the outbox (or a batch from memory stored leased while in
flight); the destination answers; then the outbox refuses the write of that answer (another
process holds its write lock). The rows stay leased to this process, hidden from every reader
of the outbox for the lease's length. Once the outbox takes writes again, a flush with the
destination up must see those rows delivered, not return at once with them still pending.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import make, pending_rows, show, wait_until

from waypost.testing import RecordingServer, Request, Response, free_port

LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


class Locker:
    """Another process holding the outbox's write lock, taken and let go on request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process: subprocess.Popen[str] | None = None

    def take(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            assert process.stdin is not None
            process.stdin.write("\n")
            process.stdin.flush()
            process.wait(10)


@pytest.fixture
def locker(tmp_path: Path) -> Iterator[Locker]:
    held = Locker(tmp_path / "d" / "outbox.sqlite3")
    try:
        yield held
    finally:
        held.release()


def ids_of(requests: list[Request]) -> set[str]:
    return {e["id"] for r in requests if r.body for e in r.json()}


def stored_outbox(data: Path, n: int) -> set[str]:
    """``n`` events stored in the outbox of ``data`` (the destination was down); their ids."""
    tel = make(f"http://127.0.0.1:{free_port()}/ingest", data)
    for i in range(n):
        tel.track("stored_before", {"i": i})
    assert tel.flush(10)
    tel.shutdown(5)
    with sqlite3.connect(data / "outbox.sqlite3") as db:
        ids = {row[0] for row in db.execute("SELECT event_id FROM outbox")}
    assert len(ids) == n
    return ids


def storage_state(tel: Any) -> str:
    return str(tel.status().storage.state)


def answer_then_lock(locker: Locker, first: Response, ready: Any) -> Any:
    """A responder: the first request waits until ``ready()``, then takes the outbox's lock
    (from another process) before ``first`` is answered, so that the sink cannot record the
    answer; then 200 for all."""
    taken = threading.Event()
    lock = threading.Lock()

    def respond(request: Request) -> Response:
        with lock:
            if not taken.is_set():
                taken.set()
                assert wait_until(ready, timeout=10)
                locker.take()
                return first
        return Response(200, {})

    return respond


RETRY_AFTER = Response(503, {"error": "later"}, headers={"Retry-After": "1"})


@pytest.mark.parametrize("at_once", [False, True], ids=["once_writable", "at_once"])
@pytest.mark.parametrize(
    "first",
    [RETRY_AFTER, Response(200, {})],
    ids=["retry_after", "accepted"],
)
def test_flush_delivers_rows_whose_outcome_the_outbox_refused_at_first(
    tmp_path: Path, locker: Locker, first: Response, at_once: bool
) -> None:
    """Rows leased from the outbox and sent; the answer could not be recorded at once. The
    flush comes once the outbox took a write again, or (``at_once``) as soon as the lock is
    let go, while the outbox's state still says ``locked`` from the last write that failed."""
    data = tmp_path / "d"
    ids = stored_outbox(data, 200)
    with RecordingServer(answer_then_lock(locker, first, lambda: True)) as server:
        tel = make(server.url + "/ingest", data)
        try:
            figures = _flush_after_the_lock(tel, data, locker, wait_writable=not at_once)
            # What the destination took: the first batch only if it was accepted.
            took = server.requests if first.status == 200 else server.requests[1:]
            figures["arrived"] = len(ids & ids_of(took))
        finally:
            figures["shutdown"] = tel.shutdown(5.0)
    _assert_all_delivered(figures, 200)


def test_flush_delivers_a_batch_stored_in_flight_whose_outcome_the_outbox_refused(
    tmp_path: Path, locker: Locker
) -> None:
    """A batch sent from memory and stored (leased) while in flight; the destination asks
    for a retry, which could not be recorded at once. It is retried from the outbox, not
    sent again from memory beside a row that stays pending."""
    data = tmp_path / "d"
    data.mkdir()
    responder = answer_then_lock(locker, Response(503), lambda: pending_rows(data) == 100)
    with RecordingServer(responder) as server:
        tel = make(server.url + "/ingest", data)
        try:
            for i in range(100):
                tel.track("in_flight", {"i": i})
            figures = _flush_after_the_lock(tel, data, locker)
            # The first batch (50 or 100 events, as the worker built them) was answered 503;
            # every event arrives in the requests after it.
            first, later = ids_of(server.requests[:1]), ids_of(server.requests[1:])
            figures["first_batch"] = len(first)
            figures["first_again"] = len(first & later)
            figures["arrived"] = len(later)
        finally:
            figures["shutdown"] = tel.shutdown(5.0)
    _assert_all_delivered(figures, 100)
    assert figures["first_again"] == figures["first_batch"], show(figures)


def _flush_after_the_lock(
    tel: Any, data: Path, locker: Locker, *, wait_writable: bool = True
) -> dict[str, Any]:
    """Wait until writing the first answer gave up (the lock is held), let the lock go, wait
    (``wait_writable``) until the outbox takes writes again, then flush(30) with the
    destination up."""
    figures: dict[str, Any] = {}
    # Writing what became of the first batch waits for the lock and gives up: its rows stay
    # leased to this process.
    figures["locked"] = wait_until(lambda: storage_state(tel) == "locked", timeout=30)
    locker.release()
    figures["writable"] = not wait_writable or wait_until(
        lambda: storage_state(tel) == "ok", timeout=30
    )
    started = time.monotonic()
    figures["flush"] = tel.flush(30.0)
    figures["flush_s"] = round(time.monotonic() - started, 2)
    figures["pending_after_flush"] = pending_rows(data)
    figures["status_pending"] = tel.status().outbox_pending_events
    return figures


def _assert_all_delivered(figures: dict[str, Any], n: int) -> None:
    assert figures["locked"] and figures["writable"], show(figures)
    assert figures["flush"] is True, show(figures)
    assert figures["arrived"] == n, show(figures)
    assert figures["pending_after_flush"] == 0, show(figures)
    assert figures["status_pending"] == 0, show(figures)
    assert figures["flush_s"] < 30.0 + 1.5, show(figures)
