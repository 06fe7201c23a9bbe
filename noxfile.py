"""Sessions: ``tests`` (everything), one isolated session per plugin, ``example_sink``,
``lint`` (ruff, mypy) and ``bench`` (not run by default)."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["tests", "plugin", "example_sink", "lint"]

ROOT = Path(__file__).parent
PLUGINS = sorted(p.parent.name for p in ROOT.glob("plugins/*/pyproject.toml"))
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100"]


def _plugin_spec(name: str) -> str:
    return f"./plugins/{name}[test]"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite: core, every plugin, the examples and the end-to-end tests."""
    session.install(
        "-e", "./core[admin,test]", *(f"-e{_plugin_spec(p)}" for p in PLUGINS), *TEST_TOOLS
    )
    if (ROOT / "examples/waypost-example-sink/pyproject.toml").exists():
        session.install("-e", "./examples/waypost-example-sink[test]")
    paths = ["tests", *(f"plugins/{p}/tests" for p in PLUGINS)]
    paths += [str(p.relative_to(ROOT)) for p in ROOT.glob("examples/*/tests")]
    session.run("pytest", *paths, *session.posargs)


@nox.session
@nox.parametrize("name", PLUGINS, ids=PLUGINS)
def plugin(session: nox.Session, name: str) -> None:
    """One plugin with the core alone: proves it installs and works on its own."""
    session.install("./core", _plugin_spec(name), *TEST_TOOLS)
    session.run("pytest", f"plugins/{name}/tests", *session.posargs)


@nox.session
def example_sink(session: nox.Session) -> None:
    """The example third-party plugin, installed and tested as an outside author would."""
    path = ROOT / "examples/waypost-example-sink"
    if not (path / "pyproject.toml").exists():
        session.skip("no example plugin")
    session.install("./core", "./examples/waypost-example-sink[test]", *TEST_TOOLS)
    session.run("pytest", "examples/waypost-example-sink/tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy (strict) over the core and the plugins."""
    session.install(
        "ruff>=0.8",
        "mypy>=1.13",
        "types-PyYAML",
        "pytest>=8",
        "-e",
        "./core[admin]",
        *(f"-e./plugins/{p}" for p in PLUGINS),
    )
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "core/src", *(f"plugins/{p}/src" for p in PLUGINS))


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against the vendor SDKs, side by side (see bench/README.md)."""
    session.install(
        "-e", "./core", "-e./plugins/http", "-e./plugins/posthog", "-r", "bench/requirements.txt"
    )
    session.run("python", "bench/run.py", *session.posargs)
