"""Fault injection for the storage and budget tests: real filesystems, real files, real
processes (no mocks of waypost's own code).

Scenarios that need a tiny or read-only filesystem run in a child process with its own mount
namespace (``unshare``), so a mount never outlives the scenario, even when a test is killed. As
root that is ``unshare --mount``; otherwise ``unshare --map-root-user --mount`` (an
unprivileged user namespace). :func:`mount_namespace` says which works here, or why neither.

A scenario script imports this module (``tests/support`` is on ``sys.path``) and reports its
figures with :func:`report`; :func:`run_scenario` returns them to the test.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUPPORT = Path(__file__).resolve().parent
MARK = "FIGURES "


# --- mount namespaces ------------------------------------------------------------------------


@functools.cache
def mount_namespace() -> tuple[list[str] | None, str]:
    """(command prefix that runs a child in its own mount namespace, or None; why not)."""
    unshare = shutil.which("unshare")
    mount = shutil.which("mount")
    if unshare is None or mount is None:
        return None, "util-linux's unshare and mount are not installed"
    candidates = [[unshare, "--mount", "--propagation", "private"]]
    candidates.append([unshare, "--map-root-user", "--mount", "--propagation", "private"])
    if os.geteuid() != 0:
        candidates.reverse()
    errors = []
    with tempfile.TemporaryDirectory() as probe:
        for prefix in candidates:
            try:
                done = subprocess.run(
                    [*prefix, mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{' '.join(prefix[1:])}: {exc}")
                continue
            if done.returncode == 0:
                return prefix, ""
            errors.append(f"{' '.join(prefix[1:])}: {done.stderr.strip()}")
    return None, "cannot mount a tmpfs in a private mount namespace (" + "; ".join(errors) + ")"


def require_mount_namespace() -> list[str]:
    """The prefix, or skip (fail under ``WAYPOST_REQUIRE_SERVERS=1``) naming the cause."""
    import pytest

    prefix, reason = mount_namespace()
    if prefix is None:
        if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason} (WAYPOST_REQUIRE_SERVERS=1 forbids skipping)")
        pytest.skip(reason)
    return prefix


def mount_tmpfs(path: Path | str, size: str) -> None:
    """Mount a tmpfs of ``size`` (``1m``, ``256k``) on ``path`` (inside the scenario only)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True)  # fmt: skip


def remount(path: Path | str, *, size: str | None = None, read_only: bool | None = None) -> None:
    """Grow or shrink a tmpfs, or make it read-only or writable again, under a running process."""
    options = ["remount"]
    if size is not None:
        options.append(f"size={size}")
    if read_only is not None:
        options.append("ro" if read_only else "rw")
    subprocess.run(["mount", "-o", ",".join(options), str(path)], check=True)


def bind_read_only(path: Path | str) -> None:
    """Make the directory ``path`` read-only in place (a read-only bind mount over itself)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)


# --- scenarios -------------------------------------------------------------------------------


def report(**figures: Any) -> None:
    """Hand figures to the test (one line on stdout)."""
    print(MARK + json.dumps(figures, default=str), flush=True)


def script(body: str) -> str:
    """A scenario: this module and the ``urltest`` sink importable, then ``body``."""
    head = (
        f"import logging, sys; sys.path.insert(0, {str(SUPPORT)!r})\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from faultkit import *\n"
    )
    return head + textwrap.dedent(body)


def run_scenario(
    body: str,
    env: Mapping[str, str],
    *,
    namespace: list[str] | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run a scenario in a fresh interpreter (in its own mount namespace if ``namespace``)
    and return the figures it reported, merged; a failed run raises with its stderr."""
    command = [*(namespace or []), sys.executable, "-c", script(body)]
    done = subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=timeout)
    figures: dict[str, Any] = {"returncode": done.returncode, "stderr": done.stderr[-4000:]}
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            figures.update(json.loads(line[len(MARK) :]))
    if done.returncode != 0 and "error" not in figures:
        raise AssertionError(f"scenario failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return figures


# --- inside a scenario -------------------------------------------------------------------------


def make(url: str, data_dir: Path | str, *, strict: bool = False, sink: Mapping[str, Any] | None
         = None, **section: Any) -> Any:  # fmt: skip
    """A production-mode Telemetry sending to ``url`` through the ``urltest`` sink."""
    from urlsink import UrlSink

    import waypost

    telemetry: dict[str, Any] = {
        "notice": {"enabled": False},
        "batch": {"interval": 0.05},
        "retry": {"initial": 0.05, "maximum": 0.5},
        "sinks": {"dest": {"type": "urltest", "url": url, **(sink or {})}},
    }
    for key, value in section.items():
        telemetry[key] = {**telemetry.get(key, {}), **value} if isinstance(value, dict) else value
    env = {
        k: v for k, v in os.environ.items() if k != "DO_NOT_TRACK" and not k.startswith("WAYPOST_")
    }
    return waypost.Telemetry(
        app="faults",
        version="1",
        data_dir=data_dir,
        sink_classes=[UrlSink],
        strict=strict,
        env=env,
        config={"telemetry": telemetry},
    )


def full_disk(
    root: Path | str, url: str, *, pad: int, mount: bool = True, **section: Any
) -> tuple[Any, Path]:
    """A Telemetry for ``url`` (see :func:`make`) whose data dir is ``root``/d on a 1 MiB tmpfs
    (mounted at ``root`` here unless ``mount`` is False), with 10,000 events of ``pad`` bytes
    each tracked: more than the disk holds. The Telemetry and its data dir."""
    root = Path(root)
    if mount:
        mount_tmpfs(root, "1m")
    data = root / "d"
    tel = make(url, data, **section)
    for i in range(10_000):
        tel.track("full", {"i": i, "pad": "x" * pad})
    return tel, data


def pending_rows(data_dir: Path | str) -> int | None:
    """Pending rows in the outbox file, read straight from SQLite (None if unreadable)."""
    path = Path(data_dir) / "outbox.sqlite3"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute(
                "SELECT COUNT(DISTINCT event_id) FROM outbox WHERE state = 'pending'"
            ).fetchone()
        return int(row[0])
    except sqlite3.Error:
        return None


NEXT = """
import json, sys, time
sys.path.insert(0, {support!r})
from faultkit import make, report
tel = make({url!r}, {data!r})
started = time.monotonic()
ok = tel.flush(timeout={timeout!r})
st = tel.status()
report(next_flush=ok, next_pending=st.outbox_pending_events,
       next_seconds=time.monotonic() - started, next_dropped=st.counters.dropped)
tel.shutdown(5)
"""


def next_process(data_dir: Path | str, url: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """Start a new process on ``data_dir`` that flushes to ``url``; its figures."""
    code = NEXT.format(support=str(SUPPORT), url=url, data=str(data_dir), timeout=timeout)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout + 60
    )
    figures: dict[str, Any] = {"next_returncode": done.returncode}
    if done.returncode:
        figures["next_stderr"] = done.stderr[-2000:]
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            figures.update(json.loads(line[len(MARK) :]))
    return figures


def cli(data_dir: Path | str, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``waypost --app faults --data-dir DIR ARGS`` (the console script of this venv)."""
    exe = Path(sys.executable).with_name("waypost")
    done = subprocess.run(
        [str(exe), "--app", "faults", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr


def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def show(figures: Mapping[str, Any]) -> str:
    """Figures as one line of JSON for an assertion message (pytest would cut a dict short)."""
    return json.dumps({k: v for k, v in figures.items() if k != "stderr"}, default=str)
