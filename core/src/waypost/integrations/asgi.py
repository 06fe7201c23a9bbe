"""ASGI lifespan middleware: when the server stops the application, waypost delivers what it
holds before the process ends.

uvicorn ends a process that got SIGTERM by raising SIGTERM again with the default handler once
its graceful stop is done, so ``atexit`` never runs; the lifespan's shutdown is the last moment
the application is told. One line::

    app = Lifespan(app, tel)                       # any ASGI app, Django's included
    app.add_middleware(Lifespan, telemetry=tel)    # FastAPI, Starlette

Without it, waypost's SIGTERM handling still keeps everything (stored in the outbox, delivered
by the next start); with it, events are delivered at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from waypost.integrations import shutdown_all

if TYPE_CHECKING:
    from waypost.telemetry import Telemetry

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["Lifespan"]


class Lifespan:
    """Wraps an ASGI app; at lifespan shutdown, shuts ``telemetry`` down (every running
    Telemetry when None) within ``timeout`` (default: its ``shutdown_timeout``), on a thread,
    before the server is told the shutdown is complete. An app that does not speak the lifespan
    protocol (Django) gets it answered for it."""

    def __init__(
        self, app: ASGIApp, telemetry: Telemetry | None = None, *, timeout: float | None = None
    ) -> None:
        self.app = app
        self.telemetry = telemetry
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "lifespan":
            await self.app(scope, receive, send)
            return
        received = False
        done = False

        async def receive_() -> Message:
            nonlocal received
            received = True
            return await receive()

        async def send_(message: Message) -> None:
            nonlocal done
            if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                done = True
                await self._shutdown()
            await send(message)

        try:
            await self.app(scope, receive_, send_)
        except Exception:
            if received:
                raise  # the app's own startup or shutdown failed: the server reports it
            await self._answer(receive, send)  # it refused the lifespan scope: answer it here
            return
        if received and not done:  # returned without completing a shutdown it was sent
            await self._shutdown()

    async def _answer(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message.get("type") == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _shutdown(self) -> None:
        tel, timeout = self.telemetry, self.timeout
        if tel is None:
            await asyncio.to_thread(shutdown_all, timeout)
        else:
            budget = tel.config.shutdown_timeout if timeout is None else timeout
            await asyncio.to_thread(tel.shutdown, budget)
