"""The Telemetry the test applications share, configured from the environment the tests set:
``PROC_URL`` (the http sink's endpoint), ``PROC_DATA`` (the data dir), ``PROC_SHUTDOWN``
(``shutdown_timeout``), ``PROC_INTERVAL`` (``batch.interval``)."""

from __future__ import annotations

import os
from typing import Any

import waypost


def make_telemetry(app: str) -> waypost.Telemetry:
    section: dict[str, Any] = {
        "notice": {"enabled": False},
        "batch": {"interval": float(os.environ.get("PROC_INTERVAL", "1"))},
        "retry": {"initial": 0.1, "maximum": 1.0},
        "shutdown_timeout": float(os.environ.get("PROC_SHUTDOWN", "5")),
        "sinks": {"ingest": {"type": "http", "url": os.environ["PROC_URL"], "timeout": 5}},
    }
    return waypost.Telemetry(
        app=app,
        version="1",
        data_dir=os.environ["PROC_DATA"],
        config={"telemetry": section},
        strict=False,
    )


def allow_all(request: object) -> bool:
    return True  # the tests' admin page: no login
