"""The ``amplitude`` sink: batches to Amplitude's HTTP V2 API (or ``/batch``), built and read
with the amplitude-analytics SDK's request pieces (its endpoint paths, ``BaseEvent``, options,
headers and ``Response``), never its client, queue or threads; posted through the core's HTTP
transport."""

from __future__ import annotations

import io
import json
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr

from waypost.errors import PayloadTooLarge, PermanentError, RetryableError
from waypost.events import Event
from waypost.hookspecs import registering
from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkContext, not_blank
from waypost.sinks.parts import Chunk, pack, send_in_parts
from waypost.sinks.transport import HttpTransport, parse_retry_after, snippet

if TYPE_CHECKING:
    import httpx
    from amplitude.http_client import Response as AmplitudeResponse

__all__ = ["AmplitudeConfig", "AmplitudeSink"]

MAX_EVENTS = 2000
"""Events per request (HTTP V2 and Batch APIs)."""
MAX_BYTES = {"v2": 1_000_000, "batch": 20_000_000}
"""Request body limits: 1 MB for /2/httpapi, 20 MB for /batch."""
THROTTLE_WAIT = 30.0
"""Amplitude asks to wait 30 s before resending events of a throttled device or user."""


class AmplitudeConfig(HttpSinkConfig):
    """Settings of an ``amplitude`` sink."""

    default_hosts = {"": "https://api2.amplitude.com", "eu": "https://api.eu.amplitude.com"}

    api_key: SecretStr = Field(description="Project API key.")
    use_batch: bool = Field(default=False, description="Post to /batch instead of /2/httpapi.")
    min_id_length: int | None = Field(
        default=None, ge=1, description="Minimum length of device_id/user_id (Amplitude: 5)."
    )

    _not_empty = not_blank("api_key")


_Request = Chunk[dict[str, Any]]
"""One request: the events and their bodies."""


