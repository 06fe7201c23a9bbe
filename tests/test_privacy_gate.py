"""The gate end to end: what a jsonl sink receives, what the outbox remembers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

import waypost
from waypost.events import Event

Factory = Callable[..., Any]

PLANTED = {
    "comment": "reach me at jane.doe@example.com",
    "peer": "connected from 203.0.113.42 and 2001:db8::42",
    "mapped": "::ffff:198.51.100.7",
    "card": "4111-1111-1111-1111",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJqYW5lIn0.c2lnbmF0dXJlc2lnbmF0dXJl",
    "aws": "key AKIAIOSFODNN7EXAMPLE in use",
    "github": "ghp_0123456789abcdefghijABCDEFGHIJ012345",
    "header": "Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "dsn": "postgresql://app:s3cretPass@db.internal:5432/prod",
    "cmd": "login --password=hunter2hunter2",
    "pem": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    "-----END PRIVATE KEY-----",
    "cwd": "/home/janedoe/projects/app",
    "mac": "/Users/janedoe/Library/Logs",
    "win": "C:\\Users\\Jane Doe\\AppData\\Local",
    "nested": {"list": ["ok", {"owner": "ops-team@example.org"}]},
    "ops@example.org": "an address as a key",
    "api_key": "opaque-value-by-name",
}
SECRETS = [
    "jane.doe@example.com", "203.0.113.42", "2001:db8::42", "198.51.100.7", "4111-1111-1111-1111",
    "eyJzdWIiOiJqYW5lIn0", "AKIAIOSFODNN7EXAMPLE", "ghp_0123456789abcdefghij",
    "9f8e7d6c5b4a39281706f5e4d3c2b1a0", "s3cretPass", "hunter2hunter2", "MIIEvQIBADANBgkqhkiG9w0",
    "janedoe", "Jane Doe", "ops-team@example.org", "ops@example.org", "opaque-value-by-name",
]  # fmt: skip
ORDINARY = {
    "version": "1.2.3",
    "build": "10.0.19041",
    "platform": "Linux-6.1.0-x86_64-with-glibc2.36",
    "component": "TextInput",
    "tokenCount": 512,
    "max_tokens": 4096,
    "startedAt": "2024-11-25T12:30:45.123Z",
    "ms": 1732531200000,
    "file": "flows/export.json",
}


def jsonl_telemetry(
    waypost_make_telemetry: Factory, tmp_path: Path, **kwargs: Any
) -> tuple[Any, Path]:
    path = tmp_path / "events.jsonl"
    config = {"outbox": {"keep_sent": "1d"}, **kwargs.pop("config", {})}
    tel = waypost_make_telemetry(sinks={"jsonl": {"path": str(path)}}, config=config, **kwargs)
    return tel, path


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_planted_personal_data_never_reaches_the_file(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path)
    tel.track("planted", {**PLANTED, **ORDINARY})
    assert tel.flush(5)
    raw = path.read_text(encoding="utf-8")
    for secret in SECRETS:
        assert secret not in raw, secret
    (event,) = lines(path)
    props = event["properties"]
    # What is not personal arrives untouched.
    assert {k: props[k] for k in ORDINARY} == ORDINARY
    assert props["comment"] == "reach me at [REDACTED:email]"
    assert props["cwd"] == "/home/<user>/projects/app"
    assert props["api_key"] == "[REDACTED:secret_key]"

    records, total = tel.open_outbox().records(name="planted")
    assert total == 1
    remarks = records[0].remarks
    for remark in [
        "email@properties.comment", "ipv4@properties.peer", "ipv6@properties.peer",
        "ipv6@properties.mapped", "credit_card@properties.card", "jwt@properties.jwt",
        "api_key@properties.aws", "api_key@properties.github",
        "secret_pair@properties.header", "url_credentials@properties.dsn",
        "secret_pair@properties.cmd", "private_key@properties.pem", "home_path@properties.cwd",
        "home_path@properties.mac", "home_path@properties.win",
        "email@properties.nested.list[1].owner", "email@properties.<key>",
        "secret_key@properties.api_key",
    ]:  # fmt: skip
        assert remark in remarks, remark
    assert not any(secret in json.dumps(remarks) for secret in SECRETS)
    assert not any(secret in json.dumps(records[0].properties) for secret in SECRETS)


def test_a_known_clean_shape_does_not_let_personal_data_through(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    # The worker keeps known-clean properties as they are; the first new value is scrubbed.
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path)
    clean = {"plan": "pro", "seats": 3, "ratio": 0.5, "ok": True}
    for _ in range(3):
        tel.track("usage", clean)
    tel.track("usage", {**clean, "plan": "jane.doe@example.com"})
    tel.track("usage", {**clean, "seats": 4111111111111111, "ratio": float("nan")})
    assert tel.flush(5)
    props = [event["properties"] for event in lines(path)]
    assert props[:3] == [clean] * 3
    assert props[3] == {**clean, "plan": "[REDACTED:email]"}
    assert props[4] == {**clean, "seats": "[REDACTED:credit_card]", "ratio": None}


class RunPayload(waypost.Payload, event="run_finished"):
    seconds: float = Field(description="Run time.")
    success: bool = Field(description="Whether the run succeeded.")
    error: str = Field("", description="Error message, scrubbed.")


def test_typed_payload_undeclared_field_dropped_in_production(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path, strict=False)
    tel.track(RunPayload(seconds=1.5, success=False, error="bad key for bob@example.com",
                         user_email="bob@example.com", hostname="bobs-laptop"))  # fmt: skip
    assert tel.flush(5)
    (event,) = lines(path)
    assert event["properties"] == {
        "seconds": 1.5,
        "success": False,
        "error": "bad key for [REDACTED:email]",
    }
    records, _ = tel.open_outbox().records(name="run_finished")
    assert sorted(records[0].remarks) == [
        "email@properties.error",
        "undeclared@properties.hostname",
        "undeclared@properties.user_email",
    ]


def test_typed_payload_undeclared_field_rejected_in_strict_mode(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path)
    with pytest.raises(waypost.TrackError, match="user_email"):
        tel.track(RunPayload(seconds=1.0, success=True, user_email="bob@example.com"))
    assert tel.flush(5)
    assert lines(path) == []


class ReAdd:
    """A before_send hook that tries to put personal data back."""

    @waypost.hookimpl
    def waypost_before_send(self, event: Event) -> Event:
        event.properties["contact"] = "jane.doe@example.com"
        event.properties["comment"] = PLANTED["comment"]
        event.properties["client_ip"] = "203.0.113.42"
        return event


def test_before_send_hook_cannot_reintroduce_personal_data(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path, plugins=[ReAdd()])
    tel.track("hooked", {"n": 1})
    assert tel.flush(5)
    raw = path.read_text(encoding="utf-8")
    assert "jane.doe@example.com" not in raw and "203.0.113.42" not in raw
    (event,) = lines(path)
    assert event["properties"]["contact"] == "[REDACTED:email]"
    assert event["properties"]["client_ip"] == "[REDACTED:secret_key]"
    records, _ = tel.open_outbox().records(name="hooked")
    assert sorted(records[0].remarks) == [
        "email@properties.comment",
        "email@properties.contact",
        "secret_key@properties.client_ip",
    ]


class ErrorPayload(waypost.Payload, event="crashed", level="error"):
    kind: str


class DetailPayload(waypost.Payload, event="hovered", level="all"):
    element: str


def _send_all_levels(tel: Any) -> None:
    tel.track(ErrorPayload(kind="ValueError"))
    tel.track("opened", {"n": 1})  # usage by default
    tel.track(DetailPayload(element="TextInput"))
    tel.track("slow", {"ms": 3000}, level="all")
    tel.track("failed", {"code": 3}, level="error")


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("error", {"crashed", "failed"}),
        ("usage", {"crashed", "failed", "opened"}),
        ("all", {"crashed", "failed", "opened", "hovered", "slow"}),
    ],
)
def test_levels_filter_events(
    waypost_make_telemetry: Factory, tmp_path: Path, level: str, expected: set[str]
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path, config={"level": level})
    _send_all_levels(tel)
    assert tel.flush(5)
    assert {e["name"] for e in lines(path)} == expected
    assert tel.status().counters.dropped.get("level", 0) == 5 - len(expected)


def test_level_off_collects_nothing(waypost_make_telemetry: Factory, tmp_path: Path) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path, config={"level": "off"})
    status = tel.status()
    assert (status.enabled, status.rule) == (False, "level")
    _send_all_levels(tel)
    assert tel.flush(5)
    assert not path.exists()
    assert not (tel.data_dir / "outbox.sqlite3").exists()


def test_scrubbing_can_be_switched_off_per_rule(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    tel, path = jsonl_telemetry(
        waypost_make_telemetry, tmp_path, config={"scrub": {"disable": ["ipv4"]}}
    )
    tel.track("lan", {"gateway": "192.168.1.1", "owner": "ann@example.com"})
    assert tel.flush(5)
    (event,) = lines(path)
    assert event["properties"] == {"gateway": "192.168.1.1", "owner": "[REDACTED:email]"}


# --- names and context --------------------------------------------------------------------------


def test_a_name_holding_personal_data_is_scrubbed_with_a_remark(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path)
    tel.track("signup jane.doe@example.com", {"n": 1})
    tel.track("opened /home/janedoe/flows", {"n": 2})
    assert tel.flush(5)
    raw = path.read_text(encoding="utf-8")
    assert "jane.doe@example.com" not in raw and "janedoe" not in raw
    assert [e["name"] for e in lines(path)] == [
        "signup [REDACTED:email]",
        "opened /home/<user>/flows",
    ]
    records, _ = tel.open_outbox().records(state="sent")
    assert sorted(r.remarks[0] for r in records) == ["email@name", "home_path@name"]


def test_a_name_that_is_nothing_but_personal_data_is_refused_and_counted(
    waypost_make_telemetry: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path, strict=False)
    tel.track("jane.doe@example.com", {"n": 1})
    tel.track("kept", {"n": 2})
    assert tel.flush(5)
    assert [e["name"] for e in lines(path)] == ["kept"]
    assert tel.status().counters.dropped == {"unsafe_name": 1}
    assert "jane.doe" not in caplog.text and "nothing but personal data" in caplog.text


class Renamer:
    @waypost.hookimpl
    def waypost_before_send(self, event: Event) -> Event:
        event.name = f"{event.name} for ann@example.org"
        return event


def test_a_hook_cannot_put_personal_data_in_the_name(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path, plugins=[Renamer()])
    tel.track("renamed", {"n": 1})
    assert tel.flush(5)
    assert [e["name"] for e in lines(path)] == ["renamed for [REDACTED:email]"]


class Context:
    def __init__(self, extra: dict[str, Any]) -> None:
        self.extra = extra

    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        return self.extra


def test_what_a_plugin_adds_to_the_context_passes_the_scrubbers(
    waypost_make_telemetry: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {"deploy": {"owner": "ops@example.org", "host": "10.1.2.3", "region": "eu"}}
    tel, path = jsonl_telemetry(waypost_make_telemetry, tmp_path, plugins=[Context(extra)])
    tel.track("one", {"n": 1})
    tel.track("two", {"n": 2})
    assert tel.flush(5)
    for event in lines(path):
        assert event["context"]["deploy"] == {
            "owner": "[REDACTED:email]",
            "host": "[REDACTED:ipv4]",
            "region": "eu",
        }
    # Every event carries the context's remarks; the log names the places, never the values.
    records, _ = tel.open_outbox().records(state="sent")
    assert all(
        r.remarks[:2] == ["email@context.deploy.owner", "ipv4@context.deploy.host"] for r in records
    )
    assert "email@context.deploy.owner" in caplog.text
    assert "ops@example.org" not in caplog.text and "10.1.2.3" not in caplog.text


def test_context_that_cannot_be_sent_is_refused_and_the_rest_kept(
    waypost_make_telemetry: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tel, path = jsonl_telemetry(
        waypost_make_telemetry,
        tmp_path,
        strict=False,
        plugins=[Context({"bad": {"x": object()}}), Context({"good": {"tier": "pro"}})],
    )
    tel.track("one", {"n": 1})
    assert tel.flush(5)
    (event,) = lines(path)
    assert event["context"]["good"] == {"tier": "pro"} and "bad" not in event["context"]
    assert "context from a waypost_context hook refused" in caplog.text
