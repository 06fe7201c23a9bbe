"""Langflow's telemetry, written with waypost: typed payloads with camelCase aliases, the
``[TELEMETRY]`` log lines, ``DO_NOT_TRACK``, the shutdown payload with the run time, metrics
with a mandatory ``flow_id`` label, and every integration of its document as a config entry.

Run it: ``python examples/langflow/langflow_app.py`` (debug mode: nothing leaves).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import waypost
from pydantic import Field
from waypost.metrics import MANDATORY

HERE = Path(__file__).parent
VERSION = "1.0.0"


class VersionPayload(waypost.Payload, event="version"):
    """Sent at start: the version and environment."""

    package: str = Field(description="Package name.")
    version: str = Field(description="Package version.")
    platform: str = Field(description="Operating system and release.")
    python: str = Field(description="Python major.minor.")
    arch: str = Field(description="Pointer width.")
    auto_login: bool = Field(serialization_alias="autoLogin", description="Auto-login is on.")
    cache_type: str = Field(serialization_alias="cacheType", description="Cache backend.")
    backend_only: bool = Field(serialization_alias="backendOnly", description="No frontend.")
    desktop: bool = Field(description="The desktop app.")


class RunPayload(waypost.Payload, event="run"):
    """A flow run finished."""

    run_is_webhook: bool = Field(serialization_alias="runIsWebhook", description="By webhook.")
    run_seconds: int = Field(serialization_alias="runSeconds", description="Duration.")
    run_success: bool = Field(serialization_alias="runSuccess", description="Succeeded.")
    run_error_message: str = Field("", serialization_alias="runErrorMessage", description="Error.")


class PlaygroundPayload(waypost.Payload, event="playground"):
    """A playground session ended."""

    playground_seconds: int = Field(serialization_alias="playgroundSeconds", description="Time.")
    playground_component_count: int = Field(
        serialization_alias="playgroundComponentCount", description="Components."
    )
    playground_success: bool = Field(serialization_alias="playgroundSuccess", description="OK.")
    playground_error_message: str = Field(
        "", serialization_alias="playgroundErrorMessage", description="Error."
    )


class ComponentPayload(waypost.Payload, event="component"):
    """One component ran."""

    component_name: str = Field(serialization_alias="componentName", description="Its type.")
    component_seconds: int = Field(serialization_alias="componentSeconds", description="Time.")
    component_success: bool = Field(serialization_alias="componentSuccess", description="OK.")
    component_error_message: str | None = Field(
        None, serialization_alias="componentErrorMessage", description="Error."
    )


class ShutdownPayload(waypost.Payload, event="shutdown"):
    """The application stopped."""

    time_running: int = Field(serialization_alias="timeRunning", description="Seconds it ran.")


class Langflow:
    def __init__(self, config: Path | str | dict[str, Any] = HERE / "telemetry.yml", **kw: Any):
        self.telemetry = tel = waypost.Telemetry(
            app="langflow", version=VERSION, config=config, **kw
        )
        tel.on_shutdown(lambda seconds: ShutdownPayload(time_running=int(seconds)))
        self.file_size = tel.metrics.gauge(
            "file_size", description="Size of the uploaded file", unit="By",
            labels={"flow_id": MANDATORY},
        )  # fmt: skip
        self.num_files = tel.metrics.counter(
            "num_files_uploaded", description="Files uploaded", labels={"flow_id": MANDATORY}
        )
        tel.track(
            VersionPayload(
                package="langflow",
                version=VERSION,
                platform=platform.platform(),
                python=".".join(platform.python_version_tuple()[:2]),
                arch=platform.architecture()[0],
                auto_login=False,
                cache_type="InMemoryCache",
                backend_only=False,
                desktop=False,
            )
        )

    def run_flow(self, flow_id: str, *, fail: bool = False) -> None:
        started = time.monotonic()
        for name in ("ChatInput", "OpenAIModel", "ChatOutput"):
            self.telemetry.track(
                ComponentPayload(component_name=name, component_seconds=0, component_success=True)
            )
        self.telemetry.track(
            RunPayload(
                run_is_webhook=False,
                run_seconds=int(time.monotonic() - started),
                run_success=not fail,
                run_error_message="timeout" if fail else "",
            )
        )

    def upload(self, flow_id: str, data: bytes) -> None:
        self.file_size.set(len(data), {"flow_id": flow_id})
        self.num_files.add(1, {"flow_id": flow_id})


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    config = {"telemetry": {"schemas": ["langflow_app"], "sinks": {"log": {}}}}
    app = Langflow(config)
    app.run_flow("flow-1")
    app.upload("flow-1", b"hello")
    app.telemetry.track(
        PlaygroundPayload(
            playground_seconds=120, playground_component_count=5, playground_success=True
        )
    )
    app.telemetry.shutdown()
