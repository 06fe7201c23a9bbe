"""Firefly III's telemetry through waypost: opt-in, the records seen, submitted and deleted
with the CLI, the weekly cron submission and its receipt, against a stand-in server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from waypost.testing import RecordingServer, Response, free_port

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from firefly_app import Firefly  # noqa: E402

RECEIPT = "1ebfb9f0-6c0b-11ea-9aac-274c8c0cddda"


def waypost(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
    argv = [sys.executable, "-c", code, "--config", str(HERE / "telemetry.yml"), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def cli_json(env: dict[str, str], *args: str) -> Any:
    out = waypost(env, *args, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def use_the_app(env: dict[str, str], data: Path) -> Firefly:
    app = Firefly(env=env, data_dir=data, strict=True)
    app.register_user("james@example.com")
    app.register_user("anna@example.com")
    app.finish_wizard("nl_NL", "nl")
    app.run_command("firefly-iii:upgrade-database")
    app.run_command("firefly-iii:upgrade-database")  # only the first use is a flag
    assert app.telemetry.flush(timeout=10)
    app.telemetry.shutdown()
    return app


def test_off_until_send_telemetry(clean_env: dict[str, str], tmp_path: Path) -> None:
    for env in (clean_env, {**clean_env, "SEND_TELEMETRY": "false"}):
        app = use_the_app(env, tmp_path / "data")
        status = app.telemetry.status()
        assert not status.enabled and status.rule in ("default", "app_env")
    assert not (tmp_path / "data").exists()  # nothing collected, nothing stored


def test_view_submit_delete_and_the_weekly_report(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    down = f"http://127.0.0.1:{free_port()}/submit"  # the telemetry server is not reachable
    env = {
        **clean_env,
        "SEND_TELEMETRY": "true",
        "WAYPOST_HOME": str(data),
        "FIREFLY_TELEMETRY_URL": down,
    }  # no PYTHONPATH: the CLI finds firefly_app (telemetry.plugins) beside telemetry.yml
    use_the_app(env, data)

    # The records, read-only: what Firefly III shows under /admin/telemetry/view.
    shown = cli_json(env, "show")
    assert shown["total"] == 5 and {r["state"] for r in shown["records"]} == {"pending"}
    flags = sorted(
        (r["properties"]["flag"], str(r["properties"]["value"])) for r in shown["records"]
    )
    assert flags == [
        ("first_command", "firefly-iii:upgrade-database"),
        ("language", "nl_NL"),
        ("locale", "nl"),
        ("users", "1"),
        ("users", "2"),
    ]
    assert "example.com" not in json.dumps(shown)

    with RecordingServer(lambda r: Response(200, {"uuid": RECEIPT})) as server:
        env["FIREFLY_TELEMETRY_URL"] = f"{server.url}/submit"
        # Submit now, without waiting for the cron job.
        flushed = cli_json(env, "flush")
        assert flushed["ok"] and flushed["pending_before"] == 5 and flushed["pending_after"] == 0
        assert len([e for r in server.requests for e in r.json()]) == 5
        assert cli_json(env, "show", "--state", "sent")["total"] == 5

        # The weekly cron job: the report, and the server's receipt in the log.
        weekly = waypost(env, "send-heartbeat")
        assert weekly.returncode == 0, weekly.stderr
        assert f"firefly: receipt {RECEIPT}" in weekly.stdout
        report = server.requests[-1].json()[0]
        assert report["name"] == "telemetry_report"
        assert report["properties"]["platform"]["config"] == {"db": "sqlite"}
        again = cli_json(env, "send-heartbeat")  # the same week: not sent twice
        assert not again["sent"] and "already" in again["outcome"]
        forced = cli_json(env, "send-heartbeat", "--force")
        assert forced["sent"] and forced["receipts"] == {"firefly": [RECEIPT]}

    # Delete the submitted records, then everything.
    use_the_app({**env, "FIREFLY_TELEMETRY_URL": down}, data)  # 5 more, left pending
    assert cli_json(env, "purge", "--sent")["deleted"] == 7
    assert cli_json(env, "show")["total"] == 5
    assert cli_json(env, "purge", "--all", "--yes")["deleted"] == 5
    assert cli_json(env, "show")["total"] == 0


def test_the_readme_command_runs_from_the_repository_without_pythonpath(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    exe = shutil.which("waypost")
    assert exe, "the waypost console script is not installed"
    env = {k: v for k, v in clean_env.items() if k != "PYTHONPATH"}
    env["WAYPOST_HOME"] = str(tmp_path / "data")
    out = subprocess.run(
        [exe, "--config", "examples/firefly/telemetry.yml", "show"],
        cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "firefly_app" not in out.stderr and "0 records" in out.stdout
