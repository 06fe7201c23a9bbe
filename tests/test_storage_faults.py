"""The outbox against its storage: a full disk, a deleted, replaced or corrupt file, a read-only
data dir, junk in the data dir's files, a lock held by another process.

Faults are real: tmpfs mounts of 1 MiB in a private mount namespace, files deleted and
overwritten under a running process, a second process holding SQLite's write lock. Every test
counts what arrives, what the next process delivers, and whether ``status()`` and the CLI keep
answering. An event that ``flush()`` reported safe must arrive; one that could not be kept must
be counted.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    SUPPORT,
    cli,
    make,
    next_process,
    pending_rows,
    require_mount_namespace,
    run_scenario,
    show,
)

from waypost.testing import RecordingServer, Request, free_port


def ids_of(requests: list[Request]) -> set[str]:
    return {e["id"] for r in requests if r.body for e in r.json()}


def down_url() -> str:
    """A sink URL that refuses connections: the destination is down."""
    return f"http://127.0.0.1:{free_port()}/ingest"


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer() as s:
        yield s


# --- a full disk -------------------------------------------------------------------------------


def test_full_disk_keeps_events_in_memory_and_writes_them_when_space_returns(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer
) -> None:
    namespace = require_mount_namespace()
    figures = run_scenario(
        f"""
        root = {str(tmp_path / "mnt")!r}
        tel, data = full_disk(root, {down_url()!r}, pad=40)
        ok = tel.flush(10)
        st = tel.status()
        code, out, err = cli(data, "status", "--json")
        report(flush=ok, dropped=st.counters.dropped, rows=pending_rows(data),
               storage=st.model_dump(mode="json").get("storage"), cli_status=code,
               cli_traceback="Traceback" in err)
        remount(root, size="64m")
        ok = tel.flush(10)
        report(flush_after_space=ok, rows_after_space=pending_rows(data),
               dropped_after_space=tel.status().counters.dropped)
        tel.shutdown(5)
        report(**next_process(data, {server.url + "/ingest"!r}))
        """,
        clean_env,
        namespace=namespace,
    )
    delivered = len(ids_of(server.requests))
    summary = {k: v for k, v in figures.items() if k != "stderr"} | {"delivered": delivered}
    assert figures["flush"] is False, show(summary)  # not everything could be stored
    assert figures["cli_status"] == 0 and not figures["cli_traceback"], show(summary)
    assert figures["storage"], show(summary)  # status says what is wrong with the outbox
    assert figures["flush_after_space"] is True, show(summary)
    assert figures["rows_after_space"] == 10_000, show(summary)
    assert delivered == 10_000, show(summary)
    assert "disk_full" not in figures["dropped_after_space"], show(summary)


def test_full_disk_past_the_memory_bound_counts_each_event_it_drops(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer
) -> None:
    namespace = require_mount_namespace()
    figures = run_scenario(
        f"""
        root = {str(tmp_path / "mnt")!r}
        tel, data = full_disk(root, {down_url()!r}, pad=40, outbox={{"buffer": 2000}})
        ok = tel.flush(10)
        st = tel.status()
        report(flush=ok, dropped=st.counters.dropped, rows=pending_rows(data))
        remount(root, size="64m")
        report(flush_after_space=tel.flush(10))
        tel.shutdown(5)
        report(**next_process(data, {server.url + "/ingest"!r}))
        """,
        clean_env,
        namespace=namespace,
    )
    delivered = len(ids_of(server.requests))
    summary = {k: v for k, v in figures.items() if k != "stderr"} | {"delivered": delivered}
    dropped = figures["dropped"]
    assert figures["flush"] is False, show(summary)
    assert set(dropped) == {"disk_full"}, summary  # no other reason, none uncounted
    assert delivered + dropped["disk_full"] == 10_000, show(summary)
    assert figures["flush_after_space"] is True, show(summary)
    # The operator is told, once (not once per event or per attempt).
    lines = [line for line in figures["stderr"].splitlines() if "disk is full" in line]
    assert 1 <= len(lines) <= 3, figures["stderr"]


FULL_DISK_FIRST = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
sys.path.insert(0, {support!r})
from faultkit import full_disk, report
tel, data = full_disk({root!r}, {url!r}, pad=200, mount=False)
report(flush=tel.flush(3), shutdown=tel.shutdown(3), dropped=tel.status().counters.dropped)
"""


