"""waypost's SinkContract for the kafka sink, with librdkafka's mock cluster as its peer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from waypost_kafka.testing import MockCluster, kafka_peer

from waypost.testing import SinkContract


@pytest.fixture
def waypost_peer() -> Iterator[Any]:
    with MockCluster(brokers=3) as cluster:
        # A secret in the config, so that the contract checks no log line or reason shows it.
        yield kafka_peer(
            cluster,
            timeout=5,
            producer_secrets={"sasl.oauthbearer.client.secret": "oauth-Secret-4711"},
        )


class TestKafkaContract(SinkContract):
    sink_type = "kafka"
    honours_retry_after = False  # Kafka has no Retry-After
