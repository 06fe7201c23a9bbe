"""The ``posthog`` sink: delivers events to PostHog's batch capture API (``POST {host}/batch/``)
through posthog-python's own request layer (``posthog.request.batch_post``), without its client,
queue or consumer threads. The core owns batching, retries and the outbox.

Wire format, limits and answers are described in this plugin's README.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, SecretStr, field_validator

from waypost import __version__ as waypost_version
from waypost.errors import PayloadTooLarge, PermanentError, RetryableError, SinkError
from waypost.events import Event
from waypost.hookspecs import hookimpl
from waypost.retry import raise_for_status
from waypost.sinks import HttpSinkConfig, SendResult, Sink

if TYPE_CHECKING:
    import requests

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_EVENT_BYTES",
    "PosthogConfig",
    "PosthogSink",
    "register_sinks",
]

US_HOST = "https://us.i.posthog.com"
EU_HOST = "https://eu.i.posthog.com"
BATCH_PATH = "/batch/"

MAX_EVENT_BYTES = 900 * 1024
"""posthog-python drops events larger than this (``consumer.MAX_MSG_SIZE``)."""
MAX_BATCH_BYTES = 5 * 1024 * 1024
"""posthog-python closes a batch at this size (``consumer.BATCH_SIZE_LIMIT``)."""
_BODY_OVERHEAD = 1024
"""Room kept in each request for the keys around ``batch`` (api_key, sent_at, ...)."""

_OS_NAMES = {"Darwin": "Mac OS X"}
"""PostHog's own name for the OS where it differs from ``platform.system()``."""


class PosthogConfig(HttpSinkConfig):
    """Settings of a ``posthog`` sink."""

    default_hosts: ClassVar[dict[str, str]] = {"": US_HOST, "us": US_HOST, "eu": EU_HOST}

    api_key: SecretStr = Field(
        description="Project API key (phc_...), from the PostHog project settings."
    )
    gzip: bool = Field(default=False, description="Compress request bodies with gzip.")

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value().strip()
        if not key:
            raise ValueError(
                "api_key is empty: set it to the project API key (phc_...) from PostHog's "
                "project settings"
            )
        if key.startswith("phx_"):
            raise ValueError(
                "api_key is a personal API key (phx_...), which the capture API refuses: "
                "use the project API key (phc_...)"
            )
        return SecretStr(key)


