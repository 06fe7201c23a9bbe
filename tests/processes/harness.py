"""Real servers and real forks for the process tests: start a server program on a free port,
send it requests, stop it with a signal, and count what reached the ingest server against what
was served. Also runnable for figures: ``python tests/processes/harness.py gunicorn --preload``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waypost.testing import RecordingServer, Request, free_port

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"


def event_bodies(requests: Sequence[Request]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in requests:
        if r.body:
            data = r.json()
            out.extend(data if isinstance(data, list) else [data])
    return out


def stored_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The pending rows of the outbox in ``data_dir``: event id and properties."""
    path = data_dir / "outbox.sqlite3"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        rows = db.execute("SELECT event_id, body FROM outbox WHERE state = 'pending'").fetchall()
    return [{"id": i, "properties": json.loads(b)["properties"]} for i, b in rows]


@dataclass
class Count:
    """What was served against what arrived (or is stored for the next run)."""

    served: set[str] = field(default_factory=set)
    delivered: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicate_ids: int = 0
    stored: set[str] = field(default_factory=set)
    stop_seconds: float = 0.0
    returncode: int | None = None
    log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> set[str]:
        return self.served - set(self.delivered) - self.stored

    def summary(self) -> dict[str, Any]:
        return {
            "served": len(self.served),
            "delivered": len(set(self.delivered) & self.served),
            "stored": len(self.stored - set(self.delivered)),
            "lost": len(self.lost),
            "duplicate_ids": self.duplicate_ids,
            "stop_seconds": round(self.stop_seconds, 2),
            "returncode": self.returncode,
            "still_busy": self.log.count("still busy at shutdown"),
            **self.extra,
        }


def count(served: set[str], ingest: RecordingServer, data_dir: Path) -> Count:
    events = event_bodies(ingest.requests)
    ids = collections.Counter(e["id"] for e in events)
    result = Count(served=set(served))
    for e in events:
        rid = e.get("properties", {}).get("rid")
        if rid is not None:
            result.delivered[str(rid)] += 1
    result.duplicate_ids = sum(n - 1 for n in ids.values() if n > 1)
    delivered_ids = set(ids)
    result.stored = {
        str(r["properties"].get("rid"))
        for r in stored_rows(data_dir)
        if r["id"] not in delivered_ids and "rid" in r["properties"]
    }
    return result


