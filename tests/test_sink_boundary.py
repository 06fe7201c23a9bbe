"""Sinks that misbehave are contained by the error boundary: any ``BaseException`` from
``send``, a result of the wrong type, fields of the wrong type, a ``send`` that hangs. The
delivery thread lives on (or is replaced), the events are retried or stored and delivered once
the sink behaves, the state says ``error`` with the reason, and ``status()`` never raises."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from faultkit import show

import waypost


class Misbehaving(waypost.Sink):
    """Misbehaves (``Misbehaving.fault(events)``) while ``Misbehaving.bad`` is set, then
    delivers."""

    type = "misbehaving"
    max_batch_size = 50
    fault: Callable[[Sequence[waypost.Event]], Any] = staticmethod(lambda events: None)
    bad = threading.Event()
    calls = 0
    delivered: set[str] = set()
    lock = threading.Lock()

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        with Misbehaving.lock:
            Misbehaving.calls += 1
        if Misbehaving.bad.is_set():
            return Misbehaving.fault(events)  # type: ignore[no-any-return]
        with Misbehaving.lock:
            Misbehaving.delivered.update(e.id for e in events)
        return waypost.SendResult.ok()


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def make_tel(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []
    counter = itertools.count()

    def factory(fault: Callable[[Sequence[waypost.Event]], Any], **sink: Any) -> Any:
        Misbehaving.fault = staticmethod(fault)  # type: ignore[assignment]
        Misbehaving.calls, Misbehaving.delivered = 0, set()
        Misbehaving.bad.set()
        tel = waypost.Telemetry(
            app="boundary",
            data_dir=tmp_path / f"d{next(counter)}",
            env=clean_env,
            sink_classes=[Misbehaving],
            config={"telemetry": {
                "notice": {"enabled": False}, "batch": {"interval": 0.05},
                "retry": {"initial": 0.05, "maximum": 0.2},
                "sinks": {"m": {"type": "misbehaving", **sink}},
            }},
        )  # fmt: skip
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.shutdown(2)


def raises(exc: BaseException) -> Callable[[Sequence[waypost.Event]], Any]:
    def fault(events: Sequence[waypost.Event]) -> Any:
        raise exc

    return fault


def returns(value: Callable[[Sequence[waypost.Event]], Any]) -> Callable[..., Any]:
    return value


class Custom(BaseException):
    pass


FAULTS: dict[str, Callable[[Sequence[waypost.Event]], Any]] = {
    "SystemExit": raises(SystemExit(3)),
    "KeyboardInterrupt": raises(KeyboardInterrupt()),
    "GeneratorExit": raises(GeneratorExit()),
    "BaseException": raises(Custom("custom")),
    "returns None": returns(lambda events: None),
    "returns a dict": returns(lambda events: {"ok": True}),
    "returns text": returns(lambda events: "ok"),
    "non-text reason": returns(lambda events: waypost.SendResult(retry={e.id: 42 for e in events})),
    "non-text failure reason": returns(
        lambda events: waypost.SendResult(
            failed={e.id: object() for e in events[:1]}, retry={e.id: "again" for e in events[1:]}
        )
    ),
    "text retry_after": returns(
        lambda events: waypost.SendResult.retry_all(events, "later", retry_after="1")
    ),
    "nan retry_after": returns(
        lambda events: waypost.SendResult.retry_all(events, "later", float("nan"))
    ),
    "negative retry_after": returns(lambda events: waypost.SendResult.retry_all(events, "x", -5)),
    "retry is a list": returns(lambda events: waypost.SendResult(retry=[e.id for e in events])),
    "dropped is None": returns(lambda events: waypost.SendResult(dropped_by_destination=None)),
    "receipt is a number": returns(lambda events: waypost.SendResult(receipt=12)),
    "control is text": returns(lambda events: waypost.SendResult(control="pause")),  # type: ignore[arg-type]
}


REFUSES = {"non-text failure reason"}
"""Faults that refuse events for good (with a reason that is not text): counted as failed."""


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_misbehaving_sink_is_contained_and_its_events_delivered_later(
    make_tel: Callable[..., Any], fault: str
) -> None:
    tel = make_tel(FAULTS[fault])
    for i in range(120):
        tel.track("contained", {"i": i})
    assert wait_until(lambda: Misbehaving.calls >= 2), Misbehaving.calls
    # While the sink misbehaves: the thread lives, status answers and names the error.
    st = tel.status()
    sink = st.sinks[0]
    figures = {"fault": fault, "state": sink.state, "error": sink.error,
               "last_error": sink.last_error, "alive": tel.pipeline.runners[0].alive}  # fmt: skip
    assert figures["alive"], show(figures)
    assert sink.state == "error", figures
    assert isinstance(sink.error, str) and sink.error, show(figures)
    Misbehaving.bad.clear()
    assert wait_until(
        lambda: (
            tel.status().counters.delivered + tel.status().counters.failed >= 120 and tel.flush(0.5)
        )
    ), (len(Misbehaving.delivered), tel.status().counters)
    counters = tel.status().counters
    figures |= {"delivered": counters.delivered, "failed": counters.failed}
    assert figures["delivered"] + figures["failed"] == 120, show(figures)
    if fault not in REFUSES:
        assert figures["failed"] == 0, show(figures)
    # The error state lasts until a batch goes through cleanly.
    tel.track("after", {})
    assert wait_until(lambda: tel.flush(0.5) and tel.status().sinks[0].state == "ok"), (
        tel.status().sinks[0]
    )


def test_a_result_whose_keys_are_no_ids_is_retried_not_taken_as_delivered(
    make_tel: Callable[..., Any],
) -> None:
    # Keys that are not text match no event: read as they were, every event looked delivered.
    tel = make_tel(lambda events: waypost.SendResult(retry={object(): "x"}, failed={1: "y"}))
    for i in range(120):
        tel.track("contained", {"i": i})
    assert wait_until(lambda: Misbehaving.calls >= 2), Misbehaving.calls
    assert tel.status().sinks[0].state == "error", tel.status().sinks[0]
    Misbehaving.bad.clear()
    assert wait_until(lambda: len(Misbehaving.delivered) == 120 and tel.flush(0.5)), (
        len(Misbehaving.delivered),
        tel.status().counters,
    )
    assert tel.status().counters.delivered == 120, tel.status().counters


def test_a_sink_that_hangs_is_replaced_and_named_in_status(
    make_tel: Callable[..., Any],
) -> None:
    release = threading.Event()

    def hang(events: Sequence[waypost.Event]) -> Any:
        Misbehaving.bad.clear()  # only the first call hangs
        release.wait(60)
        with Misbehaving.lock:
            Misbehaving.delivered.update(e.id for e in events)
        return waypost.SendResult.ok()

    tel = make_tel(hang, timeout=0.5)
    try:
        for i in range(120):
            tel.track("hung", {"i": i})
        # The first batch hangs; the others must still go out, and status must name the hang.
        assert wait_until(lambda: len(Misbehaving.delivered) >= 70), len(Misbehaving.delivered)
        sink = tel.status().sinks[0]
        assert sink.state == "error" and "hung" in (sink.error or ""), sink
        started = time.monotonic()
        tel.flush(1.0)
        assert time.monotonic() - started < 3.0
    finally:
        release.set()
    assert wait_until(lambda: len(Misbehaving.delivered) == 120 and tel.flush(0.5))


class ExitsWhenMade(waypost.Sink):
    type = "exits_when_made"

    def __init__(self, *args: Any) -> None:
        raise SystemExit(3)

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        return waypost.SendResult.ok()


class RaisesAtClose(waypost.Sink):
    type = "raises_at_close"

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        return waypost.SendResult.ok()

    def close(self) -> None:
        raise Custom("close")


def test_a_base_exception_from_a_sinks_constructor_or_close_is_contained(
    tmp_path: Path, clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    escaped: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(repr(args.exc_value)))
    tel = waypost.Telemetry(
        app="boundary",
        data_dir=tmp_path / "d",
        env=clean_env,
        sink_classes=[ExitsWhenMade, RaisesAtClose],
        config={"telemetry": {
            "notice": {"enabled": False}, "batch": {"interval": 0.05},
            "sinks": {"exits": {"type": "exits_when_made"}, "closes": {"type": "raises_at_close"}},
        }},
    )  # fmt: skip
    try:
        tel.track("contained", {})
        assert tel.flush(5) is True  # delivered by one, stored for the other
        sinks = {s.name: s for s in tel.status().sinks}
        assert sinks["exits"].state == "error" and "SystemExit" in str(sinks["exits"].error)
    finally:
        assert tel.shutdown(5) is True
    closing = lambda: any(t.name == "waypost-close" for t in threading.enumerate())  # noqa: E731
    assert wait_until(lambda: not closing())
    assert escaped == [], escaped  # close() raised on waypost's thread: logged, not escaped


class HangsAtOpen(waypost.Sink):
    type = "hangs_at_open"
    release = threading.Event()

    def open(self) -> None:
        HangsAtOpen.release.wait(30)

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        return waypost.SendResult.ok()


def test_a_sink_whose_open_hangs_is_named_in_status(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    HangsAtOpen.release.clear()
    tel = waypost.Telemetry(
        app="boundary",
        data_dir=tmp_path / "d",
        env=clean_env,
        sink_classes=[HangsAtOpen],
        config={"telemetry": {
            "notice": {"enabled": False},
            "sinks": {"h": {"type": "hangs_at_open", "timeout": 1}},
        }},
    )  # fmt: skip
    try:
        tel.track("waiting", {})
        # It said ok, with the event pending, for as long as open() hung.
        assert wait_until(lambda: tel.status().sinks[0].state == "error", timeout=15), (
            tel.status().sinks[0]
        )
        assert "open() hung" in str(tel.status().sinks[0].error)
        HangsAtOpen.release.set()
        assert tel.flush(10) is True
        assert tel.status().sinks[0].state == "ok", tel.status().sinks[0]
    finally:
        HangsAtOpen.release.set()
        tel.shutdown(5)
