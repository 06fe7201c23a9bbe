"""When telemetry is off nothing is collected, stored or sent, and no socket is opened; debug
mode prints what would be sent and sends nothing. Proved with audit hooks in a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from waypost.testing import RecordingServer

AUDIT = textwrap.dedent(
    """
    import sys, json
    seen = []
    def hook(event, args):
        writing = event == "open" and len(args) > 1 and any(c in str(args[1] or "") for c in "wax+")
        if event.startswith("socket.") or (writing and "__pycache__" not in str(args[0])):
            seen.append([event, repr(args)[:200]])
    sys.addaudithook(hook)
    """
)


def run_audited(body: str, env: dict[str, str], cwd: Path) -> tuple[list[list[str]], str]:
    code = AUDIT + textwrap.dedent(body) + "\nprint('AUDIT ' + json.dumps(seen))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("AUDIT "))
    return json.loads(line[len("AUDIT ") :]), proc.stderr


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", "On"])
def test_do_not_track_opens_no_socket_and_writes_nothing(
    tmp_path: Path, clean_env: dict[str, str], value: str
) -> None:
    with RecordingServer() as server:
        env = {**clean_env, "DO_NOT_TRACK": value}
        seen, _ = run_audited(
            f"""
            import waypost
            from waypost.testing import RecordingServer  # noqa
            tel = waypost.Telemetry(app="off", config={{"telemetry": {{"sinks": {{
                "ingest": {{"type": "jsonl", "path": "events.jsonl"}}}}}}}},
                data_dir={str(tmp_path / "data")!r})
            for i in range(1000):
                tel.track("x", {{"i": i}})
            tel.flush(); tel.shutdown()
            st = tel.status()
            assert not st.enabled and st.rule == "do_not_track", st
            """,
            env,
            tmp_path,
        )
        assert server.requests == []
    assert seen == []
    assert not (tmp_path / "data").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_off_path_is_a_bare_return(tmp_path: Path, clean_env: dict[str, str]) -> None:
    import waypost

    tel = waypost.Telemetry(
        app="x", data_dir=tmp_path / "d", env={**clean_env, "DO_NOT_TRACK": "1"}
    )
    assert tel.pipeline is None and not tel.enabled
    tel.track("x", {"a": 1})
    assert tel.status().counters.accepted == 0


def test_debug_mode_prints_and_sends_nothing(tmp_path: Path, clean_env: dict[str, str]) -> None:
    with RecordingServer() as server:
        env = {**clean_env, "WAYPOST_DEBUG": "1"}
        seen, stderr = run_audited(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent / "support")!r})
            import waypost
            from urlsink import UrlSink
            tel = waypost.Telemetry(
                app="dbg", sink_classes=[UrlSink], data_dir={str(tmp_path / "data")!r},
                config={{"telemetry": {{"notice": {{"enabled": False}}, "sinks": {{
                    "dest": {{"type": "urltest", "url": {server.url + "/ingest"!r}}}}}}}}},
            )
            tel.track("debugged", {{"email": "someone@example.com", "n": 1}})
            assert tel.flush(5)
            tel.shutdown()
            """,
            env,
            tmp_path,
        )
        assert server.requests == []
    assert not [s for s in seen if s[0].startswith("socket.")]
    assert "[waypost debug] sink 'dest'" in stderr and "nothing sent" in stderr
    assert '"debugged"' in stderr and "someone@example.com" not in stderr
    assert "[REDACTED:secret_key]" in stderr or "[REDACTED:email]" in stderr


# --- every off switch, every entry point ---------------------------------------------------------
# One audited process per switch runs every entry point in turn and reports, per entry point,
# the sockets it opened, the files it wrote or created and the callbacks and hooks it ran.

SWITCHES: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "do_not_track": ({"DO_NOT_TRACK": "1"}, {}),
    "app_env": ({"MYAPP_NO_TELEMETRY": "true"}, {"disable_env": "MYAPP_NO_TELEMETRY"}),
    "config": ({}, {"enabled": False}),
    "stored_consent": ({}, {}),  # consent.json says off, written before the process starts
    "opt_in_without_consent": ({}, {"mode": "opt-in"}),
    "level_off": ({}, {"level": "off"}),
}
API = [
    "Telemetry()", "track", "schedule", "heartbeat", "send_heartbeat", "metrics", "status",
    "on_shutdown", "flush", "shutdown",
]  # fmt: skip
CLI = [
    "status", "status --json", "show", "show --json", "manifest --json", "flush",
    "flush --json", "send-heartbeat", "send-heartbeat --json --force", "test-sink ingest",
    "test-sink ingest --json",
]  # fmt: skip

