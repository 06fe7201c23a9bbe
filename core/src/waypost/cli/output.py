"""Output for a person: rich's colours, tables and progress bar where rich is installed
(``pip install 'waypost[cli]'``), plain aligned text where it is not. ``--json`` output does not
pass through here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import click

Part = str | tuple[str, str]
"""Text, or (text, style) where a style is a rich style name (``bold``, ``green``)."""


def _rich_console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(highlight=False, soft_wrap=True)


class Output:
    """Lines, rules and tables on standard output; data is never read as markup."""

    def __init__(self, *, plain: bool = False) -> None:
        self._rich = None if plain else _rich_console()

    @property
    def rich(self) -> bool:
        return self._rich is not None

    def print(self, *parts: Part) -> None:
        """One line of text parts; a (text, style) part is styled when rich is there."""
        if self._rich is None:
            click.echo("".join(p if isinstance(p, str) else p[0] for p in parts))
            return
        from rich.text import Text

        line = Text()
        for part in parts:
            if isinstance(part, str):
                line.append(part)
            else:
                line.append(part[0], style=part[1])
        self._rich.print(line)

    def rule(self, title: str) -> None:
        """A heading across the width."""
        if self._rich is None:
            click.echo(f"== {title} ==")
            return
        from rich.text import Text

        self._rich.rule(Text(title, style="bold"))

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[str]],
        *,
        title: str | None = None,
    ) -> None:
        """A table: rich's, or columns aligned with spaces under a title line."""
        rows = [list(r) for r in rows]
        if self._rich is not None:
            from rich.table import Table
            from rich.text import Text

            table = Table(*columns, title=title)
            for row in rows:
                table.add_row(*(Text(cell) for cell in row))
            self._rich.print(table)
            return
        for line in plain_table(columns, rows, title=title):
            click.echo(line)

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar while the block runs; yields ``update(completed)``. Plain text has
        none (the block's result says what was done)."""
        if self._rich is None:
            yield lambda completed: None
            return
        from rich.progress import Progress

        with Progress(console=self._rich, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda completed: bar.update(task, completed=completed)


def plain_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None
) -> list[str]:
    """Lines of a table in plain text: a header, a rule of dashes, and the rows, each column
    as wide as its widest cell (the last column is not padded)."""
    cells = [[_one_line(c) for c in columns], *[[_one_line(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells[1:]]
    return out


def _one_line(text: str) -> str:
    return str(text).replace("\r", " ").replace("\n", " ").replace("\t", " ")
