"""waypost's loggers: one per module, under ``waypost``, and a ``NullHandler`` on ``waypost``
so that records go only where the application's logging configuration sends them (a library
adds no other handler). Every module that logs takes its logger from here, which installs the
handler before the first record; ``import waypost`` itself does not import :mod:`logging`."""

from __future__ import annotations

import logging

ROOT = "waypost"

logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``), a child of ``waypost``."""
    return logging.getLogger(name)
