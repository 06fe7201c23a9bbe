"""A small FastAPI application with waypost, as the process tests run it under uvicorn and
hypercorn: ``GET /hit?rid=N`` tracks one event. ``PROC_LIFESPAN=1`` wraps it in waypost's
ASGI integration."""

from __future__ import annotations

import os

from common import allow_all, make_telemetry
from fastapi import FastAPI

from waypost.admin import create_app

tel = make_telemetry("fastapiapp")
app = FastAPI()


@app.get("/hit")
def hit(rid: str) -> str:
    tel.track("hit", {"rid": rid, "pid": os.getpid()})
    return f"ok {os.getpid()}"


@app.get("/pid")
def pid() -> str:
    return str(os.getpid())


app.mount("/admin/telemetry", create_app(tel, auth=allow_all))

if os.environ.get("PROC_LIFESPAN") == "1":
    from waypost.integrations.asgi import Lifespan

    app.add_middleware(Lifespan, telemetry=tel)
