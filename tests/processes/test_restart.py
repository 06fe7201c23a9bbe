"""A restart whose process has the dead one's PID (PID 1 in a container, every time) delivers
what the dead process had leased at once: leases name their process by PID and start time."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest

from waypost.testing import RecordingServer, Response

EVENTS = 1500

FIRST = """
# A send outlives the test: every batch stays leased until the kill (a send that timed out
# would go back to the outbox unleased, to be retried, and the count would move under us).
sinks = {{"ingest": {{"type": "http", "url": {url!r}, "timeout": 300}}}}
tel = make({url!r}, {data!r}, sinks=sinks)
for i in range({n}):
    tel.track("e", {{"rid": "r%d" % i}})
print(os.getpid(), flush=True)
time.sleep(60)  # killed: the batches in flight are stored, leased to this process
"""

SECOND = """
{wait}
t = time.monotonic()
tel = make({url!r}, {data!r})
ok = tel.flush(timeout=15)
print(os.getpid(), ok, time.monotonic() - t, tel.status().outbox_pending_events, flush=True)
tel.shutdown(2)
"""


def leased(data: Path) -> int:
    path = data / "outbox.sqlite3"
    if not path.exists():
        return 0
    query = "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND lease_until > ?"
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            return int(db.execute(query, (time.time(),)).fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not made yet
        return 0


def first_run(argv: list[str], url: str, data: Path, env: dict[str, str]) -> None:
    """A process that dies (kill -9) with every event leased to it."""
    code = harness.script(FIRST.format(url=url, data=str(data), n=EVENTS))
    proc = subprocess.Popen(
        [*argv, sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        count = leased(data)
        while count < EVENTS and time.monotonic() < deadline:
            time.sleep(0.05)
            count = leased(data)
        assert count == EVENTS
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pid_namespace() -> list[str] | None:
    """``unshare`` argv that runs a command as PID 1 of a new PID namespace, if allowed here."""
    if shutil.which("unshare") is None:
        return None
    for argv in (
        ["unshare", "--pid", "--fork", "--mount-proc"],
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"],
    ):
        probe = subprocess.run(
            [*argv, sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "1":
            return argv
    return None


def test_a_restart_as_pid_1_again_delivers_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    argv = pid_namespace()
    if argv is None:
        pytest.skip("no PID namespace here (unshare refused); the simulated lease test covers it")
    data = tmp_path / "d"
    hang = True
    with RecordingServer(lambda r: Response(hang=True) if hang else Response(200, {})) as ingest:
        url = f"{ingest.url}/ingest"
        first_run(argv, url, data, env)
        hang = False
        code = harness.script(SECOND.format(wait="", url=url, data=str(data)))
        second = subprocess.run(
            [*argv, sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        pid, ok, _, pending = second.stdout.split()
        assert pid == "1", second.stdout
        assert (ok, pending) == ("True", "0"), (second.stdout, second.stderr[-2000:])
        assert len(harness.rids(ingest)) == EVENTS


def test_a_lease_of_a_dead_process_with_our_pid_is_void(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The same without namespaces: the dead process's leases are rewritten to name the new
    process's PID (as a reused PID would), with the dead one's start time."""
    data = tmp_path / "d"
    hang = True
    with RecordingServer(lambda r: Response(hang=True) if hang else Response(200, {})) as ingest:
        url = f"{ingest.url}/ingest"
        first_run([], url, data, env)
        hang = False
        code = harness.script(SECOND.format(wait="sys.stdin.readline()", url=url, data=str(data)))
        second = subprocess.Popen(
            [sys.executable, "-c", "import os; print(os.getpid(), flush=True)\n" + code],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert second.stdout is not None and second.stdin is not None
        pid = int(second.stdout.readline())
        with sqlite3.connect(data / "outbox.sqlite3") as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            db.execute("UPDATE outbox SET lease_pid = ?", (pid,))
            if "lease_owner" in columns:  # "pid@start time@boot": ours, the dead one's start
                db.execute(
                    "UPDATE outbox SET lease_owner = ? || substr(lease_owner, "
                    "instr(lease_owner, '@'))",
                    (str(pid),),
                )
        second.stdin.write("go\n")
        second.stdin.flush()
        out, err = second.communicate(timeout=60)
        _, ok, _, pending = out.split()
        assert (ok, pending) == ("True", "0"), (out, err[-2000:])
        assert len(harness.rids(ingest)) == EVENTS
