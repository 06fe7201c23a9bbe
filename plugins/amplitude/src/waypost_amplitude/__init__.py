"""The ``amplitude`` sink: batches to Amplitude's HTTP V2 API (or ``/batch``), built and read
with the amplitude-analytics SDK's request pieces, never its client, queue or threads."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, field_validator

import waypost
from waypost.errors import PayloadTooLarge, PermanentError, RetryableError
from waypost.events import Event
from waypost.retry import parse_retry_after, raise_for_status
from waypost.sinks import HttpSinkConfig, SendResult, Sink

if TYPE_CHECKING:
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

    @field_validator("api_key")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("api_key must not be empty")
        return value


@dataclass
class _Request:
    events: list[Event]
    bodies: list[dict[str, Any]]


class AmplitudeSink(Sink):
    """Posts ``{"api_key", "events", "options"}`` and reads Amplitude's answer per event: the
    indexes it names in a 400 fail, throttled devices and users wait 30 s, the rest is resent."""

    type = "amplitude"
    Config = AmplitudeConfig
    max_batch_size = MAX_EVENTS
    default_concurrency = 4  # send() is safe from several threads

    @property
    def settings(self) -> AmplitudeConfig:
        assert isinstance(self.config, AmplitudeConfig)
        return self.config

    @property
    def api(self) -> str:
        return "batch" if self.settings.use_batch else "v2"

    @property
    def url(self) -> str:
        from amplitude import constants

        # The SDK's own paths, on the configured host.
        kind = constants.BATCH if self.settings.use_batch else constants.HTTP_V2
        path: str = urllib.parse.urlsplit(constants.SERVER_URL[constants.DEFAULT_ZONE][kind]).path
        return self.settings.base_url + path

    def open(self) -> None:
        import amplitude  # noqa: F401 (fail early if the SDK is missing)

    # --- mapping --------------------------------------------------------------------------

    def event_body(self, event: Event) -> dict[str, Any]:
        """One event as Amplitude takes it, built by the SDK's ``BaseEvent``."""
        from amplitude import BaseEvent

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
        sdk_event = BaseEvent(**fields)
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
        from amplitude import Config

        data: dict[str, Any] = {"api_key": api_key, "events": bodies}
        options = Config(min_id_length=self.settings.min_id_length).options
        if options:
            data["options"] = options
        return json.dumps(data, sort_keys=True).encode("utf8")

    def plan(self, events: Sequence[Event], result: SendResult) -> list[_Request]:
        """Cut the batch into requests under Amplitude's count and size limits."""
        limit = MAX_BYTES[self.api] - 2048  # the envelope around the events
        requests: list[_Request] = []
        batch: list[Event] = []
        bodies: list[dict[str, Any]] = []
        size = 0
        for event in events:
            body = self.event_body(event)
            weight = len(json.dumps(body).encode()) + 2
            if weight > limit:
                result.mark_failed(event, f"event exceeds the {self.api} API's request size limit")
                continue
            if batch and (len(batch) >= MAX_EVENTS or size + weight > limit):
                requests.append(_Request(batch, bodies))
                batch, bodies, size = [], [], 0
            batch.append(event)
            bodies.append(body)
            size += weight
        if batch:
            requests.append(_Request(batch, bodies))
        return requests

    # --- sending --------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult()
        plan = self.plan(events, result)
        for i, request in enumerate(plan):
            hold_back = None
            try:
                self._judge(request, *self._exchange(request), result)
                if result.retry_after is not None:  # throttled
                    hold_back = "held back: Amplitude throttled an earlier request of the batch"
            except PayloadTooLarge as exc:
                if len(plan) == 1:
                    raise  # the core splits the batch
                for event in request.events:  # resent alone next time, where a 413 splits it
                    result.mark_retry(event, exc.reason)
            except RetryableError as exc:
                for event in request.events:
                    result.mark_retry(event, exc.reason)
                result.retry_after = exc.retry_after
                hold_back = exc.reason
            except PermanentError as exc:
                for event in request.events:
                    result.mark_failed(event, exc.reason)
            if hold_back:  # Amplitude is down or throttling: do not press on
                for later in plan[i + 1 :]:
                    for event in later.events:
                        result.mark_retry(event, hold_back)
                break
        return result

    def _exchange(self, request: _Request) -> tuple[int, Mapping[str, str], bytes]:
        """POST the request with the SDK's headers; return status, headers and body."""
        from amplitude.http_client import JSON_HEADER

        data = self.payload(request.bodies, self.settings.api_key.get_secret_value())
        # The URL is checked http(s) by the config (check_endpoint), never file: or custom.
        http = urllib.request.Request(self.url, data=data, headers=JSON_HEADER, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(http, timeout=self.settings.timeout) as answer:  # noqa: S310
                return answer.status, dict(answer.headers.items()), answer.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers.items()), exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RetryableError(
                f"amplitude {self.url}: no answer: {type(reason).__name__}: {reason}"
            ) from None

    def _judge(
        self,
        request: _Request,
        status: int,
        headers: Mapping[str, str],
        raw: bytes,
        result: SendResult,
    ) -> AmplitudeResponse:
        """Read the answer with the SDK's ``Response`` (status from the body's ``code``)."""
        from amplitude.http_client import HttpStatus
        from amplitude.http_client import Response as AmplitudeResponse

        what = f"amplitude {urllib.parse.urlsplit(self.url).path}"
        # Amplitude echoes a refused key ("Invalid API key: <key>"): keep it out of reasons.
        key = self.settings.api_key.get_secret_value()
        text = raw.decode("utf8", "replace").replace(key, "***")
        try:
            answer = AmplitudeResponse().parse(io.BytesIO(raw))
        except (ValueError, KeyError, TypeError):
            if 200 <= status < 300:
                raise RetryableError(
                    f"{what}: HTTP {status} without Amplitude's JSON answer (no 'code'), so "
                    f"nothing says the events were ingested: {_snippet(text)!r}",
                    retry_after=parse_retry_after(_header(headers, "Retry-After")),
                ) from None
            raise_for_status(status, headers, text, what=what)
            raise PermanentError(f"{what}: HTTP {status}: {_snippet(text)}") from None

        retry_after = parse_retry_after(_header(headers, "Retry-After"))
        kind = answer.status
        if kind == HttpStatus.SUCCESS:
            ingested = answer.body.get("events_ingested")
            if ingested is not None:
                result.receipt = f"events_ingested={ingested}"
            return answer
        error = str(answer.error).replace(key, "***")
        reason = f"{what}: HTTP {answer.code}: {error or _snippet(text)}"
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
        throttled_ids = set(body.get("throttled_devices") or ()) | set(
            body.get("throttled_users") or ()
        )
        over_quota = set(body.get("exceeded_daily_quota_devices") or ()) | set(
            body.get("exceeded_daily_quota_users") or ()
        )
        for index, (event, sent) in enumerate(zip(request.events, request.bodies, strict=True)):
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

    # --- debug and test-sink --------------------------------------------------------------

    def render(self, events: Sequence[Event]) -> Any:
        """The requests ``send`` would make: URL and JSON body (the api_key shown as ``***``)."""
        result = SendResult()
        rendered: list[dict[str, Any]] = [
            {
                "method": "POST",
                "url": self.url,
                "content_type": "application/json; charset=UTF-8",
                "body": json.loads(self.payload(request.bodies, "***")),
            }
            for request in self.plan(events, result)
        ]
        if result.failed:
            rendered.append({"not_sent": result.failed})
        return rendered

    def test_request(self, event: Event) -> dict[str, Any]:
        """Send one event and return Amplitude's answer as it came."""
        result = SendResult()
        plan = self.plan([event], result)
        if not plan:
            return {"delivered": False, "reason": result.failed.get(event.id)}
        try:
            status, headers, raw = self._exchange(plan[0])
        except waypost.SinkError as exc:
            return {"url": self.url, "delivered": False, "reason": exc.reason}
        outcome = SendResult()
        try:
            self._judge(plan[0], status, headers, raw, outcome)
            reason = outcome.failed.get(event.id) or outcome.retry.get(event.id)
        except waypost.SinkError as exc:
            reason = exc.reason
        try:
            answer: Any = json.loads(raw)
        except ValueError:
            answer = _snippet(raw.decode("utf8", "replace"))
        return {
            "url": self.url,
            "http_status": status,
            "answer": answer,
            "delivered": reason is None,
            **({"reason": reason} if reason else {}),
        }


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def _snippet(text: str) -> str:
    return " ".join(text.split())[:300]


@waypost.hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(AmplitudeSink)
