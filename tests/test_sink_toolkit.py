"""The sink toolkit (``waypost.sinks``) against real loopback peers: the transport's redirects,
echoed credentials, transport errors and forks; the masking; one batch in several requests."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, SecretStr

from waypost.errors import PayloadTooLarge, PermanentError, RetryableError
from waypost.events import Event
from waypost.sinks import (
    Answers,
    Chunk,
    HttpSinkConfig,
    HttpTransport,
    Masker,
    ProcessLocal,
    SendResult,
    Sink,
    SinkConfig,
    SinkContext,
    check_headers,
    is_secret_name,
    mask,
    mask_url,
    pack,
    raise_for_status,
    send_in_parts,
    split_url,
)
from waypost.testing import RecordingServer, Response, free_port, make_events

TOKEN = "tok-5b1e0c7d9a-never-shown"
PASSWORD = "pw-2f8e61c0-never-shown"


class EchoConfig(SinkConfig):
    url: str
    api_key: SecretStr = Field(default=SecretStr(TOKEN))


class EchoSink(Sink[EchoConfig]):
    """A sink of this test: posts the ids of a batch through the toolkit's transport."""

    type = "echo"

    def __init__(self, name: str, config: EchoConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        key = config.api_key.get_secret_value()
        self.http = HttpTransport(self, headers={"Authorization": f"Bearer {key}"}, what="echo")

    def send(self, events: Sequence[Event]) -> SendResult:
        self.http.send("POST", "", json=[e.id for e in events])
        return SendResult.ok()


def context(tmp_path: Path) -> SinkContext:
    return SinkContext(app="Toolkit Test", version="1.0", instance_id="i", data_dir=tmp_path)


def echo_sink(url: str, tmp_path: Path, **settings: Any) -> EchoSink:
    return EchoSink("echo", EchoConfig(url=url, **settings), context(tmp_path))


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer() as peer:
        yield peer


# --- the typed config -----------------------------------------------------------------------


def test_the_config_model_comes_from_the_type_parameter(tmp_path: Path) -> None:
    assert EchoSink.Config is EchoConfig
    sink = echo_sink("http://127.0.0.1:9/in", tmp_path)
    assert sink.config.url == "http://127.0.0.1:9/in"  # typed: no cast, no assert
    with pytest.warns(DeprecationWarning, match="use .config"):
        assert sink.settings is sink.config
    sink.close()


def test_a_sink_naming_its_config_the_old_way_keeps_it() -> None:
    class Old(Sink):
        type = "old"
        Config = EchoConfig

    assert Old.Config is EchoConfig
    assert Sink.Config is SinkConfig


# --- masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("token", True), ("api_key", True), ("X-API-Key", True), ("apikey", True),
        ("client_secret", True), ("sslpassword", True), ("sig", True),
        ("X-Amz-Signature", True), ("access_token", True), ("auth", True),
        ("measurement_id", False), ("project_id", False), ("strict", False),
        ("keyword", False), ("format", False), ("authenticator", False),
    ],
)  # fmt: skip
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_split_url_takes_out_user_info_and_secret_query_values() -> None:
    url = f"https://me:{PASSWORD}@h.example:8443/in?v=2&token={TOKEN}&key=k%2F1&x=a+b"
    clean, secrets = split_url(url)
    assert clean == "https://h.example:8443/in?v=2&token=***&key=***&x=a+b"
    assert (secrets.username, secrets.password) == ("me", PASSWORD)
    assert secrets.params == {"token": TOKEN, "key": "k/1"}
    assert TOKEN not in repr(secrets) and PASSWORD not in repr(secrets)
    with pytest.raises(ValueError, match="twice"):
        split_url("https://h.example/?token=a&token=b")


def test_mask_url_masks_credentials_wherever_they_stand() -> None:
    text = (
        f"POST https://me:{PASSWORD}@h.example/in?token={TOKEN}&page=2 failed; "
        "retry with Authorization: Bearer abcd1234efgh\nBasic authentication is required"
    )
    masked = mask_url(text)
    assert PASSWORD not in masked and TOKEN not in masked and "abcd1234efgh" not in masked
    assert "https://***@h.example/in?token=***&page=2" in masked
    assert "Basic authentication is required" in masked  # prose is left alone


