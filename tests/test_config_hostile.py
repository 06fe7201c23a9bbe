"""Hostile config files (alias bombs, deep nesting, foreign encodings, binary junk, huge files)
and ``${...}`` expansion: each answered in bounded time by a ConfigError naming the file, the
place and the limit; ``Telemetry()`` and the CLI run as subprocesses under CPU and memory
limits, as an operator's machine would."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypost import config as cfg
from waypost.errors import ConfigError, MissingVariableError

CPU_SECONDS = 30
"""A bound on CPU time (not wall time: the machine may be busy). The unbounded cases took
40 s and more; a bounded one needs a second or two, most of it starting Python."""
MEMORY = 1024**3
"""The address space a subprocess may use: the unbounded cases ran out of 2 GB."""


def alias_bomb(levels: int = 7, width: int = 9, leaf: str = '"${HOME:-x}"') -> str:
    """The "billion laughs": each level a list of ``width`` aliases of the level below."""
    lines = ["telemetry:", "  app: bomb", f"  l0: &l0 [{', '.join([leaf] * width)}]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 8, width: int = 9) -> str:
    """The same through merge keys, which PyYAML copies pair by pair before building."""
    keys = ", ".join(f"k{i}: v" for i in range(width))
    lines = ["telemetry:", f"  m0: &m0 {{{keys}}}"]
    for i in range(1, levels):
        lines.append(f"  m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * width)}]}}")
    return "\n".join(lines) + "\n"


HOSTILE: dict[str, tuple[str, Callable[[Path], None], str]] = {}
"""name -> (file name, writer, text the error must hold besides the file's name)."""


def hostile(name: str, filename: str, expected: str) -> Callable[[Callable[[Path], None]], Any]:
    def register(writer: Callable[[Path], None]) -> Any:
        HOSTILE[name] = (filename, writer, expected)
        return writer

    return register


@hostile("alias bomb, 425 bytes", "bomb.yml", "more than 5,000 values once aliases are expanded")
def _alias_bomb(path: Path) -> None:
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 500


@hostile("alias bomb, wider", "bomb2.yml", "more than 5,000 values once aliases are expanded")
def _alias_bomb_wide(path: Path) -> None:
    path.write_text(alias_bomb(levels=8, width=9, leaf='"${A:-${B:-lol}}"'))


@hostile("merge-key bomb", "merge.yml", "more than 5,000 values once aliases are expanded")
def _merge_bomb(path: Path) -> None:
    path.write_text(merge_bomb())


@hostile("recursive alias", "loop.yml", "nested deeper than 32 levels")
def _recursive(path: Path) -> None:
    path.write_text("telemetry: &t\n  app: x\n  more: *t\n")


@hostile("20,000-deep YAML", "deep.yml", "nested deeper than 32 levels at line 1")
def _deep_yaml(path: Path) -> None:
    path.write_text("telemetry: " + "[" * 20_000 + "]" * 20_000 + "\n")


@hostile("20,000-deep YAML, mappings", "deepmap.yml", "nested deeper than 32 levels at line 1")
def _deep_yaml_maps(path: Path) -> None:
    path.write_text("telemetry: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n")


@hostile("20,000-deep TOML", "deep.toml", "nested deeper than 32 levels at line 2")
def _deep_toml(path: Path) -> None:
    path.write_text("[telemetry]\napp = " + "[" * 20_000 + "]" * 20_000 + "\n")


@hostile("20,000-deep TOML, inline tables", "deept.toml", "nested deeper than 32 levels")
def _deep_toml_tables(path: Path) -> None:
    path.write_text("[telemetry]\nx = " + "{a = " * 20_000 + "1" + "}" * 20_000 + "\n")


@hostile("Latin-1 YAML", "latin1.yml", "not UTF-8 text: byte 0xe9 at line 2, column 12")
def _latin1(path: Path) -> None:
    path.write_bytes("telemetry:\n  app: 'Caf\xe9'\n".encode("latin-1"))


@hostile("Latin-1 TOML", "latin1.toml", "not UTF-8 text: byte 0xe9 at line 2")
def _latin1_toml(path: Path) -> None:
    path.write_bytes('[telemetry]\napp = "Caf\xe9"\n'.encode("latin-1"))


@hostile("binary junk", "junk.yml", "not UTF-8 text")
def _junk(path: Path) -> None:
    path.write_bytes(bytes(range(128, 256)) * 4)


@hostile("NUL bytes", "nul.yml", "binary data, not text: a NUL character at line 2")
def _nul(path: Path) -> None:
    path.write_bytes(b"telemetry:\n  app: a\x00b\n")


@hostile("a huge file", "huge.yml", "larger than 256 KiB, the limit for a config file")
def _huge(path: Path) -> None:
    path.write_text("telemetry:\n  app: x\n" + "# padding\n" * 30_000)


@hostile("many values", "many.yml", "more than 5,000 values at line")
def _many(path: Path) -> None:
    path.write_text("telemetry:\n  schemas:\n" + "    - m\n" * 20_000)


@hostile("a lone surrogate", "surrogate.yml", "lone surrogate U+D800")
def _surrogate(path: Path) -> None:
    path.write_text('telemetry:\n  app: "\\ud800"\n')


@hostile("a directory", "adir.yml", "is a directory")
def _directory(path: Path) -> None:
    path.mkdir()


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, preexec_fn=limited
    )


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_is_a_config_error_naming_file_place_and_limit(
    case: str, tmp_path: Path
) -> None:
    filename, writer, expected = HOSTILE[case]
    path = tmp_path / filename
    writer(path)
    with pytest.raises(ConfigError) as info:
        cfg.load(path, {})
    assert str(path) in str(info.value) and expected in str(info.value)


