"""The CLI, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import waypost
from waypost.testing import RecordingServer, free_port

SUPPORT = Path(__file__).parent / "support"


def waypost_run(
    args: list[str], env: dict[str, str], cwd: Path, exe: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "telemetry.yml"
    path.write_text(textwrap.dedent(body))
    return path


def test_demo_runs_the_whole_pipeline(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    out = waypost_run(
        ["--data-dir", str(tmp_path / "d"), "demo", "--json"], clean_env, tmp_path, waypost_cli
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    names = [r["name"] for r in data["records"]]
    assert names[0] == "version" and names[-1] == "shutdown" and "feedback_sent" in names
    feedback = next(r for r in data["records"] if r["name"] == "feedback_sent")
    assert "jane.doe@example.com" not in json.dumps(feedback)
    assert "email@properties.comment" in feedback["remarks"]
    run = next(r for r in data["records"] if r["name"] == "run")
    assert set(run["properties"]) == {"runIsWebhook", "runSeconds", "runSuccess", "runErrorMessage"}
    assert "[TELEMETRY] Endpoint: run" in out.stderr  # the log sink, Langflow style
    text = waypost_run(
        ["--data-dir", str(tmp_path / "e"), "demo"], clean_env, tmp_path, waypost_cli
    )
    assert text.returncode == 0 and "feedback_sent" in text.stdout


def test_demo_respects_do_not_track(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    out = waypost_run(
        ["--data-dir", str(tmp_path / "d"), "demo"],
        {**clean_env, "DO_NOT_TRACK": "1"},
        tmp_path,
        waypost_cli,
    )
    assert out.returncode == 0, out.stderr
    assert "off" in out.stdout and "DO_NOT_TRACK" in out.stdout
    assert not (tmp_path / "d" / "events.jsonl").exists()


def test_status_and_plugins_json(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    config(
        tmp_path,
        """
        telemetry:
          app: clitest
          data_dir: data
          disable_env: DISABLE_CLITEST_TELEMETRY
          sinks:
            jsonl: {path: events.jsonl}
    """,
    )
    out = waypost_run(["status", "--json"], clean_env, tmp_path, waypost_cli)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["enabled"] is True and st["rule"] == "default" and st["app"] == "clitest"
    assert st["data_dir"] == str(tmp_path / "data")
    assert [s["name"] for s in st["sinks"]] == ["jsonl"]
    off = waypost_run(
        ["status", "--json"],
        {**clean_env, "DISABLE_CLITEST_TELEMETRY": "true"},
        tmp_path,
        waypost_cli,
    )
    st = json.loads(off.stdout)
    assert st["enabled"] is False and st["rule"] == "app_env"
    assert "DISABLE_CLITEST_TELEMETRY=true" in st["reason"]
    plugins = json.loads(
        waypost_run(["plugins", "--json"], clean_env, tmp_path, waypost_cli).stdout
    )
    by_name = {p["name"]: p for p in plugins}
    assert by_name["jsonl"]["distribution"] == "waypost" and by_name["jsonl"]["status"] == "loaded"
    assert by_name["jsonl"]["version"] == waypost.__version__
    assert "register_sinks" in by_name["log"]["hooks"]


def test_bad_config_fails_with_file_key_and_reason(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    path = config(tmp_path, "telemetry:\n  mode: sometimes\n")
    out = waypost_run(["status"], clean_env, tmp_path, waypost_cli)
    assert out.returncode == 2
    assert str(path) in out.stderr and "telemetry.mode" in out.stderr
    config(tmp_path, "telemetry:\n  sinks:\n    nosuchdest: {token: x}\n")
    out = waypost_run(["status", "--json"], clean_env, tmp_path, waypost_cli)
    assert out.returncode == 0, out.stderr  # one broken sink is shown, not fatal
    (sink,) = json.loads(out.stdout)["sinks"]
    assert sink["state"] == "error"
    assert "telemetry.sinks.nosuchdest: unknown sink type 'nosuchdest'" in sink["error"]
    assert "installed types are" in sink["error"]
    assert "pip install waypost-nosuchdest" in sink["error"]


def test_consent_is_stored_and_the_config_file_wins(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    config(tmp_path, "telemetry:\n  data_dir: data\n  sinks: {log: {}}\n")
    out = waypost_run(["consent", "off", "--json"], clean_env, tmp_path, waypost_cli)
    assert json.loads(out.stdout) == {
        "stored": "off",
        "enabled": False,
        "rule": "admin",
        "reason": "the administrator turned telemetry off",
        "overridden": False,
    }
    st = json.loads(waypost_run(["status", "--json"], clean_env, tmp_path, waypost_cli).stdout)
    assert st["enabled"] is False and st["rule"] == "admin"
    config(tmp_path, "telemetry:\n  enabled: true\n  data_dir: data\n  sinks: {log: {}}\n")
    st = json.loads(waypost_run(["status", "--json"], clean_env, tmp_path, waypost_cli).stdout)
    assert st["enabled"] is True and st["rule"] == "config"
    out = json.loads(
        waypost_run(["consent", "off", "--json"], clean_env, tmp_path, waypost_cli).stdout
    )
    assert out["overridden"] is True and out["enabled"] is True


def test_manifest_lists_the_fields_of_a_declared_payload(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    (tmp_path / "myschemas.py").write_text(
        textwrap.dedent('''
        from pydantic import Field
        import waypost

        class ChatflowCreated(waypost.Payload, event="chatflow_created"):
            """A chatflow was created."""
            version: str = Field(description="App version.")
            chatflow_id: str = Field(serialization_alias="chatlowId", description="Chatflow id.")
            node_count: int = Field(serialization_alias="nodeCount")
            """How many nodes the flow has."""
    ''')
    )
    config(tmp_path, "telemetry:\n  data_dir: data\n  schemas: [myschemas]\n  sinks: {jsonl: {}}\n")
    env = {**clean_env, "PYTHONPATH": str(tmp_path)}
    out = waypost_run(["manifest", "--json"], env, tmp_path, waypost_cli)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (event,) = data["events"]
    assert event["event"] == "chatflow_created"
    fields = {f["property"]: f for f in event["fields"]}
    assert set(fields) == {"version", "chatlowId", "nodeCount"}
    assert fields["chatlowId"]["type"] == "string" and fields["nodeCount"]["type"] == "integer"
    assert fields["nodeCount"]["description"] == "How many nodes the flow has."
    md = waypost_run(["manifest"], env, tmp_path, waypost_cli).stdout
    assert "`chatlowId` | string | Chatflow id." in md


def test_show_flush_and_purge(tmp_path: Path, clean_env: dict[str, str], waypost_cli: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/ingest"
    config(
        tmp_path,
        f"""
        telemetry:
          data_dir: data
          outbox: {{keep_sent: 1d}}
          plugins: [urlsink]
          sinks:
            dest: {{type: urltest, url: "{url}", timeout: 1}}
    """,
    )
    env = {**clean_env, "PYTHONPATH": str(SUPPORT)}
    tel = waypost.Telemetry(
        app="cli", config=tmp_path / "telemetry.yml", env=env, notice=lambda text: None
    )
    assert list(tel.sinks) == ["dest"]
    for i in range(30):
        tel.track("held", {"i": i, "owner": "ann@example.com"})
    assert tel.flush(5)
    tel.shutdown(1)
    shown = json.loads(
        waypost_run(["show", "--json", "--state", "pending"], env, tmp_path, waypost_cli).stdout
    )
    assert shown["total"] == 30
    assert shown["records"][0]["remarks"] == ["email@properties.owner"]
    assert "ann@example.com" not in json.dumps(shown)
    # The destination is down: flush says what is still pending and why, and fails.
    down = waypost_run(["flush", "--timeout", "2"], env, tmp_path, waypost_cli)
    assert down.returncode == 1, down.stderr + down.stdout
    assert "30 still pending" in down.stdout, down.stdout
    assert "dest: 30 pending" in down.stdout and "Traceback" not in down.stderr, down.stdout
    with RecordingServer(port=port) as server:
        out = waypost_run(["flush", "--json", "--timeout", "20"], env, tmp_path, waypost_cli)
        assert out.returncode == 0, out.stderr + out.stdout
        result: dict[str, Any] = json.loads(out.stdout)
        assert result["ok"] and result["pending_before"] == 30 and result["pending_after"] == 0
        assert result["delivered"] == 30 and result["pending"] == {} and result["lost"] == {}
        assert len({e["id"] for r in server.requests for e in r.json()}) == 30
    sent = json.loads(
        waypost_run(["show", "--json", "--state", "sent"], env, tmp_path, waypost_cli).stdout
    )
    assert sent["total"] == 30
    purged = json.loads(
        waypost_run(["purge", "--sent", "--json"], env, tmp_path, waypost_cli).stdout
    )
    assert purged == {"deleted": 30, "what": "sent"}
    assert (
        json.loads(waypost_run(["show", "--json"], env, tmp_path, waypost_cli).stdout)["total"] == 0
    )


def test_test_sink_sends_one_event(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    config(
        tmp_path,
        "telemetry:\n  data_dir: data\n  sinks:\n    file: {type: jsonl, path: out.jsonl}\n",
    )
    out = waypost_run(["test-sink", "file", "--json"], clean_env, tmp_path, waypost_cli)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["answer"]["delivered"] is True
    line = json.loads((tmp_path / "data" / "out.jsonl").read_text())
    assert line["name"] == "waypost_test"
    missing = waypost_run(["test-sink", "nope"], clean_env, tmp_path, waypost_cli)
    assert missing.returncode == 2 and "no sink named 'nope'" in missing.stderr
    off = waypost_run(
        ["test-sink", "file"], {**clean_env, "DO_NOT_TRACK": "1"}, tmp_path, waypost_cli
    )
    assert off.returncode == 1 and "telemetry is off" in off.stdout


def test_the_cli_finds_the_applications_data_dir_from_its_config_file(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    home = tmp_path / "home"
    env = {**clean_env, "HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share")}
    path = config(tmp_path, "telemetry:\n  sinks: {log: {}}\n")
    app = textwrap.dedent(f"""
        import waypost
        tel = waypost.Telemetry(app="myq", config={str(path)!r}, notice=lambda text: None)
        tel.track("x")
        tel.shutdown()
        print(tel.data_dir)
    """)
    ran = subprocess.run([sys.executable, "-c", app], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    data_dir = ran.stdout.strip()
    assert data_dir.endswith("/waypost/myq")
    st = json.loads(
        waypost_run(["--config", str(path), "status", "--json"], env, tmp_path, waypost_cli).stdout
    )
    assert st["app"] == "myq" and st["data_dir"] == data_dir


def test_consent_off_from_the_cli_sends_nothing(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    with RecordingServer() as server:
        config(
            tmp_path,
            f"""
            telemetry:
              enabled: true
              data_dir: data
              plugins: [urlsink]
              sinks:
                dest: {{type: urltest, url: "{server.url}/x"}}
        """,
        )
        env = {**clean_env, "PYTHONPATH": str(SUPPORT)}
        out = waypost_run(["consent", "off", "--json"], env, tmp_path, waypost_cli)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["overridden"] is True
        assert server.requests == []


def test_status_without_a_secret_in_this_environment(
    tmp_path: Path, clean_env: dict[str, str], waypost_cli: str
) -> None:
    config(
        tmp_path,
        "telemetry:\n  data_dir: data\n  sinks:\n    f: {type: jsonl, path: '${OUT_FILE}'}\n",
    )
    out = waypost_run(["status", "--json"], clean_env, tmp_path, waypost_cli)
    assert out.returncode == 0, out.stderr
    (sink,) = json.loads(out.stdout)["sinks"]
    assert sink["state"] == "error" and "environment variable OUT_FILE is not set" in sink["error"]
    flush = waypost_run(["flush"], clean_env, tmp_path, waypost_cli)
    assert flush.returncode == 1 and "OUT_FILE" in flush.stdout


def test_the_cli_needs_no_rich(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """Only the core's required dependencies: plain, aligned tables; --json unchanged."""
    from waypost.cli.output import plain_table

    assert plain_table(("a", "long name"), [("xyz", "1"), ("q", "two\nlines")], title="t") == [
        "t",
        "a    long name",
        "---  ---------",
        "xyz  1",
        "q    two lines",
    ]
    code = (
        "import sys; sys.modules['rich'] = None; "  # any import of rich now fails
        "from waypost.cli import main; main(sys.argv[1:])"
    )
    data = ["--app", "plain", "--data-dir", str(tmp_path / "d")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *data, *args],
            env=clean_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    demo = run("demo", "--events", "3")
    assert demo.returncode == 0, demo.stderr
    assert "== waypost demo ==" in demo.stdout and "properties (as sent)" in demo.stdout
    status = run("status")
    assert status.returncode == 0, status.stderr
    assert "plain telemetry is on" in status.stdout
    header = next(line for line in status.stdout.splitlines() if line.startswith("sink"))
    assert header.split() == [
        "sink",
        "type",
        "state",
        "pending",
        "refused",
        "last",
        "success",
        "last",
        "error",
    ]
    plugins = run("plugins")
    assert plugins.returncode == 0, plugins.stderr
    assert "jsonl" in plugins.stdout and "waypost" in plugins.stdout
    assert json.loads(run("status", "--json").stdout)["app"] == "plain"
