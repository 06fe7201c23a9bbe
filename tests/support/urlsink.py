"""A minimal HTTP sink on urllib for the core's delivery tests (a real peer, not a mock):
POSTs a JSON array of envelopes to ``url`` and classifies the answer with the core's rules."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import waypost
from waypost.errors import RetryableError
from waypost.retry import raise_for_status


class UrlConfig(waypost.SinkConfig):
    url: str


class UrlSink(waypost.Sink):
    type = "urltest"
    Config = UrlConfig
    max_batch_size = 100

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        config = self.config
        assert isinstance(config, UrlConfig)
        body = json.dumps([e.to_dict() for e in events]).encode()
        request = urllib.request.Request(
            config.url, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=config.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise_for_status(exc.code, dict(exc.headers), exc.read().decode(errors="replace"))
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
            raise RetryableError(f"connection failed: {exc}") from None
        return waypost.SendResult.ok()


@waypost.hookimpl
def register_sinks(register: Callable[[type[waypost.Sink]], None]) -> None:
    register(UrlSink)
