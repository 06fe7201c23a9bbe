"""What arrives on the wire: request bodies in every format the http sink sends (a JSON array,
NDJSON, a CloudEvents batch; gzip), the envelope of each event, and FlowForge's ping shape."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from waypost.events import coerce
from waypost_collector.config import Limits

_loads: Callable[[bytes], Any]
_dumps: Callable[[Any], bytes]
try:  # the parse is most of a batch's cost; orjson does it several times faster
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover - PyPy and platforms without a wheel
    _loads = json.loads

    def _dumps(data: Any) -> bytes:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


JSON_TYPES = ("application/json", "text/json")
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")
CE_BATCH = "application/cloudevents-batch+json"
CE_SINGLE = "application/cloudevents+json"
ENCODINGS = ("", "identity", "gzip", "x-gzip")
_EPOCH_MIN = 946_684_800.0  # 2000-01-01: older "times" are clocks that were never set
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Control characters and bidirectional overrides: never in a name or an id."""
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Refused(Exception):
    """A whole request refused: HTTP ``status``, a short ``reason`` code and the ``detail``."""

    def __init__(
        self, status: int, reason: str, detail: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


@dataclass
class Arrival:
    """One event's envelope as it arrived, checked for shape, before the app's schemas."""

    id: str
    name: str
    time: float
    instance_id: str
    distinct_id: str
    properties: dict[str, Any]
    context: dict[str, Any]


@dataclass
class Rejection:
    """One event refused: its id (if it had one), a reason code and a detail for people."""

    id: str | None
    reason: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def decode_body(body: bytes, encoding: str | None, limits: Limits) -> bytes:
    """The body with gzip undone, refusing more than ``limits.max_decoded`` bytes (a gzip bomb
    is stopped at that size, not inflated whole)."""
    coding = (encoding or "").strip().lower()
    if coding not in ENCODINGS:
        raise Refused(
            415, "unsupported_encoding", f"Content-Encoding {coding!r}: send identity or gzip"
        )
    if coding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, limits.max_decoded + 1)
        except zlib.error as exc:
            raise Refused(400, "malformed", f"the gzip body cannot be read: {exc}") from None
        if len(out) > limits.max_decoded or inflater.unconsumed_tail:
            raise Refused(
                413,
                "too_large",
                f"the body inflates past {limits.max_decoded} bytes (limits.max_decoded)",
            )
        if not inflater.eof:
            raise Refused(400, "malformed", "the gzip body is truncated")
        return out
    return body


def parse_items(body: bytes, content_type: str) -> list[Any]:
    """The items of a batch body, in order: envelopes (or CloudEvents wrapping them)."""
    kind = media_type(content_type)
    if kind in NDJSON_TYPES:
        items = []
        for number, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(_loads(line))
            except ValueError as exc:
                raise Refused(400, "malformed", f"line {number} is not JSON: {exc}") from None
        return items
    if kind in (*JSON_TYPES, CE_BATCH, CE_SINGLE, ""):
        try:
            data = _loads(body)
        except ValueError as exc:
            raise Refused(400, "malformed", f"the body is not JSON: {exc}") from None
        if isinstance(data, list):
            return data
        if isinstance(data, dict) and kind in (CE_SINGLE, *JSON_TYPES, ""):
            return [data]
        raise Refused(400, "malformed", "the body must be a JSON array of events")
    raise Refused(
        415,
        "unsupported_media_type",
        f"Content-Type {kind!r}: send application/json, application/x-ndjson or {CE_BATCH}",
    )


def _unwrap(item: dict[str, Any]) -> dict[str, Any]:
    """The waypost envelope of an item: itself, or the ``data`` of a CloudEvent."""
    if "specversion" in item:
        data = item.get("data")
        if not isinstance(data, dict):
            raise ValueError("a CloudEvent's data must be the waypost envelope (an object)")
        if "id" in item and "id" in data and str(item["id"]) != str(data["id"]):
            raise ValueError("the CloudEvent's id and its envelope's id differ")
        return data
    return item


