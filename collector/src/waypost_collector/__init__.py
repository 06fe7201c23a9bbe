"""waypost-collector: the receiving side of waypost's ``http`` sink.

    from waypost_collector import create_app
    app = create_app("collector.yml")          # any ASGI server

or ``waypost collector serve --config collector.yml``. See the README and docs/collector.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["CollectorConfig", "__version__", "create_app", "load_config"]

if TYPE_CHECKING:
    from waypost_collector.app import create_app
    from waypost_collector.config import CollectorConfig, load_config


def __getattr__(name: str) -> Any:
    # Lazily: the CLI imports this package on every `waypost` command.
    if name == "create_app":
        from waypost_collector.app import create_app

        return create_app
    if name in ("CollectorConfig", "load_config"):
        from waypost_collector import config

        return getattr(config, name)
    raise AttributeError(f"module 'waypost_collector' has no attribute {name!r}")
