"""Celery: its prefork pool ends child processes with ``os._exit`` (billiard), so ``atexit``
never runs in them. One line where the app is made::

    waypost.integrations.celery.connect()

Each worker process then delivers or stores what it holds when it shuts down.
"""

from __future__ import annotations

from typing import Any

from waypost.integrations import shutdown_all

__all__ = ["connect"]


def _shutdown(*args: Any, **kwargs: Any) -> None:
    shutdown_all()


def connect() -> None:
    """Shut waypost down at Celery's ``worker_process_shutdown`` (each pool process) and
    ``worker_shutdown`` (the main worker process)."""
    from celery import signals

    signals.worker_process_shutdown.connect(_shutdown, weak=False)
    signals.worker_shutdown.connect(_shutdown, weak=False)