class PosthogSink(Sink):
    """Sends batches to PostHog. Each event keeps its waypost id as PostHog's ``uuid``, so a
    batch sent twice (a retry after a lost answer) is counted once."""

    type = "posthog"
    Config = PosthogConfig
    max_batch_size = 1000  # PostHog limits a request's bytes, not its events
    default_concurrency = 8  # send() is safe from several threads; started as needed

    _requests: ModuleType
    _sdk: ModuleType
    _session: requests.Session | None = None
    _session_pid = 0
    _from_context: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None = None

    def open(self) -> None:
        # Imported only when a posthog sink is configured: posthog loads its whole client.
        import requests
        from posthog import request as sdk

        self._requests, self._sdk = requests, sdk
        self._host = sdk.determine_server_host(self._config.base_url).rstrip("/")

    @property
    def _config(self) -> PosthogConfig:
        config = self.config
        assert isinstance(config, PosthogConfig)
        return config

    @property
    def endpoint(self) -> str:
        """The URL batches are posted to."""
        return getattr(self, "_host", self._config.base_url) + BATCH_PATH

    # --- mapping ------------------------------------------------------------------------------

    def message(self, event: Event) -> dict[str, Any]:
        """One event in PostHog's batch format."""
        context = event.context
        cached = self._from_context
        if cached is None or cached[0] is not context:  # events of a run share one context
            lib = {
                "$lib": "waypost",
                "$lib_version": context.get("waypost") or waypost_version,
                # waypost never lets PostHog derive a location from the sender's IP address.
                "$geoip_disable": True,
            }
            cached = self._from_context = (context, _context_properties(context), lib)
        # The context's properties, then the event's (which may override them), then ours.
        properties = {**cached[1], **event.properties, **cached[2]}
        distinct_id = event.distinct_id or event.instance_id
        if distinct_id == event.instance_id:
            # Anonymous installation telemetry: no person profile for an instance id.
            properties.setdefault("$process_person_profile", False)
        return {
            "event": event.name,
            "distinct_id": distinct_id,
            "uuid": event.id,
            "timestamp": event.iso_timestamp,
            "properties": properties,
        }

    def render(self, events: Sequence[Event]) -> dict[str, Any]:
        """The request body ``send`` posts for these events (in one request when they fit),
        with the key masked as posthog-python masks it in its own debug log."""
        return {
            "batch": [self.message(e) for e in events],
            "historical_migration": False,
            "sent_at": _dt.datetime.now(tz=_dt.timezone.utc).isoformat(),
            "api_key": "[redacted]",
        }

    # --- sending ------------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        messages = [self.message(event) for event in events]
        # Sizes are measured as posthog-python measures them: its own json.dumps. The batch's
        # JSON is longer than any of its events' and than their sum in _chunks: under the event
        # limit, no event is too large and the batch is one request; nothing more to measure.
        if messages and not self._config.gzip:
            # Measured on the way out instead: the body posthog-python made is refused before it
            # leaves if it is over the event limit, and only then is each event measured.
            try:
                self._post(messages, at_most=MAX_EVENT_BYTES)
                return SendResult()  # whatever it raises is about the whole batch
            except _OverLimit:
                pass
        elif messages and len(json.dumps(messages).encode()) <= MAX_EVENT_BYTES:
            self._post(messages)
            return SendResult()
        result = SendResult()
        sized: list[tuple[Event, dict[str, Any], int]] = []
        for event, message in zip(events, messages, strict=True):
            size = len(json.dumps(message).encode())
            if size > MAX_EVENT_BYTES:
                result.mark_failed(
                    event,
                    f"event is {size} bytes of JSON, over PostHog's limit of "
                    f"{MAX_EVENT_BYTES // 1024} KiB per event: send less in its properties",
                )
            else:
                sized.append((event, message, size))
        chunks = _chunks(sized, MAX_BATCH_BYTES - _BODY_OVERHEAD)
        for i, chunk in enumerate(chunks):
            whole_batch = i == 0 and not result.failed
            try:
                self._post([message for _, message, _ in chunk])
            except (PayloadTooLarge, RetryableError) as exc:
                if whole_batch:
                    raise  # nothing sent yet: the core retries, or splits on 413
                rest = [event for later in chunks[i:] for event, _, _ in later]
                for event in rest:
                    result.mark_retry(event, exc.reason)
                result.retry_after = exc.retry_after
                break
            except PermanentError as exc:
                if whole_batch and len(chunks) == 1:
                    raise
                for event, _, _ in chunk:
                    result.mark_failed(event, exc.reason)
        return result

    def test_request(self, event: Event) -> dict[str, Any]:
        """Send one event and return PostHog's answer."""
        message = self.message(event)
        try:
            response = self._post([message])
        except SinkError as exc:
            return {
                "delivered": False,
                "endpoint": self.endpoint,
                "error": exc.reason,
                "retryable": exc.retryable,
            }
        try:
            answer: Any = response.json()
        except ValueError:
            answer = response.text
        return {
            "delivered": True,
            "endpoint": self.endpoint,
            "status": response.status_code,
            "answer": answer,
            "uuid": event.id,
        }

    def _post(self, batch: list[dict[str, Any]], *, at_most: int = 0) -> requests.Response:
        """One ``POST /batch/`` through posthog-python; any failure becomes a ``SinkError``.
        With ``at_most``, a body longer than that many bytes raises ``_OverLimit`` unsent."""
        if not hasattr(self, "_sdk"):
            self.open()
        http, sdk = self._requests, self._sdk
        config = self._config
        _limits.at_most = at_most
        try:
            response: requests.Response = sdk.batch_post(
                config.api_key.get_secret_value(),
                host=getattr(self, "_host", config.base_url),
                gzip=config.gzip,
                timeout=config.timeout,
                session=self._http(),
                batch=batch,
                historical_migration=False,
            )
        except sdk.APIError as exc:
            status, message = exc.status, str(exc.message)
            if not isinstance(status, int):
                raise RetryableError(f"PostHog: {message[:300]}") from None
            retry_after = exc.retry_after
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            raise_for_status(status, headers, message, what="PostHog")
            # batch_post treats every answer but 200 as a failure; so does waypost.
            raise RetryableError(
                f"PostHog: HTTP {status} instead of 200: {' '.join(message.split())[:300]}"
            ) from None
        except http.Timeout:
            raise RetryableError(
                f"PostHog: no answer from {self.endpoint} within {config.timeout:g} s"
            ) from None
        except http.RequestException as exc:
            raise RetryableError(
                f"PostHog: cannot reach {self.endpoint}: {type(exc).__name__}"
            ) from None
        finally:
            _limits.at_most = 0
        return response

    def _http(self) -> requests.Session:
        """A session of our own: posthog's shared one retries connection errors itself on
        https, and retries belong to the core. Rebuilt in a forked child."""
        if self._session is None or self._session_pid != os.getpid():
            session = self._requests.Session()
            adapter = _limited_adapter(self._requests)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            self._session, self._session_pid = session, os.getpid()
        return self._session

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._session_pid == os.getpid():
            session.close()


class _OverLimit(Exception):
    """A request body over the size its sender allowed; it was not sent."""


_limits = threading.local()
"""Per thread: the largest body the request being made may have (0: no limit)."""


def _limited_adapter(http: ModuleType) -> Any:
    """A requests adapter that never retries (the core does) and refuses, unsent, a body over
    the calling thread's ``_limits.at_most``."""

    class LimitedAdapter(http.adapters.HTTPAdapter):  # type: ignore[name-defined,misc]
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            at_most = getattr(_limits, "at_most", 0)
            body = request.body
            if at_most and body is not None:
                size = len(body.encode() if isinstance(body, str) else body)
                if size > at_most:
                    raise _OverLimit(size)
            return super().send(request, *args, **kwargs)

    return LimitedAdapter(max_retries=0)


def _context_properties(context: dict[str, Any]) -> dict[str, Any]:
    """The PostHog properties taken from an envelope's shared context."""
    app = context.get("app") or {}
    os_info = context.get("os") or {}
    properties: dict[str, Any] = {}
    for key, value in (
        ("$app_name", app.get("name")),
        ("$app_version", app.get("version")),
        ("$os", _OS_NAMES.get(str(os_info.get("type")), os_info.get("type"))),
        ("$os_version", os_info.get("release")),
        ("$python_version", context.get("python")),
    ):
        if value:
            properties[key] = value
    return properties


def _chunks(
    sized: list[tuple[Event, dict[str, Any], int]], limit: int
) -> list[list[tuple[Event, dict[str, Any], int]]]:
    """Consecutive runs of events whose JSON adds up to at most ``limit`` bytes."""
    chunks: list[list[tuple[Event, dict[str, Any], int]]] = []
    current: list[tuple[Event, dict[str, Any], int]] = []
    total = 0
    for item in sized:
        size = item[2] + 2  # the ", " between events
        if current and total + size > limit:
            chunks.append(current)
            current, total = [], 0
        current.append(item)
        total += size
    if current:
        chunks.append(current)
    return chunks


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(PosthogSink)
