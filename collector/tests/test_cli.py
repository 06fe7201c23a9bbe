"""``waypost collector stats`` and ``receipt``, run as an operator runs them, on the data dir a
running collector writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from helpers import base_section, envelope, signed_headers, wait_for, write_config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, "collector", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_stats_and_receipt(tmp_path: Path, serve: Any) -> None:
    config = write_config(tmp_path / "c.yml", base_section(tmp_path / "d"))
    served = serve(config)
    good = [envelope() for _ in range(4)]
    bad = envelope(name="")
    body = json.dumps([*good, bad]).encode()
    answer = httpx.post(served.url + "/v1/myapp/events", content=body, headers=signed_headers(body))
    receipt = answer.json()["receipt"]
    httpx.post(served.url + "/v1/myapp/events", content=body, headers=signed_headers(body))
    httpx.post(served.url + "/v1/myapp/events", content=b"[]")  # no token

    def counted() -> dict[str, Any] | None:
        done = _cli("stats", "--config", str(config), "--json")
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        app = data["apps"]["myapp"]
        return data if app["requests_refused"].get("bad_token") and app["duplicate"] else None

    data = wait_for(counted, 30, "stats to show the requests")
    app = data["apps"]["myapp"]
    assert app["accepted"] == 4 and app["duplicate"] == 4 and app["refused"] == {"malformed": 2}
    assert "storage_lag_seconds" in data and "spool" in data
    text = _cli("stats", "--config", str(config))
    assert "myapp: accepted 4, duplicates 4" in text.stdout

    shown = _cli("receipt", receipt, "--config", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    held = json.loads(shown.stdout)
    assert held["found"] and held["app"] == "myapp" and held["accepted"] == 4
    assert sorted(e["id"] for e in held["events"]) == sorted(e["id"] for e in good)
    assert held["refusals"][0]["reason"] == "malformed"
    missing = _cli("receipt", "01a2aaaa-0000-7000-8000-000000000000", "--config", str(config))
    assert missing.returncode == 1 and "no receipt" in missing.stderr
