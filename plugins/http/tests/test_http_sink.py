"""The ``http`` sink against a real loopback endpoint (waypost.testing.RecordingServer)."""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import gzip
import hashlib
import hmac
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import waypost_http
from pydantic import ValidationError
from waypost_http import HttpConfig, HttpSink, verify_signature

from waypost.events import Event, base_context, dumps
from waypost.plugins import PluginManager
from waypost.sinks import SinkContext
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

TOKEN = "tok-7f3a9c2e-never-in-logs"
SECRET = "whsec-0123456789abcdef-secret"


def ids_of(request: Request) -> list[str]:
    content_type = request.header("Content-Type") or ""
    if "ndjson" in content_type:
        return [item["id"] for item in request.ndjson()]
    return [item["id"] for item in request.json()]


class TestHttpContract(SinkContract):
    sink_type = "http"
    secret_fields = ("signing_secret",)
    # 401 is the contract's other permanent answer; 422 and 404 are covered below.
    retry_statuses = (408, 429, 500, 503)

    def config(self, url: str) -> dict[str, Any]:
        return {
            "url": f"{url}/ingest",
            "headers": {"Authorization": f"Bearer {TOKEN}"},
            "signing_secret": SECRET,
        }

    def received_ids(self, requests: list[Request]) -> list[str]:
        return [i for r in requests for i in ids_of(r)]


def make_sink(url: str, tmp_path: Path, **settings: Any) -> HttpSink:
    config = HttpConfig.model_validate({"url": f"{url}/ingest", **settings})
    context = SinkContext(
        app="My App", version="2.3.4", instance_id="inst-1", data_dir=tmp_path, strict=True
    )
    sink = HttpSink("ingest", config, context)
    sink.open()
    return sink


@pytest.fixture
def sink_factory(recording_server: RecordingServer, tmp_path: Path) -> Any:
    made: list[HttpSink] = []

    def factory(**settings: Any) -> HttpSink:
        sink = make_sink(recording_server.url, tmp_path, **settings)
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.close()


# --- configuration ------------------------------------------------------------------------------


def test_plain_http_refused_off_loopback() -> None:
    with pytest.raises(ValidationError, match="allow_http"):
        HttpConfig(url="http://telemetry.example.org/ingest")
    assert HttpConfig(url="http://telemetry.example.org/in", allow_http=True).url.startswith(
        "http:"
    )
    assert HttpConfig(url="http://localhost:8080/in").url == "http://localhost:8080/in"
    assert (
        HttpConfig(url="https://telemetry.example.org/in/").url
        == "https://telemetry.example.org/in"
    )


def test_config_refuses_bad_settings() -> None:
    with pytest.raises(ValidationError, match="format"):
        HttpConfig(url="https://x.example/in", format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="method"):
        HttpConfig(url="https://x.example/in", method="GET")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="set by the sink"):
        HttpConfig.model_validate({"url": "https://x.example/in", "headers": {"Content-Type": "x"}})
    with pytest.raises(ValidationError) as info:
        HttpConfig.model_validate(
            {"url": "https://x.example/in", "headers": {"Authorization": f"Bearer {TOKEN}\r\nX: y"}}
        )
    assert TOKEN not in str(info.value)
    assert HttpConfig(url="https://x.example/in", method="put").method == "PUT"  # type: ignore[arg-type]


