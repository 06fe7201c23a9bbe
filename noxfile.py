"""Sessions (``uv run nox --list``); ``uv run nox`` runs all but ``tests`` and ``bench``, and the
core's matrix on its two ends.

- ``tests_core(3.10)`` ... ``tests_core(3.13)``: the core's suite (``tests/``) with the core alone,
  on each Python version (``uv run nox`` runs 3.10 and 3.13, ``uv run nox -s tests_core`` all).
- ``processes``: the real-server process tests (``tests/processes``) and the core's tests that
  deliver through the http sink (marked ``http_sink``), once.
- ``plugin(<name>)``: one per ``plugins/*``, with the core alone; ``example_sink`` and
  ``collector`` likewise (a new plugin or the collector gets its session by existing).
- ``examples``: the application examples, with every plugin installed side by side.
- ``lint``: ruff and mypy strict.  ``package``: every wheel and sdist built, checked and installed.
- ``tests`` (not by default): every suite in one environment.  ``bench``: the benchmarks.

Test tools come from each distribution's ``test`` dependency group (PEP 735) and the linters from
the workspace's ``lint`` group, never from published extras.  Pythons are the ones on this
machine (pyenv's versions, then ``PATH``); nothing is downloaded.  A version not found is skipped
("interpreter not found"), except under ``WAYPOST_REQUIRE_SERVERS=1`` (CI), where it fails.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import nox
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # the core depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# The default run tests the core on the ends of the supported range; ``nox -s tests_core`` on all.
DEFAULT_PYTHONS = ("3.10", "3.13")
PLUGINS = sorted(p.parent.name for p in ROOT.glob("plugins/*/pyproject.toml"))
EXAMPLE_SINK = "examples/waypost-example-sink"
COLLECTOR = "collector"

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1"
nox.options.sessions = [
    *(f"tests_core({v})" for v in DEFAULT_PYTHONS),
    "processes",
    "plugin",
    "example_sink",
    "collector",
    "examples",
    "lint",
    "package",
]
# uv, called by the sessions, must not fetch an interpreter either.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")


def _interpreter(version: str) -> str:
    """This machine's interpreter for ``version``: pyenv's newest patch release of it, else the
    version itself, which nox looks up on ``PATH`` (pyenv's shims answer only for the global
    version, so they cannot be relied on)."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    patch = re.compile(rf"{re.escape(version)}\.(\d+)")
    found = [
        (int(m.group(1)), exe)
        for d in versions.glob(f"{version}.*")
        if (m := patch.fullmatch(d.name)) and (exe := d / "bin" / f"python{version}").exists()
    ]
    return str(max(found)[1]) if found else version


def _pyproject(path: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / path / "pyproject.toml").read_text(encoding="utf-8"))


def _test_tools(path: str) -> list[str]:
    """``uv pip install`` arguments for the test tools of the distribution at ``path``: its
    ``test`` dependency group (or, for one that still has it, its ``test`` extra)."""
    data = _pyproject(path)
    if "test" in data.get("dependency-groups", {}):
        return ["--group", f"{path}/pyproject.toml:test"]
    return [*data["project"].get("optional-dependencies", {}).get("test", [])]


def _requirements(path: str, *, tests: bool) -> list[str]:
    data = _pyproject(path)
    specs = list(data["project"].get("dependencies", []))
    if tests:  # a test group may name workspace distributions (plugins an end-to-end test uses)
        specs += [
            s for s in data.get("dependency-groups", {}).get("test", []) if isinstance(s, str)
        ]
    return specs


def _workspace_requirements(path: str) -> list[str]:
    """The distribution at ``path`` and the workspace distributions it or its tests depend on, as
    local paths with their extras (none of them is on the package index yet)."""
    members = {
        canonicalize_name(_pyproject(p)["project"]["name"]): p for p in ["core", *_distributions()]
    }
    found: dict[str, set[str]] = {path: set()}
    pending = [path]
    while pending:
        current = pending.pop()
        for spec in _requirements(current, tests=current == path):
            req = Requirement(spec)
            dep = members.get(canonicalize_name(req.name))
            if dep is not None:
                if dep not in found:
                    pending.append(dep)
                found.setdefault(dep, set()).update(req.extras)
    return [f"./{p}[{','.join(sorted(x))}]" if x else f"./{p}" for p, x in found.items()]


