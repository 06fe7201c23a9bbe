"""Limits on what one event may hold, applied before anything scans it: an oversized value is
truncated with a remark, an event past the other limits is refused and counted, and the host's
other threads and events are never held up by one huge property.

How long a ticker thread waits is a figure for ``bench/``; here the figures are what arrives,
what is truncated or refused, and what is dropped.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from faultkit import show, wait_until

import waypost
from waypost.errors import ConfigError, TrackError


class Collecting(waypost.Sink):
    """Keeps every event it is sent, with its remarks (a real sink, in memory)."""

    type = "collecting"
    max_batch_size = 500
    events: list[waypost.Event] = []
    lock = threading.Lock()

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        with Collecting.lock:
            Collecting.events.extend(events)
        return waypost.SendResult.ok()


class Ticker:
    """A thread of the host that wakes every 10 ms and notes the longest gap between wakes."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(0.01):
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.01)
            last = now

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def make_tel(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []
    counter = itertools.count()
    Collecting.events = []

    def factory(*, strict: bool = False, **section: Any) -> Any:
        section.setdefault("notice", {"enabled": False})
        section.setdefault("batch", {"interval": 0.05})
        tel = waypost.Telemetry(
            app="limits",
            data_dir=tmp_path / f"d{next(counter)}",
            env=clean_env,
            strict=strict,
            sink_classes=[Collecting],
            config={"telemetry": {**section, "sinks": {"c": {"type": "collecting"}}}},
        )
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.shutdown(2)


def by_name(name: str) -> list[waypost.Event]:
    with Collecting.lock:
        return [e for e in Collecting.events if e.name == name]


def burst(tel: Any, name: str, n: int) -> threading.Thread:
    def run() -> None:
        for i in range(n):
            tel.track(name, {"i": i})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_huge_string_is_truncated_with_a_remark_and_holds_nobody_up(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel()
    with Ticker() as ticker:
        started = time.perf_counter()
        tel.track("huge", {"blob": "x" * 20_000_000, "ok": True})
        track_s = time.perf_counter() - started
        others = burst(tel, "small", 5_000)
        others.join()
        assert tel.flush(60)
    huge = by_name("huge")
    figures = {
        "track_s": round(track_s, 4),
        "ticker_longest_s": round(ticker.longest, 4),
        "dropped": tel.status().counters.dropped,
        "small": len(by_name("small")),
    }
    assert len(huge) == 1, show(figures)
    blob = huge[0].properties["blob"]
    assert len(blob) <= 65_536 and blob.startswith("xxxx"), show(figures)
    assert "truncated@properties.blob" in huge[0].remarks, (huge[0].remarks, figures)
    assert huge[0].properties["ok"] is True
    assert figures["small"] == 5_000 and not figures["dropped"], show(figures)


def _hash_made() -> Callable[[str], bool] | None:
    """Whether CPython has made (and cached) a string's hash, read from the object itself;
    None where that cannot be read (another layout, another Python)."""
    import ctypes

    offset = 3 * ctypes.sizeof(ctypes.c_ssize_t)  # PyASCIIObject: refcount, type, length, hash

    def made(text: str) -> bool:
        return ctypes.c_ssize_t.from_address(id(text) + offset).value != -1

    probe = "".join(["probe-", str(time.time())])
    if made(probe) or (hash(probe) and not made(probe)):
        return None
    return made


def test_a_huge_text_is_never_hashed_on_its_way(make_tel: Callable[..., Any]) -> None:
    # Hashing 20 MB holds every thread of the host for 12 ms or more: a text past the length
    # the scrubber remembers is never looked up, in the properties or as the event's name.
    made = _hash_made()
    if made is None:
        pytest.skip("cannot see whether this Python made a string's hash")
    tel = make_tel()
    blob = "".join(["y" * 1_000_000, "z"])
    name = "".join(["n" * 300, "x"])
    for _ in range(2):  # the second time the scrubber has seen the rest of the event
        tel.track("huge", {"blob": blob})
        tel.track(name, {"ok": True})
        assert tel.flush(30)
    assert len(by_name("huge")) == 2 and "truncated@properties.blob" in by_name("huge")[0].remarks
    assert not made(blob) and not made(name)


def test_a_million_keys_are_refused_and_counted_without_dropping_anything_else(
    make_tel: Callable[..., Any],
) -> None:
    tel = make_tel()
    many = {f"k{i}": i for i in range(1_000_000)}
    others = burst(tel, "small", 30_000)
    tel.track("many_keys", many)
    others.join()
    assert tel.flush(60)
    dropped = tel.status().counters.dropped
    assert not by_name("many_keys")
    assert len(by_name("small")) == 30_000, dropped
    assert dropped == {"too_large": 1}, dropped


def test_a_million_keys_at_the_top_or_nested_are_refused_uncopied_in_one_log_line(
    make_tel: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    # docs/delivery.md, "Limits on one event": refused, dropped["too_large"], one log line, a
    # len() and no more. A copy of a million keys allocates some 30 MB: the first refusals,
    # traced while nothing else is tracked, allocate next to nothing.
    caplog.set_level(logging.WARNING, logger="waypost")
    tel = make_tel()
    many = {f"k{i}": i for i in range(1_000_000)}
    nested = {"ok": True, "inner": many}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tel.track("many_keys", many)
        tel.track("nested_keys", nested)
        assert wait_until(lambda: tel.status().counters.dropped.get("too_large") == 2)
        allocated = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert allocated < 4 << 20, f"{allocated:,} bytes allocated to refuse them"
    others = burst(tel, "small", 30_000)
    for _ in range(5):
        tel.track("many_keys", many)
        tel.track("nested_keys", nested)
    others.join()
    assert tel.flush(60)
    dropped = tel.status().counters.dropped
    assert dropped == {"too_large": 12}, dropped
    assert len(by_name("small")) == 30_000, dropped
    assert not by_name("many_keys") and not by_name("nested_keys")
    assert len(many) == 1_000_000 and nested["inner"] is many  # the caller's dicts untouched
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert "1,000,000 keys" in refusals[0] and "telemetry.limits.keys" in refusals[0]


def test_too_many_keys_are_refused_by_track_itself_before_any_copy(
    make_tel: Callable[..., Any],
) -> None:
    # The worker sleeps (no batch fills, the interval is a minute): a refusal counted as track
    # returns was made there, at a glance, not by the worker after track copied the dict.
    tel = make_tel(limits={"keys": 10}, batch={"interval": 60, "size": 1000})
    many = {f"k{i}": i for i in range(11)}
    tel.track("many_keys", many)
    assert tel.status().counters.dropped == {"too_large": 1}
    tel.track("many_keys", many, timestamp=time.time())  # the other way through track
    assert tel.status().counters.dropped == {"too_large": 2}
    assert not tel.pipeline.buffer
    tel.track("enough_keys", dict(list(many.items())[:10]))
    assert tel.flush(10)
    assert len(by_name("enough_keys")) == 1 and not by_name("many_keys")


def test_limits_are_configurable_and_each_one_applies(make_tel: Callable[..., Any]) -> None:
    tel = make_tel(limits={"value": 100, "keys": 5, "depth": 3, "event_bytes": 2_000,
                           "name": 20})  # fmt: skip
    tel.track("long_value", {"text": "t" * 500, "nested": {"deep": "d" * 500}})
    tel.track("many", {f"k{i}": i for i in range(6)})
    tel.track("deep", {"a": {"b": {"c": {"d": 1}}}})
    tel.track("heavy", {f"v{i}": "h" * 90 for i in range(5)} | {"list": ["h" * 90] * 30})
    tel.track("n" * 21, {})
    tel.track("fits", {f"k{i}": "f" * 100 for i in range(5)})
    assert tel.flush(10)
    long_value = by_name("long_value")[0]
    assert long_value.properties["text"] == "t" * 100
    assert long_value.properties["nested"]["deep"] == "d" * 100
    assert sorted(long_value.remarks) == [
        "truncated@properties.nested.deep",
        "truncated@properties.text",
    ]
    assert not by_name("many") and not by_name("deep") and not by_name("heavy")
    assert len(by_name("fits")) == 1
    dropped = tel.status().counters.dropped
    assert dropped.get("too_large") == 3 and dropped.get("invalid") == 1, dropped


def test_strict_mode_names_the_limit_an_event_breaks(make_tel: Callable[..., Any]) -> None:
    tel = make_tel(strict=True, limits={"keys": 5, "event_bytes": 2_000})
    with pytest.raises(TrackError, match="keys"):
        tel.track("many", {f"k{i}": i for i in range(6)})
    with pytest.raises(TrackError, match=r"event_bytes"):
        tel.track("heavy", {"a": "h" * 900, "b": "h" * 900, "c": "h" * 900})


def test_the_defaults_follow_the_vendors_limits(make_tel: Callable[..., Any]) -> None:
    st = make_tel().config.limits
    assert st.event_bytes == 900 * 1024  # PostHog's per-event limit, the tightest of the three
    assert st.value == 65_536 and st.keys == 1_000


def test_a_limit_that_makes_no_sense_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits\.value"):
        waypost.Telemetry(
            app="limits", data_dir=tmp_path, strict=True,
            config={"telemetry": {"limits": {"value": 0}, "sinks": {"log": {}}}},
        )  # fmt: skip
