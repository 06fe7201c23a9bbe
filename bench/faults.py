"""The fault checks of issue 18, run for real: storage faults, time budgets and broken sinks.

    uv run python bench/faults.py                  # every check (about 5 minutes on 2 cores)
    uv run python bench/faults.py --only lock,kill9
    uv run python bench/faults.py --json bench/results/faults.json

Each check drives waypost only through its public names (``waypost.Telemetry(...)``, ``track``,
``flush``, ``shutdown``, ``status()``, and the ``waypost`` CLI with ``--json``), in fresh
processes, with the ``http`` sink sending to a loopback destination (:class:`Dest`) whose
answers follow a schedule (ok, 503 with ``Retry-After: 1``, 429, 500, a reset connection, a
hang, or down). It prints per check what was tracked, what arrived, what status reported
stored and dropped (by reason), how long the calls took, and PASS or FAIL against each promise.

Checks that mount a tmpfs (``mount -t tmpfs -o size=1m``) or drop root's CAP_DAC_OVERRIDE
(``setpriv``) need root; without it they are skipped, with the reason. As root the whole run
is in a mount namespace of its own (``unshare --mount``), so no mount outlives it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
WAYPOST = str(Path(sys.executable).parent / "waypost")
MARK = "RESULT "
MARGIN = 0.5
"""Seconds a budgeted call may take past its budget (thread hand-offs, a loaded machine)."""


# --- the destination ---------------------------------------------------------------------------


class Dest:
    """A loopback ``http`` sink destination that records every event that arrived with a 2xx.

    ``schedule`` is cycled per request over the first ``failing`` requests (all of them if
    None), then every answer is ok: ``"ok"``, ``503`` or ``429`` (with ``Retry-After: 1``),
    ``500``, ``"reset"`` (the connection closed with RST), ``"hang"`` (``hang_s`` of silence,
    then 200). ``down`` resets every connection. Processes change it through ``POST /_control``
    and read it through ``GET /_stats`` (see :func:`control` and :func:`stats`)."""

    def __init__(self, schedule: list[Any] | None = None, *, failing: int | None = None) -> None:
        self.schedule: list[Any] = schedule or ["ok"]
        self.failing = failing
        self.hang_s = 30.0
        self.down = False
        self.ids: set[str] = set()
        self.numbers: set[int] = set()
        self.total = 0
        self.requests = 0
        self.answers: dict[str, int] = {}
        self.lock = threading.Lock()
        dest = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.reply(200, json.dumps(dest.stats()).encode())

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/_control":
                    dest.set(**json.loads(body))
                    self.reply(200, b"{}")
                    return
                with dest.lock:
                    n = dest.requests
                    dest.requests += 1
                    if dest.down:
                        what: Any = "down"
                    elif dest.failing is not None and n >= dest.failing:
                        what = "ok"
                    else:
                        what = dest.schedule[n % len(dest.schedule)]
                    dest.answers[str(what)] = dest.answers.get(str(what), 0) + 1
                if what in ("reset", "down"):
                    linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.connection.close()
                    self.close_connection = True
                    return
                if what == "hang":
                    time.sleep(dest.hang_s)
                if isinstance(what, int):
                    retry = {"Retry-After": "1"} if what in (503, 429) else {}
                    self.reply(what, b'{"error": "scheduled"}', retry)
                    return
                events = json.loads(body)
                with dest.lock:
                    for e in events:
                        dest.ids.add(e["id"])
                        i = (e.get("properties") or {}).get("i")
                        if isinstance(i, int):
                            dest.numbers.add(i)
                    dest.total += len(events)
                self.reply(200, b"{}")

            def reply(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.url = self.base + "/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(self, key, value)
            if "schedule" in changes:
                self.requests = 0

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "arrived": len(self.ids),
                "duplicates": self.total - len(self.ids),
                "requests": self.requests,
                "answers": dict(self.answers),
            }

    def has(self, numbers: range) -> int:
        """How many of ``numbers`` (the events' ``i`` property) arrived."""
        with self.lock:
            return sum(1 for i in numbers if i in self.numbers)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def control(base: str, **changes: Any) -> None:
    """From a child: change the destination (``down=False``, ``schedule=[...]``)."""
    request = urllib.request.Request(base + "/_control", data=json.dumps(changes).encode())
    with urllib.request.urlopen(request, timeout=5) as answer:
        answer.read()


def stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/_stats", timeout=5) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


# --- processes --------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k != "DO_NOT_TRACK" and not k.startswith("WAYPOST_")
    }


def config_file(path: Path, url: str, extra: str = "") -> str:
    """A YAML config with the ``http`` sink to ``url`` (``extra``: more lines under telemetry)."""
    path.write_text(
        "telemetry:\n  notice: {enabled: false}\n  batch: {interval: 0.05}\n"
        "  retry: {initial: 0.05, maximum: 1.0}\n"
        f'  sinks:\n    dest: {{type: http, url: "{url}"}}\n{extra}'
    )
    return str(path)


def spawn(
    name: str, *, timeout: float = 180.0, prefix: tuple[str, ...] = (), **args: Any
) -> dict[str, Any]:
    """Run ``CHILDREN[name](**args)`` in a fresh interpreter; its reported figures, merged, plus
    ``rc``, ``seconds``, ``traceback`` (one in stderr) and ``warnings`` (its log lines)."""
    started = time.monotonic()
    command = [*prefix, sys.executable, str(HERE), "--child", name, json.dumps(args)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=child_env()
        )
        out, err, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        rc = "timeout"
    figures: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith(MARK):
            figures.update(json.loads(line[len(MARK) :]))
    figures["rc"] = rc
    figures["seconds"] = round(time.monotonic() - started, 2)
    figures["traceback"] = "Traceback" in err
    figures["warnings"] = [
        line for line in err.splitlines() if line.startswith(("WARNING", "ERROR", "CRITICAL"))
    ][:12]
    if "Traceback" in err:
        figures["stderr"] = err[-2500:]
    return figures


