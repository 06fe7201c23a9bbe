"""How long another thread of the host waits while waypost's worker scrubs one huge value.

    python bench/scrub_wait.py                          # 65,536 and 900,000 characters
    python bench/scrub_wait.py --sizes 65536 --kinds log
    PYTHONPATH=<another checkout>/core/src python bench/scrub_wait.py   # that code, to compare

Each case runs in a fresh process: a ``Telemetry`` with a ``jsonl`` sink and
``telemetry.limits.value`` set to the size (``event_bytes`` left at its default when the value
fits in it), one ``track()`` of a 20 MB text (cut to the size before anything scans it), then
``flush()``. Meanwhile another thread calls ``time.perf_counter()`` in a loop and records the
largest gap between two calls, and the 99.9th percentile of the gaps over 0.1 ms. The same
thread is then measured beside a plain Python loop running as long (``reference``): what any
busy thread of the host costs its neighbours (the interpreter's switch interval, 5 ms, and the
machine's own load), the floor the scrubbers are measured against.

Kinds of text: ``log`` (lines of a web server's log, with addresses, IPs, paths and tokens to
redact), ``x`` (one character repeated: nothing to find, every rule searched to the end),
``json`` (minified JSON, no line breaks or blanks). Target (issue 18): the longest wait a few
milliseconds, next to the reference's. Results go to ``bench/results/scrub_wait.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from run import child_env, machine

HERE = Path(__file__).resolve().parent

CASE = r"""
import json, sys, tempfile, threading, time
import waypost

size, kind = int(sys.argv[1]), sys.argv[2]
line = ("2026-12-01T10:00:00Z INFO GET /api/v1/items?id=42 user=jane.doe@example.org "
        "from 10.0.0.12 home=/home/jane token=ghp_" + "a1B2" * 9 + " took 12ms\n")
unit = {"log": line, "x": "x",
        "json": '{"id":42,"email":"jane.doe@example.org","ip":"10.0.0.12","plan":"pro"},'}[kind]
text = (unit * (20_000_000 // len(unit) + 1))[:20_000_000]
limits = {"value": size}
if size > 900_000:
    limits["event_bytes"] = 2 * size
tel = waypost.Telemetry(
    app="bench-scrub-wait",
    config={"telemetry": {"notice": {"enabled": False}, "limits": limits,
                          "sinks": {"j": {"type": "jsonl", "path": "events.jsonl"}}}},
    data_dir=tempfile.mkdtemp(prefix="waypost-bench-scrub-"),
)
tel.track("warm", {"i": 0})
tel.flush(30)

def spin(stop, gaps):
    last = time.perf_counter()
    while not stop.is_set():
        now = time.perf_counter()
        if now - last > 0.0001:
            gaps.append(now - last)
        last = now

def measured(work):
    stop, gaps = threading.Event(), []
    spinner = threading.Thread(target=spin, args=(stop, gaps))
    spinner.start()
    time.sleep(0.05)
    started = time.perf_counter()
    result = work()
    took = time.perf_counter() - started
    stop.set()
    spinner.join()
    gaps.sort()
    p999 = gaps[int(len(gaps) * 0.999)] if gaps else 0.0
    return took, (gaps[-1] if gaps else 0.0), p999, result

def scrub():
    tel.track("huge", {"blob": text})
    return tel.flush(600)

took, longest, p999, flushed = measured(scrub)

def busy():  # a plain Python loop, as long as the scrubbing took
    end = time.perf_counter() + took
    while time.perf_counter() < end:
        sum(range(100))

_, ref_longest, ref_p999, _ = measured(busy)
st = tel.status()
print(json.dumps({"size": size, "kind": kind, "scrub_ms": round(took * 1000, 1),
                  "longest_wait_ms": round(longest * 1000, 2),
                  "p999_wait_ms": round(p999 * 1000, 2),
                  "reference_longest_ms": round(ref_longest * 1000, 2),
                  "reference_p999_ms": round(ref_p999 * 1000, 2), "flushed": flushed,
                  "delivered": st.counters.delivered, "dropped": st.counters.dropped}))
tel.shutdown(5)
"""


def case(size: int, kind: str, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CASE, str(size), kind],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"size": size, "kind": kind, "error": done.stderr[-800:]}
    return dict(json.loads(lines[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="65536,900000", help="limits.value, comma-separated")
    parser.add_argument("--kinds", default="log,x,json")
    args = parser.parse_args()
    env = child_env()
    started = time.time()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            print(f"[scrub-wait] {size:,} characters of {kind} ...", file=sys.stderr, flush=True)
            rows.append(case(size, kind, env))
            print("   ", rows[-1], file=sys.stderr, flush=True)
    results = {
        "command": "python bench/scrub_wait.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": machine(),
        "duration_s": round(time.time() - started, 1),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "cases": rows,
    }
    out = HERE / "results" / "scrub_wait.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"load average {results['load_average']}, {results['duration_s']:.0f} s")
    print(
        "| characters | kind | scrub ms | longest wait ms | p99.9 wait ms "
        "| reference longest ms | reference p99.9 ms |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']:,} | {r['kind']} | error: {r['error'][:80]} | | | | |")
            continue
        print(
            f"| {r['size']:,} | {r['kind']} | {r['scrub_ms']:,.0f} | {r['longest_wait_ms']:.1f} "
            f"| {r['p999_wait_ms']:.1f} | {r['reference_longest_ms']:.1f} "
            f"| {r['reference_p999_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
