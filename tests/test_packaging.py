"""Every distribution of the workspace ships the license and the metadata PyPI shows, and writes its
version once. (The ``package`` nox session builds the wheels and checks what they contain.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

import waypost

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DISTRIBUTIONS = sorted(
    path.parent
    for pattern in WORKSPACE["tool"]["uv"]["workspace"]["members"]
    for path in ROOT.glob(f"{pattern}/pyproject.toml")
)
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
URLS = ("Homepage", "Documentation", "Source", "Issues")


def _project(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))
    return data


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_workspace_is_found() -> None:
    found = {_id(p) for p in DISTRIBUTIONS}
    assert {"core", "plugins/http", "examples/waypost-example-sink"} <= found


@pytest.mark.parametrize("path", DISTRIBUTIONS, ids=_id)
def test_the_distribution_ships_the_license(path: Path) -> None:
    project = _project(path)["project"]
    assert project["license"] == "Apache-2.0"
    assert project.get("license-files") == ["LICENSE"]
    license_file = path / "LICENSE"
    assert license_file.is_file(), f"copy the repository's LICENSE to {_id(path)}/"
    assert license_file.read_bytes() == (ROOT / "LICENSE").read_bytes()
    # PEP 639 metadata (License-Expression, licenses/ in the wheel) needs hatchling 1.27.
    assert "hatchling>=1.27" in _project(path)["build-system"]["requires"]


@pytest.mark.parametrize("path", DISTRIBUTIONS, ids=_id)
def test_the_distribution_has_urls_and_classifiers(path: Path) -> None:
    project = _project(path)["project"]
    homepage = _project(ROOT / "core")["project"]["urls"]["Homepage"]
    urls = project.get("urls", {})
    assert set(URLS) <= set(urls), f"{_id(path)}: [project.urls] needs {', '.join(URLS)}"
    assert all(url.startswith(homepage) for url in urls.values()), urls
    assert project["requires-python"] == f">={PYTHONS[0]}"
    classifiers = project.get("classifiers", [])
    for version in PYTHONS:
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: SPDX field only"


@pytest.mark.parametrize("path", DISTRIBUTIONS, ids=_id)
def test_the_version_is_written_once(path: Path) -> None:
    data = _project(path)
    project = data["project"]
    packages = data["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    init = path / packages[0] / "__init__.py"
    declared = re.findall(r'^__version__ = "([^"]+)"$', init.read_text(encoding="utf-8"), re.M)
    if "version" in project.get("dynamic", []):
        assert "version" not in project
        assert data["tool"]["hatch"]["version"]["path"] == f"{packages[0]}/__init__.py"
        assert len(declared) == 1, f"{init} must set __version__ once"
    else:
        assert not declared, f"{_id(path)}: read the version from {init.name} (dynamic)"


def test_the_core_version_comes_from_its_module() -> None:
    data = _project(ROOT / "core")
    assert data["project"]["dynamic"] == ["version"]
    init = (ROOT / "core" / data["tool"]["hatch"]["version"]["path"]).read_text(encoding="utf-8")
    assert f'__version__ = "{waypost.__version__}"' in init


def test_test_tools_are_not_published() -> None:
    """Test tools are dependency groups: a published distribution has no ``test`` extra. (The
    example sink keeps one: it models the plugin guide's ``pip install -e ".[test]"``.)"""
    for path in DISTRIBUTIONS:
        extras = _project(path)["project"].get("optional-dependencies", {})
        if path.name != "waypost-example-sink":
            assert "test" not in extras, f"{_id(path)}: move the test extra to [dependency-groups]"
    assert "playwright" in " ".join(_project(ROOT / "core")["dependency-groups"]["test"])