REPORTING_AUDIT = textwrap.dedent(
    """
    import json, os, sys, threading
    current = ["start"]
    seen = {}
    calls = []
    def hook(event, args):
        if current[0] == "done":
            return
        writing = event == "open" and len(args) > 1 and any(c in str(args[1] or "") for c in "wax+")
        made = event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink")
        if event.startswith("socket.") or made or (writing and "__pycache__" not in str(args[0])):
            seen.setdefault(current[0], []).append([event, repr(args)[:160]])
    sys.addaudithook(hook)
    def called(what):
        def record(*args, **kwargs):
            calls.append([current[0], what])
            return {"n": 1}
        return record
    import waypost
    class Recorder:
        @waypost.hookimpl
        def waypost_context(self, context):
            calls.append([current[0], "waypost_context"])
        @waypost.hookimpl
        def waypost_heartbeat(self, facts):
            calls.append([current[0], "waypost_heartbeat"])
        @waypost.hookimpl
        def waypost_before_send(self, event):
            calls.append([current[0], "waypost_before_send"])
            return event
    def finish():
        current[0] = "done"
        threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("waypost"))
        print("REPORT " + json.dumps({"seen": seen, "calls": calls, "threads": threads}))
    """
)


def _config(server_url: str, tmp_path: Path, section: dict[str, Any]) -> dict[str, Any]:
    return {
        "telemetry": {
            "app": "myapp",
            "data_dir": str(tmp_path / "data"),
            "notice": {"enabled": False},
            "heartbeat": {"every": "1h", "first_delay": 0},
            "sinks": {
                "file": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")},
                "ingest": {"type": "http", "url": f"{server_url}/ingest"},
            },
            **section,
        }
    }


def _prepare(switch: str, tmp_path: Path) -> None:
    if switch == "stored_consent":
        from waypost.privacy import StoredConsent

        StoredConsent(False, "1", 1.0).write(tmp_path / "data")


