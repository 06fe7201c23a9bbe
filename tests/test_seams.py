"""What modules offer each other: typed results, public methods instead of private reads."""

from __future__ import annotations

from typing import Any

from waypost.metrics import Counter, Gauge, Histogram, UpDownCounter


def test_a_refused_declaration_still_returns_the_kind_asked_for(
    waypost_make_telemetry: Any,
) -> None:
    tel = waypost_make_telemetry(strict=False)
    reg = tel.metrics
    reg.counter("runs")
    refused = [
        reg.gauge("runs"),
        reg.histogram("runs"),
        reg.up_down_counter("runs"),
        reg.counter("runs", unit="s"),
    ]
    for got, kind in zip(refused, (Gauge, Histogram, UpDownCounter, Counter), strict=True):
        assert isinstance(got, kind)
    refused[0].set(1)
    refused[1].record(1)
    refused[2].add(-1)
    refused[3].add(1)  # all ignored: only the declared counter exists, untouched
    assert reg.get("runs") is not refused[3] and reg.points("runs") == []
    assert tel.counters.dropped == {"metric_declaration": 4}


def test_label_values_are_scrubbed_with_telemetry_off(waypost_make_telemetry: Any) -> None:
    tel = waypost_make_telemetry(env={"DO_NOT_TRACK": "1"}, config={"metrics": {}})
    assert not tel.enabled and tel.gate is None
    scrubber = tel.label_scrubber()
    assert scrubber is not None and scrubber is tel.label_scrubber()  # built once
    assert "[REDACTED:email]" in scrubber.scrub_text("jane@example.com", "l", [])


def test_inspection_without_starting(waypost_make_telemetry: Any, tmp_path: Any) -> None:
    tel = waypost_make_telemetry(sinks={"jsonl": {"path": str(tmp_path / "o.jsonl")}}, start=False)
    assert not tel.has_outbox() and tel.receipts() == {}
    assert list(tel.inspect_sinks()) == ["jsonl"]
    assert not tel.has_outbox()  # looking never creates an outbox


def test_import_waypost_stays_cheap_and_the_loggers_get_a_null_handler() -> None:
    import subprocess
    import sys

    code = (
        "import sys, waypost; print('logging' in sys.modules, 'typing' in sys.modules); "
        "import logging, waypost.telemetry; "
        "print(any(type(h) is logging.NullHandler for h in logging.getLogger('waypost').handlers))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"]
