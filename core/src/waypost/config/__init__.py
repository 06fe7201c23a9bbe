"""Configuration: the models (:mod:`.models`), loading a file with environment overrides and
``${VAR}`` expansion (:mod:`.loading`), and errors that name the file, the key path and the
reason (:mod:`.validation`)."""

from __future__ import annotations

from waypost.config.loading import (
    DEFAULT_FILES,
    ENV_PREFIX,
    env_overrides,
    expand,
    find_config,
    load,
    merge,
    read_file,
)
from waypost.config.models import (
    BatchConfig,
    HeartbeatConfig,
    MetricsConfig,
    MetricsPrometheusConfig,
    NoticeConfig,
    OutboxConfig,
    RetryConfig,
    ScrubConfig,
    TelemetryConfig,
    parse_duration,
)
from waypost.config.validation import validation_error

__all__ = [
    "DEFAULT_FILES",
    "ENV_PREFIX",
    "BatchConfig",
    "HeartbeatConfig",
    "MetricsConfig",
    "MetricsPrometheusConfig",
    "NoticeConfig",
    "OutboxConfig",
    "RetryConfig",
    "ScrubConfig",
    "TelemetryConfig",
    "env_overrides",
    "expand",
    "find_config",
    "load",
    "merge",
    "parse_duration",
    "read_file",
    "validation_error",
]
