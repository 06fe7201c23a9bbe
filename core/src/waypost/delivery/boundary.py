"""The error boundary around a sink's ``send``: whatever the plugin does, a result comes back,
and its reasons hold no secret (they reach logs, ``status()``, the outbox, the CLI and the admin
page, and a destination's answer may echo a credential)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from waypost.errors import PayloadTooLarge, SinkContractError, SinkError
from waypost.events import Event
from waypost.privacy.secrets import sanitise
from waypost.sinks import SendResult, Sink

MAX_RETRY_AFTER = 24 * 3600.0
"""The longest wait a destination may ask for (seconds)."""


def call_send(
    sink: Sink, events: Sequence[Event]
) -> tuple[SendResult, str | None, SinkContractError | None]:
    """Call ``sink.send`` inside the error boundary and always come back with a result.

    Raised :class:`SinkError` become per-event results, a 413 splits the batch in halves,
    any other exception is a retryable failure, and a return value that is not a
    :class:`SendResult` is a contract error (retried, and reported), as is any ``BaseException``
    (``SystemExit``, ``KeyboardInterrupt``: a sink's thread is no place for them) and a result
    whose fields have the wrong types (what can be read of it is kept). Returns the result, the
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
        retry_after, _ = _retry_after(exc.retry_after)
        reason = str(exc.reason)
        if exc.retryable:
            return SendResult.retry_all(events, reason, retry_after), reason, None
        return SendResult.fail_all(events, reason), reason, None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return SendResult.retry_all(events, reason), reason, None
    except BaseException as exc:
        error = _contract(sink, f"raised {type(exc).__name__}({exc!s:.80}) from send()")
        return SendResult.retry_all(events, str(error)), str(error), error
    if not isinstance(result, SendResult):  # plugins may return anything
        error = _contract(
            sink, f"returned {result!r:.80} from send(); expected a waypost.SendResult"
        )
        return SendResult.retry_all(events, str(error)), str(error), error
    return _checked(sink, events, result)


def _contract(sink: Sink, what: str) -> SinkContractError:
    return SinkContractError(f"sink {sink.name!r} (type {sink.type!r}) {what}")


def _checked(
    sink: Sink, events: Sequence[Event], result: SendResult
) -> tuple[SendResult, str | None, SinkContractError | None]:
    """``result`` with fields of the documented types, or the batch retried when a field that
    says what became of the events cannot be read; a contract error names what was wrong."""
    wrong: list[str] = []
    maps: dict[str, dict[str, str]] = {}
    for field in ("retry", "failed", "dropped_by_destination"):
        value = getattr(result, field)
        if not isinstance(value, Mapping):
            error = _contract(
                sink, f"returned a SendResult whose {field} is {type(value).__name__}, not a dict"
            )
            return SendResult.retry_all(events, str(error)), str(error), error
        if all(type(k) is str and type(v) is str for k, v in value.items()):
            maps[field] = value if type(value) is dict else dict(value)
            continue
        if not all(type(k) is str for k in value):
            # Keys that are no event ids say nothing of the events: none of them is done.
            error = _contract(
                sink, f"returned a SendResult whose {field} has keys that are not ids"
            )
            return SendResult.retry_all(events, str(error)), str(error), error
        wrong.append(f"{field} maps ids to text")
        maps[field] = {str(k): _text(v) for k, v in value.items()}
    retry_after, bad = _retry_after(result.retry_after)
    if bad:
        wrong.append(f"retry_after is a number of seconds, not {result.retry_after!r:.40}")
    receipt = result.receipt
    if receipt is not None and type(receipt) is not str:
        wrong.append(f"receipt is text, not {type(receipt).__name__}")
        receipt = str(receipt)
    control: object = result.control  # plugins may put anything there
    if control is not None and not isinstance(control, Mapping):
        wrong.append(f"control is a dict, not {type(control).__name__}")
        control = None
    if not wrong:
        return result, None, None
    error = _contract(
        sink, "returned a SendResult with fields of the wrong type: " + "; ".join(wrong)
    )
    fixed = SendResult(
        retry=maps["retry"],
        failed=maps["failed"],
        retry_after=retry_after,
        dropped_by_destination=maps["dropped_by_destination"],
        receipt=receipt,
        control=None if control is None else dict(control),
    )
    return fixed, None, error


def _text(value: Any) -> str:
    try:
        return value if type(value) is str else repr(value)[:200]
    except Exception:
        return f"<{type(value).__name__}>"


def _retry_after(value: Any) -> tuple[float | None, bool]:
    """A destination's wish in seconds, within bounds, and whether it was not a sound number
    (text, NaN, negative, a bool); text that reads as a number is taken as one."""
    if value is None:
        return None, False
    bad = type(value) not in (int, float)
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None, True
    if not math.isfinite(seconds) or seconds < 0 or type(value) is bool:
        return None, True
    return min(seconds, MAX_RETRY_AFTER), bad
