"""One plugin mechanism: hooks called through pluggy (wrappers, tracing), a chain only for
``waypost_before_send``, exporters registered by a hook, the old exporter group deprecated."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import textwrap
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

import waypost
from waypost.errors import PluginError
from waypost.events import Event
from waypost.metrics import registry as registry_module


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class WrappingContext:
    """A standard pluggy wrapper: it sees every other implementation's results."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @waypost.hookimpl(wrapper=True)
    def waypost_context(self, context: dict[str, Any]) -> Generator[None, Any, Any]:
        results = yield
        self.seen = list(results)
        return [*results, {"wrapped": True}]


class PlainContext:
    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        return {"plain": True}


def test_a_wrapper_runs_and_tracing_sees_the_hooks(
    waypost_make_telemetry: Any, tmp_path: Path
) -> None:
    wrapper = WrappingContext()
    out = tmp_path / "out.jsonl"
    called: list[str] = []
    tel = waypost_make_telemetry(
        sinks={"jsonl": {"path": str(out)}}, plugins=[PlainContext(), wrapper]
    )
    tel.track("started")
    assert tel.flush(timeout=10)
    (record,) = records(out)
    assert record["context"]["plain"] is True and record["context"]["wrapped"] is True
    assert wrapper.seen == [{"plain": True}]
    tel.plugins.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: called.append(name), lambda *args: None
    )
    tel.heartbeat_payload()
    assert called == ["waypost_heartbeat"]


class Rename:
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    @waypost.hookimpl
    def waypost_before_send(self, event: Event) -> Event | None:
        if event.name == self.old:
            return dataclasses.replace(event, name=self.new)
        return None


def test_before_send_is_a_chain(waypost_make_telemetry: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    # The newest plugin runs first: a -> b, then b -> c.
    tel = waypost_make_telemetry(
        sinks={"jsonl": {"path": str(out)}}, plugins=[Rename("b", "c"), Rename("a", "b")]
    )
    tel.track("a")
    assert tel.flush(timeout=10)
    assert [r["name"] for r in records(out)] == ["c"]


class WrappingBeforeSend:
    @waypost.hookimpl(wrapper=True)
    def waypost_before_send(self, event: Event) -> Generator[None, Any, Any]:
        return (yield)


def test_before_send_refuses_a_wrapper(waypost_make_telemetry: Any) -> None:
    with pytest.raises(PluginError, match="waypost_before_send cannot be a wrapper"):
        waypost_make_telemetry(plugins=[WrappingBeforeSend()])


class Exporter:
    def __init__(self, registry: Any, settings: dict[str, Any]) -> None:
        self.registry, self.settings, self.closed = registry, settings, False

    def destinations(self) -> list[dict[str, Any]]:
        return [{"name": "mine", "target": self.settings["url"], "leaves_machine": False,
                 "active": True, "reason": "on"}]  # fmt: skip

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True


class ExporterPlugin:
    @waypost.hookimpl
    def register_metric_exporters(self, register: Any) -> None:
        register("mine", Exporter)


def test_exporters_come_from_the_register_metric_exporters_hook(
    waypost_make_telemetry: Any, recwarn: pytest.WarningsRecorder
) -> None:
    tel = waypost_make_telemetry(
        plugins=[ExporterPlugin()], config={"metrics": {"mine": {"url": "file:///m"}}}
    )
    exporter = tel.metrics.exporter("mine")
    assert isinstance(exporter, Exporter) and exporter.registry is tel.metrics
    assert tel.metrics.destinations()[0]["target"] == "file:///m"
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    tel.shutdown()
    assert exporter.closed


def test_an_exporter_plugin_in_the_one_group_is_imported_only_when_named(
    waypost_make_telemetry: Any,
    waypost_register_plugin: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "exporter_plugin_mod.py").write_text(
        textwrap.dedent(
            """
            import waypost

            class Exporter:
                def __init__(self, registry, settings):
                    self.settings = settings

                def destinations(self):
                    return []

                def close(self, timeout=5.0):
                    pass

            @waypost.hookimpl
            def register_metric_exporters(register):
                register("expo", Exporter)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    waypost_register_plugin("expo", "exporter_plugin_mod")
    import sys

    waypost_make_telemetry().metrics.counter("runs")
    assert "exporter_plugin_mod" not in sys.modules
    tel = waypost_make_telemetry(config={"metrics": {"expo": {"a": 1}}})
    assert tel.metrics.exporter("expo").settings == {"a": 1}


def test_the_old_exporter_group_still_works_with_a_deprecation(
    waypost_make_telemetry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "old_exporter_mod.py").write_text(
        "class E:\n    def destinations(self):\n        return []\n"
        "    def close(self, timeout=5.0):\n        pass\n\n"
        "def attach(registry, settings):\n    return E()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = md.EntryPoint(name="old", value="old_exporter_mod:attach", group="waypost.metrics")
    monkeypatch.setattr(registry_module, "_entry_points", lambda: {"old": ep})
    with pytest.warns(DeprecationWarning, match="'waypost.sinks'.*register_metric_exporters"):
        tel = waypost_make_telemetry(config={"metrics": {"old": {}}})
    assert tel.metrics.exporter("old") is not None


def test_registering_makes_a_register_sinks_implementation() -> None:
    import types

    from waypost.hookspecs import registering
    from waypost.plugins import PluginManager
    from waypost.sinks import SendResult, Sink

    class FirstSink(Sink):
        type = "first_of_two"

        def send(self, events: Any) -> SendResult:
            return SendResult.ok()

    class SecondSink(FirstSink):
        type = "second_of_two"

    module = types.ModuleType("waypost_two_sinks")
    module.register_sinks = registering(FirstSink, SecondSink)  # type: ignore[attr-defined]
    manager = PluginManager()
    manager.register_module(module)
    assert manager.load_sink_type("first_of_two") is FirstSink
    assert manager.load_sink_type("second_of_two") is SecondSink
    assert [impl.plugin for impl in manager.hook.register_sinks.get_hookimpls()] == [module]
