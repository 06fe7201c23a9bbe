"""Retry policy and error classification: the one place that decides what is retried and when."""

from __future__ import annotations

# The classification of HTTP answers lives with the sink toolkit; these names stay here for
# plugins that import them from waypost.retry.
from waypost.sinks.transport import RETRYABLE_STATUS, parse_retry_after, raise_for_status

__all__ = ["RETRYABLE_STATUS", "Backoff", "parse_retry_after", "raise_for_status"]


# Backoff moved to waypost.delivery.backoff; importable from here as before.
from waypost.delivery.backoff import Backoff
