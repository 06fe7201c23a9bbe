"""Per-event cost of each stage of the worker side, in one process, without a server.

    python bench/stages.py [--events 20000]

Prints microseconds per event (best of three) for: building the envelope (``Gate.build``:
coercion, scrubbing, UUIDv7), scrubbing texts the scrubber has not seen before (one per event:
ids, URLs, paths, messages), the ``http`` sink's body, the ``posthog`` sink's messages and
posthog-python's own serialiser, and the outbox's write and lease (what a spill costs). Needs the
bench requirements (``uv run nox -s bench`` installs them); nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

from contenders import EVENT, properties

import waypost
import waypost.privacy


def best(fn: Callable[[], Any], n: int, rounds: int = 3) -> float:
    """Microseconds per event of ``fn`` (which handles ``n`` events), best of ``rounds``."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e6 / n


def new_texts(n: int) -> list[str]:
    """``n`` distinct free-form texts as events carry them, none holding anything to redact."""
    shapes = (
        "/app/flows/export-{i}.json",
        "https://api.example.com/v1/flows/{i}?page=2&sort=desc",
        "flow {i} failed: TimeoutError after 30.0s in ChatOpenAI-{i}",
        "2024-11-25T12:{m:02d}:{s:02d}.{i:03d}Z",
        "run-{i:08x}-{m:04x}",
    )
    return [shapes[i % len(shapes)].format(i=i, m=i % 60, s=(i // 60) % 60) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    n = parser.parse_args().events
    sinks = {
        "http": {"type": "http", "url": "http://127.0.0.1:9/ingest"},
        "posthog": {"type": "posthog", "api_key": "phc_stages", "host": "http://127.0.0.1:9"},
    }
    # Nothing is tracked: the sinks' threads idle while the stages are called directly.
    tel = waypost.Telemetry(
        app="stages",
        config={"telemetry": {"sinks": sinks, "notice": {"enabled": False}}},
        data_dir=tempfile.mkdtemp(prefix="waypost-stages-"),
    )
    try:
        items = [(EVENT, properties(i), time.time(), None, None) for i in range(n)]
        events = tel.gate.build(items)
        http, posthog = tel.sinks["http"], tel.sinks["posthog"]
        posthog.open()
        batches = [events[i : i + 1000] for i in range(0, n, 1000)]
        messages = [[posthog.message(e) for e in batch] for batch in batches]
        from posthog.request import DatetimeSerializer

        outbox = tel.open_outbox()

        texts = new_texts(n)

        def scrub_new_texts() -> None:
            scrubber = waypost.privacy.Scrubber()
            for text in texts:
                scrubber.scrub_text(text, "properties.detail", [])

        def store_and_lease() -> None:
            for batch in batches:
                outbox.add(batch, ["stages"])
            while leased := outbox.lease("stages", 1000, lease_seconds=60):
                outbox.delivered([seq for seq, _, _ in leased], keep=False)

        figures = {
            "build the envelope (Gate.build)": best(lambda: tel.gate.build(items), n),
            "scrub a text not seen before (Scrubber.scrub_text)": best(scrub_new_texts, n),
            "http sink body (HttpSink.encode)": best(lambda: [http.encode(b) for b in batches], n),
            "posthog messages (PosthogSink.message)": best(
                lambda: [[posthog.message(e) for e in b] for b in batches], n
            ),
            "posthog-python serialiser (json.dumps, cls=DatetimeSerializer)": best(
                lambda: [json.dumps({"batch": m}, cls=DatetimeSerializer) for m in messages], n
            ),
            "outbox write, lease and delete (a spill)": best(store_and_lease, n, rounds=1),
        }
    finally:
        tel.shutdown(timeout=2)
    width = max(len(k) for k in figures)
    print(f"{n:,} events, five properties each; microseconds per event (best of three)")
    for name, us in figures.items():
        print(f"  {name:<{width}}  {us:6.2f}")


if __name__ == "__main__":
    main()
