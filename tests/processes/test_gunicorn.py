"""gunicorn (sync and gthread workers; plain, ``--preload``, ``--max-requests``): every
request's event delivered once, no stuck worker, a graceful stop within its budget."""

from __future__ import annotations

import signal
from pathlib import Path

import harness
import pytest
from conftest import need

pytestmark = pytest.mark.server

REQUESTS = 1500
RECYCLE = ["--max-requests", "300", "--max-requests-jitter", "50"]
CASES = {
    "sync": ("sync", []),
    "sync-preload": ("sync", ["--preload"]),
    "sync-recycle": ("sync", RECYCLE),
    "sync-preload-recycle": ("sync", ["--preload", *RECYCLE]),
    "gthread": ("gthread", []),
    "gthread-preload": ("gthread", ["--preload"]),
}


def check_delivered_once(result: harness.Count) -> None:
    summary = result.summary()
    assert len(result.served) >= REQUESTS * 0.98, summary  # recycling may refuse a few
    assert not result.lost, summary
    assert set(result.delivered) >= result.served, summary  # delivered, not merely stored
    # No event twice (a rid may come twice: the client sends a request again when a recycling
    # worker closed the connection without an answer, and each request is an event).
    assert result.duplicate_ids == 0, summary
    assert "still busy at shutdown" not in result.log, result.log[-3000:]
    assert "Traceback" not in result.log, result.log[-3000:]
    assert result.returncode == 0, summary


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_every_request_is_delivered_once(case: str, tmp_path: Path) -> None:
    need("gunicorn", "flask")
    worker, options = CASES[case]
    result = harness.run_server(
        lambda port: harness.gunicorn_argv(port, worker=worker, options=options),
        tmp_path,
        requests=REQUESTS,
    )
    check_delivered_once(result)
    # Graceful: each worker delivers what it holds within shutdown_timeout (5 s here), and the
    # master has nothing of its own to wait for.
    assert result.stop_seconds < 15, result.summary()


def test_submit_now_during_sigterm_loses_nothing(tmp_path: Path) -> None:
    need("gunicorn", "flask")
    for trial in range(2):
        result = harness.run_server(
            lambda port: harness.gunicorn_argv(port, options=["--preload"]),
            tmp_path / str(trial),
            requests=200,
            submit_now=True,
        )
        assert not result.lost, result.summary()
        assert result.duplicate_ids == 0, result.summary()
        assert "still busy at shutdown" not in result.log, result.log[-3000:]
        answer = result.extra["submit_now"]
        if answer != "no answer":  # the worker may have stopped before answering: that is fine
            status, data = answer
            assert status == 200 and data.get("ok") is True, answer


def test_submit_now_says_what_flush_achieved(tmp_path: Path) -> None:
    """A healthy destination: "Submit now" is quick and says everything went; a hung one: it
    says what is still pending instead of ok."""
    need("gunicorn", "flask")
    from waypost.testing import RecordingServer, Response, free_port

    hang = False
    with RecordingServer(lambda r: Response(hang=True) if hang else Response(200, {})) as ingest:
        env = harness.app_env(f"{ingest.url}/ingest", tmp_path / "data", PROC_SHUTDOWN="2")
        port = free_port()
        argv = harness.gunicorn_argv(port, options=["--preload"])
        with harness.served(argv, env, port, tmp_path) as server:
            server.load(100)
            status, data, took = server.submit_now()
            assert status == 200 and data.get("ok") is True, data
            assert took < 10, took
            hang = True
            server.load(20, prefix="h")
            status, data, took = server.submit_now()
            assert data.get("ok") is not True, data
            server.stop(signal.SIGTERM)
