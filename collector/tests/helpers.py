"""Helpers shared by the collector's tests (imported as ``helpers``; conftest puts this
directory on ``sys.path``)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok-test-0123456789"
SECRET = "signing-secret-0123456789"


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def write_config(path: Path, section: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"collector": section}, sort_keys=False), encoding="utf-8")
    return path


def base_section(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "data_dir": str(data_dir),
        "apps": {"myapp": {"token": TOKEN, "signing_secret": SECRET}},
    }
    section.update(overrides)
    return section


class Served:
    """A collector app under uvicorn in a thread of this process."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn to start")

    @property
    def collector(self) -> Any:
        return self.app.state.collector

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


class Process:
    """``waypost collector serve`` in a child process (a real server that can be killed)."""

    def __init__(self, config: Path, port: int, *, workers: int = 1, env: dict[str, str]) -> None:
        self.config = config
        self.port = port
        self.workers = workers
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / f"serve-{port}.log"

    def start(self, wait: bool = True) -> Process:
        argv = [
            sys.executable, "-c", "import sys; from waypost.cli import main; main(sys.argv[1:])",
            "collector", "serve", "--config", str(self.config), "--port", str(self.port),
            "--workers", str(self.workers), "--log-level", "warning",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if wait:
            wait_for(self.healthy, 60, f"the collector on port {self.port} to answer")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the collector exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """``kill -9`` the server and all its workers."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


def stored_rows(data_dir: Path, table: str = "waypost_events") -> list[dict[str, Any]]:
    """The embedded storage's rows (JSON columns decoded)."""
    path = data_dir / "events.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            f"SELECT id, name, timestamp, instance_id, properties, context FROM {table}"
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    return [
        {
            "id": r[0], "name": r[1], "timestamp": r[2], "instance_id": r[3],
            "properties": json.loads(r[4]), "context": json.loads(r[5]),
        }
        for r in rows
    ]  # fmt: skip


def signed_headers(body: bytes, *, secret: str = SECRET, token: str = TOKEN) -> dict[str, str]:
    from waypost_http import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

    stamp = str(int(time.time()))
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(secret, stamp, body),
    }


def envelope(**overrides: Any) -> dict[str, Any]:
    """One event as the http sink sends it."""
    from waypost.testing import make_event

    data = make_event("run", {"runSeconds": 3}).to_dict()
    data.update(overrides)
    return data


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle`` (SQLite files and their WAL)."""
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