def test_masker_knows_the_forms_an_answer_echoes() -> None:
    masker = Masker([f"Bearer {TOKEN}", "Basic bWU6c2VjcmV0LXZhbHVlLTE="])
    echoed = (
        f"got {TOKEN}; as JSON {json.dumps({'t': 'Bearer ' + TOKEN})}; encoded "
        f"{TOKEN.replace('-', '%2D')}; basic bWU6c2VjcmV0LXZhbHVlLTE= = me:secret-value-1"
    )
    masked = masker(echoed)
    assert TOKEN not in masked and "secret-value-1" not in masked
    assert "bWU6c2VjcmV0LXZhbHVlLTE" not in masked


def test_mask_is_the_masker_for_texts_of_no_sink() -> None:
    text = f"GET https://u:{PASSWORD}@h.example/?sig=abc123 said {json.dumps(TOKEN)} at 10:02"
    masked = mask(text, [TOKEN, PASSWORD])
    assert masked == Masker([TOKEN, PASSWORD])(text)
    assert masked == 'GET https://***@h.example/?sig=*** said "***" at 10:02'
    assert mask("nothing secret here, 200 OK") == "nothing secret here, 200 OK"


def test_masker_for_a_config_finds_every_secret() -> None:
    class Deep(SinkConfig):
        headers: dict[str, SecretStr] = Field(default_factory=dict)
        dsn: SecretStr = SecretStr(f"postgresql://u:{PASSWORD}@db/x")
        note: str = "plain"

    masker = Masker.for_config(Deep(headers={"X-Key": SecretStr(TOKEN)}))
    assert masker(f"{TOKEN} {PASSWORD} plain") == "*** *** plain"


def test_config_repr_and_errors_never_show_url_credentials() -> None:
    class Vendor(HttpSinkConfig):
        default_hosts = {"": "https://vendor.example"}

    config = Vendor(host=f"https://me:{PASSWORD}@vendor.example")
    assert config.host == "https://vendor.example"
    assert config.url_secrets.password == PASSWORD
    for text in (repr(config), str(config), json.dumps(config.model_dump())):
        assert PASSWORD not in text
    with pytest.raises(ValueError) as info:
        Vendor(host=f"http://me:{PASSWORD}@vendor.example/?token={TOKEN}")
    assert "allow_http" in str(info.value)
    assert PASSWORD not in str(info.value) and TOKEN not in str(info.value)


# --- the transport against real peers ----------------------------------------------------------


def test_requests_carry_the_agent_and_the_timeout(server: RecordingServer, tmp_path: Path) -> None:
    sink = echo_sink(f"{server.url}/in", tmp_path, timeout=3)
    events = make_events(2)
    assert not sink.send(events).failed
    (request,) = server.requests
    assert request.path == "/in" and request.json() == [e.id for e in events]
    assert request.header("User-Agent") == f"Toolkit-Test/1.0 waypost/{_version()}"
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    assert sink.http.client.timeout.read == 3
    sink.close()
    sink.close()


def _version() -> str:
    import waypost

    return waypost.__version__


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(
    server: RecordingServer, tmp_path: Path
) -> None:
    with RecordingServer() as elsewhere:
        target = f"http://me:{PASSWORD}@127.0.0.1:{elsewhere.port}/steal?token={TOKEN}&page=1"
        server.responder = lambda r: Response(302, "", headers={"Location": target})
        sink = echo_sink(f"{server.url}/in", tmp_path)
        with pytest.raises(PermanentError) as info:
            sink.send(make_events(1))
        sink.close()
        assert elsewhere.requests == []
    assert len(server.requests) == 1
    reason = info.value.reason
    assert "HTTP 302" in reason and "redirected to http://***@127.0.0.1" in reason
    assert "/steal?token=***&page=1" in reason
    assert PASSWORD not in reason and TOKEN not in reason


