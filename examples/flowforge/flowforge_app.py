"""FlowForge's telemetry, written with waypost.

- The core ping: FlowForge's payload (instanceId, os, env, platform.counts/config), 30 s after
  start if the platform is initialised, then every 24 h at a time picked at random at start,
  posted by the ``http`` sink to ping.flowforge.com.
- Frontend page views: PostHog with ``capture_pageview`` semantics, and Plausible through the
  deprecated shim.
- Opt-out by default; ``telemetry.enabled`` in flowforge.yml overrides the admin choice
  (``waypost consent on|off`` or the admin settings page).

Run it: ``python examples/flowforge/flowforge_app.py`` (the log shows what would be sent).
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

import waypost
import yaml
from waypost.config import expand

PING_URL = "https://ping.flowforge.com"
HERE = Path(__file__).parent


class DriverFacts:
    """A hook plugin: the storage driver goes into ``platform.config`` of every ping."""

    def __init__(self, driver: str) -> None:
        self.driver = driver

    @waypost.hookimpl
    def waypost_heartbeat(self, facts: dict[str, Any]) -> dict[str, Any]:
        return {"platform": {"config": {"driver": self.driver}}}


def read_settings(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """The ``telemetry`` section of flowforge.yml, ``${VAR}`` expanded."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return expand(data.get("telemetry") or {}, env)


class Forge:
    """The platform: users, teams and projects, and its two telemetry pipelines."""

    def __init__(
        self,
        settings_file: Path = HERE / "flowforge.yml",
        *,
        data_dir: Path,
        version: str = "0.1.1",
        driver: str = "localfs",
        ping_url: str = PING_URL,
        posthog_host: str | None = None,
        plausible_host: str | None = None,
        env: dict[str, str] | None = None,
        **telemetry_args: Any,
    ) -> None:
        env = dict(os.environ if env is None else env)
        settings = read_settings(settings_file, env)
        self.users: list[str] = []
        self.teams: list[str] = []
        self.projects: list[str] = []
        base = {"mode": "opt-out", "enabled": settings.get("enabled")}
        # The core ping: only the ping endpoint receives it.
        self.telemetry = waypost.Telemetry(
            app="flowforge",
            version=version,
            config={"telemetry": {**base, "sinks": {"ping": {"type": "http", "url": ping_url}}}},
            data_dir=data_dir,
            env=env,
            plugins=[DriverFacts(driver)],
            **telemetry_args,
        )
        self.telemetry.heartbeat(
            facts=self.counts,
            condition=lambda: self.initialised,  # FlowForge pings only once set up
        )
        # Frontend page views go to the analytics services the operator configured.
        frontend = settings.get("frontend") or {}
        posthog, plausible = frontend.get("posthog") or {}, frontend.get("plausible") or {}
        sinks: dict[str, Any] = {}
        if posthog.get("apikey"):
            sinks["posthog"] = {"api_key": posthog["apikey"], "host": posthog_host}
        if plausible.get("domain"):
            sinks["plausible"] = {"domain": plausible["domain"], "host": plausible_host}
        self.frontend = Frontend(
            waypost.Telemetry(
                app="flowforge-frontend",
                version=version,
                config={"telemetry": {**base, "sinks": _drop_none(sinks)}},
                data_dir=Path(data_dir) / "frontend",
                env=env,
                **telemetry_args,
            ),
            capture_pageview=bool(posthog.get("capture_pageview", True)),
        )

    @property
    def initialised(self) -> bool:
        return bool(self.users)

    def counts(self) -> dict[str, Any]:
        """A snapshot of the platform for the ping (``platform.counts``)."""
        counts = {
            "users": len(self.users),
            "teams": len(self.teams),
            "projects": len(self.projects),
        }
        return {"platform": {"counts": counts}}

    def shutdown(self) -> None:
        self.frontend.telemetry.shutdown()
        self.telemetry.shutdown()


class Frontend:
    """The single-page app's navigation, as posthog-js would report it.

    With ``capture_pageview`` (posthog-js's default) every route change also produces the
    library's automatic ``$pageview`` and ``$pageleave``: duplicates of FlowForge's own
    ``$pageview``, which carries more detail. FlowForge recommends ``capture_pageview: false``.
    """

    def __init__(self, telemetry: waypost.Telemetry, *, capture_pageview: bool = True) -> None:
        self.telemetry = telemetry
        self.capture_pageview = capture_pageview
        self.current: str | None = None

    def navigate(self, url: str, route: str) -> None:
        path = urllib.parse.urlsplit(url).path
        track = self.telemetry.track
        if self.capture_pageview:  # what posthog-js adds by itself
            if self.current is not None:
                track("$pageleave", {"$current_url": self.current})
            track("$pageview", {"$current_url": url, "$pathname": path})
        track("$pageview", {"$current_url": url, "$pathname": path, "route": route})
        self.current = url


def _drop_none(sinks: dict[str, Any]) -> dict[str, Any]:
    return {k: {n: v for n, v in s.items() if v is not None} for k, s in sinks.items()}


if __name__ == "__main__":
    import logging
    import tempfile

    logging.basicConfig(level=logging.INFO)
    forge = Forge(data_dir=Path(tempfile.mkdtemp()), debug=True)  # debug: print, send nothing
    forge.users.append("admin")
    forge.frontend.navigate("https://forge.example.com/team/dev/projects", "team-projects")
    print(forge.telemetry.heartbeat_payload(forge.counts))
    forge.shutdown()
