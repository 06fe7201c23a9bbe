"""The admin's guard: the host's auth callback (default deny), security headers on every
response, and CSRF tokens for every state-changing request."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waypost.datadir import atomic_write
from waypost.logs import get_logger

log = get_logger("waypost.admin")

Auth = Callable[[Request], "bool | Awaitable[bool]"]

CSP = (
    "default-src 'none'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_REPLACED = {name for name, _ in SECURITY_HEADERS}

KEY_FILE = "admin-csrf.key"


def with_security_headers(send: Send) -> Send:
    """Wrap ``send`` so every response carries the security headers (ours win)."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [
                (k, v) for k, v in message.get("headers", []) if bytes(k).lower() not in _REPLACED
            ]
            message = {**message, "headers": [*headers, *SECURITY_HEADERS]}
        await send(message)

    return wrapped


class Guard:
    """ASGI middleware: security headers always; the request reaches the app only when the
    host's ``auth`` callback returns exactly ``True``. Without a callback everything is refused.

    A synchronous callback runs in a worker thread (it may query the host's database); an
    exception in it refuses the request and is logged.
    """

    def __init__(
        self,
        app: ASGIApp,
        auth: Auth | None,
        refuse: Callable[[Request, str], Response],
    ) -> None:
        self.app = app
        self.auth = auth
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        send = with_security_headers(send)
        request = Request(scope, receive)
        reason = await self._refusal(request)
        if reason is not None:
            await self.refuse(request, reason)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _refusal(self, request: Request) -> str | None:
        auth = self.auth
        if auth is None:
            return "this page has no auth callback configured, so it refuses every request"
        try:
            if inspect.iscoroutinefunction(auth) or inspect.iscoroutinefunction(
                getattr(auth, "__call__", None)  # noqa: B004
            ):
                result = await auth(request)  # type: ignore[misc]
            else:
                result = await run_in_threadpool(auth, request)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            log.error("waypost.admin: the auth callback failed: %s: %s", type(exc).__name__, exc)
            return "the auth callback failed"
        if result is not True:
            return "you are not allowed to see this page"
        return None


# --- CSRF -------------------------------------------------------------------------------------

_NONCE = re.compile(r"[A-Za-z0-9_-]{32,64}")


def load_key(secret: str | bytes | None, data_dir: Path | None) -> bytes:
    """The HMAC key for CSRF tokens: from ``secret`` if given; else a random key kept in the
    data dir (mode 0600), so that every worker process of the host agrees; else per process."""
    if secret is not None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(raw) < 16:
            raise ValueError("the admin secret must be at least 16 bytes long")
        return hashlib.sha256(b"waypost-admin-key\x00" + raw).digest()
    if data_dir is not None:
        path = Path(data_dir) / KEY_FILE
        try:
            return _read_or_create_key(path)
        except OSError as exc:
            log.warning(
                "waypost.admin: cannot keep the CSRF key in %s (%s); using a per-process key, "
                "so pass secret=... when the host runs several processes",
                path,
                exc,
            )
    return secrets.token_bytes(32)


def _read_or_create_key(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data[:32]
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # The first process to create it wins; the others read its key.
    atomic_write(path, secrets.token_bytes(32), mode=0o600, exclusive=True)
    data = path.read_bytes()
    if len(data) < 32:
        raise OSError(f"{path} is too short")
    return data[:32]


class Csrf:
    """Signed double-submit tokens.

    A random nonce lives in an ``HttpOnly; SameSite=Strict`` cookie; every form carries
    ``HMAC(key, nonce)``. A POST passes when the submitted token matches the cookie's nonce
    (``hmac.compare_digest``), and it is not announced as cross-site (``Sec-Fetch-Site``) or from
    another origin (``Origin``). A planted cookie is useless without the key.
    """

    COOKIE = "waypost_admin_csrf"
    FIELD = "csrf_token"
    HEADER = "x-csrf-token"

    def __init__(self, key: bytes) -> None:
        self._key = key

    def token(self, nonce: str) -> str:
        mac = hmac.new(self._key, b"waypost-admin-csrf\x00" + nonce.encode(), hashlib.sha256)
        return mac.hexdigest()

    def nonce(self, request: Request) -> tuple[str, bool]:
        """The session's nonce and whether it is new (then the response must set the cookie)."""
        value = request.cookies.get(self.COOKIE, "")
        if _NONCE.fullmatch(value):
            return value, False
        return secrets.token_urlsafe(32), True

    def set_cookie(self, response: Response, request: Request, nonce: str, path: str) -> None:
        response.set_cookie(
            self.COOKIE,
            nonce,
            path=path or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def refusal(self, request: Request, submitted: str | None) -> str | None:
        """None when the request may change state, else the reason it may not."""
        if request.headers.get("sec-fetch-site", "") == "cross-site":
            return "the request came from another site"
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = request.headers.get("host", "")
            if urlsplit(origin).netloc.lower() != host.lower():
                return "the request came from another origin"
        nonce = request.cookies.get(self.COOKIE, "")
        if not _NONCE.fullmatch(nonce):
            return "the CSRF cookie is missing: reload the page (cookies must be allowed)"
        if not submitted:
            return "the CSRF token is missing: reload the page and try again"
        expected = self.token(nonce)
        if not hmac.compare_digest(submitted.encode("utf-8", "replace"), expected.encode()):
            return "the CSRF token is invalid: reload the page and try again"
        return None
