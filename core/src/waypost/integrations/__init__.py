"""One-line hooks that tell waypost when its host stops, for servers and task queues that end
their processes without running ``atexit`` (see docs/servers.md).

- ASGI (FastAPI, Starlette, Django's ASGI app, any ASGI server): :class:`asgi.Lifespan`.
- gunicorn and uWSGI (Flask, Django, any WSGI app): :func:`wsgi.worker_exit`.
- Celery: :func:`celery.connect`.
"""

from __future__ import annotations

__all__ = ["shutdown_all"]


def shutdown_all(timeout: float | None = None) -> bool:
    """Shut down every running ``Telemetry`` of this process: deliver what it holds, or store
    it for the next run, within ``timeout`` seconds each (default: its ``shutdown_timeout``).
    True when nothing is left only in memory."""
    from waypost.processes import installed

    ok = True
    for hooks in installed():  # one for each running instance
        ok = hooks.shutdown(timeout) and ok
    return ok
