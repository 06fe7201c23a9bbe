"""The metric registry of the core (no exporter plugin needed)."""

from __future__ import annotations

import enum
import importlib.metadata as md
import logging
import math
import textwrap
import threading
from typing import Any

import pytest

import waypost
from waypost.errors import ConfigError
from waypost.metrics import DEFAULT_BUCKETS, MANDATORY, OPTIONAL, MetricRegistry
from waypost.metrics import registry as metrics_module


def points(registry: MetricRegistry, name: str) -> dict[tuple[tuple[str, str], ...], Any]:
    return {tuple(sorted(p.labels.items())): p for p in registry.points(name)}


def values(registry: MetricRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {k: p.value for k, p in points(registry, name).items()}


# --- declaring and recording ------------------------------------------------------------------


def test_counter_adds_per_label_set(make_telemetry):
    reg = make_telemetry().metrics
    files = reg.counter(
        "files_uploaded",
        description="Files uploaded",
        unit="{file}",
        labels={"flow_id": MANDATORY, "kind": OPTIONAL},
    )
    files.add(1, {"flow_id": "f1"})
    files.add(2, {"flow_id": "f1"})
    files.add(5, {"flow_id": "f1", "kind": "csv"})
    files.add(labels={"flow_id": "f2"})
    assert values(reg, "files_uploaded") == {
        (("flow_id", "f1"),): 3.0,
        (("flow_id", "f1"), ("kind", "csv")): 5.0,
        (("flow_id", "f2"),): 1.0,
    }


def test_up_down_counter_and_gauge(make_telemetry):
    reg = make_telemetry().metrics
    sessions = reg.up_down_counter("active_sessions", labels={"user_type": MANDATORY})
    sessions.add(3, {"user_type": "admin"})
    sessions.add(-2, {"user_type": "admin"})
    size = reg.gauge("file_size", unit="By", labels={"flow_id": MANDATORY})
    size.set(100, {"flow_id": "a"})
    size.set(42.5, {"flow_id": "a"})
    assert values(reg, "active_sessions") == {(("user_type", "admin"),): 1.0}
    assert values(reg, "file_size") == {(("flow_id", "a"),): 42.5}


def test_histogram_buckets_sum_count_min_max(make_telemetry):
    reg = make_telemetry().metrics
    latency = reg.histogram("run_seconds", unit="s", buckets=[0.1, 1, 10])
    for value in (0.05, 0.1, 0.5, 3, 100):
        latency.record(value)
    (point,) = reg.points("run_seconds")
    # bucket i holds (bound[i-1], bound[i]]; the last one everything above the bounds
    assert point.bucket_counts == (2, 1, 1, 1)
    assert point.count == 5
    assert point.sum == pytest.approx(103.65)
    assert (point.min, point.max) == (0.05, 100)
    assert reg.histogram("default_buckets").info.buckets == DEFAULT_BUCKETS


def test_labels_as_a_list_are_mandatory(make_telemetry):
    reg = make_telemetry().metrics
    counter = reg.counter("runs", labels=["flow_id"])
    assert counter.info.mandatory == {"flow_id"}
    with pytest.raises(waypost.TrackError, match="missing mandatory label"):
        counter.add(1)


def test_label_values_become_strings(make_telemetry):
    class Kind(enum.Enum):
        CSV = "csv"

    reg = make_telemetry().metrics
    counter = reg.counter("typed", labels={"a": OPTIONAL, "b": OPTIONAL, "c": OPTIONAL})
    counter.add(1, {"a": True, "b": 3, "c": Kind.CSV})
    assert values(reg, "typed") == {(("a", "true"), ("b", "3"), ("c", "csv")): 1.0}


def test_redeclaring_returns_the_same_instrument(make_telemetry):
    reg = make_telemetry().metrics
    first = reg.counter("runs", labels={"flow_id": MANDATORY})
    again = reg.counter("runs", description="more words", labels={"flow_id": MANDATORY})
    assert again is first


@pytest.mark.parametrize(
    "declare",
    [
        lambda reg: reg.gauge("runs", labels={"flow_id": MANDATORY}),
        lambda reg: reg.counter("runs", labels={"flow_id": OPTIONAL}),
        lambda reg: reg.counter("runs", labels={"flow_id": MANDATORY, "kind": OPTIONAL}),
        lambda reg: reg.counter("runs", unit="s", labels={"flow_id": MANDATORY}),
    ],
)
def test_conflicting_shape_is_an_error(make_telemetry, declare):
    reg = make_telemetry().metrics
    reg.counter("runs", labels={"flow_id": MANDATORY})
    with pytest.raises(waypost.TrackError, match="'runs' is already declared as a counter"):
        declare(reg)


def test_conflicting_shape_in_production_is_counted_and_ignored(make_telemetry):
    tel = make_telemetry(strict=False)
    reg = tel.metrics
    reg.counter("runs", labels={"flow_id": MANDATORY})
    gauge = reg.gauge("runs")
    gauge.set(3)  # accepted and ignored
    assert tel.counters.dropped == {"metric_declaration": 1}
    assert reg.get("runs").kind == "counter"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "has space"}, "metric name 'has space' is invalid"),
        ({"name": "waypost_mine"}, "waypost's own"),
        ({"name": "ok", "labels": {"bad-label": MANDATORY}}, "label name 'bad-label'"),
        ({"name": "ok", "labels": {"x": "sometimes"}}, "must be MANDATORY or OPTIONAL"),
        ({"name": "ok", "buckets": [1, 1]}, "strictly increasing"),
        ({"name": "ok", "buckets": [1, math.inf]}, "finite"),
        ({"name": "ok", "labels": {"le": OPTIONAL}}, "bucket label"),
    ],
)
def test_bad_declarations(make_telemetry, kwargs, message):
    reg = make_telemetry().metrics
    with pytest.raises(waypost.TrackError, match=message):
        reg.histogram(**kwargs)


