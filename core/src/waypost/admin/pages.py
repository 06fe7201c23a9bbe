"""What each admin page shows, as plain JSON data: the HTML templates and the JSON views are
both rendered from these dicts, so the two never disagree."""

from __future__ import annotations

import importlib
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretBytes, SecretStr

from waypost.delivery.outbox import Outbox
from waypost.events import Payload, registered_payloads
from waypost.logs import get_logger
from waypost.privacy import StoredConsent, sanitise

if TYPE_CHECKING:
    from waypost.status import Status
    from waypost.telemetry import Telemetry

log = get_logger("waypost.admin")

OVERRIDE_RULES = frozenset({"do_not_track", "app_env", "config", "level", "config_error"})
"""Rules that decide above the stored admin choice: the switch cannot change the outcome."""

STATES = ("pending", "sent", "failed")
HIDDEN = "[hidden]"
SECRET_SET = "[secret: set]"  # noqa: S105 (a label, not a password)

_SECRET_NAME = re.compile(
    r"secret|token|passw|pwd|apikey|privatekey|credential|auth|cookie|session|signature|dsn"
    r"|connectionstring|key$"
)


def _scrub(text: str) -> str:
    return sanitise(text)


def _safe_text(text: str) -> str:
    """A config string for display: a URL keeps its scheme and host but not its user info."""
    if "://" in text and "@" in text:
        try:
            parts = urlsplit(text)
        except ValueError:
            parts = None
        if parts is not None and parts.hostname and "@" in parts.netloc:
            host = parts.netloc.rsplit("@", 1)[1]
            rest = _scrub(urlunsplit(parts._replace(scheme="", netloc="")))
            return f"{parts.scheme}://{HIDDEN}@{_scrub(host)}{rest}"
    return _scrub(text)


def is_override(rule: str) -> bool:
    return rule in OVERRIDE_RULES


# --- secrets ----------------------------------------------------------------------------------


def safe_config(config: BaseModel | None) -> dict[str, Any]:
    """A sink's config for display: secret fields (``SecretStr``, or named like a secret) show
    only whether they are set, mapping values are hidden, strings pass the scrubbers."""
    if config is None:
        return {}
    return {
        name: _safe_value(name, getattr(config, name, None)) for name in type(config).model_fields
    }


def _safe_value(name: str, value: Any) -> Any:
    if isinstance(value, (SecretStr, SecretBytes)):
        return SECRET_SET if value.get_secret_value() else None
    if value is None or isinstance(value, bool):
        return value
    if _SECRET_NAME.search(re.sub(r"[^a-z0-9]", "", name.lower())):
        return HIDDEN
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, BaseModel):
        return safe_config(value)
    if isinstance(value, dict):
        # Header and parameter maps carry credentials under any name: show the keys only.
        return {_scrub(str(k)): HIDDEN for k in value}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_safe_value(name, item) for item in value]
    return _safe_text(str(value))


# --- status and consent -----------------------------------------------------------------------


def consent_data(tel: Telemetry) -> dict[str, Any]:
    decision = tel.decision
    stored = StoredConsent.read(Path(tel.data_dir))
    overridden = is_override(decision.rule)
    return {
        "enabled": bool(tel.enabled),
        "rule": decision.rule,
        "reason": decision.reason,
        "mode": tel.config.mode,
        "stored": None
        if stored is None
        else {
            "enabled": stored.enabled,
            "policy_version": stored.policy_version,
            "at": _iso(stored.at),
        },
        "overridden": overridden,
        "can_change": not overridden,
        "override": _override_hint(tel, decision.rule) if overridden else None,
    }


def _override_hint(tel: Telemetry, rule: str) -> str:
    cfg = tel.config
    if rule == "do_not_track":
        return "Unset DO_NOT_TRACK in the environment to let this switch decide."
    if rule == "app_env":
        names = " or ".join(n for n in (cfg.disable_env, cfg.enable_env) if n)
        return f"Unset {names} in the environment to let this switch decide."
    if rule == "config":
        where = tel.config_file or "the configuration"
        return f"Remove telemetry.enabled from {where} to let this switch decide."
    if rule == "level":
        where = tel.config_file or "the configuration"
        return f"Set telemetry.level to another value than off in {where}."
    return "Fix the configuration first."


def status_data(tel: Telemetry) -> dict[str, Any]:
    status: dict[str, Any] = tel.status().model_dump(mode="json")
    sinks_by_name = getattr(tel, "sinks", {}) or {}
    for sink in status["sinks"]:
        instance = sinks_by_name.get(sink["name"])
        sink["config"] = safe_config(getattr(instance, "config", None))
        for key in ("last_error", "error"):
            if sink.get(key):
                sink[key] = _scrub(sink[key])
    if status.get("config_error"):
        status["config_error"] = _scrub(status["config_error"])
    storage = status.get("storage") or {}
    if storage.get("detail"):
        storage["detail"] = _scrub(storage["detail"])
    storage["notes"] = [_scrub(n) for n in storage.get("notes", [])]
    status["notes"] = [_scrub(n) for n in status.get("notes", [])]
    status["consent"] = consent_data(tel)
    return status


