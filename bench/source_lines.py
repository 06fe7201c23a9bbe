"""Lines of code of the HTTP plugins' sources, as issue 16 measures them: non-blank lines that
are not only a comment; docstrings and other strings count as code.

    uv run python bench/source_lines.py            # the six plugins the issue counted
    uv run python bench/source_lines.py --files    # and each file's count
    uv run python bench/source_lines.py plugins/http/src

A line counts if a token other than a comment or a line break stands on it (a string spanning
lines counts on each of its non-blank lines).
"""

from __future__ import annotations

import argparse
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTTP_PLUGINS = ("posthog", "mixpanel", "amplitude", "ga4", "plausible", "warehouse")
_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def code_lines(source: str) -> int:
    """The non-blank, non-comment lines of ``source``."""
    lines = source.splitlines()
    counted: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in _NOT_CODE:
            continue
        for row in range(token.start[0], token.end[0] + 1):
            if row <= len(lines) and lines[row - 1].strip():
                counted.add(row)
    return len(counted)


def files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="default: the six HTTP plugins' src")
    parser.add_argument("--files", action="store_true", help="print each file's count")
    args = parser.parse_args(argv)
    paths = args.paths or [ROOT / "plugins" / name / "src" for name in HTTP_PLUGINS]
    total = 0
    for path in files(paths):
        count = code_lines(path.read_text(encoding="utf-8"))
        total += count
        if args.files:
            print(f"{count:6} {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"{total:6} total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
