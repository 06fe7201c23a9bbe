"""The ``jsonl`` sink: appends one JSON envelope per line to a local file."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import Field

from waypost.events import Event, dumps
from waypost.hookspecs import hookimpl
from waypost.sinks import SendResult, Sink, SinkConfig


class JsonlConfig(SinkConfig):
    path: Path = Field(
        default=Path("events.jsonl"),
        description="File to append to; a relative path is taken inside the data dir.",
    )
    fsync: bool = Field(default=False, description="fsync after every batch.")


class JsonlSink(Sink):
    """Appends envelopes to a file. Each batch is written with one ``write`` call, so lines from
    several processes sharing the file do not interleave within a batch of modest size."""

    type = "jsonl"
    Config = JsonlConfig
    max_batch_size = 1000

    @property
    def destination(self) -> str:
        config = self.config
        assert isinstance(config, JsonlConfig)
        path = config.path.expanduser()
        return str(path if path.is_absolute() else self.context.data_dir / path)

    def open(self) -> None:
        config = self.config
        assert isinstance(config, JsonlConfig)
        path = config.path.expanduser()
        self.path = path if path.is_absolute() else self.context.data_dir / path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, events: Sequence[Event]) -> SendResult:
        config = self.config
        assert isinstance(config, JsonlConfig)
        data = "".join(dumps(e.to_dict()) + "\n" for e in events).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if config.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return SendResult.ok()


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(JsonlSink)
