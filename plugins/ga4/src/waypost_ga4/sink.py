"""The ``ga4`` sink: Google Analytics 4 through the Measurement Protocol, over httpx.

GA4 answers 2xx even to payloads it drops, so the sink fits every event to GA4's documented
limits before sending (see :mod:`waypost_ga4.limits`) and refuses, with a reason, the events
that cannot be sent as they are.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from waypost.errors import PayloadTooLarge, RetryableError, SinkError
from waypost.events import Event, dumps
from waypost.retry import raise_for_status
from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkConfig, SinkContext
from waypost_ga4 import limits
from waypost_ga4.limits import Refused

if TYPE_CHECKING:
    import httpx

__all__ = ["Ga4Config", "Ga4Sink", "app_instance_id"]

COLLECT_PATH = "/mp/collect"
DEBUG_PATH = "/debug/mp/collect"
EVENT_ID_PARAM = "event_id"

Consent = Literal["GRANTED", "DENIED"]
_HEX32 = re.compile(r"[0-9a-f]{32}")
_MAX_NOTES = 1000


class Ga4Config(HttpSinkConfig):
    """Settings of the ``ga4`` sink: one web stream (``measurement_id``) or one app stream
    (``firebase_app_id``), with the stream's Measurement Protocol ``api_secret``."""

    default_hosts: ClassVar[dict[str, str]] = {
        "": "https://www.google-analytics.com",
        "eu": "https://region1.google-analytics.com",
    }

    measurement_id: str | None = Field(
        default=None, min_length=1, description="Web stream: its Measurement ID (G-XXXXXXXXXX)."
    )
    firebase_app_id: str | None = Field(
        default=None, min_length=1, description="App stream: its Firebase App ID."
    )
    api_secret: SecretStr = Field(description="The stream's Measurement Protocol API secret.")
    client_id: str | None = Field(
        default=None,
        min_length=1,
        description="Client id of every event; default: the event's distinct id (the "
        "instance id). For app streams the 32-hex app_instance_id is derived from it.",
    )
    user_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=limits.MAX_USER_ID_LENGTH,
        description="GA4 User-ID sent with every event; none by default.",
    )
    ad_user_data: Consent | None = Field(
        default="DENIED", description="Consent for sending user data to Google for ads."
    )
    ad_personalization: Consent | None = Field(
        default="DENIED", description="Consent for ads personalisation."
    )

    @model_validator(mode="after")
    def _one_stream(self) -> Ga4Config:
        if (self.measurement_id is None) == (self.firebase_app_id is None):
            raise ValueError(
                "set exactly one of measurement_id (a web stream) or firebase_app_id "
                "(an app stream)"
            )
        if not self.api_secret.get_secret_value().strip():
            raise ValueError("api_secret is empty; create one under Admin > Data streams > "
                             "your stream > Measurement Protocol API secrets")  # fmt: skip
        return self

    @property
    def app_stream(self) -> bool:
        return self.firebase_app_id is not None

    def query(self, *, redact: bool = False) -> dict[str, str]:
        """The query parameters of every request (the secret shown as ``***`` if asked)."""
        stream = (
            {"firebase_app_id": str(self.firebase_app_id)}
            if self.app_stream
            else {"measurement_id": str(self.measurement_id)}
        )
        secret = "***" if redact else self.api_secret.get_secret_value()
        return {**stream, "api_secret": secret}


def app_instance_id(identity: str) -> str:
    """The 32-hex ``app_instance_id`` GA4 requires for app streams, derived deterministically
    from an id: a UUID gives its own hex, any other text its SHA-256 prefix."""
    lowered = identity.strip().lower()
    if _HEX32.fullmatch(lowered):
        return lowered
    try:
        return uuid.UUID(lowered).hex
    except ValueError:
        return hashlib.sha256(identity.encode()).hexdigest()[:32]


@dataclass
class _Item:
    """One event fitted to GA4: who it counts for, its GA4 form and its notes."""

    event: Event
    identity: str
    user_properties: dict[str, dict[str, Any]]
    payload: dict[str, Any]
    notes: list[str]

    @property
    def group(self) -> tuple[str, str]:
        return self.identity, dumps(self.user_properties)


@dataclass
class _Request:
    events: list[Event]
    body: dict[str, Any]
    data: bytes