def test_credentials_echoed_by_the_endpoint_stay_out_of_the_reason(
    server: RecordingServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def echo(request: Any) -> Response:
        return Response(
            401,
            {"error": "unauthorized", "you_sent": dict(request.headers), "query": request.query},
        )

    server.responder = echo
    url = f"http://user:{PASSWORD}@{server.host}:{server.port}/in?token={TOKEN}"

    class UrlConfig(SinkConfig):
        url: str

        def model_post_init(self, _: Any) -> None:
            object.__setattr__(self, "url", self._take_url_secrets(self.url, "url"))

    class UrlSink(Sink[UrlConfig]):
        type = "url"

    sink = UrlSink("u", UrlConfig(url=url), context(tmp_path))
    http = HttpTransport(sink, headers={"X-Api-Key": TOKEN + "-2"})
    with pytest.raises(PermanentError) as info:
        http.send("POST", json=[1])
    http.close()
    (request,) = server.requests
    assert request.query["token"] == [TOKEN]  # the wire has it...
    assert (request.header("Authorization") or "").startswith("Basic ")
    reason = info.value.reason
    assert "HTTP 401" in reason and "unauthorized" in reason
    for secret in (TOKEN, PASSWORD, TOKEN + "-2", request.header("Authorization")):
        assert secret and secret not in reason  # ...no text does
        assert secret not in caplog.text
    assert "?token=***" in caplog.text  # httpx's own request line, as it saw the URL


def test_transport_errors_are_retryable_with_a_reason(tmp_path: Path) -> None:
    sink = echo_sink(f"http://127.0.0.1:{free_port()}/in", tmp_path, timeout=2)
    with pytest.raises(RetryableError, match=r"echo: cannot reach http://127\.0\.0\.1:\d+/in: Co"):
        sink.send(make_events(1))
    sink.close()


def test_a_slow_answer_times_out(server: RecordingServer, tmp_path: Path) -> None:
    server.responder = lambda r: Response(200, {}, delay=3)
    sink = echo_sink(f"{server.url}/in", tmp_path, timeout=0.3)
    with pytest.raises(
        RetryableError, match=r"no answer within 0\.3 s from http://.*/in \(ReadTimeout\)"
    ):
        sink.send(make_events(1))
    sink.close()


def test_a_reset_and_a_broken_answer_are_retryable(server: RecordingServer, tmp_path: Path) -> None:
    server.answer(Response(reset=True))
    sink = echo_sink(f"{server.url}/in", tmp_path)
    with pytest.raises(RetryableError):
        sink.send(make_events(1))
    sink.close()
    with _garbage_server() as port:
        sink = echo_sink(f"http://127.0.0.1:{port}/in", tmp_path)
        with pytest.raises(RetryableError, match="RemoteProtocolError"):
            sink.send(make_events(1))
        sink.close()


class _garbage_server:
    """Answers every connection with bytes that are not HTTP."""

    def __enter__(self) -> int:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()
        return int(self._sock.getsockname()[1])

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-not-http\r\n\r\n")

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def test_statuses_are_classified_with_masked_bodies(
    server: RecordingServer, tmp_path: Path
) -> None:
    sink = echo_sink(f"{server.url}/in", tmp_path)
    cases = [
        (Response(503, f"down, key {TOKEN}", headers={"Retry-After": "9"}), RetryableError),
        (Response(413, "too big"), PayloadTooLarge),
        (Response(422, {"detail": f"Bearer {TOKEN} refused"}), PermanentError),
    ]
    for answer, kind in cases:
        server.answer(answer)
        with pytest.raises(kind) as info:
            sink.send(make_events(1))
        assert TOKEN not in info.value.reason and f"HTTP {answer.status}" in info.value.reason
    assert info.value.retry_after is None
    server.answer(Response(503, "", headers={"Retry-After": "9"}))
    with pytest.raises(RetryableError) as retry:
        sink.send(make_events(1))
    assert retry.value.retry_after == 9
    sink.close()


def test_raise_for_status_names_where_a_redirect_pointed() -> None:
    with pytest.raises(PermanentError, match=r"HTTP 301: redirected to https://new\.example/in"):
        raise_for_status(301, {"location": "https://new.example/in"}, what="")
    with pytest.raises(PermanentError, match="HTTP 307: redirected, which waypost"):
        raise_for_status(307)
    raise_for_status(204)


# --- fork -------------------------------------------------------------------------------------


@dataclass
class _Seen:
    port: int
    pid: str
    ids: list[str]


class _PortServer:
    """An HTTP/1.1 keep-alive server that notes each request's client port and sender pid."""

    def __init__(self) -> None:
        self.seen: list[_Seen] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                peer.seen.append(_Seen(self.client_address[1], body["pid"], body["ids"]))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_connection(tmp_path: Path) -> None:
    peer = _PortServer()
    sink = echo_sink(f"{peer.url}/in", tmp_path)

    def post(events: list[Event]) -> None:
        body = {"pid": str(os.getpid()), "ids": [e.id for e in events]}
        sink.http.send("POST", content=json.dumps(body).encode())

    sent = [make_events(3) for _ in range(4)]
    try:
        post(sent[0])  # the parent's keep-alive connection is open when it forks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
            pid = os.fork()
        if pid == 0:  # the child: one batch of its own, then gone without cleanup
            code = 0
            try:
                post(sent[1])
                sink.close()  # closes nothing of the parent's
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        post(sent[2])  # the parent's connection still works after the child closed its own
        post(sent[3])
    finally:
        sink.close()
        peer.close()
    by_pid: dict[str, set[int]] = {}
    for seen in peer.seen:
        by_pid.setdefault(seen.pid, set()).add(seen.port)
    assert set(by_pid) == {str(os.getpid()), str(pid)}
    assert not by_pid[str(os.getpid())] & by_pid[str(pid)], by_pid  # no shared connection
    assert len(by_pid[str(os.getpid())]) == 1  # the parent kept its one keep-alive connection
    received = [i for seen in peer.seen for i in seen.ids]
    assert sorted(received) == sorted(e.id for batch in sent for e in batch)  # each once


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_process_local_rebuilds_in_a_child_and_never_closes_the_parents() -> None:
    closed: list[int] = []
    local: ProcessLocal[list[int]] = ProcessLocal(lambda: [os.getpid()], closed.extend)
    parent_value = local.get()
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        child_value = local.get()
        local.close()
        ok = child_value == [os.getpid()] and closed == [os.getpid()]
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
    assert local.get() is parent_value and closed == []
    local.close()
    assert closed == [os.getpid()]


# --- one batch, several requests ---------------------------------------------------------------


@dataclass
class _Part:
    events: list[Event]


def _parts(events: list[Event], size: int) -> list[_Part]:
    return [_Part(events[i : i + size]) for i in range(0, len(events), size)]


def _scripted(*outcomes: Exception | None) -> tuple[Any, list[_Part]]:
    sent: list[_Part] = []
    script = list(outcomes)

    def send(part: _Part) -> None:
        sent.append(part)
        outcome = script.pop(0) if script else None
        if outcome is not None:
            raise outcome

    return send, sent


def test_parts_a_retryable_failure_holds_back_the_rest() -> None:
    events = make_events(6)
    send, sent = _scripted(None, RetryableError("busy", retry_after=5))
    result = send_in_parts(_parts(events, 2), send)
    assert len(sent) == 2
    assert set(result.retry) == {e.id for e in events[2:]} and not result.failed
    assert result.retry_after == 5 and result.retry[events[5].id] == "busy"


def test_parts_a_failure_before_anything_is_decided_is_the_whole_batchs() -> None:
    events = make_events(6)
    for error in (RetryableError("down"), PayloadTooLarge("413")):
        send, sent = _scripted(error)
        with pytest.raises(type(error)):
            send_in_parts(_parts(events, 2), send)
        assert len(sent) == 1
    send, _ = _scripted(PermanentError("bad key"))
    with pytest.raises(PermanentError):
        send_in_parts(_parts(events, 6), send)  # one part: raised as it is


def test_parts_a_permanent_failure_fails_its_part_only() -> None:
    events = make_events(6)
    send, sent = _scripted(PermanentError("bad event"), None, None)
    result = send_in_parts(_parts(events, 2), send)
    assert len(sent) == 3
    assert set(result.failed) == {e.id for e in events[:2]} and not result.retry
    send, sent = _scripted(None, PermanentError("not found"))
    result = send_in_parts(_parts(events, 2), send, permanent_fails_rest=True)
    assert len(sent) == 2 and set(result.failed) == {e.id for e in events[2:]}


def test_parts_413_splits_or_fails_alone_or_retries_later() -> None:
    events = make_events(4)
    send, sent = _scripted(PayloadTooLarge("413"), None, PayloadTooLarge("413"))

    def halves(part: _Part) -> list[_Part]:
        half = len(part.events) // 2
        return [_Part(part.events[:half]), _Part(part.events[half:])]

    result = send_in_parts(_parts(events, 4), send, split=halves)
    assert [len(p.events) for p in sent] == [4, 2, 2, 1, 1]
    assert not result.retry and not result.failed
    send, sent = _scripted(None, PayloadTooLarge("413"))
    result = send_in_parts(_parts(events, 2), send)
    assert set(result.retry) == {e.id for e in events[2:]}  # resent later (the core splits)
    send, _ = _scripted(None, PayloadTooLarge("413"))
    result = send_in_parts(_parts(events, 1), send)
    assert result.failed == {events[1].id: "event too large: 413"}


def test_parts_a_destination_asking_to_wait_holds_back_the_rest() -> None:
    events = make_events(4)
    result = SendResult()

    def throttled(part: _Part) -> None:
        result.mark_retry(part.events[0], "throttled")
        result.retry_after = 30

    outcome = send_in_parts(_parts(events, 2), throttled, result)
    assert outcome is result and result.retry_after == 30
    assert set(result.retry) == {events[0].id, events[2].id, events[3].id}
    assert "held back" in result.retry[events[2].id]


# --- the guide's example ------------------------------------------------------------------------


def test_the_guides_toolkit_example_works_as_written(
    server: RecordingServer, tmp_path: Path
) -> None:
    import re

    guide = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"
    (code,) = re.findall(
        r"<!-- toolkit-example -->\n```python\n(.*?)\n```\n", guide.read_text(), re.DOTALL
    )

    class AcmeConfig(HttpSinkConfig):
        default_hosts = {"": "https://api.acme.example"}
        api_key: SecretStr

    namespace: dict[str, Any] = {"AcmeConfig": AcmeConfig, "__name__": "waypost_acme_guide"}
    exec(compile(code, str(guide), "exec"), namespace)
    sink_class = namespace["AcmeToolkitSink"]
    assert sink_class.Config is AcmeConfig
    config = AcmeConfig(api_key=SecretStr(TOKEN), host=server.url)
    sink = sink_class("acme", config, context(tmp_path))
    server.answer(
        Response(200, {"errors": [{"index": 1, "message": f"bad name (key {TOKEN})"}]}),
        Response(401, {"error": f"unknown key {TOKEN}"}),
    )
    events = make_events(3)
    result = sink.send(events)
    assert list(result.failed) == [events[1].id]
    assert result.failed[events[1].id] == "Acme refused it: bad name (key ***)"
    with pytest.raises(PermanentError, match=r"Acme: HTTP 401: .*unknown key \*\*\*"):
        sink.send(events)
    assert server.requests[0].path == "/v1/batch"
    assert server.requests[0].header("Authorization") == f"Bearer {TOKEN}"
    sink.close()


# --- test_request, ownership, headers, packing ------------------------------------------------


def test_test_request_reports_the_answer_masked(server: RecordingServer, tmp_path: Path) -> None:
    sink = echo_sink(f"{server.url}/in", tmp_path)
    server.answer(
        Response(200, {"ok": True, "seen": f"Bearer {TOKEN}"}),
        Response(403, f"no: {TOKEN}"),
    )
    event = make_events(1)[0]
    assert sink.http.test_request(event) == {
        "delivered": True,
        "url": f"{server.url}/in",
        "status": 200,
        "answer": {"ok": True, "seen": "***"},
    }
    refused = sink.http.test_request(event)
    assert refused["delivered"] is False and refused["retryable"] is False
    assert refused["status"] == 403 and refused["answer"] == "no: ***"
    assert "HTTP 403" in refused["reason"] and TOKEN not in str(refused)
    sink.close()
    unreachable = echo_sink(f"http://127.0.0.1:{free_port()}/in", tmp_path, timeout=2)
    report = unreachable.http.test_request(event)
    assert report["delivered"] is False and report["retryable"] is True
    assert "cannot reach" in report["reason"] and "status" not in report
    unreachable.close()


def test_a_sink_that_owns_a_transport_reports_its_answer_by_default(
    server: RecordingServer, tmp_path: Path
) -> None:
    sink = echo_sink(f"{server.url}/in", tmp_path)
    server.answer(Response(401, f"no: {TOKEN}"))
    report = sink.test_request(make_events(1)[0])
    assert report["status"] == 401 and report["answer"] == "no: ***"
    assert report["delivered"] is False and report["retryable"] is False
    sink.close()


class VendorLayerSink(Sink[EchoConfig]):
    """A sink of this test on a "vendor's" request layer (httpx called directly)."""

    type = "vendor"

    def __init__(self, name: str, config: EchoConfig, context: SinkContext) -> None:
        super().__init__(name, config, context)
        self.answers = self.own(Answers())

    def send(self, events: Sequence[Event]) -> SendResult:
        import httpx

        answer = httpx.post(self.config.url, json=[e.id for e in events])
        self.answers.keep(answer)
        raise_for_status(answer.status_code, answer.headers, answer.text, mask=self.mask)
        return SendResult.ok()


def test_a_sink_that_owns_answers_reports_them_by_default(
    server: RecordingServer, tmp_path: Path
) -> None:
    sink = VendorLayerSink("v", EchoConfig(url=f"{server.url}/in"), context(tmp_path))
    sink.open()
    server.answer(Response(200, {"ok": True}), Response(400, f"bad key {TOKEN}"))
    event = make_events(1)[0]
    assert sink.test_request(event) == {
        "delivered": True,
        "url": f"{server.url}/in",
        "status": 200,
        "answer": {"ok": True},
    }
    refused = sink.test_request(event)
    assert refused["status"] == 400 and refused["answer"] == "bad key ***"
    assert refused["delivered"] is False and "bad key ***" in refused["reason"]
    sink.close()
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [200, 202, 400, 503])
def test_an_unreadable_answer_is_retried_on_2xx_and_classified_otherwise(
    server: RecordingServer, tmp_path: Path, status: int
) -> None:
    sink = echo_sink(f"{server.url}/in", tmp_path)
    server.answer(Response(status, f"<html>{TOKEN}</html>", headers={"Retry-After": "7"}))
    answer = sink.http.request("POST", "")
    with pytest.raises((RetryableError, PermanentError)) as info:
        sink.http.unreadable(answer, "without Echo's JSON answer")
    sink.close()
    error = info.value
    assert TOKEN not in error.reason and f"HTTP {status}" in error.reason
    if status < 300:
        assert isinstance(error, RetryableError) and error.retry_after == 7.0
        assert error.reason.startswith(f"echo: HTTP {status} without Echo's JSON answer: ")
    else:
        assert isinstance(error, RetryableError) == (status == 503)