_PROBE = """
import json, sys, waypost
out = {}
for path in sys.argv[1:]:
    tel = waypost.Telemetry(app="probe", config=path, data_dir=sys.argv[0] + ".d")
    status = tel.status()
    try:
        waypost.Telemetry(app="probe", config=path, data_dir=sys.argv[0] + ".d", strict=True)
        strict = None
    except Exception as exc:
        strict = [type(exc).__name__, str(exc)]
    out[path] = [status.running, status.rule, status.config_error, strict]
print(json.dumps(out))
"""


def test_telemetry_never_raises_on_a_hostile_file_and_strict_mode_raises_config_error(
    tmp_path: Path, waypost_clean_env: dict[str, str]
) -> None:
    paths = []
    for filename, writer, _ in HOSTILE.values():
        writer(tmp_path / filename)
        paths.append(str(tmp_path / filename))
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    done = run([sys.executable, str(probe), *paths], waypost_clean_env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for filename, _, expected in HOSTILE.values():
        running, rule, error, strict = results[str(tmp_path / filename)]
        assert (running, rule) == (False, "config_error"), filename
        assert expected in error and filename in error
        assert strict is not None and strict[0] == "ConfigError" and expected in strict[1]


@pytest.mark.parametrize("case", ["alias bomb, wider", "20,000-deep TOML", "Latin-1 YAML"])
@pytest.mark.parametrize("as_json", [False, True])
def test_the_cli_answers_a_hostile_file_with_exit_2_and_the_error(
    case: str, as_json: bool, tmp_path: Path, waypost_clean_env: dict[str, str], waypost_cli: str
) -> None:
    filename, writer, expected = HOSTILE[case]
    writer(tmp_path / filename)
    args = [waypost_cli, "--config", filename, "--data-dir", "d", "status"]
    done = run([*args, "--json"] if as_json else args, waypost_clean_env, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    if as_json:  # the error as JSON on stdout, for scripts
        answer = json.loads(done.stdout)
        assert answer["ok"] is False and answer["exit_code"] == 2
        error = answer["error"]
    else:
        error = done.stderr
    assert expected in error and filename in error
    assert "Traceback" not in done.stderr


def test_a_good_file_still_loads_under_the_same_limits(
    tmp_path: Path, waypost_clean_env: dict[str, str], waypost_cli: str
) -> None:
    (tmp_path / "telemetry.yml").write_text(
        "telemetry:\n  app: fine\n  level: off\n  version: 1.10\n"
        "  sinks: {jsonl: {path: e.jsonl}}\n"
    )
    done = run([waypost_cli, "--data-dir", "d", "status", "--json"], waypost_clean_env, tmp_path)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert (status["level"], status["version"], status["rule"]) == ("off", "1.10", "level")


def test_aliases_and_merge_keys_within_the_limits_work(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_text(
        "telemetry:\n"
        "  sinks:\n"
        "    a: &a {type: jsonl, path: a.jsonl, timeout: 5}\n"
        "    b: {<<: *a, path: b.jsonl}\n"
    )
    config, _ = cfg.load(path, {})
    assert config.sink_specs()["b"] == {"type": "jsonl", "path": "b.jsonl", "timeout": 5}


def test_a_mapping_given_in_code_has_the_same_limits() -> None:
    loop: dict[str, Any] = {"app": "x"}
    loop["again"] = loop
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        cfg.load({"telemetry": loop}, {})
    wide = {"telemetry": {"schemas": ["m"] * 10_000}}
    with pytest.raises(ConfigError, match="more than 5,000 values"):
        cfg.load(wide, {})


def test_utf8_with_a_bom_and_utf16_yaml_are_read(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_bytes(b"\xef\xbb\xbftelemetry:\n  app: caf\xc3\xa9\n")
    assert cfg.load(path, {})[0].app == "café"
    path.write_bytes("telemetry:\n  app: café\n".encode("utf-16"))
    assert cfg.load(path, {})[0].app == "café"
    toml = tmp_path / "t.toml"
    toml.write_bytes('[telemetry]\napp = "café"\n'.encode("utf-16"))
    with pytest.raises(ConfigError, match="TOML must be UTF-8"):
        cfg.load(toml, {})


def test_json_style_surrogate_pairs_are_the_character(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_text(json.dumps({"telemetry": {"app": "rocket \U0001f680"}}))  # \\ud83d\\ude80
    assert cfg.load(path, {})[0].app == "rocket \U0001f680"


def test_toml_brackets_in_strings_and_comments_do_not_count_as_nesting(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        "[telemetry]\n"
        f'app = "{"[" * 100}"  # {"{" * 100}\n'
        f"version = '{'[' * 100}'\n"
        f'[telemetry.notice]\ntext = """{"[" * 100}\n"quoted" [ ]"""\n'
    )
    config, _ = cfg.load(path, {})
    assert config.app == "[" * 100 and config.version == "[" * 100


# --- ${...} expansion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "a"}, "a"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),  # empty counts as unset
        ("${A:-${B}}", {"B": "b"}, "b"),
        ("${A:-${B}}", {"A": "a"}, "a"),  # B need not be set when A is
        ("${A:-${B:-${C:-deep}}}", {}, "deep"),
        ("x${A:-}y", {}, "xy"),
        ("$${A}", {"A": "a"}, "${A}"),
        ("$${A:-${B}}", {"B": "b"}, "${A:-b}"),
        ("pre $${ and ${A}", {"A": "a"}, "pre ${ and a"),
        ("$A and $ and }", {}, "$A and $ and }"),
        ("${A:-a}}", {}, "a}"),
        ("${A-d}", {}, "d"),
    ],
)
def test_expansion(text: str, env: dict[str, str], expected: str) -> None:
    assert cfg.expand(text, env) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${NOPE}", "environment variable NOPE is not set"),
        ("${A:-${NOPE}}", "environment variable NOPE is not set"),
        ("${ A}", "write $${ for a literal ${"),
        ("${A", "unterminated reference"),
        ("${A:-${B}", "unterminated reference"),
        ("${" + "A:-${" * 12 + "x" + "}" * 13, "defaults nested deeper than 8 levels"),
    ],
)
def test_expansion_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        cfg.expand(text, {}, "telemetry.app")
    assert message in str(info.value) and "telemetry.app" in str(info.value)


def test_a_missing_variable_is_a_missing_variable_error() -> None:
    with pytest.raises(MissingVariableError):
        cfg.expand("${NOPE}", {})


def test_environment_values_are_not_expanded(tmp_path: Path) -> None:
    config, _ = cfg.load(None, {"WAYPOST_VERSION": "${HOME}", "HOME": "/root"})
    assert config.version == "${HOME}"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="${}:-AB$x", max_size=40))
