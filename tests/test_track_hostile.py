"""Hostile input to ``track()`` and hostile plugins: strict mode raises a TrackError or a
PluginError naming the cause; production counts a drop (or leaves the part off) with one log
line, never an exception, a retry loop or a forged log line."""

from __future__ import annotations

import collections.abc
import datetime as dt
import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

import waypost
from waypost.events import NAME_MAX, Event, name_problem, normalise_name
from waypost.privacy import Rule
from waypost.status import Counters

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class RunPayload(waypost.Payload, event="hostile_run"):
    run_seconds: int = Field(serialization_alias="runSeconds")


class RaisingItems(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise RuntimeError("items() failed\nFORGED LINE")


class RaisingIter(collections.abc.Mapping):  # type: ignore[type-arg]
    def __getitem__(self, key: Any) -> Any:
        raise KeyError(key)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("iteration failed")


class BadTz(dt.tzinfo):
    def utcoffset(self, d: Any) -> dt.timedelta:
        raise RuntimeError("no offset")


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __str__(self) -> str:
        raise RuntimeError("no str")


DEEP: Any = 1
for _ in range(40):
    DEEP = [DEEP]


def now() -> float:
    return time.time()


# Each: (label, args, keyword arguments, words the strict error must hold).
HOSTILE: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("distinct_id int", ("ok", {}), {"distinct_id": 123}, "distinct_id must be a string"),
    ("distinct_id newline", ("ok", {}), {"distinct_id": "a\nb"}, "distinct_id"),
    ("distinct_id long", ("ok", {}), {"distinct_id": "x" * 201}, "distinct_id"),
    ("wrong-typed payload", (RunPayload.model_construct(run_seconds="abc"),), {},
     "RunPayload.run_seconds: expected int, not 'abc'"),
    ("payload changed after", (RunPayload.model_construct(run_seconds=[1]),), {},
     "RunPayload.run_seconds"),
    ("nanoseconds", ("ok", {}), {"timestamp": "ns"}, "nanoseconds? pass seconds"),
    ("milliseconds", ("ok", {}), {"timestamp": "ms"}, "milliseconds? pass seconds"),
    ("1e30", ("ok", {}), {"timestamp": 1e30}, "outside the times accepted"),
    ("-1e30", ("ok", {}), {"timestamp": -1e30}, "outside the times accepted"),
    ("before 2000", ("ok", {}), {"timestamp": dt.datetime(1999, 12, 31)}, "from 2000-01-01"),
    ("two days ahead", ("ok", {}), {"timestamp": "+2d"}, "ahead of now"),
    ("year 1", ("ok", {}), {"timestamp": dt.datetime(1, 1, 1)}, "outside the times accepted"),
    ("nan", ("ok", {}), {"timestamp": math.nan}, "finite"),
    ("bool time", ("ok", {}), {"timestamp": True}, "not bool"),
    ("text time", ("ok", {}), {"timestamp": "1732531200"}, "not str"),
    ("tzinfo raises", ("ok", {}), {"timestamp": dt.datetime(2020, 1, 1, tzinfo=BadTz())},
     "no offset"),
    ("items() raises", ("ok", RaisingItems(a=1)), {}, "properties: RuntimeError: items()"),
    ("iteration raises", ("ok", RaisingIter()), {}, "properties"),
    ("value repr raises", ("ok", {"a": BadRepr()}), {}, "property 'a': TypeError"),
    ("key repr raises", ("ok", {BadRepr(): 1}), {}, "property <BadRepr>"),
    ("lone surrogate", ("ok", {"a": "\ud800"}), {}, "lone surrogate U+D800"),
    ("surrogate key", ("ok", {"\udc00": 1}), {}, "lone surrogate U+DC00"),
    ("deep", ("ok", {"a": DEEP}), {}, "nested deeper than 32"),
    ("bytes value", ("ok", {"a": b"x"}), {}, "bytes is not JSON-serialisable"),
    ("name None", (None, {}), {}, "event name must be a string"),
    ("name bytes", (b"ok", {}), {}, "event name must be a string"),
    ("name repr raises", (BadRepr(), {}), {}, "event name must be a string"),
    ("name empty", ("", {}), {}, "is empty"),
    ("name long", ("x" * (NAME_MAX + 1), {}), {}, "longer than 200"),
    ("name newline", ("run\nFORGED", {}), {}, "U+000A"),
    ("name NUL", ("a\0b", {}), {}, "U+0000"),
    ("name escape", ("\x1b[31mred", {}), {}, "U+001B"),
    ("name bidi", ("\u202eevil", {}), {}, "U+202E"),
    ("name spaces", (" run ", {}), {}, "starts or ends with a space"),
    ("level bogus", ("ok", {}), {"level": "bogus"}, "level must be error, usage or all"),
    ("level list", ("ok", {}), {"level": ["x"]}, "level must be"),
    ("properties list", ("ok", [1, 2]), {}, "must be a mapping"),
]  # fmt: skip


def resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    stamp = out.get("timestamp")
    if stamp == "ns":
        out["timestamp"] = now() * 1e9
    elif stamp == "ms":
        out["timestamp"] = now() * 1e3
    elif stamp == "+2d":
        out["timestamp"] = now() + 2 * 86400
    return out


@pytest.mark.parametrize(("label", "args", "kwargs", "words"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_strict_mode_refuses_with_a_track_error_naming_the_field(
    waypost_make_telemetry: Callable[..., Any], label: str, args: Any, kwargs: Any, words: str
) -> None:
    tel = waypost_make_telemetry(strict=True)
    with pytest.raises(waypost.TrackError) as info:
        tel.track(*args, **resolve(kwargs))
    assert words in str(info.value)
    assert "\n" not in str(info.value) or label == "items() raises"


def test_production_counts_each_hostile_input_as_one_drop_and_logs_no_forged_line(
    waypost_make_telemetry: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(sinks={"jsonl": {"path": str(out)}}, strict=False)
    caplog.set_level(logging.INFO, logger="waypost")
    refused = [h for h in HOSTILE if not h[0].startswith("name ") or h[0] in _REFUSED_NAMES]
    for _, args, kwargs, _ in HOSTILE:
        tel.track(*args, **resolve(kwargs))  # never raises
    tel.track("ok", {"n": 1})
    assert tel.flush(10)
    status = tel.status()
    sent = [json.loads(line) for line in out.read_text().splitlines()]
    normalised = sorted(e["name"] for e in sent if e["name"] != "ok")
    assert normalised == ["[31mred", "a_b", "evil", "run", "run_FORGED"]
    # Past telemetry.limits (nested deeper than limits.depth): refused as too large.
    too_large = [h for h in refused if h[0] in _TOO_LARGE]
    assert status.counters.dropped == {
        "invalid": len(refused) - len(too_large),
        "too_large": len(too_large),
    }
    assert status.counters.delivered == len(sent) == 1 + len(normalised)
    assert status.sinks[0].retried == 0 and status.outbox_pending_events == 0
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage()
    assert "FORGED LINE" not in caplog.text.replace("\\nFORGED LINE", "")


_TOO_LARGE = {"deep"}
_REFUSED_NAMES = {"name None", "name bytes", "name repr raises", "name empty", "name long"}


def test_normalised_names_carry_a_remark(
    waypost_make_telemetry: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Event] = []

    class Spy:
        @waypost.hookimpl
        def waypost_before_send(self, event: Event) -> None:
            seen.append(event)

    tel = waypost_make_telemetry(strict=False, plugins=[Spy()])
    tel.track("page\nview", {})
    tel.track("page\nview", {})
    tel.track("fine", {})
    assert tel.flush(5)
    assert [(e.name, e.remarks) for e in seen] == [
        ("page_view", ["normalised@name"]),
        ("page_view", ["normalised@name"]),
        ("fine", []),
    ]
    assert caplog.text.count("normalised to 'page_view'") == 1  # once, not per event


def test_the_log_sink_cannot_be_made_to_forge_lines(
    waypost_make_telemetry: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    tel = waypost_make_telemetry(sinks={"log": {}}, strict=False)
    caplog.set_level(logging.INFO, logger="waypost.telemetry")
    tel.track("run\n[TELEMETRY] Endpoint: forged", {"note": "a\nb"})
    tel.track("\u2028[TELEMETRY] Endpoint: forged2", {})
    assert tel.flush(5)
    lines = [r.getMessage() for r in caplog.records]
    endpoints = [line for line in lines if line.startswith("[TELEMETRY] Endpoint:")]
    assert endpoints == [
        "[TELEMETRY] Endpoint: run_[TELEMETRY] Endpoint: forged",
        "[TELEMETRY] Endpoint: [TELEMETRY] Endpoint: forged2",
    ]
    for record in caplog.records:
        message = record.getMessage()
        assert message.isprintable() or "\\n" in message, message


def test_timestamps_go_out_as_rfc3339_in_the_accepted_range(
    waypost_make_telemetry: Callable[..., Any], tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(sinks={"jsonl": {"path": str(out)}})
    start = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    tel.track("a", {}, timestamp=start)
    tel.track("b", {}, timestamp=now() + 86_000)
    tel.track("c", {}, timestamp=dt.datetime(2024, 2, 29, 23, 59, 59, 999_999))
    assert tel.flush(5)
    stamps = [json.loads(line)["timestamp"] for line in out.read_text().splitlines()]
    assert all(RFC3339.match(s) for s in stamps)
    assert stamps[0] == "2000-01-01T00:00:00.000Z" and stamps[2] == "2024-02-29T23:59:59.999Z"


def test_backfill_older_events_with_timestamps_earliest(
    waypost_make_telemetry: Callable[..., Any], tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(
        sinks={"jsonl": {"path": str(out)}}, config={"timestamps": {"earliest": "1970-01-01"}}
    )
    tel.track("old", {}, timestamp=0)
    tel.track("older", {}, timestamp=dt.datetime(1985, 10, 26, 1, 21))
    with pytest.raises(waypost.TrackError, match="from 1970-01-01"):
        tel.track("too old", {}, timestamp=-1)
    assert tel.flush(5)
    stamps = [json.loads(line)["timestamp"] for line in out.read_text().splitlines()]
    assert stamps == ["1970-01-01T00:00:00.000Z", "1985-10-26T01:21:00.000Z"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"earliest": "1969-12-31"}, "must be 1970-01-01 or later"),
        ({"earliest": "9999-01-01"}, "before the year 9000"),
        ({"ahead": "400d"}, "less than or equal to"),
        ({"earliest": "yesterday"}, "telemetry.timestamps.earliest"),
    ],
)
def test_the_accepted_range_is_checked_when_configured(setting: Any, message: str) -> None:
    from waypost import config as cfg

    with pytest.raises(waypost.ConfigError, match=re.escape(message)):
        cfg.load({"telemetry": {"timestamps": setting}}, {})


def test_a_before_send_hook_cannot_send_a_broken_envelope(
    waypost_make_telemetry: Callable[..., Any], tmp_path: Path
) -> None:
    class Breaker:
        @waypost.hookimpl
        def waypost_before_send(self, event: Event) -> None:
            if event.name == "time":
                event.time = 1e30
            elif event.name == "name":
                event.name = "forged\nline"
            elif event.name == "id":
                event.distinct_id = 5  # type: ignore[assignment]

    out = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(sinks={"jsonl": {"path": str(out)}}, strict=False,
                                 plugins=[Breaker()])  # fmt: skip
    for name in ("time", "name", "id", "fine"):
        tel.track(name, {})
    assert tel.flush(5)
    assert [json.loads(line)["name"] for line in out.read_text().splitlines()] == ["fine"]
    assert tel.status().counters.dropped == {"invalid": 3}


# --- plugins that fail ------------------------------------------------------------------------


class ContextRaises:
    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("context failed")


class ContextNotJson:
    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        return {"thing": object()}


class ContextGood:
    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        return {"deployment": "blue"}


class ScrubbersRaise:
    @waypost.hookimpl
    def register_scrubbers(self, register: Callable[[Rule], None]) -> None:
        raise ValueError("scrubbers failed")


class BadPattern:
    @waypost.hookimpl
    def register_scrubbers(self, register: Callable[[Rule], None]) -> None:
        register(Rule("broken", "(unclosed"))


class NotARule:
    @waypost.hookimpl
    def register_scrubbers(self, register: Callable[[Any], None]) -> None:
        register("[0-9]+")


class SinksRaise:
    @waypost.hookimpl
    def register_sinks(self, register: Callable[[type[waypost.Sink]], None]) -> None:
        raise ValueError("sinks failed")


class MisspeltHook:
    @waypost.hookimpl
    def waypost_befor_send(self, event: Event) -> None:
        pass


class DeepRecursion:
    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        def down(n: int) -> int:
            return down(n + 1)

        return {"n": down(0)}


# plugin, whether telemetry still runs (the part left out), words of the reason
PLUGINS: list[tuple[object, bool, str]] = [
    (ContextRaises(), True, "waypost_context raised ValueError: context failed"),
    (ContextNotJson(), True, "context from a waypost_context hook refused: TypeError"),
    (DeepRecursion(), True, "waypost_context raised RecursionError"),
    (SinksRaise(), True, "could not be registered: ValueError: sinks failed"),
    (MisspeltHook(), True, "waypost_befor_send"),
    # Without its scrubbing rules, nothing may leave: telemetry stays off.
    (ScrubbersRaise(), False, "register_scrubbers raised ValueError: scrubbers failed"),
    (BadPattern(), False, "scrubbing rule 'broken' has an invalid pattern"),
    (NotARule(), False, "registered str, not a waypost.privacy.Rule"),
]


@pytest.mark.parametrize(
    ("plugin", "runs", "words"), PLUGINS, ids=[type(p[0]).__name__ for p in PLUGINS]
)
def test_a_failing_plugin_is_reported_not_raised_in_production(
    waypost_make_telemetry: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    plugin: object,
    runs: bool,
    words: str,
) -> None:
    tel = waypost_make_telemetry(strict=False, plugins=[ContextGood(), plugin])
    status = tel.status()
    assert status.running is runs
    label = f"{__name__}.{type(plugin).__name__}"
    assert words in status.plugin_errors[label]
    if runs:
        assert tel.gate.context["deployment"] == "blue"  # the other plugins' parts are there
    else:
        assert status.rule == "error" and words in status.reason
    lines = [r for r in caplog.records if words in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR


@pytest.mark.parametrize(
    ("plugin", "runs", "words"), PLUGINS, ids=[type(p[0]).__name__ for p in PLUGINS]
)
def test_a_failing_plugin_raises_a_plugin_error_in_strict_mode(
    waypost_make_telemetry: Callable[..., Any], plugin: object, runs: bool, words: str
) -> None:
    with pytest.raises(waypost.PluginError, match=re.escape(words)):
        waypost_make_telemetry(strict=True, plugins=[plugin])


def test_a_plugin_module_that_does_not_import_is_reported(
    waypost_make_telemetry: Callable[..., Any],
) -> None:
    tel = waypost_make_telemetry(strict=False, config={"plugins": ["no_such_module_here"]})
    status = tel.status()
    assert status.running
    assert "ModuleNotFoundError" in status.plugin_errors["no_such_module_here"]


def test_a_sink_class_that_is_not_a_sink_is_reported(
    waypost_make_telemetry: Callable[..., Any],
) -> None:
    tel = waypost_make_telemetry(strict=False, sink_classes=[dict])
    assert tel.status().running
    assert "not a waypost.Sink class" in next(iter(tel.status().plugin_errors.values()))
    with pytest.raises(waypost.PluginError):
        waypost_make_telemetry(strict=True, sink_classes=[dict])


class ExplodingSink(waypost.Sink):
    type = "exploding"

    def __init__(self, *args: Any) -> None:
        raise RuntimeError("cannot be made")

    def send(self, events: Any) -> waypost.SendResult:
        return waypost.SendResult.ok()


def test_a_sink_whose_constructor_raises_is_off_with_its_reason(
    waypost_make_telemetry: Callable[..., Any],
) -> None:
    tel = waypost_make_telemetry(
        strict=False, sinks={"boom": {"type": "exploding"}, "log": {}}, sink_classes=[ExplodingSink]
    )
    states = {s.name: (s.state, s.error) for s in tel.status().sinks}
    assert states["boom"][0] == "error" and "RuntimeError: cannot be made" in str(states["boom"][1])
    assert states["log"][1] is None
    with pytest.raises(waypost.PluginError, match="cannot be made"):
        waypost_make_telemetry(strict=True, sinks={"boom": {"type": "exploding"}},
                               sink_classes=[ExplodingSink])  # fmt: skip


# --- properties of the envelope ---------------------------------------------------------------

_TIMES = st.floats(0, 253402300799.0, allow_nan=False)
ENVELOPE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@ENVELOPE
@given(_TIMES)
def test_every_time_the_gate_lets_in_is_rfc3339_with_four_digit_years(when: float) -> None:
    event = Event(id="x", name="e", time=when, instance_id="i", properties={}, context={})
    text = event.iso_timestamp
    assert RFC3339.match(text), text
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - when) < 0.0011
    assert event.to_dict()["timestamp"] == text


@ENVELOPE
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_iso_timestamp_gives_rfc3339_or_refuses(when: float) -> None:
    event = Event(id="x", name="e", time=when, instance_id="i", properties={}, context={})
    try:
        text = event.iso_timestamp
    except ValueError as exc:
        assert "outside the years 0001 to 9999" in str(exc)
    else:
        assert RFC3339.match(text), text


@ENVELOPE
@given(st.text(max_size=250))
def test_names_follow_the_rule_or_are_normalised_or_refused(name: str) -> None:
    problem = name_problem(name)
    fixed = normalise_name(name)
    if problem is None:
        assert fixed == name
        assert 1 <= len(name) <= NAME_MAX and name.isprintable()
    else:
        assert name_problem(fixed) is None or not fixed or len(fixed) > NAME_MAX
        assert all(ch.isprintable() for ch in fixed)


@ENVELOPE
@given(
    st.text(max_size=30),
    st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=20), st.integers(),
                    st.floats(), st.booleans(), st.none()), max_size=5),
)  # fmt: skip
def test_any_name_and_properties_are_sent_whole_or_dropped_and_counted(
    name: str, properties: dict[str, Any]
) -> None:
    from waypost.gate import Gate
    from waypost.plugins import PluginManager
    from waypost.status import LogOnce

    counters = Counters()
    gate = Gate(level="all", instance_id="inst", context={}, scrubber=None, distinct_id="",
                plugins=PluginManager(), counters=counters,
                log_once=LogOnce(logging.getLogger("test")))  # fmt: skip
    built = gate.build([(name, dict(properties), now(), None, None)])
    if built:
        event = built[0]
        assert name_problem(event.name) is None
        text = json.dumps(event.to_dict(), ensure_ascii=False)
        text.encode("utf-8")  # every string can go on the wire
        assert RFC3339.match(event.iso_timestamp)
        assert counters.dropped == {}
    else:
        assert counters.dropped == {"invalid": 1}


def test_drops_counted_from_many_threads_at_once_are_all_counted() -> None:
    """Host threads, the worker, the storer and the sinks' threads count drops at once: none is
    lost between reading a count and writing it back."""
    counters = Counters()
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two steps

    def drop() -> None:
        for _ in range(20_000):
            counters.drop("buffer_full")

    threads = [threading.Thread(target=drop) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switching)
    assert counters.dropped == {"buffer_full": 160_000}
    assert counters.lost() == 160_000
