"""The admin pages print no secret: not a sink's configured credentials, not a query parameter
that holds one, not what a destination echoed back into a reason."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import SecretStr

import waypost
from waypost.sinks import SendResult, Sink, SinkConfig

API_KEY = "sk_live_ECHOEDADMINKEY0123456789"
HEADER_TOKEN = "Bearer ADMINHEADER9876543210"
PASSWORD = "adm1n/p@ss:word"
AUTH = "authq-1122334455667788"
SECRETS = (API_KEY, HEADER_TOKEN, "ADMINHEADER9876543210", PASSWORD, AUTH)


class EchoConfig(SinkConfig):
    api_key: SecretStr
    host: str
    headers: dict[str, str] = {}


class EchoSink(Sink):
    """A destination that refuses everything and quotes back every credential it was given."""

    type = "echo"
    Config = EchoConfig

    def send(self, events: Sequence[waypost.Event]) -> SendResult:
        config: Any = self.config
        basic = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
        echoed = (
            f"HTTP 401 from {config.host}: key {config.api_key.get_secret_value()} and "
            f"{config.headers.get('Authorization')} and Basic {basic} are not valid"
        )
        return (
            SendResult.fail_all(events[:1], echoed)
            if len(events) == 1
            else (SendResult(retry={e.id: echoed for e in events}))
        )


class EchoPlugin:
    @waypost.hookimpl
    def register_sinks(self, register: Callable[[type[Sink]], None]) -> None:
        register(EchoSink)


def shows(text: str) -> list[str]:
    views = {text, urllib.parse.unquote(text), text.replace("\\/", "/")}
    return [s for s in SECRETS if any(s in v for v in views)]


def test_no_admin_page_shows_a_secret_or_an_echo_of_one(
    waypost_make_telemetry: Callable[..., Any], client_for: Callable[..., Any]
) -> None:
    host = f"https://admin:{urllib.parse.quote(PASSWORD)}@collector.example.invalid/in?auth={AUTH}"
    tel = waypost_make_telemetry(
        sinks={
            "echo": {"api_key": API_KEY, "host": host, "headers": {"Authorization": HEADER_TOKEN}}
        },
        config={"outbox": {"keep_sent": "1d"}, "retry": {"initial": 0.05, "maximum": 0.2}},
        plugins=[EchoPlugin()],
        strict=False,
    )
    tel.track("one", {"n": 1})
    tel.flush(5)
    tel.track("two", {"n": 2})
    tel.track("three", {"n": 3})
    tel.flush(5)
    assert tel.status().sinks[0].last_error  # the echo was received, and kept as a reason
    client = client_for(tel)
    pages = ["/", "/?format=json", "/records", "/records?format=json", "/consent", "/actions",
             "/manifest", "/records?state=failed", "/records?state=pending"]  # fmt: skip
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        assert shows(response.text) == [], page
    assert "401" in client.get("/?format=json").text  # the reason is shown, masked
