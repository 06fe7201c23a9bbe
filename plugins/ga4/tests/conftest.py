"""A GA4 Measurement Protocol peer for the tests, written from Google's documentation.

``/mp/collect`` answers 204 to every request it receives and never says what it dropped (as
GA4 does); it keeps the requests it accepted in ``accepted`` and what its validation found in
``problems``, so tests can assert that the sink sent nothing GA4 would drop. (Answers queued
with ``server.answer`` bypass it, as a throttling or failing GA4 would.)
``/debug/mp/collect`` answers 200 with
``{"validationMessages": [{"fieldPath", "description", "validationCode"}]}``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from waypost.testing import RecordingServer, Request, Response

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESERVED_EVENTS = {
    "ad_activeview",
    "ad_click",
    "ad_exposure",
    "ad_impression",
    "ad_query",
    "ad_reward",
    "adunit_exposure",
    "app_clear_data",
    "app_exception",
    "app_install",
    "app_remove",
    "app_store_refund",
    "app_update",
    "app_upgrade",
    "click",
    "error",
    "file_download",
    "first_open",
    "first_visit",
    "form_start",
    "form_submit",
    "in_app_purchase",
    "os_update",
    "page_view",
    "screen_view",
    "scroll",
    "session_start",
    "user_engagement",
    "video_progress",
    "video_start",
    "view_search_results",
}
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_PARAMS = {"engagement_time_msec", "gclid", "session_id", "session_number"}


def message(path: str, description: str, code: str) -> dict[str, str]:
    return {"fieldPath": path, "description": description, "validationCode": code}


def check_name(
    kind: str, path: str, name: Any, limit: int, reserved: set[str]
) -> list[dict[str, str]]:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return [
            message(
                path,
                f"{kind} has invalid name [{name}]. Names must start with an "
                "alphabetic character and contain only letters, digits and "
                "underscores.",
                "NAME_INVALID",
            )
        ]
    if len(name) > limit:
        return [
            message(
                path,
                f"{kind} name [{name}] is longer than {limit} characters.",
                "VALUE_OUT_OF_BOUNDS",
            )
        ]
    if name in reserved or name.startswith(RESERVED_PREFIXES):
        return [message(path, f"{kind} has reserved name [{name}].", "NAME_RESERVED")]
    return []


def validate(request: Request, now: float | None = None) -> list[dict[str, str]]:
    """What GA4's validation server would say about ``request``."""
    now = time.time() if now is None else now
    out: list[dict[str, str]] = []
    query = {k: v[0] for k, v in request.query.items()}
    if not query.get("api_secret"):
        out.append(message("api_secret", "api_secret is required.", "VALUE_REQUIRED"))
    app = "firebase_app_id" in query
    if app == ("measurement_id" in query):
        out.append(
            message(
                "measurement_id",
                "Exactly one of measurement_id or firebase_app_id is required.",
                "VALUE_REQUIRED",
            )
        )
    if len(request.body) >= 130_000:
        out.append(message("", "Post body is larger than 130kB.", "VALUE_OUT_OF_BOUNDS"))
    try:
        body = json.loads(request.body)
    except ValueError:
        return [*out, message("", "Unable to parse the JSON body.", "VALUE_INVALID")]
    if app:
        aid = body.get("app_instance_id")
        if not isinstance(aid, str) or not re.fullmatch(r"[0-9a-f]{32}", aid):
            out.append(
                message(
                    "app_instance_id",
                    f"Measurement app_instance_id [{aid}] is not 32 hexadecimal characters.",
                    "VALUE_INVALID",
                )
            )
    elif not isinstance(body.get("client_id"), str) or not body["client_id"]:
        out.append(message("client_id", "client_id is required.", "VALUE_REQUIRED"))
    ts = body.get("timestamp_micros")
    if ts is not None and (not isinstance(ts, int) or ts > now * 1e6 + 60e6):
        out.append(
            message("timestamp_micros", "timestamp_micros is in the future.", "VALUE_INVALID")
        )
    for key, value in (body.get("consent") or {}).items():
        if value not in ("GRANTED", "DENIED"):
            out.append(message(f"consent.{key}", f"Invalid consent [{value}].", "VALUE_INVALID"))
    user_props = body.get("user_properties") or {}
    if len(user_props) > 25:
        out.append(message("user_properties", "Too many user properties.", "EXCEEDED_MAX_ENTITIES"))
    for name, prop in user_props.items():
        out += check_name("User property", f"user_properties.{name}", name, 24, set())
        value = prop.get("value") if isinstance(prop, dict) else None
        if isinstance(value, str) and len(value) > 36:
            out.append(
                message(
                    f"user_properties.{name}.value",
                    "User property value is longer than 36 characters.",
                    "VALUE_OUT_OF_BOUNDS",
                )
            )
    events = body.get("events")
    if not isinstance(events, list) or not events:
        return [*out, message("events", "events is required.", "VALUE_REQUIRED")]
    if len(events) > 25:
        out.append(
            message("events", "Requests can have at most 25 events.", "EXCEEDED_MAX_ENTITIES")
        )
    for i, event in enumerate(events):
        out += check_name(
            f"Event at index: [{i}]", "events", event.get("name"), 40, RESERVED_EVENTS
        )
        ets = event.get("timestamp_micros", ts)
        if isinstance(ets, int) and ets < (now - 72 * 3600) * 1e6:
            out.append(
                message(
                    f"events[{i}].timestamp_micros",
                    "Event is older than 72 hours.",
                    "VALUE_OUT_OF_BOUNDS",
                )
            )
        params = event.get("params") or {}
        if len(params) > 25:
            out.append(
                message(
                    f"events[{i}].params",
                    "Events can have at most 25 params.",
                    "EXCEEDED_MAX_ENTITIES",
                )
            )
        for name, value in params.items():
            path = f"events[{i}].params.{name}"
            out += check_name("Param", path, name, 40, RESERVED_PARAMS)
            if isinstance(value, str) and len(value) > 100:
                out.append(
                    message(
                        path,
                        f"Param [{name}] has a value longer than 100 characters.",
                        "VALUE_OUT_OF_BOUNDS",
                    )
                )
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                out.append(message(path, f"Param [{name}] has an invalid value.", "VALUE_INVALID"))
    return out


