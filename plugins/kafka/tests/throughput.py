"""Events per second through one kafka sink on librdkafka's mock cluster (not a test; run it
with ``uv run python plugins/kafka/tests/throughput.py``). The mock is no benchmark of Kafka:
this measures the sink's own cost per event (encoding, produce, delivery reports)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from waypost_kafka import KafkaConfig, KafkaSink
from waypost_kafka.testing import MockCluster

from waypost.sinks import SinkContext
from waypost.testing import make_events

BATCHES, SIZE = 30, 1000


def main() -> None:
    with MockCluster(brokers=3) as cluster, tempfile.TemporaryDirectory() as data:
        cluster.create_topic("telemetry.bench", partitions=8, replication=3)
        config = KafkaConfig(bootstrap_servers=[cluster.bootstrap_servers])
        context = SinkContext(app="bench", version="1", instance_id="i", data_dir=Path(data))
        sink = KafkaSink("bench", config, context)
        sink.send(make_events(10))  # connected, producer id acquired
        batches = [make_events(SIZE, instance_id=f"install-{i}") for i in range(BATCHES)]
        start = time.perf_counter()
        for batch in batches:
            result = sink.send(batch)
            assert not result.retry and not result.failed, result
        elapsed = time.perf_counter() - start
        sink.close()
        total = BATCHES * SIZE
        print(f"kafka sink: {total / elapsed:,.0f} events/s ({total:,} events, batches of {SIZE})")


if __name__ == "__main__":
    main()