def test_shutdown_on_a_full_disk_counts_what_memory_held_and_the_next_process_delivers_the_rest(
    tmp_path: Path, waypost_clean_env: dict[str, str], server: RecordingServer
) -> None:
    namespace = require_mount_namespace()
    data = tmp_path / "mnt" / "d"
    first = FULL_DISK_FIRST.format(support=str(SUPPORT), url=down_url(), root=str(data.parent))
    figures = run_scenario(
        f"""
        import json, subprocess, sys
        mount_tmpfs({str(tmp_path / "mnt")!r}, "1m")
        done = subprocess.run([sys.executable, "-c", {first!r}], capture_output=True, text=True,
                              timeout=60)
        for line in done.stdout.splitlines():
            if line.startswith(MARK):
                report(**json.loads(line[len(MARK):]))
        report(first_stderr=done.stderr[-2000:])
        remount({str(tmp_path / "mnt")!r}, size="64m")
        report(**next_process({str(data)!r}, {server.url + "/ingest"!r}))
        """,
        waypost_clean_env,
        namespace=namespace,
    )
    delivered = len(ids_of(server.requests))
    summary = {k: v for k, v in figures.items() if k != "stderr"} | {"delivered": delivered}
    assert figures["flush"] is False and figures["shutdown"] is False, show(summary)
    # What was only in memory when the process ended is counted, and only that: the next
    # process delivers every event not counted as dropped.
    assert set(figures["dropped"]) == {"disk_full"}, show(summary)
    assert delivered > 0 and delivered + figures["dropped"]["disk_full"] == 10_000, show(summary)
    assert "lost at shutdown" in figures["first_stderr"], show(summary)


