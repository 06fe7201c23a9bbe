"""waypost: product usage telemetry with privacy built in.

    import waypost
    tel = waypost.Telemetry(app="myapp", version="1.2.3", config="telemetry.yml")
    tel.track("run", {"runSeconds": 45, "runSuccess": True})

Names are imported lazily, so ``import waypost`` costs next to nothing until they are used.
"""

from __future__ import annotations

import importlib
import threading

# Not typing.TYPE_CHECKING: importing typing would double the cost of ``import waypost``.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = [
    "MANDATORY",
    "OPTIONAL",
    "ConfigError",
    "Event",
    "HttpSinkConfig",
    "MetricRegistry",
    "Payload",
    "PayloadTooLarge",
    "PermanentError",
    "PluginError",
    "RetryableError",
    "SendResult",
    "Sink",
    "SinkConfig",
    "SinkContext",
    "SinkError",
    "Status",
    "Telemetry",
    "TrackError",
    "UnknownSinkError",
    "WaypostError",
    "__version__",
    "flush",
    "get",
    "hookimpl",
    "hookspec",
    "init",
    "shutdown",
    "track",
]

_LAZY = {
    "MANDATORY": "waypost.metrics",
    "OPTIONAL": "waypost.metrics",
    "MetricRegistry": "waypost.metrics",
    "Telemetry": "waypost.telemetry",
    "Status": "waypost.status",
    "Event": "waypost.events",
    "Payload": "waypost.events",
    "Sink": "waypost.sinks",
    "SinkConfig": "waypost.sinks",
    "HttpSinkConfig": "waypost.sinks",
    "SinkContext": "waypost.sinks",
    "SendResult": "waypost.sinks",
    "hookimpl": "waypost.hookspecs",
    "hookspec": "waypost.hookspecs",
    "ConfigError": "waypost.errors",
    "UnknownSinkError": "waypost.errors",
    "PluginError": "waypost.errors",
    "TrackError": "waypost.errors",
    "WaypostError": "waypost.errors",
    "SinkError": "waypost.errors",
    "RetryableError": "waypost.errors",
    "PermanentError": "waypost.errors",
    "PayloadTooLarge": "waypost.errors",
}

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime
    from typing import Any

    from waypost.errors import (
        ConfigError,
        PayloadTooLarge,
        PermanentError,
        PluginError,
        RetryableError,
        SinkError,
        TrackError,
        UnknownSinkError,
        WaypostError,
    )
    from waypost.events import Event, Payload
    from waypost.hookspecs import hookimpl, hookspec
    from waypost.metrics import MANDATORY, OPTIONAL, MetricRegistry
    from waypost.sinks import HttpSinkConfig, SendResult, Sink, SinkConfig, SinkContext
    from waypost.status import Status
    from waypost.telemetry import Telemetry


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'waypost' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


# --- the default instance ---------------------------------------------------------------------

_default: Telemetry | None = None
_default_lock = threading.Lock()
_warned = False


def init(*args: Any, **kwargs: Any) -> Telemetry:
    """Create the default instance used by the module-level functions (replacing any other)."""
    global _default
    from waypost.telemetry import Telemetry

    with _default_lock:
        old, _default = _default, Telemetry(*args, **kwargs)
    if old is not None:
        old.shutdown()
    return _default


def get() -> Telemetry | None:
    """The default instance, if ``init`` was called."""
    return _default


def track(
    event: str | Payload,
    properties: Mapping[str, Any] | None = None,
    *,
    level: str | None = None,
    distinct_id: str | None = None,
    timestamp: float | datetime | None = None,
) -> None:
    """``track`` on the default instance; before ``init`` the event is ignored (logged once)."""
    tel = _default
    if tel is not None:
        tel.track(event, properties, level=level, distinct_id=distinct_id, timestamp=timestamp)
        return
    global _warned
    if not _warned:
        _warned = True
        from waypost.logs import get_logger

        get_logger("waypost").warning(
            "waypost.track() called before waypost.init(): events are ignored until init"
        )


def flush(timeout: float = 5.0) -> bool:
    """``flush`` on the default instance."""
    return True if _default is None else _default.flush(timeout)


def shutdown(timeout: float = 5.0) -> bool:
    """``shutdown`` on the default instance."""
    return True if _default is None else _default.shutdown(timeout)
