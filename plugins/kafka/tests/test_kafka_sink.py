"""The kafka sink against librdkafka's mock cluster: what a consumer reads back, per-event
results from delivery reports, broker errors injected into the cluster, ordering per key,
resends after a timeout, secrets and settings."""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from waypost_kafka import KafkaConfig, KafkaSink
from waypost_kafka.testing import MockCluster, ReadMessage

from waypost.errors import ConfigError
from waypost.events import Event
from waypost.sinks import SinkContext
from waypost.testing import free_port, make_event, make_events, send_batch

TOPIC = "telemetry.testapp"
INSTANCE = make_event().instance_id

MakeSink = Callable[..., KafkaSink]


def read(cluster: MockCluster, topic: str = TOPIC, **options: Any) -> list[ReadMessage]:
    options.setdefault("timeout", 20)
    return cluster.read(topic, **options)


def deliver(sink: KafkaSink, events: list[Event], within: float = 30) -> None:
    """Send until every event is delivered, retrying what comes back retryable (as the core
    would; a fresh producer takes a moment to connect on a busy machine)."""
    deadline = time.monotonic() + within
    left = list(events)
    while left:
        result = send_batch(sink, left)
        assert not result.failed, result
        left = [e for e in left if e.id in result.retry]
        assert not left or time.monotonic() < deadline, result


def ids(messages: list[ReadMessage]) -> list[str]:
    """The event id of each message, from its value (checked against its ``id`` header)."""
    for message in messages:
        assert message.json()["id"] == message.event_id
    return [m.event_id for m in messages]


def _config(**settings: Any) -> KafkaConfig:
    return KafkaConfig.model_validate({"bootstrap_servers": "127.0.0.1:9092", **settings})


# --- what the topic receives ------------------------------------------------------------------


def test_a_batch_arrives_as_one_message_per_event(
    cluster: MockCluster, make_sink: MakeSink
) -> None:
    sink = make_sink()
    events = make_events(20, distinct_id="user-1")
    result = send_batch(sink, events)
    assert not result.retry and not result.failed, result
    messages = read(cluster, count=20)
    assert sorted(ids(messages)) == sorted(e.id for e in events)
    first = next(m for m in messages if m.headers["id"] == events[0].id.encode())
    assert json.loads(first.value) == events[0].to_dict()
    assert first.headers == {
        "id": events[0].id.encode(),
        "name": b"test_event",
        "content-type": b"application/json",
    }
    assert first.key == INSTANCE.encode()
    assert json.loads(first.value)["distinct_id"] == "user-1"


def test_cloudevents_format(cluster: MockCluster, make_sink: MakeSink) -> None:
    sink = make_sink(format="cloudevents")
    event = make_event("signup", {"plan": "pro"})
    assert not send_batch(sink, [event]).failed
    (message,) = read(cluster, count=1)
    value = json.loads(message.value)
    assert message.headers["content-type"] == b"application/cloudevents+json; charset=UTF-8"
    assert value["specversion"] == "1.0" and value["id"] == event.id
    assert value["type"] == "waypost.signup" and value["source"] == "/waypost/testapp"
    assert value["data"] == event.to_dict()


def test_topic_templates(cluster: MockCluster, make_sink: MakeSink) -> None:
    sink = make_sink(topic="{app}.{name}")
    events = [make_event("signup"), make_event("$pageview"), make_event("signup")]
    assert not send_batch(sink, events).retry
    signups = read(cluster, "testapp.signup", count=2)
    pageviews = read(cluster, "testapp._pageview", count=1)  # '$' is not legal in a topic
    assert sorted(ids(signups)) == sorted([events[0].id, events[2].id])
    assert ids(pageviews) == [events[1].id]


@pytest.mark.parametrize(
    ("key", "expected"),
    [("instance_id", INSTANCE.encode()), ("distinct_id", b"u-9"), ("none", None)],
)
def test_key_choice(
    cluster: MockCluster, make_sink: MakeSink, key: str, expected: bytes | None
) -> None:
    sink = make_sink(key=key)
    assert not send_batch(sink, [make_event(distinct_id="u-9")]).retry
    (message,) = read(cluster, count=1)
    assert message.key == expected


