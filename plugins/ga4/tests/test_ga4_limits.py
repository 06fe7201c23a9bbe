"""GA4's documented limits: names normalised or refused, values cut, extras left out, old
events refused; checked on the wire against the Measurement Protocol peer."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from waypost_ga4 import limits

from waypost.testing import make_event, send_batch


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("component-run", "component_run"),
        ("flow.build", "flow_build"),
        ("Flow Started", "Flow_Started"),
        ("run", "run"),
        ("a" * 40, "a" * 40),
    ],
)
def test_event_names_normalised_where_safe(raw: str, name: str) -> None:
    assert limits.event_name(raw) == name


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("2fa_enabled", "must start with a letter"),
        ("_internal", "must start with a letter"),
        ("-run", "must start with a letter"),
        ("", "must start with a letter"),
        ("session_start", "reserved by GA4"),
        ("first_visit", "reserved by GA4"),
        ("first_open", "reserved by GA4"),
        ("page_view", "reserved by GA4"),
        ("user_engagement", "reserved by GA4"),
        ("click", "reserved by GA4"),
        ("error", "reserved by GA4"),
        ("scroll", "reserved by GA4"),
        ("app_remove", "reserved by GA4"),
        ("in_app_purchase", "reserved by GA4"),
        ("ad_click", "prefix 'ad_'"),
        ("ad_whatever", "prefix 'ad_'"),
        ("firebase_thing", "prefix 'firebase_'"),
        ("ga_run", "prefix 'ga_'"),
        ("google_run", "prefix 'google_'"),
        ("gtag.run", "prefix 'gtag.'"),
        ("a" * 41, "GA4 allows 40"),
    ],
)
def test_event_names_refused_where_not(raw: str, reason: str) -> None:
    with pytest.raises(limits.Refused, match=reason.replace(".", r"\.")):
        limits.event_name(raw)


def test_refused_events_fail_with_reason_and_the_rest_are_sent(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    good = [make_event("component-run"), make_event("flow.build"), make_event("run")]
    bad = [
        make_event("session_start"),
        make_event("9lives"),
        make_event("ad_click"),
        make_event("x" * 41),
    ]
    result = send_batch(sink, [bad[0], good[0], bad[1], good[1], bad[2], good[2], bad[3]])
    assert set(result.failed) == {e.id for e in bad}
    assert all(reason.startswith("GA4 limits: event name") for reason in result.failed.values())
    assert not result.retry
    (request,) = server.requests
    events = request.json()["events"]
    assert [e["name"] for e in events] == ["component_run", "flow_build", "run"]
    assert [e["params"]["event_id"] for e in events] == [e.id for e in good]
    assert peer.problems == []


def test_param_names_normalised_and_nested_values_flattened(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    props = {
        "run-time": 1.5,
        "flow.id": "f1",
        "nodes": {"count": 3, "types": {"llm": 2}},
        "tags": ["a", "b"],
        "ok": False,
        "missing": None,
        "big": 2**70,
    }
    send_batch(sink, [make_event("run", props)])
    params = server.requests[0].json()["events"][0]["params"]
    assert params == {
        "event_id": params["event_id"],
        "run_time": 1.5,
        "flow_id": "f1",
        "nodes_count": 3,
        "nodes_types_llm": 2,
        "tags": '["a","b"]',
        "ok": "false",
        "big": str(2**70),
    }
    assert peer.problems == []


def test_long_values_are_cut_to_100_characters(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    send_batch(sink, [make_event("run", {"text": "é" * 150, "items": list(range(60))})])
    params = server.requests[0].json()["events"][0]["params"]
    assert params["text"] == "é" * 100
    assert len(params["items"]) == 100 and params["items"].startswith("[0,1,2,")
    assert peer.problems == []


def test_params_over_25_are_left_out_with_a_warning(
    ga4: Any, make_ga4: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    props = {f"p{i:02d}": i for i in range(30)}
    caplog.set_level(logging.WARNING)
    event = make_event("wide", props)
    assert not send_batch(sink, [event, make_event("wide", dict(props))]).failed
    params = server.requests[0].json()["events"][0]["params"]
    assert len(params) == 25
    assert list(params) == ["event_id", *(f"p{i:02d}" for i in range(24))]
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warnings) == 1  # once per sink, not once per event
    assert "6 params over GA4's 25 per event left out: p24, p25" in warnings[0]
    assert peer.problems == []


def test_reserved_and_invalid_param_names_are_left_out(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    props = {
        "session_id": "s",
        "engagement_time_msec": 5,
        "_private": 1,
        "ga_x": 1,
        "firebase_y": 1,
        "google_z": 1,
        "gtag.q": 1,
        "1st": 1,
        "x" * 41: 1,
        "event_id": "mine",
        "fine": 1,
    }
    event = make_event("run", props)
    send_batch(sink, [event])
    params = server.requests[0].json()["events"][0]["params"]
    assert params == {"event_id": event.id, "fine": 1}
    assert peer.problems == []


def test_user_properties_within_limits(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    event = make_event("run")
    event.context["os"]["release"] = "6.8.0-1021-azure-with-a-very-long-build-suffix"
    event.context["runtime_details_for_support"] = "x"  # a name over 24 characters
    send_batch(sink, [event])
    user_props = server.requests[0].json()["user_properties"]
    assert user_props["os_release"] == {"value": "6.8.0-1021-azure-with-a-very-long-bu"}
    assert "runtime_details_for_support" not in user_props
    assert all(len(name) <= 24 for name in user_props)
    assert peer.problems == []


def test_timestamps_backdated_within_72_hours(ga4: Any, make_ga4: Any) -> None:
    server, peer = ga4
    sink = make_ga4(server.url)
    now = time.time()
    recent = make_event("run", time_=now - 71 * 3600)
    ahead = make_event("run", time_=now + 600)  # a clock running ahead
    old = make_event("run", time_=now - 73 * 3600)
    result = send_batch(sink, [recent, ahead, old])
    assert list(result.failed) == [old.id]
    assert "73 hours old" in result.failed[old.id] and "72 hours" in result.failed[old.id]
    body = server.requests[0].json()
    stamps = [e["timestamp_micros"] for e in body["events"]]
    assert stamps[0] == int(recent.time * 1_000_000)
    assert int(now * 1e6) <= stamps[1] <= int(time.time() * 1e6)
    assert body["timestamp_micros"] == stamps[0]
    assert peer.problems == []
