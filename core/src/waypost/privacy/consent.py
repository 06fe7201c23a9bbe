"""Consent: whether telemetry is on. Booleans are read by :func:`waypost.config.parse_bool`,
the project's one parser.

Consent is resolved by a fixed precedence, first match
wins, and the deciding rule is kept for ``status()``:

1. ``DO_NOT_TRACK`` set to a true value (``1``, ``true``, ``yes``, ``on``, any case, spaces
   around ignored) -> off. Any other value (``0``, ``false``, empty) leaves the decision to the
   rules below.
2. The application's own variable (``disable_env``: true means off; false does not decide,
   so it never turns on what the config file or the administrator turned off;
   ``enable_env``: true means on, false means off). True is ``1``/``true``/``yes``/``on``, false
   is ``0``/``false``/``no``/``off``; any other value is ignored.
3. The config file's ``telemetry.enabled``.
4. The stored admin choice (``waypost consent on|off``, ``Telemetry.set_consent``).
5. The application's default: ``opt-out`` is on, ``opt-in`` is off.

``docs/privacy.md`` tells the whole story: levels, field policy, each scrub rule with what it
does and does not redact, the remarks, IP hashing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from waypost.config.values import parse_bool
from waypost.datadir import atomic_write
from waypost.events import LEVELS

if TYPE_CHECKING:
    from collections.abc import Mapping

    from waypost.config import TelemetryConfig

CONSENT_FILE = "consent.json"


@dataclass(frozen=True)
class Decision:
    """Whether telemetry is on, which rule decided (``do_not_track``, ``app_env``, ``config``,
    ``admin``, ``default``) and why, in words."""

    enabled: bool
    rule: str
    reason: str


@dataclass(frozen=True)
class StoredConsent:
    enabled: bool
    policy_version: str
    at: float

    @classmethod
    def read(cls, data_dir: Path) -> StoredConsent | None:
        try:
            raw = json.loads((data_dir / CONSENT_FILE).read_text(encoding="utf-8"))
            return cls(bool(raw["enabled"]), str(raw.get("policy_version", "1")), float(raw["at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        record = {"enabled": self.enabled, "policy_version": self.policy_version, "at": self.at}
        atomic_write(data_dir / CONSENT_FILE, json.dumps(record))


def resolve_consent(
    config: TelemetryConfig,
    env: Mapping[str, str],
    stored: StoredConsent | None,
    *,
    config_source: str | None = None,
) -> Decision:
    """Apply the fixed precedence and return the first rule that decides."""
    dnt = env.get("DO_NOT_TRACK")
    if parse_bool(dnt):
        return Decision(
            False, "do_not_track", f"DO_NOT_TRACK={dnt} in the environment turns telemetry off"
        )
    if config.disable_env:
        value = env.get(config.disable_env)
        flag = parse_bool(value)
        if flag:
            return Decision(
                False,
                "app_env",
                f"{config.disable_env}={value} in the environment turns telemetry off",
            )
    if config.enable_env:
        value = env.get(config.enable_env)
        flag = parse_bool(value)
        if flag is not None:
            state = "on" if flag else "off"
            return Decision(
                flag,
                "app_env",
                f"{config.enable_env}={value} in the environment turns telemetry {state}",
            )
    if config.enabled is not None:
        where = config_source or "configuration"
        state = "true" if config.enabled else "false"
        return Decision(config.enabled, "config", f"telemetry.enabled is {state} in {where}")
    if stored is not None:
        if not stored.enabled:
            return Decision(False, "admin", "the administrator turned telemetry off")
        if stored.policy_version == config.policy_version:
            return Decision(True, "admin", "the administrator turned telemetry on")
        if config.mode == "opt-in":
            return Decision(
                False,
                "default",
                f"consent was given for policy version {stored.policy_version}, the policy is "
                f"now version {config.policy_version}: opt-in mode asks again",
            )
    if config.mode == "opt-in":
        return Decision(False, "default", "the application is opt-in and nobody opted in")
    return Decision(True, "default", "the application is opt-out and nobody opted out")


def level_allows(configured: str, event_level: str) -> bool:
    """True when an event of ``event_level`` passes the configured level."""
    return 0 < LEVELS.get(event_level, 2) <= LEVELS[configured]
