"""One batch sent as several requests (a vendor's count or size limit, one request per client or
per event): the rules for what a failure of one request means for the others, in one place."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from waypost.errors import PayloadTooLarge, PermanentError, RetryableError
from waypost.events import Event
from waypost.sinks.base import SendResult

__all__ = ["Chunk", "Part", "pack", "send_in_parts", "sift"]


class Part(Protocol):
    """One request of a batch: the events it carries (anything else is the sink's)."""

    @property
    def events(self) -> Sequence[Event]: ...


P = TypeVar("P", bound=Part)
T = TypeVar("T")


@dataclass
class Chunk(Generic[T]):
    """One request's share of a batch: its events, and what the sink made of each."""

    events: list[Event] = field(default_factory=list)
    items: list[T] = field(default_factory=list)


def pack(
    weighted: Iterable[tuple[Event, T, int]],
    limit: int,
    *,
    max_items: int | None = None,
    result: SendResult | None = None,
    too_large: Callable[[int], str] | None = None,
    item_limit: int | None = None,
) -> list[Chunk[T]]:
    """Cut ``(event, item, weight)`` triples, in order, into chunks of at most ``max_items``
    whose weights add up to at most ``limit``.

    With ``result`` and ``too_large``, an event whose weight is over ``item_limit`` (``limit``
    by default: a vendor's limit per event) is marked failed in ``result`` with the reason
    ``too_large(weight)`` and left out, before anything is sent. Without them, an item heavier
    than ``limit`` is a chunk of its own."""
    if (result is None) != (too_large is None):
        raise TypeError("pack() takes result and too_large together")
    most = limit if item_limit is None else item_limit
    chunks: list[Chunk[T]] = []
    total = 0
    for event, item, weight in weighted:
        if too_large is not None and result is not None and weight > most:
            result.mark_failed(event, too_large(weight))
            continue
        full = max_items is not None and bool(chunks) and len(chunks[-1].items) >= max_items
        if not chunks or full or total + weight > limit:
            chunks.append(Chunk())
            total = 0
        chunks[-1].events.append(event)
        chunks[-1].items.append(item)
        total += weight
    return chunks


def sift(
    events: Iterable[Event], refusal: Callable[[Event], str | None], result: SendResult
) -> list[Event]:
    """The events ``refusal`` finds nothing against, in order; each other one is marked failed
    in ``result`` with the reason it gives (a vendor's rule, said before anything is sent)."""
    kept: list[Event] = []
    for event in events:
        reason = refusal(event)
        if reason:
            result.mark_failed(event, reason)
        else:
            kept.append(event)
    return kept


def send_in_parts(
    parts: Iterable[P],
    send: Callable[[P], object],
    result: SendResult | None = None,
    *,
    split: Callable[[P], Sequence[P]] | None = None,
    permanent_fails_rest: bool = False,
) -> SendResult:
    """Send ``parts`` in order with ``send`` and sort their events into ``result``.

    ``send`` raises a :class:`~waypost.errors.SinkError` for its whole part, or marks events in
    ``result`` itself (an answer per event). Then:

    - a retryable failure holds back this part and every later one (the destination is down or
      throttling: pressing on would not help), with its reason and ``retry_after``; so does a
      part after which ``result.retry_after`` is set (the destination asked to wait);
    - a permanent failure fails this part's events and the others go on (with
      ``permanent_fails_rest``, the rest fail with it: the destination refuses any request);
    - a 413 is split with ``split`` where given; a single event that is too large fails; any
      other part is retried later (resent smaller, since the core splits a batch on 413).

    While nothing is decided yet (the first part failed, no event marked), the error is raised
    instead, so the core treats it as the whole batch's: retried, or split on 413. Returns
    ``result`` (a new one if none was given).
    """
    result = SendResult() if result is None else result
    work = deque(parts)
    first = True
    while work:
        part = work.popleft()
        undecided = first and not (result.retry or result.failed or result.dropped_by_destination)
        first = False
        try:
            send(part)
        except PayloadTooLarge as exc:
            if split is not None and len(part.events) > 1:
                work.extendleft(reversed(split(part)))
                first = undecided  # nothing was sent: the halves start afresh
                continue
            if len(part.events) == 1:
                result.mark_failed(part.events[0], f"event too large: {exc.reason}")
                continue
            if undecided:
                raise
            for event in part.events:
                result.mark_retry(event, exc.reason)
            continue
        except RetryableError as exc:
            if undecided:
                raise
            _hold_back([part, *work], result, exc.reason)
            result.retry_after = exc.retry_after
            return result
        except PermanentError as exc:
            if undecided and (not work or permanent_fails_rest):
                raise
            for later in [part, *work] if permanent_fails_rest else [part]:
                for event in later.events:
                    result.mark_failed(event, exc.reason)
            if permanent_fails_rest:
                return result
            continue
        if work and result.retry_after is not None:
            reason = next(iter(result.retry.values()), "the destination asked to wait")
            _hold_back(work, result, f"held back: an earlier request of the batch: {reason}")
            return result
    return result


def _hold_back(parts: Iterable[Part], result: SendResult, reason: str) -> None:
    for part in parts:
        for event in part.events:
            result.mark_retry(event, reason)
