"""The CLI as an operator meets it, run as a real subprocess: broken sinks, failing
destinations, exit codes, concurrent cron runs, errors a script can read."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from waypost.testing import RecordingServer, Response, free_port

RUN = "import sys; from waypost.cli import main; main(sys.argv[1:])"


@pytest.fixture
def env(tmp_path: Path, waypost_clean_env: dict[str, str]) -> dict[str, str]:
    """A clean environment whose per-user data (the installation record, default data dirs)
    lives in the test's own directory."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        **waypost_clean_env,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "COLUMNS": "300",
    }


def run(
    args: list[str], env: dict[str, str], cwd: Path, *, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN, *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_app(code: str, env: dict[str, str], cwd: Path) -> None:
    """Run ``code`` as the application would: another process than the CLI."""
    app = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert app.returncode == 0, app.stderr


def write(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


def as_json(out: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise AssertionError(f"not JSON ({out.returncode}):\n{out.stdout}\n{out.stderr}") from None


def broken_plugin(site: Path) -> None:
    """An installed distribution whose sink plugin fails to import, as pip would leave it."""
    info = site / "waypost_brokensink-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: waypost-brokensink\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text("[waypost.sinks]\nbrokensink = waypost_brokensink\n")
    (site / "waypost_brokensink.py").write_text("import a_module_that_is_not_installed\n")


# --- a broken sink never stops the consent and inspection commands ----------------------------


def test_broken_sinks_leave_every_consent_and_inspection_command_working(
    tmp_path: Path, env: dict[str, str]
) -> None:
    site = tmp_path / "site"
    broken_plugin(site)
    env = {**env, "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}
    write(
        tmp_path / "telemetry.yml",
        """
        telemetry:
          app: brokenapp
          data_dir: data
          sinks:
            local: {type: jsonl, path: events.jsonl}
            missing: {type: nosuchsink}
            broken: {type: brokensink}
            secret: {type: posthog, api_key: "${POSTHOG_KEY_NOT_SET}"}
        """,
    )
    status = run(["status", "--json"], env, tmp_path)
    assert status.returncode == 0, status.stderr
    sinks = {s["name"]: s for s in as_json(status)["sinks"]}
    assert sinks["local"]["state"] != "error" and sinks["local"]["error"] is None
    assert sinks["missing"]["state"] == "error"
    assert "unknown sink type 'nosuchsink'" in sinks["missing"]["error"]
    assert sinks["broken"]["state"] == "error"
    assert "a_module_that_is_not_installed" in sinks["broken"]["error"]
    assert sinks["secret"]["state"] == "error"
    assert "telemetry.sinks.secret.api_key" in sinks["secret"]["error"]
    assert "POSTHOG_KEY_NOT_SET" in sinks["secret"]["error"]

    text = run(["status"], env, tmp_path)
    assert text.returncode == 0, text.stderr
    assert "a_module_that_is_not_installed" in text.stdout and "error" in text.stdout

    off = run(["consent", "off", "--json"], env, tmp_path)
    assert off.returncode == 0, off.stderr
    assert as_json(off)["enabled"] is False
    assert as_json(run(["status", "--json"], env, tmp_path))["enabled"] is False
    on = run(["consent", "on"], env, tmp_path)
    assert on.returncode == 0, on.stderr
    assert as_json(run(["status", "--json"], env, tmp_path))["enabled"] is True

    for args in (["show", "--json"], ["purge", "--sent", "--json"]):
        out = run(args, env, tmp_path)
        assert out.returncode == 0, (args, out.stderr)
        as_json(out)
    manifest = run(["manifest", "--json"], env, tmp_path)
    assert manifest.returncode == 0, manifest.stderr
    listed = {s["name"]: s for s in as_json(manifest)["sinks"]}
    assert set(listed) == {"local", "missing", "broken", "secret"}
    assert "a_module_that_is_not_installed" in listed["broken"]["error"]


def test_a_plugin_module_that_fails_to_import_leaves_consent_off_working(
    tmp_path: Path, env: dict[str, str]
) -> None:
    write(
        tmp_path / "telemetry.yml",
        """
        telemetry:
          app: pluginapp
          data_dir: data
          plugins: [a_plugin_module_not_on_the_path]
          sinks:
            local: {type: jsonl, path: events.jsonl}
        """,
    )
    off = run(["consent", "off"], env, tmp_path)
    assert off.returncode == 0, off.stderr
    assert "a_plugin_module_not_on_the_path" in off.stderr
    assert as_json(run(["status", "--json"], env, tmp_path))["enabled"] is False


# --- exit codes a script or cron can read --------------------------------------------------------


def http_config(tmp_path: Path, url: str, extra: str = "") -> None:
    write(
        tmp_path / "telemetry.yml",
        f"""
        telemetry:
          app: exitapp
          version: "4.2.0"
          data_dir: data
          notice: {{enabled: false}}
          sinks:
            remote: {{type: http, url: "{url}"}}
        {extra}
        """,
    )


@pytest.mark.http_sink
def test_test_sink_exits_1_when_the_destination_refuses(
    tmp_path: Path, env: dict[str, str]
) -> None:
    with RecordingServer(lambda request: Response(400, {"error": "bad event"})) as server:
        http_config(tmp_path, server.url)
        refused = run(["test-sink", "remote", "--json"], env, tmp_path)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        data = as_json(refused)
        assert data["ok"] is False and data["answer"]["delivered"] is False
        assert data["answer"]["status"] == 400
        text = run(["test-sink", "remote"], env, tmp_path)
        assert text.returncode == 1 and "did not take" in text.stderr
        sent = [json.loads(r.body) for r in server.requests]
    assert sent, "the test event never reached the destination"
    with RecordingServer() as server:
        http_config(tmp_path, server.url)
        taken = run(["test-sink", "remote", "--json"], env, tmp_path)
        assert taken.returncode == 0, taken.stdout + taken.stderr
        assert as_json(taken)["ok"] is True
    unknown = run(["test-sink", "nosuch", "--json"], env, tmp_path)
    assert unknown.returncode == 2 and "nosuch" in as_json(unknown)["error"]


@pytest.mark.http_sink
def test_send_heartbeat_exits_1_when_it_is_not_delivered(
    tmp_path: Path, env: dict[str, str]
) -> None:
    http_config(tmp_path, f"http://127.0.0.1:{free_port()}/nobody-listens")
    down = run(["send-heartbeat", "--timeout", "3", "--json"], env, tmp_path)
    assert down.returncode == 1, down.stdout + down.stderr
    data = as_json(down)
    assert data["sent"] is True and data["delivered"] is False and data["pending"] >= 1
    with RecordingServer() as server:
        http_config(tmp_path, server.url)
        # Not due again (a day), but the one kept from the first run is delivered now.
        up = run(["send-heartbeat", "--json"], env, tmp_path)
        assert up.returncode == 0, up.stdout + up.stderr
        assert as_json(up)["delivered"] is True
        assert server.requests, "the kept heartbeat was not delivered"
    with RecordingServer(lambda request: Response(400, {"error": "no"})) as server:
        http_config(tmp_path, server.url)
        refused = run(["send-heartbeat", "--force", "--json"], env, tmp_path)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert as_json(refused)["delivered"] is False and as_json(refused)["failed"] >= 1


def test_every_command_documents_its_exit_codes(tmp_path: Path, env: dict[str, str]) -> None:
    for command in ("test-sink", "send-heartbeat", "flush"):
        out = run([command, "--help"], env, tmp_path)
        assert out.returncode == 0
        assert "Exits 0" in out.stdout and " 1 " in " ".join(out.stdout.split()), command
    show = run(["show", "--help"], env, tmp_path).stdout
    assert "--limit" in show and "at most" in show and "Skip" in show


# --- the heartbeat from cron ----------------------------------------------------------------------


def test_four_concurrent_send_heartbeat_runs_send_one(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "beats.jsonl"
    write(
        tmp_path / "telemetry.yml",
        f"""
        telemetry:
          app: cronapp
          version: "7.1.0"
          data_dir: data
          notice: {{enabled: false}}
          sinks:
            beats: {{type: jsonl, path: "{out}"}}
        """,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, "send-heartbeat", "--json"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stdout + stderr
        results.append(json.loads(stdout))
    beats = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(beats) == 1, beats
    assert sorted(r["sent"] for r in results) == [False, False, False, True]
    assert all(r["delivered"] for r in results)
    again = run(["send-heartbeat", "--json"], env, tmp_path)
    assert again.returncode == 0 and as_json(again)["sent"] is False
    assert len(out.read_text().splitlines()) == 1


# --- messages -------------------------------------------------------------------------------------


def test_no_warning_about_the_app_name_when_the_config_gives_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    write(
        tmp_path / "telemetry.yml",
        """
        telemetry:
          app: namedapp
          notice: {enabled: false}
          sinks:
            local: {type: jsonl, path: events.jsonl}
        """,
    )
    for args in (["status"], ["send-heartbeat"]):
        out = run(args, env, tmp_path)
        assert out.returncode == 0, out.stderr
        assert "no application name" not in out.stderr, args
    write(tmp_path / "other" / "telemetry.yml", "telemetry:\n  sinks: {log: {}}\n")
    nameless = run(["status"], env, tmp_path / "other")
    assert nameless.stderr.count("no application name") == 1


def test_json_errors_are_json_and_name_every_typo(tmp_path: Path, env: dict[str, str]) -> None:
    write(
        tmp_path / "telemetry.yml",
        """
        telemetry:
          app: typoapp
          sinkz: {}
          heartbeet: {every: 1h}
        """,
    )
    for args in (["status", "--json"], ["show", "--json"], ["consent", "off", "--json"]):
        out = run(args, env, tmp_path)
        assert out.returncode == 2, out.stdout
        data = as_json(out)
        assert data["ok"] is False
        assert "telemetry.sinkz" in data["error"] and "telemetry.heartbeet" in data["error"]
        assert data["source"].endswith("telemetry.yml")
    text = run(["status"], env, tmp_path)
    assert text.returncode == 2 and text.stderr.startswith("Error: ") and not text.stdout
    usage = run(["show", "--limit", "0", "--json"], env, tmp_path)
    assert usage.returncode == 2 and "--limit" in as_json(usage)["error"]


def purge_config(tmp_path: Path, sink: str, *, outbox: str = "{}") -> None:
    """The purge tests' config: one sink, named and set as ``sink`` says."""
    write(
        tmp_path / "telemetry.yml",
        f"""
        telemetry:
          app: purgeapp
          data_dir: data
          notice: {{enabled: false}}
          outbox: {outbox}
          sinks:
            {sink}
        """,
    )


@pytest.mark.http_sink
def test_purge_all_asks_unless_yes(tmp_path: Path, env: dict[str, str]) -> None:
    """It asks when undelivered events would go; with nothing undelivered there is nothing to
    ask (see the next test)."""
    purge_config(tmp_path, f'remote: {{type: http, url: "http://127.0.0.1:{free_port()}/down"}}')
    kept = run(["send-heartbeat", "--timeout", "2"], env, tmp_path)
    assert kept.returncode == 1, kept.stderr
    total = as_json(run(["show", "--json"], env, tmp_path))["total"]
    assert total >= 1
    declined = run(["purge", "--all"], env, tmp_path, stdin="n\n")
    assert declined.returncode == 1 and "Delete every record" in declined.stderr
    unanswered = run(["purge", "--all", "--json"], env, tmp_path)  # closed input: a no
    assert unanswered.returncode == 1 and "--yes" in as_json(unanswered)["error"]
    assert as_json(run(["show", "--json"], env, tmp_path))["total"] == total
    yes = run(["purge", "--all", "--yes", "--json"], env, tmp_path)
    assert yes.returncode == 0 and as_json(yes)["deleted"] == total
    assert as_json(run(["show", "--json"], env, tmp_path))["total"] == 0


def test_purge_all_of_delivered_records_needs_no_answer(
    tmp_path: Path, env: dict[str, str]
) -> None:
    out = tmp_path / "sent.jsonl"
    purge_config(tmp_path, f'out: {{type: jsonl, path: "{out}"}}', outbox="{keep_sent: 1d}")
    assert run(["send-heartbeat"], env, tmp_path).returncode == 0
    total = as_json(run(["show", "--json"], env, tmp_path))["total"]
    assert total >= 1
    purged = run(["purge", "--all", "--json"], env, tmp_path)  # no input, none needed
    assert purged.returncode == 0 and as_json(purged)["deleted"] == total, purged.stdout


# --- what the CLI sends carries the application's name, version and facts -----------------------


def test_a_cron_heartbeat_carries_the_version_and_facts_the_application_recorded(
    tmp_path: Path, env: dict[str, str]
) -> None:
    app_dir = tmp_path / "app"
    out = tmp_path / "sent.jsonl"
    write(
        app_dir / "telemetry.yml",
        f"""
        telemetry:
          app: ledger
          notice: {{enabled: false}}
          heartbeat: {{every: 7d, first_delay: 1h, time_of_day: null, event: telemetry_report}}
          sinks:
            out: {{type: jsonl, path: "{out}"}}
        """,
    )
    # The application: its version in code, its counts recorded for the weekly cron job.
    code = textwrap.dedent(
        """
        import waypost
        tel = waypost.Telemetry(version="6.1.4", config="telemetry.yml")
        tel.record_facts({"platform": {"counts": {"accounts": 3, "budgets": 2}}})
        assert tel.shutdown(timeout=60)
        """
    )
    run_app(code, env, app_dir)
    # Cron, in another directory, names only the application.
    elsewhere = tmp_path / "cron"
    elsewhere.mkdir()
    status = run(["--app", "ledger", "status", "--json"], env, elsewhere)
    assert status.returncode == 0, status.stderr
    st = as_json(status)
    assert st["config_file"] == str(app_dir / "telemetry.yml")
    assert [s["name"] for s in st["sinks"]] == ["out"]
    beat = run(["--app", "ledger", "send-heartbeat", "--json"], env, elsewhere)
    assert beat.returncode == 0, beat.stdout + beat.stderr
    assert as_json(beat)["sent"] is True
    (event,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert event["name"] == "telemetry_report"
    assert event["context"]["app"] == {"name": "ledger", "version": "6.1.4"}
    assert event["properties"]["env"]["ledger"] == "6.1.4"
    assert event["properties"]["platform"]["counts"] == {"accounts": 3, "budgets": 2}
    test = run(["--app", "ledger", "test-sink", "out"], env, elsewhere)
    assert test.returncode == 0, test.stderr
    sent = [json.loads(line) for line in out.read_text().splitlines()]
    assert sent[-1]["name"] == "waypost_test"
    assert sent[-1]["context"]["app"]["version"] == "6.1.4"


def test_the_config_version_wins_for_cli_events(tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "sent.jsonl"
    write(
        tmp_path / "telemetry.yml",
        f"""
        telemetry:
          app: versioned
          version: "2.0.0"
          data_dir: data
          notice: {{enabled: false}}
          sinks:
            out: {{type: jsonl, path: "{out}"}}
        """,
    )
    assert run(["send-heartbeat"], env, tmp_path).returncode == 0
    (event,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert event["context"]["app"] == {"name": "versioned", "version": "2.0.0"}


# --- status from the outbox, as any process sees it ---------------------------------------------


@pytest.mark.http_sink
def test_status_shows_refusals_and_the_last_error_from_another_process(
    tmp_path: Path, env: dict[str, str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    with RecordingServer(lambda request: Response(400, {"error": "invalid event"})) as server:
        write(
            tmp_path / "telemetry.yml",
            f"""
            telemetry:
              app: failing
              data_dir: data
              notice: {{enabled: false}}
              sinks:
                refusing: {{type: http, url: "{server.url}"}}
                down: {{type: http, url: "{dead}"}}
            """,
        )
        code = textwrap.dedent(
            """
            import waypost
            tel = waypost.Telemetry(config="telemetry.yml")
            for i in range(3):
                tel.track("run", {"n": i})
            tel.flush(timeout=10)
            tel.shutdown(timeout=10)
            """
        )
        run_app(code, env, tmp_path)
        assert server.requests, "the refusing destination was never asked"
    out = run(["status", "--json"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    sinks = {s["name"]: s for s in as_json(out)["sinks"]}
    refusing, down = sinks["refusing"], sinks["down"]
    assert refusing["refused"] == 3 and refusing["pending"] == 0
    assert "400" in refusing["last_error"] and refusing["last_error_at"]
    assert down["state"] == "retrying" and down["pending"] == 3 and down["refused"] == 0
    assert down["last_error"]
    text = run(["status"], env, tmp_path)
    assert text.returncode == 0, text.stderr
    row = next(line for line in text.stdout.splitlines() if "refusing" in line)
    assert " 3 " in row and "400" in row
    assert "retrying" in next(line for line in text.stdout.splitlines() if "down" in line)
    show = run(["show", "--sink", "refusing"], env, tmp_path)
    assert "400" in show.stdout  # the reason column


# --- events for a sink that cannot be made are kept for it ----------------------------------------


def test_events_for_a_sink_that_cannot_be_made_are_kept_and_delivered_once_it_can(
    tmp_path: Path, env: dict[str, str]
) -> None:
    now, later = tmp_path / "now.jsonl", tmp_path / "later.jsonl"
    write(
        tmp_path / "telemetry.yml",
        f"""
        telemetry:
          app: keeper
          data_dir: data
          notice: {{enabled: false}}
          sinks:
            now: {{type: jsonl, path: "{now}"}}
            later: {{type: jsonl, path: "${{LATER_PATH}}", exclude_events: [noise]}}
        """,
    )
    code = textwrap.dedent(
        """
        import waypost
        tel = waypost.Telemetry(config="telemetry.yml")
        for i in range(3):
            tel.track("run", {"n": i})
        tel.track("noise", {})
        assert tel.flush(timeout=30)
        assert tel.shutdown(timeout=30)
        """
    )
    run_app(code, env, tmp_path)
    assert len(now.read_text().splitlines()) == 4  # the other sink was not held back
    status = as_json(run(["status", "--json"], env, tmp_path))
    sink = next(s for s in status["sinks"] if s["name"] == "later")
    assert sink["state"] == "error" and sink["pending"] == 3  # kept, routing honoured
    # The variable is set now (the plugin installed, the secret given): delivered.
    fixed = {**env, "LATER_PATH": str(later)}
    flush = run(["flush", "--json"], fixed, tmp_path)
    assert flush.returncode == 0, flush.stdout + flush.stderr
    assert sorted(json.loads(x)["properties"]["n"] for x in later.read_text().splitlines()) == [
        0,
        1,
        2,
    ]
    assert as_json(run(["status", "--json"], fixed, tmp_path))["outbox_pending_events"] == 0


def test_invalid_yaml_names_line_and_column_and_never_the_line(
    tmp_path: Path, env: dict[str, str]
) -> None:
    secret = "phc_d0NotPr1ntTh1sK3y"
    write(
        tmp_path / "telemetry.yml",
        f"""
        telemetry:
          app: yamlapp
          sinks:
            ph: {{type: posthog, api_key: "{secret}"
          level: usage
        """,
    )
    for args in (["status"], ["consent", "off", "--json"]):
        out = run(args, env, tmp_path)
        assert out.returncode == 2
        text = out.stdout + out.stderr
        assert "invalid YAML" in text and "line " in text and "column " in text, text
        assert secret not in text and "<unicode string>" not in text


@pytest.mark.http_sink
@pytest.mark.parametrize("command", ["flush", "send-heartbeat"])
def test_a_command_with_the_destination_down_returns_within_its_timeout(
    tmp_path: Path, env: dict[str, str], command: str
) -> None:
    # `--timeout` is the wait at most: the shutdown after the flush gets what is left of it
    # (it took 5 s more: `waypost flush --timeout 1` ended after 5 to 7 s).
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def reset_every_connection() -> None:  # a destination whose host drops every connection
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=reset_every_connection, daemon=True)
    thread.start()
    try:
        # Retries fall due often: a flush has something to do until its deadline.
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/ingest"
        write(
            tmp_path / "telemetry.yml",
            f"""
            telemetry:
              app: exitapp
              data_dir: data
              notice: {{enabled: false}}
              batch: {{interval: 0.05}}
              retry: {{initial: 0.05, maximum: 1.0}}
              sinks:
                remote: {{type: http, url: "{url}"}}
            """,
        )
        _a_command_within_its_timeout(tmp_path, env, command)
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _a_command_within_its_timeout(tmp_path: Path, env: dict[str, str], command: str) -> None:
    run_app(
        """
        import waypost
        tel = waypost.Telemetry(config="telemetry.yml")
        for i in range(50):
            tel.track("kept", {"i": i})
        tel.flush(3)
        tel.shutdown(2)
        """,
        env,
        tmp_path,
    )
    started = time.monotonic()
    down = run([command, "--timeout", "1", "--json"], env, tmp_path)
    elapsed = time.monotonic() - started
    assert down.returncode == 1, down.stdout + down.stderr
    data = as_json(down)
    if command == "flush":
        assert data["pending_after"] == 50 and data["lost"] == {}, data
    # the interpreter's start and waypost's import come on top of the budget
    assert elapsed < 1 + 3.0, (elapsed, data)