def test_clean_message_keeps_our_names_and_hides_quoted_values() -> None:
    from waypost.sinks import clean_message

    message = (
        'ERROR: duplicate key value violates "waypost_events_pkey"\n'
        "DETAIL:  Key (id)=('jane@example.com') already exists.\n"
        "LINE 1: INSERT INTO waypost_events VALUES ('secret row')"
    )
    clean = clean_message(message, ["waypost_events", "waypost_events_pkey"])
    assert clean == 'ERROR: duplicate key value violates "waypost_events_pkey"'
    assert clean_message("value 'x' in 'waypost_events.id'", ["waypost_events", "id"]) == (
        "value '…' in 'waypost_events.id'"
    )
    assert clean_message("at 'db.example' port 5432", [], redact=False) == (
        "at 'db.example' port 5432"
    )
    assert len(clean_message("x" * 1000, [], limit=50)) == 50


def test_a_sink_opens_and_closes_what_it_owns(tmp_path: Path) -> None:
    sink = echo_sink("http://127.0.0.1:9/in", tmp_path)
    built: list[int] = []
    closed: list[int] = []
    local = sink.own(ProcessLocal(lambda: built.append(1) or 1, closed.append))
    assert not sink.http._clients.built and not local.built
    sink.open()
    assert sink.http._clients.built and local.built and built == [1]
    sink.close()
    sink.close()
    assert not sink.http._clients.built and closed == [1]


