"""The kafka sink inside waypost, beyond the contract (test_kafka_contract.py): the core's
retries and outbox against brokers that go down, forked processes, ``waypost plugins``."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from waypost_kafka.testing import MockCluster

TOPIC = "telemetry.testapp"


def test_the_core_retries_while_the_brokers_are_down(
    cluster: MockCluster, make_telemetry: Any
) -> None:
    """Brokers down: nothing is confirmed, so the events wait in the outbox; brokers up: the
    core's retries deliver every one (each exactly once, as nothing left the producer)."""
    cluster.broker_down()
    tel = make_telemetry(
        sinks={
            "dest": {"type": "kafka", "bootstrap_servers": cluster.bootstrap_servers, "timeout": 1}
        }
    )
    for i in range(10):
        tel.track("outage_event", {"i": i})
    assert tel.flush(timeout=5)  # safe: stored in the outbox, not delivered
    (sink,) = tel.status().sinks
    assert sink.delivered == 0 and sink.pending == 10
    cluster.broker_up()
    deadline = time.monotonic() + 60
    while tel.status().sinks[0].delivered < 10:
        assert time.monotonic() < deadline, tel.status().sinks
        tel.flush(timeout=2)
    copies = collections.Counter(m.event_id for m in cluster.read(TOPIC, idle=2))
    assert len(copies) == 10 and set(copies.values()) == {1}, copies
    assert tel.status().sinks[0].delivered == 10


_FORK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from waypost.sinks import SinkContext
    from waypost.testing import make_events, send_batch
    from waypost_kafka import KafkaConfig, KafkaSink

    config = KafkaConfig(bootstrap_servers=sys.argv[1], timeout=10)
    context = SinkContext(app="testapp", version="1", instance_id="i", data_dir=Path("."))
    sink = KafkaSink("forked", config, context)
    parent_events = make_events(3)
    result = send_batch(sink, parent_events)
    assert not result.retry and not result.failed, result
    # Leave a message in the parent's producer queue that only the parent may deliver.
    pid = os.fork()
    if pid == 0:
        child_events = make_events(2)
        result = send_batch(sink, child_events)
        assert not result.retry and not result.failed, result
        sink.close()
        print(json.dumps({"child": [e.id for e in child_events]}), flush=True)
        sys.exit(0)  # a normal exit: interpreter teardown must not touch the parent's producer
    _, status = os.waitpid(pid, 0)
    later = make_events(2)
    result = send_batch(sink, later)
    assert not result.retry and not result.failed, result
    sink.close()
    print(json.dumps({"parent": [e.id for e in parent_events + later], "status": status}))
    """
)


def test_a_forked_child_makes_its_own_producer(cluster: MockCluster, tmp_path: Path) -> None:
    script = tmp_path / "fork_kafka.py"
    script.write_text(_FORK_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), cluster.bootstrap_servers],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    child = next(x["child"] for x in lines if "child" in x)
    parent = next(x for x in lines if "parent" in x)
    assert parent["status"] == 0, done.stderr
    copies = collections.Counter(m.event_id for m in cluster.read(TOPIC, count=7, idle=2))
    assert set(copies) == {*child, *parent["parent"]} and set(copies.values()) == {1}


def test_waypost_plugins_lists_it() -> None:
    code = "import sys; from waypost.cli import main; sys.exit(main(['plugins', '--json']))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    (entry,) = [p for p in json.loads(done.stdout) if p["name"] == "kafka"]
    assert entry["distribution"] == "waypost-kafka" and entry["status"] == "loaded"
    assert entry["sink_types"] == ["kafka"] and entry["deprecated"] is False
