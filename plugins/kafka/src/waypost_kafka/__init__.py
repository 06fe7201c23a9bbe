"""waypost-kafka: delivers waypost events to Kafka through an idempotent producer.

Each event is one message: the envelope as JSON (or a CloudEvent), keyed by the installation so
that its events stay in order, with ``id``, ``name`` and ``content-type`` headers. An event
counts as delivered when its delivery report says so (``acks=all``). See the README.
"""

from __future__ import annotations

from collections.abc import Callable

from waypost import Sink, hookimpl
from waypost_kafka.config import KafkaConfig
from waypost_kafka.sink import CONTENT_TYPES, KafkaSink

__all__ = ["CONTENT_TYPES", "KafkaConfig", "KafkaSink", "register_sinks"]


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(KafkaSink)
