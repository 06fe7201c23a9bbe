"""The WSGI bridge, served by a real WSGI server on 127.0.0.1 under a host app."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

REASON = "waypost.admin needs the admin extra: pip install 'waypost[admin]'"
pytest.importorskip("starlette", reason=REASON)
pytest.importorskip("jinja2", reason=REASON)

from waypost.admin import CSP, mount_wsgi, wsgi_app  # noqa: E402
from waypost.admin.wsgi import build_scope  # noqa: E402

try:
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the WSGI test talks HTTP through httpx2 or httpx")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def host_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the host app"]


def host_login(app: Any) -> Any:
    """Stands for the host's session middleware: it marks the environ of a signed-in admin."""

    def middleware(environ: dict[str, Any], start_response: Any) -> Any:
        if "host_session=admin-session-7f3a" in environ.get("HTTP_COOKIE", ""):
            environ["host.user"] = "admin"
        return app(environ, start_response)

    return middleware


def auth_from_environ(request: Any) -> bool:
    return request.scope["wsgi.environ"].get("host.user") == "admin"


@pytest.fixture
def served(admin_telemetry: Any) -> Iterator[tuple[str, Any]]:
    tel = admin_telemetry()
    admin = wsgi_app(tel, auth=auth_from_environ)
    app = host_login(mount_wsgi(host_app, "/admin/telemetry", admin))
    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", tel
    finally:
        server.shutdown()
        server.server_close()


def test_wsgi_mount_serves_pages_and_refuses_strangers(served):
    base, _tel = served
    with httpx.Client(base_url=base, follow_redirects=False) as client:
        assert client.get("/elsewhere").text == "the host app"
        refused = client.get("/admin/telemetry/")
        assert refused.status_code == 403 and refused.headers["content-security-policy"] == CSP
        client.cookies.set("host_session", "admin-session-7f3a")
        page = client.get("/admin/telemetry/")
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY"
        assert 'href="/admin/telemetry/admin.css"' in page.text
        assert (
            client.get("/admin/telemetry/admin.css").headers["content-type"].startswith("text/css")
        )
        data = client.get("/admin/telemetry/", params={"format": "json"}).json()
        assert data["enabled"] is True


def test_wsgi_post_with_csrf_changes_consent(served):
    base, tel = served
    with httpx.Client(base_url=base, follow_redirects=False) as client:
        client.cookies.set("host_session", "admin-session-7f3a")
        html = client.get("/admin/telemetry/consent").text
        token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html).group(1)
        bad = client.post(
            "/admin/telemetry/consent", data={"consent": "off", "csrf_token": "0" * 64}
        )
        assert bad.status_code == 403 and tel.enabled
        good = client.post("/admin/telemetry/consent", data={"consent": "off", "csrf_token": token})
        assert good.status_code == 303
        assert good.headers["location"] == "/admin/telemetry/consent?done=consent_off"
        assert not tel.enabled


def test_scope_from_environ_decodes_paths_and_headers():
    environ = {
        "REQUEST_METHOD": "post",
        "SCRIPT_NAME": "/admin",
        "PATH_INFO": "/caf\u00c3\u00a9",  # UTF-8 bytes of "café" as WSGI gives them (latin-1)
        "QUERY_STRING": "a=1",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": "",
        "HTTP_X_FORWARDED_FOR": "10.0.0.1",
        "SERVER_NAME": "example.org",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "https",
    }
    scope = build_scope(environ)
    assert scope["method"] == "POST" and scope["scheme"] == "https"
    assert scope["root_path"] == "/admin" and scope["path"] == "/admin/café"
    assert scope["query_string"] == b"a=1"
    assert (b"x-forwarded-for", b"10.0.0.1") in scope["headers"]
    assert (b"content-type", b"application/x-www-form-urlencoded") in scope["headers"]
    assert not any(name == b"content-length" for name, _ in scope["headers"])
    assert scope["wsgi.environ"] is environ