# --- records and actions ----------------------------------------------------------------------


class OutboxAccess:
    """The telemetry's outbox, or one opened read-write on its data dir when telemetry is not
    running; never created just because someone looked."""

    def __init__(self, tel: Telemetry) -> None:
        self.tel = tel
        self._lock = threading.Lock()

    def get(self) -> Outbox | None:
        with self._lock:
            return self.tel.open_outbox() if self.tel.has_outbox() else None


def outbox_totals(outbox: Outbox | None) -> dict[str, int]:
    totals = dict.fromkeys(("total", *STATES), 0)
    if outbox is None:
        return totals
    for by_state in outbox.counts().values():
        for state, n in by_state.items():
            totals[state] = totals.get(state, 0) + n
            totals["total"] += n
    return totals


def records_data(
    tel: Telemetry,
    outbox: Outbox | None,
    *,
    sink: str | None,
    state: str | None,
    name: str | None,
    page: int,
    per_page: int,
) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    total = 0
    sinks = set(tel.config.sink_specs()) if tel.config_error is None else set()
    if outbox is not None:
        found, total = outbox.records(
            sink=sink, state=state, name=name, limit=per_page, offset=(page - 1) * per_page
        )
        records = [r.as_dict() for r in found]
        sinks |= set(outbox.counts())
    pages = max(1, -(-total // per_page))
    return {
        "filters": {"sink": sink or "", "state": state or "", "name": name or ""},
        "page": page,
        "per_page": per_page,
        "pages": pages,
        "total": total,
        "records": records,
        "sinks": sorted(sinks),
        "states": list(STATES),
    }


def actions_data(tel: Telemetry, outbox: Outbox | None) -> dict[str, Any]:
    """The actions page: the outbox's totals, and why each sink still holds events."""
    try:
        waiting = pending_why(tel.status())
    except Exception:  # status answers whatever happens; this is only an aid
        waiting = {}
    return {"enabled": bool(tel.enabled), "outbox": outbox_totals(outbox), "waiting": waiting}


def pending_why(status: Status) -> dict[str, dict[str, Any]]:
    """``Status.pending()`` with each reason passed through the scrubbers, as on the status
    page (a destination's error may quote what it was sent)."""
    return {
        name: {**w, "why": _scrub(w["why"]) if w["why"] else None}
        for name, w in status.pending().items()
    }


# --- manifest ---------------------------------------------------------------------------------

ENVELOPE: tuple[tuple[str, str], ...] = (
    ("id", "A random UUIDv7 for the event (ordering and de-duplication)."),
    ("name", "The event name."),
    ("timestamp", "When the event happened (UTC)."),
    ("instance_id", "A random id for this installation, created once; nothing personal."),
    ("distinct_id", "The id destinations count by: the instance id unless the app sets one."),
    ("context.app.name, context.app.version", "The application and its version."),
    ("context.os.type, context.os.release, context.os.arch", "The operating system."),
    ("context.python", "The Python version."),
    ("context.waypost", "The waypost version."),
)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\btyping\.|\bcollections\.abc\.", "", repr(annotation))


def _payload_entry(event: str, cls: type[Payload]) -> dict[str, Any]:
    fields = []
    for field_name, info in cls.model_fields.items():
        fields.append(
            {
                "name": info.serialization_alias or info.alias or field_name,
                "attribute": field_name,
                "type": _type_name(info.annotation),
                "required": info.is_required(),
                "description": (info.description or "").strip(),
            }
        )
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return {
        "event": event,
        "level": cls.__level__,
        "payload": f"{cls.__module__}.{cls.__qualname__}",
        "description": " ".join(doc.split()),
        "fields": fields,
    }


def manifest_data(tel: Telemetry) -> dict[str, Any]:
    errors = []
    for module in getattr(tel.config, "schemas", []):
        try:
            importlib.import_module(module)
        except Exception as exc:
            errors.append(f"cannot import {module}: {type(exc).__name__}: {_scrub(str(exc))}")
    events = [_payload_entry(event, cls) for event, cls in sorted(registered_payloads().items())]
    return {
        "level": tel.config.level,
        "envelope": [{"name": n, "description": d} for n, d in ENVELOPE],
        "events": events,
        "errors": errors,
    }


def _iso(t: float | None) -> str | None:
    if not t:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
