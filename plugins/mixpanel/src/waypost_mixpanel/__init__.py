"""The ``mixpanel`` sink: recent events to ``/track``, older ones to ``/import``, as the mixpanel
SDK's ``Consumer`` posts them (its JSON encoder and service-account credentials, the form it
sends), through the core's HTTP transport: ``Consumer.send`` drops the answer that says which
records Mixpanel refused and why, and its session is not part of its public API."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, model_validator

from waypost.errors import PermanentError
from waypost.events import Event
from waypost.hookspecs import registering
from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkContext
from waypost.sinks.masking import basic_auth
from waypost.sinks.parts import pack, send_in_parts
from waypost.sinks.transport import (
    RETRYABLE_STATUS,
    HttpTransport,
    json_object,
    snippet,
)

if TYPE_CHECKING:
    import httpx

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
PATHS = {"events": "/track", "imports": "/import"}
"""The path of each of the SDK's endpoint names."""


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

    @property
    def form(self) -> dict[str, str]:
        """The form ``Consumer`` posts: the events, ``verbose=1`` (an answer that says why),
        ``ip=0`` (no location from the sender's address)."""
        return {"data": self.data, "verbose": "1", "ip": "0"}


class MixpanelSink(Sink[MixpanelConfig]):
    """Posts batches of events as ``mixpanel.Consumer`` does; reads Mixpanel's verdict from the
    answer itself (status, body, ``Retry-After``), so every event gets its own outcome."""

    type = "mixpanel"
    max_batch_size = MAX_EVENTS
    default_concurrency = 4  # send() is safe from several threads

    def __init__(self, name: str, config: MixpanelConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        httpx_log = logging.getLogger("httpx")
        level = httpx_log.level
        import mixpanel  # here, on the thread that builds the sink

        # Its feature-flag modules set httpx's logger to ERROR for the whole process: the
        # application's own httpx lines (and ours) are the application's to silence.
        httpx_log.setLevel(level)

        self._json_dumps: Callable[[Any], str] = mixpanel.json_dumps
        self._import_auth: str | None = None
        if config.service_account_username is not None:
            assert config.service_account_secret is not None and config.project_id
            account = mixpanel.ServiceAccountCredentials(
                username=config.service_account_username.get_secret_value(),
                secret=config.service_account_secret.get_secret_value(),
                project_id=config.project_id,
            )
            self._import_auth = basic_auth(account.username, account.secret)
        elif config.api_secret is not None:
            self._import_auth = basic_auth(config.api_secret.get_secret_value(), "")
        if self._import_auth is not None:
            self.masker.add(self._import_auth)
        self._http = HttpTransport(self)

    def url(self, endpoint: str) -> str:
        if endpoint == "events":
            return self._http.url(PATHS[endpoint])
        query = {"strict": "1"}
        if self.config.project_id:
            query["project_id"] = self.config.project_id  # the SDK's Consumer adds it too
        return self._http.url(PATHS[endpoint], query)

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
        config = self.config
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
            weighted = []
            for event in routed:
                text = self._json_dumps(self.event_body(event, token))
                if len(text.encode()) >= MAX_EVENT_BYTES:
                    result.mark_failed(event, "event is 1 MB of JSON or more; Mixpanel refuses it")
                else:  # weighed as the form encodes it, with the encoded comma
                    weighted.append((event, text, len(urllib.parse.quote_plus(text)) + 3))
            for chunk in pack(weighted, MAX_REQUEST_BYTES, max_items=MAX_EVENTS):
                data = "[" + ",".join(chunk.items) + "]"
                requests_.append(_Request(endpoint, chunk.events, data))
        return requests_

    # --- sending --------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        result = SendResult()
        plan = self.plan(events, result, self.config.token.get_secret_value())
        return send_in_parts(plan, lambda r: self._judge(r, self._exchange(r), result), result)

    def _judge(self, request: _Request, answer: httpx.Response, result: SendResult) -> None:
        """Read Mixpanel's answer: mark /import's refused records, raise for the whole request."""
        what = f"mixpanel {PATHS[request.endpoint]}"
        status, body = answer.status_code, json_object(answer)
        if status == 413 or status in RETRYABLE_STATUS or status >= 500:
            self._http.check(answer, what=what)
        if body is None:
            self._http.unreadable(
                answer, "with a body that is not Mixpanel's JSON answer", what=what
            )
        if 200 <= status < 300 and _accepted(body):
            return
        failed = body.get("failed_records")
        if request.endpoint == "imports" and status == 400 and isinstance(failed, list) and failed:
            self._mark_failed_records(request.events, failed, result, what)
            return
        error = self.mask(snippet(str(body.get("error") or json.dumps(body))))
        raise PermanentError(f"{what}: HTTP {status}: {error}")

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
            result.mark_failed(event, self.mask(f"{what} refused the record: {where}{message}"))

    def _exchange(self, request: _Request) -> httpx.Response:
        """POST the request's form; /import with the credentials as Basic auth."""
        importing = request.endpoint == "imports"
        auth = self._import_auth if importing else None
        return self._http.request(
            "POST",
            self.url(request.endpoint),
            data=request.form,
            headers={"Authorization": auth} if auth else None,
            what=f"mixpanel {PATHS[request.endpoint]}",
        )

    # --- debug --------------------------------------------------------------

    def render(self, events: Sequence[Event]) -> Any:
        """The requests ``send`` would make: URL and form body (the token shown as ``***``)."""
        result = SendResult()
        plan = self.plan(events, result, "***")
        rendered = [self._http.render("POST", self.url(r.endpoint), data=r.form) for r in plan]
        if result.failed:
            rendered.append({"not_sent": result.failed})
        return rendered


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


register_sinks = registering(MixpanelSink)
