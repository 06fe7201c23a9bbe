"""The project key echoed back by a PostHog endpoint is printed nowhere: not in a log line of
any level or logger, not in ``status()``, not in an outbox row, not in a repr."""

from __future__ import annotations

import html
import json
import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

import waypost
from waypost.testing import RecordingServer, Response

API_KEY = "phc_EchoedProjectKey12345678"


def echo(request: Any) -> Response:
    """Refuses every batch and quotes back what it was sent (the key is in the body)."""
    status = 500 if request.path.startswith("/batch") else 401
    body = f"refused {request.text[:300]} key={API_KEY} api_key: {API_KEY}"
    return Response(status, {"error": body, "detail": {"api_key": API_KEY}})


def readable(text: str) -> bool:
    views = (text, urllib.parse.unquote(text), html.unescape(text), text.replace("\\/", "/"))
    return any(API_KEY in view for view in views)


def test_an_echoed_project_key_is_printed_nowhere(
    tmp_path: Path, waypost_clean_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx's and httpcore's included
    with RecordingServer(echo) as server:
        tel = waypost.Telemetry(
            config={
                "telemetry": {
                    "app": "secrets",
                    "data_dir": str(tmp_path / "data"),
                    "notice": {"enabled": False},
                    "batch": {"interval": 0.05},
                    "retry": {"initial": 0.05, "maximum": 0.2},
                    "sinks": {"posthog": {"api_key": API_KEY, "host": server.url}},
                }
            },
            env=waypost_clean_env,
        )
        try:
            for i in range(3):
                tel.track("echo", {"i": i})
            deadline = time.monotonic() + 60  # the SDK is imported on the sink's thread
            while not tel.status().sinks[0].last_error and time.monotonic() < deadline:
                tel.flush(1)
            st = tel.status()
            (sink,) = st.sinks
            records, _ = tel.open_outbox().records(limit=50)
            shown = {
                "logs": caplog.text,
                "status": st.model_dump_json(),
                "outbox": json.dumps([r.as_dict() for r in records], default=str),
                "repr": repr(tel.config) + repr(tel.sinks["posthog"]),
            }
        finally:
            tel.shutdown(2)
        received = [r.text for r in server.requests if r.path.startswith("/batch")]
    assert sink.last_error and "500" in sink.last_error
    assert any(r.last_error for r in records)
    for where, text in shown.items():
        assert not readable(text), where
    assert received and readable(received[0])  # the search could have found it
