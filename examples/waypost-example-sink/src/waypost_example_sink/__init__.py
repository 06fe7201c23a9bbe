"""The ``example`` sink: batches of events over a small TCP line protocol to a receiver.

A complete third-party waypost plugin, small enough to read in one sitting. The protocol
(see the README) is one connection per batch::

    WAYPOST-LINE 1
    AUTH <token>                 (only when a token is configured)
    BATCH <n>
    <one JSON envelope per line, n lines>

and the receiver answers one line, ``<status> <text>``, with HTTP's status numbers, so the
core's own classification (:func:`waypost.retry.raise_for_status`) decides what is retried.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Sequence

import waypost
from pydantic import Field, SecretStr, model_validator
from waypost.errors import RetryableError
from waypost.events import Event, dumps
from waypost.retry import raise_for_status
from waypost.sinks import SendResult, Sink, SinkConfig, is_loopback_host

__all__ = ["MAGIC", "ExampleConfig", "ExampleSink", "encode_batch", "parse_answer"]

MAGIC = "WAYPOST-LINE 1"
"""The first line of every connection: the protocol and its version."""

_ANSWER = re.compile(r"^(\d{3})(?: (.*))?$")
_RETRY_AFTER = re.compile(r"\bretry-after=(\d+(?:\.\d+)?)\b")
_MAX_ANSWER = 4096


class ExampleConfig(SinkConfig):
    """Settings of an ``example`` sink (``timeout`` and ``batch_size`` come from the base)."""

    url: str = Field(description="The receiver, tcp://HOST:PORT.")
    token: SecretStr | None = Field(
        default=None, description="Shared secret sent after the greeting (never logged)."
    )
    allow_remote: bool = Field(
        default=False,
        description="Allow a receiver that is not on loopback (the protocol has no TLS).",
    )

    @model_validator(mode="after")
    def _check_url(self) -> ExampleConfig:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise ValueError(f"url must look like tcp://127.0.0.1:7070, not {self.url!r}")
        if not self.allow_remote and not is_loopback_host(parts.hostname):
            raise ValueError(
                f"url {self.url!r} is not on loopback and the protocol has no TLS; "
                "set allow_remote: true only on a trusted network"
            )
        return self

    @property
    def address(self) -> tuple[str, int]:
        parts = urllib.parse.urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port


def encode_batch(events: Sequence[Event], token: str | None = None) -> bytes:
    """The bytes a batch is sent as (what a receiver in another language must parse)."""
    lines = [MAGIC]
    if token:
        lines.append(f"AUTH {token}")
    lines.append(f"BATCH {len(events)}")
    lines.extend(dumps(e.to_dict()) for e in events)
    return ("\n".join(lines) + "\n").encode()


def parse_answer(line: str) -> tuple[int, str, float | None]:
    """``"429 busy retry-after=7"`` -> ``(429, "busy retry-after=7", 7.0)``."""
    match = _ANSWER.match(line.strip())
    if not match:
        raise ValueError(f"malformed answer {line.strip()[:80]!r}")
    text = match.group(2) or ""
    wait = _RETRY_AFTER.search(text)
    return int(match.group(1)), text, float(wait.group(1)) if wait else None


class ExampleSink(Sink):
    """Sends each batch on its own connection and reads the receiver's one-line answer."""

    type = "example"
    Config = ExampleConfig
    max_batch_size = 500
    config: ExampleConfig

    @property
    def destination(self) -> str:
        host, port = self.config.address
        return f"tcp://{host}:{port}"

    def send(self, events: Sequence[Event]) -> SendResult:
        config = self.config
        token = config.token.get_secret_value() if config.token else None
        line = self._exchange(encode_batch(events, token))
        try:
            status, text, retry_after = parse_answer(line)
        except ValueError as exc:
            raise RetryableError(f"receiver at {self.destination}: {exc}") from None
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        # The receiver's statuses are HTTP's: 2xx delivered, 408/429/5xx retried, 413 split.
        raise_for_status(status, headers, text, what=f"receiver at {self.destination}")
        return SendResult.ok()

    def _exchange(self, data: bytes) -> str:
        """Send ``data`` and return the answer line, within ``timeout`` seconds in all."""
        timeout = self.config.timeout
        deadline = time.monotonic() + timeout
        try:
            with socket.create_connection(self.config.address, timeout=timeout) as sock:
                sock.sendall(data)
                answer = b""
                while b"\n" not in answer and len(answer) < _MAX_ANSWER:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    chunk = sock.recv(_MAX_ANSWER)
                    if not chunk:
                        break
                    answer += chunk
        except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
            raise RetryableError(
                f"no answer from {self.destination} within {timeout:g} s"
            ) from None
        except OSError as exc:
            cause = exc.strerror or type(exc).__name__
            raise RetryableError(f"cannot reach {self.destination}: {cause}") from None
        if b"\n" not in answer:
            raise RetryableError(f"{self.destination} closed the connection without an answer")
        return answer.split(b"\n", 1)[0].decode("utf-8", "replace")


@waypost.hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(ExampleSink)
