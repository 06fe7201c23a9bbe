"""Reading a config file within limits: its size, its encoding, how deep it nests and how many
values it holds once YAML's aliases are expanded. A hostile file (an alias bomb, 20,000 nested
brackets, Latin-1 or binary bytes) is a :class:`waypost.ConfigError` naming the file, the place
and the limit, in bounded time."""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from waypost.config.values import Text, plain
from waypost.errors import ConfigError
from waypost.events import utf8

MAX_BYTES = 256 * 1024
"""The largest config file read (a real one is a few kilobytes)."""
MAX_DEPTH = 32
"""The deepest nesting of mappings and lists."""
MAX_VALUES = 5_000
"""The most values a file may hold, each alias counted as the values it repeats."""


def read_file(path: str | os.PathLike[str], *, marked: bool = False) -> dict[str, Any]:
    """Parse a YAML or TOML file into a dict (the ``telemetry:`` root is not removed).

    With ``marked``, YAML plain scalars that YAML 1.1 reads as booleans or numbers come back as
    :class:`~waypost.config.values.Text` (their text, with that reading), for
    :func:`~waypost.config.values.conform` to resolve by the field they land in.
    """
    path = Path(path)
    source = str(path)
    raw = _read_bytes(path, source)
    toml = path.suffix.lower() == ".toml"
    text = _decode(raw, source, toml=toml)
    data = _parse_toml(text, source) if toml else _parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping with a 'telemetry' key", source=source)
    check_shape(data, source)
    return data if marked else plain(data)


def _read_bytes(path: Path, source: str) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a file", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=source) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            f"larger than {MAX_BYTES // 1024} KiB, the limit for a config file", source=source
        )
    return raw


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _decode(raw: bytes, source: str, *, toml: bool) -> str:
    encoding = "utf-8"
    for bom, name in _BOMS:
        if raw.startswith(bom):
            encoding = name
            break
    if toml and encoding not in ("utf-8", "utf-8-sig"):
        raise ConfigError("TOML must be UTF-8 (this file is UTF-16 or UTF-32)", source=source)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line, column = _position(raw, exc.start)
        raise ConfigError(
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line}, column {column} "
            "(save the file as UTF-8)",
            source=source,
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        line, column = _position(text, nul)
        raise ConfigError(
            f"binary data, not text: a NUL character at line {line}, column {column}",
            source=source,
        )
    return text


