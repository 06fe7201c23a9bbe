"""FlowForge's telemetry through waypost, against stand-ins for ping.flowforge.com, PostHog and
Plausible on loopback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from waypost.schedule import DAY, ManualClock
from waypost.testing import RecordingServer, Response, free_port

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from flowforge_app import Forge  # noqa: E402

# flowforge.yml configures Plausible, whose shim warns on import (asserted once below).
pytestmark = pytest.mark.filterwarnings("ignore:the plausible sink:DeprecationWarning")


def settings(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "flowforge.yml"
    path.write_text(textwrap.dedent(body))
    return path


def waypost_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import sys; from waypost.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True
    )


@pytest.fixture
def forge(tmp_path: Path, clean_env: dict[str, str]) -> Any:
    made: list[Forge] = []

    def make(settings_file: Path = HERE / "flowforge.yml", **kwargs: Any) -> Forge:
        kwargs.setdefault("data_dir", tmp_path / "data")
        # Nothing leaves this machine: destinations a test does not name are a closed port.
        closed = f"http://127.0.0.1:{free_port()}"
        kwargs.setdefault("ping_url", f"{closed}/")
        kwargs.setdefault("posthog_host", closed)
        kwargs.setdefault("plausible_host", closed)
        f = Forge(settings_file, env=clean_env, strict=True, notice=lambda text: None, **kwargs)
        made.append(f)
        return f

    yield make
    for f in made:
        f.shutdown()


def pings(server: RecordingServer) -> list[dict[str, Any]]:
    return [e["properties"] for r in server.requests for e in r.json()]


def test_ping_schedule_and_shape(forge: Any, recording_server: RecordingServer) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    ff = forge(ping_url=f"{recording_server.url}/", clock=clock, version="0.1.1")
    ff.users += ["alice", "bob"]
    ff.teams.append("dev")
    ff.projects += ["p1", "p2", "p3"]
    clock.advance(29)
    time.sleep(0.2)
    assert recording_server.requests == []  # not before 30 s
    clock.advance(1)
    assert recording_server.wait_for(lambda r: len(r) == 1)
    (ping,) = pings(recording_server)
    assert set(ping) == {"instanceId", "os", "env", "platform"}
    assert ping["instanceId"] == ff.telemetry.instance_id
    assert set(ping["os"]) == {"type", "release", "arch"}
    assert ping["env"]["flowforge"] == "0.1.1" and "python" in ping["env"]
    assert ping["platform"] == {
        "counts": {"users": 2, "teams": 1, "projects": 3},
        "config": {"driver": "localfs"},
    }
    # Then once a day, at the time of day picked at random when the platform started.
    job = ff.telemetry.scheduler.jobs["heartbeat"]
    deadline = time.monotonic() + 5  # the ping can reach the server before the job is rescheduled
    while job.next_at <= clock.time() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.time_of_day is not None and abs(job.next_at % DAY - job.time_of_day) < 1e-6
    for day in (2, 3):
        clock.advance(DAY)
        assert recording_server.wait_for(lambda r, n=day: len(r) == n)
    time.sleep(0.2)
    assert len(recording_server.requests) == 3


def test_no_ping_before_the_platform_is_initialised(
    forge: Any, recording_server: RecordingServer
) -> None:
    clock = ManualClock(start=1_700_000_000.0)
    ff = forge(ping_url=recording_server.url, clock=clock)
    clock.advance(31)
    assert not recording_server.wait_for(lambda r: len(r) > 0, timeout=0.5)
    assert ff.telemetry.scheduler.jobs["heartbeat"].last_outcome == "skipped: condition not met"


def test_config_file_overrides_the_admin_choice(
    forge: Any, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    data = tmp_path / "data"
    refused = waypost_cli(
        "--data-dir", str(data), "--app", "flowforge", "consent", "off", env=clean_env
    )
    assert refused.returncode == 0, refused.stderr
    ff = forge(data_dir=data)  # flowforge.yml says enabled: true
    st = ff.telemetry.status()
    assert st.enabled and st.rule == "config"
    ff.shutdown()
    silent = settings(tmp_path, "telemetry: {frontend: {}}")  # no telemetry.enabled
    st = forge(silent, data_dir=data).telemetry.status()
    assert not st.enabled and st.rule == "admin"
    st = forge(silent, data_dir=tmp_path / "fresh").telemetry.status()
    assert st.enabled and st.rule == "default"  # opt-out: on unless refused
    off = settings(tmp_path, "telemetry: {enabled: false}")
    assert not forge(off, data_dir=tmp_path / "fresh2").telemetry.enabled


def posthog_batches(server: RecordingServer) -> list[dict[str, Any]]:
    return [e for r in server.requests if r.path == "/batch/" for e in r.json()["batch"]]


@pytest.mark.parametrize("capture_pageview", [False, True])
def test_page_views_with_capture_pageview(
    forge: Any, tmp_path: Path, capture_pageview: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "waypost_plausible", raising=False)  # warn on import again
    with (
        RecordingServer(lambda r: Response(200, {"status": 1})) as posthog,
        RecordingServer(lambda r: Response(202, {})) as plausible,
    ):
        body = f"""
            telemetry:
              frontend:
                posthog: {{apikey: phc_test_key, capture_pageview: {str(capture_pageview).lower()}}}
                plausible: {{domain: forge.example.com}}
            """
        with pytest.warns(DeprecationWarning, match="plausible sink"):
            ff = forge(
                settings(tmp_path, body), posthog_host=posthog.url, plausible_host=plausible.url
            )
        site = "https://forge.example.com"
        ff.frontend.navigate(f"{site}/team/dev/projects", "team-projects")
        ff.frontend.navigate(f"{site}/project/p1/overview", "project-overview")
        assert ff.frontend.telemetry.flush(timeout=10)
        events = posthog_batches(posthog)
        views = [e for e in events if e["event"] == "$pageview"]
        leaves = [e for e in events if e["event"] == "$pageleave"]
        ours = [e for e in views if "route" in e["properties"]]
        assert [e["properties"]["$pathname"] for e in ours] == [
            "/team/dev/projects",
            "/project/p1/overview",
        ]
        assert ours[0]["properties"]["$current_url"] == f"{site}/team/dev/projects"
        if capture_pageview:
            assert len(views) == 4 and len(leaves) == 1  # the duplicates FlowForge warns of
        else:
            assert views == ours and leaves == []  # exactly one page view per navigation
        # Plausible (deprecated) gets the same events, one request each.
        assert {r.json()["domain"] for r in plausible.requests} == {"forge.example.com"}
        status = {s.name: s for s in ff.frontend.telemetry.status().sinks}
        assert status["plausible"].deprecated and "posthog" in status["plausible"].deprecated
