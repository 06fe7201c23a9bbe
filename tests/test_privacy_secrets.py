"""No secret printed anywhere: secrets in every config place and in the endpoint's answers (a
loopback server echoing the request's credentials in 4xx and 5xx bodies), then every log level
of every logger, ``status()``, the outbox, reprs and dumps, errors, the CLI and the admin pages
searched for them."""

from __future__ import annotations

import base64
import gc
import json
import logging
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from privacy_corpus import readings
from pydantic import BaseModel, SecretStr

import waypost
from waypost.config import TelemetryConfig
from waypost.errors import ConfigError
from waypost.privacy import Sanitiser
from waypost.privacy.secrets import is_secret_name, masked, secret_values
from waypost.testing import RecordingServer, Response

Factory = Callable[..., Any]

USER = "deploy"
PASSWORD = "pa55/w@rd:x1Q"  # a "/", an "@" and a ":", as the issue found them
URL_TOKEN = "qtok-7d1e5f2a9bc3"
HEADER_TOKEN = "hdr-9a8b7c6d5e4f3a2b"
SIGNING = "signing-secret-0123456789abcdef"
POSTHOG_KEY = "phc_EchoedProjectKey12345678"
EXPORTER_KEY = "otlp-key-5566778899"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRETS = (PASSWORD, URL_TOKEN, HEADER_TOKEN, SIGNING, POSTHOG_KEY, EXPORTER_KEY, BASIC)


def leaked(text: str) -> list[str]:
    """The secrets readable in ``text`` in any decoding (percent, JSON, HTML)."""
    views = list(readings(text))
    return [s for s in SECRETS if any(s in view for view in views)]


def echo(request: Any) -> Response:
    """An endpoint that refuses every request and quotes back everything it was sent."""
    query = urllib.parse.urlencode(request.query, doseq=True)
    body = (
        f"refused: Authorization={request.header('Authorization')} "
        f"X-Api-Key={request.header('X-Api-Key')} path={request.path}?{query} "
        f"body={request.text[:400]}"
    )
    status = 500 if request.path.startswith("/ingest2") else 401
    return Response(status, {"error": body, "headers": dict(request.headers)})


@pytest.fixture
def echo_server() -> Iterator[Any]:
    with RecordingServer(echo) as server:
        yield server


def sinks_for(server: Any, tmp_path: Path) -> dict[str, Any]:
    host = server.url.split("://", 1)[1]
    userinfo = f"{USER}:{urllib.parse.quote(PASSWORD, safe='')}"
    return {
        "ingest": {
            "type": "http",
            "url": f"http://{userinfo}@{host}/ingest?token={URL_TOKEN}&v=2",
            "signing_secret": SIGNING,
        },
        "ingest2": {
            "type": "http",
            "url": f"{server.url}/ingest2",
            "headers": {"X-Api-Key": HEADER_TOKEN},
        },
        "file": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")},
    }


def config_for(server: Any, tmp_path: Path) -> dict[str, Any]:
    return {
        "telemetry": {
            "app": "secrets",
            "data_dir": str(tmp_path / "data"),
            "notice": {"enabled": False},
            "batch": {"interval": 0.05},
            "retry": {"initial": 0.05, "maximum": 0.2},
            "outbox": {"keep_sent": "1d"},
            "sinks": sinks_for(server, tmp_path),
        }
    }


# --- the sanitiser ------------------------------------------------------------------------------


def test_the_sanitiser_masks_known_values_in_every_form_they_are_quoted_in() -> None:
    sanitiser = Sanitiser([f"Bearer {HEADER_TOKEN}", f"Basic {BASIC}", PASSWORD])
    for text in (
        HEADER_TOKEN, urllib.parse.quote(PASSWORD, safe=""), json.dumps(PASSWORD),
        urllib.parse.quote_plus(PASSWORD), BASIC, f"{USER}:{PASSWORD}",
    ):  # fmt: skip
        clean = sanitiser(f"HTTP 401: echoed {text} back")
        assert leaked(clean) == [], (text, clean)
        assert clean.startswith("HTTP 401: echoed ")


