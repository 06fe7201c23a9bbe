"""A sink's circuit breaker: failed batches in a row, and until when (on the monotonic clock, so
that a wall clock set back never holds a sink off for hours, nor one set forward lets it
hammer a destination) no batch is tried."""

from __future__ import annotations

import time

from waypost.delivery.backoff import Backoff

LONGEST_HOLD = 24 * 3600.0
"""The longest a destination's ``Retry-After`` holds a sink back."""


class Breaker:
    """Counts a sink's consecutive failures and opens after ``threshold`` of them, for the
    backoff's delay; a ``Retry-After`` opens it earlier, for as long as the destination asks."""

    def __init__(self, threshold: int, backoff: Backoff) -> None:
        self.threshold = threshold
        self.backoff = backoff
        self.failures = 0
        self.open_until = 0.0  # time.monotonic()

    def remaining(self) -> float:
        """Seconds until the circuit closes (0 when it is closed)."""
        return max(0.0, self.open_until - time.monotonic())

    def is_open(self) -> bool:
        return self.open_until > time.monotonic()

    def batch_failed(self, retry_after: float | None) -> None:
        """A batch was retried with nothing delivered."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.backoff.delay(self.failures, retry_after)
        elif retry_after:
            self.open_until = time.monotonic() + min(retry_after, LONGEST_HOLD)

    def open_failed(self) -> None:
        """The sink could not start (``Sink.open`` raised): wait a backoff before the next try."""
        self.open_until = time.monotonic() + self.backoff.delay(self.failures + 1)
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def close(self) -> None:
        """Close the circuit now ("submit now"); the failure count stays."""
        self.open_until = 0.0
