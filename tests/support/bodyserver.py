"""A loopback HTTP server whose answers have hostile bodies: huge, endless, trickling or a
decompression bomb, sent until the client goes away (which it records)."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from waypost.events import Event
from waypost.sinks import HttpTransport, SendResult, Sink, SinkConfig, SinkContext

GIB = 1 << 30


class PlainConfig(SinkConfig):
    url: str


class PlainSink(Sink[PlainConfig]):
    """Posts ``[]`` through the toolkit's transport and keeps the answer it got."""

    type = "plain"

    def __init__(self, name: str, config: PlainConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        self.http = HttpTransport(self, what="plain")
        self.answer: Any = None

    def send(self, events: Sequence[Event]) -> SendResult:
        self.answer = self.http.request("POST", content=b"[]")
        return SendResult.ok()


SHAPES = ("huge", "endless", "trickle", "trickle_length", "stall", "bomb")
"""``huge``: a Content-Length of 2 GiB, sent as fast as the client reads; ``endless``: chunked,
never ending; ``trickle``: chunked, a byte every 50 ms; ``trickle_length``: a Content-Length of
1 MB, a byte every 50 ms; ``stall``: chunked, a byte every 50 ms for 0.9 s, then nothing (a
read waits for the next byte in vain); ``bomb``: 64 MiB of zeros, gzipped (64 KiB on the wire)."""

_BOMB: list[bytes] = []


def _bomb() -> bytes:
    if not _BOMB:
        _BOMB.append(gzip.compress(b"\0" * (64 << 20), compresslevel=9))
    return _BOMB[0]


class BodyServer:
    """Answers every request with ``status`` and a body of ``shape`` (see :data:`SHAPES`).
    ``gone`` is set once a client stopped reading an answer and closed its connection;
    ``sent`` is how many body bytes went out on the last connection."""

    def __init__(self, shape: str, status: int = 200) -> None:
        assert shape in SHAPES, shape
        self.shape = shape
        self.status = status
        self.gone = threading.Event()
        self.sent = 0
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        if shape == "bomb":
            _bomb()  # made now, not while the client's memory is measured

    def __enter__(self) -> BodyServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._read_request(conn)
                self._answer(conn)
            except OSError:  # the client went away: what this server is for
                self.gone.set()

    @staticmethod
    def _read_request(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionResetError
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionResetError
            body += chunk

    def _head(self, conn: socket.socket, **headers: Any) -> None:
        lines = [f"HTTP/1.1 {self.status} Hostile", "Content-Type: text/plain"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def _body(self, conn: socket.socket, data: bytes, pause: float = 0.0) -> None:
        self.sent += len(data)
        conn.sendall(data)
        if pause:
            self._stop.wait(pause)

    def _answer(self, conn: socket.socket) -> None:
        self.sent = 0
        block = b"x" * 65536
        shape = self.shape
        if shape == "huge":
            self._head(conn, Content_Length=2 * GIB)
            while not self._stop.is_set() and self.sent < 2 * GIB:
                self._body(conn, block)
        elif shape == "endless":
            self._head(conn, Transfer_Encoding="chunked")
            while not self._stop.is_set():
                self._body(conn, b"10000\r\n" + block + b"\r\n")
        elif shape == "trickle":
            self._head(conn, Transfer_Encoding="chunked")
            while not self._stop.is_set():
                self._body(conn, b"1\r\nx\r\n", 0.05)
        elif shape == "stall":
            self._head(conn, Transfer_Encoding="chunked")
            for _ in range(18):
                self._body(conn, b"1\r\nx\r\n", 0.05)
        elif shape == "trickle_length":
            self._head(conn, Content_Length=1_000_000)
            while not self._stop.is_set():
                self._body(conn, b"x", 0.05)
        else:
            bomb = _bomb()
            self._head(conn, Content_Length=len(bomb), Content_Encoding="gzip")
            self._body(conn, bomb)
        # Sent whole (or stopped): wait for the client to close its end.
        deadline = time.monotonic() + 30
        conn.settimeout(0.1)
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if not conn.recv(65536):
                    break
            except TimeoutError:
                continue
        self.gone.set()
