"""The ``mixpanel`` sink: recent events to ``/track``, older ones to ``/import``, through the
mixpanel SDK's own request layer (``mixpanel.Consumer``), never its buffers or threads."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, model_validator

import waypost
from waypost.errors import PayloadTooLarge, PermanentError, RetryableError
from waypost.events import Event
from waypost.retry import RETRYABLE_STATUS, parse_retry_after, raise_for_status
from waypost.sinks import HttpSinkConfig, SendResult, Sink

if TYPE_CHECKING:
    import mixpanel
    import requests

__all__ = ["MixpanelConfig", "MixpanelSink"]

MAX_EVENTS = 2000
"""Events per request, for /track and /import alike."""
MAX_REQUEST_BYTES = 1_900_000
"""Request body bytes (as encoded on the wire); Mixpanel answers 413 past about 2 MB."""
MAX_EVENT_BYTES = 1024 * 1024
"""Mixpanel refuses an event of 1 MB of JSON or more."""
TRACK_WINDOW = 5 * 24 * 3600.0
"""/track drops events older than 5 days."""
IMPORT_MARGIN = 3600.0
"""With /import credentials, events this close to the 5-day edge go to /import already."""
MAX_INSERT_ID = 36


class MixpanelConfig(HttpSinkConfig):
    """Settings of a ``mixpanel`` sink. ``/import`` credentials are optional: without them,
    events older than 5 days fail with a reason instead of being dropped unseen."""

    default_hosts = {
        "": "https://api.mixpanel.com",
        "eu": "https://api-eu.mixpanel.com",
        "in": "https://api-in.mixpanel.com",
    }

    token: SecretStr = Field(description="Project token.")
    api_secret: SecretStr | None = Field(
        default=None, description="Project API secret for /import (legacy authentication)."
    )
    service_account_username: SecretStr | None = Field(
        default=None, description="Service account username for /import."
    )
    service_account_secret: SecretStr | None = Field(
        default=None, description="Service account secret for /import."
    )
    project_id: str | None = Field(
        default=None, description="Project id; required with a service account."
    )

    @model_validator(mode="after")
    def _check_credentials(self) -> MixpanelConfig:
        if not self.token.get_secret_value():
            raise ValueError("token must not be empty")
        user, secret = self.service_account_username, self.service_account_secret
        if (user is None) != (secret is None):
            raise ValueError(
                "set both service_account_username and service_account_secret, or neither"
            )
        if user is not None:
            if self.api_secret is not None:
                raise ValueError("set either api_secret or a service account, not both")
            if not self.project_id:
                raise ValueError("a service account needs project_id")
        return self

    @property
    def can_import(self) -> bool:
        return self.api_secret is not None or self.service_account_username is not None


@dataclass
class _Request:
    endpoint: str  # the SDK's endpoint name: "events" (/track) or "imports" (/import)
    events: list[Event]
    data: str  # the JSON array sent as the form field ``data``


class MixpanelSink(Sink):
    """Posts batches of events with ``mixpanel.Consumer``; reads Mixpanel's verdict from the
    answer itself (status, body, ``Retry-After``), so every event gets its own outcome."""

    type = "mixpanel"
    Config = MixpanelConfig
    max_batch_size = MAX_EVENTS
    default_concurrency = 4  # send() is safe from several threads

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumer: mixpanel.Consumer | None = None
        self._answers = threading.local()

    @property
    def settings(self) -> MixpanelConfig:
        assert isinstance(self.config, MixpanelConfig)
        return self.config

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        if self._consumer is not None:
            return
        import mixpanel
        import requests.adapters

        config = self.settings
        credentials = None
        if config.service_account_username is not None:
            assert config.service_account_secret is not None and config.project_id
            credentials = mixpanel.ServiceAccountCredentials(
                username=config.service_account_username.get_secret_value(),
                secret=config.service_account_secret.get_secret_value(),
                project_id=config.project_id,
            )
        # api_host would build https:// URLs only; full URLs keep the configured scheme.
        consumer = mixpanel.Consumer(
            events_url=self.url("events"),
            import_url=self.url("imports"),
            request_timeout=config.timeout,
            retry_limit=0,
            credentials=credentials,
        )
        # The SDK mounts a urllib3 retry adapter on https:// that would retry 5xx answers
        # itself and hide them behind a RetryError; the core owns retries and wants the answer.
        consumer._session.mount("https://", requests.adapters.HTTPAdapter(max_retries=0))
        # Consumer.send raises on anything but {"status": 1} and drops the HTTP answer; keep it
        # to classify by status code, Retry-After and /import's per-record failures.
        consumer._session.hooks["response"].append(self._keep_answer)
        self._consumer = consumer

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer._session.close()

    def url(self, endpoint: str) -> str:
        base = self.settings.base_url
        if endpoint == "events":
            return f"{base}/track"
        query = {"strict": "1"}
        if self.settings.project_id and self.settings.service_account_username is None:
            query["project_id"] = self.settings.project_id  # the SDK adds it for service accounts
        return f"{base}/import?{urllib.parse.urlencode(query)}"

    # --- mapping --------------------------------------------------------------------------

    def event_body(self, event: Event, token: str) -> dict[str, Any]:
        """One event as Mixpanel takes it (``time`` in milliseconds, which Mixpanel accepts
        alongside seconds and which keeps the order of events within a second)."""
        context = event.context
        app = context.get("app") or {}
        os_ = context.get("os") or {}
        properties: dict[str, Any] = {
            "mp_lib": "waypost",
            "$lib_version": context.get("waypost"),
            "$os": os_.get("type"),
            "$os_version": os_.get("release"),
            "os_arch": os_.get("arch"),
            "app_name": app.get("name"),
            "app_version": app.get("version"),
            "python_version": context.get("python"),
        }
        properties = {k: v for k, v in properties.items() if v is not None}
        properties.update(event.properties)
        properties.update(
            {
                "token": token,
                "distinct_id": event.distinct_id or event.instance_id,
                "time": round(event.time * 1000),
                "$insert_id": _insert_id(event.id),
            }
        )
        return {"event": event.name, "properties": properties}

    def plan(self, events: Sequence[Event], result: SendResult, token: str) -> list[_Request]:
        """Route events to /track or /import, refuse the ones that cannot go anywhere, and cut
        each route into requests under Mixpanel's count and size limits."""
        import mixpanel

        config = self.settings
        now = time.time()
        edge = TRACK_WINDOW - (IMPORT_MARGIN if config.can_import else 0.0)
        routes: dict[str, list[Event]] = {"events": [], "imports": []}
        for event in events:
            old = now - event.time > edge
            if old and not config.can_import:
                result.mark_failed(
                    event,
                    "event is older than 5 days, which Mixpanel's /track drops: set api_secret, "
                    "or service_account_username, service_account_secret and project_id, "
                    "to send it through /import",
                )
                continue
            routes["imports" if old else "events"].append(event)

        requests_: list[_Request] = []
        for endpoint, routed in routes.items():
            batch: list[Event] = []
            parts: list[str] = []
            size = 0
            for event in routed:
                text = mixpanel.json_dumps(self.event_body(event, token))
                if len(text.encode()) >= MAX_EVENT_BYTES:
                    result.mark_failed(event, "event is 1 MB of JSON or more; Mixpanel refuses it")
                    continue
                weight = len(urllib.parse.quote_plus(text)) + 3  # the encoded comma
                if batch and (len(batch) >= MAX_EVENTS or size + weight > MAX_REQUEST_BYTES):
                    requests_.append(_Request(endpoint, batch, "[" + ",".join(parts) + "]"))
                    batch, parts, size = [], [], 0
                batch.append(event)
                parts.append(text)
                size += weight
            if batch:
                requests_.append(_Request(endpoint, batch, "[" + ",".join(parts) + "]"))
        return requests_

    # --- sending --------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult()
        plan = self.plan(events, result, self.settings.token.get_secret_value())
        for i, request in enumerate(plan):
            try:
                self._deliver(request, result)
            except PayloadTooLarge as exc:
                if len(plan) == 1:
                    raise  # the core splits the batch
                # Retried alone next time, where a 413 lets the core split it.
                for event in request.events:
                    result.mark_retry(event, exc.reason)
            except RetryableError as exc:
                # Mixpanel is down or throttling: do not press on with the other requests.
                for later in plan[i:]:
                    for event in later.events:
                        result.mark_retry(event, exc.reason)
                result.retry_after = exc.retry_after
                break
            except PermanentError as exc:
                for event in request.events:
                    result.mark_failed(event, exc.reason)
        return result

    def _deliver(self, request: _Request, result: SendResult) -> None:
        self._judge(request, *self._exchange(request), result)

    def _judge(
        self,
        request: _Request,
        status: int,
        body: dict[str, Any] | None,
        answer: requests.Response,
        result: SendResult,
    ) -> None:
        """Read Mixpanel's answer: mark /import's refused records, raise for the whole request."""
        what = f"mixpanel {_path(request.endpoint)}"
        text = self._redact(answer.text)
        if status == 413 or status in RETRYABLE_STATUS or status >= 500:
            raise_for_status(status, answer.headers, text, what=what)
        if body is None:
            if 200 <= status < 300:
                raise RetryableError(
                    f"{what}: HTTP {status} with a body that is not Mixpanel's JSON answer: "
                    f"{_snippet(text)!r}",
                    retry_after=parse_retry_after(answer.headers.get("Retry-After")),
                )
            raise_for_status(status, answer.headers, text, what=what)
            raise PermanentError(f"{what}: HTTP {status}")  # pragma: no cover (3xx)
        if 200 <= status < 300 and _accepted(body):
            return
        failed = body.get("failed_records")
        if request.endpoint == "imports" and status == 400 and isinstance(failed, list) and failed:
            self._mark_failed_records(request.events, failed, result, what)
            return
        error = self._redact(str(body.get("error") or json.dumps(body)[:300]))
        raise PermanentError(f"{what}: HTTP {status}: {error}")

    def _redact(self, text: str) -> str:
        """Keep the token and the secrets out of reasons, should an answer echo them."""
        config = self.settings
        for secret in (config.token, config.api_secret, config.service_account_secret):
            if secret is not None and secret.get_secret_value():
                text = text.replace(secret.get_secret_value(), "***")
        return text

    def _mark_failed_records(
        self, events: list[Event], failed: list[Any], result: SendResult, what: str
    ) -> None:
        """A 400 from /import is a partial success: exactly the listed records were refused."""
        by_insert_id = {_insert_id(e.id): e for e in events}
        for record in failed:
            if not isinstance(record, dict):
                continue
            insert_id = record.get("$insert_id") or record.get("insert_id")
            event = by_insert_id.get(insert_id) if isinstance(insert_id, str) else None
            index = record.get("index")
            if event is None and isinstance(index, int) and 0 <= index < len(events):
                event = events[index]
            if event is None:
                continue
            field = record.get("field")
            message = record.get("message") or "refused"
            where = f"{field}: " if field else ""
            result.mark_failed(event, f"{what} refused the record: {where}{message}")

    def _exchange(self, request: _Request) -> tuple[int, dict[str, Any] | None, requests.Response]:
        self.open()
        assert self._consumer is not None
        api_secret = self.settings.api_secret
        self._answers.response = None
        sdk_error: Exception | None = None
        try:
            self._consumer.send(
                request.endpoint,
                request.data,
                api_secret=api_secret.get_secret_value()
                if api_secret is not None and request.endpoint == "imports"
                else None,
            )
        except Exception as exc:
            # MixpanelException for transport errors and status != 1; but also KeyError
            # 'error' on /import's documented success body ({"code": 200, "status": "OK"}),
            # which has no "error" key. The answer kept by the hook is judged below instead.
            sdk_error = exc
        answer: requests.Response | None = self._answers.response
        self._answers.response = None
        if answer is None:
            cause = (sdk_error.__cause__ if sdk_error is not None else None) or sdk_error
            raise RetryableError(
                f"mixpanel {_path(request.endpoint)}: no answer: {type(cause).__name__}: {cause}"
            )
        try:
            body = answer.json()
        except ValueError:
            body = None
        return answer.status_code, body if isinstance(body, dict) else None, answer

    def _keep_answer(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._answers.response = response

    # --- debug and test-sink --------------------------------------------------------------

    def render(self, events: Sequence[Event]) -> Any:
        """The requests ``send`` would make: URL and form body (the token shown as ``***``)."""
        result = SendResult()
        plan = self.plan(events, result, "***")
        rendered: list[dict[str, Any]] = [
            {
                "method": "POST",
                "url": self.url(request.endpoint),
                "content_type": "application/x-www-form-urlencoded",
                "form": {"data": request.data, "verbose": "1", "ip": "0"},
            }
            for request in plan
        ]
        if result.failed:
            rendered.append({"not_sent": result.failed})
        return rendered

    def test_request(self, event: Event) -> dict[str, Any]:
        """Send one event and return Mixpanel's answer as it came."""
        result = SendResult()
        plan = self.plan([event], result, self.settings.token.get_secret_value())
        if not plan:
            return {"delivered": False, "reason": result.failed.get(event.id)}
        request = plan[0]
        try:
            status, body, answer = self._exchange(request)
        except waypost.SinkError as exc:
            return {"url": self.url(request.endpoint), "delivered": False, "reason": exc.reason}
        outcome = SendResult()
        try:
            self._judge(request, status, body, answer, outcome)
            reason = outcome.failed.get(event.id)
        except waypost.SinkError as exc:
            reason = exc.reason
        return {
            "url": self.url(request.endpoint),
            "http_status": status,
            "answer": body if body is not None else _snippet(answer.text),
            "delivered": reason is None,
            **({"reason": reason} if reason else {}),
        }


def _path(endpoint: str) -> str:
    return "/track" if endpoint == "events" else "/import"


def _accepted(body: dict[str, Any]) -> bool:
    """/track (verbose) answers ``{"status": 1, "error": null}``; /import answers
    ``{"code": 200, "status": "OK", "num_records_imported": N}``."""
    status = body.get("status")
    return status == 1 or (body.get("code") == 200 and str(status).upper() == "OK")


def _insert_id(event_id: str) -> str:
    """Mixpanel takes an ``$insert_id`` of at most 36 characters: a UUID fits as it is."""
    if len(event_id) <= MAX_INSERT_ID:
        return event_id
    return hashlib.sha256(event_id.encode()).hexdigest()[:MAX_INSERT_ID]


def _snippet(text: str) -> str:
    return " ".join(text.split())[:300]


@waypost.hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(MixpanelSink)
