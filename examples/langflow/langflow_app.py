"""Langflow's telemetry, written with waypost: typed payloads with camelCase aliases sent as
Langflow sends them (``model_dump(by_alias=True, exclude_none=True, exclude_unset=True)``), the
``[TELEMETRY]`` log lines, ``DO_NOT_TRACK``, the shutdown payload with the run time, metrics
with a mandatory ``flow_id`` label, and every integration of its document as a config entry.

The payloads follow ``langflow/services/telemetry/schema.py`` upstream: every one carries
``clientType`` (``oss``, or ``desktop`` under ``LANGFLOW_DESKTOP``), ids join a run to its
components and their inputs, and exceptions, the component index and the desktop's registered
e-mail have payloads of their own.

Run it: ``python examples/langflow/langflow_app.py`` (debug mode: nothing leaves).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
import traceback
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

import waypost
from waypost.metrics import MANDATORY

HERE = Path(__file__).parent
VERSION = "1.0.0"


class ClientType(BaseModel):
    """The field every Langflow payload carries (its ``BasePayload``): a mixin rather than a
    Payload class, which would be an event of its own in ``waypost manifest``. Each payload
    says ``exclude_none=True, exclude_unset=True``, Langflow's ``model_dump`` options."""

    client_type: str | None = Field(
        None, serialization_alias="clientType", description="oss, or desktop for Langflow Desktop."
    )


P = TypeVar("P", bound=waypost.Payload)


class VersionPayload(
    waypost.Payload, ClientType, event="version", exclude_none=True, exclude_unset=True
):
    """Sent at start: the version and environment."""

    package: str = Field(description="Package name.")
    version: str = Field(description="Package version.")
    platform: str = Field(description="Operating system and release.")
    python: str = Field(description="Python major.minor.")
    arch: str = Field(description="Pointer width.")
    auto_login: bool = Field(serialization_alias="autoLogin", description="Auto-login is on.")
    cache_type: str = Field(serialization_alias="cacheType", description="Cache backend.")
    backend_only: bool = Field(serialization_alias="backendOnly", description="No frontend.")


class RunPayload(waypost.Payload, ClientType, event="run", exclude_none=True, exclude_unset=True):
    """A flow run finished."""

    run_is_webhook: bool = Field(
        False, serialization_alias="runIsWebhook", description="Started by a webhook."
    )
    run_seconds: int = Field(serialization_alias="runSeconds", description="Duration.")
    run_success: bool = Field(serialization_alias="runSuccess", description="Succeeded.")
    run_error_message: str = Field("", serialization_alias="runErrorMessage", description="Error.")
    run_id: str | None = Field(None, serialization_alias="runId", description="Id of the run.")


class PlaygroundPayload(
    waypost.Payload, ClientType, event="playground", exclude_none=True, exclude_unset=True
):
    """A playground session ended."""

    playground_seconds: int = Field(serialization_alias="playgroundSeconds", description="Time.")
    playground_component_count: int | None = Field(
        None, serialization_alias="playgroundComponentCount", description="Components."
    )
    playground_success: bool = Field(serialization_alias="playgroundSuccess", description="OK.")
    playground_error_message: str = Field(
        "", serialization_alias="playgroundErrorMessage", description="Error."
    )
    playground_run_id: str | None = Field(
        None, serialization_alias="playgroundRunId", description="Id of the run."
    )


class ComponentPayload(
    waypost.Payload, ClientType, event="component", exclude_none=True, exclude_unset=True
):
    """One component ran."""

    component_name: str = Field(serialization_alias="componentName", description="Its type.")
    component_id: str = Field(serialization_alias="componentId", description="Its id in the flow.")
    component_seconds: int = Field(serialization_alias="componentSeconds", description="Time.")
    component_success: bool = Field(serialization_alias="componentSuccess", description="OK.")
    component_error_message: str | None = Field(
        None, serialization_alias="componentErrorMessage", description="Error."
    )
    component_run_id: str | None = Field(
        None, serialization_alias="componentRunId", description="Joins its inputs."
    )


class ComponentInputsPayload(
    waypost.Payload, ClientType, event="component_inputs", exclude_none=True, exclude_unset=True
):
    """The input values of one component run, joined to it by ``componentRunId``."""

    component_run_id: str = Field(serialization_alias="componentRunId", description="The run.")
    component_id: str = Field(serialization_alias="componentId", description="Its id in the flow.")
    component_name: str = Field(serialization_alias="componentName", description="Its type.")
    component_inputs: dict[str, Any] = Field(
        serialization_alias="componentInputs", description="Input values, scrubbed."
    )
    chunk_index: int | None = Field(
        None, serialization_alias="chunkIndex", description="Which part (Langflow splits URLs)."
    )
    total_chunks: int | None = Field(
        None, serialization_alias="totalChunks", description="How many parts."
    )


class ExceptionPayload(
    waypost.Payload,
    ClientType,
    event="exception",
    level="error",
    exclude_none=True,
    exclude_unset=True,
):
    """An exception nothing caught."""

    exception_type: str = Field(serialization_alias="exceptionType", description="Its class.")
    exception_message: str = Field(
        serialization_alias="exceptionMessage", description="Its message, 500 characters at most."
    )
    exception_context: str = Field(
        serialization_alias="exceptionContext", description="lifespan or handler."
    )
    stack_trace_hash: str | None = Field(
        None, serialization_alias="stackTraceHash", description="Groups the same stack trace."
    )


