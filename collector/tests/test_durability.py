"""What an answer promises, tested for real: ``waypost collector serve`` in a child process,
``kill -9`` right after it answered, restarted on the same data dir; storage that is down, a
relay whose destination answers 503 first."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import base_section, envelope, signed_headers, stored_rows, wait_for, write_config

from waypost.testing import RecordingServer, Response


def _batch(n: int, instance: str) -> list[dict[str, Any]]:
    return [envelope(instance_id=instance, properties={"i": i}) for i in range(n)]


def _send(url: str, batch: list[dict[str, Any]]) -> dict[str, Any]:
    body = json.dumps(batch).encode()
    response = httpx.post(url, content=body, headers=signed_headers(body), timeout=30)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_kill_9_right_after_an_answer_loses_nothing_acknowledged(
    tmp_path: Path, spawn: Any
) -> None:
    data = tmp_path / "d"
    config = write_config(tmp_path / "c.yml", base_section(data))
    process = spawn(config)
    url = process.url + "/v1/myapp/events"
    acknowledged: list[str] = []
    batches = [_batch(50, f"inst-{k}") for k in range(12)]
    for batch in batches[:6]:
        answer = _send(url, batch)
        assert answer["accepted"] == 50
        acknowledged += [e["id"] for e in batch]
    process.kill()  # at once after the answer: the storage may not have it yet
    process.start()
    for batch in batches[6:]:
        _send(url, batch)
        acknowledged += [e["id"] for e in batch]
    # Every batch sent again (a client whose answers were lost): all duplicates.
    replayed = [_send(url, b) for b in batches]
    assert sum(a["duplicates"] for a in replayed) == 600
    assert sum(a["accepted"] for a in replayed) == 0
    rows = wait_for(lambda: (r := stored_rows(data)) and len(r) >= 600 and r, 30, "600 rows")
    counts = Counter(r["id"] for r in rows)
    assert set(counts) == set(acknowledged) and set(counts.values()) == {1}


@pytest.mark.parametrize("ack", ["spool", "storage"])
def test_storage_down_then_back(ack: str, tmp_path: Path, spawn: Any) -> None:
    """The relay case: storage is another waypost sink (http here), down at first. Batches are
    answered from the spool, survive a kill -9, and reach the destination when it is back."""
    with RecordingServer() as destination:
        destination.responder = lambda request: Response(503, {"error": "down"})
        section = base_section(
            tmp_path / "d",
            ack=ack,
            storage={"relay": {"type": "http", "url": destination.url + "/ingest"}},
        )
        process = spawn(write_config(tmp_path / "c.yml", section))
        url = process.url + "/v1/myapp/events"
        sent = [_batch(20, "relay-inst") for _ in range(3)]
        for batch in sent:
            assert _send(url, batch)["accepted"] == 20
        assert destination.wait_for(lambda reqs: len(reqs) >= 1, 30)
        process.kill()
        delivered: set[str] = set()

        def accept(request: Any) -> Response:
            delivered.update(e["id"] for e in request.json())
            return Response(200, {})

        destination.responder = accept
        process.start()
        ids = {e["id"] for batch in sent for e in batch}
        wait_for(lambda: delivered >= ids, 60, "every batch at the destination")

        def spool_empty() -> bool:  # the rows go once the answer is in (just after it)
            stats = httpx.get(process.url + "/metrics").text
            pending = 'waypost_collector_spool_rows{state="pending",storage="relay"}'
            return pending not in stats or f"{pending} 0.0" in stats

        wait_for(spool_empty, 30, "the spool to be empty")


def test_ack_storage_answers_once_storage_has_it(tmp_path: Path, spawn: Any) -> None:
    data = tmp_path / "d"
    process = spawn(write_config(tmp_path / "c.yml", base_section(data, ack="storage")))
    url = process.url + "/v1/myapp/events"
    first = _batch(5, "warm")
    _send(url, first)
    wait_for(lambda: len(stored_rows(data)) == 5, 30, "the storage to be open")
    for k in range(5):
        batch = _batch(30, f"direct-{k}")
        assert _send(url, batch)["accepted"] == 30
        # In storage when the answer comes: nothing waited in the spool.
        stored = {r["id"] for r in stored_rows(data)}
        assert {e["id"] for e in batch} <= stored
    assert _send(url, batch)["duplicates"] == 30
    process.kill()
    process.start()
    assert len(stored_rows(data)) == 155


def test_a_full_disk_is_503_and_nothing_answered_is_lost(
    tmp_path: Path, spawn: Any, clean_tmpfs: Path
) -> None:
    data = clean_tmpfs / "d"
    section = base_section(data, limits={"min_free_mb": 0.5})
    process = spawn(write_config(tmp_path / "c.yml", section))
    url = process.url + "/v1/myapp/events"
    acknowledged: set[str] = set()
    filler = clean_tmpfs / "filler"
    with open(filler, "wb") as out:  # the disk fills up with something else
        try:
            while True:
                out.write(b"x" * 65536)
                out.flush()
        except OSError:
            pass
    filler.write_bytes(filler.read_bytes()[:-1_200_000])  # a little room left
    statuses = set()
    for k in range(60):
        batch = _batch(50, f"full-{k}")
        body = json.dumps(batch).encode()
        answer = httpx.post(url, content=body, headers=signed_headers(body), timeout=30)
        statuses.add(answer.status_code)
        if answer.status_code == 200:
            acknowledged |= {e["id"] for e in batch}
        else:
            assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
            assert answer.json()["error"] == "unavailable"
    assert statuses == {200, 503}
    filler.unlink()
    more = _batch(50, "after")
    wait_for(lambda: httpx.get(process.url + "/readyz").status_code == 200, 90, "room again")
    assert _send(url, more)["accepted"] == 50
    acknowledged |= {e["id"] for e in more}
    rows = wait_for(
        lambda: (r := stored_rows(data)) and {x["id"] for x in r} >= acknowledged and r,
        120,
        "every acknowledged event",
    )
    assert len(rows) == len({r["id"] for r in rows})


def _spool_rows(collector: Any) -> dict[str, int]:
    return dict(collector.spool.depth().get("relay", {}))


def test_ack_spool_hands_storage_the_batches_it_holds(tmp_path: Path, serve: Any) -> None:
    """With ``ack: spool``, a batch answered from the spool reaches storage from memory (its
    rows leased meanwhile, deleted once storage has it); what storage asks to retry goes to
    the storage runner, which sends it again; what it refuses for good stays in the spool as
    failed."""
    with RecordingServer() as destination:
        delivered: list[str] = []
        answers: list[dict[str, Any]] = []

        def accept(request: Any) -> Response:
            ids = [e["id"] for e in request.json()]
            answer = answers.pop(0) if answers else {}
            delivered.extend(i for i in ids if i not in answer.get("retry", []) + answer.get(
                "rejected", []))  # fmt: skip
            return Response(200, answer)

        destination.responder = accept
        section = base_section(
            tmp_path / "d", storage={"relay": {"type": "http", "url": destination.url + "/in"}}
        )
        served = serve(write_config(tmp_path / "c.yml", section))
        collector = served.collector
        url = served.url + "/v1/myapp/events"
        warm = _batch(5, "warm")
        _send(url, warm)  # the runner opens its sink for the first rows
        wait_for(lambda: len(delivered) == 5 and not _spool_rows(collector), 30, "warm-up")
        assert collector.spool.handed == 0

        sent = [_batch(20, f"hand-{k}") for k in range(4)]
        for batch in sent:
            assert _send(url, batch)["accepted"] == 20
        wait_for(lambda: len(delivered) == 85 and not _spool_rows(collector), 30, "4 batches")
        assert collector.spool.handed == 80  # every one from memory

        retried, rejected = _batch(20, "retry"), _batch(20, "rejected")
        answers.append({"retry": [e["id"] for e in retried[:3]],
                        "rejected": [e["id"] for e in rejected[:2]]})  # fmt: skip
        body = json.dumps(retried + rejected).encode()
        assert httpx.post(url, content=body, headers=signed_headers(body)).status_code == 200
        wanted = {e["id"] for e in retried + rejected[2:]}
        wait_for(lambda: wanted <= set(delivered), 30, "the retried events from the runner")
        assert collector.spool.handed == 80 + 35
        assert Counter(delivered)[retried[0]["id"]] == 1
        rows = wait_for(lambda: (r := _spool_rows(collector)) and "pending" not in r and r, 30,
                        "the spool to settle")  # fmt: skip
        assert rows == {"failed": 2}


def test_a_spool_row_holds_a_batch_and_gives_back_each_event() -> None:
    from waypost_collector.spool import PACK_NAME, fold, pack, unpack

    from waypost.events import Event
    from waypost.sinks import SendResult

    first, second = {"app": {"name": "a"}}, {"app": {"name": "b"}}
    events = [
        Event(f"id-{i}", "run", 1700000000.5 + i, f"inst-{i % 2}", {"i": i, "big": 2**70},
              first if i % 2 else second, f"user-{i}", "usage", ["scrubbed"] if i == 3 else [])
        for i in range(5)
    ]  # fmt: skip
    row = pack(events, 1700000001.0)
    assert row.name == PACK_NAME and unpack(events[0]) is None
    # A client's event of that name, with such a property, is one event (never unpacked).
    forged = Event("id-f", PACK_NAME, 1.0, "i", dict(row.properties), {}, "i", "usage", [])
    assert unpack(forged) is None
    back = unpack(row)
    assert back is not None
    assert back == events and type(back[0].properties["big"]) is int
    assert back[1].context is back[3].context and back[0].context is not back[1].context

    a, b = pack(events[:2], 1.0), pack(events[2:4], 1.0)
    packs = {a.id: events[:2], b.id: events[2:4]}
    result = SendResult(
        retry={"id-0": "busy", "loose": "busy"},
        failed={"id-1": "bad", "id-2": "worse"},
        retry_after=3.0,
        receipt="r-1",
    )
    folded = fold(result, packs)
    assert folded.retry == {a.id: "1 of 2 events: busy", "loose": "busy"}
    assert folded.failed == {b.id: "1 of 2 events: worse"}
    assert (folded.retry_after, folded.receipt) == (3.0, "r-1")
    assert fold(SendResult(), packs) == SendResult()


def test_storage_that_takes_a_batch_only_in_parts(tmp_path: Path, serve: Any) -> None:
    """A relay whose destination answers 413 past 30 events: the spool's rows of many events
    each reach it all the same, split as the destination needs, from the runner (storage not
    open yet) and from the handoff."""
    with RecordingServer() as destination:
        delivered: list[str] = []

        def accept(request: Any) -> Response:
            events = request.json()
            if len(events) > 30:
                return Response(413, {"error": "too large"})
            delivered.extend(e["id"] for e in events)
            return Response(200, {})

        destination.responder = accept
        section = base_section(
            tmp_path / "d", storage={"relay": {"type": "http", "url": destination.url + "/in"}}
        )
        served = serve(write_config(tmp_path / "c.yml", section))
        url = served.url + "/v1/myapp/events"
        sent = [_batch(80, f"big-{k}") for k in range(4)]
        assert _send(url, sent[0])["accepted"] == 80
        wait_for(lambda: len(delivered) == 80, 30, "the first batch, from the runner")
        for batch in sent[1:]:
            assert _send(url, batch)["accepted"] == 80
        wait_for(lambda: len(delivered) == 320 and not _spool_rows(served.collector), 30, "all")
        assert Counter(delivered) == Counter(e["id"] for b in sent for e in b)
        assert served.collector.spool.handed == 240


def test_a_spool_of_one_event_a_row_is_handed_over_in_full_batches(
    tmp_path: Path, serve: Any
) -> None:
    """Rows written before a row held a batch (one event each) are leased a sink's batch at a
    time, not a sink's batch of rows that each hold a batch."""
    from waypost.delivery.outbox import Outbox
    from waypost.testing import make_event

    data = tmp_path / "d"
    old = Outbox(data / "spool", sync=True)
    events = [make_event(name="run", properties={"i": i}) for i in range(300)]
    old.add(events, ["relay"])
    old.close()
    with RecordingServer() as destination:
        section = base_section(
            data, storage={"relay": {"type": "http", "url": destination.url + "/in"}}
        )
        served = serve(write_config(tmp_path / "c.yml", section))
        wait_for(lambda: not _spool_rows(served.collector), 30, "the old rows delivered")
        ids = [e["id"] for r in destination.requests for e in r.json()]
        assert Counter(ids) == Counter(e.id for e in events)
        assert len(destination.requests) <= 3  # 10 rows first, then the sink's batch of 1,000