def test_only_histograms_take_buckets(make_telemetry):
    reg = make_telemetry().metrics
    with pytest.raises(waypost.TrackError, match="only histograms take buckets"):
        reg._declare(metrics_module.Counter, "c", description="", unit="", labels={}, buckets=[1])


# --- refusals: strict and production ----------------------------------------------------------


def test_undeclared_label_strict_names_metric_and_label(make_telemetry):
    reg = make_telemetry().metrics
    counter = reg.counter("runs", labels={"flow_id": MANDATORY})
    with pytest.raises(waypost.TrackError) as info:
        counter.add(1, {"flow_id": "a", "user_email": "x"})
    assert "'runs'" in str(info.value)
    assert "'user_email' is not declared" in str(info.value)
    assert reg.points("runs") == []


def test_missing_mandatory_label_strict(make_telemetry):
    reg = make_telemetry().metrics
    counter = reg.counter("runs", labels={"flow_id": MANDATORY, "kind": OPTIONAL})
    with pytest.raises(waypost.TrackError, match="'runs': missing mandatory label 'flow_id'"):
        counter.add(1, {"kind": "x"})
    with pytest.raises(waypost.TrackError, match="missing mandatory label"):
        counter.add(1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (lambda reg: reg.counter("c").add(-1), "only goes up"),
        (lambda reg: reg.counter("c").add(math.nan), "not finite"),
        (lambda reg: reg.gauge("g").set("12"), "must be a number"),
        (lambda reg: reg.gauge("g").set(True), "must be a number"),
        (lambda reg: reg.counter("c", labels=["k"]).add(1, {"k": ["a"]}), "string, number"),
        (lambda reg: reg.counter("c", labels=["k"]).add(1, ["k"]), "must be a mapping"),
    ],
)
def test_bad_values_strict(make_telemetry, record, message):
    reg = make_telemetry().metrics
    with pytest.raises(waypost.TrackError, match=message):
        record(reg)


