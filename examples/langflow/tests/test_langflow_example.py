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

import waypost
from waypost.errors import TrackError
from waypost.schedule import ManualClock
from waypost.testing import RecordingServer, Request, Response

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

import langflow_app  # noqa: E402
from langflow_app import Langflow, PlaygroundPayload, RunPayload  # noqa: E402

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


def jsonl(env: dict[str, str], tmp_path: Path) -> tuple[Langflow, Path]:
    """The stand-in writing to a jsonl file only: what leaves, event by event."""
    path = tmp_path / "events.jsonl"
    section = {"sinks": {"jsonl": {"path": str(path)}}, "notice": {"enabled": False}}
    app = Langflow({"telemetry": section}, env=env, data_dir=tmp_path / "data", strict=True)
    return app, path


def sent(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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
    run_id = app.run_flow("flow-1")
    app.send(
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
    # What Langflow's model_dump(by_alias=True, exclude_none=True, exclude_unset=True) gives:
    # runIsWebhook was not set, so it is not sent.
    assert json.loads(lines[run + 1].removeprefix("[TELEMETRY] Payload: ")) == {
        "clientType": "oss",
        "runSeconds": 0,
        "runSuccess": True,
        "runErrorMessage": "",
        "runId": run_id,
    }
    assert lines[-2:] == [
        "[TELEMETRY] Endpoint: shutdown",
        '[TELEMETRY] Payload: {"clientType": "oss", "timeRunning": 3600}',
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
    assert shutdown["event_properties"] == {"clientType": "oss", "timeRunning": 3600}
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


def test_prometheus_enabled_false_while_telemetry_is_on(
    env: dict[str, str], tmp_path: Path
) -> None:
    app = start({**env, "PROMETHEUS_ENABLED": "false"}, tmp_path / "on")
    app.upload("flow-1", b"x")
    registry = app.telemetry.metrics
    assert registry.exporter("otel").prometheus_url is None  # no port
    assert registry.points("file_size") != []  # kept for the pushes telemetry allows
    app.telemetry.shutdown(timeout=5)


# The payloads of langflow/services/telemetry/schema.py upstream (langflow-ai/langflow at
# e33e9c6a): event, then each field's wire name and whether it is required there.
UPSTREAM: dict[str, dict[str, bool]] = {
    "version": {
        "clientType": False, "package": True, "version": True, "platform": True, "python": True,
        "arch": True, "autoLogin": True, "cacheType": True, "backendOnly": True,
    },
    "run": {
        "clientType": False, "runIsWebhook": False, "runSeconds": True, "runSuccess": True,
        "runErrorMessage": False, "runId": False,
    },
    "playground": {
        "clientType": False, "playgroundSeconds": True, "playgroundComponentCount": False,
        "playgroundSuccess": True, "playgroundErrorMessage": False, "playgroundRunId": False,
    },
    "component": {
        "clientType": False, "componentName": True, "componentId": True,
        "componentSeconds": True, "componentSuccess": True, "componentErrorMessage": False,
        "componentRunId": False,
    },
    "component_inputs": {
        "clientType": False, "componentRunId": True, "componentId": True, "componentName": True,
        "componentInputs": True, "chunkIndex": False, "totalChunks": False,
    },
    "exception": {
        "clientType": False, "exceptionType": True, "exceptionMessage": True,
        "exceptionContext": True, "stackTraceHash": False,
    },
    "component_index": {
        "clientType": False, "indexSource": True, "numModules": True, "numComponents": True,
        "devMode": True, "filteredModules": False, "loadTimeMs": True,
    },
    "email": {"clientType": False, "email": True},
    "shutdown": {"clientType": False, "timeRunning": True},
}  # fmt: skip


def test_the_payloads_are_upstreams() -> None:
    declared = {
        cls.__event__: cls
        for cls in vars(langflow_app).values()
        if isinstance(cls, type) and issubclass(cls, waypost.Payload) and cls is not waypost.Payload
    }
    assert set(declared) == set(UPSTREAM)
    for event, fields in UPSTREAM.items():
        cls = declared[event]
        wire = {
            info.serialization_alias or name: info.is_required()
            for name, info in cls.model_fields.items()
        }
        assert wire == fields, event
        assert cls.__exclude_none__ and cls.__exclude_unset__, event
    assert declared["exception"].__level__ == "error"


def test_none_and_unset_fields_stay_home(env: dict[str, str], tmp_path: Path) -> None:
    app, path = jsonl(env, tmp_path)
    app.send(RunPayload(run_seconds=2, run_success=False, run_id=None))
    app.send(RunPayload(run_seconds=2, run_success=True, run_is_webhook=True))
    app.load_components()
    assert app.telemetry.flush(timeout=10)
    version, first, second, index = (e["properties"] for e in sent(path))
    assert "desktop" not in version and version["clientType"] == "oss"
    assert first == {"clientType": "oss", "runSeconds": 2, "runSuccess": False}
    assert second == {
        "clientType": "oss", "runSeconds": 2, "runSuccess": True, "runIsWebhook": True
    }  # fmt: skip
    assert "filteredModules" not in index and index["indexSource"] == "builtin"
    app.telemetry.shutdown(timeout=5)


def test_component_inputs_join_their_component_and_are_scrubbed(
    env: dict[str, str], tmp_path: Path
) -> None:
    app, path = jsonl(env, tmp_path)
    secret = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
    app.run_flow(
        "flow-9",
        inputs={"OpenAIModel": {"model_name": "gpt-4o", "api_key": secret, "temperature": 0.1}},
    )
    assert app.telemetry.flush(timeout=10)
    events = sent(path)
    assert secret not in json.dumps(events)
    (inputs,) = [e for e in events if e["name"] == "component_inputs"]
    model = next(
        e
        for e in events
        if e["name"] == "component" and e["properties"]["componentName"] == "OpenAIModel"
    )
    props = inputs["properties"]
    assert props["componentRunId"] == model["properties"]["componentRunId"]
    assert props["componentId"] == model["properties"]["componentId"] == "OpenAIModel-flow-9"
    assert props["componentInputs"]["model_name"] == "gpt-4o"
    assert props["componentInputs"]["api_key"].startswith("[REDACTED")
    assert "chunkIndex" not in props and "totalChunks" not in props  # one body, no URL limit
    app.telemetry.shutdown(timeout=5)


def test_an_exception_is_reported_without_what_it_quotes(
    env: dict[str, str], tmp_path: Path
) -> None:
    app, path = jsonl(env, tmp_path)
    try:
        raise PermissionError("cannot open /home/alice/flows/a.json for alice@example.com")
    except PermissionError as exc:
        app.report_exception(exc, "handler")
    assert app.telemetry.flush(timeout=10)
    (event,) = [e for e in sent(path) if e["name"] == "exception"]
    props = event["properties"]
    assert props["exceptionType"] == "PermissionError"
    assert props["exceptionContext"] == "handler"
    assert len(props["stackTraceHash"]) == 16
    assert "alice" not in json.dumps(event)
    assert "[REDACTED" in props["exceptionMessage"]
    app.telemetry.shutdown(timeout=5)


def test_desktop_sends_its_client_type_and_never_the_email(
    env: dict[str, str], tmp_path: Path
) -> None:
    app, path = jsonl({**env, "LANGFLOW_DESKTOP": "true"}, tmp_path)
    app.register_email("jane.doe@example.com")
    assert app.telemetry.flush(timeout=10)
    version, email = sent(path)
    assert version["properties"]["clientType"] == "desktop"
    assert email["name"] == "email" and email["properties"]["clientType"] == "desktop"
    assert "jane.doe" not in json.dumps(email)
    assert email["properties"]["email"].startswith("[REDACTED")
    app.telemetry.shutdown(timeout=5)
    server, server_path = jsonl(env, tmp_path / "server")
    server.register_email("jane.doe@example.com")  # the server has no registered e-mail
    assert server.telemetry.flush(timeout=10)
    assert [e["name"] for e in sent(server_path)] == ["version"]
    server.telemetry.shutdown(timeout=5)
