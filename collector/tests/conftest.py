"""Real peers for the collector's tests: the collector served by uvicorn on a free loopback
port (in this process, or as ``waypost collector serve`` in a child that tests kill with
``kill -9``), applications sending through waypost's own http sink, a throwaway PostgreSQL
and fakesnow's Snowflake server (the warehouse tests' own fixtures), DuckDB and SQLite files."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from waypost.testing import free_port

sys.path.insert(0, str(Path(__file__).parent))

from helpers import REPO, SECRET, TOKEN, Process, Served

# The warehouse tests start a PostgreSQL cluster for the session; the same fixture serves here.
_peers_spec = importlib.util.spec_from_file_location(
    "waypost_warehouse_test_peers", REPO / "plugins" / "warehouse" / "tests" / "conftest.py"
)
assert _peers_spec is not None and _peers_spec.loader is not None
_peers = importlib.util.module_from_spec(_peers_spec)
sys.modules[_peers_spec.name] = _peers  # its dataclasses look their module up
_peers_spec.loader.exec_module(_peers)
postgres_url = _peers.postgres_url
fakesnow_url = _peers.fakesnow_url  # fakesnow's Snowflake server (Python 3.11+)
snowflake_db = _peers.snowflake_db


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """``serve(config)``: the collector for ``config`` (a file or a mapping) on a free port."""
    from waypost_collector import create_app

    running: list[Served] = []

    def start(config: Any, **kwargs: Any) -> Served:
        served = Served(create_app(config, **kwargs), free_port())
        running.append(served)
        return served

    yield start
    for served in running:
        served.stop()


@pytest.fixture
def child_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k != "DO_NOT_TRACK" and not k.startswith("WAYPOST_")
    }


@pytest.fixture
def spawn(child_env: dict[str, str]) -> Iterator[Callable[..., Process]]:
    """``spawn(config_file)``: ``waypost collector serve`` on a free port, stopped afterwards."""
    made: list[Process] = []

    def start(config: Path, *, workers: int = 1, port: int | None = None) -> Process:
        process = Process(config, port or free_port(), workers=workers, env=child_env).start()
        made.append(process)
        return process

    yield start
    for process in made:
        process.stop()


@pytest.fixture
def make_client(tmp_path: Path, child_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    """``make_client(url, **sink_settings)``: a waypost Telemetry whose http sink posts to the
    collector's events endpoint (``config``: more of its ``telemetry`` section; ``clock``,
    ``env``: as ``Telemetry`` takes them); shut down after the test."""
    import waypost

    made: list[Any] = []
    counter = iter(range(1_000_000))

    def make(
        url: str,
        *,
        app: str = "myapp",
        version: str = "1.2.0",
        config: dict[str, Any] | None = None,
        clock: Any = None,
        env: dict[str, str] | None = None,
        **sink: Any,
    ) -> Any:
        settings: dict[str, Any] = {
            "type": "http",
            "url": f"{url}/v1/{app}/events",
            "headers": {"Authorization": f"Bearer {TOKEN}"},
            "signing_secret": SECRET,
            "gzip": True,
            **sink,
        }
        section = {
            "notice": {"enabled": False},
            "batch": {"interval": 0.05},
            "retry": {"initial": 0.05, "maximum": 0.5},
            "sinks": {"collector": settings},
            **(config or {}),
        }
        tel = waypost.Telemetry(
            app=app, version=version, config={"telemetry": section}, strict=True,
            env=child_env if env is None else env, data_dir=tmp_path / f"client-{next(counter)}",
            clock=clock,
        )  # fmt: skip
        made.append(tel)
        return tel

    yield make
    for tel in made:
        tel.shutdown(timeout=2)


@pytest.fixture
def clean_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MB tmpfs: a disk that really fills up. Needs the right to mount (root here)."""
    import subprocess

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
