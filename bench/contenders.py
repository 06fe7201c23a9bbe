"""One contender of the benchmark, run in a fresh process by ``run.py``.

``python bench/contenders.py NAME --port P --events N`` builds the client as a user would,
tracks N events with five properties each (timing every call), finishes as the SDK documents
(flush/shutdown; waypost: wait until the server holds every event, then shutdown), asks the
sink server what arrived and prints one JSON line with the measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections.abc import Callable
from typing import Any

EVENT = "bench_event"
USER = "user-0001"
PLANS = ("free", "team", "pro", "enterprise")


def properties(i: int) -> dict[str, Any]:
    """Five properties, as an application would send them."""
    return {
        "plan": PLANS[i & 3],
        "seats": i % 97,
        "duration_ms": 12.5 + (i % 1000) / 10,
        "success": i % 7 != 0,
        "feature": "export-csv",
    }


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class Server:
    def __init__(self, port: int, label: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.label = label
        self.prefix = f"{self.base}/c/{label}"

    def wait(self, n: int, timeout: float) -> dict[str, Any]:
        url = f"{self.base}/_wait/{self.label}?n={n}&timeout={timeout}"
        with urllib.request.urlopen(url, timeout=timeout + 30) as response:
            return dict(json.loads(response.read()))


# --- contenders: (setup) -> (track, finish) -------------------------------------------------

Track = Callable[[dict[str, Any]], Any]
Finish = Callable[[], Any]
RAISED = [0]
"""Tracking calls that raised (and were caught, as an application must)."""


def waypost_sink(sink: dict[str, Any], data_dir: str) -> tuple[Any, Track]:
    import waypost

    tel = waypost.Telemetry(
        app="bench",
        config={"telemetry": {"sinks": sink, "notice": {"enabled": False}}},
        data_dir=data_dir,
    )
    track = tel.track
    return tel, lambda props: track(EVENT, props)


def setup(name: str, server: Server, data_dir: str) -> tuple[Track, Finish, bool, Any]:
    """Returns track, finish, whether to wait for the server before finishing, the client."""
    prefix = server.prefix
    if name in ("waypost-http", "waypost-1m"):
        tel, track = waypost_sink({"bench": {"type": "http", "url": f"{prefix}/ingest"}}, data_dir)
        return track, lambda: tel.shutdown(timeout=30), True, tel
    if name == "waypost-posthog":
        sink = {"posthog": {"api_key": "phc_bench", "host": prefix}}
        tel, track = waypost_sink(sink, data_dir)
        return track, lambda: tel.shutdown(timeout=30), True, tel
    if name == "posthog":
        from posthog import Posthog

        ph = Posthog("phc_bench", host=prefix)
        capture = ph.capture
        return (
            lambda props: capture(EVENT, distinct_id=USER, properties=props),
            ph.shutdown,
            False,
            ph,
        )
    if name == "segment":
        from segment.analytics import Client

        client = Client(write_key="bench", host=prefix)
        track = client.track
        return lambda props: track(USER, EVENT, props), client.shutdown, False, client
    if name == "amplitude":
        from amplitude import Amplitude, BaseEvent, Config

        amp = Amplitude("bench_key", Config(server_url=f"{prefix}/2/httpapi"))
        track = amp.track

        def amp_track(props: dict[str, Any]) -> None:
            track(BaseEvent(event_type=EVENT, user_id=USER, event_properties=props))

        def amp_finish() -> None:
            amp.flush()
            amp.shutdown()

        return amp_track, amp_finish, False, amp
    if name == "mixpanel":
        from mixpanel import BufferedConsumer, Mixpanel, MixpanelException

        consumer = BufferedConsumer(events_url=f"{prefix}/track")
        mp = Mixpanel("bench_token", consumer=consumer)
        track = mp.track

        def mp_track(props: dict[str, Any]) -> None:
            # The tracking call sends a full buffer itself and raises when that fails: an
            # application has to catch it (the batch it was sending is lost).
            try:
                track(USER, EVENT, props)
            except MixpanelException:
                RAISED[0] += 1

        return mp_track, consumer.flush, False, mp
    raise SystemExit(f"unknown contender {name!r}")


def percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    index = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[index] / 1000


def burst(
    name: str, port: int, n: int, bound: float, idle: float, label: str | None = None
) -> dict[str, Any]:
    server = Server(port, label or f"{name}-{os.getpid()}")
    data_dir = tempfile.mkdtemp(prefix=f"waypost-bench-{name}-")
    started = time.perf_counter()
    track, finish, wait_first, _client = setup(name, server, data_dir)
    setup_ms = (time.perf_counter() - started) * 1000
    # An application starts, then work arrives: every contender gets the same second to finish
    # starting (threads, sessions) before the burst; its construction time is setup_ms.
    time.sleep(idle)
    rss_before = current_rss_mib()
    timing = name != "waypost-1m"  # a million timestamps would weigh on the RSS measured
    lat = array("q", bytes(8 * n)) if timing else array("q")
    clock = time.perf_counter_ns
    gc.collect()

    t0 = time.monotonic()
    if timing:
        for i in range(n):
            props = properties(i)
            start = clock()
            track(props)
            lat[i] = clock() - start
    else:
        for i in range(n):
            track(properties(i))
    t_tracked = time.monotonic()

    finished_in_bound = True
    errors: list[str] = []

    def run_finish() -> None:
        try:
            finish()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    if wait_first:
        stats = server.wait(n, bound - (time.monotonic() - t0))
    thread = threading.Thread(target=run_finish, daemon=True)
    thread.start()
    thread.join(max(1.0, bound - (time.monotonic() - t0)))
    if thread.is_alive():
        finished_in_bound = False
    t_finished = time.monotonic()
    # Whatever the SDK sent before its flush/shutdown returned has arrived; a short grace
    # catches an answer still on the wire.
    stats = server.wait(n, 0 if wait_first else 2.0)
    distinct = stats["distinct"]
    last = stats["last_new_at"]
    lat_sorted = sorted(lat)
    result = {
        "name": name,
        "events": n,
        "setup_ms": round(setup_ms, 1),
        "track_median_us": round(percentile(lat_sorted, 0.5), 3) if timing else None,
        "track_p99_us": round(percentile(lat_sorted, 0.99), 3) if timing else None,
        "track_p999_us": round(percentile(lat_sorted, 0.999), 1) if timing else None,
        "track_max_us": round(lat_sorted[-1] / 1000, 1) if timing else None,
        "track_calls_mean_us": round(sum(lat_sorted) / n / 1000, 3) if timing else None,
        "track_over_50ms": sum(1 for x in lat_sorted if x > 50_000_000) if timing else None,
        "track_over_100ms": sum(1 for x in lat_sorted if x > 100_000_000) if timing else None,
        "track_mean_us": round((t_tracked - t0) * 1e6 / n, 3),
        "burst_s": round(t_tracked - t0, 3),
        "finish_s": round(t_finished - t_tracked, 3),
        "finished_in_bound": finished_in_bound,
        "delivered": distinct,
        "lost": n - distinct,
        "duplicates": stats["duplicates"],
        "requests": stats["requests"],
        "bytes": stats["bytes"],
        "end_to_end_s": round(last - t0, 3) if last is not None and distinct == n else None,
        "last_arrival_s": round(last - t0, 3) if last is not None else None,
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(rss_mib(), 1),
        "server_errors": stats["errors"],
        "track_raised": RAISED[0],
        "errors": errors,
    }
    return result


def off_path(n: int) -> dict[str, Any]:
    """``track`` with DO_NOT_TRACK=1, against an empty method call for scale."""
    os.environ["DO_NOT_TRACK"] = "1"
    import waypost

    data_dir = tempfile.mkdtemp(prefix="waypost-bench-off-")
    tel = waypost.Telemetry(
        app="bench", config={"telemetry": {"notice": {"enabled": False}}}, data_dir=data_dir
    )
    assert not tel.enabled, tel.status().rule
    props = properties(1)

    class Empty:
        def track(self, event: Any, properties: Any = None) -> None:
            pass

    def per_call(fn: Callable[[str, Any], Any]) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(n):
                fn(EVENT, props)
            best = min(best, (time.perf_counter_ns() - start) / n / 1000)
        return best

    def loop_only() -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter_ns()
            for _ in range(n):
                pass
            best = min(best, (time.perf_counter_ns() - start) / n / 1000)
        return best

    track = tel.track
    return {
        "name": "waypost-off",
        "calls": n,
        "rule": tel.status().rule,
        "track_us": round(per_call(track), 4),
        "empty_method_us": round(per_call(Empty().track), 4),
        "loop_us": round(loop_only(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--bound", type=float, default=120.0)
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    os.environ.pop("DO_NOT_TRACK", None)
    if args.name == "waypost-off":
        result = off_path(args.events)
    else:
        result = burst(args.name, args.port, args.events, args.bound, args.idle, args.label)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # some SDKs hold the interpreter at exit (non-daemon threads, atexit joins)


if __name__ == "__main__":
    main()
