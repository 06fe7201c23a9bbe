"""The README's "Use" section as a new user meets it: its files written out as they are named,
the application run, and ``waypost manifest`` run beside its config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def use_section() -> list[tuple[str, str]]:
    """The code blocks of the README's "Use" section: (language, text)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    return FENCE.findall(section)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The section's files where its first lines say they are."""
    blocks = use_section()
    payloads, application, config = blocks[0][1], blocks[1][1], blocks[2][1]
    assert payloads.startswith("# myapp/telemetry.py\n")
    assert config.startswith("# telemetry.yml\n")
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "telemetry.py").write_text(payloads)
    (tmp_path / "app.py").write_text(application)
    (tmp_path / "telemetry.yml").write_text(config)
    return tmp_path


def test_the_manifest_lists_the_payload_of_the_snippet(
    project: Path, waypost_clean_env: dict[str, str], waypost_cli: str
) -> None:
    env = {**waypost_clean_env, "POSTHOG_KEY": "phc_readme"}
    out = subprocess.run(
        [waypost_cli, "manifest", "--json"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["errors"] == []
    (run,) = manifest["events"]
    assert run["event"] == "run"
    assert [f["property"] for f in run["fields"]] == ["runSeconds", "runSuccess"]
    text = subprocess.run(
        [waypost_cli, "manifest"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert text.returncode == 0, text.stderr
    assert "No typed payloads" not in text.stdout and "`runSeconds` | integer" in text.stdout


def test_the_application_snippet_runs_and_delivers(
    project: Path, waypost_clean_env: dict[str, str]
) -> None:
    # Everything as written but the PostHog entry, which would reach the vendor's cloud; the
    # jsonl file is in the data dir.
    config = project / "telemetry.yml"
    lines = config.read_text().splitlines()
    kept = [line for line in lines if not line.lstrip().startswith("posthog:")]
    assert len(kept) == len(lines) - 1
    config.write_text("\n".join(kept) + "\n")
    data = project / "data"
    env = {**waypost_clean_env, "WAYPOST_HOME": str(data)}
    out = subprocess.run(
        [sys.executable, "app.py"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in (data / "events.jsonl").read_text().splitlines()]
    assert [e["name"] for e in events] == ["run", "run"]
    assert all(e["properties"] == {"runSeconds": 45, "runSuccess": True} for e in events)
