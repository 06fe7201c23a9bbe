"""The docs check themselves: every hook is documented with its arguments and has a test, the
``waypost plugins --json`` keys are the documented ones, and the plugin that
docs/writing-a-plugin.md builds, with the tests it shows, is run here as written."""

from __future__ import annotations

import inspect
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import pytest
from plugin_guide import guide_files

from waypost import hookspecs
from waypost.plugins import PluginInfo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = DOCS / "writing-a-plugin.md"


def hook_specs() -> dict[str, list[str]]:
    """Every hook declared in ``waypost.hookspecs``, with its argument names."""
    return {
        name: list(inspect.signature(func).parameters)
        for name, func in vars(hookspecs).items()
        if inspect.isfunction(func) and hasattr(func, "waypost_spec")
    }


def docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("**/*.md")))


def test_the_hooks_are_found() -> None:
    assert {"register_sinks", "register_scrubbers", "register_commands"} <= set(hook_specs())


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_is_documented_with_its_arguments(name: str) -> None:
    heading = f"### `{name}({', '.join(hook_specs()[name])})`"
    assert heading in docs_text(), f"docs/ has no section {heading!r}"


def _test_sources() -> list[Path]:
    found = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py")]
    found += ROOT.glob("examples/*/tests/**/*.py")
    return [p for p in found if p.name != Path(__file__).name]


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_has_a_test(name: str) -> None:
    """Some test implements the hook (``def name(``) or calls it by name."""
    pattern = re.compile(rf"def {name}\(|call_chain\(\s*[\"']{name}[\"']|\.hook\.{name}\(")
    users = [p for p in _test_sources() if pattern.search(p.read_text(encoding="utf-8"))]
    assert users, f"no test implements or calls the hook {name!r}"


def test_plugins_json_keys_are_documented() -> None:
    keys = PluginInfo("t", "m", "d", "1").as_dict()
    section = GUIDE.read_text(encoding="utf-8").split("## 10.")[1].split("## 11.")[0]
    documented = set(re.findall(r"`(\w+)`", section))
    assert set(keys) <= documented, set(keys) - documented


# --- the guide's plugin, built and tested as written ----------------------------------------------


FILES = guide_files()
_BUILT = Path(tempfile.mkdtemp(prefix="waypost-guide-"))
for _path, _body in FILES.items():
    (_BUILT / _path).parent.mkdir(parents=True, exist_ok=True)
    (_BUILT / _path).write_text(_body, encoding="utf-8")
sys.path.insert(0, str(_BUILT / "src"))

_guide_tests = types.ModuleType("guide_acme_tests")
exec(
    compile(FILES["tests/test_acme_sink.py"], "guide:tests/test_acme_sink.py", "exec"),
    vars(_guide_tests),
)


@pytest.fixture(autouse=True)
def _guide_plugin_installed(waypost_register_plugin: Any) -> None:
    waypost_register_plugin("acme", "waypost_acme")  # as `pip install waypost-acme` would


def test_guide_spells_out_the_plugin() -> None:
    assert set(FILES) == {
        "pyproject.toml",
        "src/waypost_acme/__init__.py",
        "tests/test_acme_sink.py",
    }


def test_guide_pyproject_is_a_plugin_distribution() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads(FILES["pyproject.toml"])["project"]
    assert project["name"] == "waypost-acme"
    assert project["entry-points"]["waypost.sinks"] == {"acme": "waypost_acme"}
    assert any(dep.startswith("waypost>=") for dep in project["dependencies"])
    assert "test" in project["optional-dependencies"]


def test_guide_plugin_is_listed_by_waypost_plugins() -> None:
    import warnings

    from waypost.plugins import PluginManager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the plausible shim says it is
        infos = PluginManager().describe_all()
    info = next(i for i in infos if i.sink_type == "acme")
    assert info.loaded and info.error is None
    assert info.sink_types == ["acme"] and info.hooks == ["register_sinks"]


TestGuideAcmeContract = _guide_tests.TestAcmeContract
test_guide_per_event_errors = _guide_tests.test_per_event_errors_fail_those_events
test_guide_distinct_id = _guide_tests.test_sends_the_applications_distinct_id
test_guide_delivers_from_config = _guide_tests.test_delivers_from_config