def app_env(url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DO_NOT_TRACK" and not k.startswith(("WAYPOST_", "PROC_"))
    }
    env.update(
        PROC_URL=url,
        PROC_DATA=str(data_dir),
        PYTHONPATH=os.pathsep.join([str(APPS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


# --- a server program ------------------------------------------------------------------------


class Served:
    """A server program in its own process group, with helpers to load and stop it."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, cwd: Path) -> None:
        self.port = port
        self.log_path = cwd / f"server-{port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    served_count = 0

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{self.log}")
            try:
                if self.get("/pid", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log}")

    def load(
        self,
        n: int,
        *,
        prefix: str = "r",
        concurrency: int = 8,
        until: threading.Event | None = None,
    ) -> set[str]:
        """Send ``n`` requests (``concurrency`` at a time), or fewer if ``until`` is set
        meanwhile; the rids answered with 200."""
        served: set[str] = set()
        lock = threading.Lock()
        self.served_count = 0

        def one(i: int) -> None:
            rid = f"{prefix}{i}"
            for _ in range(3):  # a worker recycling may refuse a connection: try again
                if until is not None and until.is_set():
                    return
                try:
                    status, _ = self.get(f"/hit?rid={rid}")
                except OSError:
                    time.sleep(0.05)
                    continue
                if status == 200:
                    with lock:
                        served.add(rid)
                        self.served_count += 1
                return

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        return served

    def submit_now(self, base: str = "/admin/telemetry") -> tuple[int, dict[str, Any], float]:
        """The admin page's "Submit now": (status, JSON answer, seconds it took)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", f"{base}/actions")
            page = conn.getresponse()
            html = page.read().decode()
            cookie = (page.getheader("Set-Cookie") or "").split(";")[0]
            token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
            assert token, html[:500]
            body = urllib.parse.urlencode({"csrf_token": token.group(1)})
            conn.close()  # a sync worker closes the connection after each answer
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            started = time.monotonic()
            conn.request(
                "POST",
                f"{base}/actions/flush",
                body=body,
                headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Accept": "application/json",
                    "Cookie": cookie,
                },
            )
            answer = conn.getresponse()
            raw = answer.read()
            took = time.monotonic() - started
            try:
                data = json.loads(raw)
            except ValueError:
                data = {"raw": raw.decode(errors="replace")[:300]}
            return answer.status, data, took
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Send ``sig`` to the server and wait for it to end; the seconds that took."""
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        return time.monotonic() - started

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def gunicorn_argv(port: int, *, worker: str = "sync", options: Sequence[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "4"]
    argv += ["-k", worker, "--graceful-timeout", "20", "--timeout", "30"]
    if worker == "gthread":
        argv += ["--threads", "4"]
    if _gunicorn_has("control_socket_disable"):
        argv.append("--no-control-socket")  # gunicorn 25+ would put one in $HOME
    return [*argv, *options, "wsgi_app:app"]


def _gunicorn_has(setting: str) -> bool:
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return False
    return any(s.name == setting for s in KNOWN_SETTINGS)


def uvicorn_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--port", str(port), "--no-access-log", "asgi_app:app"]


def hypercorn_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "hypercorn", "-b", f"127.0.0.1:{port}", "asgi_app:app"]


@contextlib.contextmanager
def served(argv: list[str], env: dict[str, str], port: int, cwd: Path) -> Iterator[Served]:
    server = Served(argv, env, port, cwd)
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


def run_server(
    argv_for: Any,
    tmp: Path,
    *,
    requests: int,
    sig: int = signal.SIGTERM,
    during_load: bool = False,
    submit_now: bool = False,
    env_extra: dict[str, str] | None = None,
) -> Count:
    """Start a server, send ``requests`` requests and stop it with ``sig``: after the last
    answer, or (``during_load``) once half of them are answered while the rest are under way,
    or during a "Submit now". Then count."""
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "data"
    with RecordingServer() as ingest:
        env = app_env(f"{ingest.url}/ingest", data, **(env_extra or {}))
        port = free_port()
        with served(argv_for(port), env, port, tmp) as server:
            extra: dict[str, Any] = {}
            if during_load:
                stopping = threading.Event()
                rids: set[str] = set()
                loader = threading.Thread(
                    target=lambda: rids.update(server.load(requests, until=stopping))
                )
                loader.start()
                deadline = time.monotonic() + 120
                while server.served_count < requests // 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                took = server.stop(sig)
                stopping.set()
                loader.join(60)
            else:
                rids = server.load(requests)
                if submit_now:
                    answers: list[Any] = []

                    def ask() -> None:
                        try:
                            answers.append(server.submit_now())
                        except (ConnectionError, http.client.HTTPException):
                            pass  # the worker stopped before it answered: "no answer"

                    thread = threading.Thread(target=ask, daemon=True)
                    thread.start()
                    time.sleep(0.05)  # the POST is under way
                took = server.stop(sig)
                if submit_now:
                    thread.join(30)
                    extra["submit_now"] = answers[0][:2] if answers else "no answer"
            log = server.log
        result = count(rids, ingest, data)
        result.stop_seconds, result.returncode, result.log = took, server.proc.returncode, log
        result.extra.update(extra)
    return result


# --- scripts in a fresh interpreter ---------------------------------------------------------

PRELUDE = """
import os, sys, time, threading
import waypost

def make(url, data_dir, plugins=(), **telemetry):
    section = {"notice": {"enabled": False}, "batch": {"interval": 0.05},
               "retry": {"initial": 0.05, "maximum": 0.5},
               "sinks": {"ingest": {"type": "http", "url": url, "timeout": 5}}}
    section.update(telemetry)
    return waypost.Telemetry(app="proc", version="1", data_dir=data_dir,
                             config={"telemetry": section}, strict=False, plugins=plugins)
"""


def script(body: str) -> str:
    return PRELUDE + textwrap.dedent(body)


def python(code: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def deliver_stored(url: str, data: Path, env: dict[str, str], timeout: float = 30) -> bool:
    """A new process on ``data`` (the next run): True when it flushed everything."""
    proc = python(
        script(
            f"""
            tel = make({url!r}, {str(data)!r})
            ok = tel.flush(timeout=20)
            tel.shutdown(5)
            print(ok, tel.status().outbox_pending_events)
            """
        ),
        env,
    )
    out, _ = proc.communicate(timeout=timeout)
    return out.split() == ["True", "0"]


FORK_PARENT = """
import json, random
tel = make({url!r}, {data!r}, **{telemetry!r})
{before}
started = time.monotonic()
pid = os.fork()
if pid == 0:
    for i in range({n}):
        tel.track("child", {{"rid": "{tag}-c%d" % i}})
    t = time.monotonic()
    ok = tel.flush(timeout={flush})
    flushed = time.monotonic() - t
    shut = tel.shutdown(timeout=2)
    with open({report!r}, "w") as fh:
        json.dump({{"flush": ok, "flush_seconds": round(flushed, 2), "shutdown": shut,
                   "child_delivered": tel.status().counters.delivered}}, fh)
    os._exit(0 if ok else 3)
for i in range({n}):
    tel.track("parent", {{"rid": "{tag}-p%d" % i}})
deadline = time.monotonic() + {wait}
status = None
while time.monotonic() < deadline:
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = os.waitstatus_to_exitcode(st)
        break
    time.sleep(0.02)
took = time.monotonic() - started
if status is None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
ok = tel.flush(timeout=10)
report = {{}}
if os.path.exists({report!r}):
    with open({report!r}) as fh:
        report = json.load(fh)
report.update(child=status, child_seconds=round(took, 2), parent_flush=ok)
print(json.dumps(report))
tel.shutdown(5)
"""


def fork_trial(
    url: str,
    data: Path,
    env: dict[str, str],
    *,
    tag: str,
    before: str = "",
    n: int = 100,
    flush: float = 10,
    wait: float = 20,
    telemetry: dict[str, Any] | None = None,
) -> subprocess.Popen[str]:
    """A process that makes a Telemetry, runs ``before``, forks once; the child tracks ``n``
    events and flushes; the parent waits for it (``wait`` s, then kill -9) and prints JSON."""
    data.parent.mkdir(parents=True, exist_ok=True)
    code = FORK_PARENT.format(
        url=url,
        data=str(data),
        before=textwrap.dedent(before),
        n=n,
        tag=tag,
        flush=flush,
        wait=wait,
        # Events wait in memory up to batch.interval before they are stored: long enough here
        # for the child's sink to open, so that the child delivers them itself.
        telemetry={"batch": {"interval": 0.5}, **(telemetry or {})},
        report=str(data.parent / f"{tag}.child.json"),
    )
    return python(script(code), env)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"timeout": True, "stderr": err[-2000:]}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    result["returncode"] = proc.returncode
    result["stderr"] = err[-20000:]
    return result


def duplicates(ingest: RecordingServer) -> int:
    """Events (by id) that arrived more than once."""
    ids = collections.Counter(e["id"] for e in event_bodies(ingest.requests))
    return sum(n - 1 for n in ids.values())


def rids(ingest: RecordingServer) -> collections.Counter[str]:
    return collections.Counter(
        str(e["properties"]["rid"])
        for e in event_bodies(ingest.requests)
        if "rid" in e.get("properties", {})
    )


if __name__ == "__main__":  # figures: python tests/processes/harness.py gunicorn [options]
    import tempfile

    kind, *opts = sys.argv[1:] or ["gunicorn"]
    worker = "gthread" if "gthread" in opts else "sync"
    opts = [o for o in opts if o != "gthread"]
    n = int(os.environ.get("PROC_REQUESTS", "2000"))
    sig = signal.SIGINT if "sigint" in opts else signal.SIGTERM
    opts = [o for o in opts if o != "sigint"]
    submit = "submit" in opts
    during = "during" in opts
    opts = [o for o in opts if o not in ("submit", "during")]
    argv_for = {
        "gunicorn": lambda p: gunicorn_argv(p, worker=worker, options=opts),
        "uvicorn": uvicorn_argv,
        "hypercorn": hypercorn_argv,
    }[kind]
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_server(
            argv_for, Path(tmp), requests=n, submit_now=submit, sig=sig, during_load=during
        )
        print(json.dumps(outcome.summary()))
