"""The ``telemetry.metrics.otel`` section."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from waypost.config import parse_duration
from waypost.sinks import check_endpoint


class OtelMetricsConfig(BaseModel):
    """Settings of the ``otel`` metrics exporter.

    ``host`` turns on the OTLP/HTTP push (only while telemetry is on); ``prometheus_port``
    serves the local Prometheus exposition (whatever the consent, unless
    ``PROMETHEUS_ENABLED=false`` or ``telemetry.metrics.prometheus.enabled: false``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str | None = Field(
        default=None, description="OTLP/HTTP collector base URL, e.g. http://127.0.0.1:4318."
    )
    path: str = Field(default="/v1/metrics", description="Path appended to host.")
    interval: float = Field(default=60.0, gt=0, description="Seconds between pushes.")
    timeout: float = Field(default=10.0, gt=0, description="Seconds per push request.")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="Extra request headers (e.g. an API key); never logged."
    )
    allow_http: bool = Field(default=False, description="Allow http:// to a non-loopback host.")
    prometheus_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve the Prometheus exposition on this port (0: any free port).",
    )
    prometheus_host: str = Field(
        default="127.0.0.1", description="Address the exposition listens on (loopback)."
    )

    _dur = field_validator("interval", "timeout", mode="before")(parse_duration)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return value if value.startswith("/") else f"/{value}"

    @model_validator(mode="after")
    def _check_host(self) -> OtelMetricsConfig:
        if self.host is not None:
            host = check_endpoint(self.host, allow_http=self.allow_http, what="host")
            object.__setattr__(self, "host", host)
        return self

    @property
    def endpoint(self) -> str | None:
        """The full OTLP/HTTP metrics URL, or None when no push is configured."""
        return None if self.host is None else f"{self.host}{self.path}"

    def header_values(self) -> dict[str, str]:
        return {k: v.get_secret_value() for k, v in self.headers.items()}

    def public(self) -> dict[str, Any]:
        return {**self.model_dump(exclude={"headers"}), "headers": sorted(self.headers)}
