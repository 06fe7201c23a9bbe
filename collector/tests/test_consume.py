"""The collector on a Kafka pipeline: two collectors whose storage is a kafka sink (answering
once Kafka has a batch), librdkafka's mock cluster, two ``waypost collector consume`` processes
loading ClickHouse (the embedded engine), one of them killed mid-run, and every event in
ClickHouse once after dedup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import base_section, wait_for, write_config

pytest.importorskip("waypost_kafka")
pytest.importorskip("waypost_clickhouse")
pytest.importorskip("chdb")

from waypost_kafka.testing import MockCluster

TOPIC = "telemetry.myapp"
PARTITIONS = 4
GROUP = "waypost-collector-clickhouse"


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    with MockCluster(brokers=3) as mock:
        mock.create_topic(TOPIC, partitions=PARTITIONS, replication=3)
        yield mock


def _config(path: Path, data_dir: Path, cluster: MockCluster, engine: Path) -> Path:
    section = base_section(
        data_dir,
        ack="storage",
        # key: none spreads each client's events over the partitions, so both consumers get
        # some (with a key per installation, two clients may land on one consumer's share).
        storage={
            "kafka": {"bootstrap_servers": cluster.bootstrap_servers, "timeout": 10, "key": "none"}
        },
        destinations={"clickhouse": {"dsn": f"chdb://{engine}"}},
    )
    return write_config(path, section)


class Consumer:
    """``waypost collector consume`` in a child process."""

    def __init__(self, config: Path, env: dict[str, str], name: str) -> None:
        self.log = config.parent / f"consume-{name}.log"
        argv = [
            sys.executable, "-c", "import sys; from waypost.cli import main; main(sys.argv[1:])",
            "collector", "consume", "--config", str(config), "--from", "kafka",
            "--to", "clickhouse", "--batch-size", "5", "--max-wait", "0.2",
            "-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=500",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def _committed(cluster: MockCluster) -> int:
    """Messages the consumer group has committed, over every partition."""
    from confluent_kafka import Consumer, TopicPartition

    reader = Consumer(
        {"bootstrap.servers": cluster.bootstrap_servers, "group.id": GROUP, "log_level": 0}
    )
    try:
        parts = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        return sum(max(0, tp.offset) for tp in reader.committed(parts, timeout=10))
    finally:
        reader.close()


def test_two_collectors_kafka_two_consumers_clickhouse_one_killed(
    cluster: MockCluster,
    tmp_path: Path,
    spawn: Callable[..., Any],
    make_client: Callable[..., Any],
    child_env: dict[str, str],
) -> None:
    engine = tmp_path / "clickhouse"
    configs = [
        _config(tmp_path / f"collector-{i}.yml", tmp_path / f"data-{i}", cluster, engine)
        for i in range(2)
    ]
    collectors = [spawn(c) for c in configs]
    clients = [make_client(c.url) for c in collectors]
    per_phase = 100

    def send(phase: int) -> None:
        for n in range(per_phase):
            for i, client in enumerate(clients):
                client.track("run", {"client": i, "phase": phase, "n": n})
        for client in clients:
            assert client.flush(timeout=60)

    total = 2 * per_phase * len(clients)
    first = Consumer(configs[0], child_env, "a")
    second: Consumer | None = None
    try:
        send(0)
        # The first consumer alone moves the first half (commits, so in ClickHouse).
        wait_for(lambda: _committed(cluster) >= total // 2, 180, "the first half committed")
        # A second member joins; the embedded engine is one process's at a time, so it waits
        # (its batches retried, its offsets uncommitted) while the first lives.
        second = Consumer(configs[1], child_env, "b")
        wait_for(lambda: "consuming" in second.tail(), 60, "the second consumer to start")
        send(1)
        first.kill()  # mid-run: the second half is in Kafka, only partly moved at most
        assert _committed(cluster) < total
        wait_for(lambda: _committed(cluster) >= total, 300, "every offset committed")
    except AssertionError as exc:
        logs = f"--- a:\n{first.tail()}\n--- b:\n{second.tail() if second else ''}"
        raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert second is not None and second.proc.returncode == 0, second and second.tail()

    # ack: storage answered each batch once Kafka had it: the topic holds every event.
    ids = {m.event_id for m in cluster.read(TOPIC, count=total, timeout=60)}
    assert len(ids) == total

    import clickhouse_connect

    client = clickhouse_connect.get_client(interface="chdb", path=str(engine))
    try:
        table = "default.waypost_events"
        once = client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]
        stored = {str(r[0]) for r in client.query(f"SELECT id FROM {table}").result_rows}
        per_client_rows = client.query(
            f"SELECT JSONExtractInt(properties, 'client') AS c, uniqExact(id) FROM {table} "
            "GROUP BY c ORDER BY c"
        ).result_rows
    finally:
        client.close()
    assert once == total
    assert stored == ids
    assert [tuple(r) for r in per_client_rows] == [(0, 2 * per_phase), (1, 2 * per_phase)]


def test_a_consumer_skips_what_is_no_event_and_retries_what_the_sink_refuses_for_now(
    cluster: MockCluster, tmp_path: Path
) -> None:
    """In one process: a message that is not a waypost event is counted and its offset
    committed; a sink that asks to retry gets the same events again, and only then are the
    offsets committed."""
    import json
    import threading

    from confluent_kafka import Producer
    from waypost_collector.consume import Mover

    from waypost.errors import RetryableError
    from waypost.plugins import PluginManager
    from waypost.sinks import SinkContext
    from waypost.testing import make_events

    events = make_events(5)
    producer = Producer({"bootstrap.servers": cluster.bootstrap_servers, "log_level": 0})
    producer.produce(TOPIC, b"not json", b"k")
    for event in events:
        producer.produce(TOPIC, json.dumps(event.to_dict()).encode(), b"k")
    assert producer.flush(20) == 0
    out = tmp_path / "moved.jsonl"
    cls = PluginManager().load_sink_type("jsonl")
    context = SinkContext(app="c", version="1", instance_id="", data_dir=tmp_path)
    calls: list[int] = []

    class Flaky(cls):  # type: ignore[misc, valid-type]
        def send(self, batch: Any) -> Any:
            calls.append(len(batch))
            if len(calls) == 1:
                raise RetryableError("not now")
            return super().send(batch)

    sink = Flaky("flaky", cls.Config.model_validate({"path": str(out)}), context)
    mover = Mover(
        {"bootstrap.servers": cluster.bootstrap_servers, "log_level": 0},
        [TOPIC],
        sink,
        group=GROUP,
        batch_size=100,
        max_wait=0.2,
    )
    stop = threading.Event()
    thread = threading.Thread(target=mover.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: _committed(cluster) >= 6, 60, "all six offsets committed")
    finally:
        stop.set()
        thread.join(30)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(e.id for e in events)
    assert mover.moved.undecodable == 1 and mover.moved.retries >= 1
    assert mover.moved.delivered == 5 and calls[0] == calls[1]
