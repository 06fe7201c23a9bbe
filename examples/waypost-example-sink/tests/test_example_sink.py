"""The example sink against a real receiver on loopback: the contract suite and its own tests.

``SinkContract`` drives a :class:`waypost.testing.Peer`. This sink speaks a TCP line protocol,
so the module gives the contract :class:`LinePeer`: the protocol's receiver, whose answers are
scripted like the recording HTTP server's (:class:`ScriptedReceiver`: status, text,
``retry-after=``, delay, reset, hang), and which reads back every envelope it received. Every
contract test runs as written; the one about redirects is skipped, since the protocol has none.
"""

from __future__ import annotations

import collections
import importlib.metadata as md
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from waypost.testing import (
    Arrival,
    BasePeer,
    PeerCannot,
    Response,
    SinkContract,
    free_port,
    make_events,
    send_batch,
)

TOKEN = "tok-example-3b9d1f-never-logged"
SRC = Path(__file__).resolve().parents[1] / "src"
INSTALLED = bool(md.entry_points(group="waypost.sinks", name="example"))
if not INSTALLED and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # a checkout where the plugin is not installed (see below)

from waypost_example_sink.receiver import Batch, Receiver  # noqa: E402


@pytest.fixture(autouse=True)
def _installed(waypost_register_plugin: Callable[[str, str], None]) -> None:
    """The plugin is normally installed (``pip install ./examples/waypost-example-sink``, as
    the ``example_sink`` nox session does). In a checkout where it is not, use its source and
    register its entry point for the test, exactly as the installed one would be."""
    if not INSTALLED:
        waypost_register_plugin("example", "waypost_example_sink")


