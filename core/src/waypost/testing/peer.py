"""Peers: the destinations that :class:`~waypost.testing.SinkContract` drives.

A peer is whatever a sink delivers to (an HTTP API, a database, a socket) that a test can tell
how to behave and ask what arrived. The contract suite only talks to the :class:`Peer`
protocol, so one suite proves a sink whatever its transport: :class:`HttpPeer` wraps the
recording HTTP server, the warehouse plugin's tests wrap SQLite, DuckDB, PostgreSQL and
fakesnow, the example plugin's tests wrap its TCP receiver.

Subclass :class:`BasePeer` and implement what your destination can do; a part it cannot play
raises :class:`PeerCannot` and the contract test that needs it is skipped with that reason.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from waypost.testing.server import RecordingServer, Response, free_port

if TYPE_CHECKING:
    from waypost.testing.contract import SinkContract

__all__ = ["Arrival", "BasePeer", "HttpPeer", "Peer", "PeerCannot"]


class PeerCannot(Exception):
    """This peer cannot play the part asked of it (a database has no redirects); the reason
    is what the skipped contract test says."""


@dataclass(frozen=True)
class Arrival:
    """One event as it arrived at the peer. ``name`` and ``properties`` are ``None`` where
    the peer cannot tell (a destination that keeps only ids); ``properties`` may hold more
    keys than the event had (a vendor's own ``$lib``, ``token`` ...)."""

    id: str
    name: str | None = None
    properties: dict[str, Any] | None = None


@runtime_checkable
class Peer(Protocol):
    """What the contract suite asks of a destination.

    Behaviours last until another is chosen; a fresh peer delivers. Failures are named
    (``"HTTP 503"``, ``"table locked"``), so one peer can offer several and the suite tries
    each.
    """

    def config(self) -> dict[str, Any]:
        """Settings of the sink under test, pointing at this peer."""
        ...

    def unreachable_config(self) -> dict[str, Any]:
        """Settings pointing at an address where nothing answers (connection refused, a
        database that cannot be opened)."""
        ...

    def deliver(self) -> None:
        """Accept everything from now on (the destination's success answer)."""
        ...

    def permanent_failures(self) -> Sequence[str]:
        """Names of the refusals :meth:`refuse` can play: each must fail a batch for good."""
        ...

    def refuse(self, failure: str) -> None:
        """Refuse every batch from now on with ``failure``, one of
        :meth:`permanent_failures` (HTTP 400, a table that is gone)."""
        ...

    def retryable_failures(self) -> Sequence[str]:
        """Names of the failures :meth:`fail_retryably` can play: each must be retried."""
        ...

    def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
        """Fail every batch from now on with ``failure``, one of :meth:`retryable_failures`;
        with ``retry_after``, also ask for that many seconds of patience (HTTP's
        ``Retry-After``). Raises :class:`PeerCannot` if the peer cannot say it."""
        ...

    def slow(self, seconds: float) -> None:
        """Accept from now on, but answer each batch only ``seconds`` later (a sink whose
        ``timeout`` is shorter must give up and report a retryable failure)."""
        ...

    def redirect(self, status: int) -> None:
        """Answer every batch with redirect ``status`` (301 ... 308) to the same path and
        query on another host; what reaches that host counts in :meth:`redirected`."""
        ...

    def redirected(self) -> int:
        """How many requests reached the host that :meth:`redirect` points at."""
        ...

    def received(self) -> list[Arrival]:
        """Every event that arrived, one entry per copy, in any order."""
        ...

    def secrets(self) -> Sequence[str] | None:
        """Values that must never appear in a log line, ``repr`` or reason; ``None`` leaves
        the choice to the contract (every ``SecretStr`` in the sink's config)."""
        ...


class BasePeer:
    """A :class:`Peer` that can do nothing but say so: subclasses implement what their
    destination can play. :meth:`config`, :meth:`unreachable_config`, :meth:`deliver` and
    :meth:`received` are required; the rest raise :class:`PeerCannot` by default."""

    name = "this peer"

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def unreachable_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def deliver(self) -> None:
        raise NotImplementedError

    def received(self) -> list[Arrival]:
        raise NotImplementedError

    def permanent_failures(self) -> Sequence[str]:
        return ()

    def refuse(self, failure: str) -> None:
        raise PeerCannot(f"{self.name} cannot refuse a batch")

    def retryable_failures(self) -> Sequence[str]:
        return ()

    def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
        raise PeerCannot(f"{self.name} cannot fail a batch retryably")

    def slow(self, seconds: float) -> None:
        raise PeerCannot(f"{self.name} cannot answer slowly")

    def redirect(self, status: int) -> None:
        raise PeerCannot(f"{self.name} speaks no protocol with redirects")

    def redirected(self) -> int:
        return 0

    def secrets(self) -> Sequence[str] | None:
        return None

    def close(self) -> None:
        """Release what the peer holds (servers, locks, connections)."""

    def __enter__(self) -> BasePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(Protocol):
    """What :class:`HttpPeer` needs of its server: a :class:`RecordingServer`, or a server
    of another protocol with the same scripting (``responder``, ``requests``, ``url``)."""

    @property
    def url(self) -> str: ...

    responder: Callable[[Any], Response]
    requests: list[Any]


class HttpPeer(BasePeer):
    """The recording HTTP server as a peer, answering as the contract subclass says
    (:meth:`~SinkContract.ok_response`, :meth:`~SinkContract.error_response`,
    ``permanent_status``, ``retry_statuses``) and reading ids back with its
    :meth:`~SinkContract.received_events`. Redirects point at a second server on another
    loopback address (127.0.0.2 where the system has it)."""

    name = "the HTTP peer"

    def __init__(self, server: _Server, contract: SinkContract) -> None:
        self.server = server
        self.contract = contract
        self._elsewhere: RecordingServer | None = None
        self._statuses = {f"HTTP {s}": s for s in contract.retry_statuses}
        refusals = [contract.permanent_status]
        if 401 not in refusals:
            refusals.append(401)  # a refused key: the answer most likely to tempt a sink to log
        self._refusals = {f"HTTP {s}": s for s in refusals}
        self.deliver()

    def config(self) -> dict[str, Any]:
        return self.contract.config(self.server.url)

    def unreachable_config(self) -> dict[str, Any]:
        return self.contract.config(f"http://127.0.0.1:{free_port()}")

    def deliver(self) -> None:
        self.server.responder = self.contract.ok_response

    def permanent_failures(self) -> Sequence[str]:
        return list(self._refusals)

    def refuse(self, failure: str) -> None:
        status = self._refusals[failure]
        contract = self.contract
        self.server.responder = lambda r: contract.error_response(r, status, {})

    def retryable_failures(self) -> Sequence[str]:
        return list(self._statuses)

    def fail_retryably(self, failure: str, retry_after: float | None = None) -> None:
        status = self._statuses[failure]
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        contract = self.contract
        self.server.responder = lambda r: contract.error_response(r, status, dict(headers))

    def slow(self, seconds: float) -> None:
        ok = self.contract.ok_response
        self.server.responder = lambda r: dataclasses.replace(ok(r), delay=seconds)

    def redirect(self, status: int) -> None:
        if self._elsewhere is None:
            self._elsewhere = _other_host_server()
        target = self._elsewhere.url

        def answer(request: Any) -> Response:
            path = getattr(request, "path", "/") or "/"
            query = urllib.parse.urlencode(getattr(request, "query", {}) or {}, doseq=True)
            location = f"{target}{path}{'?' + query if query else ''}"
            return Response(status, b"", headers={"Location": location})

        self.server.responder = answer

    def redirected(self) -> int:
        return len(self._elsewhere.requests) if self._elsewhere is not None else 0

    def received(self) -> list[Arrival]:
        return self.contract.received_events(list(self.server.requests))

    def close(self) -> None:
        if self._elsewhere is not None:
            self._elsewhere.stop()
            self._elsewhere = None


def _other_host_server() -> RecordingServer:
    """A recording server on another loopback address, so that a redirect to it crosses
    hosts; on systems with 127.0.0.1 alone, another port (another origin all the same)."""
    try:
        server = RecordingServer(host="127.0.0.2")
    except OSError:
        server = RecordingServer()
    return server.start()
