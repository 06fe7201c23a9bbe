"""The ga4 sink against a local Measurement Protocol peer: contract, request shape, answers,
the validation server and end-to-end delivery."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from waypost_ga4 import Ga4Config, Ga4Sink, app_instance_id

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

SECRET = "mp-secret-42"


def collected(server: RecordingServer) -> list[Request]:
    return [r for r in server.requests if r.path == "/mp/collect"]


def sent_events(server: RecordingServer) -> list[dict[str, Any]]:
    return [e for r in collected(server) for e in r.json()["events"]]


class TestGa4Contract(SinkContract):
    sink_type = "ga4"
    secret_fields = ("api_secret",)
    # GA4 documents 2xx for everything it receives; a 4xx (a refused request, e.g. 400 for a
    # body that is not JSON) is not retried.
    permanent_status = 400

    def config(self, url: str) -> dict[str, Any]:
        return {"measurement_id": "G-TEST12345", "api_secret": "ga4-contract-secret", "host": url}

    def received_ids(self, requests: list[Request]) -> list[str]:
        return [
            e["params"]["event_id"]
            for r in requests
            if r.path == "/mp/collect"
            for e in r.json()["events"]
        ]

    def ok_response(self, request: Request) -> Response:
        return Response(204, b"")


# --- config ---------------------------------------------------------------------------------


def test_config_needs_exactly_one_stream() -> None:
    with pytest.raises(ValidationError, match="exactly one of measurement_id"):
        Ga4Config.model_validate({"api_secret": "x"})
    with pytest.raises(ValidationError, match="exactly one of measurement_id"):
        Ga4Config.model_validate(
            {"api_secret": "x", "measurement_id": "G-1", "firebase_app_id": "1:2:android:3"}
        )
    with pytest.raises(ValidationError, match="api_secret"):
        Ga4Config.model_validate({"measurement_id": "G-1"})


def test_config_hosts_and_consent_defaults() -> None:
    config = Ga4Config.model_validate({"api_secret": "s3cr3t-api", "measurement_id": "G-1"})
    assert config.host == "https://www.google-analytics.com"
    assert (config.ad_user_data, config.ad_personalization) == ("DENIED", "DENIED")
    eu = Ga4Config.model_validate({"api_secret": "x", "measurement_id": "G-1", "region": "eu"})
    assert eu.host == "https://region1.google-analytics.com"
    with pytest.raises(ValidationError, match="unknown region"):
        Ga4Config.model_validate({"api_secret": "x", "measurement_id": "G-1", "region": "us"})
    with pytest.raises(ValidationError):
        Ga4Config.model_validate(
            {"api_secret": "x", "measurement_id": "G-1", "ad_user_data": "yes"}
        )
    assert "s3cr3t-api" not in repr(config) and "s3cr3t-api" not in str(config.model_dump())


def test_batch_size_never_over_25() -> None:
    config = Ga4Config.model_validate(
        {"api_secret": "x", "measurement_id": "G-1", "batch_size": 100}
    )
    assert Ga4Sink.max_batch_size == 25
    assert Ga4Sink("g", config, None).batch_size == 25  # type: ignore[arg-type]


# --- request shape --------------------------------------------------------------------------


def test_web_stream_request(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    event = make_event("run", {"runSeconds": 45, "runSuccess": True, "flow": "abc"})
    result = send_batch(sink, [event])
    assert not result.failed and not result.retry, result

    (request,) = server.requests
    assert request.method == "POST" and request.path == "/mp/collect"
    assert request.query == {"measurement_id": ["G-TEST12345"], "api_secret": [SECRET]}
    assert request.header("Content-Type") == "application/json"
    body = request.json()
    assert list(body) == ["client_id", "timestamp_micros", "consent", "user_properties", "events"]
    assert body["client_id"] == event.distinct_id
    assert body["consent"] == {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}
    assert body["user_properties"]["app_version"] == {"value": "1.0.0"}
    assert body["user_properties"]["app_name"] == {"value": "testapp"}
    assert body["timestamp_micros"] == int(event.time * 1_000_000)
    (sent,) = body["events"]
    assert sent == {
        "name": "run",
        "params": {"event_id": event.id, "runSeconds": 45, "runSuccess": "true", "flow": "abc"},
        "timestamp_micros": int(event.time * 1_000_000),
    }
    assert peer.problems == []


def test_client_and_user_id_and_consent_from_config(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(
        server.url,
        client_id="555.777",
        user_id="u-1",
        ad_user_data="GRANTED",
        ad_personalization=None,
    )
    send_batch(sink, make_events(2))
    body = collected(server)[0].json()
    assert body["client_id"] == "555.777" and body["user_id"] == "u-1"
    assert body["consent"] == {"ad_user_data": "GRANTED"}
    assert peer.problems == []


def test_app_stream_request(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url, firebase_app_id="1:1234567890:android:321abc456def7890")
    event = make_event("run")
    assert not send_batch(sink, [event]).failed
    (request,) = server.requests
    assert request.query == {
        "firebase_app_id": ["1:1234567890:android:321abc456def7890"],
        "api_secret": [SECRET],
    }
    body = request.json()
    assert "client_id" not in body
    assert body["app_instance_id"] == uuid.UUID(event.instance_id).hex
    assert peer.problems == []


def test_app_instance_id_is_deterministic_32_hex() -> None:
    assert (
        app_instance_id("5db51f99-c6fb-4340-9c19-78adce58cc1b")
        == "5db51f99c6fb43409c1978adce58cc1b"
    )
    derived = app_instance_id("user@example")
    assert len(derived) == 32 and int(derived, 16) >= 0
    assert derived == app_instance_id("user@example")
    assert app_instance_id("ABCDEF0123456789ABCDEF0123456789") == "abcdef0123456789abcdef0123456789"


def test_eu_region_host_reaches_region1() -> None:
    config = Ga4Config.model_validate(
        {"api_secret": SECRET, "measurement_id": "G-1", "region": "eu"}
    )
    sink = Ga4Sink("g", config, None)  # type: ignore[arg-type]
    rendered = sink.render([make_event("run")])
    (request,) = rendered["requests"]
    assert (
        request["url"]
        == "https://region1.google-analytics.com/mp/collect?measurement_id=G-1&api_secret=***"
    )


def test_events_of_different_clients_go_in_different_requests(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    a = make_events(3, distinct_id="client-a")
    b = make_events(2, distinct_id="client-b")
    result = send_batch(sink, [a[0], b[0], a[1], b[1], a[2]])
    assert not result.failed and not result.retry
    by_client = {
        r.json()["client_id"]: [e["params"]["event_id"] for e in r.json()["events"]]
        for r in collected(server)
    }
    assert by_client == {"client-a": [e.id for e in a], "client-b": [e.id for e in b]}
    assert peer.problems == []


def test_never_more_than_25_events_per_request(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    events = make_events(60)  # more than the core ever hands over: the sink packs anyway
    result = send_batch(sink, events)
    assert not result.failed and not result.retry
    assert [len(r.json()["events"]) for r in collected(server)] == [25, 25, 10]
    assert [e["params"]["event_id"] for e in sent_events(server)] == [e.id for e in events]
    assert peer.problems == []


def test_bodies_stay_under_130_kb(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    # 24 params of 100 four-byte characters: about 10 kB per event, so 25 would be 250 kB.
    props = {f"p{i}": "\U0001f600" * 100 for i in range(24)}
    events = [make_event("heavy", dict(props)) for _ in range(25)]
    result = send_batch(sink, events)
    assert not result.failed and not result.retry
    requests = collected(server)
    assert len(requests) > 1
    assert all(len(r.body) < 130_000 for r in requests)
    assert sorted(e["params"]["event_id"] for e in sent_events(server)) == sorted(
        e.id for e in events
    )
    assert peer.problems == []


# --- answers --------------------------------------------------------------------------------


def test_429_and_5xx_are_retried_with_retry_after(ga4: Any, make_ga4: Any) -> None:
    server, _ = ga4
    sink = make_ga4(server.url)
    for status in (429, 500, 503):
        server.answer(Response(status, b"", headers={"Retry-After": "30"}))
        events = make_events(3)
        result = send_batch(sink, events)
        assert set(result.retry) == {e.id for e in events}, status
        assert result.retry_after == 30
        assert not result.failed


def test_other_4xx_fail_without_retry(ga4: Any, make_ga4: Any) -> None:
    server, _ = ga4
    sink = make_ga4(server.url)
    server.answer(Response(403, {"error": "forbidden"}))
    events = make_events(2)
    result = send_batch(sink, events)
    assert set(result.failed) == {e.id for e in events}
    assert "HTTP 403" in result.failed[events[0].id]
    assert SECRET not in repr(result)


def test_a_throttled_request_leaves_the_rest_of_the_batch_for_the_retry(
    ga4: Any, make_ga4: Any
) -> None:
    server, _ = ga4
    sink = make_ga4(server.url)
    server.answer(Response(204, b""), Response(429, b"", headers={"Retry-After": "5"}))
    events = (
        make_events(10, distinct_id="a")
        + make_events(10, distinct_id="b")
        + make_events(10, distinct_id="c")
    )
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events[10:]}
    assert len(server.requests) == 2  # the third request was not tried against a throttling GA4
    assert result.retry_after == 5


def test_413_splits_the_request(ga4: Any, make_ga4: Any) -> None:
    server, _ = ga4
    sink = make_ga4(server.url)
    server.answer(Response(413, b"Request Entity Too Large"))
    events = make_events(8)
    result = send_batch(sink, events)
    assert not result.failed and not result.retry
    assert [len(r.json()["events"]) for r in collected(server)] == [8, 4, 4]
    assert [e["params"]["event_id"] for e in sent_events(server)][8:] == [e.id for e in events]


def test_timeout_is_retryable(make_ga4: Any) -> None:
    with RecordingServer(lambda r: Response(204, b"", delay=2.0)) as server:
        sink = make_ga4(server.url, timeout=0.3)
        events = make_events(2)
        result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events}
    assert "no answer within 0.3 s" in result.retry[events[0].id]


# --- the validation server ------------------------------------------------------------------


def test_test_request_returns_validation_messages(ga4: Any, make_ga4: Any) -> None:
    server, _ = ga4
    sink = make_ga4(server.url)
    answer = sink.test_request(make_event("waypost_test", {"ok": True}))
    (request,) = server.requests
    assert request.path == "/debug/mp/collect"
    assert request.query["api_secret"] == [SECRET]
    assert answer["valid"] is True and answer["validationMessages"] == []
    assert answer["endpoint"].endswith(
        "/debug/mp/collect?measurement_id=G-TEST12345&api_secret=***"
    )
    assert SECRET not in repr(answer)


@pytest.mark.parametrize(
    ("name", "code"),
    [("_badEventName", "NAME_INVALID"), ("session_start", "NAME_RESERVED")],
)
def test_test_request_shows_ga4_verdict_on_refused_events(
    ga4: Any, make_ga4: Any, name: str, code: str
) -> None:
    server, _ = ga4
    sink = make_ga4(server.url)
    answer = sink.test_request(make_event(name))
    assert answer["valid"] is False
    assert answer["refused"] and name in answer["refused"]
    assert [m["validationCode"] for m in answer["validationMessages"]] == [code]
    assert answer["validationMessages"][0]["fieldPath"] == "events"


def test_test_request_shows_out_of_bounds_values() -> None:
    """A validation server that objects (as GA4 would to a value it finds too long)."""
    messages = [
        {
            "fieldPath": "events[0].params.flow",
            "description": "Value too long.",
            "validationCode": "VALUE_OUT_OF_BOUNDS",
        }
    ]
    with RecordingServer(lambda r: Response(200, {"validationMessages": messages})) as server:
        config = Ga4Config.model_validate(
            {"api_secret": SECRET, "measurement_id": "G-1", "host": server.url}
        )
        sink = Ga4Sink("g", config, None)  # type: ignore[arg-type]
        try:
            answer = sink.test_request(make_event("run", {"flow": "x"}))
        finally:
            sink.close()
    assert answer["valid"] is False and answer["validationMessages"] == messages


# --- end to end -----------------------------------------------------------------------------


def test_burst_end_to_end_delivers_every_valid_event_once(ga4: Any, make_telemetry: Any) -> None:
    server, peer = ga4
    tel = make_telemetry(
        sinks={
            "analytics": {
                "type": "ga4",
                "measurement_id": "G-TEST12345",
                "api_secret": SECRET,
                "host": server.url,
            }
        }
    )
    names = ["component-run", "flow.build", "run", "error", "page_view", "2fa_enabled"]
    for i in range(300):
        tel.track(names[i % len(names)], {"i": i, "nested": {"depth": i % 3}})
    assert tel.flush(timeout=30)
    received = sent_events(server)
    ids = [e["params"]["event_id"] for e in received]
    assert len(ids) == len(set(ids)) == 150  # the 150 events with names GA4 reserves or refuses
    assert {e["name"] for e in received} == {"component_run", "flow_build", "run"}
    assert sorted(e["params"]["i"] for e in received) == sorted(i for i in range(300) if i % 6 < 3)
    assert all(len(r.json()["events"]) <= 25 for r in collected(server))
    assert peer.problems == []
    (status,) = tel.status().sinks
    assert status.delivered == 150 and status.failed == 150 and status.pending == 0


def test_end_to_end_survives_a_throttling_ga4(ga4: Any, make_telemetry: Any) -> None:
    server, peer = ga4
    server.answer(
        Response(429, b"", headers={"Retry-After": "0"}), Response(503, b""), Response(503, b"")
    )
    tel = make_telemetry(
        sinks={"ga4": {"measurement_id": "G-TEST12345", "api_secret": SECRET, "host": server.url}}
    )
    for i in range(60):
        tel.track("run", {"i": i})
    tel.flush(timeout=30)  # true once everything is delivered *or* stored: wait for delivery

    def accepted(_: object) -> list[int]:
        return [e["params"]["i"] for r in peer.accepted for e in r.json()["events"]]

    assert server.wait_for(lambda r: len(accepted(r)) >= 60, timeout=30)
    assert sorted(accepted(None)) == list(range(60))
    assert peer.problems == []


def test_old_events_fail_with_a_reason_in_status(ga4: Any, make_ga4: Any) -> None:
    server, _ = ga4
    sink = make_ga4(server.url)
    old = make_event("run", time_=time.time() - 73 * 3600)
    result = send_batch(sink, [old])
    assert "72 hours" in result.failed[old.id]
    assert server.requests == []


def test_httpx_request_log_masks_the_api_secret(
    ga4: Any, make_ga4: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = ga4
    caplog.set_level(logging.DEBUG)
    # Another library in the same process may have quietened httpx (mixpanel's SDK sets it to
    # ERROR when imported): this test wants its request lines.
    caplog.set_level(logging.DEBUG, logger="httpx")
    sink = make_ga4(server.url)
    send_batch(sink, make_events(1))
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any("/mp/collect?measurement_id=G-TEST12345&api_secret=***" in line for line in lines)
    assert SECRET not in caplog.text


def test_open_and_send_import_nothing(ga4: Any, tmp_path: Path) -> None:
    """``open()``, ``send()`` and ``close()`` run on delivery threads, where an import that a
    ``fork()`` cuts across leaves its lock held in the child: everything is imported when the
    sink is built."""
    server, _ = ga4
    settings = {"measurement_id": "G-TEST12345", "api_secret": SECRET, "host": server.url}
    assert delivery_imports("ga4", settings, tmp_path, events=3) == []
    assert len(server.requests) == 1
