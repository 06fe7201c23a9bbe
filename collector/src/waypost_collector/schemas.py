"""An app's published schemas on arrival: the ``waypost.Payload`` classes its ``schemas``
modules declare, checked against each event by its wire names (the aliases it is sent under)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from waypost.errors import ConfigError
from waypost.events import Payload, registered_payloads
from waypost.manifest import import_schemas


@dataclass
class Declared:
    """One Payload class and the map from its wire names to its field names."""

    cls: type[Payload]
    fields: dict[str, str]
    nullable: tuple[str, ...] = ()
    """Required fields that take None, of a class that sends no None (``exclude_none``): a
    client leaves them out, so they arrive absent."""

    @classmethod
    def of(cls, payload: type[Payload]) -> Declared:
        names = {}
        nullable = []
        for name, info in payload.model_fields.items():
            names[info.serialization_alias or info.alias or name] = name
            if payload.__exclude_none__ and info.is_required() and _takes_none(info.annotation):
                nullable.append(name)
        return cls(payload, names, tuple(nullable))


def _takes_none(annotation: Any) -> bool:
    import types
    import typing

    if annotation is None or annotation is type(None):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return type(None) in typing.get_args(annotation)
    return False


@dataclass
class Schemas:
    """The events one app declares. With no modules, nothing is declared and every event is
    taken as free-form (its properties scrubbed)."""

    modules: list[str]
    accept_undeclared: bool = False
    free_form: frozenset[str] = frozenset()
    events: dict[str, Declared] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        modules: list[str],
        *,
        accept_undeclared: bool,
        free_form: frozenset[str],
        key: str,
        search: list[str] | None = None,
    ) -> Schemas:
        errors = import_schemas(modules, search)
        if errors:
            raise ConfigError(errors[0], key=key)
        events = {}
        for name, payload in registered_payloads().items():
            module = payload.__module__
            if any(module == m or module.startswith(m + ".") for m in modules):
                events[name] = Declared.of(payload)
        if modules and not events:
            raise ConfigError(
                f"the modules {', '.join(modules)} declare no waypost.Payload class", key=key
            )
        return cls(modules, accept_undeclared, free_form, events)

    @property
    def declares(self) -> bool:
        return bool(self.modules)

    def check(self, name: str, properties: dict[str, Any]) -> dict[str, Any] | tuple[str, str]:
        """The properties to keep, or ``(reason, detail)`` when the event is refused."""
        declared = self.events.get(name)
        if declared is None:
            if not self.declares or self.accept_undeclared or name in self.free_form:
                return properties
            known = ", ".join(sorted(self.events)) or "none"
            return "undeclared_event", f"event {name!r} is not declared (declared: {known})"
        wire_to_field = declared.fields
        given = {wire_to_field.get(k, k): v for k, v in properties.items()}
        absent = [n for n in declared.nullable if n not in given]
        given.update(dict.fromkeys(absent))  # left out as None by the class's exclude_none
        try:
            payload = declared.cls.model_validate(given)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or name
            return "invalid_field", f"{where}: {first['msg']}"
        extra = payload.undeclared()
        if extra and not self.accept_undeclared:
            return "undeclared_field", f"{', '.join(extra)} not declared by {name!r}"
        kept: dict[str, Any] = payload.model_dump(
            mode="json",
            by_alias=True,
            exclude_unset=True,
            exclude_none=declared.cls.__exclude_none__,
            exclude={*extra, *absent},
            warnings=False,
        )
        for key in extra:
            kept[key] = properties[key]
        return kept
