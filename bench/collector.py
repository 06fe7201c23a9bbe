"""The collector under load, side by side in one run with a baseline.

    python bench/collector.py                 # 1 and 2 processes each, 12 s per run
    python bench/collector.py --quick         # 4 s per run
    python bench/collector.py --seconds 20 --clients 32
    python bench/collector.py --only spool,storage --workers 1 --rounds 3   # alternating
    python bench/collector.py --only spool --workers 1 --profile /tmp/prof  # py-spy stacks

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
come with the conditions they were taken under. Each run says, over its measured window, the
cores the server's processes used, the cores the load process used and the cores the whole
machine was busy on (``/proc/stat``); the two-process figure comes with the most two processes
could have gained from the cores one process left idle, so a machine that cannot show the
scaling says so. Only a run of every contender with one and two processes rewrites
bench/results/; ``--only``, ``--workers`` and ``--quick`` print (``--json`` keeps a copy).
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
            # The measured window starts and ends with a line on stderr, where the bench reads
            # the server's and the machine's CPU counters.
            print("start", file=sys.stderr, flush=True)
            cpu_window.append(time.process_time())
            started = time.perf_counter()
            until = started + seconds
            await asyncio.gather(*(client(c, http, until, [0]) for c in range(clients)))
            elapsed = time.perf_counter() - started
            cpu_window.append(time.process_time())
            print("end", file=sys.stderr, flush=True)
            return elapsed

    cpu_window: list[float] = []
    elapsed = asyncio.run(run())
    load_cpu = cpu_window[1] - cpu_window[0]
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
        "load_cpu_seconds": round(load_cpu, 2),
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


def _thread_cpu(session: int) -> dict[str, float]:
    """CPU seconds so far of each thread of the server's processes, by thread name (as
    ``py-spy dump`` names them; CPython does not name its threads for the kernel)."""
    tick = os.sysconf("SC_CLK_TCK")
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) != session:
            continue
        pid = stat.parent.name
        dump = subprocess.run(["py-spy", "dump", "--nonblocking", "--pid", pid],
                              capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        for line in dump.splitlines():
            if line.startswith("Thread "):  # Thread 123 (idle): "MainThread"
                tid = int(line.split()[1], 0)
                names[tid] = f"{pid}:{line.rsplit(':', 1)[1].strip().strip(chr(34))}"
    out: dict[str, float] = {}
    for tid, name in names.items():
        for task in Path("/proc").glob(f"*/task/{tid}/stat"):
            try:
                fields = task.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core (/proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


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


def _profile(pid: int, args: argparse.Namespace, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording the server's processes and threads through the measured window (and
    the handoff after it), as collapsed stacks in ``out``.txt."""
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--threads",
            "--nonblocking", "--format", "raw", "--rate", "200",
            "--duration", str(int(args.seconds) + 3), "--output", f"{out}.txt"]  # fmt: skip
    if args.profile_gil:
        argv.append("--gil")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
        loader = subprocess.Popen(
            [sys.executable, __file__, "--load", url, "--seconds", str(args.seconds),
             "--clients", str(args.clients), "--batch", str(args.batch)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert loader.stderr is not None and loader.stdout is not None
        said: list[str] = []
        marks: dict[str, tuple[float, float, float]] = {}
        threads: dict[str, dict[str, float]] = {}
        profiler: subprocess.Popen[bytes] | None = None
        for line in loader.stderr:
            if line.strip() in ("start", "end"):
                marks[line.strip()] = (_cpu_seconds(proc.pid), *_machine_cpu())
                if args.threads:
                    threads[line.strip()] = _thread_cpu(proc.pid)
                if line.strip() == "start" and args.profile:
                    profiler = _profile(proc.pid, args, Path(args.profile) / data.name)
            else:
                said.append(line)
        out = loader.stdout.read()
        if loader.wait(args.seconds + 120) or set(marks) != {"start", "end"}:
            raise SystemExit(f"the load failed: {''.join(said)[-3000:]}")
        result: dict[str, Any] = json.loads(out)
        cpu_before, busy_before, total_before = marks["start"]
        cpu_after, busy_after, total_after = marks["end"]
        # Answering only: the collector's handoff to storage goes on after the load, below.
        cpu = cpu_after - cpu_before
        events = result["events_accepted"]
        result["server_cpu_ms_per_1000_events"] = round(cpu * 1e6 / max(1, events), 1)
        # The CPU each side got, in cores (CPU seconds per second of the measured window).
        result["server_cores"] = round(cpu / result["seconds"], 2)
        result["load_cores"] = round(result["load_cpu_seconds"] / result["seconds"], 2)
        result["machine_busy_cores"] = round(
            (busy_after - busy_before) / (total_after - total_before) * (os.cpu_count() or 1), 2
        )
        if threads:
            # Per thread: ms per 1,000 events answered in the window (the names' process ids
            # dropped, threads of one name summed over processes).
            per: dict[str, float] = {}
            for thread, after in threads["end"].items():
                key = thread.split(":", 1)[1]
                used = after - threads["start"].get(thread, 0.0)
                per[key] = per.get(key, 0.0) + used * 1e6 / max(1, events)
            result["thread_cpu_ms_per_1000_events"] = {k: round(v, 1) for k, v in per.items()}
        if kind == "collector":
            started = time.monotonic()
            while _spool_pending(data) and time.monotonic() - started < 120:
                time.sleep(0.2)
            result["storage_drain_seconds"] = round(time.monotonic() - started, 2)
            cpu = _cpu_seconds(proc.pid) - cpu_before
            result["server_cpu_ms_per_1000_events_with_storage"] = round(
                cpu * 1e6 / max(1, events), 1
            )
        if profiler is not None:
            profiler.wait(60)
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


CONTENDERS = {"baseline": ("baseline", "-"), "spool": ("collector", "spool"),
              "storage": ("collector", "storage")}  # fmt: skip


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarise(results: list[dict[str, Any]], cpus: int) -> dict[str, Any]:
    """Ratios of the medians over rounds, for the contenders that ran: collector / baseline
    (one process), two processes / one, and what the machine let two processes have."""
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault((r["kind"], r["ack"], r["workers"]), []).append(r)

    def med(key: tuple[str, str, int], field: str) -> float | None:
        found = runs.get(key)
        return _median([float(r[field]) for r in found]) if found else None

    summary: dict[str, Any] = {"goals": {"collector_vs_baseline": 0.7, "two_vs_one": 1.6}}
    for kind, ack in CONTENDERS.values():
        one, two = (kind, ack, 1), (kind, ack, 2)
        entry: dict[str, Any] = {}
        base = med(("baseline", "-", 1), "events_per_second")
        rate1, rate2 = med(one, "events_per_second"), med(two, "events_per_second")
        if kind == "collector" and rate1 is not None and base:
            entry["collector_vs_baseline"] = round(rate1 / base, 3)
        if rate1 and rate2 is not None:
            cores1, cores2 = med(one, "server_cores"), med(two, "server_cores")
            busy1 = med(one, "machine_busy_cores")
            entry["two_vs_one"] = round(rate2 / rate1, 3)
            if cores1 and cores2 and busy1 is not None:
                # Two processes can go faster than one only on CPU that one left idle: at most
                # (one's cores + the idle cores) / one's cores, if the load process needed
                # nothing more. Events per server core say whether a second process costs
                # more per event (it should not: processes share nothing but storage).
                spare = max(0.0, cpus - busy1)
                entry["server_cores_one_two"] = [round(cores1, 2), round(cores2, 2)]
                entry["idle_cores_with_one"] = round(spare, 2)
                entry["two_vs_one_ceiling"] = round((cores1 + spare) / cores1, 2)
                entry["per_core_two_vs_one"] = round((rate2 / cores2) / (rate1 / cores1), 3)
        if entry:
            summary[ack if kind == "collector" else "baseline"] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="4 s per run; results not kept")
    parser.add_argument(
        "--only",
        help="comma-separated contenders to run (baseline, spool, storage; default all); "
        "results are then printed, not kept",
    )
    parser.add_argument("--workers", default="1,2", help="server processes, e.g. 1 or 1,2")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the contenders this many times, alternating"
    )
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy record the server (collapsed stacks in DIR)"
    )
    parser.add_argument("--profile-gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument(
        "--threads", action="store_true", help="CPU per server thread (needs py-spy to name them)"
    )
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load, args.seconds, args.clients, args.batch)))
        return
    if args.quick:
        args.seconds = 4.0
    chosen = args.only.split(",") if args.only else list(CONTENDERS)
    unknown = [c for c in chosen if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender {unknown[0]!r} (known: {', '.join(CONTENDERS)})")
    workers_list = [int(w) for w in args.workers.split(",")]
    complete = set(chosen) == set(CONTENDERS) and set(workers_list) == {1, 2}
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory(prefix="waypost-bench-collector-") as tmp:
        for round_ in range(args.rounds):
            for workers in workers_list:
                for kind, ack in (CONTENDERS[c] for c in chosen):
                    print(f"{kind} {ack} x{workers} ...", file=sys.stderr, flush=True)
                    root = Path(tmp) / f"round{round_}"
                    root.mkdir(exist_ok=True)
                    result = contender(kind, workers, args, root, ack)
                    result["round"] = round_ + 1
                    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
                    results.append(result)
    cpus = os.cpu_count() or 1
    conditions = {
        "cpus": cpus,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seconds_per_run": args.seconds,
        "clients": args.clients,
        "batch": args.batch,
        "rounds": args.rounds,
        "note": "server workers and the load process share the machine's cores",
    }
    report = {"results": results, "summary": summarise(results, cpus), "conditions": conditions}
    text = _markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if complete and not args.quick:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "collector.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out / "collector.md").write_text(text, encoding="utf-8")


def _markdown(report: dict[str, Any]) -> str:
    c = report["conditions"]
    rounds = f", {c['rounds']} rounds alternating" if c.get("rounds", 1) > 1 else ""
    lines = [
        "# The collector under load",
        "",
        f"{c['clients']} concurrent clients, batches of {c['batch']} events, "
        f"{c['seconds_per_run']:g} s per run{rounds}; {c['cpus']} cores shared by the server "
        "and the load process (load average before: "
        f"{', '.join(map(str, c['load_average_before']))}; after: "
        f"{', '.join(map(str, c.get('load_average_after', [])))}); Python {c['python']}.",
        "",
        "Contender | accepted events/s | ack p50 ms | ack p99 ms | server CPU ms / 1,000 events "
        "(with storage) | cores: server / load / machine busy | storage caught up after | "
        "errors | all stored",
        "----|----|----|----|----|----|----|----|----",
    ]
    for r in report["results"]:
        cpu = f"{r['server_cpu_ms_per_1000_events']}"
        if "server_cpu_ms_per_1000_events_with_storage" in r:
            cpu += f" ({r['server_cpu_ms_per_1000_events_with_storage']})"
        drain = f"{r['storage_drain_seconds']} s" if "storage_drain_seconds" in r else "-"
        cores = f"{r['server_cores']} / {r['load_cores']} / {r['machine_busy_cores']}"
        name = r["name"] + (f" #{r['round']}" if c.get("rounds", 1) > 1 else "")
        lines.append(
            f"{name} | {r['events_per_second']:,.0f} | {r['ack_p50_ms']} | "
            f"{r['ack_p99_ms']} | {cpu} | {cores} | {drain} | {sum(r['errors'].values())} | "
            f"{'yes' if r['stored_at_least_accepted'] else 'NO'}"
        )
    for r in report["results"]:
        if r.get("thread_cpu_ms_per_1000_events"):
            per = sorted(r["thread_cpu_ms_per_1000_events"].items(), key=lambda kv: -kv[1])
            lines.append("")
            lines.append(
                f"CPU ms per 1,000 events by thread, {r['name']}: "
                + ", ".join(f"{name} {ms}" for name, ms in per if ms >= 0.1)
            )
    s = report["summary"]
    lines.append("")
    for key in ("spool", "storage", "baseline"):
        r = s.get(key)
        if not r:
            continue
        label = f"ack: {key}" if key != "baseline" else "the baseline itself"
        parts = []
        if "collector_vs_baseline" in r:
            parts.append(
                f"collector / baseline (one process) **{r['collector_vs_baseline']:.2f}** "
                "(goal 0.7)"
            )
        if "two_vs_one" in r:
            two = f"two processes / one **{r['two_vs_one']:.2f}**"
            if key != "baseline":
                two += " (goal 1.6)"
            if "two_vs_one_ceiling" in r:
                one_cores, two_cores = r["server_cores_one_two"]
                two += (
                    f", with {one_cores} and {two_cores} server cores; one process left "
                    f"{r['idle_cores_with_one']} of {c['cpus']} cores idle, so two could reach "
                    f"at most {r['two_vs_one_ceiling']:.2f} here"
                )
                if r["two_vs_one_ceiling"] < 1.6 and key != "baseline":
                    two += " (this machine cannot show 1.6)"
                two += f"; events per server core, two / one: {r['per_core_two_vs_one']:.2f}"
            parts.append(two)
        lines.append(f"- {label}: " + "; ".join(parts) + ".")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
