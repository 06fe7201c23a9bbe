"""The mixpanel sink against a loopback peer that answers like Mixpanel's ingestion API."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from waypost_mixpanel import MAX_REQUEST_BYTES, MixpanelConfig, MixpanelSink

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

TOKEN = "mp-token-5f0c2a9e"
SA_USER = "waypost-sa.1a2b3c.mp-service-account"
SA_SECRET = "sa-secret-7d1e4b2a9c3d"
API_SECRET = "api-secret-4e5f6a7b"
PROJECT = "3141592"
DAY = 24 * 3600.0


# --- a peer that speaks Mixpanel --------------------------------------------------------------


def sent_events(request: Request) -> list[dict[str, Any]]:
    """The events of one request as the SDK posts them: form field ``data``, a JSON array."""
    form = request.form()
    assert list(form["data"]) == [form["data"][0]], "one data field"
    data = json.loads(form["data"][0])
    return data if isinstance(data, list) else [data]


def basic_auth(request: Request) -> tuple[str, str] | None:
    header = request.header("Authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    user, _, secret = base64.b64decode(value).decode().partition(":")
    return user, secret


class MixpanelPeer:
    """Answers /track with ``{"status": 1, "error": null}`` (verbose) and /import with
    ``{"code": 200, "status": "OK", "num_records_imported": N}``; refuses what Mixpanel would."""

    def __init__(self, *, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.refuse_names: set[str] = set()  # /import refuses these records (partial success)

    def __call__(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(405, {"status": 0, "error": "method not allowed"})
        if request.header("Content-Type") != "application/x-www-form-urlencoded":
            return Response(400, {"status": 0, "error": "expected a form body"})
        form = request.form()
        if form.get("verbose") != ["1"] or form.get("ip") != ["0"]:
            return Response(400, {"status": 0, "error": "expected verbose=1 and ip=0"})
        try:
            events = sent_events(request)
        except (KeyError, ValueError):
            return Response(200, {"status": 0, "error": "data, missing or empty"})
        if request.path == "/track":
            return self.track(request, events)
        if request.path == "/import":
            return self.import_(request, events)
        return Response(404, {"status": 0, "error": "not found"})

    def track(self, request: Request, events: list[dict[str, Any]]) -> Response:
        if request.header("Authorization"):
            return Response(200, {"status": 0, "error": "/track takes the token, not auth"})
        for event in events:
            props = event.get("properties", {})
            if props.get("token") != TOKEN:
                return Response(200, {"status": 0, "error": "token, missing or empty"})
            if len(props.get("$insert_id", "")) > 36:
                return Response(200, {"status": 0, "error": "$insert_id too long"})
        return Response(200, {"status": 1, "error": None})

    def import_(self, request: Request, events: list[dict[str, Any]]) -> Response:
        if self.credentials is None or basic_auth(request) != self.credentials:
            return Response(401, {"code": 401, "error": "Invalid credentials", "status": 0})
        if request.query.get("strict") != ["1"]:
            return Response(400, {"code": 400, "error": "expected strict=1", "status": 0})
        if self.credentials[0] == SA_USER and request.query.get("project_id") != [PROJECT]:
            return Response(400, {"code": 400, "error": "project_id missing", "status": 0})
        failed = [
            {
                "index": i,
                "insert_id": e["properties"]["$insert_id"],
                "field": "properties.time",
                "message": "'properties.time' is invalid: must be specified as seconds since epoch",
            }
            for i, e in enumerate(events)
            if e["event"] in self.refuse_names
        ]
        if failed:
            return Response(
                400,
                {
                    "code": 400,
                    "error": "some data points in the request failed validation",
                    "status": "Bad Request",
                    "num_records_imported": len(events) - len(failed),
                    "failed_records": failed,
                },
            )
        return Response(200, {"code": 200, "num_records_imported": len(events), "status": "OK"})


def make_sink(url: str, tmp_path: Path, **settings: Any) -> MixpanelSink:
    from waypost.sinks import SinkContext

    config = MixpanelConfig.model_validate({"token": TOKEN, "host": url, **settings})
    context = SinkContext(
        app="testapp", version="1.0.0", instance_id="i", data_dir=tmp_path, strict=True
    )
    sink = MixpanelSink("mixpanel", config, context)
    sink.open()
    return sink


SERVICE_ACCOUNT = {
    "service_account_username": SA_USER,
    "service_account_secret": SA_SECRET,
    "project_id": PROJECT,
}


# --- the contract -----------------------------------------------------------------------------


class TestMixpanelContract(SinkContract):
    sink_type = "mixpanel"
    secret_fields = ("token",)
    permanent_status = 400

    def config(self, url: str) -> dict[str, Any]:
        return {"token": TOKEN, "host": url}

    def received_ids(self, requests: list[Request]) -> list[str]:
        return [
            e["properties"]["$insert_id"]
            for r in requests
            if r.path in ("/track", "/import")
            for e in sent_events(r)
        ]

    def ok_response(self, request: Request) -> Response:
        return MixpanelPeer()(request)

    def error_response(self, request: Request, status: int, headers: dict[str, str]) -> Response:
        return Response(status, {"status": 0, "error": f"status {status}"}, headers=headers)


class TestMixpanelContractWithServiceAccount(TestMixpanelContract):
    secret_fields = ("token", "service_account_secret")

    def config(self, url: str) -> dict[str, Any]:
        return {"token": TOKEN, "host": url, **SERVICE_ACCOUNT}

    def ok_response(self, request: Request) -> Response:
        return MixpanelPeer(credentials=(SA_USER, SA_SECRET))(request)


# --- what goes on the wire --------------------------------------------------------------------


def test_track_request_is_the_sdks_form_post(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer()
    sink = make_sink(recording_server.url, tmp_path)
    events = [
        make_event("run", {"runSeconds": 45, "runSuccess": True}),
        make_event("run", {"runSeconds": 3}, distinct_id="user-42"),
    ]
    result = send_batch(sink, events)
    assert result == type(result)(), result

    (request,) = recording_server.requests
    assert request.method == "POST" and request.path == "/track"
    assert request.query == {}
    assert request.header("Authorization") is None
    form = request.form()
    assert form["verbose"] == ["1"] and form["ip"] == ["0"]
    first, second = sent_events(request)
    assert first["event"] == "run"
    props = first["properties"]
    assert props["token"] == TOKEN
    assert props["distinct_id"] == events[0].instance_id
    assert props["$insert_id"] == events[0].id and len(events[0].id) == 36
    assert props["time"] == round(events[0].time * 1000)
    assert props["runSeconds"] == 45 and props["runSuccess"] is True
    assert props["mp_lib"] == "waypost"
    assert props["app_name"] == "testapp" and props["app_version"] == "1.0.0"
    assert props["$os"] == events[0].context["os"]["type"]
    assert second["properties"]["distinct_id"] == "user-42"
    sink.close()


def test_envelope_keys_win_over_properties(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer()
    sink = make_sink(recording_server.url, tmp_path)
    event = make_event("e", {"token": "other", "time": 1, "$insert_id": "x", "mp_lib": "mine"})
    assert not send_batch(sink, [event]).failed
    props = sent_events(recording_server.requests[0])[0]["properties"]
    assert props["token"] == TOKEN and props["$insert_id"] == event.id
    assert props["time"] == round(event.time * 1000)
    assert props["mp_lib"] == "mine"  # context fields are defaults, not overrides


def test_render_is_the_request_body_with_the_token_hidden(tmp_path: Path) -> None:
    sink = make_sink("http://127.0.0.1:9", tmp_path)
    events = make_events(3)
    (rendered,) = sink.render(events)
    assert rendered["url"] == "http://127.0.0.1:9/track"
    assert rendered["form"]["verbose"] == "1" and rendered["form"]["ip"] == "0"
    data = json.loads(rendered["form"]["data"])
    assert [e["properties"]["$insert_id"] for e in data] == [e.id for e in events]
    assert TOKEN not in json.dumps(rendered)
    assert {e["properties"]["token"] for e in data} == {"***"}


def test_test_request_returns_mixpanels_answer(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer()
    sink = make_sink(recording_server.url, tmp_path)
    answer = sink.test_request(make_event("waypost_test"))
    assert answer["delivered"] is True
    assert answer["status"] == 200 and answer["url"] == f"{recording_server.url}/track"
    assert answer["answer"] == {"status": 1, "error": None}
    recording_server.responder = lambda r: Response(200, {"status": 0, "error": "token invalid"})
    answer = sink.test_request(make_event("waypost_test"))
    assert answer["delivered"] is False and "token invalid" in answer["reason"]


# --- answers ----------------------------------------------------------------------------------


def test_status_0_is_a_permanent_failure_even_with_http_200(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = lambda r: Response(
        200, {"status": 0, "error": "token, missing or empty"}
    )
    sink = make_sink(recording_server.url, tmp_path)
    events = make_events(3)
    result = send_batch(sink, events)
    assert set(result.failed) == {e.id for e in events} and not result.retry
    assert all("token, missing or empty" in r for r in result.failed.values())


def test_an_answer_echoing_the_token_is_redacted(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = lambda r: Response(
        200, {"status": 0, "error": f"project for token {TOKEN} is disabled"}
    )
    sink = make_sink(recording_server.url, tmp_path)
    result = send_batch(sink, make_events(1))
    (reason,) = result.failed.values()
    assert "token *** is disabled" in reason and TOKEN not in reason


def test_status_0_with_a_retryable_code_is_retried(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = lambda r: Response(
        429, {"status": 0, "error": "rate limited"}, headers={"Retry-After": "12"}
    )
    sink = make_sink(recording_server.url, tmp_path)
    events = make_events(2)
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events} and result.retry_after == 12


def test_a_body_that_is_not_json_is_retried_with_a_reason(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = lambda r: Response(200, "<html>captive portal</html>")
    sink = make_sink(recording_server.url, tmp_path)
    events = make_events(2)
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events}
    assert "not Mixpanel's JSON answer" in next(iter(result.retry.values()))


def test_413_lets_the_core_split_until_it_fits(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    peer = MixpanelPeer()

    def small_only(request: Request) -> Response:
        if len(sent_events(request)) > 2:
            return Response(413, {"status": 0, "error": "request too large"})
        return peer(request)

    recording_server.responder = small_only
    sink = make_sink(recording_server.url, tmp_path)
    events = make_events(7)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    delivered = [
        e["properties"]["$insert_id"]
        for r in recording_server.requests
        if len(sent_events(r)) <= 2
        for e in sent_events(r)
    ]
    assert sorted(delivered) == sorted(e.id for e in events)


def test_requests_stay_under_the_size_limit(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer()
    sink = make_sink(recording_server.url, tmp_path)
    events = [make_event("big", {"blob": "x" * 300_000, "i": i}) for i in range(12)]
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    assert len(recording_server.requests) > 1
    assert all(len(r.raw) <= MAX_REQUEST_BYTES + 100 for r in recording_server.requests)
    received = [
        e["properties"]["$insert_id"] for r in recording_server.requests for e in sent_events(r)
    ]
    assert sorted(received) == sorted(e.id for e in events)


def test_an_event_of_a_megabyte_is_refused_alone(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer()
    sink = make_sink(recording_server.url, tmp_path)
    huge = make_event("huge", {"blob": "y" * (1024 * 1024)})
    fine = make_event("fine")
    result = send_batch(sink, [huge, fine])
    assert set(result.failed) == {huge.id} and "1 MB" in result.failed[huge.id]
    (request,) = recording_server.requests
    assert [e["properties"]["$insert_id"] for e in sent_events(request)] == [fine.id]


# --- old events and /import -------------------------------------------------------------------


def test_old_events_go_to_import_with_the_service_account(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer(credentials=(SA_USER, SA_SECRET))
    sink = make_sink(recording_server.url, tmp_path, **SERVICE_ACCOUNT)
    now = time.time()
    recent = make_events(2)
    old = [make_event("old", time_=now - 6 * DAY), make_event("old", time_=now - 30 * DAY)]
    result = send_batch(sink, [old[0], recent[0], old[1], recent[1]])
    assert not result.retry and not result.failed, result

    by_path = {r.path: r for r in recording_server.requests}
    assert set(by_path) == {"/track", "/import"}
    track, imp = by_path["/track"], by_path["/import"]
    assert [e["properties"]["$insert_id"] for e in sent_events(track)] == [e.id for e in recent]
    assert [e["properties"]["$insert_id"] for e in sent_events(imp)] == [e.id for e in old]
    assert basic_auth(imp) == (SA_USER, SA_SECRET)
    assert imp.query == {"strict": ["1"], "project_id": [PROJECT]}
    assert "api_key" not in imp.form()
    assert basic_auth(track) is None  # the service account is for /import only
    assert sent_events(imp)[1]["properties"]["time"] == round(old[1].time * 1000)


def test_old_events_go_to_import_with_the_api_secret(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer(credentials=(API_SECRET, ""))
    sink = make_sink(recording_server.url, tmp_path, api_secret=API_SECRET, project_id=PROJECT)
    old = make_event("old", time_=time.time() - 10 * DAY)
    assert not send_batch(sink, [old]).failed
    (request,) = recording_server.requests
    assert request.path == "/import" and basic_auth(request) == (API_SECRET, "")
    assert request.query == {"strict": ["1"], "project_id": [PROJECT]}


def test_old_events_without_credentials_fail_with_a_reason(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer()
    sink = make_sink(recording_server.url, tmp_path)
    recent = make_event("recent")
    old = make_event("old", time_=time.time() - 6 * DAY)
    result = send_batch(sink, [recent, old])
    assert set(result.failed) == {old.id} and not result.retry
    assert "/import" in result.failed[old.id] and "older than 5 days" in result.failed[old.id]
    assert [r.path for r in recording_server.requests] == ["/track"]


def test_import_partial_failure_marks_exactly_the_failed_records(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    peer = MixpanelPeer(credentials=(SA_USER, SA_SECRET))
    peer.refuse_names = {"bad"}
    recording_server.responder = peer
    sink = make_sink(recording_server.url, tmp_path, **SERVICE_ACCOUNT)
    when = time.time() - 7 * DAY
    events = [make_event(name, time_=when) for name in ("good", "bad", "good", "bad", "good")]
    result = send_batch(sink, events)
    assert set(result.failed) == {events[1].id, events[3].id}
    assert not result.retry
    assert "properties.time" in result.failed[events[1].id]
    assert len(recording_server.requests) == 1


def test_import_refusing_the_credentials_is_permanent(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    recording_server.responder = MixpanelPeer(credentials=(SA_USER, "another-secret"))
    sink = make_sink(recording_server.url, tmp_path, **SERVICE_ACCOUNT)
    old = make_events(2, time_=time.time() - 8 * DAY)
    result = send_batch(sink, old)
    assert set(result.failed) == {e.id for e in old}
    assert all("HTTP 401" in r and SA_SECRET not in r for r in result.failed.values())


def test_a_throttled_request_holds_back_the_rest_of_the_batch(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    throttled = Response(429, {"status": 0, "error": "slow down"}, {"Retry-After": "3"})
    recording_server.answer(throttled)
    recording_server.responder = MixpanelPeer(credentials=(SA_USER, SA_SECRET))
    sink = make_sink(recording_server.url, tmp_path, **SERVICE_ACCOUNT)
    recent = make_events(2)
    old = make_events(2, time_=time.time() - 9 * DAY)
    result = send_batch(sink, [*recent, *old])
    assert set(result.retry) == {e.id for e in [*recent, *old]}
    assert result.retry_after == 3
    assert len(recording_server.requests) == 1


# --- end to end -------------------------------------------------------------------------------


def test_burst_through_telemetry_arrives_exactly_once(
    recording_server: RecordingServer, make_telemetry: Any
) -> None:
    peer = MixpanelPeer()
    flaky = iter([Response(503, {"status": 0, "error": "busy"}, {"Retry-After": "0"})])

    def answer(request: Request) -> Response:
        return next(flaky, None) or peer(request)

    recording_server.responder = answer
    tel = make_telemetry(sinks={"mixpanel": {"token": TOKEN, "host": recording_server.url}})
    for i in range(600):
        tel.track("burst", {"i": i})
    assert tel.flush(timeout=30)
    # The refused first request is resent after the core's backoff.
    assert recording_server.wait_for(
        lambda requests: sum(len(sent_events(r)) for r in requests[1:]) >= 600, timeout=20
    )
    accepted = recording_server.requests[1:]  # the first was answered 503, and resent
    got = Counter(e["properties"]["$insert_id"] for r in accepted for e in sent_events(r))
    assert len(got) == 600 and set(got.values()) == {1}
    numbers = sorted(e["properties"]["i"] for r in accepted for e in sent_events(r))
    assert numbers == list(range(600))
    assert tel.flush(timeout=10)  # the pass that delivered them has been counted
    assert tel.status().sinks[0].delivered == 600


# --- config and SDK quirks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "host"),
    [(None, "https://api.mixpanel.com"), ("eu", "https://api-eu.mixpanel.com"),
     ("in", "https://api-in.mixpanel.com")],
)  # fmt: skip
def test_regions(region: str | None, host: str) -> None:
    config = MixpanelConfig.model_validate({"token": TOKEN, "region": region})
    assert config.host == host


def test_config_checks_the_credentials() -> None:
    with pytest.raises(ValidationError, match="project_id"):
        MixpanelConfig.model_validate(
            {"token": TOKEN, "service_account_username": "u", "service_account_secret": "s"}
        )
    with pytest.raises(ValidationError, match="both"):
        MixpanelConfig.model_validate({"token": TOKEN, "service_account_username": "u"})
    with pytest.raises(ValidationError, match="not both"):
        MixpanelConfig.model_validate({"token": TOKEN, "api_secret": "a", **SERVICE_ACCOUNT})
    with pytest.raises(ValidationError, match="token"):
        MixpanelConfig.model_validate({})
    config = MixpanelConfig.model_validate({"token": TOKEN, **SERVICE_ACCOUNT})
    assert SA_SECRET not in repr(config) and TOKEN not in repr(config)


def test_nothing_is_retried_but_by_the_core(
    recording_server: RecordingServer, tmp_path: Path
) -> None:
    """mixpanel.Consumer mounts a retrying adapter for https://; the sink posts through the
    core's transport instead, which never retries: retries (and their sleeps) are the core's."""
    assert make_sink("https://api.mixpanel.com", tmp_path).url("events") == (
        "https://api.mixpanel.com/track"
    )
    for answer in (Response(503, {"status": 0, "error": "busy"}), Response(reset=True)):
        recording_server.clear()
        recording_server.responder = lambda r, a=answer: a  # type: ignore[misc]
        sink = make_sink(recording_server.url, tmp_path)
        events = make_events(2)
        assert set(send_batch(sink, events).retry) == {e.id for e in events}
        assert len(recording_server.requests) == 1
        sink.close()
        sink.close()


def test_plain_http_is_refused_off_loopback() -> None:
    with pytest.raises(ValidationError, match="allow_http"):
        MixpanelConfig.model_validate({"token": TOKEN, "host": "http://mixpanel.example.org"})


def test_sdk_quirk_import_success_trips_the_sdk(recording_server: RecordingServer) -> None:
    """Why the sink judges the answer itself: Consumer.send expects {"status": 1} and reads
    body["error"] otherwise, so /import's documented success answer raises a KeyError."""
    import mixpanel

    recording_server.responder = MixpanelPeer(credentials=(SA_USER, SA_SECRET))
    consumer = mixpanel.Consumer(
        import_url=f"{recording_server.url}/import?strict=1",
        credentials=mixpanel.ServiceAccountCredentials(SA_USER, SA_SECRET, PROJECT),
        retry_limit=0,
    )
    event = {"event": "e", "properties": {"token": TOKEN, "distinct_id": "d", "time": 1,
                                          "$insert_id": "a" * 36}}  # fmt: skip
    with pytest.raises(KeyError):
        consumer.send("imports", json.dumps([event]))
    (request,) = recording_server.requests
    assert request.query == {"strict": ["1"], "project_id": [PROJECT]}


