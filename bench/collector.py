"""The collector under load, side by side in one run with a baseline.

    python bench/collector.py                 # 1 and 2 processes each, 12 s per run
    python bench/collector.py --quick         # 4 s per run
    python bench/collector.py --seconds 20 --clients 32

Contenders, each served by the same server (uvicorn, ``--workers N``), one after the other:

- ``baseline``: a bare Starlette endpoint that parses the JSON array and inserts its rows into
  SQLite (WAL, ``synchronous=NORMAL``: a process crash loses nothing, a power cut may lose the
  last commits), one transaction per request, answered once committed;
- ``collector``: ``waypost collector serve`` with its embedded storage: token and signature
  checked, every envelope validated, properties scrubbed, the address hashed, duplicates looked
  up, the batch committed to the spool with ``synchronous=FULL`` before the answer, then handed
  to storage in the background.

A load process (asyncio, httpx) keeps ``--clients`` requests in flight, each a batch of
``--batch`` fresh events in the http sink's JSON envelope, signed; it counts the events each
answer accepted and times each answer. Afterwards the collector's storage is read to check
that it holds every accepted event once. Results go to bench/results/collector.json and .md.
The machine's cores are shared with the load process (and anything else running): the figures
come with the conditions they were taken under.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token-0123456789"
SECRET = "bench-signing-secret-0123"


# --- the baseline server ----------------------------------------------------------------------


def baseline() -> Any:
    """The baseline app (uvicorn factory): parse, insert into SQLite, answer."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    path = os.environ["WAYPOST_BENCH_DB"]
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=30000")
    db.execute(
        "CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, name TEXT, timestamp TEXT, "
        "instance_id TEXT, properties TEXT, context TEXT)"
    )

    async def events(request: Request) -> JSONResponse:
        batch = json.loads(await request.body())
        rows = [
            (e["id"], e["name"], e["timestamp"], e["instance_id"],
             json.dumps(e["properties"]), json.dumps(e["context"]))
            for e in batch
        ]  # fmt: skip
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.execute("COMMIT")
        return JSONResponse({"accepted": len(rows)})

    return Starlette(routes=[Route("/v1/{app}/events", events, methods=["POST"])])


# --- the load -----------------------------------------------------------------------------------


def load(url: str, seconds: float, clients: int, batch: int) -> dict[str, Any]:
    """Keep ``clients`` batches in flight for ``seconds``; accepted events and latencies."""
    import asyncio

    import httpx
    from waypost_http import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

    from waypost.events import base_context, uuid7

    try:
        import orjson

        dumps = orjson.dumps
    except ImportError:  # pragma: no cover

        def dumps(data: Any) -> bytes:
            return json.dumps(data).encode()

    context = base_context("benchapp", "2.1.0")
    latencies: list[float] = []
    accepted = 0
    errors: dict[str, int] = {}
    sent = warm = 0

    def body(k: int) -> bytes:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now))
        ids = uuid7.many([now] * batch)
        return dumps([
            {"id": ids[i], "name": "run", "timestamp": stamp, "instance_id": f"inst-{k % 500}",
             "distinct_id": f"inst-{k % 500}",
             "properties": {"runSeconds": i, "runSuccess": True, "plan": "team",
                            "feature": "editor", "nodes": 12},
             "context": context}
            for i in range(batch)
        ])  # fmt: skip

    async def client(c: int, http: httpx.AsyncClient, until: float, counter: list[int]) -> None:
        nonlocal accepted, sent
        while time.perf_counter() < until:
            counter[0] += 1
            payload = body(counter[0] * clients + c)
            stamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "Authorization": f"Bearer {TOKEN}",
                TIMESTAMP_HEADER: stamp,
                SIGNATURE_HEADER: sign(SECRET, stamp, payload),
            }
            started = time.perf_counter()
            try:
                answer = await http.post(url, content=payload, headers=headers)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            sent += batch
            if answer.status_code == 200:
                accepted += int(answer.json()["accepted"])
            else:
                errors[str(answer.status_code)] = errors.get(str(answer.status_code), 0) + 1

    async def run() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            warm_until = time.perf_counter() + 1.0  # connections and caches, not counted
            await asyncio.gather(*(client(c, http, warm_until, [10**6]) for c in range(clients)))
            nonlocal accepted, sent, warm
            warm = accepted
            latencies.clear()
            accepted = sent = 0
            errors.clear()
            started = time.perf_counter()
            until = started + seconds
            await asyncio.gather(*(client(c, http, until, [0]) for c in range(clients)))
            return time.perf_counter() - started

    elapsed = asyncio.run(run())
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0
        )

    return {
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "events_sent": sent,
        "events_accepted": accepted,
        "events_per_second": round(accepted / elapsed, 1),
        "warmup_accepted": warm,
        "ack_p50_ms": round(pct(0.50), 2),
        "ack_p99_ms": round(pct(0.99), 2),
        "errors": errors,
    }


