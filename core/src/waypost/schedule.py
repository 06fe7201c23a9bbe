"""Periodic jobs on the telemetry pipeline: FlowForge's ping (30 s after start if initialised,
then daily at a time picked at random when the platform starts), Firefly III's weekly report.

Exactly one run per period per installation, even when several processes (gunicorn workers)
share the data dir: each run takes a file lock and reads the last run's time from
``schedule.json`` in the data dir, so a restart does not run a job again before its period has
passed. Tests drive a :class:`ManualClock` instead of sleeping through real periods.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waypost.datadir import atomic_write
from waypost.logs import get_logger
from waypost.privacy.secrets import sanitise

log = get_logger(__name__)

DAY = 86400.0
STATE_FILE = "schedule.json"
LOCK_FILE = "schedule.lock"


class Clock:
    """Wall-clock time and waiting; tests substitute :class:`ManualClock`."""

    def time(self) -> float:
        return time.time()

    def wait(self, wake: threading.Event, seconds: float) -> None:
        """Wait up to ``seconds`` of this clock, or until ``wake`` is set."""
        wake.wait(max(0.0, seconds))


class ManualClock(Clock):
    """A clock that moves only when told to: ``clock.advance(3600)``."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._cond = threading.Condition()

    def time(self) -> float:
        with self._cond:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._cond:
            self._now += seconds
            self._cond.notify_all()

    def wait(self, wake: threading.Event, seconds: float) -> None:
        with self._cond:
            deadline = self._now + seconds
            while self._now < deadline and not wake.is_set():
                self._cond.wait(0.02)


_HELD: set[int] = set()
"""Descriptors of the file locks this process holds now."""


def _close_held_locks() -> None:
    # A child shares the parent's flock through the inherited descriptor: it would keep the lock
    # held (for every other process too) for as long as it lives. Its copy goes.
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process using ``path`` (released if a holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    _HELD.add(fd)
    try:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd in _HELD:  # else a fork made this process a child, which closed it already
            _HELD.discard(fd)
            os.close(fd)  # closing releases the lock


def parse_time_of_day(value: str | float | None, rng: random.Random) -> float | None:
    """Seconds after midnight (UTC): ``"random"`` picks one now, ``"HH:MM"`` is fixed."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) % DAY
    if value == "random":
        return rng.uniform(0, DAY)
    hours, _, minutes = value.partition(":")
    return (int(hours) * 3600 + int(minutes or 0) * 60) % DAY


def next_run(after: float, every: float, time_of_day: float | None) -> float:
    """When a job that last ran at ``after`` runs next.

    With a time of day, the first such time at least ``every - 1 day`` after the last run (so a
    daily job runs once a day at that time, a weekly one a week later at that time).
    """
    if time_of_day is None:
        return after + every
    base = after + max(0.0, every - DAY)
    midnight = base - base % DAY
    candidate = midnight + time_of_day
    while candidate <= base or candidate <= after:
        candidate += DAY
    return candidate


@dataclass
class Job:
    """A periodic job; ``callback`` returns the payload to track, or None to skip this run."""

    name: str
    callback: Callable[[], Any]
    every: float
    first_delay: float = 0.0
    jitter: float = 0.0
    time_of_day: float | None = None
    condition: Callable[[], bool] | None = None
    event: str | None = None
    next_at: float = 0.0
    last_run: float | None = None
    runs: int = 0
    skipped: int = 0
    last_error: str | None = None
    last_outcome: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "every": self.every,
            "first_delay": self.first_delay,
            "time_of_day": self.time_of_day,
            "next_at": self.next_at,
            "runs": self.runs,
            "skipped": self.skipped,
            "last_outcome": self.last_outcome,
            "last_error": self.last_error,
        }


class Scheduler:
    """Runs jobs on one thread; each run is guarded by the data dir's lock and record."""

    def __init__(
        self,
        *,
        data_dir: Path,
        emit: Callable[[Job, Any], bool],
        clock: Clock | None = None,
        seed: int | None = None,
        active: Callable[[], bool] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.emit = emit
        self.active = active
        """Asked before each run: while it says no (telemetry is off), a job is skipped before
        anything is touched: no lock file, no record, no callback."""
        self.clock = clock or Clock()
        self.rng = random.Random(seed)
        self.jobs: dict[str, Job] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- set-up -----------------------------------------------------------------------------

    def add(self, job: Job) -> Job:
        now = self.clock.time()
        job.next_at = now + job.first_delay + (self.rng.uniform(0, job.jitter) if job.jitter else 0)
        with self._lock:
            self.jobs[job.name] = job
        self._wake.set()
        self._ensure_thread()
        return job

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopped = False
            self._thread = threading.Thread(
                target=self._loop, name="waypost-scheduler", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def after_fork(self) -> None:
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if self.jobs:
            self._ensure_thread()

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                jobs = list(self.jobs.values())
            if not jobs:
                return
            now = self.clock.time()
            due = [j for j in jobs if j.next_at <= now]
            for job in due:
                self.run(job)
                # Next time counts from this installation's last run (perhaps by another
                # process, or before a restart), not from this attempt.
                # Both against the time this pass began: a clock that moves on meanwhile
                # makes the job due again, rather than skipping the period it moved into.
                after = job.last_run if job.last_run is not None else now
                job.next_at = next_run(after, job.every, job.time_of_day)
                if job.next_at <= now:
                    job.next_at = next_run(now, job.every, job.time_of_day)
                if job.jitter:
                    job.next_at += self.rng.uniform(0, job.jitter)
            if due:
                continue
            wait = min(j.next_at for j in jobs) - now
            self.clock.wait(self._wake, min(wait, 60.0))
            self._wake.clear()

    def run(self, job: Job, *, force: bool = False) -> bool:
        """Run ``job`` now if its period has passed for this installation; True if it sent."""
        if self.active is not None and not self.active():
            return self._outcome(job, "skipped: telemetry is off", skipped=True)
        try:
            with file_lock(self.data_dir / LOCK_FILE):
                state = self._read()
                now = self.clock.time()
                last = state.get(job.name, {}).get("last")
                job.last_run = None if last is None else float(last)
                slack = min(60.0, job.every * 0.01)
                if not force and last is not None and now - float(last) < job.every - slack:
                    return self._outcome(job, "skipped: ran already this period", skipped=True)
                if job.condition is not None and not job.condition():
                    return self._outcome(job, "skipped: condition not met", skipped=True)
                payload = job.callback()
                if payload is None:
                    return self._outcome(job, "skipped: nothing to send", skipped=True)
                if not self.emit(job, payload):
                    return self._outcome(job, "skipped: telemetry is off", skipped=True)
                entry = state.setdefault(job.name, {})
                entry["last"] = now
                entry["count"] = int(entry.get("count", 0)) + 1
                entry["pid"] = os.getpid()
                self._write(state)
                job.last_run = now
        except Exception as exc:
            job.last_error = sanitise(f"{type(exc).__name__}: {exc}")
            log.warning("waypost: scheduled job %r failed: %s", job.name, job.last_error)
            return self._outcome(job, "error", skipped=True)
        job.runs += 1
        return self._outcome(job, "sent")

    @staticmethod
    def _outcome(job: Job, outcome: str, *, skipped: bool = False) -> bool:
        job.last_outcome = outcome
        if skipped:
            job.skipped += 1
        return not skipped

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads((self.data_dir / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, state: dict[str, Any]) -> None:
        atomic_write(self.data_dir / STATE_FILE, json.dumps(state))