def test_expansion_answers_any_text_with_text_or_a_config_error(text: str) -> None:
    try:
        out = cfg.expand(text, {"A": "a"})
    except ConfigError as exc:
        assert "telemetry" in str(exc)
    else:
        assert isinstance(out, str)
        if "${" not in text:
            assert out == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_dollar_dollar_brace_gives_back_any_text(text: str) -> None:
    escaped = text.replace("${", "$${")
    assert cfg.expand(escaped, {}) == text or "$$" in text


def test_files_under_the_limits_stay_fast_to_refuse_when_just_over(tmp_path: Path) -> None:
    # Exactly at the limits: accepted.
    path = tmp_path / "t.yml"
    nested = "[" * (cfg.MAX_DEPTH - 3) + "]" * (cfg.MAX_DEPTH - 3)
    path.write_text(f"telemetry:\n  metrics:\n    x: {nested}\n")
    assert cfg.load(path, {})[0].metrics.model_extra == {"x": json.loads(nested)}
    assert os.path.getsize(path) < cfg.MAX_BYTES


def test_the_cli_warns_of_an_unknown_variable_and_still_answers(
    tmp_path: Path, waypost_clean_env: dict[str, str], waypost_cli: str
) -> None:
    (tmp_path / "telemetry.yml").write_text("telemetry:\n  app: fine\n  level: off\n")
    env = {**waypost_clean_env, "WAYPOST_LEVL": "all", "WAYPOST_POLICY_VERSION": "2"}
    done = run([waypost_cli, "--data-dir", "d", "status", "--json"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: WAYPOST_LEVL is ignored" in done.stderr and "WAYPOST_LEVEL?" in done.stderr
    status = json.loads(done.stdout)
    assert status["level"] == "off" and status["config_warnings"] == [
        "WAYPOST_LEVL is ignored: telemetry has no setting 'levl' (did you mean WAYPOST_LEVEL?)"
    ]
