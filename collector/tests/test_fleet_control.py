"""The core's side of the collector's answers, against a real collector and waypost's own http
sink: the receipt logged and kept with each record (``waypost show``), the control block kept in
the data dir, shown by ``waypost status`` and applied, only ever to send less or less often."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import TOKEN, base_section, stored_rows, wait_for, write_config

from waypost.control import Control
from waypost.schedule import DAY, ManualClock


def _collector(tmp_path: Path, serve: Any, **control: Any) -> tuple[Any, Path]:
    data = tmp_path / "collector"
    section = base_section(data, control={"myapp": control} if control else {})
    return serve(write_config(tmp_path / "collector.yml", section)), data


def _primed(tel: Any) -> Control:
    """One event delivered, so the collector's control block has come back with its answer."""
    tel.track("first", {})
    assert tel.flush(15)
    control: Control = wait_for(lambda: tel.control.current, 15, "the control block")
    return control


def _names(data: Path) -> list[str]:
    return [r["name"] for r in stored_rows(data)]


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", "import sys; from waypost.cli import main; main(sys.argv[1:])"]
    return subprocess.run(
        [*argv, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _client_config(tmp_path: Path, url: str) -> Path:
    """The client's own config as a file, for the CLI to read (the same sink as make_client's)."""
    path = tmp_path / "telemetry.yml"
    sink = {"type": "http", "url": f"{url}/v1/myapp/events",
            "headers": {"Authorization": f"Bearer {TOKEN}"}}  # fmt: skip
    path.write_text(json.dumps({"telemetry": {"app": "myapp", "sinks": {"collector": sink}}}))
    return path


# --- receipts ----------------------------------------------------------------------------------


def test_the_receipt_is_logged_kept_with_each_record_and_shown(
    tmp_path: Path,
    serve: Any,
    make_client: Any,
    child_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    served, _ = _collector(tmp_path, serve)
    tel = make_client(served.url, config={"outbox": {"keep_sent": "1d"}})
    with caplog.at_level(logging.INFO, logger="waypost"):
        for i in range(30):
            tel.track("run", {"n": i})
        assert tel.flush(15)
    records, total = tel.open_outbox().records(state="sent")
    assert total == 30
    by_receipt: dict[str, set[str]] = {}
    for record in records:
        assert record.receipt, record
        by_receipt.setdefault(record.receipt, set()).add(record.event_id)
    for receipt, ids in by_receipt.items():
        assert f"receipt {receipt}" in caplog.text  # logged, as Firefly III logs its uuid
        held = served.collector.ledger.receipt(receipt)  # the collector's side names the same
        assert held is not None and {e["id"] for e in held["events"]} == ids

    config = _client_config(tmp_path, served.url)
    args = ["--config", str(config), "--data-dir", str(tel.data_dir), "show", "--state", "sent"]
    shown = _cli([*args, "--json", "--limit", "100"], child_env, tmp_path)
    assert shown.returncode == 0, shown.stderr
    listed = {r["event_id"]: r["receipt"] for r in json.loads(shown.stdout)["records"]}
    assert listed == {r.event_id: r.receipt for r in records}
    text = _cli(args, {**child_env, "COLUMNS": "250"}, tmp_path)  # a wide terminal: whole ids
    assert text.returncode == 0 and "receipt" in text.stdout
    assert next(iter(by_receipt)) in text.stdout


# --- the control block -------------------------------------------------------------------------


def test_sample_halves_the_events_but_never_the_heartbeat(
    tmp_path: Path, serve: Any, make_client: Any
) -> None:
    served, data = _collector(tmp_path, serve, sample=0.5)
    tel = make_client(served.url)
    assert _primed(tel).sample == 0.5
    tel.heartbeat(every="1d", first_delay="1h", time_of_day=None)
    for i in range(400):
        tel.track("run", {"n": i})
    for _ in range(12):
        assert tel.send_heartbeat(force=True)
    assert tel.flush(15)
    dropped = tel.status().counters.dropped["control_sample"]
    kept = 400 - dropped
    rows = wait_for(
        lambda: (r := stored_rows(data)) and len(r) == 1 + kept + 12 and r, 30, "the kept events"
    )
    runs = [r for r in rows if r["name"] == "run"]
    # 400 draws at one half: 200 expected, 10 the standard deviation; ±60 is six of them.
    assert 140 <= len(runs) <= 260, len(runs)
    assert all(Control(sample=0.5).keeps(r["id"]) for r in runs)  # chosen by the event id
    assert [r["name"] for r in rows].count("heartbeat") == 12  # every heartbeat, none sampled


def test_a_pause_keeps_everything_in_the_outbox(
    tmp_path: Path, serve: Any, make_client: Any
) -> None:
    served, data = _collector(tmp_path, serve, pause_until="2999-01-01T00:00:00Z")
    tel = make_client(served.url)
    assert _primed(tel).paused()
    for i in range(20):
        tel.track("run", {"n": i})
    assert tel.flush(15)  # safe: in the outbox
    status = tel.status()
    assert status.control is not None and status.control["paused"]
    assert status.outbox_pending_events == 20 and not status.counters.dropped
    assert tel.shutdown(5)
    held, total = tel.open_outbox().records(state="pending")
    assert total == 20 and sorted(r.properties["n"] for r in held) == list(range(20))
    assert served.collector.ledger.totals()["myapp"]["accepted"] == 1  # the collector saw one
    wait_for(lambda: _names(data) == ["first"], 20, "the first event stored")


def test_after_a_pause_what_waited_is_sent(tmp_path: Path, serve: Any, make_client: Any) -> None:
    until = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0) + _dt.timedelta(seconds=5)
    served, data = _collector(tmp_path, serve, pause_until=until.isoformat())
    tel = make_client(served.url)
    _primed(tel)
    for i in range(20):
        tel.track("run", {"n": i})
    rows = wait_for(lambda: (r := stored_rows(data)) and len(r) == 21 and r, 60, "all 21 events")
    for row in rows:
        if row["name"] == "run":  # none arrived before the pause's end
            received = row["context"]["collector"]["received_at"].replace("Z", "+00:00")
            assert _dt.datetime.fromisoformat(received) >= until


@pytest.mark.parametrize(("asked", "period"), [("7d", 7 * DAY), (60, DAY)])
def test_heartbeat_every_stretches_the_period_never_shortens_it(
    asked: Any, period: float, tmp_path: Path, serve: Any, make_client: Any
) -> None:
    served, data = _collector(tmp_path, serve, heartbeat_every=asked)
    clock = ManualClock()
    tel = make_client(served.url, clock=clock)
    _primed(tel)
    # Sent on demand only: the scheduler's own first run is past the test's clock.
    tel.heartbeat(every="1d", first_delay="30d", time_of_day=None)
    assert tel.status().control["heartbeat_period"] == period
    assert tel.send_heartbeat()  # the first
    clock.advance(DAY + 120)  # the client's own period has passed
    assert tel.send_heartbeat() is (period == DAY)
    clock.advance(3600)
    assert not tel.send_heartbeat()  # never more often than its own
    clock.advance(7 * DAY)
    assert tel.send_heartbeat()
    assert tel.flush(15)
    expected = 3 if period == DAY else 2
    wait_for(lambda: _names(data).count("heartbeat") == expected, 20, "the heartbeats")


def test_the_cron_heartbeat_keeps_the_stored_period_and_is_never_sampled(
    tmp_path: Path, serve: Any, make_client: Any
) -> None:
    served, data = _collector(tmp_path, serve, heartbeat_every="7d", sample=0.0)
    clock = ManualClock()
    tel = make_client(
        served.url, clock=clock, config={"heartbeat": {"enabled": False, "every": "1d"}}
    )
    _primed(tel)
    assert (tel.data_dir / "control.json").exists()
    assert tel.send_heartbeat()  # as `waypost send-heartbeat` does, from cron
    clock.advance(2 * DAY)
    assert not tel.send_heartbeat()  # the client's day has passed, the collector's week not
    clock.advance(5 * DAY + 120)
    assert tel.send_heartbeat()
    assert tel.flush(15)
    wait_for(lambda: _names(data).count("heartbeat") == 2, 20, "both heartbeats")
    assert tel.status().counters.dropped.get("control_sample", 0) == 0


def test_status_shows_the_control_and_its_source(
    tmp_path: Path, serve: Any, make_client: Any, child_env: dict[str, str]
) -> None:
    served, _ = _collector(tmp_path, serve, sample=0.25, heartbeat_every="7d")
    tel = make_client(served.url)
    _primed(tel)
    tel.heartbeat(every="1d", first_delay="1h", time_of_day=None)
    shown = tel.status().control
    assert shown is not None and shown["source"] == "collector"
    assert (shown["sample"], shown["heartbeat_every"], shown["heartbeat_period"]) == (
        0.25, 7 * DAY, 7 * DAY,
    )  # fmt: skip
    assert tel.shutdown(5)
    config = _client_config(tmp_path, served.url)
    base = ["--config", str(config), "--data-dir", str(tel.data_dir), "status"]
    out = _cli([*base, "--json"], child_env, tmp_path)
    assert out.returncode == 0, out.stderr
    control = json.loads(out.stdout)["control"]
    assert control["source"] == "collector" and control["sample"] == 0.25
    assert control["received_at"].endswith("Z") and control["paused"] is False
    text = _cli(base, child_env, tmp_path)
    assert text.returncode == 0, text.stderr
    assert "control from sink collector" in text.stdout and "sample 0.25" in text.stdout


# --- never more --------------------------------------------------------------------------------


def _stored_control(data_dir: Path) -> None:
    """A control file that says all it can, and more than it may (ignored keys)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    block = {"heartbeat_every": 60, "sample": 1.0, "pause_until": None, "source": "collector",
             "received_at": time.time(), "enabled": True, "level": "full"}  # fmt: skip
    (data_dir / "control.json").write_text(json.dumps(block))


def test_a_control_never_turns_telemetry_on(
    tmp_path: Path, serve: Any, make_client: Any, child_env: dict[str, str]
) -> None:
    served, data = _collector(tmp_path, serve, sample=1.0, heartbeat_every=60)
    # DO_NOT_TRACK: nothing is sent, whatever the control says, even with consent given.
    dnt = make_client(served.url, env={**child_env, "DO_NOT_TRACK": "1"})
    _stored_control(dnt.data_dir)
    assert not dnt.set_consent(True).enabled
    # Consent withdrawn by the administrator, after a control came back.
    withdrawn = make_client(served.url)
    _primed(withdrawn)
    withdrawn.set_consent(False)
    for tel in (dnt, withdrawn):
        for i in range(10):
            tel.track("run", {"n": i})
        tel.heartbeat(every="1d", first_delay=0, time_of_day=None)
        assert not tel.send_heartbeat(force=True)
        assert tel.flush(5)
        assert not tel.status().enabled
    # A client that is on sends a last event: by the time it is stored, nothing else came.
    on = make_client(served.url)
    on.track("last", {})
    assert on.flush(15)
    wait_for(lambda: "last" in _names(data), 20, "the last event")
    assert sorted(_names(data)) == ["first", "last"]
