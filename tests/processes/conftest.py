"""Fixtures of the process tests: real servers (gunicorn, uvicorn, hypercorn), real forks.

A server program that is not installed skips its tests with the reason, unless
WAYPOST_REQUIRE_SERVERS=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def need(*modules: str) -> None:
    """Skip (or fail, under WAYPOST_REQUIRE_SERVERS=1) unless ``modules`` are importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (the core's test group: uv sync --all-groups)"
    if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason}; WAYPOST_REQUIRE_SERVERS=1 forbids skipping")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _http_sink() -> None:
    """Every process test delivers through the http sink (``nox -s processes`` installs it)."""
    need("waypost_http")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    import harness

    return harness.app_env("", tmp_path)