def test_check_headers_refuses_what_would_corrupt_a_request() -> None:
    good = {"X-Tenant": SecretStr("acme"), "Authorization": SecretStr(f"Bearer {TOKEN}")}
    assert check_headers(good) is good
    for headers, reason in (
        ({"Content-Length": SecretStr("1")}, "set by the sink itself"),
        ({"X-Sig": SecretStr("s")}, "set by the sink itself"),
        ({"bad name": SecretStr("v")}, "not a valid HTTP header name"),
        ({"X-Token": SecretStr(f"{TOKEN}\r\nX-Evil: 1")}, "line break"),
    ):
        with pytest.raises(ValueError, match=reason) as info:
            check_headers(headers, reserved=("x-sig",))
        assert TOKEN not in str(info.value)


def test_pack_keeps_order_count_and_weight() -> None:
    events = make_events(7)
    weights = [3, 3, 3, 9, 1, 1, 1]
    chunks = pack(
        ((e, i, w) for i, (e, w) in enumerate(zip(events, weights, strict=True))), 6, max_items=2
    )
    assert [c.items for c in chunks] == [[0, 1], [2], [3], [4, 5], [6]]
    assert [e for c in chunks for e in c.events] == events
    assert all(isinstance(c, Chunk) for c in chunks) and pack([], 6) == []


