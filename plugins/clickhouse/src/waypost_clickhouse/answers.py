"""clickhouse-connect's answers read within bounds: its urllib3 pool manager stands behind
:class:`BoundedPool`, which reads every answer's body with the core's bounds (at most
:data:`~waypost.sinks.bounded.ANSWER_BYTES` after decoding, ended within the sink's timeout of
the request's start or a second after its headers) and hands clickhouse-connect the body read.
clickhouse-connect reads an answer whole, however long it is or however slowly it comes."""

from __future__ import annotations

import io
import time
import zlib
from typing import TYPE_CHECKING, Any

from waypost.sinks.bounded import AnswerTooSlow, read_urllib3

if TYPE_CHECKING:
    from urllib3 import BaseHTTPResponse, HTTPResponse, PoolManager

__all__ = ["BoundedPool"]

_CODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})
"""Content codings read here; the pool asks for none (another could be a bomb)."""


class BoundedPool:
    """Stands in for the urllib3 pool manager ``inner`` (any attribute is ``inner``'s):
    ``request`` reads the answer within bounds of ``seconds``, and a body cut, late or in a
    coding not asked for becomes a urllib3 error (clickhouse-connect's ``OperationalError``)."""

    def __init__(self, inner: PoolManager, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def request(self, method: str, url: str, **kwargs: Any) -> HTTPResponse:
        from urllib3 import HTTPResponse
        from urllib3.exceptions import DecodeError
        from urllib3.exceptions import TimeoutError as AnswerTimeout

        preload = kwargs.pop("preload_content", True)
        kwargs["decode_content"] = False
        started = time.monotonic()
        answer = self.inner.request(method, url, preload_content=False, **kwargs)
        whole = False
        try:
            coding = answer.headers.get("Content-Encoding", "")
            unasked = [c for c in coding.lower().replace(" ", "").split(",") if c]
            unasked = [c for c in unasked if c not in _CODINGS]
            if unasked:
                raise DecodeError(f"an answer in {unasked[0]}, a coding not asked for")
            body, whole = read_urllib3(answer, started, self.seconds)
        except AnswerTooSlow as exc:
            raise AnswerTimeout(str(exc)) from None
        except zlib.error as exc:
            raise DecodeError(f"an answer's body does not decode: {exc}") from None
        finally:
            _done(answer, whole)
        headers = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")
        }
        headers["Content-Length"] = str(len(body))
        return HTTPResponse(
            body=io.BytesIO(body),
            headers=headers,
            status=answer.status,
            version=answer.version,
            reason=answer.reason,
            preload_content=preload,
            decode_content=False,
            request_method=method,
            request_url=url,
        )


def _done(answer: BaseHTTPResponse, whole: bool) -> None:
    """Give a connection whose answer was read whole back to its pool; close any other."""
    if whole:
        answer.release_conn()
    else:
        answer.close()
        answer.release_conn()
