"""``multiprocessing`` children (fork, forkserver, spawn) that return without ``flush()``
deliver what they tracked: multiprocessing's own finalizers run before its ``os._exit``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import harness
import pytest

from waypost.testing import RecordingServer


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_children_that_return_deliver_what_they_tracked(method: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RecordingServer() as ingest:
        env = harness.app_env(f"{ingest.url}/ingest", data, PROC_SHUTDOWN="5")
        proc = subprocess.run(
            [sys.executable, str(harness.APPS / "mp_children.py"), method],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        got = {k for k in harness.rids(ingest) if k.startswith(method)}
    assert report["exitcodes"] == [0, 0], (report, proc.stderr)
    assert len(got) == 1000, (len(got), report, proc.stderr[-2000:])
    assert "still busy" not in proc.stderr, proc.stderr[-2000:]
