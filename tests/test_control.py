"""``waypost.control``: the control block a collector sends, read strictly, kept in the data
dir, and only ever able to make an installation send less, or less often."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from waypost.control import Control, ControlState
from waypost.events import Event, uuid7
from waypost.sinks import SendResult, Sink


def test_parse_keeps_only_what_makes_sense() -> None:
    control = Control.parse(
        {"heartbeat_every": 604800, "sample": 0.25, "pause_until": "2031-01-01T00:00:00Z"},
        source="collector",
    )
    assert control is not None
    assert control.heartbeat_every == 604800 and control.sample == 0.25
    assert control.pause_until == 1924992000.0
    odd = Control.parse(
        {"heartbeat_every": -5, "sample": 1.5, "pause_until": "soon", "extra": 1}, source="c"
    )
    assert odd is not None and (odd.heartbeat_every, odd.sample, odd.pause_until) == (
        None,
        None,
        None,
    )
    assert Control.parse(["not", "a", "block"], source="c") is None
    assert Control.parse({"sample": True}, source="c").sample is None  # type: ignore[union-attr]


def test_only_less_never_more() -> None:
    control = Control(heartbeat_every=3600.0, sample=0.5)
    assert control.heartbeat_period(86400.0) == 86400.0  # never more often than its own
    assert Control(heartbeat_every=7 * 86400.0).heartbeat_period(86400.0) == 7 * 86400.0
    assert Control(sample=1.0).keeps(uuid7()) and Control().keeps(uuid7())
    assert not Control(sample=0.0).keeps(uuid7())
    assert Control(sample=0.0).keeps(uuid7(), heartbeat=True)  # heartbeats are not sampled


def test_sampling_is_by_id_and_near_the_share() -> None:
    control = Control(sample=0.3)
    ids = [uuid7() for _ in range(20_000)]
    kept = [i for i in ids if control.keeps(i)]
    assert 0.27 < len(kept) / len(ids) < 0.33
    assert all(control.keeps(i) for i in kept)  # a retried event: the same choice


def test_pause() -> None:
    now = time.time()
    assert Control(pause_until=now + 60).paused(now)
    assert not Control(pause_until=now - 1).paused(now)
    assert not Control().paused(now)


def test_state_is_kept_in_the_data_dir(tmp_path: Path) -> None:
    state = ControlState(tmp_path)
    assert state.current is None
    state.receive({"sample": 0.5, "heartbeat_every": 7200}, source="ingest")
    again = ControlState(tmp_path).current
    assert again is not None and again.sample == 0.5 and again.source == "ingest"
    assert (tmp_path / "control.json").stat().st_mode & 0o777 == 0o600
    assert state.receive("garbage", source="ingest") is None
    assert ControlState(tmp_path).current == again
    shown = again.as_dict()
    assert shown["source"] == "ingest" and shown["received_at"].endswith("Z")


# --- applied by a running Telemetry ---------------------------------------------------------


class Answering(Sink):
    """A sink whose destination answers every batch with a receipt and a control block."""

    type = "answering"
    control: ClassVar[dict[str, Any] | None] = None
    received: ClassVar[list[Event]] = []
    lock = threading.Lock()

    def send(self, events: Sequence[Event]) -> SendResult:
        with self.lock:
            type(self).received.extend(events)
        return SendResult(receipt=f"r-{len(events)}", control=type(self).control)


def _telemetry(make: Callable[..., Any], **config: Any) -> Any:
    Answering.received = []
    return make(
        sinks={"ingest": {"type": "answering"}},
        sink_classes=[Answering],
        config={"outbox": {"keep_sent": "1d"}, **config},
    )


def test_the_control_is_kept_shown_and_the_receipt_kept_with_the_record(
    waypost_make_telemetry: Callable[..., Any],
) -> None:
    Answering.control = {"heartbeat_every": 7 * 86400, "sample": 1.0}
    tel = _telemetry(waypost_make_telemetry)
    tel.heartbeat(every="1d", first_delay="1h")
    tel.track("run", {"n": 1})
    assert tel.flush(10)
    status = tel.status()
    assert status.control is not None and status.control["source"] == "ingest"
    assert status.control["heartbeat_every"] == 604800.0
    assert status.control["heartbeat_period"] == 604800.0  # less often, as asked
    assert (tel.data_dir / "control.json").exists()
    records, _ = tel.open_outbox().records(state="sent")
    assert [r.receipt for r in records] == ["r-1"]


def test_sample_drops_the_share_but_never_heartbeats(
    waypost_make_telemetry: Callable[..., Any],
) -> None:
    Answering.control = {"sample": 0.0}
    tel = _telemetry(waypost_make_telemetry)
    tel.track("first", {})  # delivered before the control arrived
    assert tel.flush(10)
    for i in range(50):
        tel.track("run", {"i": i})
    tel.heartbeat(every="1d", first_delay=0, time_of_day=None, event="heartbeat")
    assert tel.send_heartbeat(force=True)
    assert tel.flush(10)
    names = [e.name for e in Answering.received]
    assert names.count("run") == 0 and names.count("first") == 1 and "heartbeat" in names
    assert tel.status().counters.dropped["control_sample"] == 50


def test_a_pause_sends_nothing_and_keeps_everything(
    waypost_make_telemetry: Callable[..., Any],
) -> None:
    Answering.control = {"pause_until": "2999-01-01T00:00:00Z"}
    tel = _telemetry(waypost_make_telemetry)
    tel.track("first", {})
    assert tel.flush(10)
    for i in range(10):
        tel.track("run", {"i": i})
    assert tel.flush(10)  # safe: kept in the outbox, not sent, not dropped
    assert [e.name for e in Answering.received] == ["first"]
    status = tel.status()
    assert status.control is not None and status.control["paused"]
    assert status.outbox_pending_events == 10 and not status.counters.dropped


def test_a_control_never_widens(waypost_make_telemetry: Callable[..., Any]) -> None:
    # More often than its own period, a share above 1, a pause in the past: all ignored.
    Answering.control = {"heartbeat_every": 60, "sample": 3, "pause_until": "2001-01-01T00:00:00Z"}
    tel = _telemetry(waypost_make_telemetry)
    tel.heartbeat(every="1d", first_delay="1h")
    tel.track("first", {})
    assert tel.flush(10)
    for i in range(10):
        tel.track("run", {"i": i})
    assert tel.flush(10)
    assert len(Answering.received) == 11
    assert tel.status().control["heartbeat_period"] == 86400.0


def test_a_control_never_turns_telemetry_on(
    tmp_path: Path, waypost_make_telemetry: Callable[..., Any]
) -> None:
    data = tmp_path / "off"
    Control(sample=1.0, source="ingest", received_at=time.time()).write(_made(data))
    tel = waypost_make_telemetry(
        sinks={"ingest": {"type": "answering"}},
        sink_classes=[Answering],
        config={"enabled": False},
        data_dir=data,
    )
    tel.track("run", {})
    assert not tel.status().enabled and not tel.status().running


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_moment_that_is_no_date_is_shown_as_none() -> None:
    for moment in (float("inf"), float("-inf"), float("nan"), -1e12, 1e300):
        shown = Control(pause_until=moment, received_at=moment).as_dict()
        assert shown["pause_until"] is None and shown["received_at"] is None, moment
