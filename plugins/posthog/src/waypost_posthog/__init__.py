"""The ``posthog`` sink: delivers events to PostHog's batch capture API (``POST {host}/batch/``)
through posthog-python's own request layer (``posthog.request.batch_post``), without its client,
queue or consumer threads. The core owns batching, retries and the outbox.

Wire format, limits and answers are described in this plugin's README.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, SecretStr, field_validator

from waypost import __version__ as waypost_version
from waypost.errors import RetryableError
from waypost.events import Event
from waypost.hookspecs import registering
from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkContext, destination_of
from waypost.sinks.parts import pack, send_in_parts
from waypost.sinks.process import ProcessLocal
from waypost.sinks.transport import (
    Answers,
    BodyOverLimit,
    body_limit,
    raise_for_status,
    requests_errors,
    requests_session,
    snippet,
)

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


class PosthogSink(Sink[PosthogConfig]):
    """Sends batches to PostHog. Each event keeps its waypost id as PostHog's ``uuid``, so a
    batch sent twice (a retry after a lost answer) is counted once."""

    type = "posthog"
    max_batch_size = 1000  # PostHog limits a request's bytes, not its events
    default_concurrency = 8  # send() is safe from several threads; started as needed

    _from_context: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None = None

    def __init__(self, name: str, config: PosthogConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        # Imported here, on the thread that builds the sink (posthog loads its whole client);
        # requests imports netrc on a session's first request: imported here first.
        import netrc  # noqa: F401

        from posthog import request as sdk  # and requests, which it posts with

        self._sdk: ModuleType = sdk
        self._host: str = sdk.determine_server_host(config.base_url).rstrip("/")
        self._answers = self.own(Answers())  # what PostHog answered, for test_request
        # Sessions of our own: posthog's shared one retries connection errors itself on https,
        # and retries belong to the core; posthog-python posts with requests' default, which
        # follows a redirect and takes the project key along. A forked child builds its own.
        self._sessions: ProcessLocal[requests.Session] = self.own(
            ProcessLocal(lambda: requests_session(self), lambda session: session.close())
        )

    @property
    def endpoint(self) -> str:
        """The URL batches are posted to."""
        return self._host + BATCH_PATH

    @property
    def destination(self) -> str:
        """The ingestion host events go to (``https://eu.posthog.com`` posts to
        ``https://eu.i.posthog.com``), for status and the manifest."""
        return destination_of(self._host)

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
        if messages and not self.config.gzip:
            # Measured on the way out instead: the body posthog-python made is refused before it
            # leaves if it is over the event limit, and only then is each event measured.
            try:
                self._post(messages, at_most=MAX_EVENT_BYTES)
                return SendResult()  # whatever it raises is about the whole batch
            except BodyOverLimit:
                pass
        elif messages and len(json.dumps(messages).encode()) <= MAX_EVENT_BYTES:
            self._post(messages)
            return SendResult()
        result = SendResult()
        # Weighed with the ", " between events (2 bytes).
        sized = [
            (e, m, len(json.dumps(m).encode()) + 2) for e, m in zip(events, messages, strict=True)
        ]

        def too_large(weight: int) -> str:
            return (
                f"event is {weight - 2} bytes of JSON, over PostHog's limit of "
                f"{MAX_EVENT_BYTES // 1024} KiB per event: send less in its properties"
            )

        limit, most = MAX_BATCH_BYTES - _BODY_OVERHEAD, MAX_EVENT_BYTES + 2
        chunks = pack(sized, limit, result=result, too_large=too_large, item_limit=most)
        return send_in_parts(chunks, lambda chunk: self._post(chunk.items), result)

    def _post(self, batch: list[dict[str, Any]], *, at_most: int = 0) -> requests.Response:
        """One ``POST /batch/`` through posthog-python; any failure becomes a ``SinkError``.
        With ``at_most``, a body longer than that many bytes raises ``BodyOverLimit`` unsent."""
        sdk = self._sdk
        config = self.config
        try:
            with body_limit(at_most), requests_errors(self, self.endpoint, "PostHog"):
                response: requests.Response = sdk.batch_post(
                    config.api_key.get_secret_value(),
                    host=self._host,
                    gzip=config.gzip,
                    timeout=config.timeout,
                    session=self._http(),
                    batch=batch,
                    historical_migration=False,
                )
        except sdk.APIError as exc:
            status, message = exc.status, str(exc.message)
            if not isinstance(status, int):
                raise RetryableError(f"PostHog: {self.mask(snippet(message))}") from None
            retry_after = exc.retry_after
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            raise_for_status(status, headers, message, what="PostHog", mask=self.mask)
            # batch_post treats every answer but 200 as a failure; so does waypost.
            raise RetryableError(
                f"PostHog: HTTP {status} instead of 200: {self.mask(snippet(message))}"
            ) from None
        self._answers.keep(response)
        return response

    def _http(self) -> requests.Session:
        """This process's session (a forked child builds its own)."""
        return self._sessions.get()


def _context_properties(context: dict[str, Any]) -> dict[str, Any]:
    """The PostHog properties taken from an envelope's shared context."""
    app = context.get("app") or {}
    os_info = context.get("os") or {}
    properties = {
        "$app_name": app.get("name"),
        "$app_version": app.get("version"),
        "$os": _OS_NAMES.get(str(os_info.get("type")), os_info.get("type")),
        "$os_version": os_info.get("release"),
        "$python_version": context.get("python"),
    }
    return {key: value for key, value in properties.items() if value}


register_sinks = registering(PosthogSink)
