"""Langflow's telemetry through waypost: every integration of its document as a config entry,
each pointed at a local stand-in that answers as the vendor does."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from waypost.errors import TrackError
from waypost.schedule import ManualClock
from waypost.testing import RecordingServer, Request, Response

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from langflow_app import Langflow, PlaygroundPayload  # noqa: E402

try:
    import waypost_warehouse  # noqa: F401

    WAREHOUSE = True
except ImportError:
    WAREHOUSE = False

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def vendors(request: Request) -> Response:
    """GA4, Mixpanel, Amplitude and the custom endpoint, each answering as it documents."""
    if request.path == "/mp/collect":
        return Response(204, b"")
    if request.path == "/track":
        return Response(200, {"status": 1, "error": None})
    if request.path == "/2/httpapi":
        n = len(request.json()["events"])
        return Response(200, {"code": 200, "events_ingested": n, "payload_size_bytes": 1})
    if request.path == "/events":
        return Response(200, {})
    return Response(404, {"error": "no such path"})


def config(tmp_path: Path) -> dict[str, Any]:
    """telemetry.yml as shipped; without waypost-warehouse its warehouse entry is left out."""
    data = yaml.safe_load((HERE / "telemetry.yml").read_text())
    if not WAREHOUSE:
        del data["telemetry"]["sinks"]["warehouse"]
    data["telemetry"].update(notice={"enabled": False}, batch={"interval": 0.05})
    return data


@pytest.fixture
def server() -> Any:
    with RecordingServer(vendors) as s:
        yield s


@pytest.fixture
def env(clean_env: dict[str, str], server: RecordingServer, tmp_path: Path) -> dict[str, str]:
    return {
        **clean_env,
        "GA4_API_SECRET": "ga4-secret-123",
        "GA4_HOST": server.url,
        "MIXPANEL_TOKEN": "mp-token-123",
        "MIXPANEL_HOST": server.url,
        "AMPLITUDE_API_KEY": "amp-key-123",
        "AMPLITUDE_HOST": server.url,
        "ANALYTICS_URL": f"{server.url}/events",
        "ANALYTICS_TOKEN": "custom-token-123",
        "WAREHOUSE_URL": f"sqlite:///{tmp_path / 'warehouse.db'}",
        "LANGFLOW_PROMETHEUS_PORT": "0",
    }


def start(env: dict[str, str], tmp_path: Path, **kwargs: Any) -> Langflow:
    return Langflow(config(tmp_path), env=env, data_dir=tmp_path / "data", strict=True, **kwargs)


def by_path(server: RecordingServer) -> dict[str, list[Request]]:
    out: dict[str, list[Request]] = {}
    for r in server.requests:
        out.setdefault(r.path, []).append(r)
    return out


def test_every_integration_from_config(
    env: dict[str, str], tmp_path: Path, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="waypost.telemetry")
    clock = ManualClock()
    app = start(env, tmp_path, clock=clock)
    app.run_flow("flow-1")
    app.telemetry.track(
        PlaygroundPayload(
            playground_seconds=120, playground_component_count=5, playground_success=True
        )
    )
    clock.advance(3600)
    assert app.telemetry.shutdown(timeout=20)
    names = ["version", "component", "component", "component", "run", "playground", "shutdown"]

    # The [TELEMETRY] lines, as Langflow logs them.
    lines = [r.getMessage() for r in caplog.records if r.name == "waypost.telemetry"]
    assert lines[0] == "[TELEMETRY] Endpoint: version"
    run = lines.index("[TELEMETRY] Endpoint: run")
    assert json.loads(lines[run + 1].removeprefix("[TELEMETRY] Payload: ")) == {
        "runIsWebhook": False,
        "runSeconds": 0,
        "runSuccess": True,
        "runErrorMessage": "",
    }
    assert lines[-2:] == [
        "[TELEMETRY] Endpoint: shutdown",
        '[TELEMETRY] Payload: {"timeRunning": 3600}',
    ]

    got = by_path(server)
    ga4 = [e for r in got["/mp/collect"] for e in r.json()["events"]]
    assert [e["name"] for e in ga4] == names
    assert got["/mp/collect"][0].query["api_secret"] == ["ga4-secret-123"]
    mixpanel = [e for r in got["/track"] for e in json.loads(r.form()["data"][0])]
    assert [e["event"] for e in mixpanel] == names
    amplitude = [e for r in got["/2/httpapi"] for e in r.json()["events"]]
    assert [e["event_type"] for e in amplitude] == names
    shutdown = next(e for e in amplitude if e["event_type"] == "shutdown")
    assert shutdown["event_properties"] == {"timeRunning": 3600}
    custom = [e for r in got["/events"] for e in r.json()]
    assert [e["name"] for e in custom] == names
    assert got["/events"][0].header("Authorization") == "Bearer custom-token-123"
    if WAREHOUSE:
        rows = sqlite3.connect(tmp_path / "warehouse.db").execute("SELECT name FROM waypost_events")
        assert sorted(r[0] for r in rows) == sorted(names)


@pytest.mark.skipif(
    not WAREHOUSE,
    reason="waypost-warehouse is not installed: its sql sink is left out of the other tests",
)
def test_warehouse_entry(env: dict[str, str], tmp_path: Path) -> None:
    app = start(env, tmp_path)
    assert app.telemetry.sinks["warehouse"].type == "sql"
    app.telemetry.shutdown(timeout=5)


def test_do_not_track(env: dict[str, str], tmp_path: Path, server: RecordingServer) -> None:
    app = start({**env, "DO_NOT_TRACK": "true"}, tmp_path)
    app.run_flow("flow-1")
    assert app.telemetry.shutdown(timeout=5)
    status = app.telemetry.status()
    assert not status.enabled and status.rule == "do_not_track"
    assert server.requests == [] and not (tmp_path / "data").exists()


def test_metrics_with_a_mandatory_flow_id(env: dict[str, str], tmp_path: Path) -> None:
    app = start(env, tmp_path)
    app.upload("flow-1", b"x" * 1024)
    app.upload("flow-1", b"y" * 10)
    with pytest.raises(TrackError, match="flow_id"):
        app.file_size.set(5, {})
    url = app.telemetry.metrics.exporter("otel").prometheus_url
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'file_size{flow_id="flow-1"} 10.0' in text
    assert 'num_files_uploaded_total{flow_id="flow-1"} 2.0' in text
    app.telemetry.shutdown(timeout=5)


def test_prometheus_enabled_false(env: dict[str, str], tmp_path: Path) -> None:
    app = start({**env, "PROMETHEUS_ENABLED": "false", "DO_NOT_TRACK": "1"}, tmp_path)
    app.upload("flow-1", b"x")
    registry = app.telemetry.metrics
    assert not registry.prometheus_enabled
    assert registry.exporter("otel").prometheus_url is None
    assert registry.points("file_size") == []  # nothing may read them: nothing is kept
    app.telemetry.shutdown(timeout=5)
