"""The sink contract for ``sql`` and ``snowflake``: ``waypost.testing.SinkContract``, every test
of it, with the databases as its peers (``SqlPeer`` and ``SnowflakePeer`` in warehouse_peers):
SQLite and DuckDB files, the PostgreSQL cluster of this session, and fakesnow's server behind a
proxy of the peer's own, which plays its 503s, slow answers and redirects. What a database
cannot play (a Retry-After; a redirect, for the SQL databases) is left out, and said so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from warehouse_peers import SQL_KINDS, SnowflakePeer, SqlPeer, sql_peer

from waypost.plugins import PluginManager
from waypost.testing import SinkContract, make_events, send_batch


class TestSqlContract(SinkContract):
    sink_type = "sql"

    @pytest.fixture(params=SQL_KINDS)
    def waypost_peer(
        self, request: pytest.FixtureRequest, make_backend: Any, tmp_path: Path
    ) -> Iterator[SqlPeer]:
        with sql_peer(request.param, make_backend, tmp_path) as peer:
            yield peer  # type: ignore[misc]

    def test_a_refusal_names_the_table(self, waypost_peer: SqlPeer, tmp_path: Path) -> None:
        sink = self.peer_sink(waypost_peer, tmp_path)
        sink.open()
        try:
            waypost_peer.refuse("the table is gone")
            result = send_batch(sink, make_events(2))
            assert result.failed and all(
                waypost_peer.backend.table in r for r in result.failed.values()
            )
        finally:
            sink.close()


class TestSnowflakeContract(SinkContract):
    sink_type = "snowflake"
    # The connector retries a 503 itself and keeps Retry-After to itself: the sink never sees it.
    honours_retry_after = False

    @pytest.fixture
    def waypost_peer(self, snowflake_db: Any) -> Iterator[SnowflakePeer]:
        with SnowflakePeer(snowflake_db) as peer:
            yield peer  # type: ignore[misc]

    # Known gap, kept visible: strict, so that the day the sink stops following redirects this
    # fails and the mark goes. The connector's session (its vendored requests) follows every
    # redirect, 301 to 308, and no connect() setting turns that off; the sink could only reach
    # into the connector's private session. The other host gets the MERGE and its rows on
    # 307/308 (the method and body kept), the query on the others.
    @pytest.mark.xfail(
        strict=True,
        reason="the snowflake connector follows redirects (requests' default; no setting turns "
        "it off) and the sink cannot stop it without the connector's private session",
    )
    def test_contract_never_follows_redirects(
        self, waypost_peer: SnowflakePeer, tmp_path: Path
    ) -> None:
        super().test_contract_never_follows_redirects(waypost_peer, tmp_path)


@pytest.mark.parametrize("sink_type", ["sql", "snowflake"])
def test_the_sinks_come_from_this_plugin(sink_type: str) -> None:
    cls = PluginManager().load_sink_type(sink_type)
    assert cls.__module__.startswith("waypost_warehouse")