def test_pack_refuses_what_is_over_the_limit_per_event() -> None:
    events = make_events(5)
    weights = [3, 7, 3, 5, 2]
    weighted = [(e, i, w) for i, (e, w) in enumerate(zip(events, weights, strict=True))]
    result = SendResult()
    chunks = pack(weighted, 6, result=result, too_large=lambda w: f"{w} is over 6")
    assert [c.items for c in chunks] == [[0, 2], [3], [4]]
    assert result.failed == {events[1].id: "7 is over 6"} and not result.retry
    # A limit per event of its own: lower than the request's here.
    result = SendResult()
    chunks = pack(weighted, 6, result=result, too_large=lambda w: "too large", item_limit=4)
    assert [c.items for c in chunks] == [[0, 2], [4]]
    assert set(result.failed) == {events[1].id, events[3].id}
    with pytest.raises(TypeError, match="together"):
        pack(weighted, 6, result=SendResult())


def test_a_requests_session_keeps_to_the_threads_body_limit(
    server: RecordingServer, tmp_path: Path
) -> None:
    from waypost.sinks import BodyOverLimit, body_limit, requests_session

    sink = echo_sink(f"{server.url}/in", tmp_path)
    session = requests_session(sink)
    body = b"x" * 100
    with body_limit(99), pytest.raises(BodyOverLimit) as caught:
        session.post(f"{server.url}/in", data=body)
    assert (caught.value.size, caught.value.limit) == (100, 99)
    assert server.requests == []  # refused before it left
    with body_limit(100):
        assert session.post(f"{server.url}/in", data=body).status_code == 200
        with body_limit(0):  # no limit within, the outer one again after
            assert session.post(f"{server.url}/in", data=body * 10).status_code == 200
        with pytest.raises(BodyOverLimit):
            session.post(f"{server.url}/in", data=body + b"!")
    assert session.post(f"{server.url}/in", data=body * 10).status_code == 200  # none outside

    seen: list[BaseException] = []

    def other_thread() -> None:  # the limit is the thread's that set it
        try:
            session.post(f"{server.url}/in", data=body * 10)
        except BaseException as exc:  # pragma: no cover (the failure this test is for)
            seen.append(exc)

    with body_limit(10):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
    assert seen == [] and not thread.is_alive()
    assert [len(r.raw) for r in server.requests] == [100, 1000, 1000, 1000]
    session.close()
    sink.close()