class ComponentIndexPayload(
    waypost.Payload, ClientType, event="component_index", exclude_none=True, exclude_unset=True
):
    """The component index was loaded."""

    index_source: str = Field(
        serialization_alias="indexSource", description="builtin, cache or dynamic."
    )
    num_modules: int = Field(serialization_alias="numModules", description="Modules loaded.")
    num_components: int = Field(serialization_alias="numComponents", description="Components.")
    dev_mode: bool = Field(serialization_alias="devMode", description="Development mode.")
    filtered_modules: str | None = Field(
        None, serialization_alias="filteredModules", description="The modules asked for, if any."
    )
    load_time_ms: int = Field(serialization_alias="loadTimeMs", description="Load time.")


class EmailPayload(
    waypost.Payload, ClientType, event="email", exclude_none=True, exclude_unset=True
):
    """Langflow Desktop's registered e-mail: waypost's scrubbers never let the address leave."""

    email: str = Field(description="The address (sent as [REDACTED:email]).")


class ShutdownPayload(
    waypost.Payload, ClientType, event="shutdown", exclude_none=True, exclude_unset=True
):
    """The application stopped."""

    time_running: int = Field(serialization_alias="timeRunning", description="Seconds it ran.")


class Langflow:
    def __init__(
        self,
        config: Path | str | dict[str, Any] = HERE / "telemetry.yml",
        *,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ):
        env = os.environ if env is None else env
        self.desktop = env.get("LANGFLOW_DESKTOP", "false").lower() in ("1", "true")
        self.client_type = "desktop" if self.desktop else "oss"
        self.telemetry = tel = waypost.Telemetry(
            app="langflow", version=VERSION, config=config, env=env, **kw
        )
        tel.on_shutdown(lambda seconds: self._typed(ShutdownPayload(time_running=int(seconds))))
        self.file_size = tel.metrics.gauge(
            "file_size", description="Size of the uploaded file", unit="By",
            labels={"flow_id": MANDATORY},
        )  # fmt: skip
        self.num_files = tel.metrics.counter(
            "num_files_uploaded", description="Files uploaded", labels={"flow_id": MANDATORY}
        )
        self.send(
            VersionPayload(
                package="langflow",
                version=VERSION,
                platform=platform.platform(),
                python=".".join(platform.python_version_tuple()[:2]),
                arch=platform.architecture()[0],
                auto_login=False,
                cache_type="InMemoryCache",
                backend_only=False,
            )
        )

    def _typed(self, payload: P) -> P:
        # As Langflow's service does: the client type goes in unless the caller gave one (an
        # assignment, so that exclude_unset keeps it).
        if getattr(payload, "client_type", "") is None:
            setattr(payload, "client_type", self.client_type)  # noqa: B010 (a ClientType field)
        return payload

    def send(self, payload: waypost.Payload) -> None:
        self.telemetry.track(self._typed(payload))

    def register_email(self, address: str) -> None:
        """Langflow Desktop sends the e-mail its user registered with; the server does not."""
        if self.desktop:
            self.send(EmailPayload(email=address))

    def load_components(self, modules: list[str] | None = None) -> None:
        started = time.monotonic()
        self.send(
            ComponentIndexPayload(
                index_source="builtin",
                num_modules=len(modules) if modules else 12,
                num_components=240,
                dev_mode=False,
                filtered_modules=",".join(modules) if modules else None,
                load_time_ms=int((time.monotonic() - started) * 1000),
            )
        )

    def run_flow(
        self, flow_id: str, *, fail: bool = False, inputs: dict[str, dict[str, Any]] | None = None
    ) -> str:
        """Run a flow of three components; ``inputs`` by component name. Returns the run id."""
        started = time.monotonic()
        run_id = str(uuid.uuid4())
        for name in ("ChatInput", "OpenAIModel", "ChatOutput"):
            component_id = f"{name}-{flow_id}"
            component_run_id = str(uuid.uuid4())
            self.send(
                ComponentPayload(
                    component_name=name,
                    component_id=component_id,
                    component_seconds=0,
                    component_success=True,
                    component_run_id=component_run_id,
                )
            )
            if inputs and name in inputs:
                self.send(
                    ComponentInputsPayload(
                        component_run_id=component_run_id,
                        component_id=component_id,
                        component_name=name,
                        component_inputs=inputs[name],
                    )
                )
        self.send(
            RunPayload(
                run_seconds=int(time.monotonic() - started),
                run_success=not fail,
                run_error_message="timeout" if fail else "",
                run_id=run_id,
            )
        )
        return run_id

    def report_exception(self, exc: BaseException, context: str) -> None:
        """An exception that reached the lifespan or a request handler."""
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.send(
            ExceptionPayload(
                exception_type=type(exc).__name__,
                exception_message=str(exc)[:500],
                exception_context=context,
                stack_trace_hash=hashlib.sha256(trace.encode()).hexdigest()[:16],
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
    app.load_components()
    app.run_flow("flow-1", inputs={"ChatInput": {"input_value": "hello"}})
    app.upload("flow-1", b"hello")
    app.send(
        PlaygroundPayload(
            playground_seconds=120, playground_component_count=5, playground_success=True
        )
    )
    app.telemetry.shutdown()
