"""Withdrawing consent at run time stops collection and delivery at once; giving it back
starts one pipeline, not a second one."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from waypost.testing import RecordingServer, free_port


def waypost_threads(besides: set[threading.Thread]) -> Counter[str]:
    """waypost's threads, by name, other than ``besides`` (which may end meanwhile)."""
    return Counter(
        t.name for t in threading.enumerate() if t.name.startswith("waypost-") and t not in besides
    )


def test_consent_off_stops_delivery_and_on_resumes_it(urlsink: str, make_telemetry: Any) -> None:
    port = free_port()
    baseline = set(threading.enumerate())  # threads other tests may have left behind
    tel = make_telemetry(sinks={"dest": {"type": "urltest", "url": f"http://127.0.0.1:{port}/x"}})
    ours = {"waypost-worker": 1, "waypost-storer": 1, "waypost-sink-dest": 1}
    assert waypost_threads(baseline) == ours
    for i in range(20):
        tel.track("held", {"i": i})
    assert tel.flush(5)
    decision = tel.set_consent(False)
    assert not decision.enabled and decision.rule == "admin" and not tel.enabled
    tel.track("ignored")
    with RecordingServer(port=port) as server:
        time.sleep(1.5)
        assert server.requests == []  # nothing leaves while consent is withdrawn
        assert tel.status().outbox_pending_events == 20
        assert not waypost_threads(baseline)  # the worker and the runner have stopped
        decision = tel.set_consent(True)
        assert decision.enabled and tel.enabled
        assert tel.flush(10, force=True)
        ids = {e["id"] for r in server.requests for e in r.json()}
        names = {e["name"] for r in server.requests for e in r.json()}
    assert len(ids) == 20 and names == {"held"}
    assert waypost_threads(baseline) == ours  # one worker and one runner, not two of each


def test_flush_force_closes_an_open_circuit(urlsink: str, make_telemetry: Any) -> None:
    port = free_port()
    tel = make_telemetry(
        sinks={"dest": {"type": "urltest", "url": f"http://127.0.0.1:{port}/x", "timeout": 1}},
        config={"retry": {"initial": 60, "maximum": 60, "breaker_threshold": 1}},
    )
    tel.track("x")
    tel.flush(5)
    assert tel.status().sinks[0].state == "circuit_open"
    with RecordingServer(port=port) as server:
        assert tel.flush(10, force=True)
        assert len(server.requests) == 1
    assert tel.status().outbox_pending_events == 0
