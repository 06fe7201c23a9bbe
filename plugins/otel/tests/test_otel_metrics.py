"""waypost-otel against real peers: a Prometheus scrape over loopback and an OTLP/HTTP collector
(a RecordingServer) whose requests are decoded with opentelemetry-proto."""

from __future__ import annotations

import io
import math
import socket
import threading
import urllib.error
import urllib.request
import wsgiref.util
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import waypost_otel
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families

from waypost.errors import ConfigError
from waypost.metrics import MANDATORY, OPTIONAL
from waypost.testing import RecordingServer, Response, free_port

PROTOBUF = "application/x-protobuf"


def collector_answer(request: Any) -> Response:
    """An OTLP/HTTP collector's success: 200 with an empty ExportMetricsServiceResponse."""
    body = ExportMetricsServiceResponse().SerializeToString()
    return Response(200, body, {"Content-Type": PROTOBUF})


@pytest.fixture
def collector() -> Iterator[RecordingServer]:
    with RecordingServer(collector_answer) as server:
        yield server


@pytest.fixture
def make_metrics(make_telemetry: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Telemetry whose metrics section is ``otel`` (loaded through the entry point); the
    registries are closed after the test."""
    made: list[Any] = []

    def factory(otel: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        config = kwargs.pop("config", {})
        metrics = {**config.get("metrics", {}), "otel": otel or {}}
        tel = make_telemetry(config={**config, "metrics": metrics}, **kwargs)
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.metrics.close(timeout=2)


def scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in family.samples
        if s.name == family.name + suffix
    }


def pushed(request: Any) -> dict[str, Any]:
    """Metrics by name from one OTLP/HTTP request."""
    decoded = ExportMetricsServiceRequest.FromString(request.body)
    return {
        metric.name: metric
        for rm in decoded.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }


def attributes(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def declare(tel: Any) -> None:
    files = tel.metrics.counter(
        "files_uploaded",
        description="Files uploaded",
        unit="{file}",
        labels={"flow_id": MANDATORY, "kind": OPTIONAL},
    )
    files.add(2, {"flow_id": "f1"})
    files.add(1, {"flow_id": "f1", "kind": "csv"})
    tel.metrics.gauge("file_size", unit="By", labels=["flow_id"]).set(512, {"flow_id": "f1"})
    tel.metrics.up_down_counter("active_sessions").add(3)
    latency = tel.metrics.histogram("run_seconds", unit="s", buckets=[0.1, 1, 10])
    for value in (0.05, 0.5, 5, 50):
        latency.record(value)


# --- Prometheus exposition --------------------------------------------------------------------


def test_scrape_over_loopback(make_metrics):
    tel = make_metrics({"prometheus_port": 0})
    declare(tel)
    exporter = tel.metrics.exporter("otel")
    assert exporter.prometheus_url.startswith("http://127.0.0.1:")
    families = scrape(exporter.prometheus_url)

    files = families["files_uploaded"]
    assert files.type == "counter"
    assert files.documentation == "Files uploaded"
    assert samples(files, "_total") == {
        (("flow_id", "f1"), ("kind", "")): 2.0,
        (("flow_id", "f1"), ("kind", "csv")): 1.0,
    }
    assert samples(families["file_size"]) == {(("flow_id", "f1"),): 512.0}
    assert families["active_sessions"].type == "gauge"
    assert samples(families["active_sessions"]) == {(): 3.0}

    run = families["run_seconds"]
    assert run.type == "histogram"
    assert samples(run, "_bucket") == {
        (("le", "0.1"),): 1.0,
        (("le", "1.0"),): 2.0,
        (("le", "10.0"),): 3.0,
        (("le", "+Inf"),): 4.0,
    }
    assert samples(run, "_count") == {(): 4.0}
    assert samples(run, "_sum") == {(): pytest.approx(55.55)}


def test_scrape_reads_current_values(make_metrics):
    tel = make_metrics({"prometheus_port": 0})
    counter = tel.metrics.counter("runs")
    url = tel.metrics.exporter("otel").prometheus_url
    counter.add(1)
    assert samples(scrape(url)["runs"], "_total") == {(): 1.0}
    counter.add(4)
    assert samples(scrape(url)["runs"], "_total") == {(): 5.0}


def test_health_metrics_are_exposed(make_metrics, tmp_path):
    tel = make_metrics({"prometheus_port": 0}, sinks={"jsonl": {"path": str(tmp_path / "e.jsonl")}})
    for i in range(4):
        tel.track("run", {"n": i})
    assert tel.flush(timeout=10)
    families = scrape(tel.metrics.exporter("otel").prometheus_url)
    assert samples(families["waypost_events_accepted"], "_total") == {(): 4.0}
    assert samples(families["waypost_events_delivered"], "_total") == {(("sink", "jsonl"),): 4.0}
    assert samples(families["waypost_outbox_pending"]) == {(("sink", "jsonl"),): 0.0}
    assert samples(families["waypost_sink_up"]) == {(("sink", "jsonl"),): 1.0}
    assert samples(families["waypost_telemetry_enabled"]) == {(): 1.0}
    for name in ("waypost_events_retried", "waypost_events_failed", "waypost_events_dropped"):
        assert families[name].type == "counter"


def test_label_values_are_scrubbed_in_the_exposition(make_metrics):
    tel = make_metrics({"prometheus_port": 0})
    tel.metrics.counter("logins", labels=["who"]).add(1, {"who": "ada@example.com"})
    text = urllib.request.urlopen(tel.metrics.exporter("otel").prometheus_url).read().decode()
    assert "ada@example.com" not in text
    assert 'logins_total{who="[REDACTED:email]"} 1.0' in text


def test_refused_recordings_are_counted_in_the_exposition(make_metrics):
    tel = make_metrics({"prometheus_port": 0}, strict=False)
    counter = tel.metrics.counter("runs", labels={"flow_id": MANDATORY})
    counter.add(1, {"user": "x"})
    families = scrape(tel.metrics.exporter("otel").prometheus_url)
    assert samples(families["waypost_events_dropped"], "_total") == {
        (("reason", "metric_label"),): 1.0
    }
    assert samples(families["runs"], "_total") == {}


def test_wsgi_app_for_the_host_to_mount(make_telemetry):
    tel = make_telemetry()
    tel.metrics.counter("runs").add(7)
    app = waypost_otel.wsgi_app(tel.metrics)
    environ: dict[str, Any] = {"PATH_INFO": "/metrics", "wsgi.input": io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers: status.append(s)))
    assert status == ["200 OK"]
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert samples(families["runs"], "_total") == {(): 7.0}
    (prometheus,) = tel.metrics.destinations()
    assert prometheus["active"] and prometheus["target"] == "mounted by the host"
    tel.metrics.close()


# --- OTLP/HTTP push ---------------------------------------------------------------------------


def test_otlp_push_to_a_collector(collector, make_metrics):
    tel = make_metrics({"host": collector.url, "interval": "1h", "headers": {"X-Key": "k1"}})
    declare(tel)
    assert tel.metrics.exporter("otel").flush(timeout=10)
    (request,) = collector.requests
    assert request.method == "POST"
    assert request.path == "/v1/metrics"
    assert request.header("Content-Type") == PROTOBUF
    assert request.header("X-Key") == "k1"

    decoded = ExportMetricsServiceRequest.FromString(request.body)
    resource = attributes(decoded.resource_metrics[0].resource)
    assert resource["service.name"] == "testapp"
    assert resource["service.version"] == "1.0.0"
    assert resource["service.instance.id"] == tel.instance_id

    metrics = pushed(request)
    files = metrics["files_uploaded"]
    assert files.unit == "{file}" and files.description == "Files uploaded"
    assert files.sum.is_monotonic
    assert {tuple(sorted(attributes(p).items())): p.as_double for p in files.sum.data_points} == {
        (("flow_id", "f1"),): 2.0,
        (("flow_id", "f1"), ("kind", "csv")): 1.0,
    }
    assert not metrics["active_sessions"].sum.is_monotonic
    assert metrics["active_sessions"].sum.data_points[0].as_double == 3.0
    assert metrics["file_size"].gauge.data_points[0].as_double == 512.0

    (hist,) = metrics["run_seconds"].histogram.data_points
    assert list(hist.explicit_bounds) == [0.1, 1.0, 10.0]
    assert list(hist.bucket_counts) == [1, 1, 1, 1]
    assert hist.count == 4 and hist.sum == pytest.approx(55.55)

    delivered = metrics["waypost_events_accepted"].sum.data_points[0]
    assert delivered.as_double == 0.0
    sink_up = metrics["waypost_sink_up"].gauge.data_points[0]
    assert attributes(sink_up) == {"sink": "log"}


def test_otlp_push_is_periodic(collector, make_metrics):
    tel = make_metrics({"host": collector.url, "interval": 0.2})
    tel.metrics.counter("runs").add(1)
    assert collector.wait_for(lambda requests: len(requests) >= 2, timeout=10)


def test_collector_error_does_not_reach_the_host(collector, make_metrics):
    collector.answer(Response(400, b"bad request", {"Content-Type": "text/plain"}))
    tel = make_metrics({"host": collector.url, "interval": "1h", "timeout": 2})
    counter = tel.metrics.counter("runs")
    counter.add(1)
    assert tel.metrics.exporter("otel").flush(timeout=5) is False
    counter.add(1)
    assert tel.metrics.exporter("otel").flush(timeout=5) is True
    assert pushed(collector.requests[-1])["runs"].sum.data_points[0].as_double == 2.0


def test_close_pushes_a_last_time(collector, make_metrics):
    tel = make_metrics({"host": collector.url, "interval": "1h"})
    tel.metrics.counter("runs").add(3)
    tel.metrics.close(timeout=5)
    assert collector.requests
    assert pushed(collector.requests[-1])["runs"].sum.data_points[0].as_double == 3.0


# --- the switches -----------------------------------------------------------------------------


def test_do_not_track_stops_otlp_but_not_local_exposition(collector, make_metrics, clean_env):
    tel = make_metrics(
        {"host": collector.url, "interval": 0.1, "prometheus_port": 0},
        env={**clean_env, "DO_NOT_TRACK": "1"},
    )
    assert not tel.enabled
    tel.metrics.counter("runs").add(2)
    exporter = tel.metrics.exporter("otel")
    assert exporter.bridge is None  # no MeterProvider, no thread, no socket
    assert exporter.flush(timeout=2)
    tel.metrics.close(timeout=2)
    assert collector.requests == []

    tel = make_metrics(
        {"host": collector.url, "prometheus_port": 0}, env={**clean_env, "DO_NOT_TRACK": "1"}
    )
    tel.metrics.counter("runs").add(2)
    families = scrape(tel.metrics.exporter("otel").prometheus_url)
    assert samples(families["runs"], "_total") == {(): 2.0}
    assert samples(families["waypost_telemetry_enabled"]) == {(): 0.0}
    destinations = {d["name"]: d for d in tel.metrics.destinations()}
    assert destinations["prometheus"]["active"] is True
    assert destinations["prometheus"]["leaves_machine"] is False
    assert destinations["otlp"]["active"] is False
    assert destinations["otlp"]["leaves_machine"] is True
    assert "DO_NOT_TRACK=1" in destinations["otlp"]["reason"]
    assert collector.requests == []


def test_withdrawn_consent_stops_the_push(collector, make_metrics):
    tel = make_metrics({"host": collector.url, "interval": "1h"})
    tel.metrics.counter("runs").add(1)
    exporter = tel.metrics.exporter("otel")
    assert exporter.flush(timeout=10)
    assert len(collector.requests) == 1
    tel.set_consent(False)
    assert exporter.flush(timeout=10)
    tel.metrics.close(timeout=2)
    assert len(collector.requests) == 1
    assert exporter.bridge.exporter.skipped >= 2


def test_prometheus_enabled_false_stops_the_exposition(collector, make_metrics, clean_env):
    port = free_port()
    tel = make_metrics(
        {"host": collector.url, "interval": "1h", "prometheus_port": port},
        env={**clean_env, "PROMETHEUS_ENABLED": "false"},
    )
    tel.metrics.counter("runs").add(1)
    exporter = tel.metrics.exporter("otel")
    assert exporter.prometheus_url is None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    environ: dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(exporter.wsgi_app()(environ, lambda s, h: status.append(s)))
    assert status == ["404 Not Found"]
    assert b"PROMETHEUS_ENABLED=false" in body
    (prometheus, otlp) = tel.metrics.destinations()
    assert prometheus["active"] is False
    assert otlp["active"] is True  # usage telemetry is on: the push goes on
    assert exporter.flush(timeout=10)
    assert "runs" in pushed(collector.requests[-1])


def test_prometheus_off_in_config(make_metrics):
    tel = make_metrics(
        {"prometheus_port": 0}, config={"metrics": {"prometheus": {"enabled": False}}}
    )
    assert tel.metrics.exporter("otel").prometheus_url is None


# --- config, describe ------------------------------------------------------------------------


def test_describe_names_the_destinations(collector, make_metrics):
    tel = make_metrics({"host": collector.url, "prometheus_port": 0})
    tel.metrics.counter("runs", labels={"flow_id": MANDATORY})
    described = {d["name"]: d for d in tel.metrics.describe()}
    assert described["runs"]["destinations"] == ["prometheus", "otlp"]
    assert described["runs"]["labels"] == [{"name": "flow_id", "mandatory": True}]
    targets = {d["name"]: d["target"] for d in tel.metrics.destinations()}
    assert targets == {
        "prometheus": tel.metrics.exporter("otel").prometheus_url,
        "otlp": f"{collector.url}/v1/metrics",
    }


def test_plain_http_to_a_remote_collector_is_refused(make_telemetry):
    # Exporters named in config start with the application, so the error comes at start.
    with pytest.raises(ConfigError) as info:
        make_telemetry(config={"metrics": {"otel": {"host": "http://collector.example:4318"}}})
    assert "telemetry.metrics.otel" in str(info.value)
    assert "plain http://" in str(info.value)


def test_unknown_setting_names_the_key(make_telemetry):
    with pytest.raises(ConfigError, match=r"telemetry\.metrics\.otel\.hots: unknown key"):
        make_telemetry(config={"metrics": {"otel": {"hots": "http://127.0.0.1:4318"}}})


def test_headers_are_not_shown(collector, make_metrics):
    tel = make_metrics({"host": collector.url, "headers": {"Authorization": "Bearer s3cr3t"}})
    exporter = tel.metrics.exporter("otel")
    assert "s3cr3t" not in repr(exporter.config)
    assert "s3cr3t" not in str(exporter.config.public())
    assert "s3cr3t" not in str(tel.metrics.destinations())


def test_attach_in_code(make_telemetry, collector):
    tel = make_telemetry()
    exporter = waypost_otel.attach(tel.metrics, {"host": collector.url, "interval": "1h"})
    assert tel.metrics.exporter("otel") is exporter
    tel.metrics.histogram("sizes", buckets=[1, 2]).record(1.5)
    assert exporter.flush(timeout=10)
    (point,) = pushed(collector.requests[-1])["sizes"].histogram.data_points
    assert list(point.bucket_counts) == [0, 1, 0]
    tel.metrics.close()
    assert not math.isnan(point.sum)


class EndlessCollector:
    """A loopback collector that answers 200 with a body that never ends (chunked, sent as
    fast as it is read); ``gone`` is set once the client closed the connection."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536) or b"\r\n\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
                chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
                while True:
                    conn.sendall(chunk)
            except OSError:
                self.gone.set()


def test_an_endless_answer_is_cut_and_never_holds_the_exporter(make_metrics):
    server = EndlessCollector()
    try:
        tel = make_metrics({"host": server.url, "interval": "1h", "timeout": 1})
        tel.metrics.counter("runs").add(1)
        tel.metrics.exporter("otel").flush(timeout=5)
        # The exporter read at most its bound, then closed the connection.
        assert server.gone.wait(10), "the exporter kept reading an endless answer"
    finally:
        server.sock.close()
