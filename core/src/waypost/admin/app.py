"""The Starlette app: routes, content negotiation (HTML or JSON) and the actions."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from waypost.admin import pages
from waypost.admin.security import Auth, Csrf, Guard, load_key
from waypost.admin.wsgi import WsgiBridge
from waypost.logs import get_logger
from waypost.privacy import secrets

if TYPE_CHECKING:
    from waypost.telemetry import Telemetry

log = get_logger("waypost.admin")

NAV = (
    ("status", "Status", "/"),
    ("consent", "Consent", "/consent"),
    ("records", "Records", "/records"),
    ("manifest", "What is collected", "/manifest"),
    ("actions", "Actions", "/actions"),
)
HEADINGS = {key: label for key, label, _ in NAV}

# Fixed texts for Post/Redirect/Get: the query names one, nothing the client sends is echoed.
DONE = {
    "consent_on": "Telemetry is now on: the administrator's choice is stored.",
    "consent_off": "Telemetry is now off: the administrator's choice is stored.",
    "consent_kept": "The choice is stored, but a higher rule still decides (see below).",
    "flushed": "Submitted: {d} event(s) delivered; every pending record was delivered.",
    "flush_partial": (
        "Submitted: {d} event(s) delivered, but {n} event(s) are still pending (a destination "
        "is down, slow or backing off; why is listed below); they stay in the outbox and are "
        "retried."
    ),
    "flush_unfinished": (
        "Not finished in time: {d} event(s) delivered, but some events are still only in "
        "memory, or were lost (a destination or the outbox is stuck; why is listed below), "
        "and {n} event(s) are pending in the outbox."
    ),
    "purged_all": "Deleted {n} record(s).",
    "purged_sent": "Deleted {n} submitted record(s).",
}
_NOT_DONE = frozenset({"flush_unfinished"})
"""Outcomes shown as an alert: something the operator asked for did not happen."""
MAX_PER_PAGE = 200


class AdminApp(Starlette):
    """The admin app; the guard (auth and security headers) wraps the whole middleware stack,
    error pages included."""

    guard_auth: Auth | None = None
    guard_refuse: Any = None

    def build_middleware_stack(self) -> ASGIApp:
        return Guard(super().build_middleware_stack(), self.guard_auth, self.guard_refuse)


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("waypost.admin", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pretty"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False)
    env.filters["when"] = _when
    return env


def _when(value: str | None) -> str:
    """An ISO 8601 time, to the second, in UTC, for people."""
    if not value:
        return "never"
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        number = int(value) if value is not None else default
    except ValueError:
        number = default
    return max(low, min(high, number))


def wants_json(request: Request) -> bool:
    fmt = request.query_params.get("format")
    if fmt:
        return fmt == "json"
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


class Admin:
    def __init__(
        self,
        telemetry: Telemetry,
        *,
        prefix: str,
        csrf: Csrf,
        login_url: str | None,
        flush_timeout: float,
        per_page: int,
    ) -> None:
        self.tel = telemetry
        self.prefix = prefix
        self.csrf = csrf
        self.login_url = login_url
        self.flush_timeout = flush_timeout
        self.per_page = per_page
        self.outbox = pages.OutboxAccess(telemetry)
        self.templates = _environment()
        self.stylesheet = resources.files("waypost.admin").joinpath("static/admin.css").read_bytes()

    # --- rendering --------------------------------------------------------------------------

    def base(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")) + self.prefix

    def render(
        self,
        request: Request,
        page: str,
        data: dict[str, Any],
        *,
        status_code: int = 200,
        message: dict[str, str] | None = None,
    ) -> Response:
        nonce, new = self.csrf.nonce(request)
        token = self.csrf.token(nonce)
        response: Response
        if wants_json(request):
            body = {**data, "csrf_token": token}
            if message is not None:
                body["message"] = message
            response = JSONResponse(body, status_code=status_code)
        else:
            base = self.base(request)
            query = {k: v for k, v in request.query_params.items() if k not in ("format", "done")}
            html = self.templates.get_template(f"{page}.html").render(
                data=data,
                page=page,
                heading=HEADINGS.get(page, "Telemetry"),
                app=self.tel.app,
                base=base,
                nav=[(key, label, base + path) for key, label, path in NAV],
                csrf_field=Csrf.FIELD,
                csrf_token=token,
                message=message,
                json_url=request.url.path + "?" + urlencode({**query, "format": "json"}),
            )
            response = HTMLResponse(html, status_code=status_code)
        if new:
            self.csrf.set_cookie(response, request, nonce, self.base(request))
        return response

    def done_message(self, request: Request) -> dict[str, str] | None:
        key = request.query_params.get("done", "")
        text = DONE.get(key)
        if text is None:
            return None
        n = _int(request.query_params.get("n"), 0, 0, 10**12)
        d = _int(request.query_params.get("d"), 0, 0, 10**12)
        kind = "error" if key in _NOT_DONE else "ok"
        return {"kind": kind, "text": text.format(n=n, d=d)}

    def refuse(self, request: Request, reason: str) -> Response:
        """The answer to a request the auth callback did not allow."""
        if wants_json(request):
            return JSONResponse({"error": "forbidden", "reason": reason}, status_code=403)
        if self.login_url and request.method == "GET":
            return RedirectResponse(self.login_url, status_code=303)
        html = self.templates.get_template("refused.html").render(reason=reason)
        return HTMLResponse(html, status_code=403)

    def problem(self, request: Request, status_code: int, text: str) -> Response:
        if wants_json(request):
            return JSONResponse({"error": text}, status_code=status_code)
        return self.render(
            request, "problem", {"error": text}, status_code=status_code,
            message={"kind": "error", "text": text},
        )  # fmt: skip

    def done(
        self, request: Request, path: str, key: str, result: dict[str, Any], *, ok: bool = True
    ) -> Response:
        """The answer to an action: a redirect to ``path`` saying ``key``, or JSON whose ``ok``
        says whether it did everything asked (a partial submit is not ok)."""
        if wants_json(request):
            return JSONResponse({"ok": ok, "done": key, **result})
        query = {"done": key}
        for name in ("n", "d"):  # numbers only: nothing else of the result is put in the URL
            if name in result:
                query[name] = str(result[name])
        return RedirectResponse(f"{self.base(request)}{path}?{urlencode(query)}", status_code=303)

    async def checked_form(self, request: Request) -> FormData | Response:
        """The POSTed form, or the refusal when the CSRF check fails."""
        try:
            form = await request.form(max_files=0, max_fields=20)
        except Exception:
            return self.problem(request, 400, "the form could not be read")
        field = form.get(Csrf.FIELD)
        submitted = field if isinstance(field, str) else request.headers.get(Csrf.HEADER)
        refusal = self.csrf.refusal(request, submitted)
        if refusal is not None:
            return self.problem(request, 403, refusal)
        return form

    # --- pages ------------------------------------------------------------------------------

    async def stylesheet_route(self, request: Request) -> Response:
        return Response(self.stylesheet, media_type="text/css")

    async def index_redirect(self, request: Request) -> Response:
        return RedirectResponse(self.base(request) + "/", status_code=307)

    async def status_page(self, request: Request) -> Response:
        data = await run_in_threadpool(pages.status_data, self.tel)
        return self.render(request, "status", data, message=self.done_message(request))

    async def consent_page(self, request: Request) -> Response:
        data = await run_in_threadpool(pages.consent_data, self.tel)
        return self.render(request, "consent", data, message=self.done_message(request))

    async def consent_post(self, request: Request) -> Response:
        form = await self.checked_form(request)
        if isinstance(form, Response):
            return form
        choice = form.get("consent")
        if choice not in ("on", "off"):
            return self.problem(request, 400, "choose on or off")
        if pages.is_override(self.tel.decision.rule):
            data = await run_in_threadpool(pages.consent_data, self.tel)
            text = (
                f"The choice was not changed: {data['reason']}, which overrides the stored "
                f"choice. {data['override']}"
            )
            if wants_json(request):
                return JSONResponse({"error": text, **data}, status_code=409)
            return self.render(
                request, "consent", data, status_code=409, message={"kind": "error", "text": text}
            )
        decision = await run_in_threadpool(self.tel.set_consent, choice == "on")
        if pages.is_override(decision.rule) or decision.enabled != (choice == "on"):
            key = "consent_kept"
        else:
            key = "consent_on" if decision.enabled else "consent_off"
        return self.done(
            request,
            "/consent",
            key,
            {"enabled": decision.enabled, "rule": decision.rule, "reason": decision.reason},
        )

    async def records_page(self, request: Request) -> Response:
        q = request.query_params
        state = q.get("state") or None
        if state is not None and state not in pages.STATES:
            return self.problem(request, 400, "state must be pending, sent or failed")
        per_page = _int(q.get("per_page"), self.per_page, 1, MAX_PER_PAGE)
        data = await run_in_threadpool(
            pages.records_data,
            self.tel,
            self.outbox.get(),
            sink=q.get("sink") or None,
            state=state,
            name=q.get("name") or None,
            page=_int(q.get("page"), 1, 1, 10**9),
            per_page=per_page,
        )
        return self.render(request, "records", data)

    async def manifest_page(self, request: Request) -> Response:
        data = await run_in_threadpool(pages.manifest_data, self.tel)
        return self.render(request, "manifest", data)

    async def actions_page(self, request: Request) -> Response:
        data = await run_in_threadpool(pages.actions_data, self.tel, self.outbox.get())
        return self.render(request, "actions", data, message=self.done_message(request))

    async def flush_post(self, request: Request) -> Response:
        form = await self.checked_form(request)
        if isinstance(form, Response):
            return form
        if not self.tel.enabled:
            return self.problem(
                request, 409, "telemetry is off, so nothing is submitted; turn it on first"
            )
        flushed, result = await run_in_threadpool(self._flush)
        if not flushed:
            return self.done(request, "/actions", "flush_unfinished", result, ok=False)
        if result["n"]:
            return self.done(request, "/actions", "flush_partial", result, ok=False)
        return self.done(request, "/actions", "flushed", result)

    def _flush(self) -> tuple[bool, dict[str, Any]]:
        """What ``flush`` achieved: whether nothing is left only in memory or lost, and how
        many events were delivered (``d``), how many the outbox still holds (``n``) and why
        (``pending``, by sink)."""
        outbox = self.outbox.get()
        before = self.tel.status().counters.delivered
        flushed = bool(self.tel.flush(self.flush_timeout, force=True))
        st = self.tel.status()
        result: dict[str, Any] = {
            "n": st.outbox_pending_events,
            "d": max(0, st.counters.delivered - before),
            "pending": pages.pending_why(st),
        }
        try:
            result["n"] = int(outbox.pending_events()) if outbox is not None else 0
        except Exception:  # the outbox cannot be read: its trouble is on the status page
            return False, result
        return flushed, result

    async def purge_post(self, request: Request) -> Response:
        form = await self.checked_form(request)
        if isinstance(form, Response):
            return form
        what = form.get("what")
        if what not in ("all", "sent"):
            return self.problem(request, 400, "choose what to delete: all or sent")
        if what == "all" and form.get("confirm") != "yes":
            return self.problem(request, 400, "tick the box to confirm deleting every record")
        outbox = self.outbox.get()
        n = 0
        if outbox is not None:
            n = await run_in_threadpool(outbox.purge, sent_only=what == "sent")
        return self.done(request, "/actions", f"purged_{what}", {"n": n})


def create_app(
    telemetry: Telemetry,
    *,
    auth: Auth | None = None,
    prefix: str = "",
    secret: str | bytes | None = None,
    login_url: str | None = None,
    flush_timeout: float = 10.0,
    per_page: int = 50,
) -> Starlette:
    """The telemetry admin pages for ``telemetry`` (a :class:`waypost.Telemetry`), as an ASGI app.

    ``auth(request)`` must return ``True`` (or an awaitable of it) for a request to reach any
    page; without it every request is refused. ``prefix`` is a path inside this app under which
    the pages live (leave it empty when the host mounts the app at a path). ``secret`` keys the
    CSRF tokens (default: a key kept in the telemetry's data dir). ``login_url``: where a refused
    browser is sent instead of a 403 page.
    """
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    secrets.guard_loggers()  # the admin's own logger is made with this module
    if auth is None:
        log.warning(
            "waypost.admin: no auth callback was given, so every request is refused; "
            "pass auth=... (see docs/admin.md)"
        )
    key = load_key(secret, telemetry.data_dir)
    admin = Admin(
        telemetry,
        prefix=prefix,
        csrf=Csrf(key),
        login_url=login_url,
        flush_timeout=flush_timeout,
        per_page=max(1, min(MAX_PER_PAGE, per_page)),
    )
    p = prefix
    routes = [
        Route(p + "/", admin.status_page, methods=["GET"]),
        Route(p + "/admin.css", admin.stylesheet_route, methods=["GET"]),
        Route(p + "/consent", admin.consent_page, methods=["GET"]),
        Route(p + "/consent", admin.consent_post, methods=["POST"]),
        Route(p + "/records", admin.records_page, methods=["GET"]),
        Route(p + "/manifest", admin.manifest_page, methods=["GET"]),
        Route(p + "/actions", admin.actions_page, methods=["GET"]),
        Route(p + "/actions/flush", admin.flush_post, methods=["POST"]),
        Route(p + "/actions/purge", admin.purge_post, methods=["POST"]),
    ]
    if p:
        routes.append(Route(p, admin.index_redirect, methods=["GET"]))
    app = AdminApp(routes=routes)
    app.guard_auth = auth
    app.guard_refuse = admin.refuse
    app.state.admin = admin
    return app


def wsgi_app(telemetry: Telemetry, **kwargs: Any) -> Any:
    """The same pages as a WSGI application (Flask, Django); takes :func:`create_app`'s
    arguments."""
    return WsgiBridge(create_app(telemetry, **kwargs))
