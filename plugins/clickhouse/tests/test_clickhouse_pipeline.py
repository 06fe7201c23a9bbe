"""The clickhouse sink beyond the contract (test_clickhouse_contract.py): an HTTP peer
answering as ClickHouse does when it refuses, a forked child, ``waypost plugins``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from waypost_clickhouse import ClickHouseConfig, ClickHouseSink

from waypost.sinks import SinkContext
from waypost.testing import RecordingServer, Response, make_events, send_batch


def _sink(server: RecordingServer, tmp_path: Path, **settings: Any) -> ClickHouseSink:
    dsn = server.url.replace("http://", "http://loader:pw-Secret-77@")
    config = ClickHouseConfig(dsn=dsn, **settings)
    context = SinkContext(app="testapp", version="1", instance_id="i", data_dir=tmp_path)
    return ClickHouseSink("http", config, context)


@pytest.mark.parametrize(
    ("status", "code", "name"),
    [(516, 516, "AUTHENTICATION_FAILED"), (500, 252, "TOO_MANY_PARTS"), (503, None, None)],
)
def test_a_server_that_refuses_over_http(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status: int,
    code: int | None,
    name: str | None,
) -> None:
    """A loopback HTTP peer that answers as a ClickHouse server (or a proxy in front of one)
    does when it refuses the connection: the events are retried (they are not at fault) with
    the error's name, and the password, sent as ClickHouse expects it, appears in no reason or
    log line."""
    caplog.set_level(logging.DEBUG)
    with RecordingServer() as server:
        headers = {"X-ClickHouse-Exception-Code": str(code)} if code else {}
        body = f"Code: {code}. DB::Exception: refused. ({name})" if code else "Service Unavailable"
        http_status = 500 if status == 516 else status
        server.responder = lambda request: Response(http_status, body, headers=headers)
        sink = _sink(server, tmp_path, timeout=2)
        try:
            sink.open()
            events = make_events(2)
            result = send_batch(sink, events)
        finally:
            sink.close()
        assert server.requests, "the sink never reached the server"
        sent = server.requests[0].headers
    assert set(result.retry) == {e.id for e in events}, result
    if name:
        assert all(name in reason for reason in result.retry.values())
    assert any("pw-Secret-77" in v or "cHctU2VjcmV0LTc3" in v for v in sent.values()) or any(
        "bG9hZGVyOnB3LVNlY3JldC03Nw" in v for v in sent.values()
    ), sent
    for text in (repr(result), caplog.text, repr(sink), sink.destination):
        assert "pw-Secret-77" not in text


_FORK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from waypost.sinks import SinkContext
    from waypost.testing import make_events, send_batch
    from waypost_clickhouse import ClickHouseConfig, ClickHouseSink

    data = Path(sys.argv[1])
    context = SinkContext(app="testapp", version="1", instance_id="i", data_dir=data)
    sink = ClickHouseSink("forked", ClickHouseConfig(), context)
    sink.open()
    assert not send_batch(sink, make_events(3)).retry
    pid = os.fork()
    if pid == 0:
        result = send_batch(sink, make_events(2))
        sink.close()
        print(json.dumps({"child_retry": list(result.retry.values())}), flush=True)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert not send_batch(sink, make_events(2)).retry
    count = sink._client.query("SELECT count() FROM default.waypost_events").result_rows[0][0]
    sink.close()
    print(json.dumps({"status": status, "count": count}))
    """
)


def test_a_forked_child_leaves_the_embedded_engine_to_its_parent(tmp_path: Path) -> None:
    script = tmp_path / "fork_clickhouse.py"
    script.write_text(_FORK_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    child = next(x["child_retry"] for x in lines if "child_retry" in x)
    parent = next(x for x in lines if "status" in x)
    assert len(child) == 2 and all("belongs to process" in r for r in child), child
    assert parent == {"status": 0, "count": 5}


def test_waypost_plugins_lists_it() -> None:
    code = "import sys; from waypost.cli import main; sys.exit(main(['plugins', '--json']))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    (entry,) = [p for p in json.loads(done.stdout) if p["name"] == "clickhouse"]
    assert entry["distribution"] == "waypost-clickhouse" and entry["status"] == "loaded"
    assert entry["sink_types"] == ["clickhouse"] and entry["deprecated"] is False
