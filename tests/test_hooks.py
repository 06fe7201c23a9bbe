"""Each hook of ``waypost.hookspecs``, implemented by a plugin and seen to take effect."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import waypost
from waypost.events import Event
from waypost.privacy import Rule
from waypost.sinks import SendResult, Sink, SinkConfig


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class MemorySink(Sink):
    type = "memory"
    Config = SinkConfig
    received: list[Event] = []

    def send(self, events: Sequence[Event]) -> SendResult:
        MemorySink.received.extend(events)
        return SendResult.ok()


class SinkPlugin:
    @waypost.hookimpl
    def register_sinks(self, register: Callable[[type[Sink]], None]) -> None:
        register(MemorySink)


def test_register_sinks(make_telemetry: Any) -> None:
    MemorySink.received = []
    tel = make_telemetry(sinks={"mem": {"type": "memory"}}, plugins=[SinkPlugin()])
    tel.track("hello", {"n": 1})
    assert tel.flush(timeout=10)
    assert [(e.name, e.properties) for e in MemorySink.received] == [("hello", {"n": 1})]


class ScrubberPlugin:
    @waypost.hookimpl
    def register_scrubbers(self, register: Callable[[Rule], None]) -> None:
        register(Rule("ticket", r"\bTICKET-\d+\b"))


def test_register_scrubbers(make_telemetry: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, plugins=[ScrubberPlugin()])
    tel.track("support", {"note": "see TICKET-4711, mail bob@example.com"})
    assert tel.flush(timeout=10)
    (note,) = [r["properties"]["note"] for r in records(out)]
    assert "TICKET-4711" not in note and "[REDACTED:ticket]" in note
    assert "bob@example.com" not in note  # the built-in rules still run


class ContextPlugin:
    @waypost.hookimpl
    def waypost_context(self, context: dict[str, Any]) -> dict[str, Any]:
        assert context["app"]["name"] == "testapp"
        return {"deployment": {"kind": "docker"}, "app": {"edition": "community"}}


def test_waypost_context(make_telemetry: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, plugins=[ContextPlugin()])
    tel.track("started")
    assert tel.flush(timeout=10)
    (context,) = [r["context"] for r in records(out)]
    assert context["deployment"] == {"kind": "docker"}
    assert context["app"] == {"name": "testapp", "version": "1.0.0", "edition": "community"}


class BeforeSendPlugin:
    @waypost.hookimpl
    def waypost_before_send(self, event: Event) -> Event | bool | None:
        if event.name == "internal_debug":
            return False
        if event.name == "renamed":
            return dataclasses.replace(event, name="renamed_v2")
        event.properties["seen"] = True
        event.properties["owner"] = "jane@example.com"  # cannot get past the scrubbers
        return None


def test_waypost_before_send(make_telemetry: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, plugins=[BeforeSendPlugin()])
    tel.track("internal_debug", {"x": 1})
    tel.track("renamed", {"x": 2})
    tel.track("kept", {"x": 3})
    assert tel.flush(timeout=10)
    got = {r["name"]: r["properties"] for r in records(out)}
    assert set(got) == {"renamed_v2", "kept"}
    assert got["kept"]["seen"] is True
    assert "jane@example.com" not in json.dumps(got)
    assert tel.status().counters.dropped.get("before_send") == 1


class HeartbeatPlugin:
    @waypost.hookimpl
    def waypost_heartbeat(self, facts: dict[str, Any]) -> dict[str, Any]:
        assert "instanceId" in facts
        return {"platform": {"config": {"driver": "localfs"}}}


def test_waypost_heartbeat(make_telemetry: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    tel = make_telemetry(sinks={"jsonl": {"path": str(out)}}, plugins=[HeartbeatPlugin()])
    payload = tel.heartbeat_payload(lambda: {"platform": {"counts": {"users": 3}}})
    assert payload["platform"] == {"counts": {"users": 3}, "config": {"driver": "localfs"}}
    assert tel.send_heartbeat(force=True)
    assert tel.flush(timeout=10)
    (beat,) = records(out)
    assert beat["name"] == "heartbeat"
    assert beat["properties"]["platform"]["config"] == {"driver": "localfs"}


def test_hooks_from_a_module_named_in_config(
    make_telemetry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hooks_from_config.py").write_text(
        textwrap.dedent(
            """
            import waypost

            @waypost.hookimpl
            def waypost_context(context):
                return {"region": "eu"}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.jsonl"
    tel = make_telemetry(
        sinks={"jsonl": {"path": str(out)}}, config={"plugins": ["hooks_from_config"]}
    )
    tel.track("started")
    assert tel.flush(timeout=10)
    assert records(out)[0]["context"]["region"] == "eu"