def test_events_of_one_installation_stay_in_order(
    cluster: MockCluster, make_sink: MakeSink
) -> None:
    """Three installations interleaved over several batches, with leader errors injected while
    they are produced: each installation's events land on one partition, in the order sent."""
    sink = make_sink(producer={"linger.ms": 20})
    sent: dict[str, list[str]] = collections.defaultdict(list)
    for batch in range(4):
        events = [make_event(instance_id=f"install-{i % 3}") for i in range(30)]
        if batch == 1:  # the next produce requests fail; the idempotent producer retries in order
            cluster.push_errors("produce", "NOT_LEADER_FOR_PARTITION", "REQUEST_TIMED_OUT")
        result = send_batch(sink, events)
        assert not result.retry and not result.failed, result
        for event in events:
            sent[event.instance_id].append(event.id)
    messages = read(cluster, count=120)
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    partitions: dict[str, set[int]] = collections.defaultdict(set)
    for message in sorted(messages, key=lambda m: (m.partition, m.offset)):
        assert message.key is not None
        by_key[message.key.decode()].append(json.loads(message.value)["id"])
        partitions[message.key.decode()].add(message.partition)
    assert by_key == sent
    assert all(len(p) == 1 for p in partitions.values()), partitions


# --- results from delivery reports ------------------------------------------------------------


def test_retriable_broker_errors_are_overcome_within_the_timeout(
    cluster: MockCluster, make_sink: MakeSink
) -> None:
    sink = make_sink()
    cluster.push_errors(
        "produce", "NOT_ENOUGH_REPLICAS", "NOT_ENOUGH_REPLICAS", "LEADER_NOT_AVAILABLE"
    )
    events = make_events(3)
    result = send_batch(sink, events)
    assert not result.retry and not result.failed, result
    assert sorted(ids(read(cluster, count=3))) == sorted(e.id for e in events)


@pytest.mark.parametrize(
    "error", ["MSG_SIZE_TOO_LARGE", "TOPIC_AUTHORIZATION_FAILED", "INVALID_RECORD"]
)
def test_errors_no_retry_can_fix_fail_the_events_with_their_name(
    cluster: MockCluster, make_sink: MakeSink, error: str
) -> None:
    sink = make_sink()
    cluster.push_errors("produce", error)
    events = make_events(2)
    result = send_batch(sink, events)
    assert set(result.failed) == {e.id for e in events}, result
    assert all(error in reason for reason in result.failed.values())
    assert not result.retry
    if error == "TOPIC_AUTHORIZATION_FAILED":
        # librdkafka keeps the topic refused until its next metadata refresh: the events of
        # the next batch fail at once, with the same name.
        later_result = send_batch(sink, make_events(1))
        assert all(error in reason for reason in later_result.failed.values()), later_result
        return
    later = make_events(2)  # a refused message does not stop the producer
    assert not send_batch(sink, later).failed
    assert sorted(ids(read(cluster, count=2))) == sorted(e.id for e in later)


def test_a_fatal_producer_error_retries_the_events_with_a_new_producer(
    cluster: MockCluster, make_sink: MakeSink
) -> None:
    """A sequence desynchronisation is fatal to an idempotent producer: its events are not at
    fault, so they go back for retry, and the next batch is sent by a fresh producer."""
    sink = make_sink()
    deliver(sink, make_events(1))
    cluster.push_errors("produce", "OUT_OF_ORDER_SEQUENCE_NUMBER")
    events = make_events(2)
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events}, result
    assert all("OUT_OF_ORDER_SEQUENCE_NUMBER" in r for r in result.retry.values())
    assert not result.failed
    deliver(sink, events)  # the core's retry
    assert set(events_ids := [e.id for e in events]) <= set(ids(read(cluster, idle=2)))
    assert len(events_ids) == 2


def test_brokers_down_is_retryable_within_the_timeout(
    cluster: MockCluster, make_sink: MakeSink
) -> None:
    sink = make_sink(timeout=1)
    before = make_events(1)
    deliver(sink, before)  # connected first
    cluster.broker_down()
    events = make_events(3)
    result = send_batch(sink, events)
    assert set(result.retry) == {e.id for e in events}, result
    assert all("not confirmed within 1 s" in r for r in result.retry.values())
    cluster.broker_up()
    deliver(sink, events)  # what the core does later, once the brokers are back
    # Nothing left the producer while the brokers were down: each event arrives once.
    assert sorted(ids(read(cluster, idle=2))) == sorted(e.id for e in [*before, *events])


