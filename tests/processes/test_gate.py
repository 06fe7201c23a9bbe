"""The fork gate and the lease identity, in this process."""

from __future__ import annotations

import os
import threading
import time

import pytest

from waypost import processes


def test_a_process_is_named_by_pid_start_time_and_boot() -> None:
    pid, started, _boot = processes.owner().split("@")
    assert int(pid) == os.getpid()
    if os.path.exists("/proc/self/stat"):
        assert started == processes.start_time(os.getpid()) and started.isdigit()
    assert processes.owner_alive(processes.owner(), os.getpid())


def test_a_dead_process_and_a_reused_pid_are_not_alive() -> None:
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc: leases fall back to the PID alone")
    me = processes.owner()
    pid, started, boot = me.split("@")
    assert not processes.owner_alive(f"{pid}@{int(started) - 1}@{boot}", os.getpid())
    parent = os.getppid()
    assert processes.owner_alive(f"{parent}@{processes.start_time(parent)}@{boot}", parent)
    assert not processes.owner_alive(f"{parent}@1@{boot}", parent)  # same pid, other start
    assert not processes.owner_alive(f"{parent}@{processes.start_time(parent)}@other", parent)
    assert not processes.owner_alive("", os.getpid())  # an old lease with our pid: not us


def hold_section(what: str) -> tuple[threading.Thread, threading.Event]:
    """A daemon thread inside a gate section named ``what`` until the event is set; returned
    (the thread, the event) once it is inside."""
    inside, leave = threading.Event(), threading.Event()

    def stuck() -> None:
        with processes.GATE.section(what):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()
    inside.wait(5)
    return thread, leave


def test_a_fork_waits_for_a_section_to_end() -> None:
    inside, leave = threading.Event(), threading.Event()
    ended: list[float] = []

    def writer() -> None:
        with processes.GATE.section("a test write"):
            inside.set()
            leave.wait(5)
            ended.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    inside.wait(5)
    threading.Timer(0.2, leave.set).start()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    forked = time.monotonic()
    os.waitpid(pid, 0)
    thread.join()
    assert ended and forked >= ended[0]


def test_a_fork_waits_for_a_section_at_most_fork_wait() -> None:
    thread, leave = hold_section("a stuck write")
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if processes.GATE.busy_at_fork == ["a stuck write"] else 3)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    leave.set()
    thread.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert processes.FORK_WAIT <= waited < processes.FORK_WAIT + 5  # bounded, not stuck


class _SlowFork:
    """Another part of the host whose own fork hook takes a while (after waypost's gate)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _before_fork(self) -> None:
        time.sleep(self.seconds)

    def _after_fork_in_parent(self) -> None:
        pass

    def _after_fork_in_child(self) -> None:
        pass


def test_a_thread_held_back_by_a_fork_enters_only_once_it_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork that waited its FORK_WAIT for a stuck section and then takes longer still: a
    thread that arrived meanwhile is let in only after the fork, never inside SQLite at it."""
    monkeypatch.setattr(processes, "FORK_WAIT", 0.3)
    entered: list[float] = []

    def arriving() -> None:
        deadline = time.monotonic() + 10
        while not processes.GATE._forking and time.monotonic() < deadline:
            time.sleep(0.001)
        with processes.GATE.section("a write that came during the fork"):
            entered.append(time.monotonic())

    slow = _SlowFork(0.9)
    processes.follow_forks(slow)
    _thread, leave = hold_section("a stuck write")
    late = threading.Thread(target=arriving)
    late.start()
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        forked = time.monotonic()
        os.waitpid(pid, 0)
    finally:
        processes.forget_forks(slow)
        leave.set()
    late.join(10)
    assert entered and entered[0] >= forked
