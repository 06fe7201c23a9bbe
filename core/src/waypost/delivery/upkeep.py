"""The outbox's upkeep for a running instance: what a start does to what an earlier run left,
and the retention limits (``outbox.max_age``, ``outbox.max_size_mb``) the storer enforces."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from waypost.logs import get_logger

if TYPE_CHECKING:
    from waypost.config.models import OutboxConfig
    from waypost.delivery.outbox import Outbox
    from waypost.status import Counters

log = get_logger(__name__)


class OutboxUpkeep:
    """The pipeline's ``startup`` and ``retention`` for the outbox ``current()`` returns (None
    once consent is withdrawn: nothing more is done to it)."""

    def __init__(
        self,
        current: Callable[[], Outbox | None],
        config: OutboxConfig,
        counters: Counters,
        *,
        sinks: Iterable[str],
        started: float,
    ) -> None:
        self.current = current
        self.config = config
        self.counters = counters
        self.sinks = list(sinks)
        self.started = started

    def startup(self) -> None:
        """What a starting instance does to the outbox: void the leases of processes that
        died, and make every pending row due (a restart is a retry point). Runs on the storer
        (raises StorageUnavailable while the outbox cannot be written: tried again later)."""
        outbox = self.current()
        if outbox is not None:
            outbox.reclaim()
            # Only what an earlier run left: this process's own retries keep their backoff.
            outbox.retry_now(self.sinks, before=self.started)

    def retention(self) -> None:
        outbox = self.current()
        if outbox is None:
            return
        o = self.config
        dropped = outbox.enforce_retention(
            max_age=o.max_age, max_bytes=o.max_size_mb * 1024 * 1024, keep_sent=o.keep_sent
        )
        for reason in ("max_age", "max_size"):
            if dropped[reason]:
                self.counters.drop(reason, dropped[reason])
                log.warning(
                    "waypost: dropped %d undelivered records past outbox.%s",
                    dropped[reason],
                    "max_age" if reason == "max_age" else "max_size_mb",
                )
        outbox.reclaim()
