"""``create_app`` under other ASGI servers, as the docs show them: hypercorn, and gunicorn with
uvicorn workers (forking after the import, so the collector's threads must start in each
worker); ``serve --workers 2`` sharing one data dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import base_section, envelope, signed_headers, stored_rows, wait_for, write_config

from waypost.testing import free_port


def _bin(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{name} is missing (WAYPOST_REQUIRE_SERVERS=1 forbids skipping)")
        pytest.skip(f"{name} is not installed (it is in the test dependency group)")
    return found


def _run_server(argv: list[str], port: int, env: dict[str, str], log: Path) -> Any:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, f"{argv[0]} to answer")
    return proc


def _stop(proc: Any) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _exercise(url: str, data: Path, batches: int = 8) -> None:
    sent = []
    for _ in range(batches):
        batch = [envelope() for _ in range(25)]
        body = json.dumps(batch).encode()
        answer = httpx.post(url + "/v1/myapp/events", content=body, headers=signed_headers(body))
        assert answer.status_code == 200 and answer.json()["accepted"] == 25, answer.text
        again = httpx.post(url + "/v1/myapp/events", content=body, headers=signed_headers(body))
        assert again.json()["duplicates"] == 25
        sent += [e["id"] for e in batch]
    rows = wait_for(lambda: len(r := stored_rows(data)) >= len(sent) and r, 30, "every row")
    counts = Counter(r["id"] for r in rows)
    assert set(counts) == set(sent) and set(counts.values()) == {1}


@pytest.mark.parametrize("server", ["hypercorn", "gunicorn"])
def test_other_asgi_servers(server: str, tmp_path: Path, child_env: dict[str, str]) -> None:
    data = tmp_path / "d"
    config = write_config(tmp_path / "c.yml", base_section(data))
    port = free_port()
    env = {**child_env, "WAYPOST_COLLECTOR_CONFIG": str(config)}
    target = "waypost_collector.app:from_environment()"
    if server == "hypercorn":
        argv = [_bin("hypercorn"), target, "--bind", f"127.0.0.1:{port}"]
    else:
        argv = [_bin("gunicorn"), "-k", "uvicorn.workers.UvicornWorker", "-w", "2",
                "-b", f"127.0.0.1:{port}", "--preload", target]  # fmt: skip
    proc = _run_server(argv, port, env, tmp_path / f"{server}.log")
    try:
        _exercise(f"http://127.0.0.1:{port}", data)
    finally:
        _stop(proc)


def test_serve_with_two_workers(tmp_path: Path, spawn: Any) -> None:
    data = tmp_path / "d"
    process = spawn(write_config(tmp_path / "c.yml", base_section(data)), workers=2)
    wait_for(lambda: httpx.get(process.url + "/readyz").status_code == 200, 30, "ready")
    _exercise(process.url, data, batches=16)


_GC_PROBE = """
import gc, json, sys
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient
from waypost_collector import create_app

collector = create_app(sys.argv[1])
host = Starlette(routes=[Mount("/telemetry", app=create_app(sys.argv[1]))])
seen = {"default": gc.get_threshold()}
with TestClient(host) as client:  # mounted in a host's app: its lifespan is the host's
    client.get("/telemetry/healthz")
    seen["mounted"] = gc.get_threshold()
with TestClient(collector) as client:  # the collector as the whole app of its process
    client.get("/healthz")
    seen["own"] = gc.get_threshold()
    seen["frozen"] = gc.get_freeze_count()
print(json.dumps(seen))
"""


def test_the_collector_tunes_the_gc_of_its_own_process_only(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    from waypost_collector.app import GC_THRESHOLDS

    config = write_config(tmp_path / "c.yml", base_section(tmp_path / "d"))
    done = subprocess.run(
        [sys.executable, "-c", _GC_PROBE, str(config)],
        env=child_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["mounted"] == seen["default"] != list(GC_THRESHOLDS)
    assert seen["own"] == list(GC_THRESHOLDS) and seen["frozen"] > 0
