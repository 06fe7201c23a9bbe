"""The one-line integrations, each against a real Telemetry writing a jsonl file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from waypost.integrations.asgi import Lifespan
from waypost.integrations.wsgi import worker_exit


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_lifespan(app: Any) -> list[dict[str, Any]]:
    """Drive the lifespan protocol as a server does; the messages the app sent back."""
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    return sent


def test_lifespan_shuts_down_before_the_server_hears_shutdown_complete(
    make_telemetry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, config={"batch": {"interval": 30}})

    async def app(scope: Any, receive: Any, send: Any) -> None:  # a Starlette-like lifespan
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                tel.track("started")
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    sent = run_lifespan(Lifespan(app, tel))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert [e["name"] for e in lines(out)] == ["started"]
    assert not tel.enabled  # shut down


def test_lifespan_answers_for_an_app_that_refuses_it(make_telemetry: Any, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, config={"batch": {"interval": 30}})

    async def django_like(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")

    tel.track("before_stop")
    sent = run_lifespan(Lifespan(django_like, tel))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert [e["name"] for e in lines(out)] == ["before_stop"]


def test_gunicorn_worker_exit_delivers_what_the_worker_holds(
    make_telemetry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, config={"batch": {"interval": 30}})
    for i in range(50):
        tel.track("request", {"i": i})
    worker_exit(server=None, worker=None)
    assert len(lines(out)) == 50
    assert not tel.enabled
