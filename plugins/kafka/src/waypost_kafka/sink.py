"""The ``kafka`` sink: each event one message, confirmed by its own delivery report.

``send`` hands a batch to an idempotent librdkafka producer (``acks=all``) and waits, within the
sink's timeout, for the delivery report of every message of the batch: an event counts as
delivered only when its report says so. Retriable Kafka errors go back to the core for a later
retry; errors that no retry can fix (a message too large, a topic the producer may not write)
fail the event with the error's name.

The producer belongs to the process that made it. A forked child never flushes or destroys the
parent's (librdkafka's threads did not survive the fork, and touching its state could hang): it
makes its own on its first batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from waypost.errors import ConfigError, PluginError
from waypost.events import Event, dumps
from waypost.sinks import SendResult, Sink, SinkConfig, SinkContext, keep_forever
from waypost.sinks.cloudevents import cloudevent
from waypost_kafka.config import KafkaConfig, topic_fields, topic_name

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Producer

__all__ = ["CONTENT_TYPES", "KafkaSink"]

log = logging.getLogger("waypost.sinks.kafka")

CONTENT_TYPES = {
    "json": "application/json",
    "cloudevents": "application/cloudevents+json; charset=UTF-8",
}
"""The ``content-type`` header of each message, per ``format``."""

REPORT_GRACE = 1.5
"""Seconds ``send`` waits past the timeout for reports: librdkafka expires messages on a scan
that runs about once a second, so a report of a timed-out message can come that much later."""

# Local librdkafka errors that a later attempt can overcome (the broker's own errors say so
# through KafkaError.retriable()).
_RETRY_LOCAL = frozenset(
    {
        "_MSG_TIMED_OUT",
        "_TIMED_OUT",
        "_TIMED_OUT_QUEUE",
        "_TRANSPORT",
        "_ALL_BROKERS_DOWN",
        "_PURGE_QUEUE",
        "_PURGE_INFLIGHT",
        "_QUEUE_FULL",
        "_DESTROY",
        "_UNKNOWN_TOPIC",
        "_UNKNOWN_PARTITION",
        "_RESOLVE",
        "_WAIT_COORD",
        "_RETRY",
        "_NODE_UPDATE",
        "_IN_PROGRESS",
        "_PREV_IN_PROGRESS",
        "_STATE",
        "_AUTHENTICATION",
        "_SSL",
    }
)
_TOPIC_CACHE_MAX = 1024

_LIVE: weakref.WeakSet[KafkaSink] = weakref.WeakSet()


class _KafkaErrorLike(Protocol):
    def name(self) -> str: ...
    def str(self) -> str: ...
    def retriable(self) -> bool: ...
    def fatal(self) -> bool: ...


def _after_fork_in_child() -> None:
    for sink in list(_LIVE):
        sink._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Log:
    """librdkafka's log (served on the polling thread) into ``logging``, secrets masked."""

    def __init__(self, mask: Callable[[str], str]) -> None:
        self._mask = mask

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if log.isEnabledFor(level):
            log.log(level, "%s", self._mask(fmt % args if args else fmt))


