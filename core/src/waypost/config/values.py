"""Values by the type of the field they land in.

A YAML plain scalar such as ``off``, ``2`` or ``1.10`` means a word to a text field and a
boolean or a number elsewhere; an environment variable's value is text, made a list or a
mapping only where the field is one. The loaders mark such values (:class:`Text`,
:class:`EnvValue`) and :func:`conform` resolves them against a pydantic model before it
validates. :func:`parse_bool` is the one boolean parser of the project.
"""

from __future__ import annotations

import difflib
import enum
import json
import types
import typing
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, SecretBytes, SecretStr

from waypost.errors import ConfigError

TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
FALSE_VALUES = frozenset({"0", "false", "no", "off"})


def parse_bool(value: object) -> bool | None:
    """True/False for a boolean or a recognised boolean word (``1``/``true``/``yes``/``on``,
    ``0``/``false``/``no``/``off``, any case, spaces around ignored); None otherwise (unset,
    empty, unknown)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text in TRUE_VALUES:
        return True
    if text in FALSE_VALUES:
        return False
    return None


def flag(value: Any) -> Any:
    """A boolean field's value through :func:`parse_bool` (pydantic's own parser takes other
    words); what it does not know is left for pydantic to refuse."""
    if isinstance(value, str):
        parsed = parse_bool(value)
        if parsed is None:
            raise ValueError(f"{str(value)!r} is not a boolean (true/false, yes/no, on/off or 1/0)")
        return parsed
    if type(value) is int and value in (0, 1):
        return bool(value)
    return value


def is_flag_field(model: type[BaseModel], name: str) -> bool:
    """Whether field ``name`` of ``model`` holds a boolean (``bool`` or ``bool | None``)."""
    field = model.model_fields.get(name)
    return field is not None and _strip_none(field.annotation) is bool


# --- marked values ----------------------------------------------------------------------------


class Text(str):
    """A YAML plain scalar that YAML 1.1 reads as a boolean or a number (``off``, ``0123``,
    ``1.10``, ``12:30``): its text, with that reading in ``value``."""

    value: Any

    def __new__(cls, text: str, value: Any) -> Text:
        self = super().__new__(cls, text)
        self.value = value
        return self

    def __reduce__(self) -> Any:
        return (Text, (str(self), self.value))


class EnvValue(str):
    """The text of a ``WAYPOST_...`` variable, with the variable's name."""

    variable: str

    def __new__(cls, text: str, variable: str) -> EnvValue:
        self = super().__new__(cls, text)
        self.variable = variable
        return self

    def __reduce__(self) -> Any:
        return (EnvValue, (str(self), self.variable))


def plain(value: Any) -> Any:
    """``value`` with every mark resolved as no field says otherwise: YAML 1.1's reading for
    :class:`Text`, the text for :class:`EnvValue`."""
    if isinstance(value, Text):
        return value.value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def only_env(value: Any) -> str | None:
    """The first variable of a value made only of environment text, else None."""
    if isinstance(value, EnvValue):
        return value.variable
    if isinstance(value, dict) and value:
        found = [only_env(v) for v in value.values()]
        return found[0] if all(found) else None
    return None


# --- conforming -------------------------------------------------------------------------------

_TEXT_TYPES: tuple[type, ...] = (str, SecretStr, SecretBytes, PurePath)


def _strip_none(annotation: Any) -> Any:
    args = _union_args(annotation)
    if args is None:
        return annotation
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 else annotation


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return None