def test_render_shows_the_request_as_it_would_go(server: RecordingServer, tmp_path: Path) -> None:
    sink = echo_sink(f"{server.url}/in", tmp_path)
    http = sink.http
    assert http.render("POST", "/f", data={"data": "[1]", "ip": "0"}) == {
        "method": "POST",
        "url": f"{server.url}/in/f",
        "content_type": "application/x-www-form-urlencoded",
        "form": {"data": "[1]", "ip": "0"},
    }
    assert http.render("PUT", json={"a": 1}, params={"v": "2"})["url"] == f"{server.url}/in?v=2"
    assert http.render("PUT", json={"a": 1})["body"] == {"a": 1}
    typed = HttpTransport(sink, headers={"Content-Type": "application/json; charset=UTF-8"})
    shown = typed.render("POST", content=b'{"events": []}')
    assert shown["content_type"] == "application/json; charset=UTF-8"
    assert shown["body"] == {"events": []}
    assert http.render("POST", content=b"a,b")["body"] == "a,b"
    secret = HttpTransport(sink, params={"api_secret": TOKEN})
    assert secret.render("POST", "/x")["url"] == f"{server.url}/in/x?api_secret=***"
    assert server.requests == []  # nothing is sent
    sink.close()


def test_not_blank_refuses_blank_text_and_secrets() -> None:
    from pydantic import ValidationError

    from waypost.sinks import not_blank

    class KeyConfig(SinkConfig):
        api_key: SecretStr
        project: str = "p"
        _filled = not_blank("api_key", "project")

    assert KeyConfig(api_key=SecretStr(TOKEN)).api_key.get_secret_value() == TOKEN
    for given in ({"api_key": " \n"}, {"api_key": TOKEN, "project": ""}):
        with pytest.raises(ValidationError) as caught:
            KeyConfig(**given)
        (error,) = caught.value.errors()
        assert error["msg"] == f"Value error, {error['loc'][0]} must not be empty"


