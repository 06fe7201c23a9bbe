"""The amplitude sink against a loopback peer that answers like Amplitude's HTTP V2 API."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from waypost_amplitude import MAX_BYTES, AmplitudeConfig, AmplitudeSink

from waypost.testing import (
    RecordingServer,
    Request,
    Response,
    SinkContract,
    delivery_imports,
    make_event,
    make_events,
    send_batch,
)

API_KEY = "amp-key-0a1b2c3d4e5f"


# --- a peer that speaks Amplitude -------------------------------------------------------------


def sent_events(request: Request) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = request.json()["events"]
    return events


class AmplitudePeer:
    """Answers like /2/httpapi and /batch: ``{"code": 200, "events_ingested": N, ...}``, 400
    naming bad events by index, 429 naming throttled devices. Keeps the ingested insert_ids."""

    def __init__(self) -> None:
        self.invalid_names: set[str] = set()  # 400: events_with_invalid_fields
        self.silenced_devices: set[str] = set()  # 400: silenced_events
        self.throttle_next = 0  # answer this many requests with 429
        self.over_quota_users: set[str] = set()  # 429: exceeded_daily_quota_users
        self.ingested: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        if request.method != "POST" or request.path not in ("/2/httpapi", "/batch"):
            return Response(404, {"code": 404, "error": "not found"})
        if not (request.header("Content-Type") or "").startswith("application/json"):
            return Response(400, {"code": 400, "error": "Invalid content type"})
        try:
            body = request.json()
        except ValueError:
            return Response(400, {"code": 400, "error": "Invalid JSON request body"})
        if "api_key" not in body:
            missing_key = {"code": 400, "error": "Request missing required field"}
            return Response(400, {**missing_key, "missing_field": "api_key"})
        if body["api_key"] != API_KEY:
            return Response(400, {"code": 400, "error": f"Invalid API key: {body['api_key']}"})
        events = body.get("events") or []
        min_id = (body.get("options") or {}).get("min_id_length", 5)
        missing = [i for i, e in enumerate(events) if not e.get("event_type")]
        short = [
            i for i, e in enumerate(events)
            if len(e.get("device_id") or "") < min_id and len(e.get("user_id") or "") < min_id
        ]  # fmt: skip
        invalid = [i for i, e in enumerate(events) if e.get("event_type") in self.invalid_names]
        silenced = [i for i, e in enumerate(events) if e.get("device_id") in self.silenced_devices]
        if missing or short or invalid or silenced:
            answer: dict[str, Any] = {"code": 400, "error": "Invalid field values on some events"}
            if missing:
                answer["events_with_missing_fields"] = {"event_type": missing}
            if invalid or short:
                answer["events_with_invalid_fields"] = {
                    **({"event_type": invalid} if invalid else {}),
                    **({"device_id": short} if short else {}),
                }
            if silenced:
                answer["silenced_events"] = silenced
            return Response(400, answer)
        with self._lock:
            throttle = self.throttle_next > 0
            self.throttle_next -= throttle
        over = [e for e in events if e.get("user_id") in self.over_quota_users]
        if throttle or over:
            devices = {e["device_id"] for e in events}
            return Response(
                429,
                {
                    "code": 429,
                    "error": "Too many requests for some devices and users",
                    "eps_threshold": 30,
                    "throttled_devices": {d: 31 for d in devices} if throttle else {},
                    "throttled_users": {},
                    "throttled_events": list(range(len(events))) if throttle else [],
                    "exceeded_daily_quota_users": {u: 500001 for u in self.over_quota_users},
                    "exceeded_daily_quota_devices": {},
                },
            )
        with self._lock:
            self.ingested.update(e["insert_id"] for e in events)
        return Response(
            200,
            {
                "code": 200,
                "events_ingested": len(events),
                "payload_size_bytes": len(request.body),
                "server_upload_time": int(time.time() * 1000),
            },
        )


def make_sink(url: str, tmp_path: Path, **settings: Any) -> AmplitudeSink:
    from waypost.sinks import SinkContext

    config = AmplitudeConfig.model_validate({"api_key": API_KEY, "host": url, **settings})
    context = SinkContext(
        app="testapp", version="1.0.0", instance_id="i", data_dir=tmp_path, strict=True
    )
    sink = AmplitudeSink("amplitude", config, context)
    sink.open()
    return sink


# --- the contract -----------------------------------------------------------------------------


class TestAmplitudeContract(SinkContract):
    sink_type = "amplitude"
    secret_fields = ("api_key",)
    permanent_status = 400

    def config(self, url: str) -> dict[str, Any]:
        return {"api_key": API_KEY, "host": url}

    def received_ids(self, requests: list[Request]) -> list[str]:
        return [e["insert_id"] for r in requests for e in sent_events(r)]

    def ok_response(self, request: Request) -> Response:
        return AmplitudePeer()(request)

    def error_response(self, request: Request, status: int, headers: dict[str, str]) -> Response:
        return Response(status, {"code": status, "error": f"status {status}"}, headers=headers)


class TestAmplitudeBatchContract(TestAmplitudeContract):
    def config(self, url: str) -> dict[str, Any]:
        return {"api_key": API_KEY, "host": url, "use_batch": True}


# --- what goes on the wire --------------------------------------------------------------------


def test_request_body(recording_server: RecordingServer, tmp_path: Path) -> None:
    recording_server.responder = AmplitudePeer()
    sink = make_sink(recording_server.url, tmp_path)
    events = [
        make_event("run", {"runSeconds": 45, "runSuccess": True}),
        make_event("run", {"runSeconds": 3}, distinct_id="user-42"),
    ]
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    assert result.receipt == "events_ingested=2"

    (request,) = recording_server.requests
    assert request.path == "/2/httpapi"
    assert request.header("Content-Type") == "application/json; charset=UTF-8"
    body = request.json()
    assert set(body) == {"api_key", "events"}  # no options unless min_id_length is set
    assert body["api_key"] == API_KEY
    first, second = body["events"]
    assert first["event_type"] == "run"
    assert first["device_id"] == events[0].instance_id and "user_id" not in first
    assert first["insert_id"] == events[0].id
    assert first["time"] == round(events[0].time * 1000)
    assert first["event_properties"] == {"runSeconds": 45, "runSuccess": True}
    assert first["app_version"] == "1.0.0" and first["platform"] == "Python"
    assert first["os_name"] == events[0].context["os"]["type"]
    assert first["library"].startswith("waypost/")
    assert second["user_id"] == "user-42" and second["device_id"] == events[1].instance_id
    assert "ip" not in first  # no location lookup asked for
    sink.close()


def test_min_id_length_goes_in_the_options(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = AmplitudePeer()
    sink = make_sink(recording_server.url, tmp_path, min_id_length=3)
    event = make_event("short", instance_id="abc")
    assert not send_batch(sink, [event]).failed
    assert recording_server.requests[0].json()["options"] == {"min_id_length": 3}


def test_properties_the_sdk_validator_would_drop_are_sent(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    """amplitude's BaseEvent silently drops a whole property dict holding None or a nested
    list inside a list; Amplitude takes them, so the sink sets event_properties itself."""
    recording_server.responder = AmplitudePeer()
    sink = make_sink(recording_server.url, tmp_path)
    props = {"matrix": [[1, 2], [3, 4]], "maybe": [None, 1], "nested": {"a": {"b": [1]}}}
    assert not send_batch(sink, [make_event("shape", props)]).failed
    assert sent_events(recording_server.requests[0])[0]["event_properties"] == props


def test_use_batch_and_regions(recording_server: RecordingServer, tmp_path: Path) -> None:
    recording_server.responder = AmplitudePeer()
    sink = make_sink(recording_server.url, tmp_path, use_batch=True)
    assert not send_batch(sink, make_events(2)).failed
    assert recording_server.requests[0].path == "/batch"
    assert AmplitudeConfig(api_key=API_KEY).host == "https://api2.amplitude.com"  # type: ignore[arg-type]
    eu = AmplitudeConfig.model_validate({"api_key": API_KEY, "region": "eu"})
    assert eu.host == "https://api.eu.amplitude.com"
    eu_sink = make_sink(str(eu.host), tmp_path, use_batch=True)
    assert eu_sink.url == "https://api.eu.amplitude.com/batch"
    assert make_sink(str(eu.host), tmp_path).url == "https://api.eu.amplitude.com/2/httpapi"


def test_render_is_the_request_body_with_the_key_hidden(tmp_path: Path) -> None:
    sink = make_sink("http://127.0.0.1:9", tmp_path, min_id_length=8)
    events = make_events(3)
    (rendered,) = sink.render(events)
    assert rendered["url"] == "http://127.0.0.1:9/2/httpapi"
    assert rendered["body"]["api_key"] == "***"
    assert rendered["body"]["options"] == {"min_id_length": 8}
    assert [e["insert_id"] for e in rendered["body"]["events"]] == [e.id for e in events]
    assert API_KEY not in json.dumps(rendered)


def test_test_request_returns_amplitudes_answer(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = AmplitudePeer()
    sink = make_sink(recording_server.url, tmp_path)
    answer = sink.test_request(make_event("waypost_test"))
    assert answer["delivered"] is True and answer["status"] == 200
    assert answer["answer"]["code"] == 200 and answer["answer"]["events_ingested"] == 1
    bad = make_sink(recording_server.url, tmp_path, api_key="amp-wrong-key")
    answer = bad.test_request(make_event("waypost_test"))
    assert answer["delivered"] is False and "Invalid API key" in answer["reason"]
    assert "amp-wrong-key" not in str(answer)  # the answer echoes the key: masked


# --- answers ----------------------------------------------------------------------------------


def test_400_fails_the_named_events_and_resends_the_rest(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    peer = AmplitudePeer()
    peer.invalid_names = {"bad"}
    peer.silenced_devices = {"silenced-device"}
    recording_server.responder = peer
    sink = make_sink(recording_server.url, tmp_path)
    events = [
        make_event("good"),
        make_event("bad"),
        make_event("good", instance_id="silenced-device"),
        make_event("good"),
    ]
    result = send_batch(sink, events)
    assert set(result.failed) == {events[1].id, events[2].id}
    assert "invalid field event_type" in result.failed[events[1].id]
    assert "silenced" in result.failed[events[2].id]
    assert set(result.retry) == {events[0].id, events[3].id}
    assert not peer.ingested

    # The core sends the rest again, and they are ingested.
    again = send_batch(sink, [events[0], events[3]])
    assert not again.retry and not again.failed
    assert set(peer.ingested) == {events[0].id, events[3].id}


def test_400_without_indexes_is_permanent(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = AmplitudePeer()
    sink = make_sink(recording_server.url, tmp_path, api_key="amp-wrong-key")
    events = make_events(3)
    result = send_batch(sink, events)
    assert set(result.failed) == {e.id for e in events} and not result.retry
    assert all("Invalid API key: ***" in r for r in result.failed.values())
    assert not any("amp-wrong-key" in r for r in result.failed.values())


def test_429_throttled_events_wait_30_seconds(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    peer = AmplitudePeer()
    peer.throttle_next = 1
    recording_server.responder = peer
    sink = make_sink(recording_server.url, tmp_path)
    events = make_events(4)
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events} and not result.failed
    assert result.retry_after == 30
    assert not send_batch(sink, events).retry
    assert set(peer.ingested) == {e.id for e in events}


def test_429_over_daily_quota_fails_those_and_retries_the_rest(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    peer = AmplitudePeer()
    peer.over_quota_users = {"heavy-user"}
    recording_server.responder = peer
    sink = make_sink(recording_server.url, tmp_path)
    heavy = make_event("e", distinct_id="heavy-user")
    light = make_event("e")
    result = send_batch(sink, [heavy, light])
    assert set(result.failed) == {heavy.id} and "daily quota" in result.failed[heavy.id]
    assert set(result.retry) == {light.id}


def test_a_200_that_is_not_json_is_retried_with_a_reason(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = lambda r: Response(200, "OK")
    sink = make_sink(recording_server.url, tmp_path)
    events = make_events(2)
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events}
    assert "without Amplitude's JSON answer" in next(iter(result.retry.values()))


def test_sdk_quirk_a_200_that_is_not_json_escapes_the_sdk(
    recording_server: RecordingServer,
) -> None:
    """Why the sink does not rely on HttpClient.post alone: the SDK's parse raises on such a
    body, and in the SDK's worker thread the events are then lost without a callback."""
    from amplitude.http_client import HttpClient

    recording_server.responder = lambda r: Response(200, "OK")
    with pytest.raises(ValueError):
        HttpClient.post(f"{recording_server.url}/2/httpapi", b"{}")


