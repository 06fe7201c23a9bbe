"""Answers read within bounds: at most :data:`ANSWER_BYTES` of a body (decoded), and only until
its deadline, so that a destination answering a 2 GB body, an endless chunked one or a trickle
of bytes neither fills the memory nor holds a sink's thread.

A body longer than that is cut: what was read is the body, the rest is never read and the
connection is closed. A body still coming at its deadline raises :class:`AnswerTooSlow`: a
thread of waypost's (alive while bodies are being read, and half a second more) shuts the
connection down under the read that waits. :class:`~waypost.sinks.HttpTransport` reads every
answer so, and so does every adapter of a :func:`~waypost.sinks.requests_session`;
:func:`read_urllib3` reads one for a layer on urllib3 alone.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from waypost.sinks.process import ProcessLocal

if TYPE_CHECKING:
    import httpx
    import urllib3
    from requests.adapters import BaseAdapter

__all__ = [
    "ANSWER_BYTES",
    "AnswerTooSlow",
    "body_deadline",
    "read_httpx",
    "read_urllib3",
    "requests_adapter",
]

ANSWER_BYTES = 1 << 20
"""Bytes of an answer's body read at most, after decoding (1 MiB: a verdict on a batch of a
thousand events is far shorter)."""

_CHUNK = 65_536


class AnswerTooSlow(Exception):
    """An answer's body had not ended by its deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the answer's body had not ended within {seconds:g} s")
        self.seconds = seconds


def body_deadline(started: float, seconds: float) -> float:
    """When an answer's body must have ended (``time.monotonic()``): ``seconds`` after its
    request started, or a second after its headers came when they came later than that."""
    return max(started + seconds, time.monotonic() + 1.0)


