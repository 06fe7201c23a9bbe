"""The ``plausible`` sink (deprecated): events to Plausible's Events API, one request each.

Kept for applications that already report to Plausible, as FlowForge did before 0.9. Plausible
counts visitors of web pages, not installations of an application: it has no event ids (no
dedup), no event timestamps (an event is counted when it arrives) and no batch API. Use the
``posthog`` sink (``pip install waypost-posthog``) or the ``http`` sink instead; this one goes
away in waypost 1.0.
"""

from __future__ import annotations

import string
import urllib.parse
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator

from waypost.events import Event, dumps
from waypost.hookspecs import registering
from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkContext
from waypost.sinks.parts import Chunk, send_in_parts, sift
from waypost.sinks.transport import HttpTransport, json_object, snippet

if TYPE_CHECKING:
    import httpx

__all__ = ["DEPRECATION", "PlausibleConfig", "PlausibleSink", "plausible_props"]

DEPRECATION = (
    "the plausible sink (waypost-plausible) is deprecated and will be removed in waypost 1.0; "
    "use the posthog sink (pip install waypost-posthog) or the http sink instead"
)
warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)

MAX_PROPS = 30
MAX_KEY_BYTES = 300
MAX_VALUE_BYTES = 2_000
MAX_URL_BYTES = 2_000
MAX_NAME_CHARS = 120
DROPPED_HEADER = "x-plausible-dropped"
_TEMPLATE_FIELDS = frozenset({"app", "version", "event", "instance"})


class PlausibleConfig(HttpSinkConfig):
    """Settings of the ``plausible`` sink: the site ``domain`` is required."""

    default_hosts: ClassVar[dict[str, str]] = {"": "https://plausible.io"}

    domain: str = Field(min_length=1, description="The site's domain as registered in Plausible.")
    url_template: str = Field(
        default="app://{app}/{event}",
        description="Page URL sent with each event; fields: app, version, event, instance.",
    )

    @field_validator("url_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"url_template {value!r} is not a valid template: {exc}") from None
        unknown = sorted(fields - _TEMPLATE_FIELDS)
        if unknown:
            known = ", ".join(sorted(_TEMPLATE_FIELDS))
            raise ValueError(f"url_template uses unknown field(s) {unknown}; known: {known}")
        if urllib.parse.urlsplit(value).scheme in ("", "data"):
            raise ValueError("url_template must start with a scheme such as app:// or https://")
        return value


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def plausible_props(properties: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """Event properties as Plausible accepts them, in their original order.

    Scalars stay as they are (Plausible stores them as text); string values are cut to 2,000
    bytes; lists and objects are sent as compact JSON text when that fits in 2,000 bytes and
    dropped otherwise; ``None``, blank strings and keys over 300 bytes are dropped; only the
    first 30 properties that remain are sent.
    """
    out: dict[str, str | int | float | bool] = {}
    for key, value in properties.items():
        if len(out) == MAX_PROPS:
            break
        if not key.strip() or len(key.encode()) > MAX_KEY_BYTES or value is None:
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = value
            continue
        if isinstance(value, str):
            text = _clip(value, MAX_VALUE_BYTES)
        else:
            text = dumps(value)
            if len(text.encode()) > MAX_VALUE_BYTES:
                continue
        if text.strip():
            out[key] = text
    return out


def _errors(response: httpx.Response) -> str:
    """Plausible's 400 answer ``{"errors": {"field": ["message"]}}`` as one line."""
    errors = (json_object(response) or {}).get("errors")
    if not isinstance(errors, dict) or not errors:
        return snippet(response.text) or "no details"
    parts = []
    for field, messages in errors.items():
        text = "; ".join(map(str, messages)) if isinstance(messages, list) else str(messages)
        parts.append(f"{field}: {text}")
    return snippet(", ".join(parts))


class PlausibleSink(Sink[PlausibleConfig]):
    """One ``POST {host}/api/event`` per event (Plausible has no batch API)."""

    type = "plausible"
    max_batch_size = 50
    default_concurrency = 4  # send() is safe from several threads
    deprecated = DEPRECATION

    def __init__(self, name: str, config: PlausibleConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        # The application's own agent (Plausible drops agents that look like bots or headless
        # browsers, and this one names neither a crawler nor an HTTP library).
        self._http = HttpTransport(
            self, headers={"Content-Type": "application/json"}, what="Plausible"
        )

    @property
    def endpoint(self) -> str:
        return f"{self.config.base_url}/api/event"

    # --- what is sent ---------------------------------------------------------------------------

    def page_url(self, event: Event) -> str:
        def quote(text: str) -> str:
            return urllib.parse.quote(text, safe="-._~")

        return self.config.url_template.format(
            app=quote(self.context.app),
            version=quote(self.context.version),
            event=quote(event.name),
            instance=quote(event.instance_id),
        )

    def body(self, event: Event) -> dict[str, Any]:
        """The JSON body for one event."""
        body: dict[str, Any] = {
            "name": event.name,
            "url": self.page_url(event),
            "domain": self.config.domain,
        }
        props = plausible_props(event.properties)
        if props:
            body["props"] = props
        return body

    def render(self, events: Sequence[Event]) -> Any:
        return [self.body(e) for e in events]

    # --- sending --------------------------------------------------------------------------------

    def _post(self, event: Event) -> httpx.Response:
        return self._http.request("POST", "/api/event", content=dumps(self.body(event)).encode())

    def _refusal(self, event: Event) -> str | None:
        """Why Plausible would refuse this event, checked before sending it."""
        if len(event.name) > MAX_NAME_CHARS:
            return f"event name longer than {MAX_NAME_CHARS} characters"
        if len(self.page_url(event).encode()) > MAX_URL_BYTES:
            return f"page url from url_template longer than {MAX_URL_BYTES} bytes"
        return None

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult.ok()
        # One event per request (Plausible has no batch API), what it would refuse left out.
        parts: list[Chunk[None]] = [Chunk([e]) for e in sift(events, self._refusal, result)]

        def send_one(part: Chunk[None]) -> None:
            (event,) = part.events
            response = self._post(event)
            if response.status_code in (400, 422):
                refused = self.mask(_errors(response))
                result.mark_failed(event, f"Plausible refused the event: {refused}")
                return
            self._http.check(response)
            dropped = response.headers.get(DROPPED_HEADER)
            if dropped:
                result.mark_dropped(
                    event, f"Plausible accepted but dropped the event ({DROPPED_HEADER}: {dropped})"
                )

        # A failure that is not about one event (down, busy, refusing us) is the rest's too.
        return send_in_parts(parts, send_one, result, permanent_fails_rest=True)


register_sinks = registering(PlausibleSink)