def _alone(session: nox.Session, path: str) -> None:
    """Install the distribution at ``path`` with what it needs of the workspace (the core) and its
    test tools, nothing else, then run its tests."""
    session.install(*_workspace_requirements(path), *_test_tools(path))
    session.run("pytest", f"{path}/tests", *session.posargs)


def _distributions() -> list[str]:
    """Every distribution beside the core that exists in this checkout."""
    paths = [f"plugins/{p}" for p in PLUGINS]
    paths += [p for p in (EXAMPLE_SINK, COLLECTOR) if (ROOT / p / "pyproject.toml").exists()]
    return paths


@nox.session
@nox.parametrize("python", [_interpreter(v) for v in PYTHONS], ids=list(PYTHONS))
def tests_core(session: nox.Session) -> None:
    """The core's suite on one Python version, with the core (and its admin page) alone."""
    session.install("./core[admin]", *_test_tools("core"))
    session.run(
        "pytest", "tests", "--ignore=tests/processes", "-m", "not http_sink", *session.posargs
    )


@nox.session
def processes(session: nox.Session) -> None:
    """The process tests (real gunicorn, uvicorn and hypercorn servers, forks, signals) once, on
    the default Python, with the core and the http sink they deliver through; the core's other
    tests that deliver through it (marked ``http_sink``) too."""
    session.install("./core[admin]", "./plugins/http", *_test_tools("core"))
    session.run("pytest", "tests/processes", *session.posargs)
    session.run("pytest", "tests", "--ignore=tests/processes", "-m", "http_sink", *session.posargs)


@nox.session
@nox.parametrize("name", PLUGINS, ids=PLUGINS)
def plugin(session: nox.Session, name: str) -> None:
    """One plugin with the core alone: proves it installs and works on its own."""
    _alone(session, f"plugins/{name}")


@nox.session
def example_sink(session: nox.Session) -> None:
    """The example third-party plugin, installed and tested as an outside author would."""
    if not (ROOT / EXAMPLE_SINK / "pyproject.toml").exists():
        session.skip("no example plugin")
    _alone(session, EXAMPLE_SINK)


@nox.session
def collector(session: nox.Session) -> None:
    """The collector with what it needs of the workspace (the core, two plugins) alone."""
    if not (ROOT / COLLECTOR / "pyproject.toml").exists():
        session.skip("no collector in this checkout")
    _alone(session, COLLECTOR)


def _app_examples() -> list[str]:
    """The application examples' test folders (the example sink has a session of its own)."""
    return [
        str(p.relative_to(ROOT))
        for p in sorted(ROOT.glob("examples/*/tests"))
        if p.parent != ROOT / EXAMPLE_SINK
    ]


def _install_all(session: nox.Session) -> list[str]:
    """Install the core and every distribution side by side, editable, with their test groups;
    return the distributions' paths."""
    dists = _distributions()
    editable = [arg for path in dists for arg in ("-e", f"./{path}")]
    groups = [arg for path in ["core", *dists] for arg in _test_tools(path)]
    session.install("-e", "./core[admin]", *editable, *groups)
    return dists


@nox.session
def examples(session: nox.Session) -> None:
    """The application examples, with the core and every plugin installed side by side."""
    _install_all(session)
    session.run("pytest", *_app_examples(), *session.posargs)


