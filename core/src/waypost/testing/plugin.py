"""The pytest plugin (entry point ``pytest11``): fixtures for testing with waypost."""

from __future__ import annotations

import importlib.metadata as md
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from waypost.testing.server import RecordingServer

_PRIVACY_VARS = ("DO_NOT_TRACK",)


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The process environment without ``DO_NOT_TRACK`` and ``WAYPOST_*`` variables."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _PRIVACY_VARS and not k.startswith("WAYPOST_")
    }


@pytest.fixture
def recording_server() -> Iterator[RecordingServer]:
    """A :class:`~waypost.testing.RecordingServer` on 127.0.0.1, stopped after the test."""
    with RecordingServer() as server:
        yield server


@pytest.fixture
def make_telemetry(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    """A factory of isolated ``Telemetry`` instances: own data dir, strict mode, a clean
    environment, no first-run notice, short batch interval. Keyword arguments: ``sinks`` (the
    ``telemetry.sinks`` mapping), ``config`` (more of the ``telemetry`` section), and anything
    ``Telemetry`` takes. Every instance is shut down after the test."""
    from waypost.telemetry import Telemetry

    made: list[Telemetry] = []
    counter = iter(range(1_000_000))

    def factory(
        *,
        sinks: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Telemetry:
        section: dict[str, Any] = {
            "notice": {"enabled": False},
            "batch": {"interval": 0.05},
            "retry": {"initial": 0.05, "maximum": 1.0},
            **(config or {}),
        }
        if sinks is not None:
            section["sinks"] = sinks
        kwargs.setdefault("app", "testapp")
        kwargs.setdefault("version", "1.0.0")
        kwargs.setdefault("strict", True)
        kwargs.setdefault("env", clean_env)
        kwargs.setdefault("data_dir", tmp_path / f"waypost-{next(counter)}")
        tel = Telemetry(config={"telemetry": section}, **kwargs)
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.shutdown(timeout=2)


@pytest.fixture
def telemetry(make_telemetry: Callable[..., Any], tmp_path: Path) -> Any:
    """An isolated, strict ``Telemetry`` writing to ``tmp_path / "events.jsonl"``."""
    return make_telemetry(sinks={"jsonl": {"path": str(tmp_path / "events.jsonl")}})


@pytest.fixture
def register_plugin(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """``register_plugin("mysink", "my_module")`` makes ``my_module`` the plugin of sink type
    ``mysink`` for this test only, exactly as an installed entry point would."""
    from waypost import plugins

    extra: dict[str, md.EntryPoint] = {}
    original = plugins._entry_points

    def patched() -> dict[str, md.EntryPoint]:
        return {**original(), **extra}

    monkeypatch.setattr(plugins, "_entry_points", patched)

    def register(sink_type: str, module: str) -> None:
        extra[sink_type] = md.EntryPoint(name=sink_type, value=module, group=plugins.GROUP)

    return register