def _position(data: bytes | str, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset``."""
    newline = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    start = data.rfind(newline, 0, offset) + 1  # type: ignore[arg-type]
    return line, offset - start + 1


def check_shape(data: Any, source: str | None, root: str = "") -> None:
    """Refuse data nested deeper than :data:`MAX_DEPTH` or holding more than :data:`MAX_VALUES`
    values (a mapping given in code, a parsed file), naming the key path where it went over."""
    count = 0
    stack: list[tuple[Any, str, int]] = [(data, root, 0)]
    while stack:
        value, where, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(
                f"more than {MAX_VALUES:,} values (the limit)", source=source, key=where or None
            )
        if isinstance(value, str) and not value.isascii():
            try:
                utf8(value)
            except ValueError as exc:
                raise ConfigError(str(exc), source=source, key=where or None) from None
        elif isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise ConfigError(
                    f"nested deeper than {MAX_DEPTH} levels (the limit)",
                    source=source,
                    key=where or None,
                )
            if isinstance(value, dict):
                items: Iterator[tuple[str, Any]] = (
                    (f"{where}.{k}" if where else str(k), v) for k, v in value.items()
                )
                stack.extend((k, where or "", depth + 1) for k in value if isinstance(k, str))
            else:
                items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
            stack.extend((v, w, depth + 1) for w, v in items)


# --- TOML -------------------------------------------------------------------------------------


def _parse_toml(text: str, source: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    too_deep = _toml_too_deep(text)
    if too_deep is not None:
        line, column = _position(text, too_deep)
        raise ConfigError(
            f"nested deeper than {MAX_DEPTH} levels at line {line}, column {column} (the limit)",
            source=source,
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from None
    except RecursionError:  # not reached after the scan above; kept as the parser's backstop
        raise ConfigError(f"nested deeper than {MAX_DEPTH} levels", source=source) from None


_TOML_TOKEN = re.compile(r"\"\"\"|'''|[\"'#\[\]{}]")
_TOML_END = {
    '"""': re.compile(r'(?:[^"\\]|\\.|"(?!""))*"""', re.S),
    "'''": re.compile(r"(?:[^']|'(?!''))*'''", re.S),
    '"': re.compile(r'(?:[^"\\\n]|\\.)*"'),
    "'": re.compile(r"[^'\n]*'"),
    "#": re.compile(r"[^\n]*"),
}


def _toml_too_deep(text: str) -> int | None:
    """The offset where brackets and braces (outside strings and comments) nest deeper than
    :data:`MAX_DEPTH`, or None. ``tomllib`` recurses once per level."""
    depth = pos = 0
    while True:
        match = _TOML_TOKEN.search(text, pos)
        if match is None:
            return None
        found, pos = match.group(), match.end()
        if found in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return match.start()
        elif found in "]}":
            depth = max(0, depth - 1)
        else:  # a string or a comment: skip to its end (an unterminated one is tomllib's)
            end = _TOML_END[found].match(text, pos)
            if end is None:
                return None
            pos = end.end()


# --- YAML -------------------------------------------------------------------------------------


def _parse_yaml(text: str, source: str) -> Any:
    import yaml

    loader = _loader_class()(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {_yaml_problem(exc)}", source=source) from None
    except _TooBig as exc:
        raise ConfigError(
            f"{exc.what} at line {exc.mark.line + 1}, column {exc.mark.column + 1} (the limit)",
            source=source,
        ) from None
    finally:
        loader.dispose()


def _yaml_problem(exc: Exception) -> str:
    """What is wrong and where (line and column), never the text of the line: PyYAML's own
    message quotes it, and the line may hold a secret."""
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    context = getattr(exc, "context", None)
    text = f"{problem}{_at(getattr(exc, 'problem_mark', None))}"
    if context:
        text += f" ({context}{_at(getattr(exc, 'context_mark', None))})"
    return text


def _at(mark: Any) -> str:
    line, column = getattr(mark, "line", None), getattr(mark, "column", None)
    if not (isinstance(line, int) and isinstance(column, int)):
        return ""
    return f" at line {line + 1}, column {column + 1}"


class _TooBig(Exception):
    def __init__(self, what: str, mark: Any) -> None:
        self.what, self.mark = what, mark


_LOADER: Any = None


def _loader_class() -> Any:
    """``yaml.SafeLoader`` with the limits, and plain booleans and numbers marked (made once:
    PyYAML is imported only when a YAML file is read)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    class Loader(yaml.SafeLoader):
        _depth = _nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            # The composer recurses once per level: stop before Python's own limit does, and
            # stop a long file at the limit rather than after reading all of it.
            self._depth += 1
            self._nodes += 1
            try:
                if self._depth > MAX_DEPTH + 1:
                    raise _TooBig(f"nested deeper than {MAX_DEPTH} levels", self._mark())
                if self._nodes > MAX_VALUES:
                    raise _TooBig(f"more than {MAX_VALUES:,} values", self._mark())
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def _mark(self) -> Any:
            return self.peek_event().start_mark  # type: ignore[no-untyped-call]

        def get_single_node(self) -> Any:
            node = super().get_single_node()
            if node is not None:
                _count_nodes(node)
            return node

    def marked(construct: Any) -> Any:
        def make(loader: Any, node: Any) -> Any:
            value = construct(loader, node)
            # Only plain scalars: a quoted "0123" is text whatever its tag.
            return Text(node.value, value) if node.style is None else value

        return make

    for tag, construct in (
        ("bool", yaml.SafeLoader.construct_yaml_bool),
        ("int", yaml.SafeLoader.construct_yaml_int),
        ("float", yaml.SafeLoader.construct_yaml_float),
    ):
        Loader.add_constructor(f"tag:yaml.org,2002:{tag}", marked(construct))

    def text(loader: Any, node: Any) -> Any:
        value = loader.construct_scalar(node)
        if not value.isascii() and _SURROGATE.search(value):
            # JSON writes a character past U+FFFF as two escapes (\ud83d\ude00); YAML reads
            # each as a character of its own: make them the character they stand for.
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
        return value

    Loader.add_constructor("tag:yaml.org,2002:str", text)
    # Dates stay text: no field takes a date, and 2024-01-01 is a fine version string.
    Loader.add_constructor("tag:yaml.org,2002:timestamp", text)
    _LOADER = Loader
    return Loader


_SURROGATE = re.compile("[\ud800-\udfff]")


def _count_nodes(root: Any) -> None:
    """Walk the node graph as construction would, each alias as often as it is used: more
    than :data:`MAX_VALUES` nodes (an alias bomb) or a cycle (a recursive alias) is refused
    before anything is built."""
    count = 0
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise _TooBig(
                f"more than {MAX_VALUES:,} values once aliases are expanded", node.start_mark
            )
        children = node.value if isinstance(node.value, list) else ()
        if children:
            if depth >= MAX_DEPTH:
                raise _TooBig(
                    f"nested deeper than {MAX_DEPTH} levels (a recursive alias?)", node.start_mark
                )
            for child in children:
                if isinstance(child, tuple):  # a mapping's (key, value) pair
                    stack.append((child[0], depth + 1))
                    stack.append((child[1], depth + 1))
                else:
                    stack.append((child, depth + 1))