class MeasurementProtocol:
    """The responder of the recording server: GA4's collect and validation endpoints."""

    def __init__(self) -> None:
        self.problems: list[dict[str, str]] = []
        self.accepted: list[Request] = []

    def __call__(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(405, b"")
        if request.path == "/debug/mp/collect":
            return Response(200, {"validationMessages": validate(request)})
        if request.path == "/mp/collect":
            self.problems += validate(request)
            self.accepted.append(request)
            return Response(204, b"")
        return Response(404, b"Not Found")


@pytest.fixture
def ga4() -> Iterator[tuple[RecordingServer, MeasurementProtocol]]:
    """A recording server speaking the Measurement Protocol, and its validator's findings."""
    peer = MeasurementProtocol()
    with RecordingServer(peer) as server:
        yield server, peer


@pytest.fixture
def make_ga4(tmp_path: Any) -> Iterator[Any]:
    """``make_ga4(url, **settings)``: an open GA4 sink (web stream by default), closed after
    the test."""
    from waypost_ga4 import Ga4Config, Ga4Sink

    from waypost.sinks import SinkContext

    made: list[Ga4Sink] = []

    def factory(url: str, **settings: Any) -> Ga4Sink:
        if "firebase_app_id" not in settings:
            settings.setdefault("measurement_id", "G-TEST12345")
        config = Ga4Config.model_validate({"api_secret": "mp-secret-42", "host": url, **settings})
        context = SinkContext(app="testapp", version="1.0.0", instance_id="i", data_dir=tmp_path)
        sink = Ga4Sink("ga4", config, context)
        sink.open()
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.close()
