"""An app's schemas on arrival, for payload classes with ``exclude_none``/``exclude_unset``:
what such a client sends is accepted as it is, and stored as it was sent."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from waypost_collector.schemas import Schemas

MODULE = """
from pydantic import Field
import waypost

class ComponentRan(waypost.Payload, event="t_component_ran", exclude_none=True, exclude_unset=True):
    component_name: str = Field(serialization_alias="componentName")
    # Required, but None is allowed: a client with exclude_none leaves it out.
    component_error_message: str | None = Field(serialization_alias="componentErrorMessage")
    component_run_id: str | None = Field(None, serialization_alias="componentRunId")
    component_success: bool = Field(True, serialization_alias="componentSuccess")

class Plain(waypost.Payload, event="t_plain_ran"):
    error: str | None = Field(serialization_alias="error")
"""


@pytest.fixture
def schemas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Schemas:
    (tmp_path / "t_schemas_mod.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "t_schemas_mod", raising=False)
    return Schemas.load(
        ["t_schemas_mod"], accept_undeclared=False, free_form=frozenset(), key="schemas"
    )


def test_what_an_exclude_none_client_sends_is_accepted_as_sent(schemas: Schemas) -> None:
    sent = {"componentName": "ChatInput"}
    assert schemas.check("t_component_ran", sent) == sent
    with_error = {"componentName": "ChatInput", "componentErrorMessage": "boom"}
    assert schemas.check("t_component_ran", with_error) == with_error


def test_a_required_field_is_still_required(schemas: Schemas) -> None:
    refused = schemas.check("t_component_ran", {"componentErrorMessage": "boom"})
    assert isinstance(refused, tuple) and refused[0] == "invalid_field"
    assert "component_name" in refused[1]
    # Without exclude_none, None is sent, so a missing field is missing.
    assert isinstance(schemas.check("t_plain_ran", {}), tuple)
    assert schemas.check("t_plain_ran", {"error": None}) == {"error": None}
