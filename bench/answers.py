"""What reading one hostile answer costs a sink, and what an ordinary answer costs.

    python bench/answers.py                     # hostile answers, then an ordinary one
    PYTHONPATH=<another checkout>/core/src python bench/answers.py --only ordinary   # compare

For each hostile body of ``tests/support/bodyserver.py`` (``huge``: 2 GiB; ``endless``:
chunked, never ending; ``bomb``: 64 MiB of zeros gzipped; ``trickle``, ``trickle_length``:
a byte every 50 ms; ``stall``: a byte every 50 ms for 0.9 s, then nothing), one request with a
sink ``timeout`` of 1 s through ``HttpTransport`` (httpx) and through ``requests_session``:
how long it took, the most memory traced meanwhile (tracemalloc), how much of the body the
server sent, and what the sink got (the length of the body, or the reason of the error). Then
the mean cost of a request to a loopback peer answering ``{}`` at once (best of 7 rounds of
1,000). Results go to ``bench/results/answers.json``. Code without the bounds reads a whole
hostile body (2 GiB into memory) or waits for a trickle for good: compare it on ``--only
ordinary``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

from bodyserver import BodyServer, PlainConfig, PlainSink  # noqa: E402

from waypost.errors import RetryableError  # noqa: E402
from waypost.sinks import SinkContext, requests_errors, requests_session  # noqa: E402

SHAPES = ("huge", "endless", "bomb", "trickle", "trickle_length", "stall")


def _sink(url: str) -> PlainSink:
    context = SinkContext(
        app="bench", version="1", instance_id="i", data_dir=Path(tempfile.mkdtemp())
    )
    return PlainSink("bench", PlainConfig(url=url, timeout=1.0), context)


def hostile(via: str, shape: str) -> dict[str, Any]:
    with BodyServer(shape) as server:
        sink = _sink(server.url)
        session = requests_session(sink)
        tracemalloc.start()
        started = time.monotonic()
        try:
            if via == "httpx":
                got: Any = len(sink.http.request("POST", content=b"[]").content)
            else:
                with requests_errors(sink, server.url):
                    got = len(session.post(server.url, data=b"[]", timeout=1.0).content)
        except RetryableError as exc:
            got = exc.reason
        seconds = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        session.close()
        sink.close()
        return {
            "via": via,
            "shape": shape,
            "seconds": round(seconds, 3),
            "peak_mib": round(peak / 2**20, 2),
            "sent_mib": round(server.sent / 2**20, 2),
            "got": got,
        }


def _peer() -> int:
    """A loopback peer answering every request with ``{}`` in one write."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        data = b""
        with conn:
            while chunk := conn.recv(65536):
                data += chunk
                while b"\r\n\r\n" in data:
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length")
                        ),
                        0,
                    )
                    if len(rest) < length:
                        break
                    data = rest[length:]
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def ordinary() -> dict[str, Any]:
    sink = _sink(f"http://127.0.0.1:{_peer()}/in")
    for _ in range(200):
        sink.http.request("POST", content=b"[]")
    rounds = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(1000):
            sink.http.request("POST", content=b"[]")
        rounds.append((time.perf_counter() - started) / 1000 * 1e6)
    sink.close()
    return {"request_us_best": round(min(rounds)), "request_us_median": round(sorted(rounds)[3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("hostile", "ordinary"))
    only = parser.parse_args().only
    results: dict[str, Any] = {}
    if only != "ordinary":
        results["hostile"] = [hostile(v, shape) for v in ("httpx", "requests") for shape in SHAPES]
    if only != "hostile":
        results["ordinary"] = ordinary()
    for row in results.get("hostile", ()):
        print(
            f"{row['via']:8} {row['shape']:15} {row['seconds']:6.2f} s  peak {row['peak_mib']:6.2f}"
            f" MiB  sent {row['sent_mib']:8.2f} MiB  -> {str(row['got'])[:70]}"
        )
    if "ordinary" in results:
        print(f"ordinary request: {results['ordinary']}")
    if only is None:
        out = ROOT / "bench" / "results" / "answers.json"
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
