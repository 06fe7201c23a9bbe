"""waypost against the vendor SDKs, side by side, in one run.

    python bench/run.py            # the full run (about 5 minutes on 2 cores)
    python bench/run.py --quick    # fewer events, one latency profile (about a minute)
    uv run nox -s bench            # the full run in a fresh environment

One sink server process (``sink_server.py``) answers every contender as its vendor would; each
contender runs in its own fresh process (``contenders.py``), one after the other. Results go to
``bench/results/latest.json`` (``quick.json`` with ``--quick``) and, for a full run, to the
results section of ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SDKS = ["posthog", "segment", "amplitude", "mixpanel"]
WAYPOSTS = ["waypost-http", "waypost-posthog"]
PACKAGES = [
    "waypost",
    "waypost-http",
    "waypost-posthog",
    "posthog",
    "segment-analytics-python",
    "amplitude-analytics",
    "mixpanel",
    "httpx",
    "requests",
    "pydantic",
]
PROFILES = {"loopback": 0.0, "remote-50ms": 50.0}
"""Latency profiles: the server answers at once (a healthy local server), or after 50 ms (a
vendor's cloud some way off: where SDK queues overflow and blocking calls show)."""
TARGETS_TEXT = {
    "track_median": "tracking call (median) <= 1/10 of the fastest SDK's",
    "off_path": "off path (DO_NOT_TRACK=1) < 0.3 us a call",
    "end_to_end": "every event delivered, end to end <= 1/3 of the fastest SDK's",
    "burst_1m": "1,000,000-event burst: nothing lost, peak RSS < 150 MiB",
    "import": "import waypost < 100 ms",
}


def child_env() -> dict[str, str]:
    """The contenders' environment: bytecode caches on (as installed software has them), no
    opt-out or waypost settings leaking in from the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    for name in ("PYTHONDONTWRITEBYTECODE", "DO_NOT_TRACK", "POSTHOG_CAPTURE_MODE"):
        env.pop(name, None)
    return env


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = float("nan")
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
    }


class SinkServer:
    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "sink_server.py")],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "port":
            self.proc.kill()
            raise SystemExit(f"the sink server did not start: {line}")
        self.port = int(line[1])

    def post(self, path: str) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=b"", method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_contender(
    name: str,
    *,
    server: SinkServer | None,
    events: int,
    bound: float,
    env: dict[str, str],
    label: str | None = None,
    logs: Path,
) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "contenders.py"), name, "--events", str(events)]
    command += ["--bound", str(bound)]
    if server is not None:
        command += ["--port", str(server.port), "--label", label or name]
    log_path = logs / f"{label or name}.stderr"
    with log_path.open("w") as log:
        try:
            done = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                timeout=bound + 90,
            )
        except subprocess.TimeoutExpired:
            return {"name": name, "error": f"did not finish within {bound + 90:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace")[-800:]
        return {"name": name, "error": f"exit {done.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    stderr_lines = log_path.read_text(errors="replace").count("\n")
    result["stderr_lines"] = stderr_lines
    return result


def import_times(env: dict[str, str], repeats: int) -> dict[str, Any]:
    """``import waypost`` in a fresh interpreter, and import plus construction."""
    py = sys.executable

    def wall(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([py, "-c", code], env=env, check=True)
        return time.perf_counter() - start

    wall("import waypost")  # bytecode written once
    bare, imported = [], []
    for _ in range(repeats):
        bare.append(wall("pass"))
        imported.append(wall("import waypost"))
    done = subprocess.run(
        [py, "-X", "importtime", "-c", "import waypost"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    cumulative = None
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*waypost$", line)
        if match:
            cumulative = int(match.group(1))
    construct_code = (
        "import sys, tempfile, time\n"
        "t = time.perf_counter()\n"
        "import waypost\n"
        "t1 = time.perf_counter()\n"
        "tel = waypost.Telemetry(app='bench', config={'telemetry': {'sinks': {'bench': "
        "{'type': 'http', 'url': 'http://127.0.0.1:9/ingest'}}, 'notice': {'enabled': False}}},"
        " data_dir=tempfile.mkdtemp())\n"
        "t2 = time.perf_counter()\n"
        "print((t1 - t) * 1000, (t2 - t) * 1000)\n"
        "tel.shutdown(timeout=0)\n"
    )
    construct = []
    for _ in range(max(3, repeats // 3)):
        out = subprocess.run(
            [py, "-c", construct_code], env=env, capture_output=True, text=True, check=True
        )
        construct.append([float(x) for x in out.stdout.split()])
    return {
        "python_pass_ms": round(statistics.median(bare) * 1000, 1),
        "python_import_waypost_ms": round(statistics.median(imported) * 1000, 1),
        "import_waypost_ms": round(
            (statistics.median(imported) - statistics.median(bare)) * 1000, 1
        ),
        "importtime_cumulative_ms": round(cumulative / 1000, 2) if cumulative else None,
        "in_process_import_ms": round(statistics.median(c[0] for c in construct), 1),
        "import_and_construct_ms": round(statistics.median(c[1] for c in construct), 1),
        "repeats": repeats,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


def summarise(profile: list[dict[str, Any]]) -> dict[str, Any]:
    """waypost's ratios to each SDK, and the two per-profile targets."""
    by_name = {r["name"]: r for r in profile}
    sdks = [by_name[n] for n in SDKS if n in by_name and "error" not in by_name[n]]
    out: dict[str, Any] = {"ratios": {}, "targets": {}}
    for w in WAYPOSTS:
        mine = by_name.get(w)
        if mine is None or "error" in mine:
            continue
        out["ratios"][w] = {
            sdk["name"]: {
                "track_median": ratio(mine["track_median_us"], sdk["track_median_us"]),
                "track_p99": ratio(mine["track_p99_us"], sdk["track_p99_us"]),
                "end_to_end": ratio(mine["end_to_end_s"], sdk["end_to_end_s"]),
                "peak_rss": ratio(mine["peak_rss_mib"], sdk["peak_rss_mib"]),
            }
            for sdk in sdks
        }
    if not sdks:
        return out
    fastest_track = min(sdks, key=lambda r: r["track_median_us"])
    complete = [r for r in sdks if r["lost"] == 0 and r["end_to_end_s"] is not None]
    fastest_e2e = min(complete, key=lambda r: r["end_to_end_s"]) if complete else None
    for w in WAYPOSTS:
        mine = by_name.get(w)
        if mine is None or "error" in mine:
            continue
        limit = fastest_track["track_median_us"] / 10
        out["targets"][w] = {
            "track_median": {
                "value_us": mine["track_median_us"],
                "limit_us": round(limit, 3),
                "fastest_sdk": fastest_track["name"],
                "met": mine["track_median_us"] <= limit,
            }
        }
        if fastest_e2e is not None:
            e2e_limit = fastest_e2e["end_to_end_s"] / 3
            out["targets"][w]["end_to_end"] = {
                "value_s": mine["end_to_end_s"],
                "limit_s": round(e2e_limit, 3),
                "fastest_sdk": fastest_e2e["name"],
                "met": mine["lost"] == 0
                and mine["end_to_end_s"] is not None
                and mine["end_to_end_s"] <= e2e_limit,
            }
    return out


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    lines = [
        f"Command: `{results['command']}` ({results['started']}, {results['duration_s']:.0f} s).",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, "
        f"{m['python']}.",
        f"Packages: {pk}.",
        "",
    ]
    for profile, data in results["profiles"].items():
        lines += [
            f"**{results['events']:,} events, five properties each; server profile "
            f"`{profile}` ({data['latency_ms']:g} ms per answer)**",
            "",
            "| contender | track median µs | track p99 µs | track mean µs | end to end s "
            "| lost | peak RSS MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in data["contenders"]:
            if "error" in r:
                lines.append(f"| {r['name']} | error: {r['error'][:80]} | | | | | |")
                continue
            e2e = (
                fmt(r["end_to_end_s"])
                if r["end_to_end_s"] is not None
                else (f"— (last at {fmt(r['last_arrival_s'])})")
            )
            lines.append(
                f"| {r['name']} | {fmt(r['track_median_us'])} | {fmt(r['track_p99_us'], 1)} "
                f"| {fmt(r['track_mean_us'], 1)} | {e2e} | {fmt(r['lost'])} "
                f"| {fmt(r['peak_rss_mib'], 1)} |"
            )
        lines.append("")
        for w, ratios in data["summary"]["ratios"].items():
            parts = [
                f"{sdk} {fmt(v['track_median'], 3)}x / "
                + (f"{fmt(v['end_to_end'], 2)}x" if v["end_to_end"] is not None else "— (lost)")
                for sdk, v in ratios.items()
            ]
            lines.append(f"- {w} to each SDK (track median / end to end): " + "; ".join(parts))
        lines.append("")
    off = results["off_path"]
    imp = results["import"]
    big = results["burst_1m"]
    lines += [
        f"- Off path (DO_NOT_TRACK=1): {fmt(off.get('track_us'), 3)} µs a call "
        f"(an empty method call: {fmt(off.get('empty_method_us'), 3)} µs).",
        f"- `import waypost`: {fmt(imp['import_waypost_ms'], 1)} ms (fresh interpreter, median "
        f"of {imp['repeats']}, minus `python -c pass`; -X importtime: "
        f"{fmt(imp['importtime_cumulative_ms'])} ms); import plus "
        f"`waypost.Telemetry(...)` with an http sink: {fmt(imp['import_and_construct_ms'], 1)} ms.",
        f"- Burst of {big.get('events', 0):,} events (waypost-http, loopback): lost "
        f"{fmt(big.get('lost'))}, peak RSS {fmt(big.get('peak_rss_mib'), 1)} MiB, track mean "
        f"{fmt(big.get('track_mean_us'), 1)} µs, end to end {fmt(big.get('end_to_end_s'), 1)} s.",
        "",
        "| target | waypost-http | waypost-posthog |",
        "| --- | --- | --- |",
    ]
    for key, text in TARGETS_TEXT.items():
        row = [text]
        for w in WAYPOSTS:
            row.append(results["targets"].get(key, {}).get(w, "—"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def target_cells(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """One readable verdict per target and waypost contender, over every profile."""
    cells: dict[str, dict[str, str]] = {k: {} for k in TARGETS_TEXT}
    for w in WAYPOSTS:
        for key in ("track_median", "end_to_end"):
            parts = []
            for profile, data in results["profiles"].items():
                t = data["summary"]["targets"].get(w, {}).get(key)
                if t is None:
                    continue
                unit = "us" if key == "track_median" else "s"
                value = t[f"value_{unit}"]
                parts.append(
                    f"{profile}: {'met' if t['met'] else 'NOT met'} ({fmt(value, 3)} vs "
                    f"{fmt(t[f'limit_{unit}'], 3)} {'µs' if unit == 'us' else 's'}, "
                    f"{t['fastest_sdk']})"
                )
            cells[key][w] = "; ".join(parts) or "—"
    off = results["off_path"].get("track_us")
    cells["off_path"] = {
        w: f"{'met' if off is not None and off < 0.3 else 'NOT met'} ({fmt(off, 3)} µs)"
        for w in WAYPOSTS
    }
    big = results["burst_1m"]
    ok = big.get("lost") == 0 and (big.get("peak_rss_mib") or 1e9) < 150
    cells["burst_1m"] = {
        "waypost-http": f"{'met' if ok else 'NOT met'} (lost {fmt(big.get('lost'))}, "
        f"{fmt(big.get('peak_rss_mib'), 1)} MiB)",
        "waypost-posthog": "(run with the http sink)",
    }
    imp = results["import"]["import_waypost_ms"]
    cells["import"] = {
        w: f"{'met' if imp < 100 else 'NOT met'} ({fmt(imp, 1)} ms)" for w in WAYPOSTS
    }
    return cells


def update_readme(text: str) -> None:
    readme = HERE / "README.md"
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    body = readme.read_text(encoding="utf-8")
    if start not in body or end not in body:
        return
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events, loopback only")
    parser.add_argument("--events", type=int, help="events per burst (20,000; quick: 2,000)")
    parser.add_argument("--big", type=int, help="events in the big burst (1,000,000)")
    parser.add_argument("--bound", type=float, default=120.0, help="seconds per contender")
    parser.add_argument("--only", help="comma-separated contenders to run")
    parser.add_argument("--out", type=Path, help="results file")
    args = parser.parse_args()
    quick = args.quick
    events = args.events or (2_000 if quick else 20_000)
    big_events = args.big or (50_000 if quick else 1_000_000)
    profiles = {"loopback": 0.0} if quick else PROFILES
    only = set(args.only.split(",")) if args.only else None
    out = args.out or HERE / "results" / ("quick.json" if quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="waypost-bench-logs-"))
    env = child_env()
    started = time.time()

    # Bytecode written once, so that no contender pays for compiling its imports.
    warm = (
        "import tempfile, waypost, waypost_http, waypost_posthog, posthog, httpx, requests\n"
        "import segment.analytics, amplitude, mixpanel\n"
        "t = waypost.Telemetry(app='warm', config={'telemetry': {'sinks': {'b': {'type': "
        "'http', 'url': 'http://127.0.0.1:9/x'}}, 'notice': {'enabled': False}}}, "
        "data_dir=tempfile.mkdtemp())\nt.shutdown(timeout=0)\n"
    )
    subprocess.run([sys.executable, "-c", warm], env=env, check=True, capture_output=True)

    results: dict[str, Any] = {
        "command": "python bench/run.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "events": events,
        "properties_per_event": 5,
        "bound_s": args.bound,
        "profiles": {},
    }
    server = SinkServer(env)
    try:
        for profile, latency in profiles.items():
            rows = []
            for name in [*WAYPOSTS, *SDKS]:
                if only and name not in only:
                    continue
                label = f"{profile}-{name}"
                server.post(f"/_latency/{label}?ms={latency}")
                print(f"[{profile}] {name}: {events:,} events ...", file=sys.stderr, flush=True)
                row = run_contender(
                    name,
                    server=server,
                    events=events,
                    bound=args.bound,
                    env=env,
                    label=label,
                    logs=logs,
                )
                server.post(f"/_forget/{label}")
                rows.append(row)
                print("   ", _short(row), file=sys.stderr, flush=True)
            results["profiles"][profile] = {
                "latency_ms": latency,
                "contenders": rows,
                "summary": summarise(rows),
            }
        print("off path (DO_NOT_TRACK=1) ...", file=sys.stderr, flush=True)
        results["off_path"] = run_contender(
            "waypost-off",
            server=None,
            events=200_000 if quick else 1_000_000,
            bound=args.bound,
            env=env,
            logs=logs,
        )
        print("import times ...", file=sys.stderr, flush=True)
        results["import"] = import_times(env, 5 if quick else 15)
        print(f"big burst: {big_events:,} events ...", file=sys.stderr, flush=True)
        big = run_contender(
            "waypost-1m",
            server=server,
            events=big_events,
            bound=max(args.bound, 300),
            env=env,
            label="big",
            logs=logs,
        )
        server.post("/_forget/big")
        results["burst_1m"] = big
        print("   ", _short(big), file=sys.stderr, flush=True)
    finally:
        server.stop()
    results["duration_s"] = round(time.time() - started, 1)
    cells = target_cells(results)
    results["targets"] = cells
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = markdown(results)
    (out.with_suffix(".md")).write_text(text, encoding="utf-8")
    if not quick and not only and args.out is None:
        update_readme(text)
    print(text)
    print(f"results: {out}  (contenders' stderr: {logs})", file=sys.stderr)


def _short(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {row['error'][:200]}"
    keys = ("track_median_us", "track_p99_us", "end_to_end_s", "lost", "peak_rss_mib")
    return ", ".join(f"{k}={row.get(k)}" for k in keys)


if __name__ == "__main__":
    main()
