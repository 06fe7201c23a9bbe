"""A small ASGI-to-WSGI bridge, so the admin app mounts in Flask, Django or any WSGI server.

The ASGI app runs on one event loop in a daemon thread per bridge; each WSGI request hands it
the request body in one message and waits for the whole response. That suits pages of modest
size (the admin's are), not streaming. After ``fork()`` a child builds its own loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

MAX_BODY = 1024 * 1024
"""Largest request body passed on (admin forms are a few hundred bytes)."""

_REASONS = {
    200: "OK", 303: "See Other", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 504: "Gateway Timeout",
}  # fmt: skip


class WsgiBridge:
    """Serve an ASGI app (HTTP only, no lifespan) as a WSGI application."""

    def __init__(self, app: ASGIApp, *, timeout: float = 60.0) -> None:
        self.app = app
        self.timeout = timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="waypost-admin-wsgi", daemon=True
                )
                thread.start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            start_response("413 Content Too Large", [("Content-Type", "text/plain")])
            return [b"request body too large\n"]
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        scope = build_scope(environ)
        future = asyncio.run_coroutine_threadsafe(self._call(scope, body), self._get_loop())
        try:
            status, headers, chunks = future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            start_response("504 Gateway Timeout", [("Content-Type", "text/plain")])
            return [b"the admin app did not answer in time\n"]
        reason = _REASONS.get(status, "Unknown")
        start_response(
            f"{status} {reason}",
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
        )
        return chunks

    async def _call(
        self, scope: dict[str, Any], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
        sent_body = False
        done = asyncio.Event()
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    done.set()

        try:
            await self.app(scope, receive, send)
        finally:
            done.set()
        return status, headers, chunks


def build_scope(environ: dict[str, Any]) -> dict[str, Any]:
    """The ASGI HTTP scope for a WSGI environ (``root_path`` is ``SCRIPT_NAME``).

    The WSGI ``environ`` itself is kept under ``scope["wsgi.environ"]`` so an auth callback can
    ask the host framework about the session (see docs/admin.md).
    """
    script_name = environ.get("SCRIPT_NAME", "")
    # WSGI gives paths as latin-1 decoded bytes; ASGI wants them decoded as UTF-8.
    script_bytes = script_name.encode("latin-1")
    path_bytes = environ.get("PATH_INFO", "").encode("latin-1")
    root_path = script_bytes.decode("utf-8", "replace")
    full = (script_bytes + path_bytes).decode("utf-8", "replace")
    headers: list[tuple[bytes, bytes]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if not value:
                continue
            name = key.replace("_", "-").lower()
        else:
            continue
        headers.append((name.encode("latin-1"), str(value).encode("latin-1")))
    server_port = int(environ.get("SERVER_PORT") or 0)
    client = None
    if environ.get("REMOTE_ADDR"):
        client = (environ["REMOTE_ADDR"], int(environ.get("REMOTE_PORT") or 0))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": environ.get("SERVER_PROTOCOL", "HTTP/1.1").split("/", 1)[-1],
        "method": environ.get("REQUEST_METHOD", "GET").upper(),
        "scheme": environ.get("wsgi.url_scheme", "http"),
        "path": full,
        "raw_path": script_bytes + path_bytes,
        "root_path": root_path,
        "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
        "headers": headers,
        "client": client,
        "server": (environ.get("SERVER_NAME", "localhost"), server_port),
        "state": {},
        "wsgi.environ": environ,
    }


def mount_wsgi(host: WSGIApp, path: str, admin: WSGIApp) -> WSGIApp:
    """A WSGI app that sends requests under ``path`` to ``admin`` and all others to ``host``.

    ``SCRIPT_NAME`` and ``PATH_INFO`` are adjusted the way a mount should (werkzeug's
    ``DispatcherMiddleware`` does the same for Flask).
    """
    mount = "/" + path.strip("/")

    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path_info = environ.get("PATH_INFO", "")
        if path_info == mount or path_info.startswith(mount + "/"):
            environ = {
                **environ,
                "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + mount,
                "PATH_INFO": path_info[len(mount) :],
            }
            return admin(environ, start_response)
        return host(environ, start_response)

    return dispatch
