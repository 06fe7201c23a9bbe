"""The event envelope, typed payloads, UUIDv7 ids and the one place JSON coercion happens."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import json
import math
import os
import pathlib
import platform
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticSerializationError

Level = Literal["error", "usage", "all"]
LEVELS: dict[str, int] = {"off": 0, "error": 1, "usage": 2, "all": 3}

_UTC = _dt.timezone.utc
_ISO_SECOND: tuple[int, str] = (-(2**62), "")  # the last second formatted by iso_timestamp
_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]
_FIRST_SECOND = -62135596800.0  # 0001-01-01T00:00:00Z
_LAST_SECOND = 253402300799.9995  # the last instant that rounds into 9999-12-31


def _iso_second(seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a Unix second, the year always four digits (``strftime``'s
    ``%Y`` gives ``999`` for the year 999 on glibc)."""
    if seconds >= 0:
        t = time.gmtime(seconds)
        return (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        )
    when = _EPOCH + _dt.timedelta(seconds=seconds)
    return f"{when.year:04d}-{when:%m-%dT%H:%M:%S}"


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)


# --- ids --------------------------------------------------------------------------------------

_HEX3 = [f"{i:03x}" for i in range(4096)]
"""The 12-bit counters as text."""
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
"""A random hex digit made the first digit of the variant field: bits 10, then two of its own."""


class _UUID7:
    """UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then a 12-bit counter that keeps ids made in
    the same millisecond in order, then 62 random bits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        self._prefix = (-1, "")  # the last millisecond and its text, "xxxxxxxx-xxxx-7"
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        # Another thread of the parent may have held the lock at the fork.
        self._lock = threading.Lock()

    def __call__(self, unix_seconds: float | None = None) -> str:
        return self.many([time.time() if unix_seconds is None else unix_seconds])[0]

    def many(self, times: Sequence[float]) -> list[str]:
        """One id per Unix time, in order; a third of the cost of one call per id."""
        n = len(times)
        # One draw from the OS for all of them: 16 hex digits per id (the random bits of its
        # last two fields), then two bytes per id for counters that start a millisecond.
        raw = os.urandom(10 * n)
        digits, seeds = raw[: 8 * n].hex(), raw[8 * n :]
        hex3, variant = _HEX3, _VARIANT
        out: list[str] = []
        append = out.append
        ahead = int(time.time() * 1000) + 1000
        with self._lock:
            last_ms, counter = self._last_ms, self._counter
            prefix_ms, prefix = self._prefix
            at = seed = 0
            for t in times:
                ms = int(t * 1000)
                if ms < last_ms - 1000 or ms > ahead:
                    # A backdated (or future) event: its own millisecond, no effect on the
                    # running order of the others.
                    count = (seeds[seed] << 8 | seeds[seed + 1]) & 0xFFF
                    seed += 2
                else:
                    if ms > last_ms:
                        last_ms = ms
                        counter = (seeds[seed] << 8 | seeds[seed + 1]) & 0x3FF
                        seed += 2
                    else:  # same millisecond (or the clock stepped back a little): keep order
                        counter += 1
                        if counter > 0xFFF:
                            last_ms += 1
                            counter = 0
                    ms, count = last_ms, counter
                if ms != prefix_ms:
                    wrapped = ms & 0xFFFF_FFFF_FFFF
                    prefix_ms, prefix = ms, f"{wrapped >> 16:08x}-{wrapped & 0xFFFF:04x}-7"
                tail = digits[at : at + 16]
                at += 16
                # What str(uuid.UUID(int=...)) gives, without building the 128-bit number.
                append(f"{prefix}{hex3[count]}-{variant[tail[0]]}{tail[1:4]}-{tail[4:]}")
            self._last_ms, self._counter = last_ms, counter
            self._prefix = (prefix_ms, prefix)
        return out


uuid7 = _UUID7()
"""Make a UUIDv7 string; ids made by one process sort in the order they were made."""


# --- JSON coercion ----------------------------------------------------------------------------


def coerce(value: Any, _depth: int = 0) -> Any:
    """Turn a property value into plain JSON data, or raise ``TypeError`` naming the type.

    The one documented place for coercion: ``datetime``/``date``/``time`` become ISO 8601
    (naive datetimes are taken as UTC), ``Decimal`` a number, ``UUID`` and ``Path`` strings,
    enums their value, sets/tuples lists, dataclasses and pydantic models dicts, bytes are refused
    (they are rarely meant to leave), non-finite floats become ``None``.
    """
    if type(value) is dict and _depth <= 32:
        # The common case, kept fast: a plain dict with string keys and scalar values.
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                return _coerce(value, _depth)
            if not key.isascii():  # isascii is a flag lookup: only other text is checked
                utf8(key)
            kind = type(item)
            if kind is str:
                if not item.isascii():
                    utf8(item)
                out[key] = item
            elif kind is int or kind is bool or item is None:
                out[key] = item
            elif kind is float:
                out[key] = item if math.isfinite(item) else None
            else:
                out[key] = coerce(item, _depth + 1)
        return out
    return _coerce(value, _depth)


def utf8(text: str) -> str:
    """``text`` if it can be written as UTF-8; ``ValueError`` for a lone surrogate (a half of
    a UTF-16 pair, which no JSON text on the wire may hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone surrogate U+{ord(text[exc.start]):04X}, which is not UTF-8"
        ) from None
    return text


