"""Every answer is read within bounds, by the toolkit's transport and by a requests session
whatever its adapter: a destination answering a 2 GiB body, an endless or trickling one or a
decompression bomb gets its first MiB read (the rest never) or a timeout, never a sink thread
held past its timeout nor the memory filled."""

from __future__ import annotations

import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bodyserver import BodyServer, PlainConfig, PlainSink
from faultkit import wait_until

from waypost.errors import RetryableError
from waypost.sinks import SinkContext
from waypost.sinks.bounded import ANSWER_BYTES

TIMEOUT = 1.0
BUDGET = TIMEOUT + 1.5  # what a read may take at most, generously
MEMORY = 16 << 20  # what reading one answer may hold at most (a MiB of body, a few chunks)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Callable[[str], PlainSink]]:
    made: list[PlainSink] = []

    def make(url: str) -> PlainSink:
        context = SinkContext(app="bounds", version="1", instance_id="i", data_dir=tmp_path)
        made.append(PlainSink("plain", PlainConfig(url=url, timeout=TIMEOUT), context))
        return made[-1]

    yield make
    for one in made:
        one.close()


def bounded_call(call: Callable[[], Any]) -> tuple[Any, BaseException | None, int]:
    """``call()`` on a thread of its own, which must end within :data:`BUDGET`: what it
    returned or raised, and the most memory traced meanwhile."""
    outcome: list[Any] = [None, None]

    def run() -> None:
        try:
            outcome[0] = call()
        except BaseException as exc:
            outcome[1] = exc

    tracemalloc.start()
    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(BUDGET)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not thread.is_alive(), f"still reading after {BUDGET} s"
    return outcome[0], outcome[1], peak


def no_reader_thread_left() -> bool:
    return wait_until(
        lambda: not any(t.name == "waypost-answers" for t in threading.enumerate()), 5
    )


@pytest.mark.parametrize("shape", ["huge", "endless", "bomb"])
def test_the_transport_reads_the_first_mib_of_a_huge_body_and_no_more(
    shape: str, sink: Callable[[str], PlainSink]
) -> None:
    with BodyServer(shape) as server:
        plain = sink(server.url)
        _, error, peak = bounded_call(lambda: plain.send([]))
        assert error is None, error
        body = plain.answer.content
        assert plain.answer.status_code == 200 and len(body) == ANSWER_BYTES
        assert body == (b"\0" if shape == "bomb" else b"x") * ANSWER_BYTES
        assert peak < MEMORY, peak
        if shape != "bomb":  # (whose 64 KiB on the wire were read whole, its MiB decoded)
            assert server.gone.wait(5)  # the connection was closed, the rest left unread
        plain.send([])  # and the next request has a connection of its own
        assert len(plain.answer.content) == ANSWER_BYTES
    assert no_reader_thread_left()


def test_an_error_answer_with_a_huge_body_is_classified_on_its_first_mib(
    sink: Callable[[str], PlainSink],
) -> None:
    with BodyServer("endless", status=503) as server:
        plain = sink(server.url)
        _, error, _ = bounded_call(lambda: plain.http.send("POST", content=b"[]"))
        assert isinstance(error, RetryableError), error
        assert error.reason.startswith("plain: HTTP 503: xxxx"), error.reason
        assert server.gone.wait(5)


@pytest.mark.parametrize("shape", ["trickle", "trickle_length", "stall"])
def test_a_body_that_trickles_past_the_timeout_is_a_retryable_timeout(
    shape: str, sink: Callable[[str], PlainSink]
) -> None:
    with BodyServer(shape) as server:
        plain = sink(server.url)
        started = time.monotonic()
        _, error, _ = bounded_call(lambda: plain.send([]))
        assert isinstance(error, RetryableError), error
        assert "had not ended within 1 s" in error.reason, error.reason
        assert time.monotonic() - started < BUDGET
        assert server.gone.wait(5)
    assert no_reader_thread_left()


def _requests_adapters() -> list[Any]:
    requests = pytest.importorskip("requests")

    class OwnAdapter(requests.adapters.HTTPAdapter):
        """A sink's own adapter, as a vendor layer would bring one."""

    return [None, OwnAdapter(max_retries=0, pool_maxsize=2)]


@pytest.mark.parametrize("own", [False, True], ids=["built-in adapter", "own adapter"])
@pytest.mark.parametrize("shape", ["huge", "endless", "bomb", "trickle", "trickle_length", "stall"])
def test_a_requests_session_reads_within_bounds_whatever_its_adapter(
    shape: str, own: bool, sink: Callable[[str], PlainSink]
) -> None:
    import requests

    from waypost.sinks import requests_errors, requests_session

    with BodyServer(shape) as server:
        plain = sink(server.url)
        session = requests_session(plain, _requests_adapters()[own])

        def post() -> Any:
            with requests_errors(plain, server.url, "plain"):
                return session.post(server.url, data=b"[]", timeout=TIMEOUT)

        answer, error, peak = bounded_call(post)
        assert shape == "bomb" or server.gone.wait(5)
        if shape.startswith(("trickle", "stall")):
            assert isinstance(error, RetryableError), error
            assert error.reason == f"plain: no answer from {server.url} within 1 s"
        else:
            assert error is None, error
            assert isinstance(answer, requests.Response) and answer.status_code == 200
            assert len(answer.content) == ANSWER_BYTES and peak < MEMORY, peak
        session.close()
    assert no_reader_thread_left()


def test_one_thread_watches_a_run_of_answers_and_ends_after_the_last(
    sink: Callable[[str], PlainSink],
) -> None:
    from waypost.testing import RecordingServer

    with RecordingServer() as server:
        plain = sink(f"{server.url}/in")
        seen: list[threading.Thread] = []
        for _ in range(20):
            plain.send([])
            seen += [t for t in threading.enumerate() if t.name == "waypost-answers"]
        assert len(seen) == 20 and len(set(seen)) == 1, seen  # never one thread per answer
        assert len(server.requests) == 20
    assert no_reader_thread_left()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_cuts_a_stalled_body_with_a_watcher_of_its_own(
    sink: Callable[[str], PlainSink],
) -> None:
    with BodyServer("stall") as server:  # only a watcher cuts it at 1 s: a read waits for more
        plain = sink(server.url)
        raised: list[BaseException] = []

        def read() -> None:
            try:
                plain.send([])
            except BaseException as exc:
                raised.append(exc)

        reading = threading.Thread(target=read)
        reading.start()  # forked while the parent's watcher waits for this body's deadline
        assert wait_until(lambda: any(t.name == "waypost-answers" for t in threading.enumerate()))
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child reports through its exit status)
            code = 1
            try:
                plain.send([])
            except RetryableError as exc:
                code = 0 if "had not ended within 1 s" in exc.reason else 2
            finally:
                os._exit(code)
        ended: list[int] = []

        def reaped() -> bool:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended.append(status)
            return bool(done)

        if not wait_until(reaped, 5):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child was still reading its answer after 5 s")
        status = ended[0]
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert time.monotonic() - started < BUDGET
        reading.join(BUDGET)
        assert not reading.is_alive() and isinstance(raised[0], RetryableError), raised
        assert "had not ended within 1 s" in raised[0].reason
