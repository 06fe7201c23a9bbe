"""The ASGI app: ``POST /v1/{app}/events``, ``POST /v1/{app}/ping``, ``GET /v1/{app}/control``,
``/healthz``, ``/readyz``, ``/metrics`` and ``/dashboard/``. Every refusal is JSON with a
reason; 429 and 503 carry ``Retry-After``. A batch is answered 200 only once the spool holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from waypost.errors import WaypostError
from waypost.events import Event, uuid7
from waypost_collector.config import CollectorConfig, load_config
from waypost_collector.intake import App, Checked, Collector
from waypost_collector.ledger import Entry
from waypost_collector.metrics import CONTENT_TYPE, Metrics
from waypost_collector.spool import SpoolError
from waypost_collector.wire import (
    Refused,
    decode_body,
    dumps,
    parse_items,
    ping_arrival,
)

log = logging.getLogger("waypost.collector")

Auth = Any  # Callable[[Request], bool | Awaitable[bool]], as waypost.admin takes it


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(data), status_code=status, media_type="application/json", headers=headers)


def _refusal(exc: Refused) -> Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="waypost-collector"'
    return _json({"error": exc.reason, "reason": exc.detail}, exc.status, headers)


async def _body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Refused(400, "malformed", "Content-Length is not a number") from None
        if size > limit:
            raise Refused(413, "too_large", f"the body is over {limit} bytes (limits.max_body)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Refused(413, "too_large", f"the body is over {limit} bytes (limits.max_body)")
        chunks.append(chunk)
    return b"".join(chunks)


class Service:
    """The request handlers of one :class:`Collector`."""

    def __init__(self, collector: Collector) -> None:
        self.c = collector
        self.metrics = Metrics(collector)

    def _started(self) -> None:
        # Servers that do not run the lifespan protocol: start on the first request.
        if not self.c.spool.running:
            self.c.start()

    def _app(self, request: Request) -> App:
        return self.c.app(str(request.path_params["app"]))

    def _answer(self, entry: Entry, fresh: list[Event], dups: list[Event]) -> Response:
        data: dict[str, Any] = {
            "receipt": entry.receipt,
            "accepted": len(fresh),
            "duplicates": len(dups),
            "refused": [{"id": r["id"], "reason": r["reason"], "detail": r["detail"]}
                        for r in entry.refused],
            "control": entry.control,
        }  # fmt: skip
        headers = {}
        if entry.retry:
            # Past the installation's rate: not refused, to be sent again later.
            data["retry"] = entry.retry
            headers["Retry-After"] = str(max(1, math.ceil(self.c.installations.retry_after())))
        return _json(data, 200, headers)

    async def _accept(
        self, app: App, checked: Checked, ip_hash: str | None, now: float
    ) -> Response:
        entry = self.c.entry(app, checked, ip_hash, now)
        future = self.c.spool.submit(entry, checked.events)
        fresh, dups = await asyncio.wrap_future(future)
        return self._answer(entry, fresh, dups)

    async def _arrive(self, request: Request) -> tuple[App, str | None, bytes]:
        """What every POST passes first: the app, the address's rate, the token, the body's
        size, the signature, the encoding. Returns the app, the address's hash, the body."""
        c = self.c
        limits = c.config.limits
        app = self._app(request)
        _, ip_hash = c.address(
            app.name,
            request.client.host if request.client else None,
            request.headers.getlist("x-forwarded-for"),
        )
        c.authorize(app, request.headers.get("authorization"))
        raw = await _body(request, limits.max_body)
        c.verify(app, request.headers, raw)
        body = decode_body(raw, request.headers.get("content-encoding"), limits)
        c.refuse_if_full(app.name)
        return app, ip_hash, body

    async def _handle(self, request: Request, *, ping: bool) -> Response:
        started = time.perf_counter()
        name = str(request.path_params["app"])
        self._started()
        c = self.c
        try:
            app, ip_hash, body = await self._arrive(request)
            now = time.time()
            if ping:
                arrival = ping_arrival(body, app.name, app.config.ping_event, now, uuid7(now))
                checked = c.admit(app, [arrival], [])
            else:
                items = parse_items(body, request.headers.get("content-type", ""))
                checked = c.check(app, items, now, body_size=len(body))
            response = await self._accept(app, checked, ip_hash, now)
        except Refused as exc:
            c.spool.tally(name if name in c.apps else "(unknown)", exc.reason)
            return _refusal(exc)
        except SpoolError as exc:
            log.error("waypost collector: app %s: batch not taken: %s", name, exc)
            return _refusal(Refused(503, "unavailable", "the spool cannot take it", retry_after=5))
        self.metrics.ack_seconds.labels(app.name).observe(time.perf_counter() - started)
        return response

    async def events(self, request: Request) -> Response:
        return await self._handle(request, ping=False)

    async def ping(self, request: Request) -> Response:
        return await self._handle(request, ping=True)

    async def control(self, request: Request) -> Response:
        try:
            app = self._app(request)
            self.c.authorize(app, request.headers.get("authorization"))
        except Refused as exc:
            return _refusal(exc)
        return _json(self.c.control(app.name, request.query_params.get("version")))

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok", "version": self.c.version})

    async def readyz(self, request: Request) -> Response:
        self._started()
        ready, problems = self.c.spool.ready()
        return _json({"ready": ready, "problems": problems}, 200 if ready else 503)

    async def metrics_page(self, request: Request) -> Response:
        body = await asyncio.to_thread(self.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)