def test_refusals_in_production_are_counted_and_logged_once(make_telemetry, caplog):
    tel = make_telemetry(strict=False)
    counter = tel.metrics.counter("runs", labels={"flow_id": MANDATORY})
    with caplog.at_level(logging.WARNING, logger="waypost.metrics"):
        for _ in range(5):
            counter.add(1, {"flow_id": "a", "secret_thing": "x"})
        counter.add(1)
        counter.add(-3, {"flow_id": "a"})
    assert tel.counters.dropped == {"metric_label": 6, "metric_value": 1}
    assert tel.status().counters.dropped["metric_label"] == 6
    messages = [r.getMessage() for r in caplog.records]
    assert sum("'secret_thing' is not declared" in m for m in messages) == 1
    assert sum("missing mandatory" in m for m in messages) == 1
    assert tel.metrics.points("runs") == []


def test_series_limit(make_telemetry):
    tel = make_telemetry(strict=False)
    reg = MetricRegistry(tel, max_series=2)
    counter = reg.counter("runs", labels=["flow_id"])
    for flow in ("a", "b", "c", "a"):
        counter.add(1, {"flow_id": flow})
    assert values(reg, "runs") == {(("flow_id", "a"),): 2.0, (("flow_id", "b"),): 1.0}
    assert tel.counters.dropped == {"metric_cardinality": 1}


# --- scrubbing --------------------------------------------------------------------------------


def test_label_values_pass_the_scrubbers(make_telemetry):
    reg = make_telemetry().metrics
    counter = reg.counter("logins", labels=["who", "path"])
    counter.add(1, {"who": "ada@example.com", "path": "/home/ada/project"})
    ((labels, _),) = values(reg, "logins").items()
    assert dict(labels) == {"who": "[REDACTED:email]", "path": "/home/<user>/project"}


def test_label_values_are_scrubbed_with_telemetry_off(make_telemetry, clean_env):
    tel = make_telemetry(
        env={**clean_env, "DO_NOT_TRACK": "1"},
        config={"scrub": {"patterns": {"ticket": r"TICKET-\d+"}}},
    )
    assert not tel.enabled
    assert not hasattr(tel, "scrubber")  # no pipeline: the registry builds its own
    counter = tel.metrics.counter("errors", labels=["detail"])
    counter.add(1, {"detail": "TICKET-123 from 10.1.2.3"})
    ((labels, _),) = values(tel.metrics, "errors").items()
    assert dict(labels) == {"detail": "[REDACTED:ticket] from [REDACTED:ipv4]"}


def test_scrubbing_off_leaves_values(make_telemetry):
    reg = make_telemetry(config={"scrub": {"enabled": False}}).metrics
    reg.counter("c", labels=["who"]).add(1, {"who": "ada@example.com"})
    assert values(reg, "c") == {(("who", "ada@example.com"),): 1.0}


# --- switches ---------------------------------------------------------------------------------


def test_prometheus_switch_from_config_and_env(make_telemetry, clean_env):
    assert make_telemetry().metrics.prometheus_enabled is True
    off = make_telemetry(config={"metrics": {"prometheus": {"enabled": False}}}).metrics
    assert off.prometheus_enabled is False
    assert "telemetry.metrics.prometheus.enabled is false" in off.prometheus_rule
    env_off = make_telemetry(env={**clean_env, "PROMETHEUS_ENABLED": "false"}).metrics
    assert env_off.prometheus_enabled is False
    assert env_off.prometheus_rule == "PROMETHEUS_ENABLED=false is set in the environment"
    env_on = make_telemetry(
        env={**clean_env, "PROMETHEUS_ENABLED": "1"},
        config={"metrics": {"prometheus": {"enabled": False}}},
    ).metrics
    assert env_on.prometheus_enabled is True


def test_do_not_track_keeps_local_metrics(make_telemetry, clean_env):
    tel = make_telemetry(env={**clean_env, "DO_NOT_TRACK": "true"})
    assert not tel.enabled
    counter = tel.metrics.counter("runs")
    counter.add(2)
    assert values(tel.metrics, "runs") == {(): 2.0}  # the operator's own exposition may read it
    (enabled,) = tel.metrics.points("waypost_telemetry_enabled")
    assert enabled.value == 0.0


