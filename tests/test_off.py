"""When telemetry is off nothing is collected, stored or sent, and no socket is opened; debug
mode prints what would be sent and sends nothing. Proved with audit hooks in a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
