"""The files that docs/writing-a-plugin.md spells out, for the tests that build its plugin."""

from __future__ import annotations

import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "writing-a-plugin.md"


def guide_files() -> dict[str, str]:
    """The guide's files, each marked ``<!-- file: PATH -->`` before its code block."""
    text = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)\n```\n", text, re.DOTALL)
    return {path: body + "\n" for path, body in blocks}