def test_not_blank_has_a_type_that_strict_mypy_checks(tmp_path: Path) -> None:
    # A plugin names it in a config class's body: that must pass mypy strict, and what it
    # returns must not be Any (which would let it stand wherever a plugin put it).
    api = pytest.importorskip("mypy.api")
    module = tmp_path / "plugin_config.py"
    module.write_text(
        "from pydantic import SecretStr\n"
        "from waypost.sinks import SinkConfig, not_blank\n"
        "class KeyConfig(SinkConfig):\n"
        "    api_key: SecretStr\n"
        '    _filled = not_blank("api_key")\n'
        'wrong: int = not_blank("api_key")\n',
        encoding="utf-8",
    )
    root = Path(__file__).parent.parent
    out, err, _ = api.run(
        ["--config-file", str(root / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
         str(module)]
    )  # fmt: skip
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "plugin_config.py:6:" in errors[0], (out, err)
    assert "Incompatible types in assignment" in errors[0] and "classmethod" in errors[0], out


def test_sift_marks_what_a_rule_refuses_and_keeps_the_rest_in_order() -> None:
    from waypost.sinks import sift

    events = make_events(4)
    result = SendResult()
    kept = sift(events, lambda e: "odd one" if e is events[1] else None, result)
    assert kept == [events[0], events[2], events[3]]
    assert result.failed == {events[1].id: "odd one"} and not result.retry


def test_requests_errors_are_retryable_with_a_masked_reason(
    server: RecordingServer, tmp_path: Path
) -> None:
    from waypost.sinks import requests_errors, requests_session

    sink = echo_sink(f"{server.url}/in", tmp_path, timeout=0.5)
    session = requests_session(sink)
    server.answer(Response(200, "late", delay=3))
    with pytest.raises(RetryableError) as slow, requests_errors(sink, f"{server.url}/in", "Echo"):
        session.post(f"{server.url}/in", timeout=sink.config.timeout)
    assert slow.value.reason == f"Echo: no answer from {server.url}/in within 0.5 s"
    closed = f"http://127.0.0.1:{free_port()}/in"
    with pytest.raises(RetryableError) as refused, requests_errors(sink, closed):
        session.post(closed, timeout=2)
    assert refused.value.reason == f"cannot reach {closed}: ConnectionError"
    with pytest.raises(RetryableError) as shown, requests_errors(sink, f"{closed}?key={TOKEN}"):
        session.post(closed, timeout=2)
    assert TOKEN not in shown.value.reason  # a URL given with its query is masked
    with requests_errors(sink, closed):  # an answer, whatever its status, is not an error here
        server.answer(Response(503, "busy"))
        assert session.post(f"{server.url}/in").status_code == 503
    session.close()
    sink.close()


def test_keep_forever_keeps_an_inherited_client_even_without_the_list() -> None:
    import gc
    import platform

    from waypost.processes import FORK_KEEP
    from waypost.sinks import keep_forever

    freed: list[str] = []

    class Client:
        def __init__(self, name: str) -> None:
            self.name = name

        def __del__(self) -> None:
            freed.append(self.name)

    kept, dropped = Client("kept"), Client("dropped")
    keep_forever(kept)
    assert FORK_KEEP[-1] is kept
    FORK_KEEP.remove(kept)  # as interpreter teardown clears the list
    del kept, dropped
    gc.collect()
    if platform.python_implementation() == "CPython":  # elsewhere only the list keeps it
        assert freed == ["dropped"]


def test_cloudevent_wraps_the_envelope() -> None:
    from waypost.sinks.cloudevents import cloudevent

    event = make_events(1, name="build_done")[0]
    shown = cloudevent(event, "/waypost/My%20App", "com.acme.")
    assert shown == {
        "specversion": "1.0",
        "id": event.id,
        "source": "/waypost/My%20App",
        "type": "com.acme.build_done",
        "time": event.iso_timestamp,
        "datacontenttype": "application/json",
        "data": event.to_dict(),
    }
    assert cloudevent(event, "/s")["type"] == "waypost.build_done"
    json.dumps(shown)  # plain JSON data
