"""Configuration: the models (:mod:`.models`), reading a file within limits (:mod:`.files`),
values by their field's type and the one boolean parser (:mod:`.values`), loading with
environment overrides and ``${VAR}`` expansion (:mod:`.loading`), and errors that name the file,
the key path and the reason (:mod:`.validation`)."""

from __future__ import annotations

from waypost.config.files import MAX_BYTES, MAX_DEPTH, MAX_VALUES, check_shape, read_file
from waypost.config.loading import (
    DEFAULT_FILES,
    ENV_PREFIX,
    env_origins,
    env_overrides,
    expand,
    find_config,
    load,
    merge,
)
from waypost.config.models import (
    BatchConfig,
    HeartbeatConfig,
    LimitsConfig,
    MetricsConfig,
    MetricsPrometheusConfig,
    NoticeConfig,
    OutboxConfig,
    RetryConfig,
    ScrubConfig,
    TelemetryConfig,
    TimestampsConfig,
    parse_duration,
)
from waypost.config.validation import validation_error
from waypost.config.values import FALSE_VALUES, TRUE_VALUES, EnvValue, Text, conform, parse_bool

__all__ = [
    "DEFAULT_FILES",
    "ENV_PREFIX",
    "FALSE_VALUES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_VALUES",
    "TRUE_VALUES",
    "BatchConfig",
    "EnvValue",
    "HeartbeatConfig",
    "LimitsConfig",
    "MetricsConfig",
    "MetricsPrometheusConfig",
    "NoticeConfig",
    "OutboxConfig",
    "RetryConfig",
    "ScrubConfig",
    "TelemetryConfig",
    "Text",
    "TimestampsConfig",
    "check_shape",
    "conform",
    "env_origins",
    "env_overrides",
    "expand",
    "find_config",
    "load",
    "merge",
    "parse_bool",
    "parse_duration",
    "read_file",
    "validation_error",
]