def test_the_sanitiser_runs_the_scrubbers_and_keeps_the_destination() -> None:
    text = (
        "POST https://bob:hunter2@10.1.2.3:8443/in?api_key=abcdef123456&page=2 failed for "
        "jane@example.com: Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    )
    clean = Sanitiser()(text)
    for gone in ("hunter2", "abcdef123456", "jane@example.com", "eyJzdWIiOiJ4In0"):
        assert gone not in clean
    assert "10.1.2.3:8443/in" in clean and "page=2" in clean  # where it went stays
    assert Sanitiser()("key=abc123 keyboard=us") == "key=*** keyboard=us"


def test_secret_values_are_found_wherever_a_config_holds_them() -> None:
    class Nested(BaseModel):
        token: SecretStr
        plain: str = "ordinary"

    class Config(BaseModel):
        url: str
        headers: dict[str, str]
        nested: Nested
        extra: dict[str, Any]

    config = Config(
        url=f"https://{USER}:{urllib.parse.quote(PASSWORD)}@h.example/?sig={URL_TOKEN}&v=1",
        headers={"X-Anything": HEADER_TOKEN},
        nested=Nested(token=SecretStr(SIGNING)),
        extra={"write_key": POSTHOG_KEY, "list": [{"password": EXPORTER_KEY}], "ref": "${X}"},
    )
    found = set(secret_values(config))
    assert {PASSWORD, URL_TOKEN, HEADER_TOKEN, SIGNING, POSTHOG_KEY, EXPORTER_KEY} <= found
    assert "ordinary" not in found and "${X}" not in found and "1" not in found
    # A user name beside a password is no secret; user info without a password is one.
    assert USER not in found
    assert "tok3n-as-user" in set(secret_values({"url": "https://tok3n-as-user@h.example/"}))


@pytest.mark.parametrize("cut", [6, 9, len(HEADER_TOKEN) - 1])
def test_a_secret_cut_short_at_the_end_of_a_reason_is_masked_too(cut: int) -> None:
    sanitiser = Sanitiser([HEADER_TOKEN, "https://h.example/in"])
    answer = f"refused: the key {HEADER_TOKEN} is not valid"
    reason = f"HTTP 401: {answer[: len('refused: the key ') + cut]}"  # as a snippet cuts it
    assert sanitiser(reason) == "HTTP 401: refused: the key ***"
    assert sanitiser("sent to https://h") == "sent to https://h"  # a URL's beginning is no secret


def test_a_held_secret_is_known_until_its_last_holder_lets_go() -> None:
    sanitiser = Sanitiser()
    first, second = sanitiser.hold([HEADER_TOKEN]), sanitiser.hold([HEADER_TOKEN, URL_TOKEN])
    sanitiser.add([SIGNING])  # for good
    text = f"{HEADER_TOKEN} {URL_TOKEN} {SIGNING}"
    assert sanitiser(text) == "*** *** ***"
    second.release()
    assert sanitiser(text) == f"*** {URL_TOKEN} ***"
    first.release()
    first.release()  # twice is harmless
    assert sanitiser(text) == f"{HEADER_TOKEN} {URL_TOKEN} ***"
    first.add([URL_TOKEN])  # a released hold that is added to holds again
    assert sanitiser(text) == f"{HEADER_TOKEN} *** ***"


def test_a_sinks_secrets_mask_its_own_texts_and_the_processs_only_while_it_lives() -> None:
    """A sink's secret may be a word of another's texts (a key set to a column name): the other
    sink's reasons keep it, and the process's sanitiser forgets it once the sink is gone."""
    from waypost.privacy import sanitise
    from waypost.sinks import Masker

    word, token = f"column_{uuid.uuid4().hex[:8]}", f"tok-{uuid.uuid4().hex}"
    text = f"merge on {word} refused for {token}"
    first, other = Masker([word, token]), Masker([f"tok-{uuid.uuid4().hex}"])
    assert first(text) == "merge on *** refused for ***"
    assert other(text) == text
    assert sanitise(text) == "merge on *** refused for ***"  # a library's log line, say
    del first
    gc.collect()
    assert sanitise(text) == text
    other.release()  # as the pipeline does once the sink is closed; it keeps masking its own
    assert other(f"tok-{token}") == f"tok-{token}"


@pytest.mark.http_sink
def test_a_telemetrys_secrets_are_forgotten_once_it_is_shut_down(
    echo_server: Any, tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    from waypost.privacy import sanitise

    token, key = f"tok-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    config = config_for(echo_server, tmp_path)
    config["telemetry"]["sinks"] = {
        "ingest": {"type": "http", "url": f"{echo_server.url}/in?token={token}"},
        "other": {"type": "http", "url": f"{echo_server.url}/in", "headers": {"X-K": "${K}"}},
    }
    tel = waypost.Telemetry(config=config, env={**waypost_clean_env, "K": key}, strict=False)
    try:
        assert sanitise(f"{token} {key}") == "*** ***"
    finally:
        tel.shutdown(2)
    assert sanitise(f"{token} {key}") == f"{token} {key}"


def test_the_gates_remarks_pass_the_sanitiser_unchanged_and_addresses_do_not() -> None:
    remarks = "email@context.deploy.owner, secret_key@properties.items[2].x, phone@distinct_id"
    clean = Sanitiser()(f"scrubbed ({remarks}) for jane@example.com \x007\x00")
    assert clean == f"scrubbed ({remarks}) for [REDACTED:email] "


@pytest.mark.parametrize(
    ("name", "secret"),
    [("token", True), ("api_key", True), ("X-API-Key", True), ("client_secret", True),
     ("sslpassword", True), ("sig", True), ("X-Amz-Signature", True), ("writeKey", True),
     ("measurement_id", False), ("project_id", False), ("strict", False), ("keyword", False)],
)  # fmt: skip
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


# --- the configuration shows no secret ----------------------------------------------------------


def test_the_config_repr_and_dumps_mask_every_secret(tmp_path: Path) -> None:
    with RecordingServer() as server:
        section = config_for(server, tmp_path)["telemetry"]
    section["sinks"]["posthog"] = {"type": "posthog", "api_key": POSTHOG_KEY, "host": "x"}
    section["sinks"]["ingest2"]["headers"]["Authorization"] = f"Bearer {HEADER_TOKEN}"
    section["metrics"] = {"otel": {"endpoint": "https://otlp.example", "headers": {
        "x-api-key": EXPORTER_KEY}}}  # fmt: skip
    config = TelemetryConfig.model_validate(section)
    for shown in (repr(config), str(config), config.model_dump_json(), str(config.model_dump()),
                  repr(config.metrics), json.dumps(config.model_dump(mode="json"))):  # fmt: skip
        assert leaked(shown) == [], shown
    # What the config holds is unchanged: only what it shows is masked.
    assert config.sink_specs()["posthog"]["api_key"] == POSTHOG_KEY
    assert masked({"headers": {"A": "x"}, "api_key": "${KEY}"}) == {
        "headers": {"A": "***"}, "api_key": "${KEY}"}  # fmt: skip


@pytest.mark.http_sink
def test_a_config_error_never_quotes_a_secret(
    tmp_path: Path, waypost_clean_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A URL refused for plain http:// to another host would be quoted whole.
    bad = {
        "type": "http",
        "url": f"http://{USER}:{PASSWORD}@collector.example/in?token={URL_TOKEN}",
    }
    tel = waypost.Telemetry(
        app="x",
        config={"telemetry": {"notice": {"enabled": False}, "sinks": {"bad": bad}}},
        data_dir=tmp_path / "d",
        env=waypost_clean_env,
    )
    try:
        (error,) = [s.error for s in tel.status().sinks]
        assert error and "http" in error
        assert leaked(error) == [] and leaked(caplog.text) == []
        with pytest.raises(ConfigError) as raised:
            waypost.Telemetry(
                app="x", strict=True, env=waypost_clean_env, data_dir=tmp_path / "e",
                config={"telemetry": {"notice": {"enabled": False}, "sinks": {"bad": bad}}},
            )  # fmt: skip
        assert leaked(str(raised.value)) == []
    finally:
        tel.shutdown(1)


def test_a_yaml_error_on_a_secrets_line_does_not_quote_it(
    tmp_path: Path, waypost_clean_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "telemetry.yml"
    path.write_text(
        "telemetry:\n  sinks:\n    posthog:\n"
        f'      api_key: "{POSTHOG_KEY}\n      host: https://eu.i.posthog.com\n'
        f"    ingest:\n      type: http\n      url: {{{PASSWORD}\n"
    )
    tel = waypost.Telemetry(app="x", config=path, data_dir=tmp_path / "d", env=waypost_clean_env)
    st = tel.status()
    assert st.config_error and not st.enabled
    assert leaked(st.config_error) == [] and leaked(st.reason) == [] and leaked(caplog.text) == []


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("telemetry:\n  sinks:\n    x:\n      token: 'zq81shapeless\n", "line 4, column 14"),
        ("telemetry:\n  sinks:\n    x: {url: zq81shapeless\n", "line 3, column 8"),
        ("telemetry:\n  app: x: zq81shapeless\n", "line 2, column 9"),
    ],
)
def test_a_yaml_error_names_the_line_and_column_and_quotes_nothing(
    tmp_path: Path, text: str, where: str
) -> None:
    path = tmp_path / "telemetry.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        waypost.config.load(path, {})
    message = str(raised.value)
    assert "zq81shapeless" not in message  # a secret with no shape a scrubber knows
    assert where in message and str(path) in message


# --- what an endpoint echoes is never copied ----------------------------------------------------


@pytest.mark.http_sink
def test_credentials_echoed_by_the_endpoint_are_printed_nowhere(
    echo_server: Any,
    tmp_path: Path,
    waypost_clean_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx's and httpcore's included
    config = config_for(echo_server, tmp_path)
    tel = waypost.Telemetry(config=config, env=waypost_clean_env, strict=False)
    try:
        for i in range(5):
            tel.track("echo", {"i": i})
        tel.flush(10)
        # Every sink that talks to the endpoint has been refused and has kept the reason.
        st = tel.status()
        errors = {s.name: s.last_error for s in st.sinks}
        assert all(errors[name] for name in ("ingest", "ingest2")), errors
        records, _ = tel.open_outbox().records(limit=100)
        assert any(r.last_error for r in records)
        shown = {
            "logs": caplog.text,
            "status": st.model_dump_json(),
            "outbox": json.dumps([r.as_dict() for r in records], default=str),
            "repr": repr(tel.config) + repr(tel) + "".join(repr(s) for s in tel.sinks.values()),
        }
        shown.update(admin_pages(tel))
        assert unguarded_loggers() == []
        assert "HTTP Request" in caplog.text  # httpx's own line was logged, and searched
        assert "401" in shown["admin /?format=json"]  # the reasons are shown, masked
        for where, text in shown.items():
            assert leaked(text) == [], where
    finally:
        tel.shutdown(2)
    # The endpoint did receive the credentials: the search above could have found them.
    received = json.dumps([[r.path, r.query, r.headers, r.text] for r in echo_server.requests])
    assert set(leaked(received)) >= {URL_TOKEN, HEADER_TOKEN}


def unguarded_loggers() -> list[str]:
    """Loggers of waypost, its plugins and the libraries sinks talk through that print records
    without the sanitising filter."""
    from waypost.logs import SANITISING
    from waypost.privacy.secrets import _GUARDED

    loggers = logging.Logger.manager.loggerDict
    return [
        name
        for name, logger in loggers.items()
        if isinstance(logger, logging.Logger)
        and (name.split(".")[0] in _GUARDED or name.split(".")[0].startswith("waypost"))
        and SANITISING not in logger.filters
    ]


ADMIN_PAGES = ("/", "/?format=json", "/records", "/records?format=json", "/consent", "/actions",
               "/manifest", "/records?state=failed", "/records?state=pending")  # fmt: skip


def admin_pages(tel: Any) -> dict[str, str]:
    """Every admin page, as an operator who is logged in sees it."""
    from starlette.testclient import TestClient

    from waypost.admin import create_app

    with TestClient(create_app(tel, auth=lambda request: True)) as client:
        pages = {f"admin {page}": client.get(page) for page in ADMIN_PAGES}
    assert all(r.status_code == 200 for r in pages.values()), pages
    return {where: r.text for where, r in pages.items()}


def run_cli(config_file: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "waypost.cli", "--config", str(config_file), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.http_sink
def test_no_cli_command_prints_a_secret(
    echo_server: Any, tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    # The answers quote the credentials back; the file holds them literally, as operators do.
    config_file = tmp_path / "telemetry.yml"
    config_file.write_text(json.dumps(config_for(echo_server, tmp_path)))
    tel = waypost.Telemetry(config=config_file, env=waypost_clean_env, strict=False)
    tel.track("echo", {"i": 1})
    tel.flush(10)
    tel.shutdown(2)
    env = {**waypost_clean_env, "PYTHONDONTWRITEBYTECODE": "1"}
    commands = [
        ["status"], ["status", "--json"], ["show"], ["show", "--json"], ["flush", "--timeout", "3"],
        ["flush", "--json", "--timeout", "3"], ["test-sink", "ingest"],
        ["test-sink", "ingest", "--json"], ["test-sink", "ingest2", "--json"],
        ["manifest"], ["manifest", "--json"], ["send-heartbeat"], ["send-heartbeat", "--json"],
        ["plugins"], ["plugins", "--json"], ["consent", "off", "--json"], ["consent", "on"],
        ["purge", "--sent", "--json"], ["purge", "--all", "--yes"], ["status"],
    ]  # fmt: skip
    for command in commands:
        proc = run_cli(config_file, *command, env=env)
        assert proc.returncode in (0, 1), (command, proc.stderr[-2000:])
        assert leaked(proc.stdout + proc.stderr) == [], command
