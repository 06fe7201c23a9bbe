"""SIGTERM in a plain process: chained, never replaced. The default handler's process is ended
by SIGTERM as before, after delivering; a host's own handler still runs, and what is tracked
after it is stored at once (the host may end the process without atexit)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import harness

from waypost.testing import RecordingServer

DEFAULT = """
tel = make({url!r}, {data!r}, batch={{"interval": 5}})
for i in range(300):
    tel.track("e", {{"rid": "r%d" % i}})
print("tracked", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""

HOSTED = """
import json
calls = []
signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
hooked = set()

class Where:
    @waypost.hookimpl
    def waypost_before_send(self, event):
        if int(event.properties["rid"][1:]) >= 300:
            hooked.add(threading.current_thread().name)

tel = make({url!r}, {data!r}, plugins=[Where()], batch={{"interval": 5}})
for i in range(300):
    tel.track("e", {{"rid": "r%d" % i}})
os.kill(os.getpid(), signal.SIGTERM)
for i in range(300, 350):
    tel.track("e", {{"rid": "r%d" % i}})  # requests the host finishes after the signal
print(json.dumps({{"host_handler": calls, "hooked_on": sorted(hooked)}}), flush=True)
os._exit(0)  # as uvicorn's re-raised SIGTERM does: no atexit
"""


def run(body: str, tmp_path: Path, env: dict[str, str], url: str) -> tuple[int, str, str]:
    code = "import signal\n" + body.format(url=url, data=str(tmp_path / "d"))
    proc = harness.python(harness.script(code), env)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_default_sigterm_delivers_then_ends_the_process_by_sigterm(
    tmp_path: Path, env: dict[str, str]
) -> None:
    with RecordingServer() as ingest:
        code, _out, err = run(DEFAULT, tmp_path, env, f"{ingest.url}/ingest")
        got = harness.rids(ingest)
    assert code == -signal.SIGTERM, (code, err[-2000:])
    assert len(got) == 300, err[-2000:]


def test_a_host_handler_is_chained_and_later_events_are_stored(
    tmp_path: Path, env: dict[str, str]
) -> None:
    with RecordingServer() as ingest:
        url = f"{ingest.url}/ingest"
        code, out, err = run(HOSTED, tmp_path, env, url)
        assert code == 0, err[-2000:]
        said = json.loads(out.splitlines()[-1])
        assert said["host_handler"] == [signal.SIGTERM]
        # Each event after the signal is stored before track returns, and its hooks ran on
        # waypost's worker, not on the host's thread.
        assert said["hooked_on"] == ["waypost-worker"], said
        sent = set(harness.rids(ingest))
        stored = {r["properties"]["rid"] for r in harness.stored_rows(tmp_path / "d")}
        assert len(sent | stored) == 350, (len(sent), len(stored), err[-2000:])
        ingest.clear()
        assert harness.deliver_stored(url, tmp_path / "d", env)
        assert sent | set(harness.rids(ingest)) == {f"r{i}" for i in range(350)}


def test_nothing_is_installed_when_sigterm_is_ignored_or_off(
    tmp_path: Path, env: dict[str, str]
) -> None:
    code = harness.script(f"""
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        tel = make("http://127.0.0.1:9/x", {str(tmp_path / "a")!r})
        ignored = signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        off = make("http://127.0.0.1:9/x", {str(tmp_path / "b")!r}, handle_sigterm=False)
        print(ignored, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        """)
    proc = harness.python(code, env)
    out, err = proc.communicate(timeout=60)
    assert out.split() == ["True", "True"], err
