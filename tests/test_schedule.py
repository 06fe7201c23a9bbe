"""Schedules and heartbeats, on a clock the tests control, and across real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import waypost
from waypost.schedule import DAY, ManualClock, next_run


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines()]


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_next_run_at_a_time_of_day() -> None:
    midnight = 1_700_006_400.0  # 2023-11-15 00:00 UTC
    assert midnight % DAY == 0
    tod = 3 * 3600.0
    # Daily: the next 03:00 after the last run.
    assert next_run(midnight + 3600, DAY, tod) == midnight + tod
    assert next_run(midnight + tod, DAY, tod) == midnight + DAY + tod
    # Weekly: a week later, at that time.
    assert next_run(midnight + tod, 7 * DAY, tod) == midnight + 7 * DAY + tod
    assert next_run(100.0, 60.0, None) == 160.0


def test_flowforge_schedule_on_a_manual_clock(make_telemetry: Any, tmp_path: Path) -> None:
    clock = ManualClock(start=1_700_006_400.0 + 3600)  # 01:00 UTC
    out = tmp_path / "ping.jsonl"
    tel = make_telemetry(sinks={"ping": {"type": "jsonl", "path": str(out)}}, clock=clock)
    initialised = threading.Event()
    job = tel.heartbeat(
        every="24h", first_delay="30s", time_of_day="02:00", condition=initialised.is_set,
        facts=lambda: {"platform": {"counts": {"users": 3, "teams": 1, "projects": 2},
                                    "config": {"driver": "localfs"}}},
    )  # fmt: skip
    clock.advance(31)
    assert wait_until(lambda: job.last_outcome == "skipped: condition not met")
    assert lines(out) == []
    initialised.set()
    clock.advance(3600)  # 02:00:31: the daily slot, and the platform is initialised now
    assert wait_until(lambda: job.runs == 1)
    tel.flush(5)
    (ping,) = lines(out)
    props = ping["properties"]
    assert ping["name"] == "heartbeat"
    assert props["instanceId"] == tel.instance_id
    assert set(props["os"]) == {"type", "release", "arch"}
    assert props["env"]["testapp"] == "1.0.0" and "python" in props["env"]
    assert props["platform"] == {
        "counts": {"users": 3, "teams": 1, "projects": 2},
        "config": {"driver": "localfs"},
    }
    clock.advance(12 * 3600)  # not yet a day
    time.sleep(0.2)
    assert job.runs == 1
    clock.advance(12 * 3600)  # 02:00 the next day
    assert wait_until(lambda: job.runs == 2)


def test_a_period_that_passes_during_a_run_is_not_skipped(
    make_telemetry: Any, tmp_path: Path
) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    out = tmp_path / "hb.jsonl"
    tel = make_telemetry(sinks={"hb": {"type": "jsonl", "path": str(out)}}, clock=clock)
    calls: list[float] = []

    def facts() -> dict[str, Any]:
        calls.append(clock.time())
        if len(calls) == 1:
            clock.advance(DAY)  # a whole period goes by while the first run is under way
        return {}

    job = tel.heartbeat(every="24h", first_delay=0, time_of_day=None, facts=facts)
    assert wait_until(lambda: job.runs == 2)
    assert calls == [1_700_000_000.0, 1_700_000_000.0 + DAY]
    assert job.next_at == 1_700_000_000.0 + 2 * DAY


def test_a_restart_does_not_resend_before_the_period(make_telemetry: Any, tmp_path: Path) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    out = tmp_path / "hb.jsonl"
    data_dir = tmp_path / "shared"
    sinks = {"hb": {"type": "jsonl", "path": str(out)}}
    first = make_telemetry(sinks=sinks, clock=clock, data_dir=data_dir)
    job = first.heartbeat(every="1h", first_delay=0, time_of_day=None)
    assert wait_until(lambda: job.runs == 1)
    first.shutdown()
    clock.advance(600)
    second = make_telemetry(sinks=sinks, clock=clock, data_dir=data_dir)
    again = second.heartbeat(every="1h", first_delay=0, time_of_day=None)
    assert wait_until(lambda: again.last_outcome is not None)
    assert again.runs == 0 and again.last_outcome == "skipped: ran already this period"
    clock.advance(3000)
    assert wait_until(lambda: again.runs == 1)
    second.flush(5)
    assert len(lines(out)) == 2


def test_send_heartbeat_respects_the_period_unless_forced(
    make_telemetry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "hb.jsonl"
    tel = make_telemetry(
        sinks={"hb": {"type": "jsonl", "path": str(out)}},
        config={"heartbeat": {"every": "7d", "first_delay": "1h"}},
    )
    assert tel.send_heartbeat() is True
    assert tel.send_heartbeat() is False
    assert tel.send_heartbeat(force=True) is True
    tel.flush(5)
    assert len(lines(out)) == 2


def test_shutdown_payload_carries_the_run_time(make_telemetry: Any, tmp_path: Path) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    out = tmp_path / "s.jsonl"
    tel = make_telemetry(
        sinks={"s": {"type": "jsonl", "path": str(out)}},
        config={"shutdown_event": "shutdown"},
        clock=clock,
    )
    clock.advance(3600)
    tel.shutdown()
    (event,) = lines(out)
    assert event["name"] == "shutdown" and event["properties"] == {"timeRunning": 3600}


def test_the_shutdown_event_is_sent_once_after_consent_was_withdrawn_and_given_again(
    waypost_make_telemetry: Any, tmp_path: Path
) -> None:
    out = tmp_path / "s.jsonl"
    tel = waypost_make_telemetry(
        sinks={"s": {"type": "jsonl", "path": str(out)}}, config={"shutdown_event": "shutdown"}
    )
    assert not tel.set_consent(False).enabled
    assert tel.set_consent(True).enabled  # a second start from the same config
    assert tel.shutdown(5)
    assert [event["name"] for event in lines(out)] == ["shutdown"]


def test_heartbeat_hook_adds_facts(make_telemetry: Any, tmp_path: Path) -> None:
    class Counts:
        @waypost.hookimpl
        def waypost_heartbeat(self, facts: dict[str, Any]) -> dict[str, Any]:
            assert facts["instanceId"]
            return {"platform": {"counts": {"flows": 7}}}

    tel = make_telemetry(sinks={"log": {}}, plugins=[Counts()])
    payload = tel.heartbeat_payload()
    assert payload["platform"]["counts"] == {"flows": 7}


def test_one_heartbeat_per_period_across_processes(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """Four processes scheduling the heartbeat at once send one; once the period has passed
    (the installation's record says so), four more send one more. Each process waits for its
    own run's outcome, never for a time: the count does not depend on how busy the machine is."""
    out = tmp_path / "hb.jsonl"
    data_dir = tmp_path / "d"
    go = tmp_path / "go"
    code = textwrap.dedent(
        f"""
        import os, time, waypost
        deadline = time.monotonic() + 600  # a guard against a hang, never a timing
        while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)  # all four start their schedulers together
        tel = waypost.Telemetry(
            app="multi", data_dir={str(data_dir)!r}, config={{"telemetry": {{
            "notice": {{"enabled": False}}, "batch": {{"interval": 0.05}},
            "sinks": {{"hb": {{"type": "jsonl", "path": {str(out)!r}}}}}}}}},
        )
        job = tel.heartbeat(every=3600, first_delay=0, time_of_day=None)
        while job.last_outcome is None and time.monotonic() < deadline:
            time.sleep(0.01)
        print(job.last_outcome)
        assert tel.shutdown(timeout=60)
        """
    )

    def round_of_four() -> list[str]:
        go.unlink(missing_ok=True)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=clean_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        go.touch()
        outcomes = []
        for p in procs:
            stdout, err = p.communicate(timeout=900)
            assert p.returncode == 0, err
            outcomes.append(stdout.strip())
        return sorted(outcomes)

    assert round_of_four() == ["sent", *["skipped: ran already this period"] * 3]
    assert len(lines(out)) == 1
    assert round_of_four() == ["skipped: ran already this period"] * 4  # within the period
    assert len(lines(out)) == 1
    # The period passes: the installation's record of the last run is an hour and more old.
    state_file = data_dir / "schedule.json"
    state = json.loads(state_file.read_text())
    state["heartbeat"]["last"] -= 3601
    state_file.write_text(json.dumps(state))
    assert round_of_four() == ["sent", *["skipped: ran already this period"] * 3]
    assert len(lines(out)) == 2
