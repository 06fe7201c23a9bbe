"""Flowise's event catalogue through waypost, to a PostHog stand-in on loopback."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from waypost.testing import RecordingServer, Response

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from flowise_app import EXAMPLE_FLOW, Flowise  # noqa: E402

SECRETS = ("sk-live-0123456789abcdefghij", "What is my bank PIN?", "Be brief.", "gpt-4o")


def flow_with_secrets() -> dict[str, Any]:
    flow = copy.deepcopy(EXAMPLE_FLOW)
    flow["nodes"][0]["data"]["credential"] = {"openAIApiKey": SECRETS[0]}
    return flow


@pytest.fixture
def posthog() -> Any:
    with RecordingServer(lambda r: Response(200, {"status": 1})) as server:
        yield server


def start(env: dict[str, str], tmp_path: Path, posthog: RecordingServer) -> Flowise:
    env = {**env, "FLOWISE_POSTHOG_HOST": posthog.url}
    return Flowise(env=env, data_dir=tmp_path / "data", strict=True, notice=lambda text: None)


def test_the_catalogue_on_the_wire(
    clean_env: dict[str, str], tmp_path: Path, posthog: RecordingServer
) -> None:
    app = start(clean_env, tmp_path, posthog)
    flow = app.create_chatflow(flow_with_secrets())
    app.create_tool("weather", code="api_key = 'sk-live-0123456789abcdefghij'")
    app.create_assistant(instructions="Never reveal What is my bank PIN?")
    app.upsert(flow, "pinecone_0", external=True)
    app.predict(flow, "chat-1", "What is my bank PIN?")
    assert app.telemetry.flush(timeout=10)
    app.telemetry.shutdown()
    sent = [e for r in posthog.requests for e in r.json()["batch"]]
    by_name = {e["event"]: e["properties"] for e in sent}
    assert set(by_name) == {
        "chatflow_created",
        "tool_created",
        "assistant_created",
        "vector_upserted",
        "prediction_sent",
    }
    created = by_name["chatflow_created"]
    assert created["version"] == "2.2.0" and created["chatlowId"] == flow
    assert created["flowGraph"] == {
        "nodes": ["chatOpenAI_0", "bufferMemory_0", "conversationChain_0"],
        "edges": [
            {"source": "chatOpenAI_0", "target": "conversationChain_0"},
            {"source": "bufferMemory_0", "target": "conversationChain_0"},
        ],
    }
    assert by_name["vector_upserted"]["type"] == "EXTERNAL"
    assert by_name["vector_upserted"]["stopNodeId"] == "pinecone_0"
    assert by_name["prediction_sent"]["chatId"] == "chat-1"
    assert by_name["tool_created"]["toolName"] == "weather"
    wire = json.dumps(sent)
    for secret in SECRETS:  # node inputs, credentials, messages, instructions, tool code
        assert secret not in wire


def test_disabled_by_the_flowise_variable(
    clean_env: dict[str, str], tmp_path: Path, posthog: RecordingServer
) -> None:
    app = start({**clean_env, "DISABLE_FLOWISE_TELEMETRY": "true"}, tmp_path, posthog)
    app.predict(app.create_chatflow(EXAMPLE_FLOW), "chat-1", "hello")
    assert app.telemetry.flush(timeout=5)
    status = app.telemetry.status()
    assert not status.enabled and status.rule == "app_env"
    assert "DISABLE_FLOWISE_TELEMETRY" in status.reason
    app.telemetry.shutdown()
    assert posthog.requests == []
    assert not (tmp_path / "data").exists()  # nothing collected, nothing stored


def test_manifest_lists_only_the_declared_fields(clean_env: dict[str, str], tmp_path: Path) -> None:
    # As the README runs it: no PYTHONPATH, flowise_app found beside telemetry.yml.
    env = {k: v for k, v in clean_env.items() if k != "PYTHONPATH"}
    code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
    out = subprocess.run(
        [sys.executable, "-c", code, "--config", str(HERE / "telemetry.yml"), "manifest", "--json"],
        env={**env, "WAYPOST_HOME": str(tmp_path / "data")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["errors"] == []
    fields = {e["event"]: [f["property"] for f in e["fields"]] for e in manifest["events"]}
    graph = ["flowGraph", "flowGraph.nodes", "flowGraph.edges", "flowGraph.edges[].source",
             "flowGraph.edges[].target"]  # fmt: skip
    assert fields == {
        "chatflow_created": ["version", "chatlowId", *graph],
        "tool_created": ["version", "toolId", "toolName"],
        "assistant_created": ["version", "assistantId"],
        "vector_upserted": ["version", "chatlowId", "type", *graph, "stopNodeId"],
        "prediction_sent": ["version", "chatlowId", "chatId", "type", *graph],
    }
    # Exactly these fields, so no node input or output, message, credential or variable.
    created = next(e for e in manifest["events"] if e["event"] == "chatflow_created")
    assert {f["property"]: f["type"] for f in created["fields"]}["flowGraph"] == "object"
    assert [s["type"] for s in manifest["sinks"]] == ["posthog"]
