"""The collector's HTTP surface against real clients: waypost's own http sink in every format
it sends (token, signature, gzip) and raw requests that break each rule once."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    SECRET,
    TOKEN,
    base_section,
    envelope,
    files_containing,
    signed_headers,
    stored_rows,
    wait_for,
    write_config,
)

from waypost.testing import make_event


def _post(url: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(url, content=body, headers=signed_headers(body) | headers, timeout=10)


@pytest.mark.parametrize("fmt", ["json", "ndjson", "cloudevents"])
def test_the_http_sink_delivers_every_format_once(
    fmt: str, tmp_path: Path, serve: Any, make_client: Any
) -> None:
    data = tmp_path / "collector"
    served = serve(write_config(tmp_path / "c.yml", base_section(data)))
    tel = make_client(served.url, format=fmt)
    for i in range(25):
        tel.track("run", {"n": i, "note": "mail me at jane@example.org"})
    assert tel.flush(15)
    status = tel.status().sinks[0]
    assert status.delivered == 25 and status.failed == 0
    rows = wait_for(lambda: (r := stored_rows(data)) and len(r) == 25 and r, 20, "25 rows")
    assert sorted(r["properties"]["n"] for r in rows) == list(range(25))
    row = rows[0]
    assert "jane@example.org" not in json.dumps(row)  # scrubbed (by the client, then again)
    assert row["context"]["app"] == {"name": "myapp", "version": "1.2.0"}
    stamp = row["context"]["collector"]
    assert stamp["receipt"] and stamp["received_at"].endswith("Z") and len(stamp["ip_hash"]) == 64
    # The receipt the client logged names the events of its submission.
    receipts = [r for runner in tel.pipeline.runners for r in runner.receipts]
    held = served.collector.ledger.receipt(receipts[0])
    assert held is not None and held["app"] == "myapp"
    assert {e["id"] for e in held["events"]} <= {r["id"] for r in rows}


def test_answer_shape_duplicates_and_control(tmp_path: Path, serve: Any) -> None:
    section = base_section(
        tmp_path / "d",
        control={
            "myapp": {
                "heartbeat_every": "7d",
                "sample": 0.5,
                "versions": {"<1.0": {"pause_until": "2031-01-01T00:00:00Z", "sample": 0.1}},
            }
        },
    )
    served = serve(write_config(tmp_path / "c.yml", section))
    url = served.url + "/v1/myapp/events"
    events = [envelope(name="run") for _ in range(3)]
    body = json.dumps(events).encode()
    first = _post(url, body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert set(answer) == {"receipt", "accepted", "duplicates", "refused", "control"}
    assert answer["accepted"] == 3 and answer["duplicates"] == 0 and answer["refused"] == []
    assert answer["control"] == {"heartbeat_every": 604800.0, "sample": 0.5}
    again = _post(url, body).json()  # the same batch retried
    assert again["accepted"] == 0 and again["duplicates"] == 3
    assert again["receipt"] != answer["receipt"]
    old = [envelope(context={"app": {"name": "myapp", "version": "0.9.1"}})]
    old_body = json.dumps(old).encode()
    control = _post(url, old_body).json()["control"]
    assert control == {
        "heartbeat_every": 604800.0,
        "sample": 0.1,
        "pause_until": "2031-01-01T00:00:00Z",
    }
    alone = httpx.get(
        served.url + "/v1/myapp/control?version=0.5",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert alone.json() == control
    assert httpx.get(served.url + "/v1/myapp/control").status_code == 401
    wait_for(lambda: len(stored_rows(tmp_path / "d")) == 4, 20, "4 rows, each once")


def _refused(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    data: dict[str, Any] = response.json()
    assert data["error"] == reason and data["reason"]
    return data


def test_each_rule_broken_once(tmp_path: Path, serve: Any) -> None:
    section = base_section(tmp_path / "d", limits={"max_body": 32768, "max_events": 5})
    served = serve(write_config(tmp_path / "c.yml", section))
    url = served.url + "/v1/myapp/events"
    body = json.dumps([envelope()]).encode()

    wrong = signed_headers(body, token="tok-wrong-0000000")
    response = httpx.post(url, content=body, headers=wrong)
    _refused(response, 401, "bad_token")
    assert response.headers["www-authenticate"].startswith("Bearer")
    bad_sig = signed_headers(body, secret="another-secret-0000000")
    _refused(httpx.post(url, content=body, headers=bad_sig), 401, "bad_signature")
    stale = signed_headers(body)
    from waypost_http import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

    then = str(int(time.time()) - 3600)
    stale[TIMESTAMP_HEADER], stale[SIGNATURE_HEADER] = then, sign(SECRET, then, body)
    _refused(httpx.post(url, content=body, headers=stale), 401, "bad_signature")
    tampered = signed_headers(body)
    _refused(httpx.post(url, content=body + b" ", headers=tampered), 401, "bad_signature")
    _refused(_post(served.url + "/v1/other/events", body), 404, "unknown_app")
    big = json.dumps([envelope(properties={"x": "y" * 40000})]).encode()
    _refused(_post(url, big), 413, "too_large")

    def chunks() -> Any:  # no Content-Length: the limit holds while streaming
        for _ in range(10):
            yield b" " * 4000

    streamed = signed_headers(b"")
    _refused(httpx.post(url, content=chunks(), headers=streamed), 413, "too_large")
    many = json.dumps([envelope() for _ in range(6)]).encode()
    _refused(_post(url, many), 413, "too_large")
    _refused(_post(url, b"not json"), 400, "malformed")
    _refused(_post(url, b'"a string"'), 400, "malformed")
    _refused(_post(url, body, **{"Content-Type": "text/csv"}), 415, "unsupported_media_type")
    _refused(_post(url, body, **{"Content-Encoding": "br"}), 415, "unsupported_encoding")
    _refused(_post(url, b"\x1f\x8bnot gzip", **{"Content-Encoding": "gzip"}), 400, "malformed")
    # A gzip bomb is stopped at limits.max_decoded, not inflated whole.
    bomb = gzip.compress(b"[" + b" " * (20 * 1024 * 1024) + b"]")
    assert len(bomb) < 32768
    _refused(_post(url, bomb, **{"Content-Encoding": "gzip"}), 413, "too_large")
    assert stored_rows(tmp_path / "d") == []
    totals = wait_for(
        lambda: served.collector.ledger.totals().get("myapp", {}).get("requests_refused"),
        10,
        "the refusals to be counted",
    )
    assert totals["bad_token"] == 1 and totals["bad_signature"] == 3


def test_per_event_refusals_with_schemas(tmp_path: Path, serve: Any) -> None:
    schema = tmp_path / "shop_telemetry.py"
    schema.write_text(
        "from pydantic import Field\nimport waypost\n\n"
        "class Checkout(waypost.Payload, event='checkout'):\n"
        "    items: int = Field(serialization_alias='itemCount')\n"
        "    coupon: str | None = None\n",
        encoding="utf-8",
    )
    section = base_section(tmp_path / "d")
    section["apps"]["myapp"]["schemas"] = ["shop_telemetry"]
    served = serve(write_config(tmp_path / "c.yml", section))
    ok = envelope(name="checkout", properties={"itemCount": 3})
    undeclared_event = envelope(name="browse", properties={})
    undeclared_field = envelope(name="checkout", properties={"itemCount": 1, "user": "x"})
    invalid = envelope(name="checkout", properties={"itemCount": "many"})
    malformed = envelope(timestamp="yesterday")
    heartbeat = envelope(name="heartbeat", properties={"platform": {"counts": {"users": 2}}})
    batch = [ok, undeclared_event, undeclared_field, invalid, malformed, heartbeat, 42]
    answer = _post(served.url + "/v1/myapp/events", json.dumps(batch).encode()).json()
    assert answer["accepted"] == 2
    reasons = {r["id"]: r["reason"] for r in answer["refused"]}
    assert reasons == {
        undeclared_event["id"]: "undeclared_event",
        undeclared_field["id"]: "undeclared_field",
        invalid["id"]: "invalid_field",
        malformed["id"]: "malformed",
        None: "malformed",
    }
    rows = wait_for(lambda: (r := stored_rows(tmp_path / "d")) and len(r) == 2 and r, 20, "2")
    assert {r["name"] for r in rows} == {"checkout", "heartbeat"}
    checkout = next(r for r in rows if r["name"] == "checkout")
    assert checkout["properties"] == {"itemCount": 3}


def test_the_address_is_never_stored_in_plain_form(tmp_path: Path, serve: Any) -> None:
    data = tmp_path / "d"
    section = base_section(data, trusted_proxies=["127.0.0.0/8"])
    served = serve(write_config(tmp_path / "c.yml", section))
    url = served.url + "/v1/myapp/events"
    forwarded = "198.51.100.23"
    events = [envelope(properties={"where": f"from {forwarded}"}) for _ in range(3)]
    body = json.dumps(events).encode()
    response = _post(url, body, **{"X-Forwarded-For": f"203.0.113.77, {forwarded}"})
    assert response.status_code == 200
    rows = wait_for(lambda: (r := stored_rows(data)) and len(r) == 3 and r, 20, "3 rows")
    hashes = {r["context"]["collector"]["ip_hash"] for r in rows}
    assert len(hashes) == 1
    served.collector.spool.stop(5)
    for needle in (forwarded.encode(), b"203.0.113.77", b"127.0.0.1"):
        assert files_containing(data, needle) == [], needle


def test_ip_drop_keeps_nothing(tmp_path: Path, serve: Any) -> None:
    data = tmp_path / "d"
    served = serve(write_config(tmp_path / "c.yml", base_section(data, ip="drop")))
    assert _post(served.url + "/v1/myapp/events", json.dumps([envelope()]).encode()).is_success
    rows = wait_for(lambda: stored_rows(data), 20, "a row")
    assert "ip_hash" not in rows[0]["context"]["collector"]
    assert not (data / "ip-salt.json").exists()


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path: Path, serve: Any) -> None:
    from waypost.privacy import IpHasher

    data = tmp_path / "d"
    served = serve(write_config(tmp_path / "c.yml", base_section(data)))
    body = json.dumps([envelope()]).encode()
    _post(served.url + "/v1/myapp/events", body, **{"X-Forwarded-For": "203.0.113.5"})
    rows = wait_for(lambda: stored_rows(data), 20, "a row")
    hashed = rows[0]["context"]["collector"]["ip_hash"]
    hasher = IpHasher(data / "ip-salt.json")
    assert hasher.matches("127.0.0.1", hashed) and not hasher.matches("203.0.113.5", hashed)


def test_rates(tmp_path: Path, serve: Any) -> None:
    section = base_section(tmp_path / "d", limits={"per_address": "3/m", "per_installation": "4/h"})
    served = serve(write_config(tmp_path / "c.yml", section))
    url = served.url + "/v1/myapp/events"
    first = make_event("run").to_dict()
    batch = [{**first, "id": make_event().id} for _ in range(6)]
    answer = _post(url, json.dumps(batch).encode())
    data = answer.json()
    assert data["accepted"] == 4 and len(data["retry"]) == 2  # past the installation's rate
    assert int(answer.headers["retry-after"]) >= 1
    for _ in range(2):
        _post(url, b"[]")
    limited = _post(url, b"[]")
    _refused(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1


def test_flowforge_ping_becomes_a_ping_event(tmp_path: Path, serve: Any) -> None:
    data = tmp_path / "d"
    section = base_section(data)
    section["apps"]["flowforge"] = {}
    served = serve(write_config(tmp_path / "c.yml", section))
    ping = {
        "instanceId": "0f5c8d6e-2d3b-4a4e-9d11-3c1f0e1a2b3c",
        "os": {"type": "Linux", "release": "6.1", "arch": "x64"},
        "env": {"nodejs": "v18.16.0", "flowforge": "1.8.0"},
        "platform": {"counts": {"users": 4, "teams": 2}, "config": {"driver": "localfs"}},
    }
    response = httpx.post(served.url + "/v1/flowforge/ping", json=ping)
    assert response.status_code == 200 and response.json()["accepted"] == 1
    row = wait_for(lambda: stored_rows(data), 20, "the ping")[0]
    assert row["name"] == "ping" and row["instance_id"] == ping["instanceId"]
    assert row["properties"]["platform"]["counts"] == {"users": 4, "teams": 2}
    assert row["context"]["app"] == {"name": "flowforge", "version": "1.8.0"}
    bad = httpx.post(served.url + "/v1/flowforge/ping", json={"os": {}})
    _refused(bad, 400, "malformed")


def test_health_ready_metrics(tmp_path: Path, serve: Any) -> None:
    served = serve(write_config(tmp_path / "c.yml", base_section(tmp_path / "d")))
    assert httpx.get(served.url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(served.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "problems": []}
    _post(served.url + "/v1/myapp/events", json.dumps([envelope()]).encode())
    httpx.post(served.url + "/v1/myapp/events", content=b"[]")  # no token

    def scraped() -> str | None:
        text = httpx.get(served.url + "/metrics").text
        ok = 'outcome="accepted",reason=""} 1.0' in text and 'reason="bad_token"} 1.0' in text
        return text if ok else None

    text = wait_for(scraped, 10, "the counts in /metrics")
    assert "waypost_collector_ack_seconds_bucket" in text
    assert "waypost_collector_storage_up" in text


def test_readyz_says_when_storage_is_unreachable(tmp_path: Path, serve: Any) -> None:
    from waypost.testing import free_port

    down = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/none"
    section = base_section(
        tmp_path / "d",
        storage={"db": {"type": "sql", "url": down, "create_table": True, "timeout": 1}},
    )
    pytest.importorskip("psycopg")
    served = serve(write_config(tmp_path / "c.yml", section))
    # Accepted into the spool all the same: the answer does not wait for storage.
    answer = _post(served.url + "/v1/myapp/events", json.dumps([envelope()]).encode())
    assert answer.status_code == 200 and answer.json()["accepted"] == 1

    def unready() -> dict[str, Any] | None:
        response = httpx.get(served.url + "/readyz")
        return response.json() if response.status_code == 503 else None

    problems = wait_for(unready, 60, "readyz to report the storage")["problems"]
    assert any("storage 'db'" in p for p in problems)
    assert "pw@" not in json.dumps(problems)
    assert served.collector.spool.depth()["db"]["pending"] == 1