class AmplitudeSink(Sink[AmplitudeConfig]):
    """Posts ``{"api_key", "events", "options"}`` and reads Amplitude's answer per event: the
    indexes it names in a 400 fail, throttled devices and users wait 30 s, the rest is resent."""

    type = "amplitude"
    max_batch_size = MAX_EVENTS
    default_concurrency = 4  # send() is safe from several threads

    def __init__(self, name: str, config: AmplitudeConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        # The SDK, imported here on the thread that builds the sink: its pieces are used below.
        import amplitude
        from amplitude import constants, http_client

        self._sdk = amplitude
        self._answers = http_client
        # The SDK's own paths, on the configured host.
        kind = constants.BATCH if config.use_batch else constants.HTTP_V2
        self.api = "batch" if config.use_batch else "v2"  # the key of MAX_BYTES
        path: str = urllib.parse.urlsplit(constants.SERVER_URL[constants.DEFAULT_ZONE][kind]).path
        self.url = config.base_url + path
        self._what = f"amplitude {path}"
        self._http = HttpTransport(self, headers=http_client.JSON_HEADER, what=self._what)

    # --- mapping --------------------------------------------------------------------------

    def event_body(self, event: Event) -> dict[str, Any]:
        """One event as Amplitude takes it, built by the SDK's ``BaseEvent``."""
        context = event.context
        app = context.get("app") or {}
        os_ = context.get("os") or {}
        distinct = event.distinct_id or event.instance_id
        fields: dict[str, Any] = {
            "event_type": event.name,
            "device_id": event.instance_id,
            "user_id": distinct if distinct != event.instance_id else None,
            "time": round(event.time * 1000),
            "insert_id": event.id,
            "app_version": _text(app.get("version")),
            "platform": "Python",
            "os_name": _text(os_.get("type")),
            "os_version": _text(os_.get("release")),
        }
        sdk_event = self._sdk.BaseEvent(**fields)
        # As the SDK's ContextPlugin sets it ("amplitude-python/1.3.0"), for this library.
        sdk_event["library"] = f"waypost/{context.get('waypost', '')}".rstrip("/")
        body: dict[str, Any] = sdk_event.get_event_body()
        # Set after the SDK's check: its validator drops the whole dict, silently, for values it
        # does not know (None or nested lists in a list), which Amplitude itself accepts.
        if event.properties:
            body["event_properties"] = event.properties
        return body

    def payload(self, bodies: list[dict[str, Any]], api_key: str) -> bytes:
        """The request body as the SDK's worker builds it (sorted keys, UTF-8)."""
        data: dict[str, Any] = {"api_key": api_key, "events": bodies}
        options = self._sdk.Config(min_id_length=self.config.min_id_length).options
        if options:
            data["options"] = options
        return json.dumps(data, sort_keys=True).encode("utf8")

    def plan(self, events: Sequence[Event], result: SendResult) -> list[_Request]:
        """Cut the batch into requests under Amplitude's count and size limits."""
        limit = MAX_BYTES[self.api] - 2048  # the envelope around the events
        bodies = [(event, self.event_body(event)) for event in events]
        weighted = [(event, body, len(json.dumps(body).encode()) + 2) for event, body in bodies]
        too_large = f"event exceeds the {self.api} API's request size limit"
        return pack(
            weighted, limit, max_items=MAX_EVENTS, result=result, too_large=lambda _: too_large
        )

    # --- sending --------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult()
        plan = self.plan(events, result)
        return send_in_parts(plan, lambda r: self._judge(r, self._exchange(r), result), result)

    def _exchange(self, request: _Request) -> httpx.Response:
        """POST the request with the SDK's headers."""
        data = self.payload(request.items, self.config.api_key.get_secret_value())
        return self._http.request("POST", self.url, content=data)

    def _judge(
        self, request: _Request, response: httpx.Response, result: SendResult
    ) -> AmplitudeResponse:
        """Read the answer with the SDK's ``Response`` (status from the body's ``code``)."""
        HttpStatus = self._answers.HttpStatus
        what = self._what
        # Amplitude echoes a refused key ("Invalid API key: <key>"): masked in every reason.
        text = self.mask(snippet(response.content))
        try:
            answer = self._answers.Response().parse(io.BytesIO(response.content))
        except (ValueError, KeyError, TypeError):
            self._http.unreadable(
                response,
                "without Amplitude's JSON answer (no 'code'), so nothing says the events were "
                "ingested",
            )

        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        kind = answer.status
        if kind == HttpStatus.SUCCESS:
            ingested = answer.body.get("events_ingested")
            if ingested is not None:
                result.receipt = f"events_ingested={ingested}"
            return answer
        reason = self.mask(f"{what}: HTTP {answer.code}: {str(answer.error) or text}")
        if kind == HttpStatus.PAYLOAD_TOO_LARGE:
            raise PayloadTooLarge(reason)
        if kind in (HttpStatus.TIMEOUT, HttpStatus.FAILED, HttpStatus.UNKNOWN):
            raise RetryableError(reason, retry_after=retry_after)
        if kind == HttpStatus.TOO_MANY_REQUESTS:
            self._throttled(request, answer, reason, retry_after, result)
            return answer
        # 400 and the other 4xx
        refused = self._refused(answer)
        if answer.missing_field or not refused:
            raise PermanentError(reason)
        for index, event in enumerate(request.events):
            if index in refused:
                result.mark_failed(event, f"{reason} ({refused[index]})")
            else:
                result.mark_retry(event, f"{what}: not ingested: other events of the request "
                                         "were refused; sent again without them")  # fmt: skip
        return answer

    def _throttled(
        self,
        request: _Request,
        answer: AmplitudeResponse,
        reason: str,
        retry_after: float | None,
        result: SendResult,
    ) -> None:
        """429: nothing was ingested. Throttled devices and users wait 30 s; events of a
        device or user over its daily quota fail (the SDK gives them up as well)."""
        body = answer.body
        throttled = set(answer.throttled_events or ())

        def listed(*keys: str) -> set[Any]:
            return {found for key in keys for found in body.get(key) or ()}

        throttled_ids = listed("throttled_devices", "throttled_users")
        over_quota = listed("exceeded_daily_quota_devices", "exceeded_daily_quota_users")
        for index, (event, sent) in enumerate(zip(request.events, request.items, strict=True)):
            ids = {sent.get("device_id"), sent.get("user_id")} - {None}
            if ids & over_quota:
                result.mark_failed(event, f"{reason}: the device or user exceeded its daily quota")
                continue
            result.mark_retry(event, reason)
            if index in throttled or ids & throttled_ids:
                retry_after = max(retry_after or 0.0, THROTTLE_WAIT)
        result.retry_after = retry_after if retry_after is not None else THROTTLE_WAIT

    @staticmethod
    def _refused(answer: AmplitudeResponse) -> dict[int, str]:
        """Index -> why, for the events a 400 names (the indexes the SDK drops as well)."""
        why: dict[int, str] = {}
        groups = (
            ("invalid field", answer.events_with_invalid_fields),
            ("missing field", answer.events_with_missing_fields),
            ("invalid id length", answer.events_with_invalid_id_lengths),
        )
        for label, by_field in groups:
            for field, indexes in (by_field or {}).items():
                for index in indexes:
                    why.setdefault(int(index), f"{label} {field}")
        for index in answer.silenced_events or ():
            why.setdefault(int(index), "silenced device or user")
        return why

    # --- debug --------------------------------------------------------------

    def render(self, events: Sequence[Event]) -> Any:
        """The requests ``send`` would make: URL and JSON body (the api_key shown as ``***``)."""
        result = SendResult()
        rendered = [
            self._http.render("POST", self.url, content=self.payload(request.items, "***"))
            for request in self.plan(events, result)
        ]
        if result.failed:
            rendered.append({"not_sent": result.failed})
        return rendered


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


register_sinks = registering(AmplitudeSink)
