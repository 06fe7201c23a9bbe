"""``waypost.testing`` tested: the contract suite catches what it promises (mutated copies of
the guide's plugin each fail exactly the check meant for them), suites written for waypost 0.1
still pass, and the pytest plugin's fixtures neither hide a project's own nor change anything
global."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import itertools
import pkgutil
import socketserver
from http.server import HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from plugin_guide import guide_files

import waypost
from waypost.testing import HttpPeer, Peer, RecordingServer, SinkContract

pytest_plugins = ("pytester",)

LEGACY = Path(__file__).parent / "support" / "legacy"
GUIDE = guide_files()
GUIDE_PLUGIN = GUIDE["src/waypost_acme/__init__.py"]
GUIDE_TESTS = GUIDE["tests/test_acme_sink.py"]
_runs = itertools.count()
# Plugins that would import themselves afresh in every in-process run (hypothesis for its
# summary): seconds each time, and nothing these runs need.
QUIET_RUN = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio")

# An in-process run drops the modules it imported when it ends. Import waypost's now, so that
# every run and this module share one waypost.plugins (the one that register_plugin patches).
for _module in pkgutil.walk_packages(waypost.__path__, "waypost."):
    try:
        importlib.import_module(_module.name)
    except ImportError:  # an optional extra (the admin page) that is not installed
        pass


def run_suite(
    pytester: pytest.Pytester, plugin: str, tests: str, *args: str
) -> tuple[set[str], set[str], pytest.HookRecorder]:
    """Install ``plugin`` as the ``acme`` sink type (a module name of its own, so copies never
    meet in ``sys.modules``), run ``tests`` against it in-process; the names of the tests that
    passed and failed."""
    module = f"waypost_acme_copy{next(_runs)}"
    package = pytester.mkpydir(module)
    (package / "__init__.py").write_text(plugin, encoding="utf-8")
    pytester.makeconftest(
        "import pytest\n\n"
        "@pytest.fixture(autouse=True)\n"
        "def _installed(waypost_register_plugin):\n"
        f"    waypost_register_plugin('acme', {module!r})\n"
    )
    pytester.makepyfile(test_acme_sink=tests)
    pytester.syspathinsert()
    recorder = pytester.inline_run(*QUIET_RUN, *args)
    passed, _skipped, failed = recorder.listoutcomes()
    return _names(passed), _names(failed), recorder


def _names(reports: Any) -> set[str]:
    return {r.nodeid.rsplit("::", 1)[-1] for r in reports}


def _warnings(recorder: pytest.HookRecorder) -> list[str]:
    return [str(c.warning_message.message) for c in recorder.getcalls("pytest_warning_recorded")]


def test_the_guide_plugin_passes_the_whole_suite(pytester: pytest.Pytester) -> None:
    """The control for the mutations below: unchanged, the guide's plugin passes."""
    passed, failed, recorder = run_suite(pytester, GUIDE_PLUGIN, GUIDE_TESTS)
    assert not failed
    contract = {n for n in dir(SinkContract) if n.startswith("test_contract_")}
    assert contract <= passed, contract - passed
    assert not [w for w in _warnings(recorder) if "deprecated" in w]


_LOG_KEY = """        url = f"{self.config.base_url}/v1/batch"
        import logging

        key = self.config.api_key.get_secret_value()
        logging.getLogger("waypost_acme").debug("POST %s with key %s", url, key)"""