def cli(cfg: str, data: Path, *args: str, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``waypost --config cfg --data-dir data ARGS``: exit code, seconds, JSON if any."""
    started = time.monotonic()
    done = subprocess.run(
        [*prefix, WAYPOST, "--config", cfg, "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    result: dict[str, Any] = {
        "rc": done.returncode,
        "seconds": round(time.monotonic() - started, 2),
        "traceback": "Traceback" in done.stderr,
    }
    try:
        result["json"] = json.loads(done.stdout)
    except ValueError:
        result["out"] = done.stdout[-300:]
    if done.returncode or "Traceback" in done.stderr:
        result["err"] = done.stderr[-600:]
    return result


def cli_sweep(c: Check, label: str, cfg: str, data: Path, prefix: tuple[str, ...] = ()) -> None:
    """``status``, ``show`` and ``flush --timeout 5`` (all ``--json``): each answers, exit 0
    (flush: 1 when something is still pending, and it says what), no traceback, in time."""
    results = {}
    for command in (
        ("status", "--json"),
        ("show", "--json"),
        ("flush", "--timeout", "5", "--json"),
    ):
        r = cli(cfg, data, *command, prefix=prefix)
        name = command[0]
        results[name] = {k: v for k, v in r.items() if k != "json"}
        ok = not r["traceback"] and "json" in r
        if name == "flush":
            left = _pending_of(r.get("json"))
            results[name]["pending"] = left
            ok = ok and r["rc"] == (1 if left else 0) and r["seconds"] <= 5 + MARGIN + 1.5
        else:
            ok = ok and r["rc"] == 0
        c.expect(
            f"{label}: `waypost {' '.join(command)}` answers (exit code, JSON, no traceback)", ok
        )
    c.line(f"  CLI: {json.dumps(results, default=str)[:600]}")
    c.figures.setdefault("cli_sweep", {})[label] = results


def _pending_of(answer: Any) -> int | None:
    """Events ``waypost flush --json`` says are still pending."""
    if not isinstance(answer, dict):
        return None
    for key in ("pending", "still_pending", "outbox_pending_events"):
        value = answer.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            return sum(
                v.get("pending", 0) if isinstance(v, dict) else int(v) for v in value.values()
            )
    status = answer.get("status")
    if isinstance(status, dict) and isinstance(status.get("outbox_pending_events"), int):
        return int(status["outbox_pending_events"])
    return None


def mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def remount(path: Path | str, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


# --- inside a child -----------------------------------------------------------------------------


def out(**figures: Any) -> None:
    print(MARK + json.dumps(figures, default=str), flush=True)


def make(cfg: str, data: str, **kw: Any) -> Any:
    import waypost

    return waypost.Telemetry(
        app="faults", version="1", config=cfg, data_dir=data, env=child_env(), **kw
    )


def timed(call: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call(*args)
    return result, round(time.monotonic() - started, 3)


def summary(tel: Any) -> dict[str, Any]:
    """What status() says, in short (or how it raised)."""
    try:
        st = tel.status()
    except BaseException as exc:
        return {"raised": f"{type(exc).__name__}: {exc}"}
    s = st.storage
    return {
        "accepted": st.counters.accepted,
        "stored": st.counters.stored,
        "delivered": st.counters.delivered,
        "dropped": dict(st.counters.dropped),
        "pending": st.outbox_pending_events,
        "buffered": st.buffered,
        "storage": {
            "state": s.state,
            "memory_only": s.memory_only,
            "detail": s.detail,
            "moved_aside": s.moved_aside,
            "notes": s.notes,
        },
        "sinks": {
            x.name: {
                "state": x.state,
                "error": x.error,
                "pending": x.pending,
                "in_memory": x.in_memory,
            }
            for x in st.sinks
        },
        "notes": st.notes,
    }


def accounted(s: dict[str, Any], arrived: int) -> bool:
    """Whether status ``s`` (after shutdown) accounts for every event it accepted: arrived,
    stored, or counted dropped."""
    if "accepted" not in s:
        return False
    return arrived + int(s["stored"]) + sum(s["dropped"].values()) >= int(s["accepted"])


def kept(s: dict[str, Any]) -> int:
    """Events status reports kept: accepted less dropped for any reason."""
    return int(s["accepted"]) - sum(s["dropped"].values())


def track_many(tel: Any, n: int, start: int = 0, name: str = "evt", pad: int = 0) -> dict[str, Any]:
    worst = 0.0
    started = time.monotonic()
    padding = "x" * pad
    for i in range(start, start + n):
        before = time.perf_counter()
        tel.track(name, {"i": i, "pad": padding} if pad else {"i": i})
        worst = max(worst, time.perf_counter() - before)
    return {
        "tracked": n,
        "track_s": round(time.monotonic() - started, 2),
        "worst_track_ms": round(worst * 1000, 1),
    }


CHILDREN: dict[str, Callable[..., None]] = {}


def child(fn: Callable[..., None]) -> Callable[..., None]:
    CHILDREN[fn.__name__] = fn
    return fn


@child
def store(cfg: str, data: str, n: int, start: int = 0) -> None:
    """Track ``n`` events with the destination down, flush (they are stored), shut down."""
    tel = make(cfg, data)
    figures = track_many(tel, n, start)
    ok, seconds = timed(tel.flush, 10.0)
    figures.update(flush=ok, flush_s=seconds, status=summary(tel))
    ok, seconds = timed(tel.shutdown, 5.0)
    out(**figures, shutdown=ok, shutdown_s=seconds, after=summary(tel))


@child
def deliver(cfg: str, data: str, base: str, n: int = 0, timeout: float = 60.0) -> None:
    """A next process: the destination up, track ``n`` new events, flush, status, shut down."""
    control(base, down=False)
    tel = make(cfg, data)
    figures = track_many(tel, n, 1_000_000, "next") if n else {}
    ok, seconds = timed(tel.flush, timeout)
    out(**figures, flush=ok, flush_s=seconds, status=summary(tel), dest=stats(base))
    ok, seconds = timed(tel.shutdown, 5.0)
    out(shutdown=ok, shutdown_s=seconds)


# --- checks -------------------------------------------------------------------------------------


class Check:
    """One check's figures and its verdicts against each promise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.figures: dict[str, Any] = {}
        self.verdicts: list[tuple[str, bool]] = []
        self.skipped: str | None = None

    def expect(self, promise: str, ok: bool) -> None:
        self.verdicts.append((promise, bool(ok)))

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.verdicts)

    def line(self, text: str) -> None:
        print("    " + text, flush=True)


