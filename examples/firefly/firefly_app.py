"""Firefly III's telemetry, written with waypost: opt-in, viewable, deletable, submitted weekly.

Feature flags (the number of users, a user's language and locale, the system, the first use
of a console command) are recorded as they happen. Nothing financial has a field to go in.

    SEND_TELEMETRY=true python examples/firefly/firefly_app.py
    waypost --config examples/firefly/telemetry.yml show            # the records, read-only
    waypost --config examples/firefly/telemetry.yml flush           # submit now
    waypost --config examples/firefly/telemetry.yml purge --sent    # delete submitted records
    waypost --config examples/firefly/telemetry.yml send-heartbeat  # the weekly cron job
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import waypost

HERE = Path(__file__).parent
VERSION = "5.2.8"


@waypost.hookimpl
def waypost_heartbeat(facts: dict[str, Any]) -> dict[str, Any]:
    """The weekly report's system facts (this module is listed in ``telemetry.plugins``)."""
    return {"platform": {"config": {"db": os.environ.get("DB_CONNECTION", "sqlite")}}}


class Firefly:
    def __init__(self, config: Path | str = HERE / "telemetry.yml", **kwargs: Any) -> None:
        self.telemetry = waypost.Telemetry(
            app="firefly-iii", version=VERSION, config=config, **kwargs
        )
        self.users: list[str] = []
        self.commands_used: set[str] = set()

    def flag(self, name: str, value: Any) -> None:
        self.telemetry.track("feature_flag", {"flag": name, "value": value})

    def register_user(self, email: str) -> None:
        self.users.append(email)
        self.flag("users", len(self.users))  # the count, never the address

    def finish_wizard(self, language: str, locale: str) -> None:
        self.flag("language", language)
        self.flag("locale", locale)

    def show_install_instructions(self) -> None:
        self.flag("system", {"python": platform.python_version(), "os": platform.system()})

    def run_command(self, name: str) -> None:
        if name not in self.commands_used:
            self.commands_used.add(name)
            self.flag("first_command", name)


if __name__ == "__main__":
    app = Firefly()
    print(f"telemetry: {app.telemetry.status().reason}")
    app.register_user("james@example.com")
    app.finish_wizard("en_US", "equal")
    app.run_command("firefly-iii:upgrade-database")
    app.telemetry.shutdown()