def test_a_full_disk_is_not_called_writable_again_while_it_has_no_room(
    tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    # A small write (a lease, a retry's new due time) reuses pages the -wal already holds and
    # succeeds on a disk with no byte free: that is no reason to log that the outbox "can be
    # written again", nor to tell status and the CLI that it is fine.
    namespace = require_mount_namespace()
    figures = run_scenario(
        f"""
        import json, os
        root = {str(tmp_path / "mnt")!r}
        tel, data = full_disk(root, {down_url()!r}, pad=200)
        report(flush=tel.flush(3), shutdown=tel.shutdown(3))
        fs = os.statvfs(root)
        code, out, err = cli(data, "status", "--json")
        report(free=fs.f_bavail * fs.f_frsize, after=tel.status().storage.state, cli=code,
               cli_storage=json.loads(out)["storage"] if code == 0 else err[-800:])
        """,
        waypost_clean_env,
        namespace=namespace,
    )
    assert figures["flush"] is False and figures["free"] < 65536, show(figures)
    assert "can be written again" not in figures["stderr"], show(figures)
    assert figures["after"] == "disk_full", show(figures)
    assert figures["cli"] == 0 and figures["cli_storage"]["state"] == "disk_full", show(figures)


def test_a_checkpoint_puts_the_rows_into_the_main_file_while_another_thread_keeps_its_connection(
    tmp_path: Path,
) -> None:
    # A shutdown that cannot close the outbox (a send() hung at exit) leaves every row in the
    # -wal alone: SQLite checkpoints when the last connection closes. A checkpoint does it
    # while another thread still holds its connection.
    from waypost.delivery.outbox import Outbox
    from waypost.testing import make_event

    outbox = Outbox(tmp_path)
    outbox.add([make_event("kept") for _ in range(300)], ["s"])
    other = threading.Thread(target=outbox.counts)  # a connection of its own
    other.start()
    other.join()
    copy = tmp_path / "main-only.sqlite3"

    def rows_in_main_file() -> int | str:
        copy.write_bytes((tmp_path / "outbox.sqlite3").read_bytes())
        try:
            with sqlite3.connect(copy) as db:
                return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.Error as exc:
            return str(exc)

    assert rows_in_main_file() != 300  # in the -wal only, so far
    assert outbox.checkpoint() is True
    assert rows_in_main_file() == 300
    outbox.close()


def test_a_read_that_got_its_connection_just_before_close_reads_through_an_open_one(
    tmp_path: Path,
) -> None:
    # close() leaves a connection another thread reads through to that read, which closes it
    # when it ends. A read that had its connection but had not yet said so was not seen, and
    # its connection was closed under it: a read already inside SQLite then crashes the
    # process. Here the read is held at that point while close() runs.
    from waypost.delivery.outbox import Outbox
    from waypost.testing import make_event

    outbox = Outbox(tmp_path)
    outbox.add([make_event("kept") for _ in range(3)], ["s"])
    storage = outbox.storage
    own = storage.connection
    got, go = threading.Event(), threading.Event()

    def connection() -> sqlite3.Connection:
        db = own()
        if threading.current_thread().name == "reader" and not got.is_set():
            got.set()
            go.wait(10)
        return db

    storage.connection = connection  # type: ignore[method-assign]
    answers: list[object] = []
    reader = threading.Thread(target=lambda: answers.append(_counts(outbox)), name="reader")
    reader.start()
    assert got.wait(10)
    outbox.close()
    go.set()
    reader.join(10)
    assert answers == [{"s": {"pending": 3}}], answers
    outbox.close()


def _counts(outbox: Any) -> object:
    try:
        return outbox.counts()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


# --- the outbox deleted or replaced under a running process -------------------------------------


@pytest.mark.parametrize("files", [("",), ("", "-wal", "-shm")], ids=["main", "main+wal+shm"])
def test_outbox_deleted_while_running_is_recreated_and_loses_nothing(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer, files: tuple[str, ...]
) -> None:
    data = tmp_path / "d"
    tel = make(down_url(), data)
    try:
        for i in range(600):
            tel.track("before_delete", {"i": i})
        assert tel.flush(10)
        assert pending_rows(data) == 600
        for suffix in files:
            (data / f"outbox.sqlite3{suffix}").unlink(missing_ok=True)
        for i in range(100):
            tel.track("after_delete", {"i": i})
        ok = tel.flush(10)
        st = tel.status()
        figures = {"flush": ok, "status_pending": st.outbox_pending_events,
                   "rows_on_disk": pending_rows(data), "dropped": st.counters.dropped}  # fmt: skip
    finally:
        tel.shutdown(5)
    figures |= next_process(data, server.url + "/ingest")
    figures["delivered"] = len(ids_of(server.requests))
    assert figures["flush"] is True, show(figures)
    assert figures["rows_on_disk"] == 700, figures
    assert figures["delivered"] == 700, show(figures)


def test_outbox_replaced_while_running_is_detected_and_loses_nothing(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer
) -> None:
    data = tmp_path / "d"
    tel = make(down_url(), data)
    try:
        for i in range(300):
            tel.track("before_replace", {"i": i})
        assert tel.flush(10)
        # Another file moved into place, as a restore from a backup would do it.
        other = tmp_path / "other.sqlite3"
        with sqlite3.connect(other) as db:
            db.execute("CREATE TABLE unrelated (x)")
        os.replace(other, data / "outbox.sqlite3")
        for i in range(100):
            tel.track("after_replace", {"i": i})
        ok = tel.flush(10)
        figures: dict[str, Any] = {"flush": ok, "rows_on_disk": pending_rows(data)}
        figures["status"] = tel.status().model_dump(mode="json").get("storage")
    finally:
        tel.shutdown(5)
    figures |= next_process(data, server.url + "/ingest")
    figures["delivered"] = len(ids_of(server.requests))
    assert figures["flush"] is True, show(figures)
    assert figures["delivered"] == 400, figures


# --- a corrupt outbox ---------------------------------------------------------------------------


def _corrupt(path: Path, how: str) -> None:
    rng = random.Random(18)
    size = path.stat().st_size
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(size // 3)
    elif how == "random_header":
        with open(path, "r+b") as fh:
            fh.write(rng.randbytes(100))
    elif how == "random_file":
        path.write_bytes(rng.randbytes(64 * 1024))
    elif how == "bad_page":
        with open(path, "r+b") as fh:
            fh.seek(4096 * 3)
            fh.write(rng.randbytes(4096))
    else:
        raise ValueError(how)


def _stored_outbox(data: Path, n: int) -> None:
    """``n`` events stored in the outbox of ``data`` (the destination was down), checkpointed
    into the main file."""
    tel = make(down_url(), data)
    for i in range(n):
        tel.track("stored_before", {"i": i, "pad": "y" * 200})
    assert tel.flush(10)
    tel.shutdown(5)
    with sqlite3.connect(data / "outbox.sqlite3") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert pending_rows(data) == n


@pytest.mark.parametrize("how", ["truncated", "random_header", "random_file", "bad_page"])
def test_corrupt_outbox_is_moved_aside_and_telemetry_goes_on(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer, how: str
) -> None:
    data = tmp_path / "d"
    _stored_outbox(data, 500)
    _corrupt(data / "outbox.sqlite3", how)
    figures: dict[str, Any] = {}
    code, _out, err = cli(data, "status", "--json")
    figures |= {"cli_before": code, "cli_before_traceback": "Traceback" in err}
    try:
        tel = make(server.url + "/ingest", data)
    except Exception as exc:
        pytest.fail(f"Telemetry() raised {type(exc).__name__}: {exc}")
    try:
        for i in range(100):
            tel.track("after_corruption", {"i": i})
        figures["flush"] = tel.flush(10)
        try:
            st = tel.status()
            figures["storage"] = st.model_dump(mode="json").get("storage")
            figures["dropped"] = st.counters.dropped
        except Exception as exc:
            figures["status_raised"] = f"{type(exc).__name__}: {exc}"
    finally:
        tel.shutdown(5)
    names = [e["name"] for r in server.requests if r.body for e in r.json()]
    figures["delivered_new"] = names.count("after_corruption")
    figures["salvaged"] = names.count("stored_before")
    figures["aside"] = sorted(p.name for p in data.glob("outbox.sqlite3.corrupt-*"))
    for command in (("status",), ("status", "--json"), ("show",), ("flush", "--timeout", "5")):
        code, _out, err = cli(data, *command)
        figures[f"cli {' '.join(command)}"] = (code, "Traceback" in err)
    assert "status_raised" not in figures, show(figures)
    assert figures["flush"] is True, figures
    assert figures["delivered_new"] == 100, show(figures)
    assert figures["aside"], figures  # moved aside with a timestamp, kept for the operator
    assert figures["storage"], show(figures)  # and status says so
    for command in ("status", "status --json", "show", "flush --timeout 5"):
        assert figures[f"cli {command}"] == (0, False), show(figures)


def _bad_leaf_page(path: Path, marker: bytes) -> int:
    """Overwrite with junk the middle one of the pages holding ``marker`` (rows of the outbox
    table); how many times the page held it."""
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[16:18], "big") or 65536
    pages = [n for n in range(len(raw) // size) if marker in raw[n * size : (n + 1) * size]]
    victim = pages[len(pages) // 2]
    held = raw[victim * size : (victim + 1) * size].count(marker)
    raw[victim * size : (victim + 1) * size] = random.Random(18).randbytes(size)
    path.write_bytes(bytes(raw))
    return held


@pytest.mark.parametrize("how", ["bad_page", "truncated", "random_header"])
def test_a_corrupt_outbox_loses_only_the_rows_that_cannot_be_read(
    tmp_path: Path, waypost_clean_env: dict[str, str], server: RecordingServer, how: str
) -> None:
    # One bad page in the middle of the rows, the file cut short, or its header junk: the rows
    # on the other pages are salvaged into the new outbox and delivered (before, a failed chunk
    # of 500 rows was skipped whole, a schema naming a page past the end stopped every read,
    # and a junk header every open).
    data = tmp_path / "d"
    _stored_outbox(data, 500)
    path = data / "outbox.sqlite3"
    lost = 500
    if how == "bad_page":
        lost = _bad_leaf_page(path, b"stored_before")
    else:
        _corrupt(path, how)
    figures = next_process(data, server.url + "/ingest")
    names = [e["name"] for r in server.requests if r.body for e in r.json()]
    figures["salvaged"] = names.count("stored_before")
    figures["aside"] = sorted(p.name for p in data.glob("outbox.sqlite3.corrupt-*"))
    assert figures["aside"], show(figures)
    if how == "bad_page":
        assert figures["salvaged"] >= 500 - lost, show(figures)
    elif how == "random_header":  # the pages are intact: read under a header of SQLite's own
        assert figures["salvaged"] == 500, show(figures)
    else:  # a third of the file is left: about a third of the rows
        assert figures["salvaged"] >= 100, show(figures)


def test_corruption_found_while_running_moves_the_file_aside_and_keeps_what_is_in_memory(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer
) -> None:
    data = tmp_path / "d"
    tel = make(down_url(), data)
    try:
        for i in range(300):
            tel.track("before", {"i": i, "pad": "z" * 200})
        assert tel.flush(10)
        with sqlite3.connect(data / "outbox.sqlite3") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _corrupt(data / "outbox.sqlite3", "random_file")
        for i in range(100):
            tel.track("after", {"i": i})
        figures: dict[str, Any] = {"flush": tel.flush(10)}
        st = tel.status()
        figures |= {"storage": st.model_dump(mode="json").get("storage"),
                    "dropped": st.counters.dropped}  # fmt: skip
    finally:
        tel.shutdown(5)
    figures |= next_process(data, server.url + "/ingest")
    names = [e["name"] for r in server.requests if r.body for e in r.json()]
    figures["delivered_after"] = names.count("after")
    assert figures["delivered_after"] == 100, show(figures)
    assert figures["storage"], figures


# --- a read-only data dir -----------------------------------------------------------------------


def test_read_only_data_dir_delivers_from_memory_and_says_so(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer
) -> None:
    namespace = require_mount_namespace()
    data = tmp_path / "d"
    _stored_outbox(data, 200)
    figures = run_scenario(
        f"""
        from pathlib import Path
        data = Path({str(data)!r})
        bind_read_only(data)
        try:
            tel = make({server.url + "/ingest"!r}, data)
        except Exception as exc:
            report(error=f"Telemetry() raised {{type(exc).__name__}}: {{exc}}")
            raise SystemExit(0)
        for i in range(100):
            tel.track("read_only", {{"i": i}})
        started = time.monotonic()
        ok = tel.flush(30)
        seconds = time.monotonic() - started
        try:
            st = tel.status().model_dump(mode="json")
            report(flush=ok, storage=st.get("storage"), running=st["running"],
                   pending=st["outbox_pending_events"], seconds=seconds)
        except Exception as exc:
            report(flush=ok, status_raised=f"{{type(exc).__name__}}: {{exc}}")
        tel.shutdown(5)
        for command in (("status",), ("status", "--json"), ("show",)):
            code, out, err = cli(data, *command)
            report(**{{"cli " + " ".join(command): (code, "Traceback" in err)}})
        """,
        clean_env,
        namespace=namespace,
    )
    names = [e["name"] for r in server.requests if r.body for e in r.json()]
    figures["delivered"] = names.count("read_only")
    figures.pop("stderr")
    assert "error" not in figures and "status_raised" not in figures, show(figures)
    assert figures["running"] is True and figures["delivered"] == 100, figures
    assert figures["flush"] is True, show(figures)  # everything it was given was delivered
    # ... and then it returns: the stored rows wait for a writable outbox, not for its deadline.
    assert figures["seconds"] < 15, show(figures)
    assert figures["storage"] and "read-only" in json.dumps(figures["storage"]), figures
    assert figures["pending"] == 200, show(figures)  # what the read-only outbox holds, still shown
    for command in ("status", "status --json", "show"):
        assert figures[f"cli {command}"] == [0, False], show(figures)


@pytest.mark.parametrize("how", ["bind_ro", "chmod"])
def test_the_cli_says_a_read_only_data_dir_delivers_from_memory_only(
    tmp_path: Path, waypost_clean_env: dict[str, str], how: str
) -> None:
    # The CLI inspects without writing: it must still tell the operator that a process using
    # this data dir can store nothing (before, it said "ok").
    namespace = require_mount_namespace()
    data = tmp_path / "d"
    _stored_outbox(data, 20)
    figures = run_scenario(
        f"""
        import json, os, subprocess, sys
        from pathlib import Path
        data = Path({str(data)!r})
        prefix = []
        if {how!r} == "bind_ro":
            bind_read_only(data)
        else:  # file modes, for a root that cannot override them
            for p in [data, *data.iterdir()]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        exe = str(Path(sys.executable).with_name("waypost"))
        done = subprocess.run([*prefix, exe, "--app", "faults", "--data-dir", str(data),
                               "status", "--json"], capture_output=True, text=True, timeout=60)
        storage = json.loads(done.stdout)["storage"] if done.returncode == 0 else done.stderr
        report(cli=done.returncode, storage=storage, traceback="Traceback" in done.stderr)
        """,
        waypost_clean_env,
        namespace=namespace,
    )
    if how == "chmod":
        for p in [data, *data.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert figures["cli"] == 0 and not figures["traceback"], show(figures)
    storage = figures["storage"]
    assert storage["state"] == "read_only" and storage["memory_only"] is True, show(figures)
    assert "memory only" in storage["detail"], show(figures)


def test_fresh_read_only_data_dir_still_delivers(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer
) -> None:
    namespace = require_mount_namespace()
    data = tmp_path / "fresh"
    data.mkdir()
    figures = run_scenario(
        f"""
        from pathlib import Path
        data = Path({str(data)!r})
        bind_read_only(data)
        tel = make({server.url + "/ingest"!r}, data)
        for i in range(50):
            tel.track("fresh_read_only", {{"i": i}})
        report(flush=tel.flush(10), running=tel.status().running)
        tel.shutdown(5)
        """,
        clean_env,
        namespace=namespace,
    )
    delivered = [e for r in server.requests if r.body for e in r.json()]
    assert figures["running"] is True and len(delivered) == 50, show(figures)
    assert figures["flush"] is True, figures


# --- junk in the data dir -------------------------------------------------------------------------

JUNK = b"\xff\xfe\x00\x9c junk \xc3\x28\n"


@pytest.mark.parametrize(
    "name",
    [
        "instance_id",
        "notice.json",
        "consent.json",
        "schedule.json",
        "schedule.lock",
        "outbox.sqlite3",
    ],
)
@pytest.mark.parametrize("kind", ["junk", "empty", "directory"])
def test_junk_in_the_data_dir_never_raises_in_production(
    tmp_path: Path, clean_env: dict[str, str], server: RecordingServer, name: str, kind: str
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    target = data / name
    if kind == "junk":
        target.write_bytes(JUNK)
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        target.mkdir()
    from urlsink import UrlSink

    import waypost

    try:
        tel = waypost.Telemetry(
            app="faults", data_dir=data, sink_classes=[UrlSink], env=clean_env,
            config={"telemetry": {"batch": {"interval": 0.05}, "heartbeat": {"every": "1h"},
                                  "sinks": {"dest": {"type": "urltest",
                                                     "url": server.url + "/ingest"}}}},
            notice=lambda text: None,
        )  # fmt: skip
    except Exception as exc:
        pytest.fail(f"Telemetry() raised {type(exc).__name__}: {exc}")
    try:
        tel.track("with_junk", {"i": 1})
        flushed = tel.flush(10)
        st = tel.status()
    finally:
        tel.shutdown(5)
    code, _out, err = cli(data, "status", "--json")
    assert (code, "Traceback" in err) == (0, False), err
    assert st.running, st.reason
    assert flushed
    assert any(e["name"] == "with_junk" for r in server.requests if r.body for e in r.json())


# A control.json edited by hand or damaged: every moment it may hold that is not a date.
BAD_MOMENTS = {
    "infinity": "Infinity",
    "minus_infinity": "-Infinity",
    "nan": "NaN",
    "negative": "-1e12",
    "huge": "1e300",
    "huge_int": "1" + "0" * 400,
    "text": '"2026-12-31T00:00:00Z"',
    "true": "true",
    "object": "{}",
}


def _control_file(data: Path, **moments: str) -> None:
    fields = {"heartbeat_every": "86400", "source": '"ingest"', "pause_until": "null",
              "received_at": "1", **moments}  # fmt: skip
    data.mkdir()
    body = ", ".join(f'"{key}": {value}' for key, value in fields.items())
    (data / "control.json").write_text("{" + body + "}", encoding="utf-8")


@pytest.mark.parametrize("field", ["pause_until", "received_at"])
@pytest.mark.parametrize("moment", list(BAD_MOMENTS), ids=list(BAD_MOMENTS))
def test_a_control_file_with_a_moment_that_is_no_date_never_breaks_status(
    tmp_path: Path, server: RecordingServer, field: str, moment: str
) -> None:
    data = tmp_path / "d"
    _control_file(data, **{field: BAD_MOMENTS[moment]})
    tel = make(server.url + "/ingest", data)
    try:
        tel.track("with_bad_control", {"i": 1})
        flushed = tel.flush(10)
        control = tel.status().control
    finally:
        tel.shutdown(5)
    assert control is not None and control["heartbeat_every"] == 86400, control  # the rest is kept
    if field == "pause_until":  # a pause that cannot be read is none: nothing is held back
        assert control["pause_until"] is None and control["paused"] is False, control
        assert flushed
        assert any(e["name"] == "with_bad_control" for r in server.requests for e in r.json())
    else:
        assert control["received_at"] == "1970-01-01T00:00:00Z", control


@pytest.mark.parametrize("moment", list(BAD_MOMENTS), ids=list(BAD_MOMENTS))
def test_a_control_file_with_a_moment_that_is_no_date_never_breaks_the_cli(
    tmp_path: Path, moment: str
) -> None:
    data = tmp_path / "d"
    _control_file(data, pause_until=BAD_MOMENTS[moment], received_at=BAD_MOMENTS[moment])
    # status shows the control and flush applies its pause; all four for the first value
    commands = [("status",), ("flush", "--timeout", "5")]
    if moment == next(iter(BAD_MOMENTS)):
        commands += [("status", "--json"), ("show",)]
    for command in commands:
        code, out, err = cli(data, *command)
        assert (code, "Traceback" in err) == (0, False), (command, out, err)


# --- a lock held by another process ---------------------------------------------------------------

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


@pytest.fixture
def locked_outbox(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A data dir whose outbox another process holds ``BEGIN IMMEDIATE`` on (until it is told
    to stop, by a line on its stdin)."""
    data = tmp_path / "d"
    _stored_outbox(data, 10)
    locker = _lock(data)
    try:
        yield data, locker
    finally:
        if locker.poll() is None:
            assert locker.stdin is not None
            locker.stdin.write("\n")
            locker.stdin.flush()
            locker.wait(10)


def _lock(data: Path) -> subprocess.Popen[str]:
    """Another process holding ``BEGIN IMMEDIATE`` on the outbox of ``data``, until released."""
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(data / "outbox.sqlite3")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
    return locker


def _release(locker: subprocess.Popen[str]) -> None:
    assert locker.stdin is not None
    locker.stdin.write("\n")
    locker.stdin.flush()
    locker.wait(10)


def test_a_held_write_lock_never_breaks_flush_or_shutdown_budgets(
    locked_outbox: tuple[Path, subprocess.Popen[str]], server: RecordingServer
) -> None:
    data, locker = locked_outbox
    figures: dict[str, Any] = {}
    started = time.monotonic()
    tel = make(down_url(), data)
    figures["init_s"] = time.monotonic() - started
    try:
        for i in range(500):
            tel.track("while_locked", {"i": i})
        started = time.monotonic()
        figures["flush"] = tel.flush(2.0)
        figures["flush_s"] = time.monotonic() - started
        started = time.monotonic()
        figures["status_pending"] = tel.status().outbox_pending_events
        figures["status_s"] = time.monotonic() - started
        code, _out, err = cli(data, "status", "--json", timeout=30)
        figures["cli_status"] = (code, "Traceback" in err)
    finally:
        started = time.monotonic()
        figures["shutdown"] = tel.shutdown(1.0)
        figures["shutdown_s"] = time.monotonic() - started
        st = tel.status()
        figures["dropped"] = st.counters.dropped
        figures["stored"] = st.counters.stored
    _release(locker)
    # The destination is down and nothing could be stored: every event is counted as lost
    # (also those a spill was still trying to write when shutdown counted).
    assert figures["stored"] == 0 and figures["dropped"] == {"outbox_locked": 500}, show(figures)
    assert figures["init_s"] < 2.0, show(figures)
    assert figures["flush_s"] < 2.0 + 2.0, figures
    assert figures["flush"] is False, show(figures)  # nothing could be stored: not safe
    assert figures["status_s"] < 2.0, figures
    assert figures["shutdown_s"] < 1.0 + 2.0, show(figures)
    assert figures["cli_status"] == (0, False), figures


def test_waypost_status_says_another_process_holds_the_lock(
    locked_outbox: tuple[Path, subprocess.Popen[str]],
) -> None:
    data, locker = locked_outbox
    code, out, err = cli(data, "status", "--json", timeout=30)
    assert (code, "Traceback" in err) == (0, False), err
    storage = json.loads(out)["storage"]
    assert storage["state"] == "locked" and storage["memory_only"] is True, storage
    assert f"pid {locker.pid}" in storage["detail"], storage
    code, out, _err = cli(data, "status", timeout=30)
    assert code == 0 and "outbox locked" in out and f"pid {locker.pid}" in out, out
    _release(locker)
    code, out, _err = cli(data, "status", "--json", timeout=30)
    assert code == 0 and json.loads(out)["storage"]["state"] == "ok", out


CLI_WRITES = (
    ("status", "--json"),
    ("show", "--json"),
    ("purge", "--sent", "--json"),
    ("purge", "--all", "--yes", "--json"),
    ("consent", "off", "--json"),
    ("send-heartbeat", "--timeout", "2", "--json"),
)


def _cli_answers(data: Path, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Each command of :data:`CLI_WRITES` on ``data``: exit code, JSON or not, a traceback or
    not (``prefix``: a command to run it under)."""
    exe = str(Path(sys.executable).with_name("waypost"))
    answers: dict[str, Any] = {}
    for command in CLI_WRITES:
        done = subprocess.run(
            [*prefix, exe, "--app", "faults", "--data-dir", str(data), *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            answer = None
        answers[" ".join(command)] = {
            "rc": done.returncode,
            "json": isinstance(answer, dict),
            "traceback": "Traceback" in done.stderr,
            "storage": answer.get("storage", {}).get("state") if isinstance(answer, dict) else None,
        }
    return answers


@pytest.mark.parametrize("how", ["locked", "corrupt", "read_only", "data_dir_a_file"])
def test_every_cli_command_answers_whatever_the_outbox_is(tmp_path: Path, how: str) -> None:
    data = tmp_path / "d"
    prefix: tuple[str, ...] = ()
    locker = None
    if how == "data_dir_a_file":
        data.write_text("not a directory")
    else:
        _stored_outbox(data, 10)
    if how == "locked":
        locker = _lock(data)
    elif how == "corrupt":
        _corrupt(data / "outbox.sqlite3", "random_header")
    elif how == "read_only":
        for p in [data, *data.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        if os.geteuid() == 0:  # root writes anyway, unless it gives up overriding file modes
            prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    try:
        answers = _cli_answers(data, prefix)
    finally:
        if locker is not None:
            _release(locker)
        if how == "read_only":
            for p in [data, *data.iterdir()]:
                p.chmod(0o755 if p.is_dir() else 0o644)
    for command, answer in answers.items():
        # Done (0) or not done (1), said as JSON: never a traceback.
        assert answer["rc"] in (0, 1) and answer["json"], (command, show(answers))
        assert not answer["traceback"], (command, show(answers))
    if how in ("corrupt", "data_dir_a_file"):  # corrupt: seen before any process repaired it
        assert answers["status --json"]["storage"] == "unavailable", show(answers)


def test_events_waiting_for_a_held_lock_are_stored_once_it_is_released(
    locked_outbox: tuple[Path, subprocess.Popen[str]], server: RecordingServer
) -> None:
    data, locker = locked_outbox
    tel = make(down_url(), data)
    try:
        for i in range(500):
            tel.track("while_locked", {"i": i})
        assert tel.flush(1.0) is False
        _release(locker)
        assert tel.flush(10.0) is True
    finally:
        tel.shutdown(5)
    figures = next_process(data, server.url + "/ingest")
    names = [e["name"] for r in server.requests if r.body for e in r.json()]
    assert names.count("while_locked") == 500, show(figures)


def test_exit_holds_its_budget_while_another_process_holds_the_lock(
    locked_outbox: tuple[Path, subprocess.Popen[str]], clean_env: dict[str, str]
) -> None:
    data, _locker = locked_outbox
    figures = run_scenario(
        f"""
        tel = make({down_url()!r}, {str(data)!r}, shutdown_timeout=1)
        for i in range(500):
            tel.track("exit_while_locked", {{"i": i}})
        report(script_end=time.time())
        """,
        clean_env,
        timeout=120,
    )
    exited = time.time()
    # From the script's end to the process's exit (the interpreter's start-up, slow on a busy
    # machine, is not the at-exit hook's): the budget is 1 s, the lock never comes free.
    elapsed = exited - figures["script_end"]
    assert elapsed < 1.0 + 3.0, (elapsed, figures["stderr"])


def test_a_spill_waits_for_another_threads_write_no_longer_than_its_own_budget(
    tmp_path: Path,
) -> None:
    """The storer holds a sink's spill lock while it waits for the outbox's lock (another
    process held it at exit: exit took 4.1 s against shutdown_timeout 3 s). A flush or a
    shutdown spilling behind it waits within its own budget and reports nothing moved."""
    tel = make(down_url(), tmp_path / "data")
    try:
        runner = tel.pipeline.runners[0]
        outbox = tel.pipeline.outbox
        held, release = threading.Event(), threading.Event()

        def storer_mid_write() -> None:
            with runner._spill_lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=storer_mid_write, daemon=True)
        holder.start()
        assert held.wait(10)
        moved: list[int] = []

        def spill_on_a_budget() -> None:
            with outbox.budget(time.monotonic() + 0.2):
                moved.append(runner.spill())

        spiller = threading.Thread(target=spill_on_a_budget, daemon=True)
        spiller.start()
        spiller.join(10)  # the holder lets go after 30 s: a spill that waits for it fails here
        returned = not spiller.is_alive()
        release.set()
        holder.join(10)
        assert returned, "spill() waited for another thread's write past its own budget"
        assert moved == [0]
    finally:
        tel.shutdown(2)