# --- one contender ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(session: int) -> float:
    """User and system CPU seconds used so far by the processes of one session (the server
    and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6 of stat, counted after the name
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            httpx.post(url, content=b"[]", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not answer: {log.read_text()[-3000:]}")


def _collector_config(data: Path, ack: str) -> Path:
    path = data.parent / f"{data.name}.yml"
    config = {
        "collector": {
            "data_dir": str(data),
            "ack": ack,
            "apps": {"benchapp": {"token": TOKEN, "signing_secret": SECRET}},
            "limits": {"per_address": None, "per_installation": None},
        }
    }
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def _stored(kind: str, data: Path) -> int:
    path = data / ("events.sqlite3" if kind == "collector" else "baseline.sqlite3")
    table = "waypost_events" if kind == "collector" else "events"
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT COUNT(DISTINCT id) FROM {table}").fetchone()[0])
    finally:
        db.close()


def _spool_pending(data: Path) -> int:
    path = data / "spool" / "outbox.sqlite3"
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0])
    finally:
        db.close()


def contender(
    kind: str, workers: int, args: argparse.Namespace, root: Path, ack: str = "spool"
) -> dict[str, Any]:
    name = f"{kind} x{workers}" if kind == "baseline" else f"{kind} (ack: {ack}) x{workers}"
    data = root / name.replace(" ", "_").replace(":", "").replace("(", "").replace(")", "")
    data.mkdir()
    port = _free_port()
    log = root / f"{data.name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    common = ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if kind == "baseline":
        env["WAYPOST_BENCH_DB"] = str(data / "baseline.sqlite3")
        argv = [sys.executable, "-m", "uvicorn", "collector:baseline", "--factory", "--app-dir",
                str(HERE), "--no-access-log", "--log-level", "warning", *common]  # fmt: skip
    else:
        code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
        argv = [sys.executable, "-c", code, "collector", "serve", "--config",
                str(_collector_config(data, ack)), "--log-level", "warning", *common]  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/benchapp/events"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        _wait(url, proc, log)
        time.sleep(1.0)  # every worker up
        cpu_before = _cpu_seconds(proc.pid)
        loader = subprocess.run(
            [sys.executable, __file__, "--load", url, "--seconds", str(args.seconds),
             "--clients", str(args.clients), "--batch", str(args.batch)],
            capture_output=True, text=True, timeout=args.seconds + 120,
        )  # fmt: skip
        if loader.returncode:
            raise SystemExit(f"the load failed: {loader.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(loader.stdout)
        # Answering only: the collector's handoff to storage goes on after the load, below.
        cpu = _cpu_seconds(proc.pid) - cpu_before
        events = result["events_accepted"] + result["warmup_accepted"]
        result["server_cpu_ms_per_1000_events"] = round(cpu * 1e6 / max(1, events), 1)
        if kind == "collector":
            started = time.monotonic()
            while _spool_pending(data) and time.monotonic() - started < 120:
                time.sleep(0.2)
            result["storage_drain_seconds"] = round(time.monotonic() - started, 2)
            cpu = _cpu_seconds(proc.pid) - cpu_before
            result["server_cpu_ms_per_1000_events_with_storage"] = round(
                cpu * 1e6 / max(1, events), 1
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    stored = _stored(kind, data)
    # Warm-up batches are stored too: at least every counted event must be there.
    result["stored_at_least_accepted"] = stored >= result["events_accepted"]
    result["stored"] = stored
    return {"name": name, "kind": kind, "ack": ack, "workers": workers, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="4 s per run; results not kept")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load, args.seconds, args.clients, args.batch)))
        return
    if args.quick:
        args.seconds = 4.0
    results = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-collector-") as tmp:
        for workers in (1, 2):
            for kind, ack in (("baseline", "-"), ("collector", "spool"), ("collector", "storage")):
                print(f"{kind} {ack} x{workers} ...", file=sys.stderr, flush=True)
                results.append(contender(kind, workers, args, Path(tmp), ack))
    by = {(r["kind"], r["ack"], r["workers"]): r["events_per_second"] for r in results}
    summary: dict[str, Any] = {"goals": {"collector_vs_baseline": 0.7, "two_vs_one": 1.6}}
    for ack in ("spool", "storage"):
        one, two = by[("collector", ack, 1)], by[("collector", ack, 2)]
        summary[f"ack_{ack}"] = {
            "collector_vs_baseline": round(one / max(1.0, by[("baseline", "-", 1)]), 3),
            "two_vs_one": round(two / max(1.0, one), 3),
        }
    summary["baseline_two_vs_one"] = round(
        by[("baseline", "-", 2)] / max(1.0, by[("baseline", "-", 1)]), 3
    )
    conditions = {
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seconds_per_run": args.seconds,
        "clients": args.clients,
        "batch": args.batch,
        "note": "server workers and the load process share the machine's cores",
    }
    report = {"results": results, "summary": summary, "conditions": conditions}
    text = _markdown(report)
    print(text)
    if not args.quick:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "collector.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out / "collector.md").write_text(text, encoding="utf-8")


def _markdown(report: dict[str, Any]) -> str:
    c = report["conditions"]
    lines = [
        "# The collector under load",
        "",
        f"{c['clients']} concurrent clients, batches of {c['batch']} events, "
        f"{c['seconds_per_run']:g} s per run; {c['cpus']} cores shared by the server and the "
        "load process (load average "
        f"before: {', '.join(map(str, c['load_average_before']))}); Python {c['python']}.",
        "",
        "Contender | accepted events/s | ack p50 ms | ack p99 ms | server CPU ms / 1,000 events "
        "(with storage) | storage caught up after | errors | all stored",
        "----|----|----|----|----|----|----|----",
    ]
    for r in report["results"]:
        cpu = f"{r['server_cpu_ms_per_1000_events']}"
        if "server_cpu_ms_per_1000_events_with_storage" in r:
            cpu += f" ({r['server_cpu_ms_per_1000_events_with_storage']})"
        drain = f"{r['storage_drain_seconds']} s" if "storage_drain_seconds" in r else "-"
        lines.append(
            f"{r['name']} | {r['events_per_second']:,.0f} | {r['ack_p50_ms']} | "
            f"{r['ack_p99_ms']} | {cpu} | {drain} | {sum(r['errors'].values())} | "
            f"{'yes' if r['stored_at_least_accepted'] else 'NO'}"
        )
    s = report["summary"]
    lines.append("")
    for ack in ("spool", "storage"):
        r = s[f"ack_{ack}"]
        lines.append(
            f"- ack: {ack}: collector / baseline (one process) **{r['collector_vs_baseline']:.2f}**"
            f" (goal 0.7); two processes / one **{r['two_vs_one']:.2f}** (goal 1.6)."
        )
    lines += [
        f"- the baseline itself: two processes / one {s['baseline_two_vs_one']:.2f}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
