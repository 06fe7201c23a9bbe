"""Config values by the type of the field they land in: YAML 1.1's words and numbers in files,
``WAYPOST_*`` variables, the one boolean parser, and unknown variables."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

import waypost
from waypost import config as cfg
from waypost.errors import ConfigError
from waypost.privacy import parse_bool as privacy_parse_bool


class TypedConfig(waypost.SinkConfig):
    url: str = "http://127.0.0.1:9/x"
    region: str = "us"
    api_key: SecretStr = SecretStr("")
    gzip: bool = True
    headers: dict[str, str] = {}


class TypedSink(waypost.Sink):
    """A sink with fields of each kind, to see settings typed by the sink's own model."""

    type = "typed"
    Config = TypedConfig

    def send(self, events: Sequence[waypost.Event]) -> waypost.SendResult:
        return waypost.SendResult.ok()


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write(tmp_path: Path, body: str, name: str = "telemetry.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


# --- files: YAML 1.1's booleans and numbers where the field is a word -------------------------


def test_unquoted_level_off_and_other_words_are_words(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        telemetry:
          level: off
          version: 1.10
          policy_version: 2
          distinct_id: 12345
          app: yes
          heartbeat: {time_of_day: 12:30, event: on}
          notice: {enabled: no}
          strict: off
          batch: {size: 0x10, interval: 1:30}
        """,
    )
    config, _ = cfg.load(path, {})
    assert config.level == "off"
    assert config.version == "1.10" and config.policy_version == "2"
    assert config.distinct_id == "12345" and config.app == "yes"
    assert config.heartbeat is not None
    assert config.heartbeat.time_of_day == "12:30" and config.heartbeat.event == "on"
    # Where the field is a boolean or a number, YAML's meaning stays.
    assert config.notice.enabled is False and config.strict is False
    assert config.batch.size == 16 and config.batch.interval == 90


def test_level_off_unquoted_turns_telemetry_off_for_the_right_reason(
    tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    path = write(tmp_path, "telemetry:\n  level: off\n  sinks: {jsonl: {path: e.jsonl}}\n")
    tel = waypost.Telemetry(app="t", config=path, env=waypost_clean_env, data_dir=tmp_path / "d")
    st_ = tel.status()
    assert st_.config_error is None
    assert (st_.enabled, st_.rule, st_.level) == (False, "level", "off")
    tel.shutdown()


def typed_sink_config(tmp_path: Path, env: dict[str, str], config: Path | None = None) -> Any:
    """The config of sink ``a`` (type ``typed``) as a strict instance makes it."""
    tel = waypost.Telemetry(app="t", config=config, env=env, data_dir=tmp_path / "d",
                            strict=True, start=False, sink_classes=[TypedSink])  # fmt: skip
    tel._make_sinks()
    return tel.sinks["a"].config


def test_sink_settings_are_typed_by_the_sinks_own_model(
    tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    path = write(
        tmp_path,
        """\
        telemetry:
          sinks:
            a:
              type: typed
              region: no
              api_key: 0123
              timeout: 2
              gzip: off
        """,
    )
    sink_config = typed_sink_config(tmp_path, waypost_clean_env, path)
    assert sink_config.region == "no"
    assert sink_config.api_key.get_secret_value() == "0123"  # not 83, YAML 1.1's octal
    assert sink_config.timeout == 2.0 and sink_config.gzip is False


def test_quoted_values_and_toml_keep_their_own_types(tmp_path: Path) -> None:
    path = write(tmp_path, 'telemetry:\n  version: "1.10"\n  level: "all"\n')
    assert cfg.load(path, {})[0].version == "1.10"
    toml = write(tmp_path, "[telemetry]\nversion = 1.1\n", "t.toml")
    with pytest.raises(ConfigError, match=r"telemetry\.version"):
        cfg.load(toml, {})  # TOML says what it means: 1.1 is a number


def test_read_file_without_marks_gives_yaml_1_1_values(tmp_path: Path) -> None:
    path = write(tmp_path, "telemetry:\n  a: off\n  b: 0123\n  c: 1.10\n  d: 2024-01-01\n")
    data = cfg.read_file(path)
    assert data == {"telemetry": {"a": False, "b": 83, "c": 1.1, "d": "2024-01-01"}}
    assert all(type(v) in (bool, int, float, str) for v in data["telemetry"].values())


# --- the environment --------------------------------------------------------------------------


def test_environment_values_take_the_fields_type() -> None:
    env = {
        "WAYPOST_POLICY_VERSION": "2",
        "WAYPOST_VERSION": "1.10",
        "WAYPOST_DISTINCT_ID": "12345",
        "WAYPOST_LEVEL": "off",
        "WAYPOST_STRICT": "yes",
        "WAYPOST_BATCH__SIZE": "0123",
        "WAYPOST_BATCH__INTERVAL": "250ms",
        "WAYPOST_SCHEMAS": "myapp.telemetry, myapp.more",
        "WAYPOST_PLUGINS": '["a.b"]',
        "WAYPOST_SCRUB__PATTERNS": '{"ticket": "T-[0-9]+"}',
        "WAYPOST_HEARTBEAT__TIME_OF_DAY": "12:30",
        "WAYPOST_APP_NAME_IS_NOT_A_SETTING": "x",
    }
    notes: list[str] = []
    config, _ = cfg.load(None, env, notes=notes)
    assert (config.policy_version, config.version, config.distinct_id) == ("2", "1.10", "12345")
    assert config.level == "off" and config.strict is True
    assert config.batch.size == 123 and config.batch.interval == 0.25
    assert config.schemas == ["myapp.telemetry", "myapp.more"] and config.plugins == ["a.b"]
    assert config.scrub.patterns == {"ticket": "T-[0-9]+"}
    assert config.heartbeat is not None and config.heartbeat.time_of_day == "12:30"
    assert len(notes) == 1 and "WAYPOST_APP_NAME_IS_NOT_A_SETTING is ignored" in notes[0]


def test_sink_secrets_from_the_environment_stay_text(
    tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    env = {
        **waypost_clean_env,
        "WAYPOST_SINKS__A__TYPE": "typed",
        "WAYPOST_SINKS__A__URL": "https://x.example/a: b",
        "WAYPOST_SINKS__A__API_KEY": "0123",
        "WAYPOST_SINKS__A__REGION": "no",
        "WAYPOST_SINKS__A__HEADERS": '{"X-Key": "0123"}',
    }
    sink_config = typed_sink_config(tmp_path, env)
    assert sink_config.url == "https://x.example/a: b"  # not a mapping
    assert sink_config.api_key.get_secret_value() == "0123" and sink_config.region == "no"
    assert sink_config.headers == {"X-Key": "0123"}


def test_unknown_variables_warn_with_the_nearest_key_and_leave_telemetry_on(
    tmp_path: Path, waypost_clean_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env = {**waypost_clean_env, "WAYPOST_LEVL": "all", "WAYPOST_BATCH__SIZ": "3",
           "WAYPOST_SINKS__JSONL__PAHT": "x.jsonl"}  # fmt: skip
    caplog.set_level(logging.WARNING, logger="waypost")
    tel = waypost.Telemetry(
        app="t",
        config={
            "telemetry": {"sinks": {"jsonl": {"path": "e.jsonl"}}, "notice": {"enabled": False}}
        },
        env=env,
        data_dir=tmp_path / "d",
    )
    status = tel.status()
    assert status.running and status.config_error is None
    assert [s.error for s in status.sinks] == [None]
    warnings = status.config_warnings
    assert any("WAYPOST_LEVL" in w and "did you mean WAYPOST_LEVEL?" in w for w in warnings)
    assert any("did you mean WAYPOST_BATCH__SIZE?" in w for w in warnings)
    assert any("did you mean WAYPOST_SINKS__JSONL__PATH?" in w for w in warnings)
    logged = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(logged) == len(warnings) == 3
    tel.shutdown()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("WAYPOST_BATCH__SIZE", "many", "telemetry.batch.size"),
        ("WAYPOST_STRICT", "maybe", "'maybe' is not a boolean"),
        ("WAYPOST_SCHEMAS", "[unclosed", "takes a JSON array"),
        ("WAYPOST_SCRUB__PATTERNS", "a=b", "takes a JSON object"),
    ],
)
def test_a_bad_environment_value_names_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.load(None, {name: value})
    assert name in str(info.value) and expected in str(info.value)


def test_special_variables_are_not_settings() -> None:
    notes: list[str] = []
    config, _ = cfg.load(
        None,
        {
            "WAYPOST_HOME": "/tmp/x",
            "WAYPOST_CONFIG": "c.yml",
            "WAYPOST_APP": "a",
            "WAYPOST_DEBUG": "on",
            "WAYPOST_COLLECTOR_CONFIG": "c.yml",
        },
        notes=notes,
    )
    assert notes == [] and config.debug is True and str(config.data_dir) == "/tmp/x"


# --- one boolean parser -----------------------------------------------------------------------


def test_one_boolean_parser_everywhere() -> None:
    assert privacy_parse_bool is cfg.parse_bool
    for word in ("1", "true", "YES", " On "):
        assert cfg.parse_bool(word) is True
    for word in ("0", "false", "No", "OFF"):
        assert cfg.parse_bool(word) is False
    for word in ("", "t", "y", "n", "2", None):
        assert cfg.parse_bool(word) is None
    # Config fields (the core's and every sink's) read booleans with it: "t" is refused,
    # where pydantic's own parser would take it.
    with pytest.raises(ConfigError, match="'t' is not a boolean"):
        cfg.load({"telemetry": {"strict": "t"}}, {})
    from waypost.sinks.log import LogConfig

    assert LogConfig.model_validate({"envelope": "on"}).envelope is True
    with pytest.raises(ValueError, match="'y' is not a boolean"):
        LogConfig.model_validate({"envelope": "y"})


# --- properties of the loader -----------------------------------------------------------------

_WORDS = st.sampled_from(
    ["off", "on", "yes", "no", "true", "false", "y", "n", "~", "null", "0123", "0x1f", "1.10",
     "1e3", "12:30", "1_000", ".inf", "2024-01-01", "-0", "+1", "0o17", "abc", "a: b", "#x"]
)  # fmt: skip
_TEXT = st.one_of(_WORDS, st.text(min_size=1, max_size=30))


@PROPERTY
@given(_TEXT)
def test_a_text_field_from_the_environment_is_the_text_as_it_is(text: str) -> None:
    if "\0" in text or text == "":
        return
    config, _ = cfg.load(None, {"WAYPOST_VERSION": text, "WAYPOST_POLICY_VERSION": text})
    assert config.version == text and config.policy_version == text


@PROPERTY
@given(_WORDS)
def test_a_text_field_in_yaml_is_the_plain_scalar_as_written(word: str) -> None:
    import yaml

    try:
        reading = yaml.safe_load(f"v: {word}")["v"]
    except yaml.YAMLError:
        return
    path = Path(_tmp()) / "t.yml"
    path.write_text(f"telemetry:\n  version: {word}\n", encoding="utf-8")
    if reading is None:  # ~ and null are YAML's null: no value
        assert cfg.load(path, {})[0].version is None
        return
    if isinstance(reading, str) and not isinstance(reading, bool):
        assert cfg.load(path, {})[0].version == reading
        return
    assert cfg.load(path, {})[0].version == word


def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="waypost-prop-")


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), _TEXT)
_KEYS = st.one_of(
    st.sampled_from(sorted(cfg.TelemetryConfig.model_fields)),
    st.sampled_from(["size", "interval", "enabled", "patterns", "time_of_day", "earliest"]),
    st.text(min_size=1, max_size=8),
)
_DATA = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=30,
)


@PROPERTY
@given(st.dictionaries(_KEYS, _DATA, max_size=6))
def test_any_section_gives_a_config_or_a_config_error(section: dict[str, Any]) -> None:
    path = Path(_tmp()) / "t.yml"
    try:
        path.write_text(json.dumps({"telemetry": section}), encoding="utf-8")  # JSON is YAML
    except ValueError:  # nan and infinity are not JSON
        path.write_text(repr(section), encoding="utf-8")
    for source in ({"telemetry": section}, path):
        try:
            config, _ = cfg.load(source, {})
        except ConfigError as exc:
            assert str(exc)
        else:
            assert isinstance(config, cfg.TelemetryConfig)


@PROPERTY
@given(st.dictionaries(st.text(min_size=1, max_size=12), _TEXT, max_size=6))
def test_any_environment_gives_a_config_or_a_config_error(variables: dict[str, str]) -> None:
    env = {f"WAYPOST_{k.upper()}": v for k, v in variables.items() if "\0" not in k + v}
    notes: list[str] = []
    try:
        config, _ = cfg.load(None, env, notes=notes)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(config, cfg.TelemetryConfig)
        assert all("is ignored" in n for n in notes)


_VALID = st.fixed_dictionaries(
    {},
    optional={
        "level": st.sampled_from(["off", "error", "usage", "all"]),
        "version": _TEXT,
        "policy_version": _TEXT,
        "distinct_id": _TEXT,
        "strict": st.booleans(),
        "schemas": st.lists(_TEXT, max_size=3),
        "batch": st.fixed_dictionaries({}, optional={"size": st.integers(1, 10**6)}),
        "notice": st.fixed_dictionaries({}, optional={"enabled": st.booleans(), "text": _TEXT}),
        "scrub": st.fixed_dictionaries({}, optional={"keys": st.lists(_TEXT, max_size=3)}),
    },
)


@PROPERTY
@given(_VALID)
def test_a_valid_section_loads_alike_from_code_json_and_yaml(section: dict[str, Any]) -> None:
    import yaml

    # Without NULs, and without "${", which starts a reference (a literal one is written $${).
    section = {k: v for k, v in section.items() if "\0" not in repr(v) and "${" not in repr(v)}
    from_code = cfg.load({"telemetry": section}, {})[0]
    for text in (json.dumps({"telemetry": section}), yaml.safe_dump({"telemetry": section})):
        path = Path(_tmp()) / "t.yml"
        path.write_text(text, encoding="utf-8")
        assert cfg.load(path, {})[0] == from_code
