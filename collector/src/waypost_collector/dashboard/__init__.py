"""``/dashboard/``: what the fleet does, for the maintainer. Guarded exactly as the core's admin
pages are (``waypost.admin.security.Guard``: default deny, the same Content-Security-Policy and
security headers on every answer, error pages included); the check is HTTP Basic against
``collector.dashboard`` unless the host passes its own ``auth`` callback."""

from __future__ import annotations

import asyncio
import base64
import hmac
import threading
import time
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from waypost.admin.security import Auth, Guard
from waypost_collector.config import DashboardConfig
from waypost_collector.dashboard.charts import CHARTS, chart_data, to_svg
from waypost_collector.ledger import ACCEPTED, DUPLICATE, REFUSED, RETRY
from waypost_collector.storage import Store, open_store

if TYPE_CHECKING:
    from waypost_collector.intake import Collector

CACHE_SECONDS = 15.0
REALM = 'Basic realm="waypost collector", charset="UTF-8"'


def basic_auth(config: DashboardConfig) -> Auth | None:
    """The HTTP Basic check of ``collector.dashboard``; None (refuse everyone) without a
    password."""
    if config.password is None:
        return None
    user = config.username.encode()
    password = config.password.get_secret_value().encode()

    async def check(request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given_user, _, given_password = base64.b64decode(
                value.strip(), validate=True
            ).partition(b":")
        except ValueError:
            return False
        # Both compared, always: the time taken tells nothing about which was wrong.
        ok_user = hmac.compare_digest(given_user, user)
        ok_password = hmac.compare_digest(given_password, password)
        return ok_user and ok_password

    return check


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return request.url.path.endswith(".json") or (
        "application/json" in accept and "text/html" not in accept
    )


class DashboardApp(Starlette):
    """The guard wraps the whole stack, error pages included (as the admin app's does)."""

    guard_auth: Auth | None = None
    guard_refuse: Any = None

    def build_middleware_stack(self) -> ASGIApp:
        return Guard(super().build_middleware_stack(), self.guard_auth, self.guard_refuse)


class Dashboard:
    def __init__(self, collector: Collector, *, basic: bool) -> None:
        self.c = collector
        self.basic = basic
        self.templates = Environment(
            loader=PackageLoader("waypost_collector.dashboard", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
        )
        from importlib import resources

        self.css = (
            resources.files("waypost_collector.dashboard")
            .joinpath("static/dashboard.css")
            .read_bytes()
        )
        self._store: Store | None = None
        self._store_made = False
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def store(self) -> Store | None:
        """The first storage sink the charts can read (the embedded default when there is)."""
        with self._lock:
            if not self._store_made:
                self._store_made = True
                for sink in self.c.sinks.values():
                    self._store = open_store(sink)
                    if self._store is not None:
                        break
            return self._store

    def data(self, chart: str, app: str) -> dict[str, Any]:
        key = (chart, app)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        try:
            data = chart_data(chart, app=app, store=self.store(), ledger=self.c.ledger)
        except Exception as exc:  # a storage that cannot answer: say so in the chart
            data = {
                "chart": chart,
                "title": CHARTS[chart],
                "app": app,
                "kind": "none",
                "note": f"the storage did not answer: {type(exc).__name__}",
            }
        self._cache[key] = (now, data)
        return data

    def _app_of(self, request: Request) -> str | None:
        app = request.query_params.get("app") or next(iter(self.c.apps))
        return app if app in self.c.apps else None

    def base(self, request: Request) -> str:
        return str(request.scope.get("root_path", ""))

    # --- routes -----------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        app = self._app_of(request)
        if app is None:
            return JSONResponse({"error": "unknown_app"}, status_code=404)
        charts = []
        for name, title in CHARTS.items():
            data = await asyncio.to_thread(self.data, name, app)
            charts.append({"name": name, "title": title, "svg": to_svg(data)})
        totals = (await asyncio.to_thread(self.c.ledger.totals)).get(app, {})
        depth = await asyncio.to_thread(self.c.spool.depth)
        lag = await asyncio.to_thread(self.c.spool.lag)
        summary = {
            ACCEPTED: totals.get(ACCEPTED, 0),
            DUPLICATE: totals.get(DUPLICATE, 0),
            RETRY: totals.get(RETRY, 0),
            REFUSED: sum(totals.get(REFUSED, {}).values()),
        }
        html = self.templates.get_template("dashboard.html").render(
            app=app,
            apps=list(self.c.apps),
            base=self.base(request),
            charts=charts,
            totals=summary,
            spool_pending=sum(s.get("pending", 0) for s in depth.values()),
            lag=lag,
            store=self.store() is not None,
        )
        return HTMLResponse(html)

    async def chart(self, request: Request) -> Response:
        name, fmt = str(request.path_params["chart"]), str(request.path_params["fmt"])
        app = self._app_of(request)
        if name not in CHARTS or fmt not in ("json", "svg") or app is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        data = await asyncio.to_thread(self.data, name, app)
        if fmt == "json":
            return JSONResponse(data)
        return Response(to_svg(data), media_type="image/svg+xml")

    async def stylesheet(self, request: Request) -> Response:
        return Response(self.css, media_type="text/css")

    async def index_redirect(self, request: Request) -> Response:
        return RedirectResponse(self.base(request) + "/", status_code=307)

    def refuse(self, request: Request, reason: str) -> Response:
        headers = {"WWW-Authenticate": REALM} if self.basic else {}
        status = 401 if self.basic else 403
        if _wants_json(request):
            return JSONResponse(
                {"error": "forbidden", "reason": reason}, status_code=status, headers=headers
            )
        html = self.templates.get_template("refused.html").render(reason=reason)
        return HTMLResponse(html, status_code=status, headers=headers)


def dashboard_app(collector: Collector, *, auth: Auth | None = None) -> Starlette:
    """The dashboard for ``collector``, to mount at ``/dashboard``."""
    check = auth if auth is not None else basic_auth(collector.config.dashboard)
    dashboard = Dashboard(collector, basic=auth is None and check is not None)
    app = DashboardApp(
        routes=[
            Route("/", dashboard.page, methods=["GET"]),
            Route("/dashboard.css", dashboard.stylesheet, methods=["GET"]),
            Route("/charts/{chart}.{fmt}", dashboard.chart, methods=["GET"]),
        ]
    )
    app.guard_auth = check
    app.guard_refuse = dashboard.refuse
    app.state.dashboard = dashboard
    return app
