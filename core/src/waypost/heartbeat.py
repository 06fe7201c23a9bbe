"""The heartbeat: a periodic snapshot of an installation in FlowForge's shape (instance id, os,
runtime and app versions, ``platform.counts`` / ``platform.config``), and the scheduled job that
sends it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from waypost import config as _config
from waypost.events import base_context
from waypost.schedule import Job

if TYPE_CHECKING:
    from waypost.config import HeartbeatConfig
    from waypost.plugins import PluginManager

NAME = "heartbeat"
"""The heartbeat's job name (``schedule.json``, ``status``)."""


def payload(
    *,
    app: str,
    version: str,
    instance_id: str | None,
    facts: Callable[[], Mapping[str, Any]] | None,
    plugins: PluginManager,
) -> dict[str, Any]:
    """The heartbeat: what the application's ``facts`` and the plugins' ``waypost_heartbeat``
    hooks add, merged into the installation's basics (nested dicts merge)."""
    ctx = base_context(app, version)
    out: dict[str, Any] = {
        "instanceId": instance_id,
        "os": ctx["os"],
        "env": {"python": ctx["python"], app: version, "waypost": ctx["waypost"]},
        "platform": {"counts": {}, "config": {}},
    }
    if facts is not None:
        out = _config.merge(out, facts())
    for extra in plugins.hook.waypost_heartbeat(facts=out):
        if isinstance(extra, Mapping):
            out = _config.merge(out, extra)
    return out


def job_from_config(callback: Callable[[], Any], config: HeartbeatConfig | None) -> Job:
    """The heartbeat job as ``telemetry.heartbeat`` describes it, for a run on demand
    (``waypost send-heartbeat``) when the application scheduled none: without a ``heartbeat:``
    section, its defaults (once a day)."""
    config = config or _config.HeartbeatConfig()
    return Job(name=NAME, callback=callback, every=config.every, event=config.event)
