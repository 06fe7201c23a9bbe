"""The error boundary around a sink's ``send``: whatever the plugin does, a result comes back,
and its reasons hold no secret (they reach logs, ``status()``, the outbox, the CLI and the admin
page, and a destination's answer may echo a credential)."""

from __future__ import annotations

from collections.abc import Sequence

from waypost.errors import PayloadTooLarge, SinkContractError, SinkError
from waypost.events import Event
from waypost.privacy.secrets import sanitise
from waypost.sinks import SendResult, Sink


def call_send(
    sink: Sink, events: Sequence[Event]
) -> tuple[SendResult, str | None, SinkContractError | None]:
    """Call ``sink.send`` inside the error boundary and always come back with a result.

    Raised :class:`SinkError` become per-event results, a 413 splits the batch in halves,
    any other exception is a retryable failure, and a return value that is not a
    :class:`SendResult` is a contract error (retried, and reported). Returns the result, the
    batch-level reason if the whole batch failed, and the contract error if there was one;
    every reason has passed :func:`waypost.privacy.sanitise`.
    """
    result, reason, contract = _call_send(sink, events)
    return _sanitised(result), (sanitise(reason) if reason else reason), contract


def _sanitised(result: SendResult) -> SendResult:
    if not (result.retry or result.failed or result.dropped_by_destination):
        return result
    seen: dict[str, str] = {}  # a batch's events mostly share one reason

    def clean(reasons: dict[str, str]) -> dict[str, str]:
        out = {}
        for event_id, reason in reasons.items():
            text = reason if isinstance(reason, str) else str(reason)
            if text not in seen:
                seen[text] = sanitise(text)
            out[event_id] = seen[text]
        return out

    result.retry = clean(result.retry)
    result.failed = clean(result.failed)
    result.dropped_by_destination = clean(result.dropped_by_destination)
    return result


def _call_send(
    sink: Sink, events: Sequence[Event]
) -> tuple[SendResult, str | None, SinkContractError | None]:
    try:
        result: object = sink.send(events)
    except PayloadTooLarge as exc:
        if len(events) == 1:
            return SendResult.fail_all(events, f"event too large: {exc.reason}"), exc.reason, None
        half = len(events) // 2
        first, _, c1 = _call_send(sink, events[:half])
        second, _, c2 = _call_send(sink, events[half:])
        merged = SendResult(
            retry={**first.retry, **second.retry},
            failed={**first.failed, **second.failed},
            retry_after=first.retry_after or second.retry_after,
            dropped_by_destination={
                **first.dropped_by_destination,
                **second.dropped_by_destination,
            },
            receipt=first.receipt or second.receipt,
            control=second.control if second.control is not None else first.control,
        )
        return merged, None, c1 or c2
    except SinkError as exc:
        if exc.retryable:
            return SendResult.retry_all(events, exc.reason, exc.retry_after), exc.reason, None
        return SendResult.fail_all(events, exc.reason), exc.reason, None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return SendResult.retry_all(events, reason), reason, None
    if not isinstance(result, SendResult):  # plugins may return anything
        error = SinkContractError(
            f"sink {sink.name!r} (type {sink.type!r}) returned {result!r:.80} from "
            "send(); expected a waypost.SendResult"
        )
        return SendResult.retry_all(events, str(error)), str(error), error
    return result, None, None
