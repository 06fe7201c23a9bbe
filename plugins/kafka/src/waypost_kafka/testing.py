"""A Kafka cluster for tests: librdkafka's own mock cluster, driven through its C API.

librdkafka (bundled with confluent-kafka) can run a mock cluster of any number of brokers inside
the process, listening on 127.0.0.1; real producers and consumers connect to it over TCP as to
any broker. confluent-kafka does not expose the cluster's controls, so this module calls them
through ``ctypes``: topics, broker errors pushed onto a request type, brokers down and up,
round-trip delays. The API is librdkafka's "experimental" mock API (``rdkafka_mock.h``).

    with MockCluster(brokers=3) as cluster:
        cluster.create_topic("telemetry.app", partitions=4)
        cluster.push_errors("produce", "NOT_ENOUGH_REPLICAS", "REQUEST_TIMED_OUT")
        messages = read_topic(cluster.bootstrap_servers, "telemetry.app", count=10)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["API_KEYS", "MockCluster", "ReadMessage", "error_code", "kafka_peer", "read_topic"]

API_KEYS = {
    "produce": 0,
    "fetch": 1,
    "list_offsets": 2,
    "metadata": 3,
    "offset_commit": 8,
    "offset_fetch": 9,
    "find_coordinator": 10,
    "join_group": 11,
    "heartbeat": 12,
    "sync_group": 14,
    "api_versions": 18,
    "init_producer_id": 22,
}
"""Kafka protocol request types by name, for :meth:`MockCluster.push_errors`."""

_RD_KAFKA_PRODUCER = 0


def _library_path() -> str:
    """The librdkafka that confluent-kafka loaded (the same copy, so one set of globals)."""
    import confluent_kafka

    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if "librdkafka" in os.path.basename(path):
                    return path
    except OSError:
        pass
    base = os.path.dirname(confluent_kafka.__file__)
    for pattern in (base + ".libs/librdkafka*", base + "/.dylibs/librdkafka*"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    named = ctypes.util.find_library("rdkafka")
    if named is None:
        raise RuntimeError("librdkafka not found (is confluent-kafka installed?)")
    return named


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(_library_path())
    vp, cp, i16, i32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int16, ctypes.c_int32
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "rd_kafka_conf_new": (vp, []),
        "rd_kafka_conf_set": (ctypes.c_int, [vp, cp, cp, cp, ctypes.c_size_t]),
        "rd_kafka_new": (vp, [ctypes.c_int, vp, cp, ctypes.c_size_t]),
        "rd_kafka_destroy": (None, [vp]),
        "rd_kafka_mock_cluster_new": (vp, [vp, ctypes.c_int]),
        "rd_kafka_mock_cluster_destroy": (None, [vp]),
        "rd_kafka_mock_cluster_bootstraps": (cp, [vp]),
        "rd_kafka_mock_topic_create": (ctypes.c_int, [vp, cp, ctypes.c_int, ctypes.c_int]),
        "rd_kafka_mock_push_request_errors_array": (
            None,
            [vp, i16, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)],
        ),
        "rd_kafka_mock_clear_request_errors": (None, [vp, i16]),
        "rd_kafka_mock_broker_set_down": (ctypes.c_int, [vp, i32]),
        "rd_kafka_mock_broker_set_up": (ctypes.c_int, [vp, i32]),
        "rd_kafka_mock_broker_set_rtt": (ctypes.c_int, [vp, i32, ctypes.c_int]),
        "rd_kafka_mock_partition_set_leader": (ctypes.c_int, [vp, cp, i32, i32]),
        "rd_kafka_err2name": (cp, [ctypes.c_int]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def error_code(error: int | str) -> int:
    """A Kafka error code from its number or its name (``NOT_ENOUGH_REPLICAS``, ``_TRANSPORT``)."""
    if isinstance(error, int):
        return error
    from confluent_kafka import KafkaError

    code = getattr(KafkaError, error.upper(), None)
    if not isinstance(code, int):
        raise ValueError(f"unknown Kafka error name {error!r}")
    return code


class MockCluster:
    """librdkafka's mock cluster: ``brokers`` brokers on 127.0.0.1, for as long as it is open."""

    def __init__(self, brokers: int = 3) -> None:
        self._lib = _load()
        errstr = ctypes.create_string_buffer(512)
        conf = self._lib.rd_kafka_conf_new()
        for key, value in (("log_level", "0"), ("client.id", "waypost-mock-cluster")):
            self._lib.rd_kafka_conf_set(conf, key.encode(), value.encode(), errstr, 512)
        # The cluster needs a client instance for its book keeping; this one sends nothing.
        self._rk = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, 512)
        if not self._rk:
            raise RuntimeError(f"librdkafka: {errstr.value.decode()}")
        self._cluster = self._lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._cluster:
            self._lib.rd_kafka_destroy(self._rk)
            raise RuntimeError("librdkafka could not start a mock cluster")
        self.brokers = brokers
        self.bootstrap_servers: str = self._lib.rd_kafka_mock_cluster_bootstraps(
            self._cluster
        ).decode()

    def _check(self, code: int, what: str) -> None:
        if code:
            name = self._lib.rd_kafka_err2name(code).decode()
            raise RuntimeError(f"mock cluster: {what} failed: {name}")

    def create_topic(self, topic: str, partitions: int = 1, replication: int = 1) -> None:
        code = self._lib.rd_kafka_mock_topic_create(
            self._cluster, topic.encode(), partitions, min(replication, self.brokers)
        )
        self._check(code, f"creating topic {topic}")

    def push_errors(self, api: str | int, *errors: int | str) -> None:
        """The next ``len(errors)`` requests of type ``api`` (a name of :data:`API_KEYS` or a
        number) fail with these errors, in order, whichever broker gets them. ``_TRANSPORT``
        makes the broker drop the connection instead."""
        key = API_KEYS[api] if isinstance(api, str) else api
        codes = (ctypes.c_int * len(errors))(*(error_code(e) for e in errors))
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster, key, len(errors), codes)

    def clear_errors(self, api: str | int) -> None:
        key = API_KEYS[api] if isinstance(api, str) else api
        self._lib.rd_kafka_mock_clear_request_errors(self._cluster, key)

    def broker_down(self, broker: int = -1) -> None:
        """Disconnect a broker (1..brokers; -1 for all) and refuse new connections."""
        self._check(self._lib.rd_kafka_mock_broker_set_down(self._cluster, broker), "down")

    def broker_up(self, broker: int = -1) -> None:
        self._check(self._lib.rd_kafka_mock_broker_set_up(self._cluster, broker), "up")

    def set_rtt(self, milliseconds: int, broker: int = -1) -> None:
        """Delay every answer of a broker (-1: all) by ``milliseconds``."""
        code = self._lib.rd_kafka_mock_broker_set_rtt(self._cluster, broker, milliseconds)
        self._check(code, "setting the round-trip time")

    def set_leader(self, topic: str, partition: int, broker: int) -> None:
        code = self._lib.rd_kafka_mock_partition_set_leader(
            self._cluster, topic.encode(), partition, broker
        )
        self._check(code, "setting a partition leader")

    def read(self, topics: str | list[str], **options: Any) -> list[ReadMessage]:
        """What a consumer reads back from the start of ``topics`` (see :func:`read_topic`)."""
        return read_topic(self.bootstrap_servers, topics, **options)

    def close(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster:
            self._lib.rd_kafka_mock_cluster_destroy(cluster)
            self._lib.rd_kafka_destroy(self._rk)

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class ReadMessage:
    """One message as a consumer read it back."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)

    @property
    def event_id(self) -> str:
        """The waypost event id, from the ``id`` header (the dedup key)."""
        return self.headers["id"].decode()

    def json(self) -> Any:
        return json.loads(self.value)


def read_topic(
    bootstrap_servers: str,
    topics: str | list[str],
    *,
    count: int | None = None,
    timeout: float = 20.0,
    idle: float = 1.0,
    group: str | None = None,
) -> list[ReadMessage]:
    """Read ``topics`` from the beginning with a real consumer: until ``count`` messages came
    (or, without ``count``, until nothing new came for ``idle`` seconds), at most ``timeout``.
    With ``group``, as a member of that consumer group (committing nothing)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group or f"waypost-test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    names = [topics] if isinstance(topics, str) else topics
    if group is None:  # every partition from the start, without a group to join (faster)
        wanted = []
        for topic in names:
            found = consumer.list_topics(topic, timeout=timeout).topics[topic]
            wanted += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in found.partitions]
        consumer.assign(wanted)
    else:
        consumer.subscribe(names)
    got: list[ReadMessage] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if count is not None and len(got) >= count:
                break
            if count is None and got and time.monotonic() - last > idle:
                break
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise RuntimeError(f"consumer: {error.name()}: {error.str()}")
            last = time.monotonic()
            raw = message.headers() or []
            pairs = raw.items() if isinstance(raw, dict) else raw
            got.append(
                ReadMessage(
                    topic=message.topic() or "",
                    partition=message.partition() or 0,
                    offset=message.offset() or 0,
                    key=message.key(),
                    value=message.value() or b"",
                    headers={k: v.encode() if isinstance(v, str) else v or b"" for k, v in pairs},
                )
            )
    finally:
        consumer.close()
    return got


