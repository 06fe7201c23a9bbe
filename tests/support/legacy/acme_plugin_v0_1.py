# Frozen copy of the plugin that docs/writing-a-plugin.md built in waypost 0.1.
# ruff: noqa: I001  (verbatim: waypost is a third-party import for the plugin)
"""waypost-acme: delivers waypost events to Acme Analytics' batch API.

POST {host}/v1/batch with {"events": [...]} and the key as a bearer token; Acme answers
200 {"accepted": n, "errors": [{"index": i, "message": "..."}]}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import waypost
from pydantic import Field, SecretStr
from waypost.events import Event
from waypost.retry import raise_for_status

if TYPE_CHECKING:
    import httpx


class AcmeConfig(waypost.HttpSinkConfig):
    """Settings of an ``acme`` sink."""

    default_hosts: ClassVar[dict[str, str]] = {
        "": "https://api.acme.example",
        "eu": "https://eu.api.acme.example",
    }

    api_key: SecretStr = Field(description="Project API key, from Acme's project settings.")


class AcmeSink(waypost.Sink):
    """Sends each batch in one request; Acme's per-event errors fail those events only."""

    type = "acme"
    Config = AcmeConfig
    max_batch_size = 100
    config: AcmeConfig

    _client: httpx.Client | None = None

    def open(self) -> None:
        import httpx  # imported only when an acme sink is configured

        self._httpx = httpx
        self._client = httpx.Client(timeout=self.config.timeout, follow_redirects=False)

    def message(self, event: Event) -> dict[str, Any]:
        return {
            "uuid": event.id,  # Acme's dedup key: a retried batch is counted once
            "event": event.name,
            "timestamp": event.iso_timestamp,
            "distinct_id": event.distinct_id,
            "properties": event.properties,
        }

    def render(self, events: Sequence[Event]) -> dict[str, Any]:
        return {"events": [self.message(e) for e in events]}

    def send(self, events: Sequence[Event]) -> waypost.SendResult:
        if self._client is None:
            self.open()
        assert self._client is not None
        url = f"{self.config.base_url}/v1/batch"
        try:
            response = self._client.post(
                url,
                json=self.render(events),
                headers={"Authorization": f"Bearer {self.config.api_key.get_secret_value()}"},
            )
        except self._httpx.TimeoutException:
            raise waypost.RetryableError(
                f"Acme: no answer within {self.config.timeout:g} s"
            ) from None
        except self._httpx.TransportError as exc:
            reason = f"Acme: cannot reach {url}: {type(exc).__name__}"
            raise waypost.RetryableError(reason) from None
        raise_for_status(response.status_code, response.headers, response.text, what="Acme")
        result = waypost.SendResult()
        try:
            errors = response.json().get("errors") or []
        except ValueError:
            errors = []
        for error in errors:
            index = error.get("index")
            if isinstance(index, int) and 0 <= index < len(events):
                result.mark_failed(events[index], f"Acme refused it: {error.get('message')}")
        return result

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


@waypost.hookimpl
def register_sinks(register: Callable[[type[waypost.Sink]], None]) -> None:
    register(AcmeSink)
