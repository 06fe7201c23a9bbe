"""``waypost demo`` as a new user reads it: whole properties, the originals beside what was sent
for the redacted rows, figures that agree with the hint, and a hint whose command works."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest


def run(exe: str, args: list[str], env: dict[str, str], cwd: Path) -> str:
    out = subprocess.run(
        [exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def shown(
    tmp_path: Path, waypost_clean_env: dict[str, str], waypost_cli: str
) -> tuple[str, dict[str, str]]:
    # Wide enough that no table cell wraps: what a cell holds is on one line.
    env = {**waypost_clean_env, "COLUMNS": "400", "UV_RUN_RECURSION_DEPTH": "1"}
    return run(waypost_cli, ["--data-dir", str(tmp_path / "d"), "demo"], env, tmp_path), env


def test_properties_are_shown_whole(
    tmp_path: Path, shown: tuple[str, dict[str, str]], waypost_cli: str
) -> None:
    text, env = shown
    data = json.loads(
        run(waypost_cli, ["--data-dir", str(tmp_path / "j"), "demo", "--json"], env, tmp_path)
    )
    for record in data["records"]:
        assert json.dumps(record["properties"], ensure_ascii=False) in text, record["name"]
    assert '"[REDACTED:ipv4]"}' in text and "[REDACTED:ip " not in text


def test_redacted_rows_show_the_original_beside_what_was_sent(
    shown: tuple[str, dict[str, str]],
) -> None:
    text, _ = shown
    (comment,) = [line for line in text.splitlines() if "jane.doe@example.com" in line]
    assert "feedback_sent" in comment and "comment" in comment
    assert '"works great, mail me at [REDACTED:email]"' in comment
    (address,) = [line for line in text.splitlines() if '"10.0.0.7"' in line]
    assert '"[REDACTED:ipv4]"' in address


def test_the_hint_works_and_agrees_with_the_figures(
    tmp_path: Path, shown: tuple[str, dict[str, str]], waypost_cli: str
) -> None:
    text, env = shown
    kept = int(re.search(r"kept as sent (\d+)", text).group(1))  # type: ignore[union-attr]
    hint = re.search(r"records kept: (.+?)\)\s*$", text, re.M).group(1)  # type: ignore[union-attr]
    assert f"the {kept} records kept" in text and kept > 0
    # Under `uv run` the environment is gone when it returns: the hint says `uv run waypost`.
    assert hint.startswith("uv run waypost --data-dir ")
    argv = shlex.split(hint)[3:]  # uv runs the console script of this environment
    listed = json.loads(run(waypost_cli, [*argv, "--json"], env, tmp_path))
    assert listed["total"] == kept
    # Outside uv, the command that was run.
    plain = {k: v for k, v in env.items() if k != "UV_RUN_RECURSION_DEPTH"}
    again = run(waypost_cli, ["--data-dir", str(tmp_path / "p"), "demo"], plain, tmp_path)
    assert "uv run" not in again and "show --state sent" in again
