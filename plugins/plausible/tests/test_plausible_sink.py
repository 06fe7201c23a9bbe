"""The deprecated ``plausible`` sink against a loopback server that answers like Plausible's
Events API: 202 ``{}``, 202 with ``x-plausible-dropped``, 400 ``{"errors": ...}``, 429/5xx."""

from __future__ import annotations

import importlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

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

pytestmark = pytest.mark.filterwarnings("ignore:the plausible sink:DeprecationWarning")

with warnings.catch_warnings():  # checked on its own below, by a fresh import
    warnings.simplefilter("ignore", DeprecationWarning)
    import waypost_plausible
    from waypost_plausible import PlausibleConfig, PlausibleSink, plausible_props


def settle(tel: Any, done: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """The sinks' status by name once ``done`` holds of it, flushing until then. ``flush()`` is
    true once nothing is left only in memory: on a busy machine a request cut off by the sink's
    timeout leaves its events in the outbox, delivered by a later pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert tel.flush(timeout=5)
        by_name = {s.name: s for s in tel.status().sinks}
        if done(by_name):
            return by_name
        assert time.monotonic() < deadline, by_name


def plausible(request: Request) -> Response:
    """What Plausible's /api/event answers (validation as its ingestion code does it)."""
    if request.method != "POST" or request.path != "/api/event":
        return Response(404, "Not Found")
    body = request.json()
    errors: dict[str, list[str]] = {}
    if not body.get("url"):
        errors["url"] = ["is required"]
    if not body.get("domain"):
        errors["domain"] = ["can't be blank"]
    if not body.get("name"):
        errors["event_name"] = ["can't be blank"]
    if errors:
        return Response(400, {"errors": errors})
    if body["domain"] != "example.org":  # not a site of this Plausible: dropped, still 202
        return Response(202, {}, headers={"x-plausible-dropped": "1"})
    return Response(202, {})


def names(requests: list[Request]) -> list[str]:
    return [r.json()["props"]["n"] for r in requests]


class TestPlausibleContract(SinkContract):
    sink_type = "plausible"
    retry_statuses = (429, 500, 503)

    def config(self, url: str) -> dict[str, Any]:
        return {"domain": "example.org", "host": url}

    def ok_response(self, request: Request) -> Response:
        return plausible(request)

    def received_ids(self, requests: list[Request]) -> list[str]:
        # Plausible has no event ids: the sink's tests send the id as a property.
        return [r.json()["props"]["event_id"] for r in requests]

    def test_contract_delivers_a_batch(
        self, recording_server: RecordingServer, tmp_path: Path
    ) -> None:
        self._serve_ok(recording_server, self)
        sink = self.make_sink(recording_server.url, tmp_path)
        sink.open()
        try:
            events = make_events(5)
            for event in events:
                event.properties["event_id"] = event.id
            result = send_batch(sink, events)
            assert not result.retry and not result.failed, result
            assert sorted(self.received_ids(recording_server.requests)) == sorted(
                e.id for e in events
            )
        finally:
            sink.close()

    def test_contract_end_to_end(
        self, recording_server: RecordingServer, make_telemetry: Any
    ) -> None:
        self._serve_ok(recording_server, self)
        tel = make_telemetry(
            sinks={"dest": {"type": self.sink_type, **self.config(recording_server.url)}}
        )
        for i in range(25):
            tel.track("contract_event", {"i": i})
        settle(tel, lambda s: s["dest"].delivered == 25)
        received = {r.json()["props"]["i"] for r in recording_server.requests}
        assert received == set(range(25))


@pytest.fixture
def sink(recording_server: RecordingServer, tmp_path: Path) -> Any:
    recording_server.responder = plausible
    config = PlausibleConfig(domain="example.org", host=recording_server.url)
    context = SinkContext(
        app="FlowForge", version="0.8.2", instance_id="inst-1", data_dir=tmp_path, strict=True
    )
    made = PlausibleSink("plausible", config, context)
    made.open()
    yield made
    made.close()


# --- deprecation --------------------------------------------------------------------------------


def test_importing_warns_and_names_the_replacement() -> None:
    saved = sys.modules.pop("waypost_plausible")
    try:
        with pytest.warns(DeprecationWarning, match=r"posthog.*") as caught:
            importlib.import_module("waypost_plausible")
        assert "removed in waypost 1.0" in str(caught[0].message)
    finally:
        sys.modules["waypost_plausible"] = saved


def test_sink_class_is_marked_deprecated() -> None:
    assert PlausibleSink.deprecated and "posthog" in PlausibleSink.deprecated


def test_plugin_listing_marks_it_deprecated() -> None:
    manager = PluginManager()
    saved = sys.modules.pop("waypost_plausible")
    try:
        with pytest.warns(DeprecationWarning):
            manager.load_sink_type("plausible")
        info = manager.info("plausible").as_dict()
    finally:
        sys.modules["waypost_plausible"] = saved
    assert info["deprecated"] is True and "posthog" in info["deprecation"]


# --- config -------------------------------------------------------------------------------------


def test_config() -> None:
    config = PlausibleConfig(domain="example.org")
    assert config.base_url == "https://plausible.io"
    assert config.url_template == "app://{app}/{event}"
    with pytest.raises(ValidationError, match="domain"):
        PlausibleConfig.model_validate({})
    with pytest.raises(ValidationError, match="unknown field"):
        PlausibleConfig(domain="example.org", url_template="app://{app}/{user}")
    with pytest.raises(ValidationError, match="scheme"):
        PlausibleConfig(domain="example.org", url_template="{app}/{event}")
    with pytest.raises(ValidationError, match="allow_http"):
        PlausibleConfig(domain="example.org", host="http://plausible.example.org")
    assert PlausibleConfig(domain="x", host="https://stats.example.org/").base_url == (
        "https://stats.example.org"
    )


# --- request shape ------------------------------------------------------------------------------


def test_request_shape_and_headers(recording_server: RecordingServer, sink: Any) -> None:
    events = [make_event("run", {"runSeconds": 45, "runSuccess": True, "mode": "local"})]
    result = send_batch(sink, events)
    assert not result.retry and not result.failed and not result.dropped_by_destination
    (request,) = recording_server.requests
    assert request.method == "POST" and request.path == "/api/event"
    assert request.header("Content-Type") == "application/json"
    agent = request.header("User-Agent") or ""
    assert agent.startswith("FlowForge/0.8.2 waypost/")
    for word in ("bot", "crawl", "spider", "python", "httpx", "headless"):
        assert word not in agent.lower()
    assert request.header("X-Forwarded-For") is None
    assert request.header("X-Real-IP") is None
    assert request.json() == {
        "name": "run",
        "url": "app://FlowForge/run",
        "domain": "example.org",
        "props": {"runSeconds": 45, "runSuccess": True, "mode": "local"},
    }


def test_one_request_per_event(recording_server: RecordingServer, sink: Any) -> None:
    events = make_events(7)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed
    assert names(recording_server.requests) == list(range(7))


def test_url_template_fields(recording_server: RecordingServer, tmp_path: Path) -> None:
    recording_server.responder = plausible
    config = PlausibleConfig(
        domain="example.org",
        host=recording_server.url,
        url_template="https://app.example.org/{app}/{version}/{event}?i={instance}",
    )
    context = SinkContext(app="My App", version="1.0", instance_id="x", data_dir=tmp_path)
    sink = PlausibleSink("p", config, context)
    event = make_event("flow run", instance_id="inst-9")
    assert sink.render([event])[0]["url"] == (
        "https://app.example.org/My%20App/1.0/flow%20run?i=inst-9"
    )


def test_props_limits() -> None:
    props = {f"k{i:02d}": i for i in range(40)}
    assert list(plausible_props(props)) == [f"k{i:02d}" for i in range(30)]
    long_key = "k" * 301
    cut = plausible_props(
        {
            long_key: 1,
            "none": None,
            "blank": "  ",
            "text": "é" * 1500,  # 3,000 bytes
            "list": [1, 2, {"a": True}],
            "huge": ["x" * 3000],
            "flag": False,
            "ratio": 0.5,
        }
    )
    assert long_key not in cut and "none" not in cut and "blank" not in cut and "huge" not in cut
    assert cut["text"] == "é" * 1000 and len(str(cut["text"]).encode()) == 2000
    assert cut["list"] == '[1,2,{"a":true}]'
    assert cut["flag"] is False and cut["ratio"] == 0.5


def test_overlong_events_are_refused_locally(recording_server: RecordingServer, sink: Any) -> None:
    events = [make_event("x" * 121), make_event("ok")]
    result = send_batch(sink, events)
    assert "longer than 120" in result.failed[events[0].id]
    assert events[1].id not in result.failed
    assert len(recording_server.requests) == 1


# --- answers ------------------------------------------------------------------------------------


def test_dropped_header_counts_as_a_drop(recording_server: RecordingServer, sink: Any) -> None:
    recording_server.answer(Response(202, {}, headers={"x-plausible-dropped": "1"}))
    events = make_events(2)
    result = send_batch(sink, events)
    assert set(result.dropped_by_destination) == {events[0].id}
    assert "x-plausible-dropped" in result.dropped_by_destination[events[0].id]
    assert not result.failed and not result.retry


def test_400_is_permanent_with_the_errors(recording_server: RecordingServer, sink: Any) -> None:
    recording_server.answer(
        Response(400, {"errors": {"props": ["keys should have at most 300 bytes"]}})
    )
    events = make_events(3)
    result = send_batch(sink, events)
    assert set(result.failed) == {events[0].id}
    assert "props: keys should have at most 300 bytes" in result.failed[events[0].id]
    assert len(recording_server.requests) == 3  # the other events went on


def test_429_retries_the_rest_without_hammering(
    recording_server: RecordingServer, sink: Any
) -> None:
    recording_server.answer(
        Response(202, {}), Response(429, "Too Many Requests", headers={"Retry-After": "60"})
    )
    events = make_events(5)
    result = send_batch(sink, events)
    assert events[0].id not in result.retry
    assert set(result.retry) == {e.id for e in events[1:]}
    assert result.retry_after == 60
    assert len(recording_server.requests) == 2


def test_5xx_and_unreachable_are_retryable(recording_server: RecordingServer, sink: Any) -> None:
    recording_server.answer(Response(502, "Bad Gateway"))
    result = send_batch(sink, make_events(2))
    assert len(result.retry) == 2 and "HTTP 502" in next(iter(result.retry.values()))
    recording_server.answer(Response(reset=True))
    result = send_batch(sink, make_events(2))
    assert len(result.retry) == 2


def test_404_fails_the_batch(recording_server: RecordingServer, tmp_path: Path) -> None:
    recording_server.responder = plausible
    config = PlausibleConfig(domain="example.org", host=f"{recording_server.url}/wrong")
    context = SinkContext(app="a", version="1", instance_id="x", data_dir=tmp_path)
    sink = PlausibleSink("p", config, context)
    sink.open()
    try:
        result = send_batch(sink, make_events(3))
    finally:
        sink.close()
    assert len(result.failed) == 3 and "HTTP 404" in next(iter(result.failed.values()))
    assert len(recording_server.requests) == 1


def test_test_request(recording_server: RecordingServer, sink: Any) -> None:
    answer = sink.test_request(make_event("ping"))
    assert answer["delivered"] is True and answer["status"] == 202
    recording_server.answer(Response(202, {}, headers={"x-plausible-dropped": "1"}))
    answer = sink.test_request(make_event("ping"))
    assert answer["delivered"] is False and "x-plausible-dropped" in answer["dropped"]


def test_end_to_end_drops_are_counted(
    recording_server: RecordingServer, make_telemetry: Any
) -> None:
    recording_server.responder = plausible
    tel = make_telemetry(
        sinks={
            "good": {"type": "plausible", "domain": "example.org", "host": recording_server.url},
            "unknown": {"type": "plausible", "domain": "other.org", "host": recording_server.url},
        }
    )
    for i in range(10):
        tel.track("heartbeat", {"i": i, "nested": {"a": 1}})
    by_name = settle(tel, lambda s: s["good"].delivered + s["unknown"].dropped_by_destination == 20)
    assert by_name["good"].delivered == 10 and by_name["good"].failed == 0
    assert by_name["unknown"].dropped_by_destination == 10 and by_name["unknown"].delivered == 0
    bodies = [r.json() for r in recording_server.requests]
    # Every event arrived (once per sink, or again after a request cut off by the sink's timeout
    # on a busy machine: Plausible has no event ids to deduplicate).
    good = {b["props"]["i"] for b in bodies if b["domain"] == "example.org"}
    other = {b["props"]["i"] for b in bodies if b["domain"] == "other.org"}
    assert good == other == set(range(10))
    assert all(json.loads(b["props"]["nested"]) == {"a": 1} for b in bodies)
    assert waypost_plausible.PlausibleSink.deprecated


def test_plugin_listing_marks_it_deprecated_when_already_imported() -> None:
    manager = PluginManager()
    manager.load_sink_type("plausible")  # no fresh import, so no warning: the class says it
    info = manager.info("plausible").as_dict()
    assert info["deprecated"] is True and "posthog" in info["deprecation"]


def test_open_and_send_import_nothing(
    waypost_recording_server: RecordingServer, tmp_path: Path
) -> None:
    """``open()``, ``send()`` and ``close()`` run on delivery threads, where an import that a
    ``fork()`` cuts across leaves its lock held in the child: everything is imported when the
    sink is built."""
    waypost_recording_server.responder = plausible
    settings = {"domain": "example.org", "host": waypost_recording_server.url}
    assert delivery_imports("plausible", settings, tmp_path, events=3) == []
    assert len(waypost_recording_server.requests) == 3  # one request per event
