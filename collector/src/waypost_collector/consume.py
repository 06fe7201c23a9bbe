"""``waypost collector consume``: events from a Kafka storage topic into any waypost sink.

A member of a Kafka consumer group (any number of processes share the partitions) reads what
the collector's ``kafka`` storage sink produced, hands it to a sink (``clickhouse``, ``sql``,
``snowflake`` ...) through the core's error boundary, and commits a batch's offsets only once
the sink reported every event of it delivered, or refused for good. What the sink asks to
retry is retried with backoff while the partitions are paused, the group membership kept. A
consumer that dies loses nothing: its uncommitted messages are read again by another member,
and the sinks keep one row per event id.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from waypost.delivery.backoff import Backoff
from waypost.delivery.boundary import call_send
from waypost.errors import ConfigError
from waypost.events import Event
from waypost.sinks import Sink

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message, TopicPartition

log = logging.getLogger("waypost.collector.consume")

__all__ = ["Moved", "Mover", "decode", "make_mover"]


@dataclass
class Moved:
    """What a consumer has done so far."""

    delivered: int = 0
    refused: int = 0
    undecodable: int = 0
    duplicates: int = 0
    retries: int = 0
    commits: int = 0
    last_error: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)


def decode(message: Message) -> Event:
    """The event a message holds: the waypost envelope as JSON, or a CloudEvent around it."""
    doc = json.loads(message.value() or b"")
    if isinstance(doc, dict) and "specversion" in doc and isinstance(doc.get("data"), dict):
        doc = doc["data"]
    if not isinstance(doc, dict):
        raise ValueError("the value is not a JSON object")
    return Event.from_dict(doc)


class Mover:
    """One consumer: reads batches from the topic, delivers them to ``sink``, commits."""

    def __init__(
        self,
        connection: Mapping[str, Any],
        topics: list[str],
        sink: Sink,
        *,
        group: str,
        batch_size: int = 1000,
        max_wait: float = 1.0,
        backoff: Backoff | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.connection = dict(connection)
        self.settings = dict(settings or {})
        self.topics = topics
        self.sink = sink
        self.group = group
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self.moved = Moved()
        self._revoked: set[tuple[str, int]] = set()

    # --- the consumer -----------------------------------------------------------------------

    def _consumer(self) -> Consumer:
        from confluent_kafka import Consumer

        conf = {
            **self.connection,
            "auto.offset.reset": "earliest",
            **self.settings,
            # Fixed: offsets are committed by hand, once the sink has the events.
            "group.id": self.group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
        return Consumer(conf)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoked.update((p.topic, p.partition) for p in partitions)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoked.difference_update((p.topic, p.partition) for p in partitions)

    # --- running ----------------------------------------------------------------------------

    def open_sink(self, stop: threading.Event) -> bool:
        """Open the sink, retrying with backoff until it opens or ``stop`` is set."""
        attempt = 0
        while not stop.is_set():
            try:
                self.sink.open()
                return True
            except Exception as exc:
                attempt += 1
                self.moved.last_error = f"cannot open {self.sink.name!r}: {exc}"
                log.warning("waypost collector consume: %s", self.moved.last_error)
                stop.wait(self.backoff.delay(attempt))
        return False

    def run(self, stop: threading.Event) -> Moved:
        """Move events until ``stop`` is set; the consumer leaves its group at the end."""
        if not self.open_sink(stop):
            return self.moved
        consumer = self._consumer()
        consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not stop.is_set():
                messages = consumer.consume(self.batch_size, self.max_wait)
                if messages:
                    self._move(consumer, messages, stop)
        finally:
            consumer.close()
            self.sink.close()
        return self.moved

    def _move(self, consumer: Consumer, messages: list[Message], stop: threading.Event) -> None:
        from confluent_kafka import KafkaError, TopicPartition

        offsets: dict[tuple[str, int], int] = {}
        batch: dict[str, tuple[tuple[str, int], Event]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    self.moved.last_error = f"consumer: {error.name()}: {error.str()}"
                    log.warning("waypost collector consume: %s", self.moved.last_error)
                continue
            where = (message.topic() or "", message.partition() or 0)
            offsets[where] = max(offsets.get(where, -1), message.offset() or 0)
            try:
                event = decode(message)
            except (ValueError, KeyError, TypeError) as exc:
                # A message no sink can take: counted, logged, and its offset committed.
                self.moved.undecodable += 1
                log.warning(
                    "waypost collector consume: %s[%d]@%s is not a waypost event: %s",
                    where[0], where[1], message.offset(), exc,
                )  # fmt: skip
                continue
            if event.id in batch:
                self.moved.duplicates += 1
            batch[event.id] = (where, event)
        self._deliver(consumer, batch, stop)
        if stop.is_set() and batch:
            return  # not delivered: nothing is committed, another member reads them again
        done = [
            TopicPartition(topic, partition, offset + 1)
            for (topic, partition), offset in offsets.items()
            if (topic, partition) not in self._revoked
        ]
        if not done:
            return
        try:
            consumer.commit(offsets=done, asynchronous=False)
            self.moved.commits += 1
        except Exception as exc:  # a rebalance under way: the next owner reads them again
            self.moved.last_error = f"commit: {exc}"
            log.warning("waypost collector consume: offsets not committed: %s", exc)

    def _deliver(
        self,
        consumer: Consumer,
        batch: dict[str, tuple[tuple[str, int], Event]],
        stop: threading.Event,
    ) -> None:
        """Hand ``batch`` to the sink until every event is delivered or refused; what the sink
        asks to retry waits (partitions paused) and goes again. Empties ``batch``."""
        attempt = 0
        while batch and not stop.is_set():
            events = [event for _, event in batch.values()]
            result, reason, _ = call_send(self.sink, events)
            for event_id, why in result.failed.items():
                if batch.pop(event_id, None) is not None:
                    self.moved.refused += 1
                    self.moved.reasons[why] = self.moved.reasons.get(why, 0) + 1
                    log.error("waypost collector consume: %s refused %s: %s",
                              self.sink.name, event_id, why)  # fmt: skip
            for event_id in list(batch):
                if event_id not in result.retry:
                    batch.pop(event_id)
                    self.moved.delivered += 1
            if not batch:
                return
            attempt += 1
            self.moved.retries += 1
            self.moved.last_error = reason or next(iter(result.retry.values()), "retry")
            log.warning("waypost collector consume: %s: %d events to retry: %s",
                        self.sink.name, len(batch), self.moved.last_error)  # fmt: skip
            self._wait(consumer, self.backoff.delay(attempt, result.retry_after), stop)
            for event_id, (where, _) in list(batch.items()):
                if where in self._revoked:  # another member reads them again
                    batch.pop(event_id)

    def _wait(self, consumer: Consumer, seconds: float, stop: threading.Event) -> None:
        """Wait with the partitions paused, polling, so the group keeps this member."""
        assignment = consumer.assignment()
        if assignment:
            consumer.pause(assignment)
        deadline = time.monotonic() + seconds
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                consumer.poll(min(0.2, max(0.0, deadline - time.monotonic())))
        finally:
            assignment = consumer.assignment()
            if assignment:
                consumer.resume(assignment)


def make_mover(
    config: Any,
    source: str,
    target: str,
    *,
    group: str | None = None,
    batch_size: int = 1000,
    max_wait: float = 1.0,
    settings: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Mover:
    """A mover from the collector config: ``source`` names a ``kafka`` storage sink, ``target``
    a sink of ``destinations`` (or of ``storage``)."""
    from pydantic import ValidationError

    import waypost
    from waypost.config import expand, validation_error
    from waypost_collector.spool import build_storage

    storage = config.storage_specs()
    destinations = config.destination_specs()
    if source not in storage:
        known = ", ".join(storage) or "none"
        raise ConfigError(f"--from {source!r} is not a storage sink (storage: {known})")
    specs = {**storage, **destinations}
    if target not in specs:
        known = ", ".join(specs) or "none"
        raise ConfigError(f"--to {target!r} is not a destination or storage sink ({known})")
    if storage[source].get("type") != "kafka":
        raise ConfigError(f"--from {source!r} is a {storage[source].get('type')} sink, not kafka")
    if target == source:
        raise ConfigError("--from and --to name the same sink")
    try:
        from waypost_kafka import KafkaConfig
    except ImportError:
        raise ConfigError("consume needs the kafka plugin: pip install waypost-kafka") from None
    built = build_storage(
        config, version=waypost.__version__, env=env, specs={target: specs[target]}
    )
    key = f"collector.storage.{source}"
    kafka_settings = {k: v for k, v in storage[source].items() if k != "type"}
    try:
        kafka = KafkaConfig.model_validate(
            expand(kafka_settings, os.environ if env is None else env, key)
        )
    except ValidationError as exc:
        raise validation_error(exc, source=config.source, prefix=key) from None
    return Mover(
        kafka.connection("waypost-collector"),
        kafka.subscription(),
        built[target],
        group=group or f"waypost-collector-{target}",
        batch_size=batch_size,
        max_wait=max_wait,
        settings=settings,
    )
