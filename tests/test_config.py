from __future__ import annotations

from pathlib import Path

import pytest

import waypost
from waypost import config as cfg
from waypost.errors import ConfigError, UnknownSinkError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_toml_give_the_same_config(tmp_path: Path) -> None:
    y = write(tmp_path, "t.yml", "telemetry:\n  level: all\n  sinks:\n    jsonl: {path: a.jsonl}\n")
    t = write(
        tmp_path,
        "t.toml",
        '[telemetry]\nlevel = "all"\n[telemetry.sinks.jsonl]\npath = "a.jsonl"\n',
    )
    a, _ = cfg.load(y, {})
    b, _ = cfg.load(t, {})
    assert a == b
    assert a.sink_specs() == {"jsonl": {"type": "jsonl", "path": "a.jsonl"}}


def test_no_sinks_key_means_the_log_sink() -> None:
    config, _ = cfg.load(None, {})
    assert config.sink_specs() == {"log": {"type": "log"}}


def test_sink_type_defaults_to_the_key_and_one_type_can_be_configured_twice() -> None:
    config, _ = cfg.load(
        {"telemetry": {"sinks": {"a": {"type": "jsonl", "path": "a"}, "b": {"type": "jsonl"}}}}, {}
    )
    specs = config.sink_specs()
    assert specs["a"]["type"] == specs["b"]["type"] == "jsonl"


def test_env_expansion_and_overrides(tmp_path: Path, clean_env: dict[str, str]) -> None:
    path = write(
        tmp_path, "t.yml",
        "telemetry:\n  app: '${APP_NAME:-fallback}'\n  sinks:\n    ingest:\n      type: jsonl\n"
        "      path: '${OUT}'\n",
    )  # fmt: skip
    env = {**clean_env, "OUT": str(tmp_path / "o.jsonl"), "WAYPOST_LEVEL": "error",
           "WAYPOST_BATCH__SIZE": "7"}  # fmt: skip
    config, source = cfg.load(path, env)
    assert source == str(path)
    assert config.app == "fallback"
    assert config.level == "error" and config.batch.size == 7
    # Sink settings are expanded when the sink is made.
    tel = waypost.Telemetry(config=path, env=env, data_dir=tmp_path / "d", strict=True, start=False)
    tel._make_sinks()
    assert str(tel.sinks["ingest"].config.path) == str(tmp_path / "o.jsonl")  # type: ignore[attr-defined]


def test_missing_env_var_names_file_key_and_variable(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    path = write(tmp_path, "t.yml", "telemetry:\n  app: '${NOPE_APP}'\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path, {})
    assert str(path) in str(info.value) and "telemetry.app" in str(info.value)
    assert "NOPE_APP" in str(info.value)
    path = write(tmp_path, "u.yml", "telemetry:\n  sinks:\n    p: {type: jsonl, path: '${NOPE}'}\n")
    with pytest.raises(ConfigError) as info:
        waypost.Telemetry(config=path, env=clean_env, data_dir=tmp_path / "d", strict=True)
    text = str(info.value)
    assert str(path) in text and "telemetry.sinks.p.path" in text and "NOPE" in text
    # Production mode: that sink is off, the others keep working.
    tel = waypost.Telemetry(config=path, env=clean_env, data_dir=tmp_path / "e")
    (sink,) = tel.status().sinks
    assert sink.state == "error" and "NOPE" in (sink.error or "")
    tel.shutdown()


def test_validation_error_names_file_key_and_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "t.yml", "telemetry:\n  level: loud\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path, {})
    assert str(path) in str(info.value) and "telemetry.level" in str(info.value)
    assert "'off', 'error', 'usage' or 'all'" in str(info.value)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "t.yml", "telemetry:\n  levle: all\n")
    with pytest.raises(ConfigError, match=r"telemetry\.levle: unknown key"):
        cfg.load(path, {})


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        cfg.load(write(tmp_path, "t.yml", "telemetry: [\n"), {})
    with pytest.raises(ConfigError, match="file not found"):
        cfg.load(tmp_path / "none.yml", {})
    with pytest.raises(ConfigError, match="no 'telemetry' key"):
        cfg.load(write(tmp_path, "u.yml", "other: 1\n"), {})


def test_durations() -> None:
    assert cfg.parse_duration("7d") == 7 * 86400
    assert cfg.parse_duration("250ms") == 0.25
    assert cfg.parse_duration(3) == 3.0
    with pytest.raises(ValueError):
        cfg.parse_duration("soon")


def test_unknown_sink_type_lists_installed_and_hints(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with pytest.raises(UnknownSinkError) as info:
        waypost.Telemetry(
            config={"telemetry": {"sinks": {"nosuch": {}}}},
            data_dir=tmp_path,
            strict=True,
            env=clean_env,
        )
    text = str(info.value)
    assert "unknown sink type 'nosuch'" in text
    assert "installed types are" in text and "jsonl" in text and "log" in text
    assert "pip install waypost-nosuch" in text
    assert "telemetry.sinks.nosuch" in text


def test_bad_sink_setting_names_the_key(tmp_path: Path, clean_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"telemetry\.sinks\.j\.bogus: unknown key"):
        waypost.Telemetry(
            config={"telemetry": {"sinks": {"j": {"type": "jsonl", "bogus": 1}}}},
            data_dir=tmp_path,
            strict=True,
            env=clean_env,
        )


def test_production_mode_keeps_the_host_running_on_bad_config(
    tmp_path: Path, clean_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    tel = waypost.Telemetry(
        config={"telemetry": {"level": "loud"}}, data_dir=tmp_path / "d", env=clean_env
    )
    tel.track("x")
    assert tel.status().rule == "config_error" and not tel.enabled
    assert "telemetry.level" in caplog.text
    assert not (tmp_path / "d").exists()


def test_production_mode_keeps_good_sinks_when_one_is_bad(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    tel = waypost.Telemetry(
        config={
            "telemetry": {
                "notice": {"enabled": False},
                "sinks": {
                    "nosuch": {},
                    "file": {"type": "jsonl", "path": str(tmp_path / "e.jsonl")},
                },
            }
        },
        data_dir=tmp_path / "d",
        env=clean_env,
    )
    tel.track("x", {"a": 1})
    assert tel.flush(5)
    assert (tmp_path / "e.jsonl").read_text().count("\n") == 1
    sinks = {s.name: s for s in tel.status().sinks}
    assert sinks["nosuch"].state == "error" and "pip install waypost-nosuch" in (
        sinks["nosuch"].error or ""
    )
    tel.shutdown()


def test_http_endpoints_only_on_loopback_unless_allowed() -> None:
    from waypost.sinks import check_endpoint

    assert check_endpoint("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080/x"
    assert check_endpoint("http://localhost/x/") == "http://localhost/x"
    assert check_endpoint("http://[::1]:9/") == "http://[::1]:9"
    with pytest.raises(ValueError, match="allow_http"):
        check_endpoint("http://telemetry.example.org/ingest")
    assert check_endpoint("http://telemetry.example.org", allow_http=True)
    with pytest.raises(ValueError):
        check_endpoint("ftp://x.example")
