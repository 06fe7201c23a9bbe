"""Planted values of every promised kind, in several forms, in every place an event can carry
them (a value, nested lists and mappings, a key, a typed payload's text field, an error-level
exception message, ``distinct_id``, the event's name, the context a plugin adds), through the
``jsonl`` and ``http`` sinks: what reaches each is counted, and must be nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from privacy_corpus import FORMS, kinds, readings

import waypost
from waypost.testing import RecordingServer

pytestmark = pytest.mark.http_sink

Factory = Callable[..., Any]

PLACE_FORMS = ("plain", "percent", "json-escaped", "html-numeric", "sentence")


class Note(waypost.Payload, event="note"):
    text: str


class Crash(waypost.Payload, event="crash", level="error"):
    message: str


def plants() -> list[tuple[str, str, tuple[str, ...]]]:
    """(label, text, needles) for every kind and form used here."""
    out = []
    for kind, values in kinds().items():
        for n, (value, needles) in enumerate(values[:3]):
            for form in PLACE_FORMS:
                out.append((f"{kind}#{n}/{form}", FORMS[form](value), needles))
    return out


class ContextPlugin:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        return {"plugin": dict(self.values)}


def track_everywhere(tel: Any, label: str, text: str) -> int:
    """Track ``text`` in every place of an event; returns the number of events tracked."""
    tel.track("value", {"label": label, "detail": text})
    tel.track("nested", {"label": label, "items": [["ok", {"deep": [text]}]]})
    tel.track("mapping", {"label": label, "meta": {"a": {"b": text}}})
    tel.track("key", {"label": label, "by_key": {text: 1}})
    tel.track(Note(text=text))
    try:
        raise RuntimeError(f"request failed: {text}")
    except RuntimeError as exc:
        tel.track(Crash(message=str(exc)))
    tel.track("who", {"label": label}, distinct_id=text)
    count = 7
    if len(text) <= 150 and "\n" not in text:  # names are short and on one line
        tel.track(f"signup {text}", {"label": label})
        count += 1
    return count


@pytest.fixture
def http_server() -> Any:
    with RecordingServer() as server:
        yield server


def deliver(tel: Any, path: Path, server: Any, tracked: int) -> dict[str, str]:
    """What each sink received once all ``tracked`` events arrived: both sinks get every
    event (the scrubbers redact, they do not drop)."""
    deadline = time.monotonic() + 120
    lines = sent = 0
    while time.monotonic() < deadline:
        tel.flush(5)
        lines = path.read_text(encoding="utf-8").count("\n") if path.exists() else 0
        sent = sum(len(json.loads(r.body)) for r in list(server.requests))
        if lines >= tracked and sent >= tracked:
            break
    assert (lines, sent) == (tracked, tracked)
    return {
        "jsonl": path.read_text(encoding="utf-8"),
        "http": "\n".join(r.body.decode("utf-8") for r in server.requests),
    }


def leaked(
    received: dict[str, str], cases: list[tuple[str, str, tuple[str, ...]]]
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for sink, body in received.items():
        views = list(readings(body))
        out[sink] = [
            label for label, _, needles in cases
            if any(needle in view for needle in needles for view in views)
        ]  # fmt: skip
    return out


def both_sinks(make: Factory, tmp_path: Path, server: Any, **kwargs: Any) -> tuple[Any, Path]:
    path = tmp_path / f"events-{len(list(tmp_path.iterdir()))}.jsonl"
    tel = make(
        sinks={
            "file": {"type": "jsonl", "path": str(path)},
            "ingest": {"type": "http", "url": f"{server.url}/ingest"},
        },
        strict=False,
        **kwargs,
    )
    return tel, path


def test_no_planted_value_reaches_either_sink(
    waypost_make_telemetry: Factory, tmp_path: Path, http_server: Any
) -> None:
    cases = plants()
    tel, path = both_sinks(waypost_make_telemetry, tmp_path, http_server)
    tracked = sum(track_everywhere(tel, label, text) for label, text, _ in cases)
    found = leaked(deliver(tel, path, http_server, tracked), cases)
    print(f"\n{len(cases)} values in 8 places, {tracked} events per sink; leaked: {found}")
    assert found == {"jsonl": [], "http": []}


def test_no_planted_value_in_a_plugins_context_reaches_either_sink(
    waypost_make_telemetry: Factory, tmp_path: Path, http_server: Any
) -> None:
    cases = plants()
    values = {f"k{i}": text for i, (_, text, _) in enumerate(cases)}
    tel, path = both_sinks(
        waypost_make_telemetry, tmp_path, http_server, plugins=[ContextPlugin(values)]
    )
    for i in range(5):
        tel.track("with_context", {"i": i})
    found = leaked(deliver(tel, path, http_server, 5), cases)
    assert found == {"jsonl": [], "http": []}
    record = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(record["context"]["plugin"]) == set(values)  # scrubbed, not dropped


def test_the_search_would_see_a_leak(waypost_make_telemetry: Factory, tmp_path: Path) -> None:
    # With the scrubbers off the same search finds the planted values: it can fail.
    path = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(
        sinks={"file": {"type": "jsonl", "path": str(path)}},
        config={"scrub": {"enabled": False}},
    )
    label, text, needles = plants()[0]
    track_everywhere(tel, label, text)
    assert tel.flush(10)
    views = list(readings(path.read_text(encoding="utf-8")))
    assert any(needle in view for needle in needles for view in views)
