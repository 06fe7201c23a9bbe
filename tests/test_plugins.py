"""Plugin discovery: only configured types are imported; a broken plugin is isolated."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import waypost
from waypost.errors import PluginError
from waypost.plugins import PluginManager


def test_an_unused_broken_plugin_costs_nothing(
    register_plugin: Any, make_telemetry: Any, tmp_path: Path
) -> None:
    register_plugin("broken", "broken_sink_plugin")
    tel = make_telemetry(sinks={"file": {"type": "jsonl", "path": str(tmp_path / "e.jsonl")}})
    tel.track("fine")
    assert tel.flush(5)
    assert "broken_sink_plugin" not in sys.modules


def test_a_broken_plugin_names_distribution_version_and_cause(
    register_plugin: Any, make_telemetry: Any
) -> None:
    register_plugin("broken", "broken_sink_plugin")
    with pytest.raises(PluginError) as info:
        make_telemetry(sinks={"b": {"type": "broken"}})
    text = str(info.value)
    assert "error importing plugin" in text and "broken_sink_plugin" in text
    assert "vendor_sdk_that_is_missing" in text and "sink type 'broken'" in text


def test_in_production_the_other_sinks_keep_working(
    register_plugin: Any, make_telemetry: Any, tmp_path: Path, caplog: Any
) -> None:
    register_plugin("broken", "broken_sink_plugin")
    out = tmp_path / "e.jsonl"
    tel = make_telemetry(
        sinks={"b": {"type": "broken"}, "file": {"type": "jsonl", "path": str(out)}}, strict=False
    )
    for i in range(3):
        tel.track("still_works", {"i": i})
    assert tel.flush(5)
    assert out.read_text().count("\n") == 3
    sinks = {s.name: s for s in tel.status().sinks}
    assert sinks["b"].state == "error" and "vendor_sdk_that_is_missing" in (sinks["b"].error or "")
    assert "sink 'b' is off" in caplog.text


def test_plugins_listing_reports_load_errors(register_plugin: Any) -> None:
    register_plugin("broken", "broken_sink_plugin")
    infos = {i.sink_type: i.as_dict() for i in PluginManager().describe_all()}
    assert infos["broken"]["status"] == "error"
    assert "vendor_sdk_that_is_missing" in infos["broken"]["error"]
    assert infos["jsonl"]["status"] == "loaded"


class NoSend(waypost.Sink):
    type = "nosend"


class NotASink:
    type = "nothing"


@pytest.mark.parametrize(
    ("cls", "message"),
    [(NoSend, "does not implement send()"), (NotASink, "not a waypost.Sink class")],
)
def test_sink_classes_are_checked_against_the_contract(cls: Any, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        PluginManager().register_sink(cls)


def test_first_run_notice_is_shown_once_before_anything_is_sent(
    make_telemetry: Any, tmp_path: Path
) -> None:
    shown: list[str] = []
    data_dir = tmp_path / "notice"
    config = {"notice": {"enabled": True, "text": "We collect anonymous usage data."}}
    tel = make_telemetry(sinks={"log": {}}, config=config, data_dir=data_dir, notice=shown.append)
    assert shown == ["We collect anonymous usage data."] and tel.enabled
    tel.shutdown()
    make_telemetry(sinks={"log": {}}, config=config, data_dir=data_dir, notice=shown.append)
    assert len(shown) == 1  # once per installation (and policy version)
    make_telemetry(
        sinks={"log": {}},
        config={**config, "policy_version": "2"},
        data_dir=data_dir,
        notice=shown.append,
    )
    assert len(shown) == 2


def test_a_notice_that_cannot_be_shown_keeps_telemetry_off(
    make_telemetry: Any, tmp_path: Path
) -> None:
    def broken(text: str) -> None:
        raise OSError("no terminal")

    tel = make_telemetry(
        sinks={"log": {}}, config={"notice": {"enabled": True}}, notice=broken, strict=False
    )
    assert not tel.enabled and tel.status().rule == "error"


def test_track_from_a_coroutine_does_not_block_the_loop(telemetry: Any, tmp_path: Path) -> None:
    import asyncio

    async def app() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        for i in range(2000):
            telemetry.track("async_event", {"i": i})
            if i % 100 == 0:
                await asyncio.sleep(0)
        task.cancel()
        return ticks

    assert asyncio.run(app()) > 0
    assert telemetry.flush(10)
    assert (tmp_path / "events.jsonl").read_text().count("\n") == 2000


def test_retention_drops_oldest_past_the_limits(tmp_path: Path) -> None:
    from waypost.delivery.outbox import Outbox
    from waypost.testing import make_event

    outbox = Outbox(tmp_path)
    old = [make_event("old") for _ in range(5)]
    new = [make_event("new") for _ in range(5)]
    outbox.add(old, ["s"], now=1000.0)
    outbox.add(new, ["s"], now=5000.0)
    dropped = outbox.enforce_retention(max_age=3000, max_bytes=1e9, keep_sent=0, now=5500.0)
    assert dropped["max_age"] == 5
    records, total = outbox.records()
    assert total == 5 and {r.name for r in records} == {"new"}


def test_a_plugin_module_of_the_config_is_found_beside_the_config_file(
    tmp_path: Path, waypost_clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the CLI runs `waypost --config examples/firefly/telemetry.yml`: not on sys.path.
    app = tmp_path / "app"
    app.mkdir()
    (app / "beside_plugin.py").write_text(
        "import waypost.hookspecs\n\n"
        "@waypost.hookspecs.hookimpl\n"
        "def waypost_context(context):\n"
        "    return {'beside': True}\n"
    )
    (app / "telemetry.yml").write_text(
        "telemetry:\n  plugins: [beside_plugin]\n  notice: {enabled: false}\n  sinks: {}\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    tel = waypost.Telemetry(
        app="beside", config=str(app / "telemetry.yml"), env=waypost_clean_env,
        data_dir=tmp_path / "data", strict=True, start=False,
    )  # fmt: skip
    assert "beside_plugin" in sys.modules
    assert tel.plugins.hook.waypost_context(context={}) == [{"beside": True}]
    (app / "telemetry.yml").write_text("telemetry:\n  plugins: [no_such_module]\n")
    with pytest.raises(PluginError, match="no_such_module"):  # not beside it either
        waypost.Telemetry(
            app="beside", config=str(app / "telemetry.yml"), env=waypost_clean_env,
            data_dir=tmp_path / "data", strict=True,
        )  # fmt: skip
    monkeypatch.delitem(sys.modules, "beside_plugin")


def test_a_plugin_found_beside_the_config_leaves_sys_path_as_it_was(
    tmp_path: Path, waypost_clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "app"
    (app / "beside_pkg").mkdir(parents=True)
    (app / "beside_pkg" / "__init__.py").write_text("")
    (app / "beside_pkg" / "hooks.py").write_text(
        "import json\n"  # resolved as usual, not by the json.py below
        "import waypost.hookspecs\n\n"
        "@waypost.hookspecs.hookimpl\n"
        "def waypost_context(context):\n"
        "    return {'beside_pkg': json.__name__}\n"
    )
    (app / "json.py").write_text("raise RuntimeError('a file beside the config shadowed json')\n")
    (app / "telemetry.yml").write_text(
        "telemetry:\n  plugins: [beside_pkg.hooks]\n  notice: {enabled: false}\n  sinks: {}\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = list(sys.path)
    for name in ("beside_pkg", "beside_pkg.hooks"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    tel = waypost.Telemetry(
        app="beside", config=str(app / "telemetry.yml"), env=waypost_clean_env,
        data_dir=tmp_path / "data", strict=True, start=False,
    )  # fmt: skip
    assert tel.plugins.hook.waypost_context(context={}) == [{"beside_pkg": "json"}]
    assert sys.modules["beside_pkg.hooks"].__file__ == str(app / "beside_pkg" / "hooks.py")
    assert sys.path == before  # the config's directory was not added, not even at the end
