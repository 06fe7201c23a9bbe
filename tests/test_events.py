from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import Field

import waypost
from waypost.events import _UUID7, Event, coerce, dumps, uuid7


def test_uuid7_is_version_7_rfc_variant_and_ordered() -> None:
    make = _UUID7()
    ids = [make() for _ in range(5000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_uuid7_carries_the_millisecond_timestamp() -> None:
    when = 1_732_531_200.123
    u = uuid.UUID(uuid7(when))
    assert u.int >> 80 == int(when * 1000)


def test_uuid7_text_is_the_uuid_text_of_its_value() -> None:
    make = _UUID7()
    for when in (0.0, 1_732_531_200.123, 1_732_531_200.123, 1_000.0, 2**47 / 1000):
        text = make(when)
        assert str(uuid.UUID(text)) == text


def test_uuid7_many_orders_ids_across_calls_and_milliseconds() -> None:
    make = _UUID7()
    start = float(int(time.time()) - 60)
    # 5,000 in one millisecond overflow the 12-bit counter into the next; then later times,
    # a time a little in the past (kept in order), and single calls in between.
    times = [start] * 5000 + [start + 0.0005, start + 0.002, start + 0.0015, start + 1.0]
    ids = [*make.many(times[:2500]), make(times[2500]), *make.many(times[2501:])]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert all(str(u) == i for u, i in zip(parsed, ids, strict=True))
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    millis = [u.int >> 80 for u in parsed]
    assert millis[0] == int(start * 1000) and millis[-1] == int((start + 1.0) * 1000)
    overflow = 0x1000 - (parsed[0].int >> 64 & 0xFFF)  # the counter starts at random
    assert millis[overflow - 1] == millis[0] and millis[overflow] == millis[0] + 1


def test_uuid7_keeps_a_future_time_out_of_the_running_order() -> None:
    make = _UUID7()
    now = time.time()
    before, future, after = make.many([now, now + 10 * 365 * 86400, now + 0.01])
    assert uuid.UUID(future).int >> 80 == int((now + 10 * 365 * 86400) * 1000)
    assert uuid.UUID(after).int >> 80 == int((now + 0.01) * 1000) and before < after


def test_uuid7_keeps_a_backdated_time_without_disturbing_the_order() -> None:
    make = _UUID7()
    now = 1_732_531_200.0
    first, old, second = make.many([now, now - 3600, now])
    assert uuid.UUID(old).int >> 80 == int((now - 3600) * 1000)
    assert first < second and uuid.UUID(second).int >> 80 == int(now * 1000)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_uuid7_in_a_forked_child_differs_from_the_parent() -> None:
    # Same clock reading in both processes: only the random bits can tell the ids apart.
    code = textwrap.dedent(
        """
        import os
        from waypost.events import _UUID7
        make = _UUID7()
        make(1_732_531_200.0)  # the parent's counter and millisecond carry over
        read, write = os.pipe()
        pid = os.fork()
        ids = [make(1_732_531_200.0) for _ in range(50)]
        if pid == 0:
            os.write(write, " ".join(ids).encode())
            os._exit(0)
        os.close(write)
        child = os.read(read, 100_000).decode().split()
        os.waitpid(pid, 0)
        print(" ".join(ids))
        print(" ".join(child))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    parent, child = (line.split() for line in done.stdout.splitlines())
    assert len(parent) == len(child) == 50
    assert [i[:19] for i in parent] == [i[:19] for i in child]  # same millisecond and counter
    assert not set(parent) & set(child)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(json_values)
def test_dumps_is_compact_json_dumps(value: Any) -> None:
    assert dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_dumps_names_what_it_cannot_encode() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"a": [object()]})


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_coerce_documented_types() -> None:
    naive = dt.datetime(2026, 1, 2, 3, 4, 5)
    value = {
        "when": naive,
        "aware": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2026, 1, 2),
        "money": decimal.Decimal("1.50"),
        "whole": decimal.Decimal("3"),
        "id": uuid.UUID(int=1),
        "path": PurePosixPath("/tmp/x"),
        "color": Color.RED,
        "tags": {"b", "a"},
        "pair": (1, 2),
        "point": Point(1, 2),
        "nan": float("nan"),
        1: "int key",
    }
    out = coerce(value)
    assert out["when"] == "2026-01-02T03:04:05Z"
    assert out["aware"] == "2026-01-02T01:04:05Z"
    assert out["day"] == "2026-01-02"
    assert out["money"] == 1.5 and out["whole"] == 3
    assert out["id"] == "00000000-0000-0000-0000-000000000001"
    assert out["path"] == "/tmp/x" and out["color"] == "red"
    assert out["tags"] == ["'a'", "'b'"] or sorted(out["tags"]) == ["a", "b"]
    assert out["pair"] == [1, 2] and out["point"] == {"x": 1, "y": 2}
    assert out["nan"] is None and out["1"] == "int key"
    json.dumps(out)


def test_coerce_refuses_what_it_cannot_serialise() -> None:
    with pytest.raises(TypeError, match="object"):
        coerce({"x": object()})
    with pytest.raises(TypeError, match="bytes"):
        coerce(b"raw")


class RunPayload(waypost.Payload, event="run"):
    run_seconds: int = Field(serialization_alias="runSeconds", description="How long.")
    run_success: bool = Field(serialization_alias="runSuccess")


def test_payload_wire_uses_aliases_and_only_declared_fields() -> None:
    payload = RunPayload(run_seconds=45, run_success=True, secret="x")  # type: ignore[call-arg]
    assert payload.wire() == {"runSeconds": 45, "runSuccess": True}
    assert payload.undeclared() == ["secret"]
    assert RunPayload.__event__ == "run" and RunPayload.__level__ == "usage"


def test_payload_event_name_defaults_to_snake_case() -> None:
    class ComponentBuiltPayload(waypost.Payload):
        name: str

    assert ComponentBuiltPayload.__event__ == "component_built"


def test_payload_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="level"):

        class Bad(waypost.Payload, event="bad", level="verbose"):  # type: ignore[call-arg]
            pass


def test_event_envelope_round_trip() -> None:
    e = Event(
        id=uuid7(),
        name="run",
        time=1_732_531_200.5,
        instance_id="inst",
        properties={"a": 1},
        context={"app": {"name": "x", "version": "1"}},
    )
    data = e.to_dict()
    assert data["timestamp"] == "2024-11-25T10:40:00.500Z"
    assert data["distinct_id"] == "inst"
    back = Event.from_dict(data)
    assert back.time == pytest.approx(e.time) and back.properties == e.properties
    assert e.timestamp.tzinfo is dt.timezone.utc


@given(st.floats(-2_000_000_000, 4_000_000_000, allow_nan=False))
def test_iso_timestamp_is_the_timestamp_to_the_millisecond(when: float) -> None:
    event = Event(id="x", name="e", time=when, instance_id="i", properties={}, context={})
    expected = event.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert event.iso_timestamp == expected


def test_track_takes_a_timestamp_as_seconds_or_datetime(make_telemetry: Any, tmp_path: Any) -> None:
    out = tmp_path / "events.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}})
    tel.track("a", {}, timestamp=1_732_531_200.5)
    tel.track("b", {}, timestamp=dt.datetime(2024, 11, 25, 10, 40, 0, 250_000))  # naive: UTC
    tel.track(
        "c",
        {},
        timestamp=dt.datetime(2024, 11, 25, 11, 40, tzinfo=dt.timezone(dt.timedelta(hours=1))),
    )
    assert tel.flush(5)
    stamps = {e["name"]: e["timestamp"] for e in map(json.loads, out.read_text().splitlines())}
    assert stamps == {
        "a": "2024-11-25T10:40:00.500Z",
        "b": "2024-11-25T10:40:00.250Z",
        "c": "2024-11-25T10:40:00.000Z",
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1732531200", object()])
def test_a_bad_timestamp_raises_in_strict_mode(make_telemetry: Any, bad: Any) -> None:
    with pytest.raises(waypost.TrackError, match="timestamp"):
        make_telemetry().track("a", {}, timestamp=bad)


def test_a_bad_timestamp_is_a_counted_drop_in_production(
    make_telemetry: Any, tmp_path: Any, caplog: Any
) -> None:
    out = tmp_path / "events.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, strict=False)
    tel.track("ok", {"n": 1})
    for bad in (float("nan"), float("-inf"), "yesterday", object()):
        tel.track("bad", {"n": 2}, timestamp=bad)
    tel.track("ok", {"n": 3}, timestamp=1_732_531_200.0)
    assert tel.flush(5)
    assert [json.loads(line)["name"] for line in out.read_text().splitlines()] == ["ok", "ok"]
    assert tel.status().counters.dropped["invalid"] == 4
    assert [r.message for r in caplog.records].count(
        "waypost: event dropped: timestamp nan: must be a finite number of Unix seconds"
    ) == 1