def test_header_values_never_leak(
    recording_server: RecordingServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    recording_server.responder = lambda r: Response(401, {"error": "bad token"})
    sink = make_sink(recording_server.url, tmp_path, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        result = send_batch(sink, make_events(2))
    finally:
        sink.close()
    assert recording_server.requests[0].header("Authorization") == f"Bearer {TOKEN}"
    for text in (repr(sink), str(sink.config), repr(sink.config), repr(result), caplog.text):
        assert TOKEN not in text
    assert sink.config.model_dump()["headers"]["Authorization"] != f"Bearer {TOKEN}"


# --- what is sent -------------------------------------------------------------------------------


def test_json_body_is_the_envelopes(recording_server: RecordingServer, sink_factory: Any) -> None:
    sink = sink_factory(headers={"Authorization": f"Bearer {TOKEN}", "X-Tenant": "acme"})
    events = make_events(3)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    request = recording_server.requests[0]
    assert request.method == "POST"
    assert request.path == "/ingest"
    assert request.header("Content-Type") == "application/json"
    assert request.header("Content-Encoding") is None
    assert request.header("X-Tenant") == "acme"
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    agent = request.header("User-Agent") or ""
    assert agent.startswith("My-App/2.3.4 waypost/")
    assert request.json() == [e.to_dict() for e in events]


def test_put_and_ndjson(recording_server: RecordingServer, sink_factory: Any) -> None:
    sink = sink_factory(method="PUT", format="ndjson")
    events = make_events(4)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    request = recording_server.requests[0]
    assert request.method == "PUT"
    assert request.header("Content-Type") == "application/x-ndjson"
    assert request.text.endswith("\n") and request.text.count("\n") == 4
    assert request.ndjson() == [e.to_dict() for e in events]


def test_cloudevents_batch(recording_server: RecordingServer, sink_factory: Any) -> None:
    sink = sink_factory(format="cloudevents")
    events = make_events(2, name="run")
    send_batch(sink, events)
    request = recording_server.requests[0]
    assert request.header("Content-Type") == "application/cloudevents-batch+json"
    batch = request.json()
    assert isinstance(batch, list) and len(batch) == 2
    for item, event in zip(batch, events, strict=True):
        assert item["specversion"] == "1.0"
        assert item["id"] == event.id
        assert item["source"] == "/waypost/My%20App"
        assert item["type"] == "waypost.run"
        when = dt.datetime.fromisoformat(item["time"].replace("Z", "+00:00"))
        assert when.tzinfo is not None
        assert abs(when.timestamp() - event.time) < 0.001
        assert item["datacontenttype"] == "application/json"
        assert item["data"] == event.to_dict()
        assert set(item) == {
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "datacontenttype",
            "data",
        }


MARK_LIKE = "waypost-context-0123456789abcdef"
"""Text that looks like a placeholder an encoder might use: the body must not care."""


@pytest.mark.parametrize("fmt", ["json", "ndjson", "cloudevents"])
@pytest.mark.parametrize("encoder", ["orjson", "standard"])
def test_body_is_the_rendered_events_whatever_their_contexts(
    fmt: str, encoder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if encoder == "standard":  # as on an interpreter orjson has no wheel for
        monkeypatch.setattr(waypost_http, "_orjson", None)
    else:
        assert waypost_http._orjson is not None, "orjson is a dependency on CPython"
    sink = make_sink("http://127.0.0.1:9", tmp_path, format=fmt)

    def same(body: bytes, expected: bytes) -> bool:
        if encoder == "standard":
            return body == expected  # the very bytes of the standard encoder
        if fmt == "ndjson":
            return [json.loads(x) for x in body.splitlines()] == [
                json.loads(x) for x in expected.splitlines()
            ] and body.endswith(b"\n") == expected.endswith(b"\n")
        return bool(json.loads(body) == json.loads(expected))

    def plain(events: list[Event]) -> bytes:
        items = sink.render(events)
        if fmt == "ndjson":
            return "".join(dumps(item) + "\n" for item in items).encode()
        return dumps(items).encode()

    shared = base_context("My App", "2.3.4")
    contexts = [
        [shared] * 4,
        [shared, dict(shared), {**shared, "python": "3.14.0"}, shared],  # equal is not shared
        [{**shared, "app": {"name": "é", "version": "1"}}, shared, shared, {}],
        [shared, {}, shared, shared],
        [shared, dict(reversed(shared.items())), shared, shared],  # equal, other text
    ]
    try:
        for batch in contexts:
            events = make_events(len(batch))
            for event, context in zip(events, batch, strict=True):
                event.context = context
            assert same(sink.encode(events), plain(events))
            # The same text as the shared context's, in the data: still the same body.
            events[2].properties = {"note": MARK_LIKE, MARK_LIKE: dumps(shared)}
            assert same(sink.encode(events), plain(events))
            # An integer past 64 bits (orjson refuses it): still the same body.
            events[1].properties = {"big": 2**70}
            assert same(sink.encode(events), plain(events))
        assert same(sink.encode([]), plain([]))
    finally:
        sink.close()


def test_cloudevents_source_and_type_are_configurable(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    sink = sink_factory(
        format="cloudevents",
        cloudevents_source="https://myapp.example.org/telemetry",
        cloudevents_type_prefix="org.example.myapp.",
    )
    send_batch(sink, make_events(1, name="flow_run"))
    (item,) = recording_server.requests[0].json()
    assert item["source"] == "https://myapp.example.org/telemetry"
    assert item["type"] == "org.example.myapp.flow_run"


def test_gzip(recording_server: RecordingServer, sink_factory: Any) -> None:
    sink = sink_factory(gzip=True, format="ndjson")
    events = make_events(50)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    request = recording_server.requests[0]
    assert request.header("Content-Encoding") == "gzip"
    assert request.raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(request.raw) == request.body
    assert len(request.raw) < len(request.body)
    assert [e["id"] for e in request.ndjson()] == [e.id for e in events]


@pytest.mark.parametrize("compress", [False, True])
def test_signature_verifies_independently(
    recording_server: RecordingServer, sink_factory: Any, compress: bool
) -> None:
    sink = sink_factory(signing_secret=SECRET, gzip=compress)
    send_batch(sink, make_events(3))
    request = recording_server.requests[0]
    timestamp = request.header("X-Waypost-Timestamp") or ""
    signature = request.header("X-Waypost-Signature") or ""
    assert timestamp.isdigit() and abs(int(timestamp) - time.time()) < 60
    # What a receiver does: HMAC over "<timestamp>." + the raw bytes received.
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + request.raw, hashlib.sha256)
    assert signature == "sha256=" + expected.hexdigest()
    assert verify_signature(SECRET, request.headers, request.raw)
    assert not verify_signature(SECRET, request.headers, request.raw + b" ")
    assert not verify_signature("another-secret-of-16", request.headers, request.raw)
    assert not verify_signature(SECRET, request.headers, request.raw, now=time.time() + 301)


def test_no_signature_headers_without_a_secret(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    send_batch(sink_factory(), make_events(1))
    assert recording_server.requests[0].header("X-Waypost-Signature") is None


# --- answers ------------------------------------------------------------------------------------


def test_retry_after_in_seconds(recording_server: RecordingServer, sink_factory: Any) -> None:
    recording_server.answer(Response(503, "busy", headers={"Retry-After": "120"}))
    events = make_events(2)
    result = send_batch(sink_factory(), events)
    assert set(result.retry) == {e.id for e in events}
    assert result.retry_after == 120
    assert "HTTP 503" in next(iter(result.retry.values()))


def test_retry_after_as_http_date(recording_server: RecordingServer, sink_factory: Any) -> None:
    when = email.utils.formatdate(time.time() + 90, usegmt=True)
    recording_server.answer(Response(429, {"error": "slow down"}, headers={"Retry-After": when}))
    result = send_batch(sink_factory(), make_events(2))
    assert len(result.retry) == 2
    assert result.retry_after is not None and 80 <= result.retry_after <= 91


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_is_permanent_with_the_cause(
    recording_server: RecordingServer, sink_factory: Any, status: int
) -> None:
    recording_server.answer(Response(status, {"detail": "field 'name' is not allowed here"}))
    events = make_events(2)
    result = send_batch(sink_factory(), events)
    assert set(result.failed) == {e.id for e in events} and not result.retry
    reason = result.failed[events[0].id]
    assert f"HTTP {status}" in reason and "is not allowed here" in reason


def test_redirects_are_not_followed(recording_server: RecordingServer, sink_factory: Any) -> None:
    recording_server.answer(Response(308, "", headers={"Location": "https://elsewhere.example/"}))
    result = send_batch(sink_factory(headers={"Authorization": f"Bearer {TOKEN}"}), make_events(1))
    assert len(result.failed) == 1 and "HTTP 308" in next(iter(result.failed.values()))
    assert len(recording_server.requests) == 1


def test_per_event_results_are_honoured(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    events = make_events(5)
    a, b, c, d, e = (ev.id for ev in events)
    recording_server.answer(
        Response(
            200,
            {
                "results": [
                    {"id": a, "status": "ok"},
                    {"id": b, "status": "retry", "error": "shard busy"},
                    {"id": c, "status": "failed", "error": "name not allowed"},
                    {"id": "not-in-this-batch", "status": "failed"},
                ],
                "rejected": [d],
            },
            headers={"Retry-After": "30"},
        )
    )
    result = send_batch(sink_factory(), events)
    assert set(result.retry) == {b} and "shard busy" in result.retry[b]
    assert set(result.failed) == {c, d} and "name not allowed" in result.failed[c]
    assert result.retry_after == 30
    assert e not in result.retry and e not in result.failed


def test_a_collectors_answer_refusals_and_control(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    events = make_events(3)
    a, b, c = (ev.id for ev in events)
    control = {"heartbeat_every": 604800.0, "sample": 0.5}
    recording_server.answer(
        Response(
            200,
            {
                "receipt": "01a2-receipt",
                "accepted": 1,
                "duplicates": 0,
                "refused": [
                    {"id": a, "reason": "undeclared_field", "detail": "user not declared by 'run'"},
                    {"id": "not-in-this-batch", "reason": "malformed"},
                    "not an object",
                ],
                "retry": [b],
                "control": control,
            },
        ),
        Response(200, {"receipt": "r-2", "control": ["not", "an", "object"]}),
    )
    sink = sink_factory()
    result = send_batch(sink, events)
    assert set(result.failed) == {a} and "undeclared_field user not declared" in result.failed[a]
    assert set(result.retry) == {b} and c not in result.failed
    assert result.receipt == "01a2-receipt" and result.control == control
    assert send_batch(sink, make_events(1)).control is None


def test_non_json_success_delivers_everything(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    recording_server.answer(Response(202, "accepted"))
    result = send_batch(sink_factory(), make_events(3))
    assert not result.retry and not result.failed


@pytest.mark.parametrize("key", ["uuid", "receipt", "id"])
def test_receipt_from_the_answer(
    recording_server: RecordingServer, sink_factory: Any, key: str
) -> None:
    recording_server.answer(Response(200, {key: "1ebfb9f0-6c0b-11ea-9aac-274c8c0cddda"}))
    result = send_batch(sink_factory(), make_events(2))
    assert not result.retry and not result.failed
    assert result.receipt == "1ebfb9f0-6c0b-11ea-9aac-274c8c0cddda"


def test_receipt_is_one_short_line_and_uuid_wins(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    recording_server.answer(
        Response(200, {"id": "second", "uuid": "first\nINFO forged line " + "x" * 500}),
        Response(200, {"uuid": 42, "receipt": ""}),
        Response(202, "accepted"),
    )
    sink = sink_factory()
    receipt = send_batch(sink, make_events(1)).receipt
    assert receipt is not None and "\n" not in receipt and len(receipt) == 200
    assert receipt.startswith("first INFO forged line")
    assert send_batch(sink, make_events(1)).receipt is None  # not strings: no receipt
    assert send_batch(sink, make_events(1)).receipt is None  # not JSON: no receipt


def test_receipt_is_logged_by_the_core(
    recording_server: RecordingServer, make_telemetry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recording_server.responder = lambda r: Response(200, {"uuid": "1ebfb9f0-receipt"})
    tel = make_telemetry(sinks={"ingest": {"type": "http", "url": f"{recording_server.url}/in"}})
    caplog.set_level(logging.INFO, logger="waypost")
    tel.track("report", {"users": 3})
    # flush() says the event is safe (delivered, or stored for a retry): the receipt comes with
    # the delivery, which a busy machine may leave to the next pass.
    line = "waypost: sink 'ingest': receipt 1ebfb9f0-receipt"
    deadline = time.monotonic() + 30
    while line not in caplog.text and time.monotonic() < deadline:
        assert tel.flush(timeout=10)
    assert line in caplog.text
    recording_server.answer(Response(200, {"receipt": "r-2"}))
    answer = HttpSink("ingest", tel.sinks["ingest"].config, tel.sinks["ingest"].context)
    assert answer.test_request(make_events(1)[0])["receipt"] == "r-2"
    answer.close()


def test_413_is_split_by_the_core(recording_server: RecordingServer, sink_factory: Any) -> None:
    accepted: list[str] = []

    def answer(request: Request) -> Response:
        ids = ids_of(request)
        if len(ids) > 2:
            return Response(413, "Payload Too Large")
        accepted.extend(ids)
        return Response(200, {})

    recording_server.responder = answer
    events = make_events(9)
    result = send_batch(sink_factory(), events)
    assert not result.retry and not result.failed
    assert sorted(accepted) == sorted(e.id for e in events)


def test_413_for_one_event_fails_it(recording_server: RecordingServer, sink_factory: Any) -> None:
    recording_server.responder = lambda r: Response(413, "Payload Too Large")
    events = make_events(1)
    result = send_batch(sink_factory(), events)
    assert "too large" in result.failed[events[0].id]


def test_connection_reset_is_retryable(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    recording_server.answer(Response(reset=True))
    result = send_batch(sink_factory(), make_events(2))
    assert len(result.retry) == 2 and not result.failed


def test_test_request_reports_the_answer(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    recording_server.answer(Response(200, {"ok": True}))
    answer = sink_factory().test_request(make_events(1)[0])
    url = f"{recording_server.url}/ingest"
    assert answer == {"delivered": True, "url": url, "status": 200, "answer": {"ok": True}}


def test_entry_point_loads_the_sink() -> None:
    assert PluginManager().load_sink_type("http") is HttpSink


# --- end to end ---------------------------------------------------------------------------------


def test_burst_end_to_end_every_event_exactly_once(
    recording_server: RecordingServer, make_telemetry: Any
) -> None:
    accepted: list[dict[str, Any]] = []
    calls = iter(range(1_000_000))
    lock = threading.Lock()

    def answer(request: Request) -> Response:
        with lock:
            n = next(calls)
        if n in (1, 4):  # a busy endpoint now and then: those batches come back later
            return Response(503, "busy", headers={"Retry-After": "0"})
        batch = request.json()
        if n == 6:  # one partial answer: the first event of the batch is to be retried
            with lock:
                accepted.extend(batch[1:])
            return Response(200, {"results": [{"id": batch[0]["id"], "status": "retry"}]})
        with lock:
            accepted.extend(batch)
        return Response(200, {})

    recording_server.responder = answer
    tel = make_telemetry(
        sinks={
            "ingest": {
                "type": "http",
                "url": f"{recording_server.url}/ingest",
                "batch_size": 40,
                "gzip": True,
                "signing_secret": SECRET,
                "headers": {"Authorization": "Bearer ${INGEST_TOKEN}"},
            }
        },
        env={"INGEST_TOKEN": TOKEN},
    )
    for i in range(600):
        tel.track("burst", {"i": i})
    assert tel.flush(timeout=30)
    # flush() makes one delivery pass; the batches answered 503 come back after their backoff.
    deadline = time.monotonic() + 30
    while tel.status().outbox_pending_events and time.monotonic() < deadline:
        tel.flush(timeout=5)
        time.sleep(0.05)
    ids = [item["id"] for item in accepted]
    assert len(ids) == 600 and len(set(ids)) == 600
    assert sorted(item["properties"]["i"] for item in accepted) == list(range(600))
    assert all(r.header("Authorization") == f"Bearer {TOKEN}" for r in recording_server.requests)
    status = tel.status()
    assert status.sinks[0].delivered == 600


def test_test_request_reports_an_unreachable_endpoint(tmp_path: Path) -> None:
    from waypost.testing import free_port

    sink = make_sink(f"http://127.0.0.1:{free_port()}", tmp_path, timeout=2)
    try:
        answer = sink.test_request(make_events(1)[0])
    finally:
        sink.close()
    assert answer["delivered"] is False and "ConnectError" in answer["reason"]
    assert answer["retryable"] is True


# --- credentials in the URL ---------------------------------------------------------------------

PASSWORD = "pw-9c41d2-never-in-logs"


def test_url_credentials_go_on_the_wire_and_nowhere_else(
    recording_server: RecordingServer, make_telemetry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx's and httpcore's included
    answers = iter([Response(503, "busy", headers={"Retry-After": "0"})])
    recording_server.responder = lambda r: next(answers, Response(200, {}))
    url = (
        f"http://ingest:{PASSWORD}@{recording_server.host}:{recording_server.port}"
        f"/in?v=2&token={TOKEN}"
    )
    tel = make_telemetry(sinks={"ingest": {"type": "http", "url": url}})
    for i in range(3):
        tel.track("with_credentials", {"i": i})
    tel.flush(timeout=10)
    status = tel.status()
    assert tel.flush(timeout=10)
    first, *_ = recording_server.requests
    assert first.query == {"v": ["2"], "token": [TOKEN]}
    expected = base64.b64encode(f"ingest:{PASSWORD}".encode()).decode()
    assert first.header("Authorization") == f"Basic {expected}"
    sink = tel.sinks["ingest"]
    assert sink.config.url.endswith("/in?v=2&token=***")
    texts = [caplog.text, repr(sink.config), str(sink.config), sink.destination]
    texts += [status.model_dump_json(), tel.status().model_dump_json()]
    for text in texts:
        for secret in (PASSWORD, TOKEN, expected):
            assert secret not in text, text[:300]
    assert "HTTP Request: POST" in caplog.text and "token=***" in caplog.text


def test_user_info_and_an_authorization_header_are_ambiguous() -> None:
    with pytest.raises(ValidationError, match="ambiguous") as info:
        HttpConfig.model_validate(
            {
                "url": f"https://u:{PASSWORD}@x.example/in",
                "headers": {"authorization": f"Bearer {TOKEN}"},
            }
        )
    assert PASSWORD not in str(info.value) and TOKEN not in str(info.value)


def test_a_bad_url_is_refused_without_quoting_its_credentials() -> None:
    with pytest.raises(ValidationError) as info:
        HttpConfig(url=f"http://u:{PASSWORD}@telemetry.example.org/in?token={TOKEN}")
    assert "allow_http" in str(info.value)
    assert PASSWORD not in str(info.value) and TOKEN not in str(info.value)


def test_a_redirect_takes_the_token_nowhere(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    with RecordingServer() as elsewhere:
        recording_server.responder = lambda r: Response(
            307, "", headers={"Location": f"{elsewhere.url}/collect?token={TOKEN}"}
        )
        sink = sink_factory(headers={"Authorization": f"Bearer {TOKEN}"})
        result = send_batch(sink, make_events(2))
        assert elsewhere.requests == []
    (reason,) = set(result.failed.values())
    assert "HTTP 307" in reason and f"{elsewhere.url}/collect?token=***" in reason
    assert TOKEN not in reason


def test_an_endpoint_echoing_credentials_is_masked(
    recording_server: RecordingServer, sink_factory: Any
) -> None:
    def echo(request: Request) -> Response:
        seen = {"auth": request.header("Authorization"), "signature": SECRET}
        first = request.json()[0]
        if first["properties"].get("partial"):
            refusal = {"id": first["id"], "status": "failed", "error": json.dumps(seen)}
            return Response(200, {"results": [refusal]})
        return Response(403, {"error": "forbidden", "seen": seen})

    recording_server.responder = echo
    sink = sink_factory(headers={"Authorization": f"Bearer {TOKEN}"}, signing_secret=SECRET)
    events = make_events(1)
    refused = send_batch(sink, events).failed[events[0].id]
    assert "HTTP 403" in refused and "forbidden" in refused
    per_event = send_batch(sink, [make_event("partial", {"partial": True})])
    answer = sink.test_request(events[0])["answer"]
    for text in (refused, repr(per_event), answer):
        assert TOKEN not in text and SECRET not in text


def test_open_and_send_import_nothing(recording_server: RecordingServer, tmp_path: Path) -> None:
    """The core calls ``open()`` and ``send()`` on delivery threads, and a fork during an import
    leaves that module's lock held in the child for good: httpx, httpcore, h11 and certifi are
    imported when the sink is built, on the application's thread (on the old sink, open()
    imported httpcore, h11 and certifi on the delivery thread)."""
    settings = {"url": recording_server.url + "/in", "gzip": True}
    assert delivery_imports("http", settings, tmp_path) == []
    assert len(recording_server.requests) == 1


# --- CloudEvents, read back by the CloudEvents SDK ----------------------------------------------


def test_cloudevents_batches_parse_with_the_cloudevents_sdk(
    waypost_recording_server: RecordingServer, waypost_make_telemetry: Any
) -> None:
    from cloudevents.core.formats.json import JSONFormat

    tel = waypost_make_telemetry(
        sinks={
            "ce": {
                "type": "http",
                "url": f"{waypost_recording_server.url}/ingest",
                "format": "cloudevents",
            }
        },
        config={"timestamps": {"earliest": "1970-01-01"}},  # a backfill reaches back to 1970
    )
    now = time.time()
    times = {
        "epoch": 0.0,
        "y2k": dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc).timestamp(),
        "leap": dt.datetime(2024, 2, 29, 23, 59, 59, 999_000, tzinfo=dt.timezone.utc).timestamp(),
        "$pageview": now,
        "rocket \U0001f680 launch/v2.1": now,
        "nearly a day ahead": now + 86_000,
    }
    for name, when in times.items():
        tel.track(name, {"n": 1}, timestamp=when)
    assert tel.flush(10)
    items = [item for r in waypost_recording_server.requests for item in r.json()]
    assert len(items) == len(times)
    for item in items:
        event = JSONFormat().read(None, json.dumps(item))  # refuses a time that is not RFC 3339
        name = event.get_type().removeprefix("waypost.")
        when = event.get_time()
        assert when is not None and when.tzinfo is not None
        assert abs(when.timestamp() - times[name]) < 0.001
        assert len(item["time"].split("-")[0]) == 4
        assert event.get_data() == item["data"]
