"""The data dir's one way of replacing a file (``atomic_write``) and the instance id."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from waypost.config import env_overrides
from waypost.datadir import atomic_write, ensure_instance_id, read_instance_id


def test_threads_replacing_one_file_never_collide_or_leave_a_part(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    payloads = [str(i) * 100_000 for i in range(10)]  # large: a torn write would show
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def writer(text: str) -> None:
        try:
            for _ in range(20):
                atomic_write(path, text)
        except BaseException as exc:  # a shared temporary name fails here
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(path.read_text())
            except FileNotFoundError:
                pass

    watching = threading.Thread(target=reader)
    watching.start()
    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watching.join()
    assert errors == []
    assert seen <= set(payloads) and path.read_text() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary left


def test_an_explicit_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "secret", "s3cret", mode=0o600)
        atomic_write(tmp_path / "plain", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666  # the umask decides


def test_exclusive_keeps_the_first_writer(tmp_path: Path) -> None:
    path = tmp_path / "key"
    assert atomic_write(path, "first", exclusive=True) is True
    assert atomic_write(path, "second", exclusive=True) is False
    assert path.read_text() == "first"


def test_processes_racing_for_the_instance_id_agree(tmp_path: Path) -> None:
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                ensure_instance_id(tmp_path)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    mine = ensure_instance_id(tmp_path)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    assert read_instance_id(tmp_path) == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance_id"]


def test_waypost_debug_takes_the_one_boolean_parser() -> None:
    assert env_overrides({"WAYPOST_DEBUG": " Yes "})["debug"] is True
    assert env_overrides({"WAYPOST_DEBUG": "off"})["debug"] is False
    assert env_overrides({"WAYPOST_DEBUG": "maybe"})["debug"] is False
