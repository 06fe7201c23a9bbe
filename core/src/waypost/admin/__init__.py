"""``waypost.admin``: the telemetry administration pages (status, consent, records, what is
collected, submit and delete) for any Python web app, as an ASGI app or a WSGI app.

    from waypost.admin import create_app
    app.mount("/admin/telemetry", create_app(tel, auth=is_admin))

Needs the ``admin`` extra: ``pip install 'waypost[admin]'``. See docs/admin.md.
"""

from __future__ import annotations

from waypost.admin.app import create_app, wsgi_app
from waypost.admin.security import CSP
from waypost.admin.wsgi import WsgiBridge, mount_wsgi

__all__ = ["CSP", "WsgiBridge", "create_app", "mount_wsgi", "wsgi_app"]
