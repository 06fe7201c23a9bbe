"""A recording HTTP server on loopback with scripted answers, for testing sinks against a peer
that speaks the destination's protocol."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import urllib.parse
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    """One request as the server received it.

    ``raw`` is the body as it came over the wire (still gzip- or deflate-compressed when the
    client sent ``Content-Encoding``); ``body`` is the same body decompressed. ``headers`` keep
    the client's spelling; :meth:`header` looks one up regardless of case. ``at`` is the
    arrival time (``time.time()``).
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw: bytes
    body: bytes
    at: float

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None``."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    @property
    def text(self) -> str:
        """The decompressed body as UTF-8 text (undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` if it is not)."""
        return json.loads(self.body)

    def form(self) -> dict[str, list[str]]:
        """The body parsed as ``application/x-www-form-urlencoded``."""
        return urllib.parse.parse_qs(self.text, keep_blank_values=True)

    def ndjson(self) -> list[Any]:
        """The body parsed as JSON Lines (blank lines skipped)."""
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]


@dataclass
class Response:
    """A scripted answer. ``delay`` sleeps before answering; ``reset`` closes the connection
    without an answer; ``hang`` never answers (until the server stops)."""

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False
    hang: bool = False

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        body = self.body
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return body, headers


Responder = Callable[[Request], Response]


class _HTTPServer(ThreadingHTTPServer):
    # Set on a subclass: the standard library's class stays as it was for everyone else.
    allow_reuse_address = True
    daemon_threads = True


class RecordingServer:
    """``with RecordingServer() as server:`` serves on ``server.url`` (127.0.0.1, a free port).

    Answers come from ``script`` (a queue of :class:`Response`, one per request) and then from
    ``responder`` (a function of the request; by default 200 with an empty JSON object). Every
    request is kept in ``requests``.
    """

    def __init__(
        self, responder: Responder | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.responder: Responder = responder or (lambda request: Response(200, {}))
        self.script: deque[Response] = deque()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._received = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = raw
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip" and raw:
                    body = gzip.decompress(raw)
                elif encoding == "deflate" and raw:
                    body = zlib.decompress(raw)
                parsed = urllib.parse.urlsplit(self.path)
                request = Request(
                    method=self.command,
                    path=parsed.path,
                    query=urllib.parse.parse_qs(parsed.query, keep_blank_values=True),
                    headers=dict(self.headers.items()),
                    raw=raw,
                    body=body,
                    at=time.time(),
                )
                with server._lock:
                    answer = server.script.popleft() if server.script else None
                if answer is None:
                    answer = server.responder(request)
                if answer.delay:
                    server._stopping.wait(answer.delay)
                if answer.hang:
                    server._stopping.wait()
                    answer = Response(reset=True)
                with server._received:
                    server.requests.append(request)
                    server._received.notify_all()
                if answer.reset:
                    self.close_connection = True
                    try:
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                    except OSError:
                        pass
                    self.connection.close()
                    return
                payload, headers = answer.encoded()
                self.send_response(answer.status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = _handle

        self._httpd = _HTTPServer((host, port), Handler)
        address = self._httpd.server_address
        self.host, self.port = str(address[0]), int(address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> RecordingServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> RecordingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, *responses: Response) -> None:
        """Queue answers for the next requests, in order."""
        with self._lock:
            self.script.extend(responses)

    def wait_for(self, predicate: Callable[[list[Request]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(requests)`` holds, checked on every new request; returns
        whether it did within ``timeout`` seconds. For work that reaches the server from a
        background thread: ``server.wait_for(lambda reqs: len(reqs) >= 3)``."""
        deadline = time.monotonic() + timeout
        with self._received:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._received.wait(left)
        return True

    def clear(self) -> None:
        """Forget the requests received so far (scripted answers stay queued)."""
        with self._received:
            self.requests.clear()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for connection-refused tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