MUTATIONS = {
    "follows_redirects": (
        "follow_redirects=False",
        "follow_redirects=True",
        {"test_contract_never_follows_redirects"},
    ),
    "close_fails_before_open": (
        "        client, self._client = self._client, None\n"
        "        if client is not None:\n"
        "            client.close()\n",
        "        self._client.close()  # assumes open() ran\n",
        {"test_contract_close_before_open_is_harmless"},
    ),
    "close_fails_twice": (
        "        client, self._client = self._client, None\n",
        "        if getattr(self, '_closed', False):\n"
        "            raise RuntimeError('closed twice')\n"
        "        self._closed = True\n"
        "        client, self._client = self._client, None\n",
        {"test_contract_close_is_clean"},
    ),
    "logs_its_key": (
        '        url = f"{self.config.base_url}/v1/batch"',
        _LOG_KEY,
        {"test_contract_never_logs_secrets"},
    ),
    "prints_its_key": (
        '        url = f"{self.config.base_url}/v1/batch"',
        '        url = f"{self.config.base_url}/v1/batch"\n'
        "        print('key', self.config.api_key.get_secret_value())",
        {"test_contract_never_logs_secrets"},
    ),
    "key_in_a_reason": (
        'reason = f"Acme: cannot reach {url}: {type(exc).__name__}"',
        'reason = f"Acme: cannot reach {url} as {self.config.api_key.get_secret_value()}"',
        # The core's sanitiser would mask it, but the contract reads the sink's own answer.
        {"test_contract_never_logs_secrets"},
    ),
    "ignores_its_timeout": (
        "httpx.Client(timeout=self.config.timeout,",
        "httpx.Client(timeout=None,",
        {"test_contract_slow_answer_times_out"},
    ),
    "reads_no_status": (
        'raise_for_status(response.status_code, response.headers, response.text, what="Acme")',
        "pass  # every answer taken for a success",
        {
            "test_contract_retryable_answers",
            "test_contract_permanent_answer",
            "test_contract_never_follows_redirects",
        },
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_mutated_guide_plugin_fails_the_suite(pytester: pytest.Pytester, mutation: str) -> None:
    """Each copy runs the checks meant to catch it, and two that it must still pass (the
    control above runs them all): only the meant ones fail."""
    old, new, expected = MUTATIONS[mutation]
    assert GUIDE_PLUGIN.count(old) == 1, f"the guide's plugin no longer has {old!r}"
    bystanders = {"test_contract_entry_point_loads", "test_contract_delivers_a_batch"}
    chosen = " or ".join(sorted(expected | bystanders))
    plugin = GUIDE_PLUGIN.replace(old, new)
    passed, failed, _ = run_suite(pytester, plugin, GUIDE_TESTS, "-k", chosen)
    assert failed == expected, (mutation, failed)
    assert passed == bystanders - expected, (mutation, passed)


# --- suites written for waypost 0.1 ---------------------------------------------------------------


def test_a_suite_written_from_the_0_1_guide_still_passes(pytester: pytest.Pytester) -> None:
    """The guide's plugin and tests as 0.1 printed them: old fixture names, the HTTP-shaped
    contract API. Everything passes; the old names warn."""
    plugin = (LEGACY / "acme_plugin_v0_1.py").read_text(encoding="utf-8")
    tests = (LEGACY / "acme_tests_v0_1.py").read_text(encoding="utf-8")
    passed, failed, recorder = run_suite(pytester, plugin, tests)
    assert not failed
    assert {"test_contract_never_follows_redirects", "test_delivers_from_config"} <= passed
    warned = " ".join(_warnings(recorder))
    for old in ("recording_server", "make_telemetry"):
        assert f"the fixture {old!r} is deprecated: use 'waypost_{old}'" in warned


def test_a_non_http_suite_that_overrides_recording_server_still_passes(
    pytester: pytest.Pytester,
) -> None:
    """0.1 told authors of other transports to override ``recording_server``; the example
    sink's tests did. That still runs every contract test, with a warning naming the new way."""
    if not md.entry_points(group="waypost.sinks", name="example"):
        pytest.skip("waypost-example-sink is not installed: pip install ./examples/...")
    pytester.makepyfile(
        test_example_sink=(LEGACY / "example_sink_tests_v0_1.py").read_text(encoding="utf-8")
    )
    recorder = pytester.inline_run(*QUIET_RUN)
    passed, _skipped, failed = recorder.listoutcomes()
    assert not failed, _names(failed)
    assert "test_contract_never_follows_redirects" in _names(passed)
    assert any("define a waypost_peer fixture" in w for w in _warnings(recorder))


# --- the pytest plugin's fixtures -------------------------------------------------------------


NEW_NAMES = """
def test_new_names(waypost_telemetry, waypost_make_telemetry, waypost_clean_env,
                   waypost_recording_server, waypost_register_plugin):
    waypost_telemetry.track("x", {})
    assert waypost_telemetry.flush(timeout=5)
    assert "DO_NOT_TRACK" not in waypost_clean_env
    assert waypost_recording_server.url.startswith("http://127.0.0.1:")
"""


def test_the_new_names_warn_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NEW_NAMES)
    pytester.runpytest_inprocess(*QUIET_RUN, "-W", "error::DeprecationWarning").assert_outcomes(
        passed=1
    )


@pytest.mark.parametrize("old", ["telemetry", "make_telemetry", "clean_env", "recording_server"])
def test_an_old_name_works_and_warns(pytester: pytest.Pytester, old: str) -> None:
    pytester.makepyfile(f"def test_old({old}):\n    assert {old} is not None\n")
    result = pytester.runpytest_inprocess(*QUIET_RUN)
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines([f"*the fixture '{old}' is deprecated: use 'waypost_{old}'*"])


def test_the_old_register_plugin_name_works(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "def test_old(register_plugin):\n"
        "    register_plugin('mine', 'json')\n"
        "    from waypost import plugins\n"
        "    assert 'mine' in plugins._entry_points()\n"
    )
    pytester.runpytest_inprocess(*QUIET_RUN).assert_outcomes(passed=1, warnings=1)


def test_a_projects_own_fixtures_win(pytester: pytest.Pytester) -> None:
    """A conftest's ``telemetry`` and ``clean_env`` are the project's: tests get them, and
    waypost's own fixtures never pick up the project's ``clean_env`` (here one that would
    switch telemetry off)."""
    pytester.makeconftest(
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def telemetry():\n"
        "    return 'the project telemetry'\n\n"
        "@pytest.fixture\n"
        "def clean_env():\n"
        "    return {'DO_NOT_TRACK': '1'}\n"
    )
    pytester.makepyfile(
        "def test_mine(telemetry, clean_env):\n"
        "    assert telemetry == 'the project telemetry'\n"
        "    assert clean_env == {'DO_NOT_TRACK': '1'}\n\n"
        "def test_waypost_ignores_them(waypost_telemetry):\n"
        "    assert waypost_telemetry.status().enabled\n"
    )
    result = pytester.runpytest_inprocess(*QUIET_RUN, "-W", "error::DeprecationWarning")
    result.assert_outcomes(passed=2)


def test_another_plugins_fixture_wins(pytester: pytest.Pytester) -> None:
    """Among plugins the last registered wins, so the old names are only added where no other
    plugin defines them (here one loaded with ``-p``)."""
    pytester.makepyfile(
        project_fixtures=(
            "import pytest\n\n@pytest.fixture\ndef telemetry():\n    return 'theirs'\n"
        ),
        test_theirs="def test_theirs(telemetry):\n    assert telemetry == 'theirs'\n",
    )
    pytester.syspathinsert()
    result = pytester.runpytest_inprocess(*QUIET_RUN, "-p", "project_fixtures", "-W", "error")
    result.assert_outcomes(passed=1)


def test_waypost_peer_outside_a_contract_says_what_to_do(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_peer(waypost_peer):\n    pass\n")
    result = pytester.runpytest_inprocess(*QUIET_RUN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a waypost_peer fixture that yields your own Peer*"])


def _class_state() -> list[dict[str, Any]]:
    classes = (
        ThreadingHTTPServer,
        HTTPServer,
        socketserver.TCPServer,
        socketserver.ThreadingTCPServer,
        socketserver.ThreadingMixIn,
    )
    return [dict(vars(cls)) for cls in classes]


def test_the_servers_change_nothing_global() -> None:
    """Servers of the standard library keep their class attributes: waypost's subclass its
    classes instead of setting ``allow_reuse_address`` on them for the whole process."""
    before = _class_state()

    class Contract(SinkContract):
        def config(self, url: str) -> dict[str, Any]:
            return {"url": url}

    with RecordingServer() as server, HttpPeer(server, Contract()) as peer:
        assert isinstance(peer, Peer)
        peer.redirect(307)  # starts the second server, on another host
    assert _class_state() == before
