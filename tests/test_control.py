"""``waypost.control``: the control block a collector sends, read strictly, kept in the data
dir, and only ever able to make an installation send less, or less often."""

from __future__ import annotations

import time
from pathlib import Path

from waypost.control import Control, ControlState
from waypost.events import uuid7


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
