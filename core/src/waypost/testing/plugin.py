"""The pytest plugin (entry point ``pytest11``): fixtures for testing with waypost.

Every fixture's name starts with ``waypost_``, so installing waypost adds no generic name to a
project's tests. The names of the first release (``telemetry``, ``make_telemetry``,
``clean_env``, ``recording_server``, ``register_plugin``) still work, with a
``DeprecationWarning``, wherever nothing else defines them: a project's own fixture of that
name (in a conftest, a test module or another plugin) always wins.
"""

from __future__ import annotations

import contextvars
import importlib.metadata as md
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from waypost.testing.peer import Peer
from waypost.testing.server import RecordingServer

_PRIVACY_VARS = ("DO_NOT_TRACK",)

DEPRECATED_NAMES = {
    "clean_env": "waypost_clean_env",
    "recording_server": "waypost_recording_server",
    "make_telemetry": "waypost_make_telemetry",
    "telemetry": "waypost_telemetry",
    "register_plugin": "waypost_register_plugin",
}
"""Old fixture name -> the name to use now."""

# Set while waypost_peer looks up ``recording_server`` itself (a suite that overrides it for a
# non-HTTP sink, as the first release documented): that lookup is not the project's use of the
# deprecated name.
_LOOKING_UP = contextvars.ContextVar("waypost_looking_up", default=False)


@pytest.fixture
def waypost_clean_env() -> dict[str, str]:
    """The process environment without ``DO_NOT_TRACK`` and ``WAYPOST_*`` variables."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _PRIVACY_VARS and not k.startswith("WAYPOST_")
    }


@pytest.fixture
def waypost_recording_server() -> Iterator[RecordingServer]:
    """A :class:`~waypost.testing.RecordingServer` on 127.0.0.1, stopped after the test."""
    with RecordingServer() as server:
        yield server


@pytest.fixture
def waypost_make_telemetry(
    tmp_path: Path, waypost_clean_env: dict[str, str]
) -> Iterator[Callable[..., Any]]:
    """A factory of isolated ``Telemetry`` instances: own data dir, strict mode, a clean
    environment, no first-run notice, short batch interval. Keyword arguments: ``sinks`` (the
    ``telemetry.sinks`` mapping), ``config`` (more of the ``telemetry`` section), and anything
    ``Telemetry`` takes. Every instance is shut down after the test."""
    from waypost import Telemetry

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
        kwargs.setdefault("env", waypost_clean_env)
        kwargs.setdefault("data_dir", tmp_path / f"waypost-{next(counter)}")
        tel = Telemetry(config={"telemetry": section}, **kwargs)
        made.append(tel)
        return tel

    yield factory
    for tel in made:
        tel.shutdown(timeout=2)


@pytest.fixture
def waypost_telemetry(waypost_make_telemetry: Callable[..., Any], tmp_path: Path) -> Any:
    """An isolated, strict ``Telemetry`` writing to ``tmp_path / "events.jsonl"``."""
    return waypost_make_telemetry(sinks={"jsonl": {"path": str(tmp_path / "events.jsonl")}})


@pytest.fixture
def waypost_register_plugin(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """``waypost_register_plugin("mysink", "my_module")`` makes ``my_module`` the plugin of
    sink type ``mysink`` for this test only, exactly as an installed entry point would."""
    from waypost import plugins

    extra: dict[str, md.EntryPoint] = {}
    original = plugins._entry_points

    def patched() -> dict[str, md.EntryPoint]:
        return {**original(), **extra}

    monkeypatch.setattr(plugins, "_entry_points", patched)

    def register(sink_type: str, module: str) -> None:
        extra[sink_type] = md.EntryPoint(name=sink_type, value=module, group=plugins.GROUP)

    return register


@pytest.fixture
def waypost_peer(request: pytest.FixtureRequest) -> Iterator[Peer]:
    """The :class:`~waypost.testing.Peer` that a :class:`~waypost.testing.SinkContract`
    drives: by default an :class:`~waypost.testing.HttpPeer` on a recording server, answering
    as the contract subclass says. A sink of another transport overrides this fixture (in its
    test module or contract class) and yields a peer of its own."""
    from waypost.testing.contract import SinkContract
    from waypost.testing.peer import HttpPeer

    contract = request.instance
    if not isinstance(contract, SinkContract):
        pytest.fail(
            "the default waypost_peer serves the tests of a SinkContract subclass; "
            "elsewhere, define a waypost_peer fixture that yields your own Peer",
            pytrace=False,
        )
    server = _legacy_server(request)
    if server is None:
        server = request.getfixturevalue("waypost_recording_server")
    with HttpPeer(server, contract) as peer:
        yield peer


def _legacy_server(request: pytest.FixtureRequest) -> Any:
    """The project's own ``recording_server`` fixture, if it has one that looks like a
    server: the first release told authors of non-HTTP sinks to override it."""
    token = _LOOKING_UP.set(True)
    try:
        server = request.getfixturevalue("recording_server")
    except pytest.FixtureLookupError:
        return None
    finally:
        _LOOKING_UP.reset(token)
    if not all(hasattr(server, name) for name in ("url", "responder", "requests")):
        return None
    if not isinstance(server, RecordingServer):
        warnings.warn(
            "overriding the recording_server fixture to run SinkContract on another transport "
            "is deprecated: define a waypost_peer fixture that yields a waypost.testing.Peer",
            DeprecationWarning,
            stacklevel=2,
        )
    return server


def _deprecated(old: str, new: str) -> Any:
    def alias(request: pytest.FixtureRequest) -> Any:
        if not _LOOKING_UP.get():
            warnings.warn(
                f"the fixture {old!r} is deprecated: use {new!r} (waypost's fixtures all "
                "start with waypost_)",
                DeprecationWarning,
                stacklevel=2,
            )
        return request.getfixturevalue(new)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated: use ``{new}``."
    return pytest.fixture(name=old)(alias)


def _defines_fixture(plugin: object, name: str) -> bool:
    value = getattr(plugin, name, None)
    if value is None:
        return False
    try:
        from _pytest.fixtures import getfixturemarker
    except ImportError:  # pytest moved it: any attribute of that name counts
        return True
    return getfixturemarker(value) is not None


def pytest_configure(config: pytest.Config) -> None:
    """Register the deprecated names that no other plugin defines. (Conftest and test-module
    fixtures win over any plugin's anyway; among plugins, the last registered would win, so
    the aliases are added only where they cannot hide another plugin's fixture.)"""
    manager = config.pluginmanager
    if manager.has_plugin("waypost-deprecated-fixtures"):
        return
    others = [
        p
        for p in manager.get_plugins()
        if p is not _THIS and not str(manager.get_name(p) or "").endswith("conftest.py")
    ]
    aliases = types.ModuleType("waypost.testing.deprecated_fixtures")
    for old, new in DEPRECATED_NAMES.items():
        if not any(_defines_fixture(p, old) for p in others):
            setattr(aliases, old, _deprecated(old, new))
    manager.register(aliases, "waypost-deprecated-fixtures")


_THIS = sys.modules[__name__]
