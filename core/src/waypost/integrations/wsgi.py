"""Hooks for the WSGI servers that manage worker processes (Flask, Django or any WSGI app).

gunicorn ends its workers with ``sys.exit``, so waypost's ``atexit`` work runs there already;
the hook makes the moment explicit and runs it before gunicorn's own teardown. In
``gunicorn.conf.py``::

    from waypost.integrations.wsgi import worker_exit

uWSGI: ``import uwsgi; uwsgi.atexit = waypost.integrations.shutdown_all``.
"""

from __future__ import annotations

from typing import Any

from waypost.integrations import shutdown_all

__all__ = ["worker_exit"]


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``worker_exit`` server hook: deliver or store what the worker holds."""
    shutdown_all()
