"""``waypost manifest``: exactly what is collected, generated from the registered payload
classes, the envelope and the enabled sinks; never written by hand."""

from __future__ import annotations

import importlib
from typing import Any

from waypost.events import Payload, registered_payloads

ENVELOPE = [
    ("id", "string", "Event id (UUIDv7): ordering and de-duplication key."),
    ("name", "string", "Event name."),
    ("timestamp", "string", "When the event happened (UTC, ISO 8601)."),
    (
        "instance_id",
        "string",
        "Random id of this installation, created once; not linked to a person.",
    ),
    (
        "distinct_id",
        "string",
        "The id destinations count by: the instance id, unless the application sets its own.",
    ),
    ("context.app", "object", "Application name and version."),
    ("context.os", "object", "Operating system type, release and architecture."),
    ("context.python", "string", "Python version."),
    ("context.waypost", "string", "waypost version."),
]


def import_schemas(modules: list[str], search: list[str] | None = None) -> list[str]:
    """Import the modules that declare Payload classes; return error messages, if any.

    ``search`` directories (the config file's, the working directory) are tried too, so an
    application's own modules are found when the CLI runs from its source tree.
    """
    import sys

    for path in search or []:
        if path not in sys.path:
            sys.path.append(path)
    errors = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            errors.append(f"cannot import schema module {name!r}: {type(exc).__name__}: {exc}")
    return errors


def _type_name(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        ref = schema["$ref"].rsplit("/", 1)[-1]
        return _type_name(defs.get(ref, {}), defs) if ref in defs else ref
    if "anyOf" in schema:
        names = [_type_name(s, defs) for s in schema["anyOf"]]
        return " | ".join(dict.fromkeys(names))
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type_name(schema.get('items', {}), defs)}"
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if isinstance(kind, list):
        return " | ".join(kind)
    return str(kind or schema.get("title", "any"))


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return dict(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}))
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if len(options) == 1:
        return _resolve(options[0], defs)
    return schema


def _collect_fields(
    schema: dict[str, Any], defs: dict[str, Any], prefix: str, out: list[dict[str, Any]], depth: int
) -> None:
    """One row per field, nested models and lists of them as ``parent.child`` rows."""
    required = set(schema.get("required", []))
    for prop, spec in schema.get("properties", {}).items():
        name = f"{prefix}{prop}"
        out.append(
            {
                "property": name,
                "type": _type_name(spec, defs),
                "description": (spec.get("description") or "").strip(),
                "required": prop in required,
            }
        )
        inner = _resolve(spec, defs)
        if inner.get("type") == "array":
            inner, name = _resolve(inner.get("items", {}), defs), f"{name}[]"
        if "properties" in inner and depth < 5:
            _collect_fields(inner, defs, f"{name}.", out, depth + 1)


def describe_payload(cls: type[Payload]) -> dict[str, Any]:
    """The event name, level and fields (wire name, type, description, required) of a class."""
    schema = cls.model_json_schema(by_alias=True, mode="serialization")
    defs = schema.get("$defs", {})
    fields: list[dict[str, Any]] = []
    _collect_fields(schema, defs, "", fields, depth=0)
    return {
        "event": cls.__event__,
        "payload": cls.__name__,
        "module": cls.__module__,
        "level": cls.__level__,
        "description": (cls.__doc__ or "").strip().split("\n\n")[0],
        "exclude_none": cls.__exclude_none__,
        "exclude_unset": cls.__exclude_unset__,
        "fields": fields,
    }


def _omitted(event: dict[str, Any]) -> str:
    """The sentence saying which fields an event leaves out, or ``""``."""
    left_out = [
        what
        for key, what in (
            ("exclude_none", "whose value is null"),
            ("exclude_unset", "the application did not set (defaults are not sent)"),
        )
        if event.get(key)
    ]
    return f"Fields {' or '.join(left_out)} are left out." if left_out else ""


def build(
    *,
    schemas: list[str],
    sinks: list[dict[str, Any]],
    metrics: list[dict[str, Any]] | None = None,
    search: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest as data: events (from Payload classes), envelope, sinks, metrics.

    With ``schemas``, only Payload classes defined in those modules (or below them) are listed;
    without, every Payload class defined so far.
    """
    errors = import_schemas(schemas, search)
    classes = list(registered_payloads().values())
    if schemas:
        classes = [
            c
            for c in classes
            if any(c.__module__ == m or c.__module__.startswith(m + ".") for m in schemas)
        ]
    return {
        "events": [describe_payload(c) for c in sorted(classes, key=lambda c: c.__event__)],
        "envelope": [{"property": p, "type": t, "description": d} for p, t, d in ENVELOPE],
        "sinks": sinks,
        "metrics": metrics or [],
        "scrubbing": (
            "Free-form properties and every string value pass the scrubbers: e-mail and IP "
            "addresses, card numbers, secrets and tokens, URLs with credentials and home-directory "
            "user names are redacted before anything is stored or sent."
        ),
        "errors": errors,
    }


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(manifest: dict[str, Any], *, app: str = "") -> str:
    """FlowForge's "Collected Data" table, generated."""
    lines = [f"# Telemetry collected{' by ' + app if app else ''}", ""]
    lines += ["## Events", ""]
    if not manifest["events"]:
        lines += ["No typed payloads are registered (set `telemetry.schemas`).", ""]
    for event in manifest["events"]:
        lines += [f"### `{event['event']}` ({event['level']})", ""]
        if event["description"]:
            lines += [_cell(event["description"]), ""]
        if _omitted(event):
            lines += [_omitted(event), ""]
        lines += ["Property | Type | Description", "----|----|-----"]
        lines += [
            f"`{f['property']}` | {_cell(f['type'])} | {_cell(f['description'])}"
            for f in event["fields"]
        ]
        lines.append("")
    lines += ["## Sent with every event", "", "Property | Type | Description", "----|----|-----"]
    lines += [
        f"`{e['property']}` | {e['type']} | {_cell(e['description'])}" for e in manifest["envelope"]
    ]
    lines += ["", manifest["scrubbing"], ""]
    for title, builtin in (("Metrics", False), ("waypost's own health metrics", True)):
        metrics = [m for m in manifest["metrics"] if bool(m.get("builtin")) == builtin]
        if not metrics:
            continue
        lines += [
            f"## {title}",
            "",
            "Metric | Type | Unit | Labels (* mandatory) | Goes to | Description",
        ]
        lines.append("----|----|----|----|----|-----")
        for m in metrics:
            labels = ", ".join(
                f"{lb['name']}{'*' if lb.get('mandatory') else ''}" for lb in m["labels"]
            )
            goes = ", ".join(m.get("destinations") or []) or "kept in memory only"
            lines.append(
                f"`{m['name']}` | {m['type']} | {m.get('unit', '')} | {labels} | {goes} | "
                f"{_cell(m.get('description', ''))}"
            )
        lines.append("")
    lines += ["## Destinations", ""]
    if manifest["sinks"]:
        lines += ["Sink | Type | Destination", "----|----|-----"]
        lines += [
            f"`{s['name']}` | {s['type']} | "
            + (
                _cell(f"(cannot be made here: {s['error']})")
                if s.get("error")
                else _cell(s.get("destination") or "")
            )
            for s in manifest["sinks"]
        ]
    else:
        lines.append("None: nothing leaves this machine.")
    return "\n".join(lines) + "\n"
