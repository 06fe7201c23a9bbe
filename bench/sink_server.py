"""The one local sink server of the benchmark: answers each contender as its vendor would.

Every contender gets a path prefix ``/c/<label>/`` and appends its vendor's path to it:

- ``.../batch/``      PostHog batch capture: ``{"batch": [{"uuid"}]}`` -> 200 ``{"status": 1}``
- ``.../v1/batch``    Segment: ``{"batch": [{"messageId"}]}`` -> 200 ``{}``
- ``.../2/httpapi``   Amplitude HTTP V2: ``{"events": [{"insert_id"}]}`` -> 200 JSON with ``code``
- ``.../track``       Mixpanel: form ``data=<JSON array>`` -> ``{"status": 1, "error": null}``
- ``.../ingest``      waypost's ``http`` sink: a JSON array of envelopes with ``id``

Bodies may be gzipped (``Content-Encoding: gzip``). The server counts distinct event ids per
label and keeps, on the system-wide monotonic clock (comparable across processes on Linux),
the time a new id last arrived. Control endpoints:

- ``GET /_stats/<label>``                      counts and times as JSON
- ``GET /_wait/<label>?n=N&timeout=T``         blocks until N distinct ids arrived (or T seconds)
- ``POST /_forget/<label>``                    drops the label's ids (frees memory)
- ``POST /_latency/<label>?ms=M``              answers that label's requests after M ms, as a
                                               vendor's cloud some way off would
- ``POST /_flaky/<label>?every=N``             fails every Nth request of that label, in turn with
                                               503 ``Retry-After: 1``, 429, a connection reset,
                                               500 (nothing of a failed request is counted) and
                                               a slow answer (200 after ``SLOW`` seconds)

Run as ``python bench/sink_server.py``; it prints ``port <n>`` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Tally:
    """Distinct ids of one contender, and when they arrived."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.received = 0
        self.requests = 0
        self.bytes = 0
        self.first_at: float | None = None
        self.last_new_at: float | None = None
        self.errors: list[str] = []

    def stats(self) -> dict[str, Any]:
        return {
            "distinct": len(self.ids),
            "received": self.received,
            "duplicates": self.received - len(self.ids),
            "requests": self.requests,
            "bytes": self.bytes,
            "first_at": self.first_at,
            "last_new_at": self.last_new_at,
            "errors": self.errors[:5],
        }


TALLIES: dict[str, Tally] = {}
LATENCY: dict[str, float] = {}
FLAKY: dict[str, list[int]] = {}
"""Per label: [every, requests so far, failures so far]."""
FAILURES = ("503", "429", "reset", "500", "slow")
SLOW = 2.0
"""Seconds a slow answer takes (well within every client's timeout)."""
LOCK = threading.Condition()


def _ids(kind: str, body: bytes) -> list[str]:
    if kind == "track":
        form = urllib.parse.parse_qs(body.decode())
        events = json.loads(form["data"][0])
        if isinstance(events, dict):
            events = [events]
        return [str(e["properties"]["$insert_id"]) for e in events]
    data = json.loads(body)
    if kind == "batch/":
        return [str(e["uuid"]) for e in data["batch"]]
    if kind == "v1/batch":
        return [str(e["messageId"]) for e in data["batch"]]
    if kind == "2/httpapi":
        return [str(e["insert_id"]) for e in data["events"]]
    if kind == "ingest":
        return [str(e["id"]) for e in data]
    raise KeyError(kind)


def _answer(kind: str, n: int, size: int) -> bytes:
    if kind == "batch/":
        return b'{"status":1}'
    if kind == "2/httpapi":
        return json.dumps(
            {
                "code": 200,
                "events_ingested": n,
                "payload_size_bytes": size,
                "server_upload_time": int(time.time() * 1000),
            }
        ).encode()
    if kind == "track":
        return b'{"status":1,"error":null}'
    return b"{}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Nagle off: a vendor's server answers at once, and a delayed ACK (40 ms a request, as
    # headers and body go out in two writes) must not be what the benchmark measures.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        parts = self.path.split("/", 3)  # "", "c", label, kind
        if len(parts) == 3 and parts[1] == "_forget":
            with LOCK:
                TALLIES.pop(parts[2], None)
                LATENCY.pop(parts[2], None)
                FLAKY.pop(parts[2], None)
            self._send(200, b"{}")
            return
        if len(parts) == 3 and parts[1] == "_flaky":
            label, _, query = parts[2].partition("?")
            every = int(urllib.parse.parse_qs(query).get("every", ["0"])[0])
            with LOCK:
                FLAKY[label] = [every, 0, 0]
            self._send(200, b"{}")
            return
        if len(parts) == 3 and parts[1].startswith("_latency"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            LATENCY[parts[2].split("?")[0]] = float(query.get("ms", ["0"])[0]) / 1000
            self._send(200, b"{}")
            return
        if len(parts) != 4 or parts[1] != "c":
            self._send(404, b'{"error":"unknown path"}')
            return
        label, kind = parts[2], parts[3].split("?", 1)[0]
        failure = self._failure(label)
        if failure == "slow":
            time.sleep(SLOW)
            failure = None
        if failure == "reset":
            # An abortive close (RST), as a proxy that drops the connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if failure is not None:
            self.send_response(int(failure))
            if failure == "503":
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            ids = _ids(kind, body)
        except Exception as exc:
            with LOCK:
                TALLIES.setdefault(label, Tally()).errors.append(f"{type(exc).__name__}: {exc}")
            self._send(400, json.dumps({"error": str(exc)}).encode())
            return
        now = time.monotonic()
        with LOCK:
            tally = TALLIES.setdefault(label, Tally())
            before = len(tally.ids)
            tally.ids.update(ids)
            tally.received += len(ids)
            tally.requests += 1
            tally.bytes += length
            if tally.first_at is None:
                tally.first_at = now
            if len(tally.ids) > before:
                tally.last_new_at = now
                LOCK.notify_all()
        delay = LATENCY.get(label)
        if delay:
            time.sleep(delay)
        self._send(200, _answer(kind, len(ids), length))

    def _failure(self, label: str) -> str | None:
        """The failure this request meets under the label's flaky schedule, if any."""
        with LOCK:
            flaky = FLAKY.get(label)
            if flaky is None or flaky[0] <= 0:
                return None
            flaky[1] += 1
            if flaky[1] % flaky[0]:
                return None
            flaky[2] += 1
            return FAILURES[(flaky[2] - 1) % len(FAILURES)]

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")
        if len(parts) != 3 or parts[1] not in ("_stats", "_wait"):
            self._send(404, b'{"error":"unknown path"}')
            return
        label = parts[2]
        query = urllib.parse.parse_qs(url.query)
        with LOCK:
            tally = TALLIES.setdefault(label, Tally())
            if parts[1] == "_wait":
                want = int(query.get("n", ["0"])[0])
                deadline = time.monotonic() + float(query.get("timeout", ["60"])[0])
                while len(tally.ids) < want:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    LOCK.wait(left)
            stats = tally.stats()
        self._send(200, json.dumps(stats).encode())


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main() -> None:
    server = Server(("127.0.0.1", 0), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
