"""Payload class keywords ``exclude_none`` and ``exclude_unset``, end to end: what a jsonl sink
receives is what Langflow's ``model_dump(by_alias=True, exclude_none=True, exclude_unset=True)``
gives for the same model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

import waypost
from waypost.manifest import describe_payload, to_markdown

Factory = Callable[..., Any]


class Client(waypost.Payload, event="t_client", exclude_none=True, exclude_unset=True):
    """A base the others inherit the options from, as Langflow's BasePayload."""

    client_type: str | None = Field(None, serialization_alias="clientType")


class Run(Client, event="t_run"):
    run_is_webhook: bool = Field(default=False, serialization_alias="runIsWebhook")
    run_seconds: int = Field(serialization_alias="runSeconds")
    run_error_message: str = Field("", serialization_alias="runErrorMessage")
    run_id: str | None = Field(None, serialization_alias="runId")


class RunEverything(Run, event="t_run_everything", exclude_unset=False):
    """Overrides one option: defaults are sent, None still is not."""


class Plain(waypost.Payload, event="t_plain"):
    run_id: str | None = Field(None, serialization_alias="runId")
    run_seconds: int = Field(serialization_alias="runSeconds")


class LangflowRun(BaseModel):
    """What Langflow declares, dumped as Langflow dumps it: the reference."""

    client_type: str | None = Field(None, serialization_alias="clientType")
    run_is_webhook: bool = Field(default=False, serialization_alias="runIsWebhook")
    run_seconds: int = Field(serialization_alias="runSeconds")
    run_error_message: str = Field("", serialization_alias="runErrorMessage")
    run_id: str | None = Field(None, serialization_alias="runId")


GIVEN: list[dict[str, Any]] = [
    {"run_seconds": 3},
    {"run_seconds": 3, "run_id": None},
    {"run_seconds": 3, "run_id": "r-1", "run_is_webhook": False},
    {"run_seconds": 3, "run_error_message": "", "client_type": "oss"},
]


@pytest.mark.parametrize("given", GIVEN)
def test_wire_is_what_langflow_dumps(given: dict[str, Any]) -> None:
    reference = LangflowRun(**given)
    assert Run(**given).wire() == reference.model_dump(
        by_alias=True, exclude_none=True, exclude_unset=True
    )


def test_options_are_inherited_and_can_be_overridden() -> None:
    assert Run(run_seconds=1).wire() == {"runSeconds": 1}
    assert RunEverything(run_seconds=1).wire() == {
        "runIsWebhook": False,
        "runSeconds": 1,
        "runErrorMessage": "",
    }
    assert Plain(run_seconds=1).wire() == {"runId": None, "runSeconds": 1}


def test_a_field_assigned_after_construction_counts_as_set() -> None:
    run = Run(run_seconds=1)
    run.client_type = "desktop"  # Langflow's service fills client_type in this way
    assert run.wire() == {"clientType": "desktop", "runSeconds": 1}


def test_an_option_that_is_not_a_bool_is_refused() -> None:
    with pytest.raises(TypeError, match="exclude_none must be True or False"):

        class Bad(waypost.Payload, event="t_bad", exclude_none="yes"):  # type: ignore[arg-type]
            pass


def test_a_nested_payload_is_sent_as_it_would_be_on_its_own() -> None:
    out = waypost.events.coerce({"run": Run(run_seconds=2, run_id=None)})
    assert out == {"run": {"runSeconds": 2}}


def test_the_manifest_says_what_is_left_out() -> None:
    described = describe_payload(Run)
    assert described["exclude_none"] is True and described["exclude_unset"] is True
    assert describe_payload(Plain)["exclude_none"] is False
    manifest = {
        "events": [described, describe_payload(Plain)],
        "envelope": [],
        "sinks": [],
        "metrics": [],
        "scrubbing": "",
    }
    md = to_markdown(manifest)
    run_section, plain_section = md.split("### `t_plain`")
    assert "Fields whose value is null or the application did not set" in run_section
    assert "left out" not in plain_section


def test_delivered_events_leave_out_none_and_unset_fields(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(sinks={"jsonl": {"path": str(path)}})
    for given in GIVEN:
        tel.track(Run(**given))
    tel.track(Plain(run_seconds=5))
    assert tel.flush(timeout=10)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    got = [line["properties"] for line in lines]
    expected = [
        LangflowRun(**given).model_dump(by_alias=True, exclude_none=True, exclude_unset=True)
        for given in GIVEN
    ]
    assert got == [*expected, {"runId": None, "runSeconds": 5}]
    assert [line["name"] for line in lines] == ["t_run"] * 4 + ["t_plain"]


def test_track_keeps_a_copy_of_the_properties_dict(
    waypost_make_telemetry: Factory, tmp_path: Path
) -> None:
    # docs/delivery.md: the dict is copied, what it nests is not (measured, and left out).
    path = tmp_path / "events.jsonl"
    tel = waypost_make_telemetry(sinks={"jsonl": {"path": str(path)}}, strict=False)
    props: dict[str, Any] = {"plan": "pro", "seats": 3}
    tel.track("signup", props)
    props["plan"] = "free"
    props["added"] = True
    del props["seats"]
    assert tel.flush(timeout=10)
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["properties"] == {"plan": "pro", "seats": 3}