class _Watch:
    """One body being read: its connection's socket and when to shut it down."""

    def __init__(self, sock: socket.socket | None, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.cut = False

    def shut(self) -> None:
        self.cut = True
        if self.sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: nothing is waiting on it
                self.sock.shutdown(socket.SHUT_RDWR)


_LINGER = 0.5
"""Seconds the cutter's thread waits for another body to watch before it ends."""


class _Cutter:
    """Shuts down the connections of bodies past their deadline, on one thread that lives while
    there are bodies to watch and half a second more (one process's: a forked child has its
    own). Watching a body costs two lock acquisitions: the thread is woken only for a deadline
    earlier than the one it waits for, which a deadline at least a second away seldom is."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._watches: set[_Watch] = set()
        self._running = False
        self._wakes_at = 0.0

    @contextlib.contextmanager
    def watching(self, sock: socket.socket | None, deadline: float) -> Iterator[_Watch]:
        watch = _Watch(sock, deadline)
        if sock is None or not self._add(watch):  # the reader checks between reads only
            yield watch
            return
        try:
            yield watch
        finally:
            with self._changed:
                self._watches.discard(watch)
                if not self._watches and self._wakes_at > time.monotonic() + _LINGER:
                    self._changed.notify()  # to linger from now, not from a deadline passed by

    def _add(self, watch: _Watch) -> bool:
        with self._changed:
            if not self._running:
                thread = threading.Thread(target=self._run, name="waypost-answers", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't create new thread at interpreter shutdown"
                    return False
                self._running = True
                self._wakes_at = 0.0  # it looks at the watches before it first waits
            self._watches.add(watch)
            if watch.deadline < self._wakes_at:
                self._changed.notify()
            return True

    def _run(self) -> None:
        idle_since = time.monotonic()
        with self._changed:
            while True:
                now = time.monotonic()
                for watch in [w for w in self._watches if w.deadline <= now]:
                    self._watches.discard(watch)
                    watch.shut()
                if self._watches:
                    idle_since = now
                    self._wakes_at = min(w.deadline for w in self._watches)
                elif now - idle_since >= _LINGER:
                    self._running = False
                    return
                else:
                    self._wakes_at = idle_since + _LINGER
                self._changed.wait(self._wakes_at - now)


_cutters: ProcessLocal[_Cutter] = ProcessLocal(_Cutter, lambda cutter: None)


def _gather(
    chunks: Iterable[bytes], watch: _Watch, limit: int, seconds: float
) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of the body ``chunks`` make, and whether that is all of it;
    :class:`AnswerTooSlow` past the watch's deadline."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts)[:limit], False
        if time.monotonic() > watch.deadline:
            raise AnswerTooSlow(seconds)
    if watch.cut:  # a body that ends with its connection looks whole once shut down
        raise AnswerTooSlow(seconds)
    return b"".join(parts), True


def _decoded(raw: Iterable[bytes], encoding: str | None) -> Iterable[bytes]:
    """``raw`` decoded as its ``Content-Encoding`` says (gzip and deflate, as httpx asks for;
    any other coding as it is, as httpx leaves it), :data:`_CHUNK` bytes at a time at most
    whatever the ratio: a decompression bomb costs no more than an honest body."""
    chunks = raw
    for coding in [c.strip().lower() for c in (encoding or "").split(",")][::-1]:
        if coding in ("gzip", "x-gzip", "deflate"):
            chunks = _inflated(chunks, raw_fallback=coding == "deflate")
    return chunks


def _inflated(chunks: Iterable[bytes], *, raw_fallback: bool) -> Iterator[bytes]:
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or a zlib header
    first = True
    for chunk in chunks:
        data = chunk
        while True:
            try:
                out = inflater.decompress(data, _CHUNK)
            except zlib.error:
                if not (first and raw_fallback):
                    raise
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # deflate without its header
                out = inflater.decompress(data, _CHUNK)
            first = False
            if out:
                yield out
            data = inflater.unconsumed_tail
            if not data and len(out) < _CHUNK:  # all of it in, nothing more waiting to come out
                break


def _read(
    raw: Iterable[bytes],
    encoding: str | None,
    sock: socket.socket | None,
    started: float,
    seconds: float,
    limit: int,
) -> tuple[bytes, bool]:
    """The body that ``raw`` (chunks as they came off ``sock``) makes, decoded and within
    bounds, and whether it was whole; :class:`AnswerTooSlow` past :func:`body_deadline`."""
    with _cutters.get().watching(sock, body_deadline(started, seconds)) as watch:
        try:
            return _gather(_decoded(raw, encoding), watch, limit, seconds)
        except Exception:
            if watch.cut:
                raise AnswerTooSlow(seconds) from None
            raise


def read_httpx(
    answer: httpx.Response, started: float, seconds: float, limit: int = ANSWER_BYTES
) -> bool:
    """Read a streamed httpx ``answer``'s body within bounds (then ``answer.content`` is what
    was read) and return whether it was whole; :class:`AnswerTooSlow` when it had not ended
    by :func:`body_deadline`. The caller closes the answer (which closes a connection whose
    answer was not read to its end)."""
    stream = answer.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    encoding = answer.headers.get("Content-Encoding")
    body, whole = _read(answer.iter_raw(), encoding, sock, started, seconds, limit)
    answer._content = body
    return whole


def read_urllib3(
    answer: urllib3.BaseHTTPResponse, started: float, seconds: float, limit: int = ANSWER_BYTES
) -> tuple[bytes, bool]:
    """The body of a urllib3 ``answer`` (asked with ``preload_content=False`` and
    ``decode_content=False``) read within bounds and decoded as gzip and deflate are, and
    whether it was whole; :class:`AnswerTooSlow` when it had not ended by
    :func:`body_deadline`. The caller closes an answer that was not whole (its connection
    goes) and releases one that was."""
    connection = getattr(answer, "connection", None)
    sock = getattr(connection, "sock", None)
    encoding = answer.headers.get("Content-Encoding")
    return _read(
        answer.stream(_CHUNK, decode_content=False), encoding, sock, started, seconds, limit
    )


@functools.cache
def _adapter_class() -> Callable[[BaseAdapter, float, int], BaseAdapter]:
    """The requests adapter that reads its inner adapter's answers within bounds (defined once
    requests is in)."""
    import requests
    from requests.adapters import BaseAdapter

    class BoundedAdapter(BaseAdapter):
        """Sends through ``inner`` (which must leave the body unread, as ``HTTPAdapter`` and its
        subclasses do) and reads each answer's body within bounds before requests sees it."""

        def __init__(self, inner: BaseAdapter, seconds: float, limit: int) -> None:
            super().__init__()
            self.inner = inner
            self.seconds = seconds
            self.limit = limit

        def send(
            self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
        ) -> requests.Response:
            started = time.monotonic()
            kwargs["stream"] = True  # the body is read here, not by the inner adapter
            answer = self.inner.send(request, *args, **kwargs)
            connection = getattr(answer.raw, "connection", None)  # urllib3's
            sock = getattr(connection, "sock", None)
            try:  # decoded by requests already
                chunks = answer.iter_content(_CHUNK)
                body, whole = _read(chunks, None, sock, started, self.seconds, self.limit)
            except Exception as exc:
                answer.close()
                if isinstance(exc, AnswerTooSlow):
                    raise requests.ReadTimeout(str(exc)) from None
                raise
            if not whole:
                answer.close()  # the rest is never read: the connection goes
            answer._content, answer._content_consumed = body, True
            return answer

        def close(self) -> None:
            self.inner.close()

    return BoundedAdapter


def requests_adapter(inner: BaseAdapter, seconds: float, limit: int = ANSWER_BYTES) -> BaseAdapter:
    """A requests adapter that sends through ``inner`` and reads every answer's body within
    bounds: at most ``limit`` bytes (the rest cut off), ended within ``seconds`` of the
    request's start (else ``requests.ReadTimeout``)."""
    return _adapter_class()(inner, seconds, limit)
