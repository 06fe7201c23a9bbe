"""The guide's tests as docs/writing-a-plugin.md spelled them in waypost 0.1 (old fixture
names, the HTTP-shaped contract API): kept verbatim to prove such suites still pass."""

from __future__ import annotations

from typing import Any

from waypost.testing import (
    RecordingServer,
    Request,
    Response,
    SinkContract,
    make_events,
    send_batch,
)


class TestAcmeContract(SinkContract):
    sink_type = "acme"
    secret_fields = ("api_key",)

    def config(self, url: str) -> dict[str, Any]:
        return {"api_key": "acme-test-key-123", "host": url}

    def received_ids(self, requests: list[Request]) -> list[str]:
        return [e["uuid"] for r in requests for e in r.json()["events"]]

    def ok_response(self, request: Request) -> Response:
        return Response(200, {"accepted": len(request.json()["events"]), "errors": []})


def test_per_event_errors_fail_those_events(
    recording_server: RecordingServer, tmp_path: Any
) -> None:
    recording_server.answer(Response(200, {"errors": [{"index": 1, "message": "bad name"}]}))
    sink = TestAcmeContract().make_sink(recording_server.url, tmp_path)
    events = make_events(3)
    result = send_batch(sink, events)
    assert list(result.failed) == [events[1].id] and "bad name" in result.failed[events[1].id]
    sink.close()


def test_delivers_from_config(recording_server: RecordingServer, make_telemetry: Any) -> None:
    recording_server.responder = lambda r: Response(200, {"errors": []})
    tel = make_telemetry(sinks={"acme": {"api_key": "k-123456", "host": recording_server.url}})
    tel.track("signup", {"plan": "pro"})
    assert tel.flush(timeout=10)
    (request,) = recording_server.requests
    assert request.path == "/v1/batch"
    assert request.header("Authorization") == "Bearer k-123456"
    assert request.json()["events"][0]["properties"] == {"plan": "pro"}