def test_a_misspelled_hook_is_refused(make_telemetry: Any) -> None:
    class Typo:
        @waypost.hookimpl
        def register_sink(self, register: Any) -> None: ...

    with pytest.raises(Exception, match="register_sink"):
        make_telemetry(plugins=[Typo()])


def _fake_distribution(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """An installed distribution, as pip would leave it: a dist-info and its modules."""
    info = root / f"{name.replace('-', '_')}-0.3.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, code in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(code))


def _waypost(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYPOST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "300"  # rich wraps tables to the terminal width
    code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_register_commands_from_the_entry_point_group(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_distribution(
        site,
        "waypost-hello",
        """
        [waypost.commands]
        hello = waypost_hello_cli
        broken = waypost_hello_missing
        """,
        {
            "waypost_hello_cli": """
                import click
                import waypost

                @waypost.hookimpl
                def register_commands(cli):
                    @cli.command()
                    @click.argument("who")
                    def hello(who):
                        '''Say hello.'''
                        click.echo(f"hello {who}")
                """
        },
    )
    out = _waypost(["hello", "plugin"], site, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello plugin"
    # A broken command module is reported, never fatal.
    assert "waypost_hello_missing" in out.stderr and "failed to load" in out.stderr
    helped = _waypost(["--help"], site, tmp_path)
    assert "Say hello." in helped.stdout


def test_waypost_plugins_shows_a_broken_and_a_deprecated_plugin(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_distribution(
        site,
        "waypost-oldthing",
        """
        [waypost.sinks]
        oldthing = waypost_oldthing
        brokenthing = waypost_brokenthing
        """,
        {
            "waypost_oldthing": """
                import waypost
                from waypost.sinks import SendResult, Sink

                class OldSink(Sink):
                    type = "oldthing"
                    deprecated = "use the http sink instead"

                    def send(self, events):
                        return SendResult.ok()

                @waypost.hookimpl
                def register_sinks(register):
                    register(OldSink)

                @waypost.hookimpl
                def waypost_heartbeat(facts):
                    return {}
                """,
            "waypost_brokenthing": "import no_such_dependency_anywhere\n",
        },
    )
    out = _waypost(["plugins", "--json"], site, tmp_path)
    assert out.returncode == 0, out.stderr
    infos = {i["name"]: i for i in json.loads(out.stdout)}
    old, broken = infos["oldthing"], infos["brokenthing"]
    assert old["distribution"] == "waypost-oldthing" and old["version"] == "0.3.0"
    assert old["status"] == "loaded" and old["sink_types"] == ["oldthing"]
    assert old["hooks"] == ["register_sinks", "waypost_heartbeat"]
    assert old["deprecated"] is True and "http sink" in old["deprecation"]
    assert broken["status"] == "error" and "no_such_dependency_anywhere" in broken["error"]
    assert broken["deprecated"] is False
    table = _waypost(["plugins"], site, tmp_path)
    assert "DEPRECATED" in table.stdout and "waypost-oldthing" in table.stdout


def test_commands_from_the_one_entry_point_group_load_only_when_asked_for(tmp_path: Path) -> None:
    site = tmp_path / "site"
    marker = tmp_path / "imported"
    _fake_distribution(
        site,
        "waypost-greeter",
        """
        [waypost.sinks]
        greet = waypost_greeter
        """,
        {
            "waypost_greeter": f"""
                import pathlib
                import click
                import waypost

                pathlib.Path({str(marker)!r}).touch()

                @waypost.hookimpl
                def register_commands(cli):
                    @cli.group()
                    def greet():
                        '''Greetings.'''

                    @greet.command()
                    @click.argument("who")
                    def hello(who):
                        click.echo(f"greetings {{who}}")
                """
        },
    )
    data = ["--data-dir", str(tmp_path / "data")]
    out = _waypost([*data, "purge", "--all", "--json"], site, tmp_path)
    assert out.returncode == 0, out.stderr
    assert not marker.exists()  # a built-in command imports no plugin
    out = _waypost(["greet", "hello", "you"], site, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "greetings you" and marker.exists()
    assert "deprecated" not in out.stderr
    helped = _waypost(["--help"], site, tmp_path)
    assert "Greetings." in helped.stdout
    listed = {
        p["name"]: p for p in json.loads(_waypost(["plugins", "--json"], site, tmp_path).stdout)
    }
    assert listed["greet"]["kind"] == "commands" and listed["greet"]["status"] == "loaded"


def test_the_deprecated_commands_group_is_listed_as_deprecated(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_distribution(site, "waypost-old", "[waypost.commands]\nold = waypost_old_cli\n", {})
    listed = json.loads(_waypost(["plugins", "--json"], site, tmp_path).stdout)
    (old,) = [p for p in listed if p["name"] == "old"]
    assert old["kind"] == "commands" and old["deprecated"] is True
    assert "'waypost.sinks'" in old["deprecation"]
