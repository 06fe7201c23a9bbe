"""GA4's documented collection limits, and the one place events are fitted to them.

The Measurement Protocol answers 2xx to payloads it then ignores in part or in whole, so
everything GA4 would drop silently is decided here, before sending: names are normalised
where that is safe and refused where it is not, values are trimmed, extras are dropped, and
each decision comes back as a note (or, for an event that cannot be sent, a :class:`Refused`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

MAX_EVENTS_PER_REQUEST = 25
MAX_PARAMS_PER_EVENT = 25
MAX_USER_PROPERTIES = 25
MAX_NAME_LENGTH = 40
MAX_PARAM_VALUE_LENGTH = 100
MAX_USER_PROPERTY_NAME_LENGTH = 24
MAX_USER_PROPERTY_VALUE_LENGTH = 36
MAX_USER_ID_LENGTH = 256
MAX_BODY_BYTES = 130_000
"""The post body must be smaller than 130 kB; counted in bytes of the UTF-8 JSON."""
MAX_BACKDATE_SECONDS = 72 * 3600

# Google's lists for web and app streams together ("not exhaustive"): a telemetry event of the
# same name would be dropped or, worse, counted as GA4's own.
RESERVED_EVENT_NAMES = frozenset(
    {
        "ad_activeview", "ad_click", "ad_exposure", "ad_impression", "ad_query", "ad_reward",
        "adunit_exposure", "app_background", "app_clear_data", "app_exception", "app_install",
        "app_remove", "app_store_refund", "app_store_subscription_cancel",
        "app_store_subscription_convert", "app_store_subscription_renew", "app_update",
        "app_upgrade", "click", "dynamic_link_app_open", "dynamic_link_app_update",
        "dynamic_link_first_open", "error", "file_download", "firebase_campaign",
        "firebase_in_app_message_action", "firebase_in_app_message_dismiss",
        "firebase_in_app_message_impression", "first_open", "first_visit", "form_start",
        "form_submit", "in_app_purchase", "notification_dismiss", "notification_foreground",
        "notification_open", "notification_receive", "os_update", "page_view", "screen_view",
        "scroll", "session_start", "session_start_with_rollout", "user_engagement",
        "video_complete", "video_progress", "video_start", "view_complete", "view_search_results",
    }
)  # fmt: skip
# ``ad_`` covers the advertising events Google adds over time, not only those listed.
RESERVED_EVENT_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.", "ad_")
# Parameters GA4 reads itself (sessions, engagement, click ids): a property of the same name
# would be taken for GA4's own and distort its reports.
RESERVED_PARAM_NAMES = frozenset({"engagement_time_msec", "gclid", "session_id", "session_number"})
RESERVED_PARAM_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_USER_PROPERTY_NAMES = frozenset(
    {"first_open_after_install", "first_open_time", "first_visit_time", "last_deep_link_referrer",
     "user_id"}
)  # fmt: skip
RESERVED_USER_PROPERTY_PREFIXES = ("_", "firebase_", "ga_", "google_")

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_INT64 = 2**63


class Refused(Exception):
    """The event cannot be sent to GA4; ``reason`` says why and what to change."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalise(name: str) -> str:
    """Replace every character GA4 does not allow in names by ``_`` (``flow.build`` ->
    ``flow_build``, ``component-run`` -> ``component_run``). Case is kept: GA4 names are
    case-sensitive."""
    return _UNSAFE.sub("_", name)


def _starts_with_letter(name: str) -> bool:
    return bool(name) and name[0].isascii() and name[0].isalpha()