def test_sink_up_is_absent_while_telemetry_is_off(make_telemetry, clean_env, tmp_path):
    """Opted out is no outage: an alert on waypost_sink_up == 0 must not fire for it."""
    sinks = {"jsonl": {"path": str(tmp_path / "events.jsonl")}}
    off = make_telemetry(sinks=sinks, env={**clean_env, "DO_NOT_TRACK": "1"})
    assert off.metrics.points("waypost_sink_up") == []
    on = make_telemetry(sinks=sinks)
    assert [p.value for p in on.metrics.points("waypost_sink_up")] == [1.0]


def test_nothing_is_kept_with_no_destination(make_telemetry, clean_env):
    tel = make_telemetry(env={**clean_env, "DO_NOT_TRACK": "1", "PROMETHEUS_ENABLED": "0"})
    counter = tel.metrics.counter("runs", labels=["flow_id"])
    counter.add(1, {"flow_id": "a"})
    assert tel.metrics.points("runs") == []
    with pytest.raises(waypost.TrackError):  # strict mode still checks the call
        counter.add(1, {"nope": "a"})


# --- health -----------------------------------------------------------------------------------


def test_health_metrics_from_the_pipeline(make_telemetry, tmp_path):
    tel = make_telemetry(sinks={"jsonl": {"path": str(tmp_path / "events.jsonl")}}, strict=False)
    for i in range(3):
        tel.track("run", {"n": i})
    assert tel.flush(timeout=10)
    tel.metrics.counter("runs", labels=["flow_id"]).add(1)  # dropped: metric_label
    reg = tel.metrics
    reg._health_cache = (-math.inf, {})
    assert values(reg, "waypost_events_accepted") == {(): 3.0}
    assert values(reg, "waypost_events_delivered") == {(("sink", "jsonl"),): 3.0}
    assert values(reg, "waypost_events_dropped") == {(("reason", "metric_label"),): 1.0}
    assert values(reg, "waypost_outbox_pending") == {(("sink", "jsonl"),): 0.0}
    assert values(reg, "waypost_sink_up") == {(("sink", "jsonl"),): 1.0}
    assert values(reg, "waypost_telemetry_enabled") == {(): 1.0}
    names = {d.info.name for d in reg.collect()}
    assert {"waypost_events_retried", "waypost_events_failed", "waypost_buffered_events"} <= names


def test_health_metrics_can_be_left_out(make_telemetry):
    reg = make_telemetry().metrics
    reg.counter("runs").add(1)
    assert [d.info.name for d in reg.collect(builtin=False)] == ["runs"]


# --- describe, listeners, exporters -----------------------------------------------------------


def test_describe_lists_every_metric(make_telemetry):
    reg = make_telemetry().metrics
    reg.counter(
        "files_uploaded",
        description="Files uploaded",
        unit="{file}",
        labels={"flow_id": MANDATORY, "kind": OPTIONAL},
    )
    reg.histogram("run_seconds", unit="s", buckets=[1, 10])
    described = {d["name"]: d for d in reg.describe()}
    assert described["files_uploaded"] == {
        "name": "files_uploaded",
        "type": "counter",
        "unit": "{file}",
        "description": "Files uploaded",
        "labels": [
            {"name": "flow_id", "mandatory": True},
            {"name": "kind", "mandatory": False},
        ],
        "builtin": False,
        "destinations": [],
    }
    assert described["run_seconds"]["buckets"] == [1.0, 10.0]
    assert described["waypost_events_delivered"]["builtin"] is True
    assert described["waypost_events_delivered"]["labels"] == [{"name": "sink", "mandatory": True}]


class Recorder:
    def __init__(self) -> None:
        self.declared: list[str] = []
        self.recorded: list[tuple[str, float, dict[str, str]]] = []

    def on_declare(self, info):
        self.declared.append(info.name)

    def on_record(self, info, value, labels):
        self.recorded.append((info.name, value, info.label_dict(labels)))