class ScriptedReceiver(Receiver):
    """A line-protocol receiver whose answers are scripted like a ``RecordingServer``'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.responder: Callable[[Batch], Response] = lambda batch: Response(200, "ok")
        self.script: collections.deque[Response] = collections.deque()
        self.requests: list[Batch] = []
        self._stopping = threading.Event()

    def answer(self, *responses: Response) -> None:
        self.script.extend(responses)

    def handle(self, batch: Batch, conn: socket.socket) -> None:
        answer = self.script.popleft() if self.script else self.responder(batch)
        if answer.delay:
            self._stopping.wait(answer.delay)
        if answer.hang:
            self._stopping.wait()
            answer = Response(reset=True)
        self.requests.append(batch)
        if answer.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            return
        body = answer.body
        text = json.dumps(body) if isinstance(body, (dict, list)) else str(body or "")
        wait = {k.lower(): v for k, v in answer.headers.items()}.get("retry-after")
        line = f"{answer.status} {text}{f' retry-after={wait}' if wait else ''}"
        conn.sendall(" ".join(line.split()).encode() + b"\n")

    def stop(self) -> None:
        self._stopping.set()
        super().stop()


class LinePeer(BasePeer):
    """The receiver as the contract's peer: HTTP's status numbers in one-line answers."""

    name = "the line-protocol receiver"
    REFUSALS: ClassVar[dict[str, int]] = {"400 bad batch": 400, "401 bad or missing token": 401}
    RETRYABLE: ClassVar[dict[str, int]] = {"408 timeout": 408, "429 busy": 429, "503 down": 503}

    def __init__(self, receiver: ScriptedReceiver) -> None:
        self.receiver = receiver

    def config(self) -> dict[str, Any]:
        return {"url": self.receiver.url, "token": TOKEN}

    def unreachable_config(self) -> dict[str, Any]:
        return {"url": f"tcp://127.0.0.1:{free_port()}", "token": TOKEN}

    def deliver(self) -> None:
        self.receiver.responder = lambda batch: Response(200, f"ok {len(batch.events)}")

    def permanent_failures(self) -> list[str]:
        return list(self.REFUSALS)

    def refuse(self, failure: str) -> None:
        status, text = self.REFUSALS[failure], failure.split(" ", 1)[1]
        self.receiver.responder = lambda batch: Response(status, text)

    def retryable_failures(self) -> list[str]:
        return list(self.RETRYABLE)

    def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
        status, text = self.RETRYABLE[failure], failure.split(" ", 1)[1]
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        self.receiver.responder = lambda batch: Response(status, text, headers=headers)

    def slow(self, seconds: float) -> None:
        self.receiver.responder = lambda batch: Response(200, "ok", delay=seconds)

    def redirect(self, status: int) -> None:
        raise PeerCannot("the line protocol has no redirects")

    def received(self) -> list[Arrival]:
        return [
            Arrival(e["id"], e["name"], e["properties"])
            for batch in self.receiver.requests
            for e in batch.events
        ]


@pytest.fixture
def receiver() -> Iterator[ScriptedReceiver]:
    """A scripted receiver on 127.0.0.1, stopped after the test."""
    with ScriptedReceiver() as scripted:
        yield scripted


class TestExampleSinkContract(SinkContract):
    sink_type = "example"

    @pytest.fixture
    def waypost_peer(self, receiver: ScriptedReceiver) -> LinePeer:
        return LinePeer(receiver)


# --- configuration ------------------------------------------------------------------------------


def test_config_wants_a_loopback_tcp_url() -> None:
    from waypost_example_sink import ExampleConfig

    assert ExampleConfig(url="tcp://127.0.0.1:7070").address == ("127.0.0.1", 7070)
    for bad in ("http://127.0.0.1:7070", "tcp://127.0.0.1", "tcp://10.1.2.3:7070"):
        with pytest.raises(ValidationError):
            ExampleConfig(url=bad)
    assert ExampleConfig(url="tcp://10.1.2.3:7070", allow_remote=True).address[1] == 7070


def test_token_is_a_secret() -> None:
    from waypost_example_sink import ExampleConfig

    config = ExampleConfig(url="tcp://127.0.0.1:7070", token=TOKEN)
    assert TOKEN not in repr(config) and TOKEN not in str(config)


# --- the wire -----------------------------------------------------------------------------------


def test_batch_on_the_wire(tmp_path: Path) -> None:
    from waypost_example_sink import encode_batch

    events = make_events(2)
    lines = encode_batch(events, "t").decode().splitlines()
    assert lines[:3] == ["WAYPOST-LINE 1", "AUTH t", "BATCH 2"]
    assert [json.loads(line)["id"] for line in lines[3:]] == [e.id for e in events]
    assert encode_batch(events).decode().splitlines()[1] == "BATCH 2"


def test_wrong_token_is_permanent(tmp_path: Path) -> None:
    from waypost.plugins import PluginManager
    from waypost.sinks import SinkContext

    with Receiver(token="right-token") as receiver:
        cls = PluginManager().load_sink_type("example")
        config = cls.Config.model_validate({"url": receiver.url, "token": "wrong-token"})
        sink = cls("x", config, SinkContext("app", "1", "inst", tmp_path))
        events = make_events(2)
        result = send_batch(sink, events)
        assert set(result.failed) == {e.id for e in events}
        assert "401" in result.failed[events[0].id]
        assert not receiver.batches


def test_413_is_split_by_the_core(receiver: ScriptedReceiver, tmp_path: Path) -> None:
    receiver.responder = lambda batch: (
        Response(413, "too large") if len(batch.events) > 2 else Response(200, "ok")
    )
    sink = TestExampleSinkContract().peer_sink(LinePeer(receiver), tmp_path)
    events = make_events(7)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    delivered = [e["id"] for b in receiver.requests if len(b.events) <= 2 for e in b.events]
    assert sorted(delivered) == sorted(e.id for e in events)


def test_garbage_answer_is_retryable(receiver: ScriptedReceiver, tmp_path: Path) -> None:
    receiver.answer(Response(999, "what"), Response(reset=True))
    sink = TestExampleSinkContract().peer_sink(LinePeer(receiver), tmp_path)
    for _ in range(2):
        events = make_events(1)
        assert set(send_batch(sink, events).retry) == {events[0].id}


# --- from config, through the whole pipeline ----------------------------------------------------


def test_delivers_from_config(waypost_make_telemetry: Any) -> None:
    with Receiver(token=TOKEN) as receiver:
        tel = waypost_make_telemetry(
            sinks={"local": {"type": "example", "url": receiver.url, "token": TOKEN}}
        )
        for i in range(30):
            tel.track("page_viewed", {"page": i})
        assert tel.flush(timeout=10)
        received = [e for batch in receiver.batches for e in batch.events]
        assert sorted(e["properties"]["page"] for e in received) == list(range(30))
        assert {e["name"] for e in received} == {"page_viewed"}
        status = tel.status()
        assert status.sinks[0].type == "example" and status.sinks[0].delivered == 30


def test_receiver_down_then_up_loses_nothing(waypost_make_telemetry: Any) -> None:
    port = free_port()
    tel = waypost_make_telemetry(
        sinks={"local": {"type": "example", "url": f"tcp://127.0.0.1:{port}"}}
    )
    for i in range(5):
        tel.track("queued", {"i": i})
    assert tel.flush(timeout=2)  # True: nobody listens, but the events are safe in the outbox
    assert tel.status().outbox_pending_events == 5
    with Receiver(port=port) as receiver:
        deadline = time.monotonic() + 15  # the core retries after its backoff (at most 1 s here)
        while tel.status().outbox_pending_events and time.monotonic() < deadline:
            tel.flush(timeout=1)
        assert sorted(e["properties"]["i"] for b in receiver.batches for e in b.events) == [
            0,
            1,
            2,
            3,
            4,
        ]