def _arrival(message: ReadMessage) -> Any:
    from waypost.testing.peer import Arrival

    try:
        doc = message.json()
        if isinstance(doc, dict) and "specversion" in doc:
            doc = doc.get("data") or {}
        return Arrival(message.event_id, doc.get("name"), doc.get("properties"))
    except (ValueError, KeyError, AttributeError):
        return Arrival(message.event_id)


def kafka_peer(cluster: MockCluster, topic: str = "telemetry.testapp", **settings: Any) -> Any:
    """The mock cluster as :class:`waypost.testing.Peer` of a ``kafka`` sink, for
    ``SinkContract``: refusals and retryable failures are broker errors pushed onto Produce
    requests (or the brokers taken down), a slow answer is a round-trip delay, and what
    arrived is read back with a consumer."""
    from waypost.testing.peer import BasePeer, PeerCannot
    from waypost.testing.server import free_port

    class KafkaPeer(BasePeer):
        name = "librdkafka's mock cluster"
        _PERMANENT = ("MSG_SIZE_TOO_LARGE", "INVALID_RECORD")
        _RETRYABLE = ("NOT_ENOUGH_REPLICAS", "brokers down")

        def config(self) -> dict[str, Any]:
            return {"bootstrap_servers": cluster.bootstrap_servers, "topic": topic, **settings}

        def unreachable_config(self) -> dict[str, Any]:
            return {"bootstrap_servers": f"127.0.0.1:{free_port()}", "topic": topic, **settings}

        def deliver(self) -> None:
            cluster.clear_errors("produce")
            cluster.set_rtt(0)
            cluster.broker_up()

        def permanent_failures(self) -> tuple[str, ...]:
            return self._PERMANENT

        def refuse(self, failure: str) -> None:
            self.deliver()
            cluster.push_errors("produce", *[failure] * 10_000)

        def retryable_failures(self) -> tuple[str, ...]:
            return self._RETRYABLE

        def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
            if retry_after is not None:
                raise PeerCannot("Kafka has no Retry-After")
            self.deliver()
            if failure == "brokers down":
                cluster.broker_down()
            else:  # librdkafka retries it in place until the sink's timeout runs out
                cluster.push_errors("produce", *[failure] * 100_000)

        def slow(self, seconds: float) -> None:
            self.deliver()
            cluster.set_rtt(int(seconds * 1000))

        def received(self) -> list[Any]:
            return [_arrival(m) for m in cluster.read(topic, timeout=30, idle=1.5)]

    peer = KafkaPeer()
    cluster.create_topic(topic, partitions=2, replication=min(3, cluster.brokers))
    return peer
