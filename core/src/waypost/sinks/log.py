"""The ``log`` sink: one structured record per event through :mod:`logging`.

Each event gives two ``INFO`` lines on the ``waypost.telemetry`` logger, in the shape Langflow's
telemetry prints: ``[TELEMETRY] Endpoint: run`` and ``[TELEMETRY] Payload: {...}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

from pydantic import Field

from waypost.events import Event
from waypost.hookspecs import hookimpl
from waypost.sinks import SendResult, Sink, SinkConfig


class LogConfig(SinkConfig):
    logger: str = Field(default="waypost.telemetry", description="Logger name.")
    level: str = Field(default="INFO", description="Log level of the lines.")
    prefix: str = Field(default="[TELEMETRY]", description="Text that starts every line.")
    envelope: bool = Field(
        default=False, description="Log the whole envelope instead of the properties only."
    )


class LogSink(Sink):
    """Writes events to the application's log; needs no account and no server."""

    type = "log"
    Config = LogConfig
    max_batch_size = 1000

    @property
    def destination(self) -> str:
        config = self.config
        assert isinstance(config, LogConfig)
        return f"logger {config.logger!r} (local)"

    def open(self) -> None:
        config = self.config
        assert isinstance(config, LogConfig)
        self._logger = logging.getLogger(config.logger)
        level = logging.getLevelName(config.level.upper())
        self._level = level if isinstance(level, int) else logging.INFO

    def send(self, events: Sequence[Event]) -> SendResult:
        config = self.config
        assert isinstance(config, LogConfig)
        log = self._logger.log
        gated = {"waypost_gated": True}  # scrubbed by the gate: the log filter passes it as is
        for event in events:
            payload = event.to_dict() if config.envelope else event.properties
            text = json.dumps(payload, ensure_ascii=False, separators=(", ", ": "))
            log(self._level, "%s Endpoint: %s", config.prefix, event.name, extra=gated)
            log(self._level, "%s Payload: %s", config.prefix, text, extra=gated)
        return SendResult.ok()


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(LogSink)