def _is_text(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return issubclass(annotation, str)
        if issubclass(annotation, _TEXT_TYPES):
            return True
        # pydantic's URL types (AnyUrl, HttpUrl) and the like take text.
        return annotation.__module__.startswith("pydantic") and "Url" in annotation.__name__
    return False


class Conformer:
    """Resolves marked values against a model, noting environment variables it ignores."""

    def __init__(self, notes: list[str] | None = None) -> None:
        self.notes = notes if notes is not None else []

    def model(self, model: type[BaseModel], data: Any, where: str) -> Any:
        if isinstance(data, EnvValue):
            data = self._json(data, dict, where)
        if not isinstance(data, dict):
            return plain(data)
        fields = model.model_fields
        by_name: dict[str, Any] = {}
        for name, field in fields.items():
            by_name[name] = field.annotation
            if field.alias:
                by_name[field.alias] = field.annotation
        allow_extra = model.model_config.get("extra") == "allow"
        out: dict[Any, Any] = {}
        for key, value in data.items():
            name = str(key) if isinstance(key, str) else plain(key)
            if name in by_name:
                out[name] = self.value(by_name[name], value, f"{where}.{name}")
            elif allow_extra:
                out[name] = plain(value)
            elif (variable := only_env(value)) is not None:
                self._unknown(variable, name, list(by_name), where)
            else:
                out[name] = plain(value)  # pydantic names it as an unknown key
        return out

    def value(self, annotation: Any, value: Any, where: str) -> Any:
        if value is None:
            return None
        union = _union_args(annotation)
        if union is not None:
            members = [a for a in union if a is not type(None)]
            if len(members) == 1:
                return self.value(members[0], value, where)
            return self._union(members, value, where)
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            return self.value(typing.get_args(annotation)[0], value, where)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return self.model(annotation, value, where)
        if _is_text(annotation):
            return str(value) if isinstance(value, str) else plain(value)
        container = origin if origin is not None else annotation
        if container in (list, tuple, set, frozenset) or _is_abc(container, "Sequence", "Set"):
            return self._list(annotation, value, where)
        if container is dict or _is_abc(container, "Mapping"):
            return self._dict(annotation, value, where)
        if isinstance(value, Text):
            return value.value
        return plain(value)

    def _union(self, members: list[Any], value: Any, where: str) -> Any:
        if isinstance(value, EnvValue):
            text = value.lstrip()
            for member in members:
                kind = typing.get_origin(member) or member
                wants_list = kind in (list, tuple, set, frozenset)
                wants_map = kind is dict or (isinstance(kind, type) and issubclass(kind, BaseModel))
                if (wants_list and text.startswith("[")) or (wants_map and text.startswith("{")):
                    return self.value(member, value, where)
            return str(value)
        if isinstance(value, Text):
            reading = type(value.value)
            if any(m is reading for m in members) or not any(_is_text(m) for m in members):
                return value.value
            return str(value)
        for member in members:
            is_model = isinstance(member, type) and issubclass(member, BaseModel)
            if is_model and isinstance(value, dict):
                return self.model(member, value, where)
        return plain(value)

    def _list(self, annotation: Any, value: Any, where: str) -> Any:
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        if isinstance(value, EnvValue):
            text = value.strip()
            if text.startswith("["):
                value = self._json(value, list, where)
            else:
                value = [EnvValue(p.strip(), value.variable) for p in text.split(",") if p.strip()]
        if not isinstance(value, list):
            return plain(value)
        return [self.value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]

    def _dict(self, annotation: Any, value: Any, where: str) -> Any:
        args = typing.get_args(annotation)
        key_type, item = (args[0], args[1]) if len(args) == 2 else (Any, Any)
        if isinstance(value, EnvValue):
            value = self._json(value, dict, where)
        if not isinstance(value, dict):
            return plain(value)
        return {
            self.value(key_type, k, where): self.value(item, v, f"{where}.{k}")
            for k, v in value.items()
        }

    def _json(self, value: EnvValue, kind: type, where: str) -> Any:
        return from_json(value, kind, where)

    def _unknown(self, variable: str, name: str, known: list[str], where: str) -> None:
        close = difflib.get_close_matches(name, [k for k in known if k.isidentifier()], n=1)
        prefix = variable.upper()[: len(variable) - len(_env_tail(variable))]
        hint = f" (did you mean {prefix}{close[0].upper()}?)" if close else ""
        self.notes.append(f"{variable} is ignored: {where} has no setting {name!r}{hint}")


def from_json(value: EnvValue, kind: type, where: str) -> Any:
    """A variable's JSON array or object, for a list or mapping field at ``where``."""
    what = "object" if kind is dict else "array"
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        parsed, problem = None, str(exc)
    else:
        problem = f"not {type(parsed).__name__}"
    if not isinstance(parsed, kind):
        raise ConfigError(
            f"{where} takes a JSON {what} here: {problem}",
            source=f"{value.variable} in the environment",
        )
    return parsed


def _env_tail(variable: str) -> str:
    """The last ``__`` part of a variable's name (the setting it names)."""
    _, sep, tail = variable.rpartition("__")
    if sep:
        return tail
    return variable.split("_", 1)[1] if "_" in variable else variable


def _is_abc(kind: Any, *names: str) -> bool:
    from collections import abc

    return any(kind is getattr(abc, n) or kind is getattr(typing, n, None) for n in names)


def conform(
    model: type[BaseModel], data: Mapping[str, Any], where: str, notes: list[str] | None = None
) -> dict[str, Any]:
    """``data`` for ``model.model_validate``: every marked value resolved by the type of the
    field it lands in; environment variables naming no setting are dropped with a note."""
    out = Conformer(notes).model(model, dict(data), where)
    assert isinstance(out, dict)
    return out
