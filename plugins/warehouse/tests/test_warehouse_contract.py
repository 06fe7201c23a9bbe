"""The sink contract for ``sql`` and ``snowflake``, against real databases.

``waypost.testing.SinkContract`` speaks HTTP to a recording server; a database sink has no HTTP
answers to script, so these are the same promises checked against each database instead:
a batch is delivered with per-event results, an unreachable database is retryable, an SQL error
is permanent, secrets never appear in a repr, result or log line, close is clean, events flow
end to end through ``Telemetry``, and a failing sink does not hold the others back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from waypost.plugins import PluginManager
from waypost.sinks import Sink, SinkContext
from waypost.testing import free_port, make_events, send_batch

KINDS = ("sqlite", "duckdb", pytest.param("postgresql", marks=pytest.mark.server), "snowflake")


@dataclass
class Peer:
    """A sink type, its config against a live database, and how to look inside that database."""

    kind: str
    sink_type: str
    config: dict[str, Any]
    down: dict[str, Any]
    secrets: list[str]
    stored_ids: Callable[[], list[str]]
    drop_table: Callable[[], None]

    def sink(self, tmp_path: Path, config: dict[str, Any] | None = None, **extra: Any) -> Sink:
        cls = PluginManager().load_sink_type(self.sink_type)
        context = SinkContext(
            app="testapp", version="1.0.0", instance_id="5db51f99-c6fb-4340-9c19-78adce58cc1b",
            data_dir=tmp_path, strict=True,
        )  # fmt: skip
        settings = cls.Config.model_validate({**(config or self.config), **extra})
        return cls(f"test-{self.kind}", settings, context)


@pytest.fixture(params=KINDS)
def peer(request: pytest.FixtureRequest, tmp_path: Path, make_backend: Any) -> Peer:
    kind = request.param
    if kind == "snowflake":
        db = request.getfixturevalue("snowflake_db")
        return Peer(
            kind, "snowflake", db.config(),
            down=db.config(host=f"http://127.0.0.1:{free_port()}"),
            secrets=[db.password],
            stored_ids=lambda: [str(r[0]) for r in db.query(f"SELECT id FROM {db.table}")],
            drop_table=lambda: db.query(f"DROP TABLE {db.table}"),
        )  # fmt: skip
    backend = make_backend(kind)
    if kind == "postgresql":
        from sqlalchemy.engine import make_url

        url = make_url(backend.url)
        secrets = [str(url.password)]
        down_url = url.set(port=free_port()).render_as_string(hide_password=False)
    else:
        # A file in a directory that does not exist: the database cannot be opened.
        secrets = []
        down_url = f"{kind}:///{tmp_path / 'missing-dir' / uuid.uuid4().hex / 'x.db'}"
    return Peer(
        kind, "sql", backend.config(), down=backend.config(url=down_url), secrets=secrets,
        stored_ids=lambda: [str(r[0]) for r in backend.query(f"SELECT id FROM {backend.table}")],
        drop_table=lambda: backend.query(f"DROP TABLE {backend.table}"),
    )  # fmt: skip


@pytest.mark.parametrize("sink_type", ["sql", "snowflake"])
def test_entry_point_loads(sink_type: str) -> None:
    cls = PluginManager().load_sink_type(sink_type)
    assert issubclass(cls, Sink) and cls.type == sink_type
    assert cls.__module__.startswith("waypost_warehouse")


def test_config_refuses_unknown_keys(peer: Peer) -> None:
    cls = PluginManager().load_sink_type(peer.sink_type)
    cls.Config.model_validate(peer.config)
    with pytest.raises(ValueError, match="no_such_setting"):
        cls.Config.model_validate({**peer.config, "no_such_setting": 1})


def test_delivers_a_batch_with_per_event_results(peer: Peer, tmp_path: Path) -> None:
    sink = peer.sink(tmp_path)
    sink.open()
    try:
        events = make_events(5)
        result = send_batch(sink, events)
        assert not result.retry and not result.failed, result
        assert sorted(peer.stored_ids()) == sorted(e.id for e in events)
    finally:
        sink.close()


def test_unreachable_database_is_retryable(peer: Peer, tmp_path: Path) -> None:
    sink = peer.sink(tmp_path, peer.down, timeout=2)
    try:
        sink.open()  # opens anyway: the core retries the batches, not the configuration
        events = make_events(2)
        result = send_batch(sink, events)
        assert set(result.retry) == {e.id for e in events}, result
        assert not result.failed
    finally:
        sink.close()


def test_sql_error_is_permanent(peer: Peer, tmp_path: Path) -> None:
    sink = peer.sink(tmp_path)
    sink.open()
    try:
        peer.drop_table()
        events = make_events(3)
        result = send_batch(sink, events)
        assert set(result.failed) == {e.id for e in events}, result
        assert all("waypost_events" in r or "events_" in r for r in result.failed.values())
    finally:
        sink.close()


def test_never_logs_secrets(peer: Peer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    sink = peer.sink(tmp_path)
    sink.open()
    texts += [repr(sink), str(sink.config), repr(sink.config), sink.config.model_dump_json()]
    texts.append(repr(send_batch(sink, make_events(2))))
    texts.append(repr(sink.render(make_events(1))))
    peer.drop_table()
    texts.append(repr(send_batch(sink, make_events(2))))
    sink.close()
    down = peer.sink(tmp_path, peer.down, timeout=1)
    down.open()
    texts += [repr(down), repr(send_batch(down, make_events(1)))]
    down.close()
    texts.append(caplog.text)
    for secret in peer.secrets:
        for text in texts:
            assert secret not in text, f"a secret leaked into: {text[:200]}"


def test_close_is_clean(peer: Peer, tmp_path: Path) -> None:
    never_opened = peer.sink(tmp_path)
    never_opened.close()
    sink = peer.sink(tmp_path)
    sink.open()
    send_batch(sink, make_events(1))
    sink.close()
    sink.close()  # twice is harmless


def test_end_to_end_through_telemetry(peer: Peer, make_telemetry: Any) -> None:
    tel = make_telemetry(sinks={"dest": {"type": peer.sink_type, **peer.config}})
    for i in range(25):
        tel.track("contract_event", {"i": i})
    assert tel.flush(timeout=30)
    stored = peer.stored_ids()
    assert len(stored) == 25 and len(set(stored)) == 25
    assert tel.status().sinks[0].delivered == 25


def test_failure_is_isolated(peer: Peer, make_telemetry: Any, tmp_path: Path) -> None:
    out = tmp_path / "isolated.jsonl"
    tel = make_telemetry(
        sinks={
            "down": {"type": peer.sink_type, **peer.down, "timeout": 1},
            "file": {"type": "jsonl", "path": str(out)},
        }
    )
    for i in range(10):
        tel.track("isolated_event", {"i": i})
    tel.flush(timeout=10)
    assert len(out.read_text().splitlines()) == 10
    by_name = {s.name: s for s in tel.status().sinks}
    assert by_name["down"].pending == 10
    assert by_name["down"].delivered == 0
