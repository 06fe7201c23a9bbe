from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent / "support"
sys.path.insert(0, str(SUPPORT))


@pytest.fixture
def urlsink(register_plugin):  # type: ignore[no-untyped-def]
    """Make the ``urltest`` sink type available as if installed."""
    register_plugin("urltest", "urlsink")
    return "urltest"


@pytest.fixture
def waypost_cli():  # type: ignore[no-untyped-def]
    exe = shutil.which("waypost")
    assert exe, "the waypost console script is not installed"
    return exe
