"""Scale out for real: Debian's haproxy or nginx in front of three ``waypost collector serve``
processes that share nothing but a PostgreSQL, a fleet of 50 installations sending through
waypost's http sink, one collector killed with ``kill -9`` in the middle and restarted. Every
event is stored exactly once."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import base_section, wait_for, write_config

from waypost.testing import free_port

pytestmark = pytest.mark.server

INSTALLATIONS = 50
EVENTS_EACH = 40
BALANCERS = {"haproxy": "/usr/sbin/haproxy", "nginx": "/usr/sbin/nginx"}


def _haproxy(path: Path, port: int, backends: list[int]) -> list[str]:
    servers = "\n".join(
        f"    server c{i} 127.0.0.1:{p} check inter 500 fall 3 rise 1"
        for i, p in enumerate(backends)
    )
    path.write_text(
        f"""global
    maxconn 1024
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A health check may take this long: left unset it is inter (500 ms), and a busy machine's
    # slow /readyz took every collector out of the pool ("No server is available").
    timeout check 5s
    option forwardfor
    option redispatch
    retries 3
    retry-on conn-failure empty-response response-timeout 503
frontend telemetry
    bind 127.0.0.1:{port}
    default_backend collectors
backend collectors
    balance roundrobin
    option httpchk GET /readyz
{servers}
""",
        encoding="utf-8",
    )
    return [BALANCERS["haproxy"], "-db", "-f", str(path)]


def _nginx(path: Path, port: int, backends: list[int]) -> list[str]:
    prefix = path.parent / "nginx"
    prefix.mkdir(exist_ok=True)
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in backends
    )
    path.write_text(
        f"""daemon off;
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 2m;
    upstream collectors {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://collectors;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_connect_timeout 2s;
        }}
    }}
}}
""",
        encoding="utf-8",
    )
    return [BALANCERS["nginx"], "-p", str(prefix), "-c", str(path)]


@pytest.fixture
def balancer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """``balancer(kind, backend_ports)`` runs haproxy or nginx on a free port; its URL."""
    running: list[subprocess.Popen[bytes]] = []

    def start(kind: str, backends: list[int]) -> str:
        binary = BALANCERS[kind]
        if not Path(binary).exists() and shutil.which(kind) is None:
            if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
                pytest.fail(f"{binary} is missing (WAYPOST_REQUIRE_SERVERS=1 forbids skipping)")
            pytest.skip(f"{kind} is not installed: apt-get install {kind}")
        port = free_port()
        make = _haproxy if kind == "haproxy" else _nginx
        argv = make(tmp_path / f"{kind}.conf", port, backends)
        log = open(tmp_path / f"{kind}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        running.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / f"{kind}.log").read_text())
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, f"{kind} to answer")
        return url

    yield start
    for proc in running:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _stored(postgres_url: str, table: str) -> list[tuple[str, str, int]]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg://"), poolclass=NullPool
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(f"SELECT id, properties->>'inst', (properties->>'n')::int FROM {table}")
            )
            return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]
    except sa.exc.DBAPIError:  # the table is made by the first write
        return []
    finally:
        engine.dispose()


def _accepted(collector: Any) -> float:
    """The events a collector accepted, from its /metrics (its ledger's counts)."""
    try:
        metrics = httpx.get(collector.url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("waypost_collector_events_total{")
        and 'outcome="accepted"' in line
        and 'app="myapp"' in line
    )


@pytest.mark.parametrize("kind", ["haproxy", "nginx"])
def test_fleet_behind_a_load_balancer_with_a_collector_killed(
    kind: str,
    tmp_path: Path,
    postgres_url: str,
    spawn: Any,
    balancer: Any,
    make_client: Any,
) -> None:
    pytest.importorskip("psycopg")
    table = f"fleet_{kind}_{os.getpid()}"
    storage = {"db": {"type": "sql", "url": postgres_url, "table": table, "create_table": True}}
    collectors = []
    for i in range(3):
        section = base_section(
            tmp_path / f"data-{i}",
            storage=storage,
            trusted_proxies=["127.0.0.0/8"],
            limits={"per_address": None, "per_installation": None},
        )
        collectors.append(spawn(write_config(tmp_path / f"c{i}.yml", section)))
    url = balancer(kind, [c.port for c in collectors])

    fleet = [
        make_client(url, version=f"1.{i % 4}.0", batch_size=5, timeout=5)
        for i in range(INSTALLATIONS)
    ]
    progress = {"tracked": 0}
    lock = threading.Lock()

    def installation(i: int) -> None:
        tel = fleet[i]
        for n in range(EVENTS_EACH):
            tel.track("run", {"inst": f"i{i}", "n": n})
            with lock:
                progress["tracked"] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=installation, args=(i,)) for i in range(INSTALLATIONS)]
    for thread in threads:
        thread.start()
    total = INSTALLATIONS * EVENTS_EACH
    wait_for(lambda: progress["tracked"] >= total // 3, 120, "a third of the events")
    # Tracked is not delivered: on a busy machine the fleet's first batches may not have reached
    # the victim yet, and a collector killed before it took any would take part in nothing.
    wait_for(lambda: all(_accepted(c) for c in collectors), 120, "every collector to take some")
    victim = collectors[1]
    victim.kill()  # kill -9, mid-run: requests in flight are cut
    wait_for(lambda: progress["tracked"] >= total * 2 // 3, 120, "two thirds of the events")
    victim.start()
    for thread in threads:
        thread.join(120)
    for tel in fleet:
        assert tel.flush(120), tel.status().sinks[0]

    def all_stored() -> list[tuple[str, str, int]] | None:
        rows = _stored(postgres_url, table)
        return rows if len({(inst, n) for _, inst, n in rows}) >= total else None

    rows = wait_for(all_stored, 120, f"{total} events in PostgreSQL")

    def drained() -> bool:
        # A batch the killed collector held, or one that two collectors both took (a client
        # retried after its answer was lost), is handed over late: wait for every spool.
        for collector in collectors:
            for line in httpx.get(collector.url + "/metrics").text.splitlines():
                pending = line.startswith("waypost_collector_spool_rows{") and "pending" in line
                if pending and float(line.rsplit(" ", 1)[1]) > 0:
                    return False
        return True

    wait_for(drained, 180, "every spool to hand over to storage")
    rows = _stored(postgres_url, table)
    assert len(rows) == total, "an event was stored twice"
    assert {(inst, n) for _, inst, n in rows} == {
        (f"i{i}", n) for i in range(INSTALLATIONS) for n in range(EVENTS_EACH)
    }
    assert len({event_id for event_id, _, _ in rows}) == total
    for collector in collectors:  # each took part (the ledger outlives the restart)
        assert _accepted(collector) > 0, collector.url