def _coerce(value: Any, _depth: int) -> Any:
    if isinstance(value, str):
        return value if value.isascii() else utf8(str(value))
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _depth > 32:
        raise TypeError("nested deeper than 32 levels")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                if isinstance(key, (int, float, bool, enum.Enum, uuid.UUID)):
                    key = str(key.value if isinstance(key, enum.Enum) else key)
                else:
                    raise TypeError(f"key of type {type(key).__name__} is not a string")
            elif not key.isascii():
                utf8(key)
            out[key] = coerce(item, _depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [coerce(item, _depth + 1) for item in items]
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_UTC)
        return value.astimezone(_UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, pathlib.PurePath):  # undecodable bytes in a name are surrogates
        return utf8(str(value))
    if isinstance(value, enum.Enum):
        return coerce(value.value, _depth + 1)
    if isinstance(value, Payload):  # nested: what it would send on its own
        return coerce(value.wire(), _depth + 1)
    if isinstance(value, BaseModel):
        return coerce(value.model_dump(mode="json", by_alias=True), _depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return coerce(dataclasses.asdict(value), _depth + 1)
    raise TypeError(f"value of type {type(value).__name__} is not JSON-serialisable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _c_encoder() -> Any:
    """The C encoder that ``_ENCODER.encode`` makes anew on every call, made once; None where
    the interpreter has none (or makes it differently). Coerced data is a tree, so it goes
    without the circular-reference check, which would make it unsafe to share across threads.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        # markers, default, encoder, indent, key and item separators, sort_keys, skipkeys,
        # allow_nan: what JSONEncoder.iterencode passes for _ENCODER, but the markers.
        encoder = make(
            None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",",
            False, False, True,
        )  # fmt: skip
        sample = {"a": [1, 2.5, None, True, '\u00e9\n"', {}], "b": float("nan")}
        if "".join(encoder(sample, 0)) != _ENCODER.encode(sample):
            return None
    except Exception:
        return None
    return encoder


_C_ENCODER = _c_encoder()


def dumps(data: Any) -> str:
    """Compact JSON for the wire and the outbox (data must already be coerced)."""
    # One encoder for every call: json.dumps with options builds a new one each time, and
    # JSONEncoder.encode builds a new C encoder each time.
    if _C_ENCODER is not None:
        return "".join(_C_ENCODER(data, 0))
    return _ENCODER.encode(data)


# --- event names ------------------------------------------------------------------------------

NAME_MAX = 200
"""The longest event name, in characters."""


def name_problem(name: str) -> str | None:
    """What is wrong with an event name, or None. The rule: 1 to :data:`NAME_MAX` printable
    characters (letters, marks, digits, punctuation, symbols and the ASCII space: no control,
    format or bidirectional characters, no line breaks, no other spaces), no space at either
    end."""
    if not name:
        return "is empty"
    if len(name) > NAME_MAX:
        return f"is longer than {NAME_MAX} characters"
    if not name.isprintable():
        bad = next(ch for ch in name if not ch.isprintable())
        return f"holds the character U+{ord(bad):04X}, which is not printable"
    if name[0] == " " or name[-1] == " ":
        return "starts or ends with a space"
    return None


def normalise_name(name: str) -> str:
    """An event name made to follow the rule, as far as it can be without cutting it: each run
    of characters that are not printable becomes one ``_`` (none at either end), spaces at
    either end go. The result may still be empty or too long (refused)."""
    parts = "".join(ch if ch.isprintable() else "\0" for ch in name).split("\0")
    return "_".join(p for p in parts if p).strip(" ")


# --- the envelope -----------------------------------------------------------------------------

NO_REMARKS: Any = ()
"""What an event holds as its remarks while it has none (pass it for an event without remarks):
the list is made when ``remarks`` is first read. A list per event would be one more object for
the garbage collector to visit for each event waiting in memory, and make each full collection
the host goes through during a burst longer."""


@dataclasses.dataclass(slots=True)
class Event:
    """One event as sinks receive it: the envelope every destination is built from.

    ``time`` is Unix seconds (UTC); ``timestamp`` gives the same instant as an aware datetime.
    ``distinct_id`` is the id destinations count by: the instance id unless the application set
    one. ``remarks`` lists what the privacy gate redacted (``"email@properties.owner"``).
    """

    id: str
    name: str
    time: float
    instance_id: str
    properties: dict[str, Any]
    context: dict[str, Any]
    distinct_id: str = ""
    level: str = "usage"
    remarks: list[str] = dataclasses.field(default=NO_REMARKS)

    @property
    def timestamp(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.time, _UTC)

    @property
    def iso_timestamp(self) -> str:
        """The timestamp as RFC 3339 with milliseconds and a ``Z`` (four-digit years: an
        instant outside the years 0001 to 9999 raises ``ValueError``; the gate lets none in)."""
        # The same text as timestamp.isoformat(timespec="milliseconds") (microseconds rounded
        # half to even, then cut to milliseconds), with the seconds part cached: sinks ask for
        # it once per event.
        t = self.time
        if not _FIRST_SECOND <= t < _LAST_SECOND:
            raise ValueError(f"time {t!r} is outside the years 0001 to 9999")
        seconds = int(t) if t >= 0 else math.floor(t)
        micros = round((t - seconds) * 1e6)
        if micros >= 1_000_000:
            seconds, micros = seconds + 1, micros - 1_000_000
        cached = _ISO_SECOND
        if cached[0] != seconds:
            cached = (seconds, _iso_second(seconds))
            globals()["_ISO_SECOND"] = cached
        return cached[1] + _MILLIS[micros // 1000]

    def to_dict(self) -> dict[str, Any]:
        """The envelope as sent by generic sinks (``jsonl``, ``http``, warehouses)."""
        return {
            "id": self.id,
            "name": self.name,
            "timestamp": self.iso_timestamp,
            "instance_id": self.instance_id,
            "distinct_id": self.distinct_id or self.instance_id,
            "properties": self.properties,
            "context": self.context,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        ts = data["timestamp"]
        seconds = (
            _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            if isinstance(ts, str)
            else float(ts)
        )
        return cls(
            id=data["id"],
            name=data["name"],
            time=seconds,
            instance_id=data["instance_id"],
            properties=dict(data.get("properties") or {}),
            context=dict(data.get("context") or {}),
            distinct_id=data.get("distinct_id") or "",
            level=data.get("level", "usage"),
            remarks=list(data.get("remarks") or ()) or NO_REMARKS,
        )


_REMARKS_SLOT: Any = Event.__dict__["remarks"]


def _remarks(event: Event) -> list[str]:
    held: list[str] = _REMARKS_SLOT.__get__(event, Event)
    if held is NO_REMARKS:
        held = []
        _REMARKS_SLOT.__set__(event, held)
    return held


# ``remarks`` stays a plain list to every reader and writer; until one asks for it, the event
# holds the shared empty NO_REMARKS instead (what the slot holds is read by remarks_of).
setattr(
    Event,
    _REMARKS_SLOT.__name__,
    property(_remarks, _REMARKS_SLOT.__set__, doc="What the privacy gate redacted, where."),
)


def remarks_of(event: Event) -> Sequence[str]:
    """An event's remarks, read without making a list for an event that has none."""
    held: Sequence[str] = _REMARKS_SLOT.__get__(event, Event)
    return held


# --- typed payloads ---------------------------------------------------------------------------


class Payload(BaseModel):
    """Base class of typed payloads: declare the event name and exactly the fields that leave.

    ``class RunPayload(waypost.Payload, event="run")``; fields with ``serialization_alias`` go
    out under the alias (camelCase on the wire). Field descriptions (``Field(description=...)``
    or an attribute docstring) feed ``waypost manifest``. ``level`` classifies the event for the
    configured telemetry level (``error``, ``usage`` or ``all``). ``exclude_none=True`` leaves
    out fields whose value is None, ``exclude_unset=True`` fields the payload was not given
    (defaults included), as pydantic's ``model_dump`` options of those names do; a subclass
    inherits both unless it sets them.
    """

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True, frozen=False)

    __event__: ClassVar[str] = ""
    __level__: ClassVar[str] = "usage"
    __exclude_none__: ClassVar[bool] = False
    __exclude_unset__: ClassVar[bool] = False

    def __init_subclass__(
        cls,
        event: str | None = None,
        level: str = "usage",
        exclude_none: bool | None = None,
        exclude_unset: bool | None = None,
        **kwargs: Any,
    ):
        super().__init_subclass__(**kwargs)
        if level not in ("error", "usage", "all"):
            raise ValueError(f"{cls.__name__}: level must be error, usage or all, not {level!r}")
        for key, value in (("exclude_none", exclude_none), ("exclude_unset", exclude_unset)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{cls.__name__}: {key} must be True or False, not {value!r}")
        cls.__event__ = event or cls.__dict__.get("__event__") or _snake(cls.__name__)
        cls.__level__ = level
        if exclude_none is not None:
            cls.__exclude_none__ = exclude_none
        if exclude_unset is not None:
            cls.__exclude_unset__ = exclude_unset
        _PAYLOADS[cls.__event__] = cls

    def undeclared(self) -> list[str]:
        """Names of fields given to this payload that its class does not declare."""
        return sorted(self.__pydantic_extra__ or ())

    def wire(self) -> dict[str, Any]:
        """The declared fields only, by alias, as JSON data (without None or unset fields when
        the class says so). A field holding a value of another type (a payload made with
        ``model_construct``, or changed after it was made) raises ``TypeError`` naming the
        field."""
        extra = self.__pydantic_extra__
        try:
            return self.model_dump(
                mode="json",
                by_alias=True,
                exclude=set(extra) if extra else None,
                exclude_none=self.__exclude_none__,
                exclude_unset=self.__exclude_unset__,
                warnings="error",
            )
        except PydanticSerializationError as exc:
            raise TypeError(_serialization_problem(type(self).__name__, str(exc))) from None


_PAYLOADS: dict[str, type[Payload]] = {}
_UNEXPECTED = re.compile(
    r"Expected `([^`]+)`.*?\[field_name='([^']*)', input_value=(.*?), input_type="
)


def _serialization_problem(cls: str, message: str) -> str:
    """pydantic's serializer warning as ``Cls.field: expected int, not 'abc'``."""
    found = _UNEXPECTED.search(message)
    if found is None:
        return f"{cls}: {message.strip()}"
    expected, field, value = found.groups()
    return f"{cls}.{field}: expected {expected}, not {value[:60]}"


def registered_payloads() -> dict[str, type[Payload]]:
    """Every Payload class defined so far, by event name."""
    return dict(_PAYLOADS)


def _snake(name: str) -> str:
    base = name[: -len("Payload")] if name.endswith("Payload") and name != "Payload" else name
    out = []
    for i, ch in enumerate(base):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


# --- context ----------------------------------------------------------------------------------


def base_context(app: str, version: str) -> dict[str, Any]:
    """Context shared by every event of one process: app, os, runtime and library versions."""
    from waypost import __version__

    uname = platform.uname()
    return {
        "app": {"name": app, "version": version},
        "os": {"type": uname.system, "release": uname.release, "arch": uname.machine},
        "python": platform.python_version(),
        "waypost": __version__,
        **(
            {"implementation": sys.implementation.name}
            if sys.implementation.name != "cpython"
            else {}
        ),
    }