GC_THRESHOLDS = (50_000, 50, 100)
"""The collector's process collects garbage less often than Python's default (700, 10, 10).
A batch of 100 events parses into thousands of containers that live until the batch is
answered, so the default collects the young generation several times per request and the
older ones every few requests, walking everything the batch holds each time: about a fifth
of the CPU per event (bench/collector.py). Cycles are rare in what it allocates."""


def tune_gc() -> None:
    """Set :data:`GC_THRESHOLDS`, and keep what start-up made (modules, config, schemas) out
    of every later collection. Called by the lifespan of the collector's own app, which a
    server runs only when the collector is the whole app of its process (a host that mounts
    it inside its own app keeps its own settings)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app(
    config: CollectorConfig | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    dashboard_auth: Auth | None = None,
) -> Starlette:
    """The collector as an ASGI app, for any ASGI server (uvicorn, hypercorn, gunicorn with
    uvicorn workers). ``config``: a :class:`CollectorConfig`, a file, a mapping, or None (the
    ``WAYPOST_COLLECTOR_CONFIG`` file or ``collector.yml`` here). ``dashboard_auth`` replaces
    the dashboard's HTTP Basic check with the host's own (as ``waypost.admin`` takes it).

    Background threads start with the server's lifespan (or the first request), never here,
    so a server that forks its workers after importing the app is safe.
    """
    collector = Collector(load_config(config))
    service = Service(collector)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tune_gc()
        await asyncio.to_thread(collector.start)
        try:
            yield
        finally:
            await asyncio.to_thread(collector.stop, 10.0)

    from waypost_collector.dashboard import dashboard_app

    routes = [
        Route("/v1/{app}/events", service.events, methods=["POST"]),
        Route("/v1/{app}/ping", service.ping, methods=["POST"]),
        Route("/v1/{app}/control", service.control, methods=["GET"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/readyz", service.readyz, methods=["GET"]),
        Route("/metrics", service.metrics_page, methods=["GET"]),
        Mount("/dashboard", app=dashboard_app(collector, auth=dashboard_auth)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.collector = collector
    return app


def from_environment() -> Starlette:
    """App factory for servers that import an app by name (uvicorn's workers, gunicorn):
    reads the config named by ``WAYPOST_COLLECTOR_CONFIG``."""
    try:
        return create_app(None)
    except WaypostError as exc:
        raise SystemExit(f"waypost collector: {exc}") from None
