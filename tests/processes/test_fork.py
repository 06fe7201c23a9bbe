"""``os.fork()`` at any moment: right after ``Telemetry()`` (a sink thread still opening its
client), during an outbox write transaction, and fifteen at once. Every child delivers its own
events itself, quickly; nothing is sent twice; the parent goes on."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import harness

from waypost.testing import RecordingServer

TRIALS = 8


def check_children(results: list[dict], got: dict[str, int], tags: list[str], twice: int) -> None:
    for tag, r in zip(tags, results, strict=True):
        assert not r.get("timeout"), r
        assert r["child"] == 0, r  # exit 0: the child's flush returned True
        # A stuck sink thread makes flush wait its whole budget (10 s) and shutdown say False.
        assert r["flush_seconds"] < 9, r
        assert r["shutdown"] is True, r
        assert r["parent_flush"] is True, r
        # Parent and child share the data dir: either may send what the other stored.
        assert sum(1 for k in got if k.startswith(f"{tag}-c")) == 100, r
        assert sum(1 for k in got if k.startswith(f"{tag}-p")) == 100, r
    assert twice == 0


def test_a_fork_soon_after_telemetry_is_safe(tmp_path: Path, env: dict[str, str]) -> None:
    """Forks 0-50 ms after ``Telemetry()``, as gunicorn ``--preload`` does: the sink thread may be
    importing or building its HTTP client at that moment."""
    tags = [f"t{i}" for i in range(TRIALS)]
    with RecordingServer() as ingest:
        url = f"{ingest.url}/ingest"
        procs = [
            harness.fork_trial(
                url, tmp_path / tag, env, tag=tag, before=f"time.sleep({random.uniform(0, 0.05)})"
            )
            for tag in tags
        ]
        results = [harness.finish(p) for p in procs]
        got = harness.rids(ingest)
        twice = harness.duplicates(ingest)
    check_children(results, got, tags, twice)


WRITER = """
import random
stop = False
def writer():
    i = 0
    while not stop:
        tel.track("w", {"rid": "w%d" % i})  # durability sync: each one a write transaction
        i += 1
threading.Thread(target=writer, daemon=True).start()
time.sleep(0.2 + random.random() * 0.05)
"""

SPILL = """
import random
for i in range(20000):
    tel.track("w", {"rid": "w%d" % i})
# the worker's code on another thread: one long transaction storing 20,000 events
threading.Thread(target=lambda: tel.pipeline.drain(store=True), daemon=True).start()
time.sleep(0.05 + random.random() * 0.1)
"""


def fork_during_writes(tmp_path: Path, env: dict[str, str], before: str, **extra: Any) -> None:
    tags = [f"t{i}" for i in range(3)]
    with RecordingServer() as ingest:
        url = f"{ingest.url}/ingest"
        procs = [
            harness.fork_trial(
                url, tmp_path / tag, env, tag=tag, before=before, flush=10, wait=30, **extra
            )
            for tag in tags
        ]
        results = [harness.finish(p, timeout=120) for p in procs]
        got = harness.rids(ingest)
        twice = harness.duplicates(ingest)
    for r in results:
        assert not r.get("timeout"), r
        assert r["child"] == 0, r  # a child that inherited a transaction hangs (killed at 30 s)
        assert r["flush_seconds"] < 9, r  # of 10: nothing waited for a lock to the end
        assert r["shutdown"] is True, r
    children = {tag: sum(1 for k in got if k.startswith(f"{tag}-c")) for tag in tags}
    assert children == dict.fromkeys(tags, 100), (children, results)
    assert twice == 0


def test_a_fork_during_a_long_outbox_transaction_is_safe(
    tmp_path: Path, env: dict[str, str]
) -> None:
    fork_during_writes(tmp_path, env, SPILL)


def test_a_fork_among_back_to_back_sync_writes_is_safe(tmp_path: Path, env: dict[str, str]) -> None:
    fork_during_writes(tmp_path, env, WRITER, telemetry={"outbox": {"durability": "sync"}})


STORM = """
import json
stop = False
def busy():
    i = 0
    while not stop:
        tel.track("busy", {{"rid": "busy%d" % i}})
        i += 1
        if i % 200 == 0:
            time.sleep(0.001)
threading.Thread(target=busy, daemon=True).start()
time.sleep(0.1)
pids = []
for n in range(15):
    pid = os.fork()
    if pid == 0:
        for i in range(100):
            tel.track("child", {{"rid": "k%d-%d" % (n, i)}})
        t = time.monotonic()
        ok = tel.flush(timeout=10)
        with open({report!r} + str(n), "w") as fh:
            json.dump({{"flush": ok, "seconds": time.monotonic() - t,
                       "delivered": tel.status().counters.delivered}}, fh)
        tel.shutdown(timeout=2)
        os._exit(0 if ok else 3)
    pids.append(pid)
deadline = time.monotonic() + 30
codes = {{}}
while pids and time.monotonic() < deadline:
    for pid in list(pids):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes[pid] = os.waitstatus_to_exitcode(status)
            pids.remove(pid)
    time.sleep(0.02)
for pid in pids:
    os.kill(pid, 9)
stop = True
print(json.dumps({{"hung": len(pids), "codes": sorted(codes.values()),
                  "parent_flush": tel.flush(timeout=10)}}))
tel.shutdown(5)
"""


def test_a_fork_storm_of_fifteen_children(tmp_path: Path, env: dict[str, str]) -> None:
    report = str(tmp_path / "child")
    with RecordingServer() as ingest:
        code = STORM.format(report=report)
        proc = harness.python(
            harness.script(
                f"tel = make({ingest.url + '/ingest'!r}, {str(tmp_path / 'd')!r})\n" + code
            ),
            env,
        )
        result = harness.finish(proc, timeout=120)
        got = harness.rids(ingest)
        twice = harness.duplicates(ingest)
    assert result.get("hung") == 0, result
    assert result["codes"] == [0] * 15, result
    assert result["parent_flush"] is True, result
    for n in range(15):
        child = json.loads(Path(report + str(n)).read_text())
        assert child["flush"] and child["seconds"] < 9, (n, child)  # a stuck one takes 10
        assert sum(1 for k in got if k.startswith(f"k{n}-")) == 100
    assert twice == 0