def test_413_lets_the_core_split_until_it_fits(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    peer = AmplitudePeer()

    def small_only(request: Request) -> Response:
        if len(sent_events(request)) > 2:
            return Response(413, {"code": 413, "error": "Payload too large"})
        return peer(request)

    recording_server.responder = small_only
    sink = make_sink(recording_server.url, tmp_path)
    events = make_events(7)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    assert sorted(peer.ingested) == sorted(e.id for e in events)
    assert set(peer.ingested.values()) == {1}


def test_requests_stay_under_a_megabyte(recording_server: RecordingServer, tmp_path: Path) -> None:
    peer = AmplitudePeer()
    recording_server.responder = peer
    sink = make_sink(recording_server.url, tmp_path)
    events = [make_event("big", {"blob": "x" * 200_000, "i": i}) for i in range(8)]
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    assert len(recording_server.requests) > 1
    assert all(len(r.raw) <= MAX_BYTES["v2"] for r in recording_server.requests)
    assert sorted(peer.ingested) == sorted(e.id for e in events)


def test_an_event_over_the_limit_fails_alone(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    peer = AmplitudePeer()
    recording_server.responder = peer
    sink = make_sink(recording_server.url, tmp_path)
    huge = make_event("huge", {"blob": "y" * 1_100_000})
    fine = make_event("fine")
    result = send_batch(sink, [huge, fine])
    assert set(result.failed) == {huge.id} and "size limit" in result.failed[huge.id]
    assert set(peer.ingested) == {fine.id}


def test_a_down_server_holds_back_the_rest_of_the_batch(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = lambda r: Response(
        503, {"code": 503, "error": "unavailable"}, {"Retry-After": "4"}
    )
    sink = make_sink(recording_server.url, tmp_path)
    events = [make_event("big", {"blob": "x" * 400_000}) for _ in range(5)]
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events} and result.retry_after == 4
    assert len(recording_server.requests) == 1


# --- end to end -------------------------------------------------------------------------------


def test_burst_through_telemetry_is_ingested_exactly_once(
    recording_server: RecordingServer, make_telemetry: Any
) -> None:
    peer = AmplitudePeer()
    recording_server.answer(Response(503, {"code": 503, "error": "busy"}, {"Retry-After": "0"}))
    recording_server.responder = peer
    tel = make_telemetry(sinks={"amplitude": {"api_key": API_KEY, "host": recording_server.url}})
    for i in range(500):
        tel.track("burst", {"i": i})
    assert tel.flush(timeout=30)
    # The refused first request is resent after the core's backoff.
    assert recording_server.wait_for(lambda _: len(peer.ingested) >= 500, timeout=20)
    assert len(peer.ingested) == 500 and set(peer.ingested.values()) == {1}
    assert tel.flush(timeout=10)  # the pass that delivered them has been counted
    assert tel.status().sinks[0].delivered == 500


def test_partial_failure_end_to_end(recording_server: RecordingServer, make_telemetry: Any) -> None:
    peer = AmplitudePeer()
    peer.invalid_names = {"refused"}
    recording_server.responder = peer
    tel = make_telemetry(sinks={"amplitude": {"api_key": API_KEY, "host": recording_server.url}})
    for i in range(40):
        tel.track("refused" if i % 10 == 0 else "kept", {"i": i})
    assert tel.flush(timeout=30)
    assert recording_server.wait_for(lambda _: len(peer.ingested) >= 36, timeout=20)
    assert len(peer.ingested) == 36 and set(peer.ingested.values()) == {1}
    assert tel.flush(timeout=10)  # the pass that delivered them has been counted
    sink_status = tel.status().sinks[0]
    assert sink_status.delivered == 36 and sink_status.pending == 0


# --- config -----------------------------------------------------------------------------------


def test_config() -> None:
    with pytest.raises(ValidationError, match="api_key"):
        AmplitudeConfig.model_validate({})
    with pytest.raises(ValidationError, match="api_key"):
        AmplitudeConfig.model_validate({"api_key": " "})
    with pytest.raises(ValidationError, match="min_id_length"):
        AmplitudeConfig.model_validate({"api_key": API_KEY, "min_id_length": 0})
    with pytest.raises(ValidationError, match="region"):
        AmplitudeConfig.model_validate({"api_key": API_KEY, "region": "in"})
    config = AmplitudeConfig.model_validate({"api_key": API_KEY})
    assert API_KEY not in repr(config) and API_KEY not in str(config)


def test_open_and_send_import_nothing(
    waypost_recording_server: RecordingServer, tmp_path: Path
) -> None:
    """``open()``, ``send()`` and ``close()`` run on delivery threads, where an import that a
    ``fork()`` cuts across leaves its lock held in the child: everything is imported when the
    sink is built."""
    waypost_recording_server.responder = AmplitudePeer()
    settings = {"api_key": API_KEY, "host": waypost_recording_server.url}
    assert delivery_imports("amplitude", settings, tmp_path, events=3) == []
    assert len(waypost_recording_server.requests) == 1
