"""The ``ga4`` sink: Google Analytics 4 through the Measurement Protocol, over the core's HTTP
transport (the API secret, which GA4 takes in the query, never stands in a URL httpx logs).

GA4 answers 2xx even to payloads it drops, so the sink fits every event to GA4's documented
limits before sending (see :mod:`waypost_ga4.limits`) and refuses, with a reason, the events
that cannot be sent as they are.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from waypost.events import Event, dumps
from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkContext
from waypost.sinks.parts import pack, send_in_parts
from waypost.sinks.transport import HttpTransport, json_object
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

    @property
    def stream(self) -> dict[str, str]:
        """The query parameter naming the stream."""
        if self.app_stream:
            return {"firebase_app_id": str(self.firebase_app_id)}
        return {"measurement_id": str(self.measurement_id)}


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
    items: list[_Item]
    body: dict[str, Any]

    @property
    def events(self) -> list[Event]:
        return [item.event for item in self.items]


class Ga4Sink(Sink[Ga4Config]):
    """Sends batches to GA4's ``/mp/collect``: at most 25 events per request, one request per
    client id (and context), every event within GA4's limits or refused with a reason."""

    type = "ga4"
    max_batch_size = limits.MAX_EVENTS_PER_REQUEST
    default_concurrency = 4  # send() is safe from several threads

    def __init__(self, name: str, config: Ga4Config, context: SinkContext) -> None:
        super().__init__(name, config, context)
        self._noted: set[str] = set()
        self._http = HttpTransport(
            self,
            headers={"Content-Type": "application/json"},
            params={"api_secret": config.api_secret.get_secret_value()},  # on the wire only
            what="GA4",
        )

    # --- the contract -------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult()
        requests = self._requests(events, result, now=time.time())
        return send_in_parts(
            requests,
            lambda request: self._post(COLLECT_PATH, dumps(request.body).encode()),
            result,
            split=self._halves,
        )

    def render(self, events: Sequence[Event]) -> Any:
        result = SendResult()
        requests = self._requests(events, result, now=time.time())
        url = self._http.url(COLLECT_PATH, self.config.stream)
        return {
            "requests": [{"method": "POST", "url": url, "body": r.body} for r in requests],
            "refused": result.failed,
        }

    def test_request(self, event: Event) -> dict[str, Any]:
        """Send ``event`` to GA4's validation server (``/debug/mp/collect``, nothing is
        recorded) and return its ``validationMessages``. An event the sink would refuse is
        sent as it is, so GA4's own verdict shows next to the sink's reason."""
        now = time.time()
        refused: str | None = None
        try:
            item = self._fit(event, now)
        except Refused as exc:
            refused = exc.reason
            item = self._fit(event, now, check=False)
        body = self._body([item])
        response = self._post(DEBUG_PATH, dumps(body).encode())
        answer = json_object(response) or {}
        messages = list(answer.get("validationMessages") or [])
        return {
            "endpoint": self._http.url(DEBUG_PATH, self.config.stream),
            "status": response.status_code,
            "valid": not messages and refused is None,
            "validationMessages": messages,
            "refused": refused,
            "notes": item.notes,
            "request": body,
        }

    # --- building requests --------------------------------------------------------------------

    def _identity(self, event: Event) -> str:
        identity = self.config.client_id or event.distinct_id or event.instance_id
        return app_instance_id(identity) if self.config.app_stream else identity

    def _fit(self, event: Event, now: float, *, check: bool = True) -> _Item:
        """``event`` in GA4's form, or :class:`Refused`. With ``check=False`` the name and the
        age are left as they are (for the validation server to judge)."""
        name = limits.event_name(event.name) if check else event.name
        age = now - event.time
        if check and age > limits.MAX_BACKDATE_SECONDS:
            raise Refused(
                f"event is {age / 3600:.0f} hours old; GA4 takes events backdated up to "
                f"{limits.MAX_BACKDATE_SECONDS // 3600} hours and drops older ones"
            )
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
        config = self.config
        first = items[0]
        body: dict[str, Any] = {
            ("app_instance_id" if config.app_stream else "client_id"): first.identity
        }
        if config.user_id:
            body["user_id"] = config.user_id
        body["timestamp_micros"] = min(item.payload["timestamp_micros"] for item in items)
        kinds = ("ad_user_data", "ad_personalization")
        consent = {k: getattr(config, k) for k in kinds if getattr(config, k) is not None}
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
            weighted = [(item.event, item, self._size(item) + 1) for item in items]

            def too_large(grows: int, empty: int = empty) -> str:
                return (
                    f"GA4 limits: the event alone makes a body of {empty + grows} bytes; "
                    f"GA4 takes bodies under {limits.MAX_BODY_BYTES}"
                )

            limit = limits.MAX_BODY_BYTES - 1 - empty  # bodies are under MAX_BODY_BYTES
            most = limits.MAX_EVENTS_PER_REQUEST
            for chunk in pack(weighted, limit, max_items=most, result=result, too_large=too_large):
                requests.append(self._request(chunk.items))
        return requests

    @staticmethod
    def _size(item: _Item) -> int:
        return len(dumps(item.payload).encode())

    def _request(self, items: list[_Item]) -> _Request:
        return _Request(items, self._body(items))

    def _halves(self, request: _Request) -> list[_Request]:
        half = len(request.items) // 2
        return [self._request(request.items[:half]), self._request(request.items[half:])]

    # --- the wire -------------------------------------------------------------------------

    def _post(self, path: str, data: bytes) -> httpx.Response:
        return self._http.send(
            "POST", path, content=data, params=self.config.stream, what=f"GA4 {path}"
        )

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
