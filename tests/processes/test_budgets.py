"""``shutdown(timeout)`` and the exit budget (``shutdown_timeout``) hold with a heartbeat job
running: the job's wait counts against the same budget, never on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import harness

from waypost.testing import RecordingServer

SLOW_HEARTBEAT = """
import atexit, json
ended = []
atexit.register(lambda: print(json.dumps({{"exit_seconds": time.monotonic() - ended[0]}})))
tel = make({url!r}, {data!r}, shutdown_timeout=1)
running = threading.Event()
def facts():
    running.set()
    time.sleep(5)  # a slow query of the application's
    return {{}}
tel.heartbeat(every=3600, first_delay=0, time_of_day=None, facts=facts)
assert running.wait(10)
tel.track("before_stop")
if {mode!r} == "shutdown":
    t = time.monotonic()
    ok = tel.shutdown(1.0)
    print(json.dumps({{"shutdown_seconds": time.monotonic() - t, "ok": ok}}), flush=True)
ended.append(time.monotonic())
"""


# The budget is 1 s; the fault this guards against doubled it. The margin above 1 s absorbs a busy
# machine's scheduling (the bench and the issue's own check measure the 10 % bound).
BOUND = 1.5


def run(mode: str, tmp_path: Path, env: dict[str, str]) -> tuple[dict[str, float], int]:
    with RecordingServer() as ingest:
        code = SLOW_HEARTBEAT.format(
            url=f"{ingest.url}/ingest", data=str(tmp_path / mode), mode=mode
        )
        proc = harness.python(harness.script(code), env)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        figures: dict[str, float] = {}
        for line in out.splitlines():
            figures.update(json.loads(line))
        delivered = len(
            [e for e in harness.event_bodies(ingest.requests) if e["name"] == "before_stop"]
        )
    # Delivered within the budget, or (a machine too busy to open the sink in time) stored.
    return figures, delivered + len(harness.stored_rows(tmp_path / mode))


def test_shutdown_holds_its_budget_with_a_job_running(tmp_path: Path, env: dict[str, str]) -> None:
    figures, delivered = run("shutdown", tmp_path, env)
    assert figures["shutdown_seconds"] <= BOUND, figures
    assert delivered == 1


def test_exit_holds_shutdown_timeout_with_a_job_running(
    tmp_path: Path, env: dict[str, str]
) -> None:
    figures, delivered = run("exit", tmp_path, env)
    assert figures["exit_seconds"] <= BOUND, figures
    assert delivered == 1