def test_unreachable_bootstrap_is_retryable(tmp_path: Path) -> None:
    config = _config(bootstrap_servers=f"127.0.0.1:{free_port()}", timeout=1)
    context = SinkContext(app="testapp", version="1", instance_id=INSTANCE, data_dir=tmp_path)
    sink = KafkaSink("down", config, context)
    try:
        events = make_events(2)
        result = send_batch(sink, events)
        assert set(result.retry) == {e.id for e in events}, result
        assert any("Connection refused" in r for r in result.retry.values()), result
    finally:
        sink.close()


def test_a_resend_after_a_timeout_is_a_duplicate_id_the_consumer_can_drop(
    cluster: MockCluster, make_sink: MakeSink
) -> None:
    """A broker slower than the timeout: the events are retried (never reported delivered),
    yet the broker appends the first copies late. The consumer sees each id twice and keeps
    one per id."""
    sink = make_sink(timeout=1)
    deliver(sink, make_events(1))
    cluster.set_rtt(2500)
    events = make_events(5)
    first = send_batch(sink, events)
    assert set(first.retry) == {e.id for e in events}, first
    cluster.set_rtt(0)
    second = send_batch(sink, events)
    assert not second.retry and not second.failed, second
    copies = collections.Counter(ids(read(cluster, count=11, idle=2)))
    assert {i: copies[i] for i in (e.id for e in events)} == {e.id: 2 for e in events}
    assert len(set(copies)) == 6  # after dedup by id: every event once


def test_a_full_producer_queue_retries_the_rest(cluster: MockCluster, make_sink: MakeSink) -> None:
    sink = make_sink(producer={"queue.buffering.max.messages": 5})
    events = make_events(12)
    result = send_batch(sink, events)
    assert result.retry, result
    assert all("queue is full" in r for r in result.retry.values())
    delivered = [e.id for e in events if e.id not in result.retry]
    assert len(delivered) >= 5
    assert sorted(ids(read(cluster, count=len(delivered)))) == sorted(delivered)


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("producer", "message"),
    [
        ({"enable.idempotence": False}, "always idempotent"),
        ({"acks": 1}, "acks is always all"),
        ({"transactional.id": "x"}, "transactions are not used"),
        ({"retries": 0}, "needs retries"),
        ({"max.in.flight.requests.per.connection": 10}, "at most 5"),
        ({"bootstrap.servers": "x:1"}, "set bootstrap_servers instead"),
        ({"message.timeout.ms": 100}, "set timeout"),
        ({"sasl.password": "hunter22"}, "set sasl_password instead"),
        ({"ssl.keystore.password": "hunter22"}, "put it under producer_secrets"),
        ({"sasl.oauthbearer.client.secret": "s3cr3t-v4lue"}, "put it under producer_secrets"),
    ],
)
def test_producer_settings_that_break_the_guarantees_are_refused(
    producer: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        _config(producer=producer)
    for value in producer.values():
        if isinstance(value, str) and len(value) > 4:
            assert value not in str(info.value)


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="acks"):
        _config(acks="1")
    with pytest.raises(ValidationError, match="it may use"):
        _config(topic="t.{version}")
    with pytest.raises(ValidationError, match="not a legal Kafka topic"):
        _config(topic="bad topic")
    with pytest.raises(ValidationError, match="not host:port"):
        _config(bootstrap_servers="broker")
    with pytest.raises(ValidationError, match="unencrypted"):
        _config(bootstrap_servers="kafka.example.org:9092")
    with pytest.raises(ValidationError, match="needs sasl_username"):
        _config(security_protocol="sasl_ssl")
    remote = _config(
        bootstrap_servers="kafka.example.org:9093", sasl_username="u", sasl_password="p"
    )
    assert remote.protocol == "sasl_ssl"
    servers = _config(bootstrap_servers="127.0.0.1:1, localhost:2").bootstrap_servers
    assert servers == ["127.0.0.1:1", "localhost:2"]
    assert _config(bootstrap_servers="kafka.internal:9092", allow_plaintext=True).protocol == (
        "plaintext"
    )


def test_a_setting_librdkafka_refuses_is_a_config_error_at_startup(tmp_path: Path) -> None:
    config = _config(producer={"no.such.property": 1})
    context = SinkContext(app="testapp", version="1", instance_id=INSTANCE, data_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"no\.such\.property"):
        KafkaSink("bad", config, context)


