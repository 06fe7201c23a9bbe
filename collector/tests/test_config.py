"""The collector's config: YAML or TOML under ``collector:``; every error names the file, the
key and the reason, as the core's do; secrets never appear in messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_config
from waypost_collector.config import load_config

from waypost.errors import ConfigError


def _error(tmp_path: Path, section: dict, env: dict[str, str] | None = None) -> str:
    path = write_config(tmp_path / "collector.yml", section)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env or {})
    return str(caught.value)


def test_minimal_config_and_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path / "collector.yml", {"apps": {"myapp": {"token": "t0k3n-xyz"}}})
    config = load_config(path, {})
    assert config.data_dir == tmp_path / "collector-data"  # relative to the config file
    assert config.ip == "hash" and config.embedded_storage
    assert config.storage_specs()["events"]["type"] == "sql"
    assert config.limits.per_address is not None and config.limits.per_address.per == 60
    assert "t0k3n" not in repr(config)


def test_toml(tmp_path: Path) -> None:
    path = tmp_path / "collector.toml"
    path.write_text(
        '[collector]\ndata_dir = "d"\nip = "drop"\n'
        '[collector.apps.myapp]\ntoken = "${TOKEN}"\n'
        '[collector.control.myapp]\nheartbeat_every = "7d"\nsample = 0.25\n',
        encoding="utf-8",
    )
    config = load_config(path, {"TOKEN": "from-the-env-1"})
    assert config.apps["myapp"].token is not None
    assert config.apps["myapp"].token.get_secret_value() == "from-the-env-1"
    assert config.control["myapp"].heartbeat_every == 604800


@pytest.mark.parametrize(
    ("section", "key", "words"),
    [
        ({"apps": {}}, "collector.apps", "at least one"),
        ({"apps": {"a/b": {}}}, "collector.apps", "path segment"),
        ({"apps": {"x": {"token": "short"}}}, "collector.apps.x.token", "at least 8"),
        ({"apps": {"x": {"signing_secret": "short"}}}, "collector.apps.x.signing_secret", "16"),
        ({"apps": {"x": {}}, "ip": "keep"}, "collector.ip", "hash"),
        ({"apps": {"x": {}}, "limits": {"per_address": "lots"}}, "collector.limits.per_address",
         "not a rate"),
        ({"apps": {"x": {}}, "trusted_proxies": ["not-a-net"]}, "collector.trusted_proxies",
         "does not appear"),
        ({"apps": {"x": {}}, "control": {"y": {"sample": 0.5}}}, "collector", "not in"),
        ({"apps": {"x": {}}, "control": {"x": {"sample": 2}}}, "collector.control.x.sample",
         "less than or equal"),
        ({"apps": {"x": {}}, "control": {"x": {"versions": {"~~1": {}}}}},
         "collector.control.x.versions", "version range"),
        ({"apps": {"x": {}}, "colour": "blue"}, "collector.colour", "unknown key"),
    ],
)  # fmt: skip
def test_errors_name_file_and_key(tmp_path: Path, section: dict, key: str, words: str) -> None:
    message = _error(tmp_path, section)
    assert message.startswith(str(tmp_path / "collector.yml")), message
    assert key in message and words in message, message


def test_missing_variable_names_its_key(tmp_path: Path) -> None:
    message = _error(tmp_path, {"apps": {"x": {"token": "${NOPE_TOKEN}"}}})
    assert "collector.apps.x.token" in message and "NOPE_TOKEN" in message


def test_no_collector_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("telemetry: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no 'collector' key"):
        load_config(path, {})


def test_secrets_stay_out_of_errors(tmp_path: Path) -> None:
    message = _error(tmp_path, {"apps": {"x": {"token": "has spaces inside it"}}})
    assert "has spaces" not in message


def test_unknown_storage_sink_and_bad_sink_settings(tmp_path: Path) -> None:
    from waypost_collector.spool import build_storage

    path = write_config(
        tmp_path / "c.yml", {"apps": {"x": {}}, "storage": {"lake": {"type": "nosuchsink"}}}
    )
    with pytest.raises(ConfigError) as caught:
        build_storage(load_config(path, {}), version="0")
    message = str(caught.value)
    assert "collector.storage.lake" in message and "pip install waypost-nosuchsink" in message
    path = write_config(
        tmp_path / "c.yml",
        {
            "apps": {"x": {}},
            "storage": {"db": {"type": "sql", "url": "sqlite:///x.db", "tabel": 1}},
        },
    )
    with pytest.raises(ConfigError) as caught:
        build_storage(load_config(path, {}), version="0")
    assert str(caught.value).startswith(str(path)) and "collector.storage.db.tabel" in str(
        caught.value
    )


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, "collector", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_check_command(tmp_path: Path) -> None:
    schema = tmp_path / "my_schemas.py"
    schema.write_text(
        "import waypost\n\nclass Run(waypost.Payload, event='run'):\n    seconds: int\n",
        encoding="utf-8",
    )
    write_config(
        tmp_path / "collector.yml",
        {"apps": {"myapp": {"token": "tok-12345678", "schemas": ["my_schemas"]}, "open": {}}},
    )
    done = _cli("check", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    import json

    data = json.loads(done.stdout)
    assert data["apps"]["myapp"]["declared_events"] == ["run"]
    assert data["warnings"] == ["app 'open' has no token: anyone may send it events"]
    assert "tok-12345678" not in done.stdout
    write_config(tmp_path / "collector.yml", {"apps": {"myapp": {"schemas": ["nowhere_mod"]}}})
    bad = _cli("check", cwd=tmp_path)
    assert bad.returncode == 2
    assert "collector.apps.myapp.schemas" in bad.stderr and "nowhere_mod" in bad.stderr
    missing = _cli("check", "--config", str(tmp_path / "absent.yml"), cwd=tmp_path)
    assert missing.returncode == 2 and "file not found" in missing.stderr
