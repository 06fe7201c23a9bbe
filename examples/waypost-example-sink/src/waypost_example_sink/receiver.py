"""A receiver for the example line protocol: ``waypost-example-receiver --port 7070``.

Appends every envelope it receives to a JSON Lines file (or prints it) and answers ``200 ok``.
Tests subclass :class:`Receiver` to script other answers.
"""

from __future__ import annotations

import argparse
import hmac
import json
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from waypost_example_sink import MAGIC

MAX_LINE = 1024 * 1024
MAX_EVENTS = 10_000


class BadBatch(Exception):
    """A batch that breaks the protocol; ``status`` is the answer's status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class Batch:
    """One batch as received: the token it carried and its envelopes."""

    token: str | None
    events: list[dict[str, Any]] = field(default_factory=list)

    def json(self) -> list[dict[str, Any]]:
        return self.events


class Lines(Protocol):
    """What a batch is read from: a socket's file, a ``BytesIO``."""

    def readline(self, size: int = -1, /) -> bytes: ...


def _line(stream: Lines) -> str:
    raw = stream.readline(MAX_LINE + 1)
    if len(raw) > MAX_LINE:
        raise BadBatch(413, f"a line is longer than {MAX_LINE} bytes")
    if not raw.endswith(b"\n"):
        raise BadBatch(400, "the connection ended inside the batch")
    return raw[:-1].decode("utf-8")


def read_batch(stream: Lines) -> Batch:
    """Read one batch, or raise :class:`BadBatch`."""
    if _line(stream) != MAGIC:
        raise BadBatch(400, f"expected {MAGIC!r} first")
    line, token = _line(stream), None
    if line.startswith("AUTH "):
        token, line = line[len("AUTH ") :], _line(stream)
    command, _, count = line.partition(" ")
    if command != "BATCH" or not count.isdigit():
        raise BadBatch(400, "expected BATCH <n>")
    if int(count) > MAX_EVENTS:
        raise BadBatch(413, f"at most {MAX_EVENTS} events per batch")
    batch = Batch(token)
    for i in range(int(count)):
        try:
            batch.events.append(json.loads(_line(stream)))
        except ValueError:
            raise BadBatch(400, f"event {i + 1} is not JSON") from None
    return batch


class _TCPServer(socketserver.ThreadingTCPServer):
    # On a subclass: the standard library's class stays as it is for the rest of the process.
    allow_reuse_address = True
    daemon_threads = True


class Receiver:
    """A threaded TCP receiver on ``host`` (loopback by default); ``url`` is its address."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.token = token
        self.batches: list[Batch] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    batch = read_batch(self.rfile)
                except (BadBatch, UnicodeDecodeError) as exc:
                    status = exc.status if isinstance(exc, BadBatch) else 400
                    self.wfile.write(f"{status} {exc}\n".encode())
                    return
                if receiver.token is not None and not hmac.compare_digest(
                    (batch.token or "").encode(), receiver.token.encode()
                ):
                    self.wfile.write(b"401 bad or missing token\n")
                    return
                receiver.handle(batch, self.connection)

        self._server = _TCPServer((host, port), Handler)
        address = self._server.server_address
        self.host, self.port = str(address[0]), int(address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def handle(self, batch: Batch, conn: socket.socket) -> None:
        """Keep the batch and answer ``200``; subclasses script other answers."""
        self.received(batch)
        conn.sendall(f"200 ok {len(batch.events)}\n".encode())

    def received(self, batch: Batch) -> None:
        with self._lock:
            self.batches.append(batch)

    def start(self) -> Receiver:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FileReceiver(Receiver):
    """Appends each envelope to ``out`` (``-``: standard output)."""

    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def received(self, batch: Batch) -> None:
        text = "".join(json.dumps(e) + "\n" for e in batch.events)
        with self._lock:
            if self.out == "-":
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                with Path(self.out).open("a", encoding="utf-8") as f:
                    f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7070)
    parser.add_argument("--out", default="-", help="JSON Lines file to append to (- : stdout)")
    parser.add_argument("--token", help="Refuse batches without this token")
    args = parser.parse_args(argv)
    receiver = FileReceiver(args.out, host=args.host, port=args.port, token=args.token)
    print(f"listening on {receiver.url}", file=sys.stderr)
    try:
        receiver._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver._server.server_close()


if __name__ == "__main__":
    main()
