"""Fixtures of the admin tests: a telemetry with a delivered sink (``jsonl``, keeping sent
records) and a sink that stays down until a test opens it (``gate``), and logged-in clients."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import waypost
from waypost.sinks import SendResult, Sink, SinkConfig

LOGIN_COOKIE = "host_session"
LOGIN_VALUE = "admin-session-7f3a"
API_KEY = "sk_live_VERYSECRETVALUE0123456789"
HEADER_TOKEN = "Bearer HEADERSECRET987654321"
HOST_PASSWORD = "hunter2pass"


class GateConfig(SinkConfig):
    api_key: SecretStr
    host: str = "https://example.invalid"
    headers: dict[str, str] = {}
    region: str = "eu"


class GateSink(Sink):
    """A destination that asks for a retry of everything until ``gate_open`` is set."""

    type = "gate"
    Config = GateConfig
    gate_open = threading.Event()

    def send(self, events: Sequence[waypost.Event]) -> SendResult:
        if type(self).gate_open.is_set():
            return SendResult.ok()
        return SendResult.retry_all(events, "destination is down (503)")


class GatePlugin:
    @waypost.hookimpl
    def register_sinks(self, register: Callable[[type[Sink]], None]) -> None:
        register(GateSink)


@pytest.fixture
def gate() -> Any:
    GateSink.gate_open.clear()
    yield GateSink.gate_open
    GateSink.gate_open.clear()


@pytest.fixture
def admin_telemetry(
    make_telemetry: Callable[..., Any], tmp_path: Path, gate: Any
) -> Callable[..., Any]:
    """A factory: ``admin_telemetry(config={...}, env={...})``; sinks ``jsonl`` (delivers,
    keeps sent records a day) and ``gate`` (down until ``gate.set()``)."""

    def factory(config: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        section = {
            "outbox": {"keep_sent": "1d"},
            "retry": {"initial": 0.05, "maximum": 0.5, "breaker_threshold": 100000},
            **(config or {}),
        }
        kwargs.setdefault("strict", False)
        return make_telemetry(
            sinks={
                "jsonl": {"path": str(tmp_path / "events.jsonl")},
                "gate": {
                    "api_key": API_KEY,
                    "host": f"https://user:{HOST_PASSWORD}@collector.example.invalid/ingest",
                    "headers": {"Authorization": HEADER_TOKEN},
                },
            },
            config=section,
            plugins=[GatePlugin()],
            **kwargs,
        )

    return factory


def allow_login(request: Any) -> bool:
    return request.cookies.get(LOGIN_COOKIE) == LOGIN_VALUE


@pytest.fixture
def client_for() -> Callable[..., Any]:
    """``client_for(tel, **create_app_kwargs)``: a TestClient that is logged in."""
    from starlette.testclient import TestClient

    from waypost.admin import create_app

    clients: list[Any] = []

    def make(tel: Any, *, login: bool = True, **kwargs: Any) -> Any:
        kwargs.setdefault("auth", allow_login)
        client = TestClient(create_app(tel, **kwargs), follow_redirects=False)
        if login:
            client.cookies.set(LOGIN_COOKIE, LOGIN_VALUE)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


_TOKEN = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def csrf_token(client: Any, path: str = "/actions") -> str:
    """Load a page with a form and return its CSRF token (the client keeps the cookie)."""
    response = client.get(path)
    assert response.status_code == 200, response.text
    match = _TOKEN.search(response.text)
    assert match, "no CSRF token in the page"
    return match.group(1)


def outbox_counts(tel: Any) -> dict[str, dict[str, int]]:
    return dict(tel.open_outbox().counts())


@pytest.fixture
def kit() -> Any:
    """The constants and helpers above, for test modules (conftest is not importable)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        LOGIN_COOKIE=LOGIN_COOKIE,
        LOGIN_VALUE=LOGIN_VALUE,
        API_KEY=API_KEY,
        HEADER_TOKEN=HEADER_TOKEN,
        HOST_PASSWORD=HOST_PASSWORD,
        allow_login=allow_login,
        csrf_token=csrf_token,
        outbox_counts=outbox_counts,
    )
