"""The ``http`` sink: batches of events to any HTTP endpoint, as JSON, NDJSON or CloudEvents.

One request per batch, through the core's :class:`~waypost.sinks.HttpTransport`. The body can be
gzipped and signed (HMAC-SHA256 over the exact bytes sent). The endpoint may answer per event;
see the README for the wire format, the answer schema and a signature verification snippet.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

import waypost
from waypost.events import Event, dumps
from waypost.sinks import SendResult, Sink, SinkConfig, SinkContext, check_endpoint
from waypost.sinks.cloudevents import cloudevent
from waypost.sinks.transport import (
    HttpTransport,
    check_headers,
    json_object,
    parse_retry_after,
    snippet,
)

if TYPE_CHECKING:
    import httpx

_orjson: ModuleType | None
try:  # a C encoder about four times as fast; where it has no wheel, the standard one
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised by a test that hides it
    _orjson = None

__all__ = [
    "CONTENT_TYPES",
    "RECEIPT_KEYS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "HttpConfig",
    "HttpSink",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Waypost-Signature"
TIMESTAMP_HEADER = "X-Waypost-Timestamp"

RECEIPT_KEYS = ("uuid", "receipt", "id")
"""Top-level keys of a 2xx JSON answer read as the submission's receipt, first match wins."""

CONTENT_TYPES = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "cloudevents": "application/cloudevents-batch+json",
}


