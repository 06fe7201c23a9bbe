"""A server's answers are read within bounds: an endless, huge or trickling body costs the sink
at most a megabyte and its timeout, never its thread or the process's memory."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from waypost_clickhouse import ClickHouseConfig, ClickHouseSink

from waypost.sinks import SendResult, SinkContext
from waypost.testing import make_events, send_batch


class HostileServer:
    """Answers every request 200 with a chunked body: endless (64 KiB chunks as fast as the
    client reads) or a trickle (a byte every 50 ms). ``gone`` is set once the client closed."""

    def __init__(self, shape: str) -> None:
        self.shape = shape
        self.gone = threading.Event()
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536) or b"\r\n\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
                while not self.stop.is_set():
                    if self.shape == "endless":
                        conn.sendall(chunk)
                    else:
                        conn.sendall(b"1\r\nx\r\n")
                        self.stop.wait(0.05)
            except OSError:
                self.gone.set()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture(params=["endless", "trickle"])
def server(request: pytest.FixtureRequest) -> Iterator[HostileServer]:
    made = HostileServer(request.param)
    yield made
    made.close()


def test_a_hostile_answer_is_cut_within_the_timeout(server: HostileServer, tmp_path: Path) -> None:
    config = ClickHouseConfig(host="127.0.0.1", port=server.port, timeout=1)
    context = SinkContext(app="testapp", version="1", instance_id="i", data_dir=tmp_path)
    sink = ClickHouseSink("hostile", config, context)
    events = make_events(2)
    results: list[SendResult] = []
    tracemalloc.start()
    try:
        started = time.monotonic()
        sending = threading.Thread(target=lambda: results.append(send_batch(sink, events)))
        sending.daemon = True
        sending.start()
        sending.join(10)
        took = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not sending.is_alive(), f"the sink kept reading a {server.shape} answer for 10 s"
    sink.close()
    assert took < 1 + 3, took  # the timeout, a second after the headers, and the connect's
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB traced while reading the answer"
    assert set(results[0].retry) == {e.id for e in events}, results[0]
    assert server.gone.wait(5), "the connection of a cut answer was kept open"