def _reserved_prefix(raw: str, name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if raw.startswith(prefix) or name.startswith(normalise(prefix)):
            return prefix
    return None


def event_name(raw: str) -> str:
    """The GA4 name of an event, or :class:`Refused` when no safe name exists."""
    name = normalise(raw)
    if not _starts_with_letter(name):
        raise Refused(f"event name {raw!r} must start with a letter (GA4 rule); rename the event")
    prefix = _reserved_prefix(raw, name, RESERVED_EVENT_PREFIXES)
    if prefix:
        raise Refused(f"event name {raw!r} uses the prefix {prefix!r} reserved by GA4; rename it")
    if name in RESERVED_EVENT_NAMES:
        raise Refused(
            f"event name {name!r} is reserved by GA4 and would be dropped; rename it "
            f"(for example app_{name})"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise Refused(
            f"event name {raw!r} is {len(name)} characters; GA4 allows {MAX_NAME_LENGTH}. "
            "Shorten it (cutting it could merge distinct events)"
        )
    return name


def _param_name_problem(raw: str, name: str) -> str | None:
    if not _starts_with_letter(name):
        return "a name must start with a letter"
    prefix = _reserved_prefix(raw, name, RESERVED_PARAM_PREFIXES)
    if prefix:
        return f"the prefix {prefix!r} is reserved by GA4"
    if name in RESERVED_PARAM_NAMES:
        return "the name is reserved by GA4"
    if len(name) > MAX_NAME_LENGTH:
        return f"the name is longer than {MAX_NAME_LENGTH} characters"
    return None


def _flatten(
    value: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Nested mappings become paths (``{"run": {"ok": 1}}`` -> ``("run", "ok"), 1``)."""
    for key, item in value.items():
        if isinstance(item, Mapping):
            yield from _flatten(item, (*path, str(key)))
        else:
            yield (*path, str(key)), item


def scalar(value: Any) -> str | int | float | None:
    """A property value as GA4 takes it: strings and numbers; booleans as ``"true"`` /
    ``"false"``, lists as compact JSON text, ``None`` left out."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, (float, str)):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _fitted(item: Any, limit: int, what: str, notes: list[str]) -> str | int | float | None:
    """``item`` as GA4 takes it (:func:`scalar`), a text cut to ``limit`` characters (noted)."""
    value = scalar(item)
    if isinstance(value, str) and len(value) > limit:
        notes.append(f"{what} cut to GA4's {limit} characters")
        return value[:limit]
    return value


def event_params(
    properties: Mapping[str, Any], first: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Event params from ``first`` (the sink's own, kept first) and the properties: nested
    mappings flattened into ``parent_child`` names, names normalised, values fitted. Returns
    the params and notes on what was changed or left out."""
    params: dict[str, Any] = dict(first)
    notes: list[str] = []
    for path, item in _flatten(properties):
        raw = ".".join(path)
        name = normalise("_".join(path))
        problem = _param_name_problem(raw, name)
        if problem:
            notes.append(f"property {raw!r} left out: {problem}")
            continue
        if name in params:
            notes.append(f"property {raw!r} left out: the param name {name!r} is already used")
            continue
        value = _fitted(item, MAX_PARAM_VALUE_LENGTH, f"param {name!r}", notes)
        if value is not None:
            params[name] = value
    if len(params) > MAX_PARAMS_PER_EVENT:
        extra = list(params)[MAX_PARAMS_PER_EVENT:]
        notes.append(
            f"{len(extra)} params over GA4's {MAX_PARAMS_PER_EVENT} per event left out: "
            + ", ".join(extra)
        )
        params = dict(list(params.items())[:MAX_PARAMS_PER_EVENT])
    return params, notes


def user_properties(context: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """GA4 user properties from the event context (``app_version``, ``os_type``, ...), in
    GA4's ``{"name": {"value": ...}}`` form, within its name and value limits."""
    props: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for path, item in _flatten(context):
        name = normalise("_".join(path))
        if (
            not _starts_with_letter(name)
            or len(name) > MAX_USER_PROPERTY_NAME_LENGTH
            or name in RESERVED_USER_PROPERTY_NAMES
            or _reserved_prefix(name, name, RESERVED_USER_PROPERTY_PREFIXES)
        ):
            notes.append(f"context {'.'.join(path)!r} left out: not a valid GA4 user property name")
            continue
        value = _fitted(item, MAX_USER_PROPERTY_VALUE_LENGTH, f"user property {name!r}", notes)
        if value is None:
            continue
        if len(props) == MAX_USER_PROPERTIES:
            notes.append(f"context {'.'.join(path)!r} left out: over {MAX_USER_PROPERTIES}")
            continue
        props[name] = {"value": value}
    return props, notes