class HttpConfig(SinkConfig):
    """Settings of the ``http`` sink. Header values and the signing secret are secrets."""

    # Header values may carry tokens: keep every input value out of validation messages.
    model_config = ConfigDict(hide_input_in_errors=True)

    url: str = Field(
        description="Full endpoint URL (https://, or http:// on loopback). User info is sent "
        "as Basic auth and secret-looking query values (token=, key=...) are kept out of logs."
    )
    method: Literal["POST", "PUT"] = Field(default="POST", description="HTTP method.")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Extra request headers, e.g. Authorization: Bearer ${TOKEN} (never logged).",
    )
    format: Literal["json", "ndjson", "cloudevents"] = Field(
        default="json", description="Body format: json, ndjson or cloudevents (batch mode)."
    )
    gzip: bool = Field(default=False, description="Compress the body (Content-Encoding: gzip).")
    allow_http: bool = Field(default=False, description="Allow http:// to a non-loopback host.")
    signing_secret: SecretStr | None = Field(
        default=None, description="Sign each request with HMAC-SHA256 over timestamp and body."
    )
    cloudevents_source: str | None = Field(
        default=None, description="CloudEvents source attribute; default /waypost/<app>."
    )
    cloudevents_type_prefix: str = Field(
        default="waypost.", description="CloudEvents type is this prefix + the event name."
    )

    @field_validator("method", mode="before")
    @classmethod
    def _upper_method(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    _check_headers = field_validator("headers")(
        lambda cls, value: check_headers(value, (SIGNATURE_HEADER, TIMESTAMP_HEADER))
    )

    @field_validator("signing_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("signing_secret must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _check_url(self) -> HttpConfig:
        url = check_endpoint(self.url, allow_http=self.allow_http)
        object.__setattr__(self, "url", self._take_url_secrets(url, "url"))
        if self.url_secrets.basic_auth and any(k.lower() == "authorization" for k in self.headers):
            raise ValueError(
                "url carries user info and headers set Authorization as well: which credential "
                "is meant is ambiguous; give it in one place"
            )
        return self


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-Waypost-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of
    ``f"{timestamp}.".encode() + body`` with ``secret``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """For receivers written in Python: check a request's signature and timestamp.

    ``body`` is the raw request body as received (still gzipped if it was sent gzipped);
    requests older or newer than ``tolerance`` seconds are refused (replay protection).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or not signature:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class HttpSink(Sink[HttpConfig]):
    """Posts each batch as one request; honours per-event results in a JSON answer."""

    type = "http"
    max_batch_size = 1000
    default_concurrency = 8  # send() is safe from several threads; started as needed

    def __init__(self, name: str, config: HttpConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        headers = {k: v.get_secret_value() for k, v in config.headers.items()}
        self._http = HttpTransport(self, headers=headers)
        app = urllib.parse.quote(context.app, safe="")
        self._source = config.cloudevents_source or f"/waypost/{app}"

    # --- the body -------------------------------------------------------------------------------

    def render(self, events: Sequence[Event]) -> Any:
        if self.config.format == "cloudevents":
            prefix = self.config.cloudevents_type_prefix
            return [cloudevent(e, self._source, prefix) for e in events]
        return [e.to_dict() for e in events]

    def encode(self, events: Sequence[Event]) -> bytes:
        """The body exactly as it is sent (before gzip)."""
        items = self.render(events)
        if _orjson is not None:
            try:
                if self.config.format == "ndjson":
                    return b"".join([_orjson.dumps(item) + b"\n" for item in items])
                body: bytes = _orjson.dumps(items)
                return body
            except TypeError:  # an integer past 64 bits: the standard encoder takes it
                pass
        if self.config.format == "ndjson":
            return "".join(dumps(item) + "\n" for item in items).encode()
        return dumps(items).encode()

    def _request(self, events: Sequence[Event]) -> httpx.Response:
        config = self.config
        body = self.encode(events)
        headers = {"Content-Type": CONTENT_TYPES[config.format]}
        if config.gzip:
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        if config.signing_secret is not None:
            # Fresh on every attempt, so a retried batch still falls inside the replay window.
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(
                config.signing_secret.get_secret_value(), timestamp, body
            )
        return self._http.request(config.method, content=body, headers=headers)

    # --- sending --------------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        response = self._http.check(self._request(events))
        return _per_event_results(events, response, self.mask)

    def test_request(self, event: Event) -> dict[str, Any]:
        """Send one event and return the endpoint's answer as it came."""
        return self._http.test_request(event)


def _per_event_results(
    events: Sequence[Event], response: httpx.Response, mask: Callable[[str], str]
) -> SendResult:
    """Read a 2xx answer's per-event results, if it has any (else everything was delivered).

    Understood shapes (all keys optional): ``{"results": [{"id", "status": "ok" | "duplicate" |
    "retry" | "failed", "error"}]}``, ``{"rejected": [ids]}`` (failed for good) and
    ``{"retry": [ids]}``, and a waypost collector's ``{"refused": [{"id", "reason", "detail"}]}``
    (failed for good). Ids that are not in the batch are ignored; an unknown status fails the
    event, with the status in the reason. A top-level ``uuid``, ``receipt`` or ``id`` string is
    the endpoint's reference to this submission (Firefly III answers ``{"uuid": "..."}``): it
    becomes ``SendResult.receipt``, which the core logs and keeps with the records. A
    ``control`` object becomes ``SendResult.control`` (see ``waypost.control``).
    """
    result = SendResult.ok()
    data = json_object(response)
    if data is None:
        return result
    result.receipt = _receipt(data)
    control = data.get("control")
    if isinstance(control, dict):  # the core reads it strictly and only ever sends less
        result.control = control
    ids = {e.id for e in events}
    results = data.get("results")
    for item in results if isinstance(results, list) else ():
        if not isinstance(item, dict) or str(item.get("id")) not in ids:
            continue
        event_id = str(item["id"])
        status = str(item.get("status", "ok")).lower()
        error = item.get("error")
        detail = f": {mask(snippet(str(error)))}" if error else ""
        if status in ("ok", "duplicate"):
            continue
        if status == "retry":
            result.mark_retry(event_id, f"the endpoint asked to retry this event{detail}")
        elif status == "failed":
            result.mark_failed(event_id, f"the endpoint refused this event{detail}")
        else:
            result.mark_failed(event_id, f"the endpoint answered unknown status {status!r}{detail}")
    refused = data.get("refused")
    for item in refused if isinstance(refused, list) else ():
        # A waypost collector's per-event refusals: {"id", "reason", "detail"}, for good.
        if isinstance(item, dict) and str(item.get("id")) in ids:
            why = mask(snippet(f"{item.get('reason', '')} {item.get('detail') or ''}", 300))
            result.mark_failed(
                str(item["id"]), f"the endpoint refused this event: {why or 'no reason'}"
            )
    for key, mark, reason in (
        ("rejected", result.mark_failed, "the endpoint rejected this event"),
        ("retry", result.mark_retry, "the endpoint asked to retry this event"),
    ):
        listed = data.get(key)
        for event_id in listed if isinstance(listed, list) else ():
            if str(event_id) in ids:
                mark(str(event_id), reason)
    if result.retry:
        result.retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return result


def _receipt(data: Mapping[str, Any]) -> str | None:
    for key in RECEIPT_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            # Printed in logs: one line, bounded, so a hostile answer cannot forge log lines.
            return snippet(value, 200)
    return None


@waypost.hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(HttpSink)
