"""A live Kafka peer for the tests: librdkafka's mock cluster on 127.0.0.1 (no server to install),
read back with a real consumer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from waypost_kafka import KafkaSink
from waypost_kafka.testing import MockCluster

from waypost.plugins import PluginManager
from waypost.sinks import SinkContext
from waypost.testing import make_event

TOPIC = "telemetry.testapp"
INSTANCE = make_event().instance_id


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    """Three mock brokers; the default topic exists with four partitions, replicated three times."""
    with MockCluster(brokers=3) as mock:
        mock.create_topic(TOPIC, partitions=4, replication=3)
        yield mock


@pytest.fixture
def make_sink(cluster: MockCluster, tmp_path: Path) -> Iterator[Callable[..., KafkaSink]]:
    """``make_sink(**settings)``: a kafka sink on the mock cluster, closed after the test."""
    made: list[KafkaSink] = []

    def factory(**settings: Any) -> KafkaSink:
        cls = PluginManager().load_sink_type("kafka")
        config = cls.Config.model_validate(
            {"bootstrap_servers": cluster.bootstrap_servers, "timeout": 5, **settings}
        )
        context = SinkContext(
            app="testapp", version="1.0.0", instance_id=INSTANCE, data_dir=tmp_path, strict=True
        )
        sink = cls("test-kafka", config, context)
        assert isinstance(sink, KafkaSink)
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.close()
