"""waypost's loggers: one per module, under ``waypost``, and a ``NullHandler`` on ``waypost``
so that records go only where the application's logging configuration sends them (a library
adds no other handler). Every module that logs takes its logger from here, which installs the
handler before the first record and gives the logger the filter that passes each record through
:func:`waypost.privacy.sanitise` (no configured secret in any line); ``import waypost`` itself
does not import :mod:`logging`."""

from __future__ import annotations

import logging

ROOT = "waypost"

logging.getLogger(ROOT).addHandler(logging.NullHandler())


class _Sanitising(logging.Filter):
    """Passes each record through :func:`waypost.privacy.secrets.sanitise_record`: a filter
    applies to the records of its own logger only, so every logger gets this one."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Imported here: the sanitiser needs pydantic, which the first log line may not.
        from waypost.privacy.secrets import sanitise_record

        return sanitise_record(record)


SANITISING = _Sanitising()


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``), a child of ``waypost``, sanitising."""
    logger = logging.getLogger(name)
    if SANITISING not in logger.filters:
        logger.addFilter(SANITISING)
    return logger
