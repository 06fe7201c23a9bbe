"""Restarts, kill -9, fork and several processes on one data dir: real processes, real files."""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from waypost.testing import RecordingServer, Request, Response, free_port

SUPPORT = Path(__file__).parent / "support"


def ids_of(requests: list[Request]) -> list[str]:
    return [e["id"] for r in requests if r.body for e in r.json()]


def script(body: str) -> str:
    return textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(SUPPORT)!r})
        import waypost
        from urlsink import UrlSink
        def make(url, data_dir, **extra):
            return waypost.Telemetry(
                app="proc", version="1", data_dir=data_dir, sink_classes=[UrlSink], strict=True,
                config={{"telemetry": {{"notice": {{"enabled": False}},
                        "batch": {{"interval": 0.05}}, "retry": {{"initial": 0.05, "maximum": 0.5}},
                        "sinks": {{"dest": {{"type": "urltest", "url": url, **extra}}}}}}}},
            )
        """
    ) + textwrap.dedent(body)


def run(code: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def restart_and_deliver(port: int, data: Path, env: dict[str, str]) -> list[str]:
    """Start a new process on ``data`` with a healthy server on ``port``; once it has flushed
    with nothing left pending, the ids the server received."""
    url = f"http://127.0.0.1:{port}/ingest"
    with RecordingServer(port=port) as server:
        second = run(
            script(
                f"""
                tel = make({url!r}, {str(data)!r})
                assert tel.flush(timeout=20)
                print(tel.status().outbox_pending_events)
                tel.shutdown()
                """
            ),
            env,
        )
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert out.strip() == "0"
        return ids_of(server.requests)


def test_kill_9_after_flush_loses_nothing(tmp_path: Path, clean_env: dict[str, str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/ingest"
    data = tmp_path / "data"
    first = run(
        script(
            f"""
            tel = make({url!r}, {str(data)!r})
            for i in range(500):
                tel.track("before_kill", {{"i": i}})
            assert tel.flush(timeout=10)
            print("flushed", flush=True)
            time.sleep(60)
            """
        ),
        clean_env,
    )
    assert first.stdout is not None
    line = first.stdout.readline()
    assert line.strip() == "flushed", first.stderr.read() if first.stderr else ""
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    counts = collections.Counter(restart_and_deliver(port, data, clean_env))
    assert len(counts) == 500


def test_kill_9_while_a_batch_is_in_flight_loses_nothing(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    # Events are sent from memory; once they have waited batch.interval (0.05 s here) they are
    # stored too, even while their request hangs, so a kill -9 cannot lose them.
    port = free_port()
    url = f"http://127.0.0.1:{port}/ingest"
    data = tmp_path / "data"
    with RecordingServer(lambda r: Response(hang=True), port=port):
        first = run(
            script(
                f"""
                tel = make({url!r}, {str(data)!r}, timeout=60)
                for i in range(300):
                    tel.track("in_flight", {{"i": i}})
                print("tracked", flush=True)
                time.sleep(60)
                """
            ),
            clean_env,
        )
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "tracked"
        deadline = time.monotonic() + 10
        stored = 0
        while time.monotonic() < deadline and stored < 300:
            time.sleep(0.1)
            if (data / "outbox.sqlite3").exists():
                with sqlite3.connect(data / "outbox.sqlite3") as db:
                    query = "SELECT COUNT(*) FROM outbox WHERE state = 'pending'"
                    stored = db.execute(query).fetchone()[0]
        assert stored == 300
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert len(set(restart_and_deliver(port, data, clean_env))) == 300


def test_fork_child_delivers_its_own_events_only(tmp_path: Path, clean_env: dict[str, str]) -> None:
    with RecordingServer() as server:
        url = f"{server.url}/ingest"
        proc = run(
            script(
                f"""
                tel = make({url!r}, {str(tmp_path / "d")!r})
                for i in range(10):
                    tel.track("parent_before", {{"i": i}})
                for i in range(5):
                    tel.track("buffered_at_fork", {{"i": i}})
                pid = os.fork()
                if pid == 0:
                    for i in range(10):
                        tel.track("child", {{"i": i}})
                    ok = tel.flush(timeout=10)
                    tel.shutdown(timeout=5)
                    os._exit(0 if ok else 3)
                for i in range(10):
                    tel.track("parent_after", {{"i": i}})
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
                assert tel.flush(timeout=10)
                tel.shutdown()
                """
            ),
            clean_env,
        )
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        names = collections.Counter(e["name"] for r in server.requests for e in r.json())
        ids = ids_of(server.requests)
    assert names == {"parent_before": 10, "buffered_at_fork": 5, "child": 10, "parent_after": 10}
    assert len(ids) == len(set(ids)) == 35


def test_processes_sharing_a_data_dir_neither_lose_nor_duplicate(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with RecordingServer() as server:
        url = f"{server.url}/ingest"
        procs = [
            run(
                script(
                    f"""
                    tel = make({url!r}, {str(tmp_path / "shared")!r})
                    for i in range(400):
                        tel.track("worker", {{"w": {n}, "i": i}})
                    assert tel.flush(timeout=30)
                    tel.shutdown()
                    """
                ),
                clean_env,
            )
            for n in range(3)
        ]
        for p in procs:
            _, err = p.communicate(timeout=90)
            assert p.returncode == 0, err
        counts = collections.Counter(ids_of(server.requests))
    assert len(counts) == 1200
    assert max(counts.values()) == 1


def test_restart_does_not_resend_what_was_delivered(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with RecordingServer() as server:
        url = f"{server.url}/ingest"
        for _ in range(2):
            p = run(
                script(
                    f"""
                    tel = make({url!r}, {str(tmp_path / "d")!r})
                    tel.track("once")
                    assert tel.flush(timeout=10)
                    tel.shutdown()
                    """
                ),
                clean_env,
            )
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        ids = ids_of(server.requests)
    assert len(ids) == 2 and len(set(ids)) == 2


def test_events_tracked_before_exit_are_delivered_by_the_at_exit_hook(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with RecordingServer() as server:
        p = run(
            script(
                f"""
                tel = make({server.url + "/ingest"!r}, {str(tmp_path / "d")!r})
                for i in range(300):
                    tel.track("at_exit", {{"i": i}})
                """
            ),
            clean_env,
        )
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        ids = ids_of(server.requests)
    assert len(set(ids)) == 300


def test_exit_is_bounded_when_the_server_hangs(tmp_path: Path, clean_env: dict[str, str]) -> None:
    from waypost.testing import Response

    with RecordingServer(lambda r: Response(hang=True)) as server:
        p = run(
            script(
                f"""
                tel = make({server.url + "/ingest"!r}, {str(tmp_path / "d")!r}, timeout=60)
                tel.track("hang")
                time.sleep(0.3)
                print(time.time(), flush=True)
                """
            ),
            clean_env,
        )
        out, err = p.communicate(timeout=60)
        exited = time.time()
    assert p.returncode == 0, err
    # From the script's end to the process's exit (the interpreter's start-up, slow on a busy
    # machine, is not the at-exit hook's): the at-exit budget (shutdown_timeout, 3 s) bounds it
    # although the server never answers and the sink's timeout is 60 s.
    assert exited - float(out.split()[-1]) < 10