@nox.session(default=False)
def tests(session: nox.Session) -> None:
    """Every suite in one environment (the default sessions' tests, minus the Python matrix)."""
    dists = _install_all(session)
    paths = ["tests", *(f"{p}/tests" for p in dists if (ROOT / p / "tests").is_dir())]
    session.run("pytest", *paths, *_app_examples(), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy (strict) over the core and every distribution."""
    dists = [p for p in _distributions() if p != EXAMPLE_SINK]
    session.install(
        "--group",
        "pyproject.toml:lint",
        "-e",
        "./core[admin]",
        *(arg for path in dists for arg in ("-e", f"./{path}")),
    )
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "core/src", *(f"{p}/src" for p in dists if (ROOT / p / "src").is_dir()))


PROJECT_URLS = ("Homepage", "Documentation", "Source", "Issues")


def _check_wheel(wheel: Path, license_text: bytes) -> tuple[list[str], bool]:
    """What the wheel lacks of what every waypost distribution ships, and whether it is a plugin
    (declares a ``waypost.sinks`` or ``waypost.metrics`` entry point)."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        wanted = ("METADATA", "licenses/LICENSE", "entry_points.txt")
        files = {f: zf.read(f"{info}/{f}") for f in wanted if f"{info}/{f}" in names}
    meta, entry_points = files["METADATA"].decode(), files.get("entry_points.txt", b"").decode()
    fields = email.parser.Parser().parsestr(meta, headersonly=True)
    urls = {u.split(",")[0] for u in fields.get_all("Project-URL") or []}
    classifiers = fields.get_all("Classifier") or []
    problems = [] if files.get("licenses/LICENSE") == license_text else ["the LICENSE"]
    if fields["License-Expression"] != "Apache-2.0":
        problems.append("License-Expression: Apache-2.0")
    problems += [f"Project-URL {u}" for u in PROJECT_URLS if u not in urls]
    problems += [
        f"classifier Python {v}"
        for v in PYTHONS
        if f"Programming Language :: Python :: {v}" not in classifiers
    ]
    is_plugin = "[waypost.sinks]" in entry_points or "[waypost.metrics]" in entry_points
    return problems, is_plugin and fields["Name"] != "waypost"


def _check_sdist(sdist: Path, license_text: bytes) -> list[str]:
    top = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as tf:
        shipped = tf.extractfile(f"{top}/LICENSE") if f"{top}/LICENSE" in tf.getnames() else None
        return [] if shipped is not None and shipped.read() == license_text else ["the LICENSE"]


@nox.session
def package(session: nox.Session) -> None:
    """Build every wheel and sdist, check their LICENSE and metadata, install and load them.

    Each must ship the LICENSE, the project URLs and the Python classifiers; the wheels are then
    installed alone, as the README says, and every plugin must load from them."""
    out = Path(session.create_tmp()) / "dist"
    shutil.rmtree(out, ignore_errors=True)
    session.run("uv", "build", "--all-packages", "--quiet", "--out-dir", str(out), external=True)
    license_text = (ROOT / "LICENSE").read_bytes()
    expected = len(["core", *_distributions()])
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    problems = []
    if not len(wheels) == len(sdists) == expected:
        problems.append(f"{len(wheels)} wheels, {len(sdists)} sdists for {expected} distributions")
    plugins = set()
    for wheel in wheels:
        lacks, is_plugin = _check_wheel(wheel, license_text)
        if lacks:
            problems.append(f"{wheel.name} lacks {', '.join(lacks)}")
        if is_plugin:
            plugins.add(wheel.name.split("-")[0].replace("_", "-"))
    problems += [f"{t.name} lacks {what}" for t in sdists for what in _check_sdist(t, license_text)]
    if problems:
        session.error("; ".join(problems))

    session.install(*map(str, wheels))
    version = session.run("python", "-c", "import waypost; print(waypost.__version__)", silent=True)
    core_wheel = next(w.name for w in wheels if w.name.startswith("waypost-"))
    if f"-{str(version).strip()}-" not in core_wheel:
        session.error(f"waypost.__version__ is {version!r}, the wheel is {core_wheel}")
    listed = json.loads(str(session.run("waypost", "plugins", "--json", silent=True)))
    status = {p["distribution"]: p["status"] for p in listed}
    broken = {d: s for d, s in status.items() if d in plugins and s not in ("loaded", "not loaded")}
    missing = plugins - status.keys()
    if broken or missing:
        session.error(f"plugins not loaded from the wheels: {broken or ''} {missing or ''}")
    session.log(f"{len(wheels)} wheels and sdists checked; plugins loaded: {sorted(plugins)}")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks against the vendor SDKs, side by side (see bench/README.md)."""
    session.install(
        "-e", "./core", "-e./plugins/http", "-e./plugins/posthog", "-r", "bench/requirements.txt"
    )
    session.run("python", "bench/run.py", *session.posargs)