def test_listeners_see_declarations_and_recordings(make_telemetry):
    reg = make_telemetry().metrics
    early = reg.counter("early", labels={"k": OPTIONAL})
    listener = Recorder()
    reg.add_listener(listener)
    late = reg.histogram("late", buckets=[1])
    early.add(2, {"k": "x"})
    late.record(0.5)
    assert listener.declared[-2:] == ["early", "late"]
    assert "waypost_events_accepted" in listener.declared
    assert listener.recorded == [("early", 2.0, {"k": "x"}), ("late", 0.5, {})]
    reg.remove_listener(listener)
    early.add(1)
    assert len(listener.recorded) == 2


def test_a_failing_listener_does_not_break_recording(make_telemetry):
    class Broken:
        def on_record(self, info, value, labels):
            raise RuntimeError("boom")

    reg = make_telemetry().metrics
    reg.add_listener(Broken())
    counter = reg.counter("runs")
    counter.add(1)
    counter.add(1)
    assert values(reg, "runs") == {(): 2.0}


def test_concurrent_adds_are_not_lost(make_telemetry):
    reg = make_telemetry().metrics
    counter = reg.counter("hits", labels=["worker"])

    def work(n: int) -> None:
        for _ in range(2000):
            counter.add(1, {"worker": str(n % 2)})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(values(reg, "hits").values()) == 8000


EXPORTER_MODULE = textwrap.dedent(
    """
    started = []

    class Exporter:
        def __init__(self, registry, settings):
            self.registry, self.settings, self.closed = registry, settings, False

        def destinations(self):
            return [{"name": "fake", "target": self.settings.get("url"),
                     "leaves_machine": True, "active": True, "reason": "on"}]

        def close(self, timeout=5.0):
            self.closed = True

    def attach(registry, settings):
        exporter = Exporter(registry, settings)
        started.append(exporter)
        return exporter
    """
)


@pytest.fixture
def fake_exporter(tmp_path, monkeypatch):
    (tmp_path / "fake_metrics_exporter.py").write_text(EXPORTER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = md.EntryPoint(name="fake", value="fake_metrics_exporter:attach", group="waypost.metrics")
    monkeypatch.setattr(metrics_module, "_entry_points", lambda: {"fake": ep})
    import fake_metrics_exporter

    fake_metrics_exporter.started.clear()
    return fake_metrics_exporter


def test_exporters_named_in_config_are_loaded(make_telemetry, fake_exporter):
    tel = make_telemetry(config={"metrics": {"fake": {"url": "http://127.0.0.1:1/m"}}})
    reg = tel.metrics
    (exporter,) = fake_exporter.started
    assert exporter.registry is reg
    assert exporter.settings == {"url": "http://127.0.0.1:1/m"}
    assert reg.exporter("fake") is exporter
    assert reg.destinations()[0]["target"] == "http://127.0.0.1:1/m"
    reg.counter("runs")
    assert {d["name"]: d for d in reg.describe()}["runs"]["destinations"] == ["fake"]
    reg.close()
    reg.close()
    assert exporter.closed


def test_no_exporter_is_loaded_unless_named(make_telemetry, fake_exporter):
    make_telemetry().metrics.counter("runs")
    assert fake_exporter.started == []


def test_unknown_exporter_names_the_fix(make_telemetry, fake_exporter, caplog):
    with pytest.raises(ConfigError) as info:
        _ = make_telemetry(config={"metrics": {"otlp": {}}}).metrics
    assert "telemetry.metrics.otlp" in str(info.value)
    assert "installed exporters are fake" in str(info.value)
    assert "pip install waypost-otlp" in str(info.value)
    tel = make_telemetry(config={"metrics": {"otlp": {}}}, strict=False)
    with caplog.at_level(logging.ERROR):
        tel.metrics.counter("runs").add(1)  # the registry still works
    assert "metrics exporter 'otlp' is off" in caplog.text
