"""The seed applications' examples pointed at a collector, end to end: FlowForge's ping (through
its http sink, and in its own shape on /ping), Firefly III's weekly report with the receipt its
log shows, looked up with ``waypost collector receipt``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import REPO, stored_rows, wait_for, write_config

from waypost.schedule import ManualClock
from waypost.testing import free_port

EXAMPLES = REPO / "examples"


def _import(example: str, module: str) -> Any:
    sys.path.insert(0, str(EXAMPLES / example))
    try:
        return __import__(module)
    finally:
        sys.path.remove(str(EXAMPLES / example))


@pytest.mark.filterwarnings("ignore:the plausible sink:DeprecationWarning")
def test_flowforge_ping(tmp_path: Path, serve: Any, child_env: dict[str, str]) -> None:
    data = tmp_path / "collector"
    served = serve(write_config(tmp_path / "c.yml", {"data_dir": str(data),
                                                     "apps": {"flowforge": {}}}))  # fmt: skip
    forge_app = _import("flowforge", "flowforge_app")
    clock = ManualClock(start=time.time())
    closed = f"http://127.0.0.1:{free_port()}"
    forge = forge_app.Forge(
        data_dir=tmp_path / "forge", env=child_env, strict=True, notice=lambda text: None,
        clock=clock, version="1.8.0", ping_url=f"{served.url}/v1/flowforge/events",
        posthog_host=closed, plausible_host=closed,
    )  # fmt: skip
    try:
        forge.users += ["alice", "bob"]
        forge.projects.append("p1")
        clock.advance(30)  # FlowForge pings 30 s after start once it is set up
        rows = wait_for(lambda: stored_rows(data), 30, "the ping in storage")
        (ping,) = rows
        assert ping["name"] == "heartbeat"
        assert ping["instance_id"] == forge.telemetry.instance_id
        assert ping["properties"]["platform"]["counts"] == {"users": 2, "teams": 0, "projects": 1}
        assert ping["properties"]["platform"]["config"] == {"driver": "localfs"}
        assert ping["context"]["app"] == {"name": "flowforge", "version": "1.8.0"}
        received = ping["context"]["collector"]["received_at"]
        assert received.endswith("Z") and "ip_hash" in ping["context"]["collector"]
        # The same snapshot in FlowForge's own shape, as its Node.js pinger posts it.
        shape = forge.telemetry.heartbeat_payload(forge.counts)
        answer = httpx.post(served.url + "/v1/flowforge/ping", json=shape)
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
        rows = wait_for(lambda: len(r := stored_rows(data)) == 2 and r, 30, "the second ping")
        raw = next(r for r in rows if r["name"] == "ping")
        assert raw["instance_id"] == forge.telemetry.instance_id
        assert raw["properties"]["platform"] == ping["properties"]["platform"]
    finally:
        forge.shutdown()


def test_firefly_receipt(tmp_path: Path, serve: Any, child_env: dict[str, str]) -> None:
    config = write_config(
        tmp_path / "c.yml",
        {"data_dir": str(tmp_path / "collector"), "apps": {"firefly-iii": {}}},
    )
    served = serve(config)
    data = tmp_path / "firefly"
    env = {
        **child_env,
        "SEND_TELEMETRY": "true",
        "WAYPOST_HOME": str(data),
        "FIREFLY_TELEMETRY_URL": f"{served.url}/v1/firefly-iii/events",
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES / "firefly"), child_env.get("PYTHONPATH", "")]),
    }
    firefly_app = _import("firefly", "firefly_app")
    app = firefly_app.Firefly(env=env, data_dir=data, strict=True)
    app.register_user("james@example.com")
    app.finish_wizard("nl_NL", "nl")
    assert app.telemetry.flush(timeout=10)
    app.telemetry.shutdown()

    code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
    weekly = subprocess.run(
        [sys.executable, "-c", code, "--config", str(EXAMPLES / "firefly" / "telemetry.yml"),
         "send-heartbeat", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert weekly.returncode == 0, weekly.stderr
    sent = json.loads(weekly.stdout)
    assert sent["sent"] and sent["delivered"]
    (receipt,) = sent["receipts"]["firefly"]  # what Firefly III's log shows, from the answer
    looked_up = subprocess.run(
        [sys.executable, "-c", code, "collector", "receipt", receipt, "--config", str(config),
         "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert looked_up.returncode == 0, looked_up.stderr
    held = json.loads(looked_up.stdout)
    assert held["app"] == "firefly-iii"
    assert [e["name"] for e in held["events"]] == ["telemetry_report"]
    rows = wait_for(lambda: len(r := stored_rows(tmp_path / "collector")) == 4 and r, 30, "4")
    report = next(r for r in rows if r["name"] == "telemetry_report")
    assert report["properties"]["platform"]["config"] == {"db": "sqlite"}
    assert report["context"]["collector"]["receipt"] == receipt
    assert "example.com" not in json.dumps(rows)