def root_only(check: Check) -> bool:
    if os.geteuid() != 0:
        check.skipped = "needs root (mount -t tmpfs, remount ro, setpriv)"
        return False
    return True


def num(value: Any, default: float) -> float:
    """A figure a child reported, or ``default`` when it reported none."""
    return default if value is None else float(value)


def short(figures: dict[str, Any]) -> str:
    return json.dumps(figures, default=str)[:900]


def check_disk_full(c: Check, root: Path) -> None:
    """A 1 MiB tmpfs under the data dir, 10,000 events of ~200 B, the sink down."""
    if not root_only(c):
        return
    dest = Dest()
    dest.set(down=True)
    cfg = config_file(root / "telemetry.yml", dest.url)
    # (a) the disk grows under the running process
    data = root / "grow"
    mount(data, "1m")
    a = spawn("disk_full_grow", cfg=cfg, data=str(data), base=dest.base)
    c.figures["grow"] = a
    c.line(
        f"grow under the process: tracked 10000 (worst track {a.get('worst_track_ms')} ms); "
        f"flush(5) {a.get('flush')} in {a.get('flush_s')} s; status {short(a.get('status', {}))}"
    )
    c.line(
        f"  after remount 64m: flush(30) {a.get('flush2')} in {a.get('flush2_s')} s; "
        f"arrived {dest.stats()['arrived']} (dups {dest.stats()['duplicates']}); "
        f"shutdown {a.get('shutdown')} in {a.get('shutdown_s')} s"
    )
    c.line(f"  log lines: {a.get('warnings')}")
    st = a.get("status", {})
    c.expect(
        "grow: flush(5) on a full disk is False (events could not be stored)",
        a.get("flush") is False,
    )
    c.expect("grow: status says disk_full", st.get("storage", {}).get("state") == "disk_full")
    c.expect("grow: flush(5) within budget", num(a.get("flush_s"), 99) <= 5 + MARGIN)
    c.expect("grow: after the disk grows, flush(30) is True", a.get("flush2") is True)
    arrived = dest.stats()["arrived"]
    after = a.get("after", {})
    left = int(after.get("pending") or 0)
    dropped = sum(after.get("dropped", {}).values())
    c.expect(
        "grow: every event arrived, is stored or was counted dropped",
        arrived + left + dropped >= 10_000,
    )
    c.expect("grow: flush(30) with the destination up leaves nothing pending", left == 0)
    c.expect(
        "grow: no 'can be written again' while the disk is still full",
        not a.get("written_again_while_full"),
    )
    wrote = a.get("cli_wrote", {})
    c.line(
        f"  `waypost status --json` on the full disk: rc {wrote.get('rc')}, "
        f"storage {wrote.get('storage')}"
    )
    c.expect(
        "grow: `waypost status --json` answers on the full disk, no traceback",
        wrote.get("rc") == 0 and not wrote.get("traceback"),
    )
    c.expect(
        "grow: `waypost status --json` says disk_full, memory-only",
        (wrote.get("storage") or {}).get("state") == "disk_full"
        and (wrote.get("storage") or {}).get("memory_only") is True,
    )
    # (b) the process exits on the full disk; the next one finds a bigger one
    dest2 = Dest()
    dest2.set(down=True)
    cfg2 = config_file(root / "telemetry2.yml", dest2.url)
    data = root / "next"
    mount(data, "1m")
    b = spawn("disk_full_exit", cfg=cfg2, data=str(data))
    remount(data, "size=64m")
    n = spawn("deliver", cfg=cfg2, data=str(data), base=dest2.base)
    after = b.get("after", {})
    reported = kept(after) if "accepted" in after else None
    arrived = dest2.stats()["arrived"]
    c.figures["next"] = {"first": b, "next": n}
    c.line(
        f"exit on the full disk: flush(5) {b.get('flush')} in {b.get('flush_s')} s; "
        f"shutdown(5) {b.get('shutdown')} in {b.get('shutdown_s')} s; status after {short(after)}"
    )
    c.line(f"  log lines: {b.get('warnings')}")
    c.line(
        f"  next process (64m): flush {n.get('flush')} in {n.get('flush_s')} s; "
        f"arrived {arrived} (dups {dest2.stats()['duplicates']}); reported kept {reported}"
    )
    c.expect(
        "next: every event reported kept arrives", reported is not None and arrived >= reported
    )
    c.expect(
        "next: arrived + counted dropped = tracked",
        reported is not None and arrived + sum(after["dropped"].values()) >= 10_000,
    )
    c.expect(
        "next: no 'can be written again' while the disk is still full",
        not b.get("written_again_while_full"),
    )
    c.expect("no traceback", not (a["traceback"] or b["traceback"] or n["traceback"]))
    dest.close()
    dest2.close()


FULL_AGAIN = "can be written again"


