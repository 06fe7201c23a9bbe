"""A small Flask application with waypost, as the process tests run it under gunicorn:
``GET /hit?rid=N`` tracks one event; the admin pages are at ``/admin/telemetry``."""

from __future__ import annotations

import os

from common import allow_all, make_telemetry
from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from waypost.admin import wsgi_app

tel = make_telemetry("flaskapp")
app = Flask(__name__)


@app.get("/hit")
def hit() -> str:
    tel.track("hit", {"rid": request.args["rid"], "pid": os.getpid()})
    return f"ok {os.getpid()}"


@app.get("/pid")
def pid() -> str:
    return str(os.getpid())


app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
    app.wsgi_app, {"/admin/telemetry": wsgi_app(tel, auth=allow_all)}
)
