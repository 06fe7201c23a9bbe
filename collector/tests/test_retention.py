"""``retention:`` honoured: event ids and receipts forgotten after their time, the embedded
storage's old events deleted, through the housekeeping the spool's pipeline runs each minute
(called here directly, rather than waited for)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import httpx
from helpers import base_section, envelope, signed_headers, stored_rows, wait_for, write_config


def _send(url: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    body = json.dumps(events).encode()
    response = httpx.post(url, content=body, headers=signed_headers(body), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_ids_receipts_and_old_events_are_forgotten_in_their_time(
    tmp_path: Path, serve: Any
) -> None:
    data = tmp_path / "d"
    retention = {"dedup": "1s", "receipts": "1s", "events": "1d"}
    served = serve(write_config(tmp_path / "c.yml", base_section(data, retention=retention)))
    collector = served.collector
    url = served.url + "/v1/myapp/events"
    old = (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(days=3)).isoformat()
    fresh = [envelope(properties={"n": i}) for i in range(5)]
    stale = [envelope(timestamp=old.replace("+00:00", "Z")) for _ in range(3)]
    receipt = _send(url, fresh + stale)["receipt"]
    assert _send(url, fresh)["duplicates"] == 5  # within retention.dedup: a duplicate
    wait_for(lambda: len(stored_rows(data)) == 8, 30, "8 rows stored")
    assert collector.ledger.receipt(receipt) is not None

    def forgotten() -> bool:
        collector.spool._housekeeping()
        return collector.ledger.sizes() == {"seen": 0, "receipts": 0}

    wait_for(forgotten, 30, "the ids and the receipt to pass their retention")
    assert collector.ledger.receipt(receipt) is None
    rows = stored_rows(data)  # retention.events: the three of three days ago are gone
    assert sorted(r["id"] for r in rows) == sorted(e["id"] for e in fresh)
    # Past retention.dedup a retry is accepted again; storage, keyed by id, still holds it once.
    assert _send(url, fresh)["accepted"] == 5
    wait_for(lambda: collector.spool.lag() is None, 30, "the spool to hand over")
    assert sorted(r["id"] for r in stored_rows(data)) == sorted(e["id"] for e in fresh)