def _text(value: Any, field: str, *, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{field} is longer than {limit} characters")
    if _FORBIDDEN.search(value):
        raise ValueError(f"{field} holds control or bidirectional-override characters")
    return value


def _time(value: Any, now: float, limits: Limits) -> float:
    if isinstance(value, bool):
        raise ValueError("timestamp must be ISO 8601 text or Unix seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            moment = _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("timestamp is not ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_dt.timezone.utc)
        seconds = moment.timestamp()
    else:
        raise ValueError("timestamp must be ISO 8601 text or Unix seconds")
    if not math.isfinite(seconds) or seconds < _EPOCH_MIN:
        raise ValueError("timestamp is before the year 2000")
    if seconds > now + limits.max_future:
        raise ValueError(f"timestamp is more than {limits.max_future:g} s in the future")
    return seconds


def check_envelope(
    item: Any,
    now: float,
    limits: Limits,
    *,
    measure: bool,
    contexts: dict[bytes, dict[str, Any]] | None = None,
) -> Arrival | Rejection:
    """Check one item's envelope; ``measure``: the body was large enough that one event may be
    over ``limits.max_event_bytes``, so each is measured. ``contexts``: the contexts seen so far
    in this batch, so that the events of one installation share one (checked once)."""
    if not isinstance(item, dict):
        return Rejection(None, "malformed", "an event must be a JSON object")
    raw_id = item.get("id")
    event_id = raw_id if isinstance(raw_id, str) else None
    try:
        envelope = _unwrap(item)
        if measure and len(_dumps(envelope)) > limits.max_event_bytes:
            return Rejection(
                event_id,
                "too_large",
                f"the event is over {limits.max_event_bytes} bytes (limits.max_event_bytes)",
            )
        raw_id = envelope.get("id")
        if not isinstance(raw_id, str):
            raise ValueError("id must be a UUID string")
        if _UUID.fullmatch(raw_id):  # the canonical form the core writes
            event_id = raw_id
        else:
            try:
                event_id = str(uuid.UUID(raw_id))
            except ValueError:
                event_id = None
                raise ValueError("id is not a UUID") from None
        name = _text(envelope.get("name"), "name", limit=200)
        seconds = _time(envelope.get("timestamp"), now, limits)
        instance_id = _text(envelope.get("instance_id"), "instance_id", limit=64)
        distinct = envelope.get("distinct_id") or instance_id
        distinct_id = _text(distinct, "distinct_id", limit=200)
        properties = envelope.get("properties")
        context = envelope.get("context")
        if properties is None:
            properties = {}
        if context is None:
            context = {}
        if not isinstance(properties, dict) or not isinstance(context, dict):
            raise ValueError("properties and context must be objects")
        # The core's one coercion: JSON data only, nested at most 32 levels deep.
        properties = coerce(properties)
        if contexts is None:
            context = coerce(context)
        else:
            key = _dumps(context)
            known = contexts.get(key)
            if known is None:
                known = contexts[key] = coerce(context)
            context = known
    except (ValueError, TypeError, RecursionError) as exc:
        return Rejection(event_id, "malformed", str(exc))
    return Arrival(event_id, name, seconds, instance_id, distinct_id, properties, context)


def ping_arrival(body: bytes, app: str, event: str, now: float, event_id: str) -> Arrival:
    """FlowForge's ping (``instanceId``, ``os``, ``env``, ``platform``) as an event of that
    installation: the ping's fields are its properties, ``env[app]`` its app version."""
    try:
        data = _loads(body)
    except ValueError as exc:
        raise Refused(400, "malformed", f"the ping is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Refused(400, "malformed", "a ping must be one JSON object")
    try:
        instance_id = _text(data.get("instanceId"), "instanceId", limit=64)
        properties = coerce({k: v for k, v in data.items() if k != "instanceId"})
    except (ValueError, TypeError, RecursionError) as exc:
        raise Refused(400, "malformed", f"the ping: {exc}") from None
    env = properties.get("env") if isinstance(properties.get("env"), dict) else {}
    version = env.get(app) if isinstance(env.get(app), str) else ""
    context: dict[str, Any] = {"app": {"name": app, "version": version}}
    if isinstance(properties.get("os"), dict):
        context["os"] = properties["os"]
    for runtime in ("python", "nodejs", "node"):
        if isinstance(env.get(runtime), str):
            context["python" if runtime == "python" else "runtime"] = env[runtime]
            break
    return Arrival(event_id, event, now, instance_id, instance_id, properties, context)


def dumps(data: Any) -> bytes:
    """Compact JSON bytes for answers."""
    return _dumps(data)
