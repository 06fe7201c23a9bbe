"""Storage through waypost's sinks on real databases: the embedded SQLite file, DuckDB, a
PostgreSQL cluster started for the session and Snowflake (fakesnow's server); two collectors
sharing nothing but PostgreSQL store a batch sent to both once."""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import base_section, envelope, signed_headers, wait_for, write_config

SERVER = pytest.mark.server


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{module} is missing (WAYPOST_REQUIRE_SERVERS=1 forbids skipping)")
        pytest.skip(f"{module} is not installed (it is in the test dependency group)")


def _url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    if kind == "duckdb":
        _need("duckdb_engine")
        return f"duckdb:///{tmp_path / 'events.duckdb'}"
    _need("psycopg")
    return str(request.getfixturevalue("postgres_url"))


def _rows(url: str, table: str) -> list[tuple[Any, ...]]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=NullPool)  # fmt: skip
    try:
        with engine.connect() as conn:
            return [
                tuple(r) for r in conn.execute(sa.text(f"SELECT id, name, context FROM {table}"))
            ]
    except sa.exc.DBAPIError:  # not made yet: the sink makes it when it first writes
        return []
    finally:
        engine.dispose()


def _send(url: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    body = json.dumps(events).encode()
    response = httpx.post(url, content=body, headers=signed_headers(body), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["sqlite", "duckdb", pytest.param("postgresql", marks=SERVER)])
def test_storage_backends_and_the_dashboard_reading_them(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, serve: Any
) -> None:
    url = _url(kind, tmp_path, request)
    table = f"events_{kind}_{os.getpid()}"
    section = base_section(
        tmp_path / "d", storage={"db": {"type": "sql", "url": url, "table": table,
                                        "create_table": True}},
    )  # fmt: skip
    served = serve(write_config(tmp_path / "c.yml", section))
    now = _dt.datetime.now(_dt.timezone.utc)
    events = []
    for day in range(3):
        for inst in range(day + 1):
            when = (now - _dt.timedelta(days=day)).isoformat().replace("+00:00", "Z")
            events.append(
                envelope(timestamp=when, instance_id=f"inst-{inst}",
                         context={"app": {"name": "myapp", "version": f"1.{inst}"},
                                  "os": {"type": "Linux"}, "python": "3.12.1"})
            )  # fmt: skip
    assert _send(served.url + "/v1/myapp/events", events)["accepted"] == 6
    rows = wait_for(lambda: len(r := _rows(url, table)) == 6 and r, 30, "6 rows")
    context = rows[0][2] if isinstance(rows[0][2], dict) else json.loads(rows[0][2])
    assert context["collector"]["receipt"]
    # The dashboard reads the same table with the database's own functions.
    from waypost_collector.dashboard.charts import chart_data

    store = served.app.routes[-1].app.state.dashboard.store()
    assert store is not None and store.dialect == kind
    daily = chart_data("active_daily", app="myapp", store=store, ledger=served.collector.ledger)
    points = dict(daily["series"][0]["points"])
    assert points[now.date().isoformat()] == 1
    assert points[(now - _dt.timedelta(days=2)).date().isoformat()] == 3
    versions = chart_data("versions", app="myapp", store=store, ledger=served.collector.ledger)
    assert {i["label"]: i["value"] for i in versions["items"]} == {"1.0": 1, "1.1": 1, "1.2": 1}
    python = chart_data("python", app="myapp", store=store, ledger=served.collector.ledger)
    assert python["items"][0]["label"] == "3.12.1"


@SERVER
def test_two_collectors_sharing_only_postgresql_store_once(
    tmp_path: Path, postgres_url: str, spawn: Any
) -> None:
    _need("psycopg")
    table = f"shared_{os.getpid()}"
    storage = {"db": {"type": "sql", "url": postgres_url, "table": table, "create_table": True}}
    first = spawn(write_config(tmp_path / "a.yml", base_section(tmp_path / "a", storage=storage)))
    second = spawn(write_config(tmp_path / "b.yml", base_section(tmp_path / "b", storage=storage)))
    batch = [envelope() for _ in range(40)]
    # A client whose answer from the first was lost retries through the second.
    assert _send(first.url + "/v1/myapp/events", batch)["accepted"] == 40
    assert _send(second.url + "/v1/myapp/events", batch)["accepted"] == 40
    assert _send(second.url + "/v1/myapp/events", batch)["duplicates"] == 40
    wait_for(lambda: len(_rows(postgres_url, table)) >= 40, 30, "40 rows")

    def settled() -> bool:
        lines = [
            line
            for p in (first, second)
            for line in httpx.get(p.url + "/metrics").text.splitlines()
            if line.startswith("waypost_collector_spool_rows{") and 'state="pending"' in line
        ]
        return all(float(line.rsplit(" ", 1)[1]) == 0 for line in lines)

    wait_for(settled, 30, "both spools to hand over")
    counts = Counter(r[0] for r in _rows(postgres_url, table))
    assert len(counts) == 40 and set(counts.values()) == {1}


@SERVER
def test_a_warehouse_as_storage_snowflake(tmp_path: Path, request: pytest.FixtureRequest,
                                          serve: Any) -> None:  # fmt: skip
    """``storage:`` names the snowflake sink (the real connector, fakesnow's server on loopback):
    what the collector accepted reaches the warehouse once, stamped, its address hashed."""
    if sys.version_info < (3, 11):
        pytest.skip("fakesnow, the Snowflake server the test stores into, needs Python 3.11+")
    _need("fakesnow")
    _need("snowflake.connector")
    db = request.getfixturevalue("snowflake_db")
    section = base_section(tmp_path / "d", storage={"wh": {"type": "snowflake", **db.config()}})
    served = serve(write_config(tmp_path / "c.yml", section))
    batch = [envelope(properties={"n": i}) for i in range(30)]
    url = served.url + "/v1/myapp/events"
    assert _send(url, batch)["accepted"] == 30
    assert _send(url, batch)["duplicates"] == 30  # a client that retried: stored once
    import snowflake.connector

    def stored() -> list[dict[str, Any]]:
        try:
            return list(db.rows())
        except snowflake.connector.errors.ProgrammingError:  # made by the sink's first write
            return []

    rows = wait_for(lambda: len(r := stored()) >= 30 and r, 60, "30 rows in Snowflake")
    assert sorted(r["id"] for r in rows) == sorted(e["id"] for e in batch)
    stamp = rows[0]["context"]["collector"]
    assert stamp["receipt"] and len(stamp["ip_hash"]) == 64
    wait_for(lambda: served.collector.spool.lag() is None, 30, "the spool to hand over")
    assert len(stored()) == 30
