"""What the parts of one instance read of it (its :class:`waypost.Telemetry`): its identity and
settings, as the Protocol each part's own extends with what that part also reads, so that no
part reaches into another's private attributes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from waypost.config import TelemetryConfig
    from waypost.plugins import PluginManager
    from waypost.status import Counters


class Instance(Protocol):
    """An instance as its parts see it."""

    @property
    def app(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def instance_id(self) -> str | None: ...
    @property
    def data_dir(self) -> Path: ...
    @property
    def config(self) -> TelemetryConfig: ...
    @property
    def strict(self) -> bool: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def plugins(self) -> PluginManager: ...
    @property
    def counters(self) -> Counters: ...