def _report(code: str, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", REPORTING_AUDIT + textwrap.dedent(code) + "\nfinish()\n"],
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    report: dict[str, Any] = json.loads(line[len("REPORT ") :])
    return report


_REPORTS: dict[tuple[str, str], dict[str, Any]] = {}


def _api_report(switch: str, tmp_path: Path, clean_env: dict[str, str]) -> dict[str, Any]:
    env_extra, section = SWITCHES[switch]
    _prepare(switch, tmp_path)
    with RecordingServer() as server:
        config = _config(server.url, tmp_path, section)
        report = _report(
            f"""
            support = {str(Path(__file__).parent / "support")!r}
            sys.path.insert(0, support)
            current[0] = "Telemetry()"
            tel = waypost.Telemetry(config={config!r}, plugins=[Recorder()])
            current[0] = "track"
            for i in range(200):
                tel.track("x", {{"i": i, "email": "a@example.com"}})
            tel.track("crash", {{"error": "boom"}}, level="error")
            current[0] = "schedule"
            job = tel.schedule("job", called("schedule callback"), every="1h", first_delay=0)
            assert not tel.scheduler.run(job) and job.last_outcome == "skipped: telemetry is off"
            current[0] = "heartbeat"
            tel.heartbeat(every="1h", first_delay=0, facts=called("facts callback"))
            current[0] = "send_heartbeat"
            assert tel.send_heartbeat(force=True) is False
            assert tel.last_heartbeat_outcome == "skipped: telemetry is off"
            current[0] = "metrics"
            counter = tel.metrics.counter("runs", labels={{"kind": "optional"}})
            counter.add(1, {{"kind": "a"}})
            tel.metrics.gauge("queue").set(3)
            tel.metrics.histogram("seconds").record(0.5)
            tel.metrics.collect()
            tel.metrics.destinations()
            current[0] = "status"
            st = tel.status()
            assert not st.enabled and not tel.enabled, st
            current[0] = "on_shutdown"
            tel.on_shutdown(called("shutdown callback"))
            current[0] = "flush"
            assert tel.flush(2)
            current[0] = "shutdown"
            tel.shutdown(2)
            """,
            {**clean_env, **env_extra},
            tmp_path,
        )
        report["requests"] = len(server.requests)
    return report


def _cli_report(switch: str, tmp_path: Path, clean_env: dict[str, str]) -> dict[str, Any]:
    env_extra, section = SWITCHES[switch]
    _prepare(switch, tmp_path)
    with RecordingServer() as server:
        config_file = tmp_path / "telemetry.yml"
        config_file.write_text(json.dumps(_config(server.url, tmp_path, section)))
        report = _report(
            f"""
            from waypost.cli import main
            for command in {CLI!r}:
                current[0] = command
                try:
                    main(["--config", {str(config_file)!r}, *command.split()])
                except SystemExit:
                    pass
            """,
            {**clean_env, **env_extra},
            tmp_path,
        )
        report["requests"] = len(server.requests)
    return report


def _cached(kind: str, switch: str, tmp_path_factory: Any, clean_env: dict[str, str]) -> Any:
    key = (kind, switch)
    if key not in _REPORTS:
        where = tmp_path_factory.mktemp(f"{kind}-{switch}")
        make = _api_report if kind == "api" else _cli_report
        _REPORTS[key] = {"report": make(switch, where, clean_env), "dir": where}
    return _REPORTS[key]


def _assert_off(entry: str, found: dict[str, Any]) -> None:
    report, where = found["report"], found["dir"]
    assert report["seen"].get(entry, []) == [], f"{entry}: sockets or files"
    assert [c for c in report["calls"] if c[0] == entry] == [], f"{entry}: callbacks or hooks"
    assert report["requests"] == 0
    assert report["threads"] == [], "no waypost thread runs while telemetry is off"
    assert not (where / "events.jsonl").exists()
    data = where / "data"
    assert not data.exists() or [p.name for p in data.iterdir()] == ["consent.json"]


@pytest.mark.parametrize("entry", API)
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_off_means_off_for_each_entry_point(
    switch: str, entry: str, tmp_path_factory: Any, waypost_clean_env: dict[str, str]
) -> None:
    _assert_off(entry, _cached("api", switch, tmp_path_factory, waypost_clean_env))


@pytest.mark.parametrize("command", CLI)
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_off_means_off_for_each_cli_command(
    switch: str, command: str, tmp_path_factory: Any, waypost_clean_env: dict[str, str]
) -> None:
    _assert_off(command, _cached("cli", switch, tmp_path_factory, waypost_clean_env))


@pytest.mark.http_sink
def test_the_audit_sees_an_entry_point_that_is_on(
    tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    # The same process with telemetry on writes, connects and calls back: the checks can fail.
    with RecordingServer() as server:
        config = _config(server.url, tmp_path, {})
        report = _report(
            f"""
            tel = waypost.Telemetry(config={config!r}, plugins=[Recorder()])
            current[0] = "send_heartbeat"
            tel.heartbeat(every="1h", first_delay="1h", facts=called("facts callback"))
            assert tel.send_heartbeat(force=True)
            assert tel.flush(10)
            tel.shutdown(5)
            """,
            waypost_clean_env,
            tmp_path,
        )
        assert server.requests
    assert report["seen"]["send_heartbeat"]
    assert ["send_heartbeat", "facts callback"] in report["calls"]
    assert ["send_heartbeat", "waypost_heartbeat"] in report["calls"]


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_looking_at_a_stored_outbox_while_off_writes_nothing(
    tmp_path: Path, waypost_clean_env: dict[str, str], waypost_cli: str
) -> None:
    """``status()``, ``waypost status`` and ``show`` read the outbox an earlier run left as it
    is: no -wal or -shm file made, nothing in the data dir touched (off means off; ``show`` is
    read-only), and what it holds is still reported."""
    import waypost

    (tmp_path / "telemetry.yml").write_text(
        textwrap.dedent(
            f"""
            telemetry:
              app: offlook
              data_dir: {tmp_path / "data"}
              notice: {{enabled: false}}
              outbox: {{keep_sent: 1d}}
              sinks:
                out: {{type: jsonl, path: "{tmp_path / "sent.jsonl"}"}}
            """
        )
    )
    config = str(tmp_path / "telemetry.yml")
    on = waypost.Telemetry(config=config, env=waypost_clean_env)
    for i in range(5):
        on.track("kept", {"i": i})
    assert on.shutdown(10)
    before = _listing(tmp_path / "data")
    assert "outbox.sqlite3" in before and "outbox.sqlite3-wal" not in before
    off_env = {**waypost_clean_env, "DO_NOT_TRACK": "1"}
    off = waypost.Telemetry(config=config, env=off_env)
    assert off.status().outbox["out"]["sent"] == 5
    for args in (["status", "--json"], ["show", "--json"], ["status"], ["show"]):
        out = subprocess.run(
            [waypost_cli, "--config", config, *args],
            env=off_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, (args, out.stderr)
    assert json.loads(
        subprocess.run(
            [waypost_cli, "--config", config, "show", "--json", "--state", "sent"],
            env=off_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        ).stdout
    )["total"] == 5  # fmt: skip
    assert _listing(tmp_path / "data") == before