class _SecretFilter(logging.Filter):
    """httpx logs every request URL at INFO, and GA4 takes the API secret in the URL: this
    filter (on the ``httpx`` logger) masks the secrets of every open GA4 sink."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: collections.Counter[str] = collections.Counter()  # open sinks per secret

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                message = record.getMessage()
            except Exception:
                return True
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, "***")
                record.msg, record.args = message, None
        return True


_SECRET_FILTER = _SecretFilter()


class Ga4Sink(Sink):
    """Sends batches to GA4's ``/mp/collect``: at most 25 events per request, one request per
    client id (and context), every event within GA4's limits or refused with a reason."""

    type = "ga4"
    Config = Ga4Config
    max_batch_size = limits.MAX_EVENTS_PER_REQUEST
    default_concurrency = 4  # send() is safe from several threads

    def __init__(self, name: str, config: SinkConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        self._client: httpx.Client | None = None
        self._noted: set[str] = set()

    @property
    def settings(self) -> Ga4Config:
        assert isinstance(self.config, Ga4Config)
        return self.config

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        import httpx

        from waypost_ga4 import __version__

        secret = self.settings.api_secret.get_secret_value()
        _SECRET_FILTER.secrets[secret] += 1
        self._masked = secret
        httpx_logger = logging.getLogger("httpx")
        if _SECRET_FILTER not in httpx_logger.filters:
            httpx_logger.addFilter(_SECRET_FILTER)
        self._client = httpx.Client(
            timeout=self.settings.timeout,
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"waypost-ga4/{__version__}",
            },
        )

    def close(self) -> None:
        secret: str | None = getattr(self, "_masked", None)
        self._masked = ""
        if secret:
            _SECRET_FILTER.secrets[secret] -= 1
            if _SECRET_FILTER.secrets[secret] <= 0:
                del _SECRET_FILTER.secrets[secret]
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- the contract -------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult()
        work = deque(self._requests(events, result, now=time.time()))
        while work:
            request = work.popleft()
            try:
                self._post(COLLECT_PATH, request.data)
            except PayloadTooLarge as exc:
                if len(request.events) == 1:
                    result.mark_failed(request.events[0], exc.reason)
                else:
                    half = len(request.events) // 2
                    work.extendleft(reversed(self._split(request, half)))
            except SinkError as exc:
                if not exc.retryable:
                    for event in request.events:
                        result.mark_failed(event, exc.reason)
                    continue
                # The destination is down or throttling: what is left waits for the retry.
                for pending in (request, *work):
                    for event in pending.events:
                        result.mark_retry(event, exc.reason)
                result.retry_after = exc.retry_after
                break
        return result

    def render(self, events: Sequence[Event]) -> Any:
        result = SendResult()
        requests = self._requests(events, result, now=time.time())
        url = self._display_url(COLLECT_PATH)
        return {
            "requests": [{"method": "POST", "url": url, "body": r.body} for r in requests],
            "refused": result.failed,
        }

    def test_request(self, event: Event) -> dict[str, Any]:
        """Send ``event`` to GA4's validation server (``/debug/mp/collect``, nothing is
        recorded) and return its ``validationMessages``. An event the sink would refuse is
        sent as it is, so GA4's own verdict shows next to the sink's reason."""
        if self._client is None:
            self.open()
        now = time.time()
        refused: str | None = None
        try:
            item = self._fit(event, now)
        except Refused as exc:
            refused = exc.reason
            item = self._fit(event, now, check=False)
        body = self._body([item])
        response = self._post(DEBUG_PATH, dumps(body).encode())
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            answer = {}
        messages = list(answer.get("validationMessages") or []) if isinstance(answer, dict) else []
        return {
            "endpoint": self._display_url(DEBUG_PATH),
            "status": response.status_code,
            "valid": not messages and refused is None,
            "validationMessages": messages,
            "refused": refused,
            "notes": item.notes,
            "request": body,
        }

    # --- building requests --------------------------------------------------------------------

    def _identity(self, event: Event) -> str:
        identity = self.settings.client_id or event.distinct_id or event.instance_id
        return app_instance_id(identity) if self.settings.app_stream else identity

    def _fit(self, event: Event, now: float, *, check: bool = True) -> _Item:
        """``event`` in GA4's form, or :class:`Refused`. With ``check=False`` the name and the
        age are left as they are (for the validation server to judge)."""
        if check:
            name = limits.event_name(event.name)
            age = now - event.time
            if age > limits.MAX_BACKDATE_SECONDS:
                raise Refused(
                    f"event is {age / 3600:.0f} hours old; GA4 takes events backdated up to "
                    f"{limits.MAX_BACKDATE_SECONDS // 3600} hours and drops older ones"
                )
        else:
            name = event.name
        params, notes = limits.event_params(event.properties, {EVENT_ID_PARAM: event.id})
        user_props, context_notes = limits.user_properties(event.context)
        payload = {
            "name": name,
            "params": params,
            # GA4 takes past times only: a clock running ahead is clamped to now.
            "timestamp_micros": int(min(event.time, now) * 1_000_000),
        }
        return _Item(event, self._identity(event), user_props, payload, notes + context_notes)

    def _body(self, items: Sequence[_Item]) -> dict[str, Any]:
        settings = self.settings
        first = items[0]
        body: dict[str, Any] = {
            ("app_instance_id" if settings.app_stream else "client_id"): first.identity
        }
        if settings.user_id:
            body["user_id"] = settings.user_id
        body["timestamp_micros"] = min(item.payload["timestamp_micros"] for item in items)
        consent = {
            key: value
            for key, value in (
                ("ad_user_data", settings.ad_user_data),
                ("ad_personalization", settings.ad_personalization),
            )
            if value is not None
        }
        if consent:
            body["consent"] = consent
        if first.user_properties:
            body["user_properties"] = first.user_properties
        body["events"] = [item.payload for item in items]
        return body

    def _requests(
        self, events: Sequence[Event], result: SendResult, *, now: float
    ) -> list[_Request]:
        """Fit the events and pack them: one request per client id and context, at most 25
        events and under 130 kB each. Refused events are marked failed in ``result``."""
        groups: dict[tuple[str, str], list[_Item]] = {}
        for event in events:
            try:
                item = self._fit(event, now)
            except Refused as exc:
                result.mark_failed(event, f"GA4 limits: {exc.reason}")
                continue
            self._note(item)
            groups.setdefault(item.group, []).append(item)
        requests: list[_Request] = []
        for items in groups.values():
            empty = len(dumps(self._body(items[:1])).encode()) - self._size(items[0])
            chunk: list[_Item] = []
            size = empty
            for item in items:
                grows = self._size(item) + 1
                if empty + grows >= limits.MAX_BODY_BYTES:
                    result.mark_failed(
                        item.event,
                        f"GA4 limits: the event alone makes a body of {empty + grows} bytes; "
                        f"GA4 takes bodies under {limits.MAX_BODY_BYTES}",
                    )
                    continue
                if chunk and (
                    len(chunk) == limits.MAX_EVENTS_PER_REQUEST
                    or size + grows >= limits.MAX_BODY_BYTES
                ):
                    requests.append(self._request(chunk))
                    chunk, size = [], empty
                chunk.append(item)
                size += grows
            if chunk:
                requests.append(self._request(chunk))
        return requests

    @staticmethod
    def _size(item: _Item) -> int:
        return len(dumps(item.payload).encode())

    def _request(self, items: list[_Item]) -> _Request:
        body = self._body(items)
        return _Request([item.event for item in items], body, dumps(body).encode())

    def _split(self, request: _Request, at: int) -> list[_Request]:
        parts = []
        for events, payloads in (
            (request.events[:at], request.body["events"][:at]),
            (request.events[at:], request.body["events"][at:]),
        ):
            body = {**request.body, "events": payloads}
            body["timestamp_micros"] = min(p["timestamp_micros"] for p in payloads)
            parts.append(_Request(events, body, dumps(body).encode()))
        return parts

    # --- the wire -------------------------------------------------------------------------

    def _post(self, path: str, data: bytes) -> httpx.Response:
        import httpx

        if self._client is None:
            raise RetryableError(f"GA4 sink {self.name!r} is not open")
        url = f"{self.settings.base_url}{path}"
        try:
            response = self._client.post(url, params=self.settings.query(), content=data)
        except httpx.TimeoutException as exc:
            raise RetryableError(
                f"GA4: no answer within {self.settings.timeout:g} s ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise RetryableError(self._scrub(f"GA4: {type(exc).__name__}: {exc}")) from None
        try:
            raise_for_status(
                response.status_code, response.headers, response.text, what=f"GA4 {path}"
            )
        except SinkError as exc:
            exc.reason = self._scrub(exc.reason)
            exc.args = (exc.reason,)
            raise
        return response

    def _scrub(self, text: str) -> str:
        return text.replace(self.settings.api_secret.get_secret_value(), "***")

    def _display_url(self, path: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.settings.query(redact=True).items())
        return f"{self.settings.base_url}{path}?{query}"

    def _note(self, item: _Item) -> None:
        """Log each distinct change made to fit GA4 once (per sink), not once per event."""
        for note in item.notes:
            key = f"{item.payload['name']}: {note}"
            if key in self._noted or len(self._noted) >= _MAX_NOTES:
                continue
            self._noted.add(key)
            self.context.logger.warning(
                "waypost: sink %r: event %s (to fit GA4's limits)", self.name, key
            )