def test_passed_through_settings_reach_the_producer(tmp_path: Path) -> None:
    config = _config(producer={"linger.ms": 50, "enable.gapless.guarantee": True})
    conf = config.librdkafka("testapp")
    assert conf["linger.ms"] == "50" and conf["enable.gapless.guarantee"] == "true"
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["message.timeout.ms"] == 10_000


# --- secrets --------------------------------------------------------------------------------


def test_secrets_never_reach_logs_reasons_or_reprs(
    cluster: MockCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SASL against the mock (which does not speak SASL: authentication fails, as against a
    broker with a wrong password), with librdkafka's full debug log on."""
    password, key_password, other = "pw-Secret-4711", "key-Secret-0815", "oauth-Secret-42"
    caplog.set_level(logging.DEBUG)
    config = KafkaConfig.model_validate(
        {
            "bootstrap_servers": cluster.bootstrap_servers,
            "timeout": 2,
            "security_protocol": "sasl_plaintext",
            "sasl_username": "telemetry",
            "sasl_password": password,
            "ssl_key_password": key_password,
            "producer_secrets": {"sasl.oauthbearer.client.secret": other},
            "producer": {"log_level": 7, "debug": "all"},
        }
    )
    context = SinkContext(app="testapp", version="1", instance_id=INSTANCE, data_dir=tmp_path)
    sink = KafkaSink("secret", config, context)
    try:
        result = send_batch(sink, make_events(2))
        assert result.retry and all("_AUTHENTICATION" in r for r in result.retry.values())
        texts = [repr(sink), str(config), repr(config), config.model_dump_json(), repr(result)]
        texts += [json.dumps(sink.render(make_events(1))), sink.destination, caplog.text]
    finally:
        sink.close()
    assert "sasl.password" in caplog.text  # librdkafka did log its configuration
    for secret in (password, key_password, other):
        for text in texts:
            assert secret not in text, text[:300]


def test_render_shows_what_would_be_sent(make_sink: MakeSink) -> None:
    sink = make_sink(key="distinct_id")
    event = make_event("signup", {"plan": "pro"}, distinct_id="u-1")
    (rendered,) = sink.render([event])
    assert rendered == {
        "topic": TOPIC,
        "key": "u-1",
        "headers": {"id": event.id, "name": "signup", "content-type": "application/json"},
        "value": event.to_dict(),
    }
    assert sink.destination == f"kafka://{sink.config.bootstrap_servers[0]}/telemetry.{{app}}"


def test_close_is_clean(make_sink: MakeSink) -> None:
    sink = make_sink()
    send_batch(sink, make_events(1))
    sink.close()
    sink.close()
    assert not send_batch(sink, make_events(1)).retry  # reopens if used again


def test_app_in_a_topic_is_the_app_that_sent_the_event(
    cluster: MockCluster, make_sink: MakeSink
) -> None:
    """A collector forwards many apps' events: ``{app}`` is each event's own app."""
    sink = make_sink(topic="telemetry.{app}")
    other = make_event("run")
    other.context = {**other.context, "app": {"name": "flowforge", "version": "2.0"}}
    mine = make_event("run")
    assert not send_batch(sink, [other, mine]).retry
    assert ids(read(cluster, "telemetry.flowforge", count=1)) == [other.id]
    assert mine.id in ids(read(cluster, TOPIC, count=1))


def test_a_consumer_subscribes_to_what_the_template_makes() -> None:
    import re as _re

    assert _config(topic="events").subscription() == ["events"]
    (pattern,) = _config(topic="telemetry.{app}.{name}").subscription()
    assert pattern.startswith("^")
    assert _re.match(pattern, "telemetry.myapp._pageview")
    assert not _re.match(pattern, "other.myapp.run")


def test_a_consumer_gets_the_connection_settings_only() -> None:
    config = _config(
        bootstrap_servers="kafka.example.org:9093",
        sasl_username="u",
        sasl_password="p-123",
        producer={"linger.ms": 5, "ssl.endpoint.identification.algorithm": "none"},
    )
    conf = config.connection("testapp")
    assert conf["sasl.password"] == "p-123" and conf["security.protocol"] == "sasl_ssl"
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert "linger.ms" not in conf and "enable.idempotence" not in conf
