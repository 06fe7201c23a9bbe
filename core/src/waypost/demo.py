"""``waypost demo``: a small application (Langflow's payloads) emitting a realistic mix of
events through the whole pipeline to the embedded default, then what was recorded."""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from waypost.events import Payload


class VersionPayload(Payload, event="version"):
    """Sent once at start: the application's version and environment."""

    package: str = Field(description="Package name.")
    version: str = Field(description="Package version.")
    platform: str = Field(description="Operating system and release.")
    python: str = Field(description="Python major.minor version.")
    arch: str = Field(description="Pointer width of the interpreter.")
    auto_login: bool = Field(serialization_alias="autoLogin", description="Auto-login is on.")
    cache_type: str = Field(serialization_alias="cacheType", description="Cache backend.")
    backend_only: bool = Field(serialization_alias="backendOnly", description="No frontend.")
    desktop: bool = Field(description="Running as the desktop app.")


class RunPayload(Payload, event="run"):
    """A flow run finished."""

    run_is_webhook: bool = Field(
        serialization_alias="runIsWebhook", description="Started by a webhook."
    )
    run_seconds: int = Field(serialization_alias="runSeconds", description="Duration in seconds.")
    run_success: bool = Field(serialization_alias="runSuccess", description="The run succeeded.")
    run_error_message: str = Field(
        "", serialization_alias="runErrorMessage", description="Error message, scrubbed."
    )


class PlaygroundPayload(Payload, event="playground"):
    """A playground session ended."""

    playground_seconds: int = Field(
        serialization_alias="playgroundSeconds", description="Duration."
    )
    playground_component_count: int = Field(
        serialization_alias="playgroundComponentCount", description="Components in the flow."
    )
    playground_success: bool = Field(
        serialization_alias="playgroundSuccess", description="Success."
    )
    playground_error_message: str = Field(
        "", serialization_alias="playgroundErrorMessage", description="Error message, scrubbed."
    )


class ComponentPayload(Payload, event="component"):
    """One component executed."""

    component_name: str = Field(serialization_alias="componentName", description="Component type.")
    component_seconds: int = Field(serialization_alias="componentSeconds", description="Duration.")
    component_success: bool = Field(serialization_alias="componentSuccess", description="Success.")
    component_error_message: str | None = Field(
        None, serialization_alias="componentErrorMessage", description="Error message, scrubbed."
    )


class ShutdownPayload(Payload, event="shutdown"):
    """The application stopped."""

    time_running: int = Field(serialization_alias="timeRunning", description="Seconds it ran.")


COMPONENTS = ["TextInput", "ChatOutput", "OpenAIModel", "Prompt", "VectorStoreRetriever"]


def run_demo(
    *, events: int = 12, data_dir: str | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run the demo application and return what it recorded."""
    import platform

    from waypost.telemetry import Telemetry

    home = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="waypost-demo-"))
    out = home / "events.jsonl"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    config = {
        "telemetry": {
            "mode": "opt-out",
            "schemas": ["waypost.demo"],
            "notice": {
                "text": "demo-app collects anonymous usage telemetry (DO_NOT_TRACK=1 turns it off)."
            },
            "batch": {"interval": 0.1},
            "outbox": {"keep_sent": "1d"},
            "sinks": {"log": {}, "jsonl": {"path": str(out)}},
        }
    }
    rng = random.Random(7)
    tel = Telemetry(app="demo-app", version="1.0.0", config=config, data_dir=home, env=env)
    tracked: list[tuple[str, dict[str, Any]]] = []  # what the application gave, in order

    def track(event: str | Payload, properties: dict[str, Any] | None = None) -> None:
        if isinstance(event, Payload):
            tracked.append((type(event).__event__, event.wire()))
        else:
            tracked.append((event, dict(properties or {})))
        tel.track(event, properties)

    track(
        VersionPayload(
            package="demo-app",
            version="1.0.0",
            platform=platform.platform(),
            python=".".join(platform.python_version_tuple()[:2]),
            arch=platform.architecture()[0],
            auto_login=False,
            cache_type="InMemoryCache",
            backend_only=False,
            desktop=False,
        )
    )
    for i in range(events):
        kind = i % 3
        if kind == 0:
            ok = rng.random() > 0.2
            track(
                RunPayload(
                    run_is_webhook=rng.random() > 0.7,
                    run_seconds=rng.randint(1, 90),
                    run_success=ok,
                    run_error_message="" if ok else "timeout reading /home/alice/flows/chat.json",
                )
            )
        elif kind == 1:
            track(
                ComponentPayload(
                    component_name=rng.choice(COMPONENTS),
                    component_seconds=rng.randint(0, 5),
                    component_success=True,
                )
            )
        else:
            track(
                PlaygroundPayload(
                    playground_seconds=rng.randint(10, 300),
                    playground_component_count=rng.randint(2, 9),
                    playground_success=True,
                )
            )
    # A free-form event whose properties hold personal data: the scrubbers take it out.
    track(
        "feedback_sent",
        {
            "rating": 5,
            "comment": "works great, mail me at jane.doe@example.com",
            "from": "10.0.0.7",
        },
    )
    track(ShutdownPayload(time_running=42))
    tel.flush(timeout=10)
    status = tel.status()
    remarks: dict[str, list[str]] = {}
    kept = 0
    if tel.enabled:
        outbox = tel.open_outbox()
        held, _ = outbox.records(sink="jsonl", limit=10_000)
        remarks = {r.event_id: r.remarks for r in held if r.remarks}
        kept = outbox.records(state="sent", limit=1)[1]
    tel.shutdown(timeout=5)
    records = []
    if out.exists():
        records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for record in records:
        record["remarks"] = remarks.get(record["id"], [])
    return {
        "data_dir": str(home),
        "file": str(out),
        "status": status,
        "records": records,
        "kept": kept,
        "originals": originals(records, tracked),
    }


def originals(
    records: list[dict[str, Any]], tracked: list[tuple[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """For each record the scrubbers changed, by its id: each changed property's value as the
    application gave it (shown beside what was sent; it is never stored or sent)."""
    given: dict[str, list[dict[str, Any]]] = {}
    for name, properties in tracked:
        given.setdefault(name, []).append(properties)
    seen: dict[str, int] = {}
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        name = record["name"]
        index = seen[name] = seen.get(name, -1) + 1
        if not record["remarks"] or index >= len(given.get(name, ())):
            continue
        changed = {}
        for remark in record["remarks"]:
            _, _, where = remark.partition("@properties.")
            if where and where in given[name][index]:
                changed[where] = given[name][index][where]
        if changed:
            out[record["id"]] = changed
    return out
