"""The retry delay: exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, capped; ``Retry-After`` wins when it is longer."""

    initial: float = 1.0
    maximum: float = 300.0
    multiplier: float = 2.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        # The exponent is capped: a long outage counts thousands of attempts, and a float
        # power that large overflows.
        ceiling = min(self.maximum, self.initial * self.multiplier ** min(max(0, attempt - 1), 64))
        jittered = random.uniform(0, ceiling)
        if retry_after is not None:
            return max(jittered, min(retry_after, 24 * 3600.0))
        return jittered
