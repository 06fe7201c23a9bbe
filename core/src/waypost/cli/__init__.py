"""The ``waypost`` command: ``waypost [--config FILE] COMMAND``; every command takes ``--json``.

Exit codes: 0 done, 1 the action did not complete (e.g. a flush left events pending), 2 bad
usage or configuration. Plugins add commands through the ``register_commands`` hook (see
``docs/plugins.md``).
"""

from __future__ import annotations

from waypost.cli import commands as _commands  # noqa: F401  (registers the commands)
from waypost.cli.app import Ctx, Failure, cli

__all__ = ["Ctx", "Failure", "cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="waypost")
