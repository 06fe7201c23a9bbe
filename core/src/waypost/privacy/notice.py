"""The first-run notice of an opt-out application: shown once per policy version, before
anything is sent, saying what is collected and how to turn it off."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from waypost.datadir import atomic_write

if TYPE_CHECKING:
    from waypost.config import TelemetryConfig

MARKER_FILE = "notice.json"
"""In the data dir: the policy version whose notice was shown."""


def text(config: TelemetryConfig, app: str) -> str:
    """The notice: ``telemetry.notice.text``, or one that names the app and the ways out."""
    return config.notice.text or (
        f"{app} collects anonymous usage telemetry to help improve it. Nothing personal "
        f"is collected. To opt out, set DO_NOT_TRACK=1"
        + (f" or {config.disable_env}=true" if config.disable_env else "")
        + ", or run `waypost consent off`."
    )


def show_once(
    config: TelemetryConfig,
    *,
    app: str,
    data_dir: Path,
    rule: str,
    show: Callable[[str], None] | None,
) -> str | None:
    """Show the notice (through ``show``, else on stderr) unless it was shown for this policy
    version, or is not due: opt-in mode, ``notice.enabled: false``, or consent decided by a
    rule other than the default. Raises when it cannot be shown; returns a note when it was
    shown but cannot be remembered (it will be shown again at the next start)."""
    if config.mode != "opt-out" or not config.notice.enabled or rule != "default":
        return None
    marker = data_dir / MARKER_FILE
    try:
        if marker.read_text(encoding="utf-8").strip() == config.policy_version:
            return None
    except (OSError, ValueError):  # none yet, or junk: shown (again)
        pass
    message = text(config, app)
    if show is not None:
        show(message)
    else:
        print(message, file=sys.stderr, flush=True)
    try:
        atomic_write(marker, config.policy_version)
    except OSError as exc:
        return f"cannot record that the first-run notice was shown: {exc}"
    return None