class KafkaSink(Sink):
    """Produces each event as one message; per-event results from the delivery reports."""

    type = "kafka"
    Config = KafkaConfig
    max_batch_size = 1000
    config: KafkaConfig

    def __init__(self, name: str, config: SinkConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        # Imported and made here, on the thread that builds the sink (the application's), not
        # on a delivery thread; a bad producer setting is a config error at startup.
        try:
            import confluent_kafka
        except ImportError as exc:
            raise PluginError(
                f"the kafka sink needs confluent-kafka: {exc}; pip install waypost-kafka"
            ) from None
        self._kafka = confluent_kafka
        self._secret_values = sorted(self.config.secrets(), key=len, reverse=True)
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._pid = 0
        self._broken: str | None = None  # a fatal producer error: the next batch gets a new one
        self._last_error: str | None = None
        self._topics: dict[tuple[str, str], str] = {}
        self._fixed_topic = None if topic_fields(self.config.topic) else self.config.topic
        self._source = self.config.cloudevents_source or f"/waypost/{context.app}"
        self._content_type = CONTENT_TYPES[self.config.format].encode()
        _LIVE.add(self)
        self._producer = self._make_producer()

    # --- the producer -----------------------------------------------------------------------

    def _make_producer(self) -> Producer:
        conf = self.config.librdkafka(self.context.app)
        conf["error_cb"] = self._on_error
        conf["logger"] = _Log(self._mask)
        try:
            producer = self._kafka.Producer(conf)
        except Exception as exc:
            detail = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else exc
            raise ConfigError(
                f"kafka sink {self.name!r}: librdkafka refused the producer settings: "
                f"{self._mask(str(detail))}",
                key=f"telemetry.sinks.{self.name}",
            ) from None
        self._pid = os.getpid()
        self._broken = None
        return producer

    def _here(self) -> Producer:
        """This process's producer: made anew in a forked child or after a fatal error."""
        with self._lock:
            producer = self._producer
            if producer is not None and self._pid != os.getpid():
                keep_forever(producer)  # the parent's: never flushed or destroyed here
                producer = self._producer = None
            if producer is not None and self._broken is not None:
                _discard(producer)
                producer = self._producer = None
            if producer is None:
                producer = self._producer = self._make_producer()
            return producer

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's error callback (served by ``poll`` on the sending thread)."""
        text = self._mask(f"{error.name()}: {error.str()}")
        self._last_error = text
        if error.fatal():
            self._broken = text
        log.debug("kafka sink %r: %s", self.name, text)

    def _mask(self, text: str) -> str:
        for secret in self._secret_values:
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return text

    # --- messages ---------------------------------------------------------------------------

    def topic(self, event: Event) -> str:
        """The topic of ``event``: a template filled in with the event's name and the name of
        the app that sent it (the sink's own app if the event does not say; a collector
        forwards many apps' events), made a legal topic name."""
        if self._fixed_topic is not None:
            return self._fixed_topic
        app = event.context.get("app")
        app_name = app.get("name") if isinstance(app, dict) else None
        app_name = app_name if isinstance(app_name, str) and app_name else self.context.app
        topic = self._topics.get((app_name, event.name))
        if topic is None:
            topic = topic_name(self.config.topic.format(app=app_name, name=event.name))
            if len(self._topics) < _TOPIC_CACHE_MAX:
                self._topics[(app_name, event.name)] = topic
        return topic

    def key(self, event: Event) -> bytes | None:
        if self.config.key == "instance_id":
            return event.instance_id.encode()
        if self.config.key == "distinct_id":
            return (event.distinct_id or event.instance_id).encode()
        return None

    def document(self, event: Event) -> dict[str, Any]:
        """The message value before encoding: the envelope, or a CloudEvent around it."""
        if self.config.format == "cloudevents":
            return cloudevent(event, self._source, self.config.cloudevents_type_prefix)
        return event.to_dict()

    def headers(self, event: Event) -> list[tuple[str, str | bytes | None]]:
        return [
            ("id", event.id.encode()),
            ("name", event.name.encode()),
            ("content-type", self._content_type),
        ]

    def render(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        return [
            {
                "topic": self.topic(e),
                "key": None if (k := self.key(e)) is None else k.decode(),
                "headers": {name: _text(value) for name, value in self.headers(e)},
                "value": self.document(e),
            }
            for e in events
        ]

    @property
    def destination(self) -> str:
        return f"kafka://{self.config.bootstrap_servers[0]}/{self.config.topic}"

    # --- sending ----------------------------------------------------------------------------

    def send(self, events: Sequence[Event]) -> SendResult:
        producer = self._here()
        result = SendResult()
        reports: dict[str, KafkaError | None] = {}
        waiting: list[Event] = []
        for event in events:
            try:
                value = dumps(self.document(event)).encode()
                topic = self.topic(event)
            except Exception as exc:  # data the encoder cannot take: no retry changes that
                result.mark_failed(event, f"Kafka: cannot encode the event: {exc}")
                continue
            try:
                producer.produce(
                    topic,
                    value,
                    self.key(event),
                    headers=self.headers(event),
                    on_delivery=_report_into(reports, event.id),
                )
            except BufferError:
                result.mark_retry(
                    event, "Kafka: the producer's queue is full (queue.buffering.max.messages)"
                )
                continue
            except self._kafka.KafkaException as exc:
                self._mark(result, event, exc.args[0] if exc.args else None)
                continue
            waiting.append(event)
        deadline = time.monotonic() + self.config.timeout + REPORT_GRACE
        unreported = self._no_report
        while len(reports) < len(waiting):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                producer.poll(min(left, 0.5))
            except self._kafka.KafkaException as exc:  # poll raises a fatal producer error
                unreported = self._stopped(exc)
                break
        for event in waiting:
            if event.id not in reports:
                result.mark_retry(event, unreported())
            elif (error := reports[event.id]) is not None:
                self._mark(result, event, error)
        return result

    def _mark(self, result: SendResult, event: Event, error: _KafkaErrorLike | None) -> None:
        if error is None or not hasattr(error, "name"):
            result.mark_retry(event, f"Kafka: {error!r}")
            return
        name = error.name()
        reason = self._mask(f"Kafka: {name}: {error.str()}")
        if error.fatal() or name == "_FATAL":
            self._broken = reason
            result.mark_retry(event, f"{reason} (the producer is replaced for the retry)")
        elif name == "_MSG_TIMED_OUT":
            result.mark_retry(event, self._no_report())
        elif error.retriable() or name in _RETRY_LOCAL:
            result.mark_retry(event, reason)
        else:
            result.mark_failed(event, reason)

    def _stopped(self, exc: Exception) -> Callable[[], str]:
        """The reason for events left without a report when ``poll`` raised."""
        error = exc.args[0] if exc.args else None
        if error is None or not hasattr(error, "name"):
            text = self._mask(f"Kafka: {type(exc).__name__}: {exc}")
            return lambda: text
        text = self._mask(f"Kafka: {error.name()}: {error.str()}")
        if error.fatal():
            self._broken = text
            text += " (the producer is replaced for the retry)"
        return lambda: text

    def _no_report(self) -> str:
        reason = f"Kafka: not confirmed within {self.config.timeout:g} s"
        if self._last_error:
            reason += f" (last producer error: {self._last_error})"
        return reason

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is None:
            return
        if self._pid != os.getpid():
            keep_forever(producer)
            return
        try:
            producer.flush(min(self.config.timeout, 5.0))
        finally:
            _discard(producer)

    def __repr__(self) -> str:
        return f"<KafkaSink {self.name!r} {self.destination}>"


def _report_into(
    reports: dict[str, KafkaError | None], event_id: str
) -> Callable[[KafkaError | None, Any], None]:
    """A delivery callback that files the report under the event's id (it must not raise)."""

    def report(error: KafkaError | None, _message: Any) -> None:
        reports[event_id] = error

    return report


def _text(value: str | bytes | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


def _discard(producer: Producer) -> None:
    """Drop what the producer still holds and let it go (in the process that made it)."""
    try:
        producer.purge()
        producer.poll(0)
    except Exception:
        pass