def test_open_and_send_import_nothing(
    waypost_recording_server: RecordingServer, tmp_path: Path
) -> None:
    """``open()``, ``send()`` and ``close()`` run on delivery threads, where an import that a
    ``fork()`` cuts across leaves its lock held in the child: everything is imported when the
    sink is built."""
    waypost_recording_server.responder = MixpanelPeer()
    settings = {"token": TOKEN, "host": waypost_recording_server.url}
    assert delivery_imports("mixpanel", settings, tmp_path, events=3) == []
    assert len(waypost_recording_server.requests) == 1


def test_building_a_sink_leaves_the_httpx_logger_as_the_application_set_it(
    tmp_path: Path,
) -> None:
    """The mixpanel SDK's feature-flag modules set httpx's logger to ERROR when imported: in a
    fresh process, building the sink (which imports the SDK) leaves the level alone."""
    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from waypost_mixpanel import MixpanelConfig, MixpanelSink\n"
        "from waypost.sinks import SinkContext\n"
        "logging.getLogger('httpx').setLevel(logging.INFO)\n"
        "context = SinkContext(app='a', version='1', instance_id='i', data_dir=Path(sys.argv[1]))\n"
        "MixpanelSink('m', MixpanelConfig(token='t0ken'), context)\n"
        "assert 'mixpanel' in sys.modules\n"
        "print(logging.getLogger('httpx').level)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(logging.INFO)