def _watch_logs(data: str) -> list[tuple[str, int]]:
    """waypost's log lines from now on, each with the bytes free in ``data`` when it came."""
    import logging

    lines: list[tuple[str, int]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fs = os.statvfs(data)
            lines.append((record.getMessage(), fs.f_bavail * fs.f_frsize))

    logging.getLogger("waypost").addHandler(Keep(logging.INFO))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return lines


def _again(lines: list[tuple[str, int]]) -> list[str]:
    """'can be written again' lines logged while the data dir had under 64 KiB free."""
    return [
        f"{text} ({free} bytes free)" for text, free in lines if FULL_AGAIN in text and free < 65536
    ]


def _cli_wrote(cfg: str, data: str) -> dict[str, Any]:
    done = subprocess.run(
        [WAYPOST, "--config", cfg, "--data-dir", data, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    try:
        storage = json.loads(done.stdout).get("storage")
    except ValueError:
        storage = None
    return {"rc": done.returncode, "traceback": "Traceback" in done.stderr, "storage": storage}


@child
def disk_full_grow(cfg: str, data: str, base: str) -> None:
    lines = _watch_logs(data)
    tel = make(cfg, data)
    figures = track_many(tel, 10_000, pad=200)
    ok, seconds = timed(tel.flush, 5.0)
    figures.update(flush=ok, flush_s=seconds, status=summary(tel))
    out(**figures, written_again_while_full=_again(lines), cli_wrote=_cli_wrote(cfg, data))
    remount(data, "size=64m")
    control(base, down=False)
    ok, seconds = timed(tel.flush, 30.0)
    out(flush2=ok, flush2_s=seconds, status2=summary(tel))
    ok, seconds = timed(tel.shutdown, 5.0)
    out(shutdown=ok, shutdown_s=seconds, after=summary(tel))


@child
def disk_full_exit(cfg: str, data: str) -> None:
    lines = _watch_logs(data)
    tel = make(cfg, data)
    figures = track_many(tel, 10_000, pad=200)
    ok, seconds = timed(tel.flush, 5.0)
    figures.update(flush=ok, flush_s=seconds, status=summary(tel))
    ok, seconds = timed(tel.shutdown, 5.0)
    out(
        **figures,
        shutdown=ok,
        shutdown_s=seconds,
        after=summary(tel),
        written_again_while_full=_again(lines),
        free_at_end=os.statvfs(data).f_bavail,
    )


NO_OVERRIDE = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
"""Root without the capability to write what file modes forbid."""


def check_read_only(c: Check, root: Path) -> None:
    """A data dir holding an outbox of 300 events becomes read-only (chmod, for root without
    CAP_DAC_OVERRIDE;
    a tmpfs remounted ro); the next process tracks 100 more with the destination up."""
    if not root_only(c):
        return
    for how in ("chmod", "remount_ro"):
        dest = Dest()
        dest.set(down=True)
        cfg = config_file(root / f"{how}.yml", dest.url)
        data = root / how
        prefix: tuple[str, ...] = ()
        if how == "remount_ro":
            mount(data, "64m")
        else:
            data.mkdir()
        first = spawn("store", cfg=cfg, data=str(data), n=300)
        if how == "chmod":
            # root writes anyway: the next process runs without CAP_DAC_OVERRIDE
            prefix = NO_OVERRIDE
            for p in [data, *data.iterdir()]:
                p.chmod(0o555 if p.is_dir() else 0o444)
        else:
            remount(data, "ro")
        n = spawn("deliver", cfg=cfg, data=str(data), base=dest.base, n=100, prefix=prefix)
        st = n.get("status", {})
        status_cli = cli(cfg, data, "status", "--json", prefix=prefix)
        storage = (status_cli.get("json") or {}).get("storage", {})
        arrived = dest.has(range(1_000_000, 1_000_100))
        c.figures[how] = {"first": first, "next": n, "cli": status_cli}
        cli_sweep(c, how, cfg, data, prefix)
        c.line(
            f"{how}: stored {first.get('status', {}).get('pending')} before; next process: "
            f"flush {n.get('flush')} in {n.get('flush_s')} s, 100 new -> {arrived} arrived; "
            f"status storage {st.get('storage')}"
        )
        c.line(
            f"  `waypost status --json`: rc {status_cli['rc']} in {status_cli['seconds']} s, "
            f"storage {storage}; log lines {n.get('warnings')}"
        )
        c.expect(f"{how}: Telemetry() and status() answer", "raised" not in st and n["rc"] == 0)
        c.expect(f"{how}: the new events arrive (memory-only delivery)", arrived == 100)
        c.expect(
            f"{how}: status says memory-only", st.get("storage", {}).get("memory_only") is True
        )
        c.expect(
            f"{how}: the CLI says memory-only, exit 0, no traceback",
            status_cli["rc"] == 0
            and not status_cli["traceback"]
            and storage.get("memory_only") is True,
        )
        c.expect(f"{how}: no traceback", not n["traceback"])
        c.expect(
            f"{how}: flush(60) returns once nothing more can be done (within 10 s)",
            num(n.get("flush_s"), 99) <= 10,
        )
        dest.close()


def check_deleted(c: Check, root: Path) -> None:
    """While a process runs with 600 events pending (destination down), the outbox is deleted
    (main file; with -wal and -shm) or replaced by another file; 100 more are tracked."""
    for how in ("main", "main_wal_shm", "replaced"):
        dest = Dest()
        dest.set(down=True)
        cfg = config_file(root / f"{how}.yml", dest.url)
        data = root / how
        a = spawn("deleted", cfg=cfg, data=str(data), how=how)
        n = spawn("deliver", cfg=cfg, data=str(data), base=dest.base)
        arrived = dest.has(range(700))
        c.figures[how] = {"first": a, "next": n}
        c.line(
            f"{how}: flush before {a.get('flush1')}; after the fault: flush {a.get('flush2')} "
            f"in {a.get('flush2_s')} s, status {short(a.get('status', {}))}"
        )
        c.line(
            f"  next process: flush {n.get('flush')}, arrived {arrived} of 700 "
            f"(dups {dest.stats()['duplicates']}); log lines {a.get('warnings')[:3]}"
        )
        honest = a.get("flush2") is False or arrived == 700
        c.expect(f"{how}: flush after the fault is honest (True only if all 700 are kept)", honest)
        c.expect(f"{how}: the next process delivers all 700", arrived == 700)
        c.expect(
            f"{how}: status() answers, no traceback",
            "raised" not in a.get("status", {"raised": 1}) and not a["traceback"],
        )
        dest.close()


@child
def deleted(cfg: str, data: str, how: str) -> None:
    import sqlite3

    tel = make(cfg, data)
    track_many(tel, 600)
    ok1 = tel.flush(10.0)
    path = Path(data) / "outbox.sqlite3"
    if how == "replaced":
        other = Path(data).parent / f"{how}-other.sqlite3"
        with sqlite3.connect(other) as db:
            db.execute("CREATE TABLE unrelated (x)")
        os.replace(other, path)
    else:
        for suffix in ("", "-wal", "-shm") if how == "main_wal_shm" else ("",):
            Path(str(path) + suffix).unlink(missing_ok=True)
    track_many(tel, 100, 600)
    ok2, seconds = timed(tel.flush, 10.0)
    out(flush1=ok1, flush2=ok2, flush2_s=seconds, status=summary(tel))
    ok, seconds = timed(tel.shutdown, 5.0)
    out(shutdown=ok, shutdown_s=seconds, after=summary(tel))


def _bad_page(path: Path) -> str:
    """Overwrite one page in the middle of an SQLite file with junk; which page, of how many."""
    raw = bytearray(path.read_bytes())
    page = int.from_bytes(raw[16:18], "big") or 65536
    pages = len(raw) // page
    victim = pages // 2
    raw[victim * page : (victim + 1) * page] = os.urandom(page)
    path.write_bytes(bytes(raw))
    return f"page {victim + 1} of {pages}"


def check_corrupt(c: Check, root: Path) -> None:
    """An outbox of 500 events (checkpointed into the main file) corrupted before a process
    starts: one bad page in the middle, truncated to a third, a random header, random bytes;
    and junk in instance_id and notice.json beside a good outbox."""
    import sqlite3

    for how in ("junk_ids", "bad_page", "truncated", "random_header", "random_file"):
        dest = Dest()
        dest.set(down=True)
        cfg = config_file(root / f"{how}.yml", dest.url)
        data = root / how
        spawn("store", cfg=cfg, data=str(data), n=500)
        path = data / "outbox.sqlite3"
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for suffix in ("-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        raw = path.read_bytes()
        what = how
        if how == "junk_ids":  # junk in instance_id and notice.json; the outbox is fine
            for name in ("instance_id", "notice.json"):
                (data / name).write_bytes(os.urandom(64))
        elif how == "bad_page":
            what = _bad_page(path)
        elif how == "truncated":
            path.write_bytes(raw[: len(raw) // 3])
        elif how == "random_header":
            path.write_bytes(os.urandom(100) + raw[100:])
        else:
            path.write_bytes(os.urandom(len(raw)))
        before_cli = cli(cfg, data, "status", "--json")
        n = spawn("deliver", cfg=cfg, data=str(data), base=dest.base, n=100, timeout=10.0)
        after_cli = cli(cfg, data, "status", "--json")
        cli_sweep(c, how, cfg, data)
        st = n.get("status", {})
        new = dest.has(range(1_000_000, 1_000_100))
        old = dest.has(range(500))
        c.figures[how] = {"next": n, "cli_before": before_cli, "cli_after": after_cli}
        c.line(
            f"{how} ({what}): CLI status before start rc {before_cli['rc']}; next process: "
            f"flush {n.get('flush')}, new 100 -> {new} arrived, old 500 -> {old} arrived"
        )
        c.line(
            f"  storage {st.get('storage')}; CLI after rc {after_cli['rc']}; files "
            f"{sorted(p.name for p in data.iterdir())}"
        )
        c.expect(
            f"{how}: status() and the CLI answer, no traceback",
            "raised" not in st
            and n["rc"] == 0
            and not n["traceback"]
            and before_cli["rc"] == 0
            and after_cli["rc"] == 0
            and not before_cli["traceback"]
            and not after_cli["traceback"],
        )
        c.expect(f"{how}: new events arrive", new == 100)
        told = st.get("storage", {}).get("moved_aside") or st.get("storage", {}).get("notes")
        c.expect(
            f"{how}: the operator is told (moved aside / notes), or nothing was lost",
            bool(told) or old == 500,
        )
        if how == "junk_ids":
            c.expect(f"{how}: the stored 500 arrive", old == 500)
        elif how == "bad_page":
            c.expect(
                f"{how}: one bad page costs only the rows it held (450 of 500 arrive)", old >= 450
            )
        dest.close()


HOLD = (
    "import sqlite3, sys, time\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN IMMEDIATE')\nprint('held', flush=True)\ntime.sleep(120)\n"
)


def check_lock(c: Check, root: Path) -> None:
    """Another process holds the outbox's write lock (BEGIN IMMEDIATE); 2,000 events, sink down."""
    dest = Dest()
    dest.set(down=True)
    cfg = config_file(root / "telemetry.yml", dest.url)
    data = root / "data"
    spawn("store", cfg=cfg, data=str(data), n=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data / "outbox.sqlite3")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        a = spawn("locked", cfg=cfg, data=str(data))
        e = spawn("exit_budget", cfg=cfg, data=str(data))
        ended = time.time()
        try:
            e["exit_s"] = round(ended - float((root / "exit-mark").read_text()), 2)
        except (OSError, ValueError):
            e["exit_s"] = None
        status_cli = cli(cfg, data, "status", "--json")
        cli_sweep(c, "lock held", cfg, data)
    finally:
        holder.kill()
        holder.wait()
    c.figures.update(calls=a, exit=e, cli=status_cli)
    c.line(
        f"flush(2.0) {a.get('flush')} in {a.get('flush_s')} s; shutdown(1.0) {a.get('shutdown')} "
        f"in {a.get('shutdown_s')} s; dropped {a.get('after', {}).get('dropped')}"
    )
    c.line(
        f"interpreter exit (shutdown_timeout 3 s) {e.get('exit_s')} s from the last track; "
        f"`waypost status --json` rc {status_cli['rc']} in {status_cli['seconds']} s"
    )
    c.expect("flush(2.0) within budget", num(a.get("flush_s"), 99) <= 2.0 + MARGIN)
    c.expect("shutdown(1.0) within budget", num(a.get("shutdown_s"), 99) <= 1.0 + MARGIN)
    c.expect(
        "interpreter exit within shutdown_timeout 3 s", num(e.get("exit_s"), 99) <= 3.0 + MARGIN
    )
    c.expect("flush honest (False: nothing could be stored)", a.get("flush") is False)
    after = a.get("after", {})
    c.expect(
        "after shutdown every event is delivered, stored or counted dropped",
        accounted(after, dest.stats()["arrived"]),
    )
    c.expect("the CLI answers", status_cli["rc"] == 0 and not status_cli["traceback"])
    dest.close()


@child
def locked(cfg: str, data: str) -> None:
    tel = make(cfg, data)
    figures = track_many(tel, 2000)
    ok, seconds = timed(tel.flush, 2.0)
    figures.update(flush=ok, flush_s=seconds)
    ok, seconds = timed(tel.shutdown, 1.0)
    out(**figures, shutdown=ok, shutdown_s=seconds, after=summary(tel))


@child
def exit_budget(cfg: str, data: str) -> None:
    """Track 2,000 events and leave: the parent times the exit from the stamp written after the
    last track()."""
    tel = make(cfg, data)
    track_many(tel, 2000)
    (Path(data).parent / "exit-mark").write_text(repr(time.time()))


def check_flaky_flush(c: Check, root: Path) -> None:
    """flush(60) after 50,000 events against a destination that fails on a schedule (503 with
    Retry-After: 1, 429, resets, 500s) for its first 120 requests, then answers ok."""
    schedule = ["ok", 503, "ok", 429, "ok", "reset", "ok", 500, 503, "reset", 429, "ok"]
    dest = Dest(schedule, failing=120)
    cfg = config_file(root / "telemetry.yml", dest.url)
    a = spawn("flaky", cfg=cfg, data=str(root / "data"), base=dest.base)
    c.figures = a
    at_return = a.get("dest_at_return", {})
    st = a.get("status", {})
    c.line(
        f"tracked 50000 in {a.get('track_s')} s (worst {a.get('worst_track_ms')} ms); flush(60) "
        f"{a.get('flush')} in {a.get('flush_s')} s; arrived at its return "
        f"{at_return.get('arrived')}"
        f", stored {st.get('pending')}, dropped {st.get('dropped')}"
    )
    c.line(
        f"  answers {dest.stats()['answers']}; finally arrived {dest.stats()['arrived']} "
        f"(dups {dest.stats()['duplicates']})"
    )
    safe = (at_return.get("arrived") or 0) + (st.get("pending") or 0)
    c.expect(
        "flush True only if all delivered or stored", a.get("flush") is not True or safe >= 50_000
    )
    c.expect(
        "retries due before the deadline made within the call: all arrived at its return",
        at_return.get("arrived") == 50_000,
    )
    c.expect("flush(60) within budget", num(a.get("flush_s"), 99) <= 60 + MARGIN)
    dest.close()


@child
def flaky(cfg: str, data: str, base: str) -> None:
    tel = make(cfg, data)
    figures = track_many(tel, 50_000)
    ok, seconds = timed(tel.flush, 60.0)
    out(**figures, flush=ok, flush_s=seconds, dest_at_return=stats(base), status=summary(tel))
    ok, seconds = timed(tel.shutdown, 5.0)
    out(shutdown=ok, shutdown_s=seconds)


def check_slow_hook(c: Check, root: Path) -> None:
    """A 5 ms before_send hook and 1,000 events, then flush(1.0); one 5 MiB string, flush(1.0)."""
    for how in ("hook_5ms", "string_5mib"):
        dest = Dest()
        cfg = config_file(root / f"{how}.yml", dest.url)
        a = spawn("slow", cfg=cfg, data=str(root / how), how=how, base=dest.base)
        c.figures[how] = a
        c.line(
            f"{how}: flush(1.0) {a.get('flush')} in {a.get('flush_s')} s (arrived at return "
            f"{a.get('dest_at_return', {}).get('arrived')}, "
            f"stored {a.get('status', {}).get('pending')}); "
            f"shutdown(5) {a.get('shutdown_s')} s; arrived {dest.stats()['arrived']}"
        )
        c.expect(
            f"{how}: flush(1.0) returns within about 1 s", num(a.get("flush_s"), 99) <= 1.0 + MARGIN
        )
        c.expect(
            f"{how}: track never waits on the hook or the scan",
            num(a.get("worst_track_ms"), 999) < 50,
        )
        after = a.get("after", {})
        c.line(
            f"  after shutdown(5): dropped {after.get('dropped')}, stored {after.get('pending')}"
        )
        status = a.get("status", {})
        at_return = a.get("dest_at_return", {}).get("arrived", 0)
        c.expect(
            f"{how}: flush(1.0) returned False, or what it called safe had arrived or was stored",
            a.get("flush") is False
            or ("accepted" in status and at_return + status["pending"] >= status["accepted"]),
        )
        # The hook's work (5 s for 1,000 events) may outlast flush(1) and shutdown(5): an event
        # the hooks have not yet run on cannot be stored (it is not yet built), so it is counted.
        arrived = dest.stats()["arrived"]
        c.expect(
            f"{how}: after flush(1) and shutdown(5) every event was delivered, stored or counted",
            "accepted" in after
            and arrived + after["pending"] + sum(after["dropped"].values()) >= after["accepted"],
        )
        dest.close()


@child
def slow(cfg: str, data: str, how: str, base: str) -> None:
    import waypost

    class Slow:
        @waypost.hookimpl
        def waypost_before_send(self, event: Any) -> None:
            time.sleep(0.005)

    if how == "hook_5ms":
        tel = make(cfg, data, plugins=[Slow()])
        figures = track_many(tel, 1000)
    else:
        tel = make(cfg, data)
        huge = "y" * (5 * 1024 * 1024)
        before = time.perf_counter()
        tel.track("huge", {"i": 0, "text": huge})
        figures = {"worst_track_ms": round((time.perf_counter() - before) * 1000, 1)}
        figures["small"] = track_many(tel, 100, 1)
    ok, seconds = timed(tel.flush, 1.0)
    out(**figures, flush=ok, flush_s=seconds, dest_at_return=stats(base), status=summary(tel))
    ok, seconds = timed(tel.shutdown, 5.0)
    out(shutdown=ok, shutdown_s=seconds, after=summary(tel))


BAD = (
    "system_exit",
    "keyboard_interrupt",
    "garbage",
    "reason_not_text",
    "retry_after_text",
    "hang",
)


def check_bad_sinks(c: Check, root: Path) -> None:
    """A custom sink (passed with sink_classes) misbehaves on its first 3 sends, then forwards
    to the destination: status() never raises, the state says error, the thread lives on, and
    the 200 events are retried or stored (all arrive once it behaves)."""
    for how in BAD:
        dest = Dest()
        a = spawn("bad_sink", data=str(root / how), url=dest.url, how=how, timeout=90)
        arrived = dest.stats()["arrived"]
        c.figures[how] = a
        during = a.get("during", {})
        c.line(
            f"{how}: while misbehaving: sink {during.get('sinks')}; status raised "
            f"{a.get('status_raised')}; flush {a.get('flush')} in {a.get('flush_s')} s; "
            f"arrived {arrived}/200; threads {a.get('threads')}"
        )
        sink = (during.get("sinks") or {}).get("bad", {})
        c.expect(
            f"{how}: status() never raises", not a.get("status_raised") and "raised" not in during
        )
        c.expect(
            f"{how}: the state says error, with a reason",
            sink.get("state") == "error" and bool(sink.get("error")),
        )
        c.expect(f"{how}: the thread lives on: all 200 arrive once it behaves", arrived == 200)
        c.expect(f"{how}: the process ends cleanly", a["rc"] == 0 and not a["traceback"])
        dest.close()


@child
def bad_sink(data: str, url: str, how: str) -> None:
    import json as _json
    from collections.abc import Sequence

    import waypost

    release = threading.Event()

    class BadConfig(waypost.SinkConfig):
        url: str

    class Bad(waypost.Sink):
        type = "bad"
        Config = BadConfig
        calls = 0

        def send(self, events: Sequence[waypost.Event]) -> Any:
            Bad.calls += 1
            if Bad.calls <= 3:
                ids = [e.id for e in events]
                if how == "system_exit":
                    raise SystemExit(3)
                if how == "keyboard_interrupt":
                    raise KeyboardInterrupt
                if how == "garbage":
                    return "garbage"
                if how == "reason_not_text":
                    return waypost.SendResult(retry={i: 123 for i in ids})  # type: ignore[misc]
                if how == "retry_after_text":
                    return waypost.SendResult(retry={i: "x" for i in ids}, retry_after="soon")  # type: ignore[arg-type]
                if how == "hang":
                    release.wait(600)
            body = _json.dumps([e.to_dict() for e in events]).encode()
            request = urllib.request.Request(
                self.config.url,
                data=body,  # type: ignore[attr-defined]
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                answer.read()
            return waypost.SendResult.ok()

    config = {
        "telemetry": {
            "notice": {"enabled": False},
            "batch": {"interval": 0.05},
            "retry": {"initial": 0.05, "maximum": 0.5},
            "sinks": {"bad": {"type": "bad", "url": url, "timeout": 2}},
        }
    }
    tel = waypost.Telemetry(
        app="faults", version="1", config=config, data_dir=data, env=child_env(), sink_classes=[Bad]
    )
    track_many(tel, 200)
    deadline = time.monotonic() + 10
    during: dict[str, Any] = {}
    raised = None
    while time.monotonic() < deadline:
        try:
            tel.status()
        except BaseException as exc:
            raised = f"{type(exc).__name__}: {exc}"
            break
        during = summary(tel)
        if during.get("sinks", {}).get("bad", {}).get("state") == "error" and Bad.calls >= 1:
            break
        time.sleep(0.05)
    threads = sorted(t.name for t in threading.enumerate())
    release.set()
    ok, seconds = timed(tel.flush, 15.0)
    out(
        during=during,
        status_raised=raised,
        threads=threads,
        calls=Bad.calls,
        flush=ok,
        flush_s=seconds,
        after=summary(tel),
    )
    ok, seconds = timed(tel.shutdown, 5.0)
    out(shutdown=ok, shutdown_s=seconds)


def check_kill9(c: Check, root: Path) -> None:
    """Destination down: 3,000 events, flush(10) says safe; then a burst, killed with -9 in the
    middle; the next process (destination up) must deliver every event flush reported safe."""
    dest = Dest()
    dest.set(down=True)
    cfg = config_file(root / "telemetry.yml", dest.url)
    data = root / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE),
            "--child",
            "burst",
            json.dumps({"cfg": cfg, "data": str(data)}),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stdout is not None
    figures: dict[str, Any] = {}
    for line in proc.stdout:
        if line.startswith(MARK):
            figures.update(json.loads(line[len(MARK) :]))
            if "burst" in figures:
                break
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = spawn("deliver", cfg=cfg, data=str(data), base=dest.base)
    safe = dest.has(range(3000))
    burst = dest.has(range(3000, 3000 + 200_000))
    c.figures = {"first": figures, "next": n}
    c.line(
        f"flush(10) before the burst {figures.get('flush')} in {figures.get('flush_s')} s; "
        f"killed -9 mid-burst; next process: flush {n.get('flush')} in {n.get('flush_s')} s"
    )
    c.line(
        f"  arrived {safe} of the 3000 reported safe; {burst} of the burst; dups "
        f"{dest.stats()['duplicates']}"
    )
    c.expect("flush reported the first 3000 safe", figures.get("flush") is True)
    c.expect("the next process delivers every event flush reported safe", safe == 3000)
    dest.close()


@child
def burst(cfg: str, data: str) -> None:
    tel = make(cfg, data)
    track_many(tel, 3000)
    ok, seconds = timed(tel.flush, 10.0)
    out(flush=ok, flush_s=seconds, status=summary(tel))
    out(burst=True)
    for i in range(3000, 3000 + 200_000):
        tel.track("evt", {"i": i})
    time.sleep(60)


def check_checkpoint(c: Check, root: Path) -> None:
    """A process that exits normally (shutdown(), at interpreter exit, at exit with a send()
    hung): are its rows in the main file, or only in the -wal?"""
    import sqlite3

    for how in ("shutdown", "atexit", "atexit_send_hung"):
        hung = how == "atexit_send_hung"
        dest = Dest(["hang"] if hung else None)
        dest.set(down=not hung, hang_s=20.0)
        cfg = config_file(root / f"{how}.yml", dest.url)
        data = root / how
        child = "store" if how == "shutdown" else "store_and_leave"
        a = spawn(child, cfg=cfg, data=str(data), n=500)
        path = data / "outbox.sqlite3"
        wal = Path(str(path) + "-wal")
        wal_size = wal.stat().st_size if wal.exists() else 0
        copy = root / f"{how}-main-only.sqlite3"  # the main file alone, as a copy without -wal
        shutil.copy(path, copy)
        try:
            with sqlite3.connect(copy) as db:
                rows = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.Error as exc:
            rows = f"{type(exc).__name__}: {exc}"
        c.figures[how] = {"first": a, "wal_bytes": wal_size, "rows_in_main_file": rows}
        c.line(
            f"{how}: process took {a.get('seconds')} s; -wal {wal_size} bytes; rows in the "
            f"main file alone: {rows} (500 stored)"
        )
        c.expect(f"{how}: the main file alone holds the 500 rows", rows == 500)
        dest.close()
    c.expect(
        "shutdown(5) within budget",
        num(c.figures["shutdown"]["first"].get("shutdown_s"), 99) <= 5 + MARGIN,
    )


@child
def store_and_leave(cfg: str, data: str, n: int) -> None:
    """Track ``n`` events with the destination down, flush, and leave (waypost's own exit)."""
    tel = make(cfg, data)
    track_many(tel, n)
    ok, seconds = timed(tel.flush, 10.0)
    out(flush=ok, flush_s=seconds, status=summary(tel))


CHECKS: dict[str, Callable[[Check, Path], None]] = {
    "disk_full": check_disk_full,
    "read_only": check_read_only,
    "deleted": check_deleted,
    "corrupt": check_corrupt,
    "lock": check_lock,
    "flaky_flush": check_flaky_flush,
    "slow_hook": check_slow_hook,
    "bad_sinks": check_bad_sinks,
    "kill9": check_kill9,
    "checkpoint": check_checkpoint,
}


def run(names: list[str], keep: bool) -> list[Check]:
    done: list[Check] = []
    base = Path(tempfile.mkdtemp(prefix="waypost-faults-"))
    os.chmod(base, 0o755)
    for name in names:
        check = Check(name)
        print(f"== {name}: {(CHECKS[name].__doc__ or '').splitlines()[0]}", flush=True)
        started = time.monotonic()
        root = base / name
        root.mkdir()
        try:
            CHECKS[name](check, root)
        except Exception:
            check.expect("the check ran to its end", False)
            check.line(traceback.format_exc())
        if check.skipped:
            print(f"   SKIP: {check.skipped}", flush=True)
        for promise, ok in check.verdicts:
            print(f"   [{'PASS' if ok else 'FAIL'}] {promise}", flush=True)
        verdict = "SKIP" if check.skipped else "PASS" if check.passed else "FAIL"
        print(f"   {name}: {verdict} ({time.monotonic() - started:.1f} s)", flush=True)
        done.append(check)
    if not keep:
        subprocess.run(["umount", "-R", "-q", str(base)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"files kept in {base}")
    return done


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        CHILDREN[sys.argv[2]](**json.loads(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated checks: " + ", ".join(CHECKS))
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    if os.geteuid() == 0 and os.environ.get("WAYPOST_FAULTS_NS") != "1" and shutil.which("unshare"):
        env = {**os.environ, "WAYPOST_FAULTS_NS": "1"}
        command = ["unshare", "--mount", "--propagation", "private", sys.executable, *sys.argv]
        return subprocess.run(command, env=env).returncode
    checks = run(names, args.keep)
    failed = [c.name for c in checks if not c.skipped and not c.passed]
    print(
        "\nsummary: "
        + ", ".join(
            f"{c.name} {'SKIP' if c.skipped else 'PASS' if c.passed else 'FAIL'}" for c in checks
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "name": c.name,
                        "skipped": c.skipped,
                        "verdicts": c.verdicts,
                        "figures": c.figures,
                    }
                    for c in checks
                ],
                indent=1,
                default=str,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
