"""The posthog sink against a loopback server that answers like PostHog's capture service.

Error bodies are the capture service's own plain-text messages (its ``CaptureError``); the
older Django capture answered JSON with a ``detail`` key, which posthog-python unwraps.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from waypost_posthog import MAX_BATCH_BYTES, PosthogConfig, PosthogSink

from waypost.errors import ConfigError
from waypost.events import Event
from waypost.sinks import SinkContext
from waypost.testing import (
    RecordingServer,
    Request,
    Response,
    SinkContract,
    delivery_imports,
    free_port,
    make_event,
    make_events,
    send_batch,
)

KEY = "phc_TestProjectKey0123456789"
OK = {"status": 1}
ERROR_BODIES: dict[int, Any] = {
    400: "event submitted without a distinct_id",
    401: "API key is not valid: personal_api_key",
    408: "request timed out",
    413: "Failed to buffer the request body: length limit exceeded",
    429: "rate limited",
    500: "internal server error",
    503: "transient error, please retry",
}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def posthog_ok(request: Request) -> Response:
    return Response(200, OK)


def posthog_error(status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(status, ERROR_BODIES.get(status, f"status {status}"), headers=headers or {})


def batches(server: RecordingServer) -> list[dict[str, Any]]:
    return [r.json() for r in server.requests if r.path == "/batch/"]


def uuids(server: RecordingServer) -> list[str]:
    return [e["uuid"] for body in batches(server) for e in body["batch"]]


def make_sink(url: str, tmp_path: Path, **settings: Any) -> PosthogSink:
    config = PosthogConfig.model_validate({"api_key": KEY, "host": url, **settings})
    context = SinkContext(
        app="testapp", version="1.0.0", instance_id="5db51f99-c6fb-4340-9c19-78adce58cc1b",
        data_dir=tmp_path, strict=True,
    )  # fmt: skip
    sink = PosthogSink("ph", config, context)
    sink.open()
    return sink


@pytest.fixture
def posthog_server(recording_server: RecordingServer) -> RecordingServer:
    recording_server.responder = posthog_ok
    return recording_server


# --- the contract -------------------------------------------------------------------------------


class TestPosthogContract(SinkContract):
    sink_type = "posthog"
    secret_fields = ("api_key",)
    retry_statuses = (408, 429, 500, 503)

    def config(self, url: str) -> dict[str, Any]:
        return {"api_key": KEY, "host": url}

    def received_ids(self, requests: list[Request]) -> list[str]:
        return [e["uuid"] for r in requests if r.path == "/batch/" for e in r.json()["batch"]]

    def ok_response(self, request: Request) -> Response:
        return Response(200, OK)

    def error_response(self, request: Request, status: int, headers: dict[str, str]) -> Response:
        return posthog_error(status, headers)


# --- config -------------------------------------------------------------------------------------


def test_config_hosts() -> None:
    assert PosthogConfig(api_key=KEY).host == "https://us.i.posthog.com"  # type: ignore[arg-type]
    eu = PosthogConfig.model_validate({"api_key": KEY, "region": "eu"})
    assert eu.host == "https://eu.i.posthog.com"
    own = PosthogConfig.model_validate({"api_key": KEY, "host": "https://ph.example.org/"})
    assert own.host == "https://ph.example.org"
    local = PosthogConfig.model_validate({"api_key": KEY, "host": "http://127.0.0.1:8000"})
    assert local.host == "http://127.0.0.1:8000"
    with pytest.raises(ValidationError, match="plain http"):
        PosthogConfig.model_validate({"api_key": KEY, "host": "http://ph.example.org"})
    trusted = {"api_key": KEY, "host": "http://ph.example.org", "allow_http": True}
    assert PosthogConfig.model_validate(trusted).host == "http://ph.example.org"
    with pytest.raises(ValidationError, match="unknown region"):
        PosthogConfig.model_validate({"api_key": KEY, "region": "mars"})


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({}, "Field required"),
        ({"api_key": ""}, "api_key is empty"),
        ({"api_key": "  \n"}, "api_key is empty"),
        ({"api_key": "phx_personal_secret_key"}, "personal API key"),
    ],
)
def test_config_refuses_a_missing_or_wrong_key(settings: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        PosthogConfig.model_validate(settings)
    messages = " ".join(e["msg"] for e in info.value.errors())
    assert reason in messages  # what waypost's config errors show
    assert "phx_personal_secret_key" not in messages


def test_config_error_names_the_key(make_telemetry: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make_telemetry(sinks={"ph": {"type": "posthog", "api_key": " "}})
    assert "telemetry.sinks.ph.api_key" in str(info.value)
    assert "api_key is empty" in str(info.value)


def test_key_is_trimmed_and_hidden() -> None:
    config = PosthogConfig.model_validate({"api_key": f" {KEY}\n", "gzip": True})
    assert config.api_key.get_secret_value() == KEY
    assert KEY not in repr(config) and KEY not in str(config)


def test_app_host_maps_to_ingestion_host(tmp_path: Path) -> None:
    # posthog-python's own mapping: the app URL people copy from the browser.
    sink = make_sink("https://eu.posthog.com", tmp_path)
    assert sink.endpoint == "https://eu.i.posthog.com/batch/"
    assert sink.destination == "https://eu.i.posthog.com"  # what status and the manifest say
    assert make_sink("https://ph.example.org", tmp_path).endpoint == "https://ph.example.org/batch/"


# --- what goes on the wire ----------------------------------------------------------------------


def test_request_shape(posthog_server: RecordingServer, tmp_path: Path) -> None:
    anonymous = make_events(2)
    identified = make_event("signed_in", {"plan": "pro", "$lib": "spoofed"}, distinct_id="user-42")
    sink = make_sink(posthog_server.url, tmp_path)
    result = send_batch(sink, [*anonymous, identified])
    assert not result.retry and not result.failed

    [request] = posthog_server.requests
    assert request.method == "POST" and request.path == "/batch/"
    assert request.header("Content-Type") == "application/json"
    assert (request.header("User-Agent") or "").startswith("posthog-python/")
    assert request.header("Content-Encoding") is None
    body = request.json()
    assert set(body) == {"api_key", "batch", "historical_migration", "sent_at"}
    assert body["api_key"] == KEY
    assert body["historical_migration"] is False
    assert dt.datetime.fromisoformat(body["sent_at"]).tzinfo is not None

    sent = {e["uuid"]: e for e in body["batch"]}
    assert list(sent) == [e.id for e in [*anonymous, identified]]
    for event in [*anonymous, identified]:
        item = sent[event.id]
        assert set(item) == {"event", "distinct_id", "uuid", "timestamp", "properties"}
        assert item["event"] == event.name
        assert ISO_MS.match(item["timestamp"]) and item["timestamp"] == event.iso_timestamp
        props = item["properties"]
        assert props["$lib"] == "waypost"
        assert props["$lib_version"] == event.context["waypost"]
        assert props["$geoip_disable"] is True
        assert props["$app_name"] == "testapp" and props["$app_version"] == "1.0.0"
        assert props["$python_version"] == event.context["python"]
        assert props["$os"] and "$os_version" in props
        for key, value in event.properties.items():
            if key != "$lib":
                assert props[key] == value

    for event in anonymous:
        assert sent[event.id]["distinct_id"] == event.instance_id
        assert sent[event.id]["properties"]["$process_person_profile"] is False
    user = sent[identified.id]
    assert user["distinct_id"] == "user-42"
    assert "$process_person_profile" not in user["properties"]


def test_render_is_the_body(posthog_server: RecordingServer, tmp_path: Path) -> None:
    sink = make_sink(posthog_server.url, tmp_path)
    events = make_events(3)
    rendered = sink.render(events)
    send_batch(sink, events)
    body = posthog_server.requests[0].json()
    assert rendered["api_key"] == "[redacted]"
    assert KEY not in json.dumps(rendered)
    assert list(rendered) == list(body)
    for key in ("batch", "historical_migration"):
        assert rendered[key] == body[key]
    assert dt.datetime.fromisoformat(rendered["sent_at"]).tzinfo is not None


def test_gzip(posthog_server: RecordingServer, tmp_path: Path) -> None:
    sink = make_sink(posthog_server.url, tmp_path, gzip=True)
    events = make_events(20)
    assert not send_batch(sink, events).retry
    [request] = posthog_server.requests
    assert request.header("Content-Encoding") == "gzip"
    assert request.raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(request.raw))["batch"] == sink.render(events)["batch"]
    assert uuids(posthog_server) == [e.id for e in events]


def test_same_event_twice_keeps_its_uuid(posthog_server: RecordingServer, tmp_path: Path) -> None:
    # A retry after a lost answer resends the same uuid: PostHog counts the event once.
    sink = make_sink(posthog_server.url, tmp_path)
    event = make_event()
    send_batch(sink, [event])
    send_batch(sink, [event])
    assert uuids(posthog_server) == [event.id, event.id]


# --- limits -------------------------------------------------------------------------------------


def test_oversized_event_fails_alone(posthog_server: RecordingServer, tmp_path: Path) -> None:
    small = make_events(2)
    huge = make_event("huge", {"blob": "x" * (901 * 1024)})
    sink = make_sink(posthog_server.url, tmp_path)
    result = send_batch(sink, [small[0], huge, small[1]])
    assert set(result.failed) == {huge.id}
    assert "900 KiB" in result.failed[huge.id]
    assert not result.retry
    assert uuids(posthog_server) == [small[0].id, small[1].id]


def test_only_oversized_events_send_nothing(
    posthog_server: RecordingServer, tmp_path: Path
) -> None:
    huge = make_event("huge", {"blob": "x" * (901 * 1024)})
    result = send_batch(make_sink(posthog_server.url, tmp_path), [huge])
    assert set(result.failed) == {huge.id}
    assert posthog_server.requests == []


def test_batch_over_900_kib_of_small_events_is_one_request(
    posthog_server: RecordingServer, tmp_path: Path
) -> None:
    events = [
        make_event("mid", {"blob": str(i % 10) * 1200}) for i in range(PosthogSink.max_batch_size)
    ]
    sink = make_sink(posthog_server.url, tmp_path)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    assert len(posthog_server.requests) == 1
    assert 900 * 1024 < len(posthog_server.requests[0].body) <= MAX_BATCH_BYTES
    assert uuids(posthog_server) == [e.id for e in events]


def test_batch_over_5_mib_goes_in_several_requests(
    posthog_server: RecordingServer, tmp_path: Path
) -> None:
    events = [make_event("big", {"blob": str(i) * (800 * 1024)}) for i in range(9)]
    sink = make_sink(posthog_server.url, tmp_path)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    assert len(posthog_server.requests) >= 2
    assert all(len(r.body) <= MAX_BATCH_BYTES for r in posthog_server.requests)
    assert sorted(uuids(posthog_server)) == sorted(e.id for e in events)


def test_413_lets_the_core_split(recording_server: RecordingServer, tmp_path: Path) -> None:
    def small_batches_only(request: Request) -> Response:
        return posthog_error(413) if len(request.json()["batch"]) > 3 else Response(200, OK)

    recording_server.responder = small_batches_only
    events = make_events(10)
    result = send_batch(make_sink(recording_server.url, tmp_path), events)
    assert not result.retry and not result.failed
    assert len(recording_server.requests[0].json()["batch"]) == 10
    accepted = [r for r in recording_server.requests if len(r.json()["batch"]) <= 3]
    assert sorted(e["uuid"] for r in accepted for e in r.json()["batch"]) == sorted(
        e.id for e in events
    )


def test_413_on_a_single_event_fails_it(recording_server: RecordingServer, tmp_path: Path) -> None:
    recording_server.responder = lambda r: posthog_error(413)
    event = make_event()
    result = send_batch(make_sink(recording_server.url, tmp_path), [event])
    assert "413" in result.failed[event.id]


def test_failure_after_a_delivered_chunk(recording_server: RecordingServer, tmp_path: Path) -> None:
    # The first request of a batch split by size is delivered; the second is refused for now:
    # only the events of the second are retried, with PostHog's Retry-After.
    recording_server.answer(Response(200, OK), posthog_error(503, {"Retry-After": "4"}))
    events = [make_event("big", {"blob": str(i) * (800 * 1024)}) for i in range(9)]
    result = send_batch(make_sink(recording_server.url, tmp_path), events)
    first = {e["uuid"] for e in recording_server.requests[0].json()["batch"]}
    assert first and set(result.retry) == {e.id for e in events} - first
    assert result.retry_after == 4
    assert not result.failed


# --- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401])
def test_permanent_answers(recording_server: RecordingServer, tmp_path: Path, status: int) -> None:
    recording_server.responder = lambda r: posthog_error(status)
    events = make_events(3)
    result = send_batch(make_sink(recording_server.url, tmp_path), events)
    assert set(result.failed) == {e.id for e in events}
    reason = result.failed[events[0].id]
    assert f"HTTP {status}" in reason and ERROR_BODIES[status] in reason
    assert KEY not in reason


def test_json_error_detail(recording_server: RecordingServer, tmp_path: Path) -> None:
    detail = (
        "Project API key invalid. You can find your project API key in PostHog project settings."
    )
    body = {"type": "authentication_error", "code": "invalid_api_key", "detail": detail}
    recording_server.responder = lambda r: Response(401, body)
    event = make_event()
    result = send_batch(make_sink(recording_server.url, tmp_path), [event])
    assert detail in result.failed[event.id]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_answers(recording_server: RecordingServer, tmp_path: Path, status: int) -> None:
    recording_server.responder = lambda r: posthog_error(status, {"Retry-After": "12"})
    events = make_events(2)
    result = send_batch(make_sink(recording_server.url, tmp_path), events)
    assert set(result.retry) == {e.id for e in events} and not result.failed
    assert result.retry_after == 12


def test_retry_after_as_a_date(recording_server: RecordingServer, tmp_path: Path) -> None:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    header = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    recording_server.responder = lambda r: posthog_error(503, {"Retry-After": header})
    result = send_batch(make_sink(recording_server.url, tmp_path), make_events(1))
    assert result.retry_after is not None and 60 < result.retry_after <= 121


@pytest.mark.parametrize("status", [201, 202, 204])
def test_only_200_is_success(
    recording_server: RecordingServer, tmp_path: Path, status: int
) -> None:
    recording_server.responder = lambda r: Response(status, OK if status != 204 else b"")
    events = make_events(2)
    result = send_batch(make_sink(recording_server.url, tmp_path), events)
    assert set(result.retry) == {e.id for e in events}
    assert f"HTTP {status}" in result.retry[events[0].id]


def test_connection_reset_is_retryable(recording_server: RecordingServer, tmp_path: Path) -> None:
    recording_server.responder = lambda r: Response(reset=True)
    events = make_events(2)
    result = send_batch(make_sink(recording_server.url, tmp_path), events)
    assert set(result.retry) == {e.id for e in events}
    assert len(recording_server.requests) == 1  # the sink itself never retries


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_its_own_connections(
    posthog_server: RecordingServer, tmp_path: Path
) -> None:
    sink = make_sink(posthog_server.url, tmp_path)
    assert not send_batch(sink, make_events(1)).retry  # the parent now holds a pooled connection
    parent_session = sink._http()
    pid = os.fork()
    if pid == 0:  # the child: a gunicorn or celery worker
        code = 1
        try:
            fresh = sink._http() is not parent_session
            delivered = not send_batch(sink, make_events(1)).retry
            code = 0 if fresh and delivered else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not send_batch(sink, make_events(1)).retry  # and the parent's still work
    assert len(posthog_server.requests) == 3
    assert sink._http() is parent_session


# --- test-sink ----------------------------------------------------------------------------------


def test_test_request(posthog_server: RecordingServer, tmp_path: Path) -> None:
    sink = make_sink(posthog_server.url, tmp_path)
    event = make_event("waypost_test")
    answer = sink.test_request(event)
    assert answer["delivered"] is True
    assert answer["status"] == 200 and answer["answer"] == OK
    assert answer["url"] == f"{posthog_server.url}/batch/"
    assert uuids(posthog_server) == [event.id]


def test_test_request_shows_the_refusal(recording_server: RecordingServer, tmp_path: Path) -> None:
    recording_server.responder = lambda r: posthog_error(401)
    answer = make_sink(recording_server.url, tmp_path).test_request(make_event())
    assert answer["delivered"] is False and answer["retryable"] is False
    assert ERROR_BODIES[401] in answer["reason"]


# --- end to end ---------------------------------------------------------------------------------


def test_burst_arrives_exactly_once(posthog_server: RecordingServer, make_telemetry: Any) -> None:
    tel = make_telemetry(
        sinks={"ph": {"type": "posthog", "api_key": KEY, "host": posthog_server.url}}
    )
    for i in range(2000):
        tel.track("burst", {"i": i})
    assert tel.flush(timeout=60)
    sent = [e for body in batches(posthog_server) for e in body["batch"]]
    assert len(sent) == 2000 and len({e["uuid"] for e in sent}) == 2000
    assert sorted(e["properties"]["i"] for e in sent) == list(range(2000))
    assert all(len(body["batch"]) <= PosthogSink.max_batch_size for body in batches(posthog_server))
    assert tel.status().sinks[0].delivered == 2000


def test_retry_after_503_end_to_end(recording_server: RecordingServer, make_telemetry: Any) -> None:
    recording_server.responder = posthog_ok
    recording_server.answer(posthog_error(503, {"Retry-After": "1"}))
    tel = make_telemetry(
        sinks={"ph": {"type": "posthog", "api_key": KEY, "host": recording_server.url}}
    )
    for i in range(10):
        tel.track("after_503", {"i": i})
    assert tel.flush(timeout=20)  # stored in the outbox; delivery follows the Retry-After
    assert recording_server.wait_for(lambda requests: len(requests) >= 2, timeout=20)
    first, *later = recording_server.requests
    assert len(first.json()["batch"]) == 10
    delivered = [e["uuid"] for r in later for e in r.json()["batch"]]
    assert sorted(delivered) == sorted(e["uuid"] for e in first.json()["batch"])
    # The core waited at least as long as PostHog asked before trying again.
    assert later[0].at - first.at >= 0.9
    assert tel.flush(timeout=10)
    assert tel.status().sinks[0].delivered == 10


# --- docs ---------------------------------------------------------------------------------------


def test_readme_example_is_what_the_sink_renders(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    documented = json.loads(re.search(r"```json\n(.*?)```", readme, re.DOTALL)[1])  # type: ignore[index]
    context = {
        "app": {"name": "myapp", "version": "1.2.3"},
        "os": {"type": "Linux", "release": "6.8.0", "arch": "x86_64"},
        "python": "3.12.4",
        "waypost": "0.1.0",
    }
    instance = "5db51f99-c6fb-4340-9c19-78adce58cc1b"
    event = Event(
        id="0192f0c6-6f3a-7b21-9c4e-0a1b2c3d4e5f", name="run", time=1730000000.123,
        instance_id=instance, properties={"runSeconds": 45, "runSuccess": True},
        context=context, distinct_id=instance,
    )  # fmt: skip
    rendered = make_sink("https://us.i.posthog.com", tmp_path).render([event])
    rendered["sent_at"] = documented["sent_at"]
    assert json.dumps(rendered, indent=2) == json.dumps(documented, indent=2)


def test_open_and_send_import_nothing(posthog_server: RecordingServer, tmp_path: Path) -> None:
    """``open()``, ``send()`` and ``close()`` run on delivery threads, where an import that a
    ``fork()`` cuts across leaves its lock held in the child: everything is imported when the
    sink is built (requests imported netrc on a session's first request)."""
    settings = {"api_key": KEY, "host": posthog_server.url}
    assert delivery_imports("posthog", settings, tmp_path, events=3) == []
    assert len(posthog_server.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed(
    waypost_recording_server: RecordingServer, tmp_path: Path, status: int
) -> None:
    """posthog-python posts with requests' default, which follows redirects: the project key,
    in the body, would go to a host nobody configured."""
    with RecordingServer(posthog_ok) as elsewhere:
        waypost_recording_server.responder = lambda r: Response(
            status, "", headers={"Location": f"{elsewhere.url}/batch/"}
        )
        sink = make_sink(waypost_recording_server.url, tmp_path)
        events = make_events(2)
        result = send_batch(sink, events)
        sink.close()
        assert elsewhere.requests == []
    assert set(result.failed) == {e.id for e in events}
    assert f"HTTP {status}" in next(iter(result.failed.values()))


def test_a_requests_session_follows_no_redirect_retries_nothing_and_sends_user_info(
    tmp_path: Path,
) -> None:
    """The core's requests session, which this sink's SDK layer runs on (the core alone has no
    requests to test it with)."""
    from waypost.sinks import HttpSinkConfig, Sink, requests_session

    password = "pw-2f8e61c0-never-shown"
    with RecordingServer() as server, RecordingServer() as elsewhere:
        config = HttpSinkConfig(host=f"http://me:{password}@127.0.0.1:{server.port}")
        context = SinkContext(app="Session Test", version="1.0", instance_id="i", data_dir=tmp_path)
        sink = Sink("s", config, context)
        session = requests_session(sink)
        server.answer(Response(307, "", headers={"Location": f"{elsewhere.url}/x"}))
        answer = session.post(f"{server.url}/in", data=b"{}")
        assert answer.status_code == 307 and elsewhere.requests == []
        assert server.requests[0].header("Authorization") == f"Basic {basic(password)}"
        server.answer(Response(503, "busy"))
        assert session.post(f"{server.url}/in").status_code == 503
        assert len(server.requests) == 2  # answered once: no retry of its own
        port = free_port()
        with pytest.raises(Exception, match="Connection"):
            session.post(f"http://127.0.0.1:{port}/in", timeout=2)
        session.close()


def basic(password: str) -> str:
    import base64

    return base64.b64encode(f"me:{password}".encode()).decode()
