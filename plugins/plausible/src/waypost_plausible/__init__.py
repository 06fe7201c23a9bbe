"""The ``plausible`` sink (deprecated): events to Plausible's Events API, one request each.

Kept for applications that already report to Plausible, as FlowForge did before 0.9. Plausible
counts visitors of web pages, not installations of an application: it has no event ids (no
dedup), no event timestamps (an event is counted when it arrives) and no batch API. Use the
``posthog`` sink (``pip install waypost-posthog``) or the ``http`` sink instead; this one goes
away in waypost 1.0.
"""

from __future__ import annotations

import json
import re
import string
import urllib.parse
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import httpx
from pydantic import Field, field_validator

import waypost
from waypost.errors import PayloadTooLarge, PermanentError, RetryableError, SinkError
from waypost.events import Event, dumps
from waypost.retry import raise_for_status
from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkContext

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


def _product(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.!#$%&'*+^_`|~-]+", "-", text).strip("-") or "app"


def _errors(response: httpx.Response) -> str:
    """Plausible's 400 answer ``{"errors": {"field": ["message"]}}`` as one line."""
    try:
        errors = json.loads(response.content).get("errors")
    except (ValueError, AttributeError):
        errors = None
    if not isinstance(errors, dict) or not errors:
        return " ".join(response.text.split())[:300] or "no details"
    parts = []
    for field, messages in errors.items():
        text = "; ".join(map(str, messages)) if isinstance(messages, list) else str(messages)
        parts.append(f"{field}: {text}")
    return ", ".join(parts)[:300]


class PlausibleSink(Sink):
    """One ``POST {host}/api/event`` per event (Plausible has no batch API)."""

    type = "plausible"
    Config = PlausibleConfig
    max_batch_size = 50
    default_concurrency = 4  # send() is safe from several threads
    deprecated = DEPRECATION
    config: PlausibleConfig

    def __init__(self, name: str, config: Any, context: SinkContext) -> None:
        super().__init__(name, config, context)
        self._client: httpx.Client | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.config.base_url}/api/event"

    def open(self) -> None:
        context = self.context
        # An application's own agent: Plausible drops agents that look like bots or headless
        # browsers, and this one names neither a library nor a crawler.
        agent = f"{_product(context.app)}/{_product(context.version)} waypost/{waypost.__version__}"
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.config.timeout),
            headers={"User-Agent": agent},
            follow_redirects=False,
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

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
        if self._client is None:
            self.open()
        assert self._client is not None
        content = dumps(self.body(event)).encode()
        headers = {"Content-Type": "application/json"}
        try:
            return self._client.post(self.endpoint, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise RetryableError(
                f"no answer from Plausible within {self.config.timeout:g} s ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc

    def _refusal(self, event: Event) -> str | None:
        """Why Plausible would refuse this event, checked before sending it."""
        if len(event.name) > MAX_NAME_CHARS:
            return f"event name longer than {MAX_NAME_CHARS} characters"
        if len(self.page_url(event).encode()) > MAX_URL_BYTES:
            return f"page url from url_template longer than {MAX_URL_BYTES} bytes"
        return None

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult.ok()
        for index, event in enumerate(events):
            refusal = self._refusal(event)
            if refusal:
                result.mark_failed(event, refusal)
                continue
            try:
                response = self._post(event)
                status = response.status_code
                if status in (400, 422):
                    result.mark_failed(event, f"Plausible refused the event: {_errors(response)}")
                    continue
                raise_for_status(status, response.headers, response.text, what="Plausible")
            except PayloadTooLarge as exc:
                result.mark_failed(event, f"event too large: {exc.reason}")
                continue
            except SinkError as exc:
                # The endpoint is down, busy or refusing us: stop here, the rest shares the fate.
                rest = events[index:]
                if isinstance(exc, PermanentError):
                    for other in rest:
                        result.mark_failed(other, exc.reason)
                else:
                    for other in rest:
                        result.mark_retry(other, exc.reason)
                    result.retry_after = exc.retry_after
                break
            dropped = response.headers.get(DROPPED_HEADER)
            if dropped:
                result.mark_dropped(
                    event, f"Plausible accepted but dropped the event ({DROPPED_HEADER}: {dropped})"
                )
        return result

    def test_request(self, event: Event) -> dict[str, Any]:
        try:
            response = self._post(event)
        except RetryableError as exc:
            return {"delivered": False, "status": None, "dropped": False, "error": exc.reason}
        dropped = response.headers.get(DROPPED_HEADER)
        return {
            "delivered": response.status_code == 202 and not dropped,
            "status": response.status_code,
            "dropped": bool(dropped),
            "answer": " ".join(response.text.split())[:500],
        }


@waypost.hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(PlausibleSink)
