"""The HTTP transport every HTTP sink shares, and the one classification of HTTP answers.

:class:`HttpTransport` is one sink's httpx client: httpx (and what its first client imports) is
imported on the thread that builds the sink, so a ``fork()`` can never catch a delivery thread
halfway through an import; the client is built in ``open()`` and rebuilt in a forked child,
which never touches its parent's connections. It has the sink's User-Agent and timeout, never
follows redirects, maps every transport error (timeouts, refused or reset connections,
protocol errors) to :class:`~waypost.errors.RetryableError` once, and passes every reason it
produces through the sink's :class:`~waypost.sinks.masking.Masker`. Credentials never stand in
a URL that httpx sees: user info travels as an ``Authorization`` header, and secret query
values are put in the request line below httpx's own logging.
"""

from __future__ import annotations

import contextlib
import email.utils
import encodings.idna  # noqa: F401 (socket.getaddrinfo imports it lazily: imported here first)
import functools
import importlib.metadata
import json
import re
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import waypost
from waypost.errors import ConfigError, PayloadTooLarge, PermanentError, RetryableError, SinkError
from waypost.sinks.bounded import AnswerTooSlow, read_httpx, requests_adapter
from waypost.sinks.masking import MASK, UrlSecrets, is_secret_name, mask_url
from waypost.sinks.process import ProcessLocal

if TYPE_CHECKING:
    import httpx
    import requests
    from pydantic import SecretStr
    from requests.adapters import BaseAdapter

    from waypost.events import Event
    from waypost.sinks.base import Sink

__all__ = [
    "RESERVED_HEADERS",
    "RETRYABLE_STATUS",
    "Answers",
    "BodyOverLimit",
    "HttpTransport",
    "body_limit",
    "check_headers",
    "json_object",
    "parse_retry_after",
    "raise_for_status",
    "requests_errors",
    "requests_session",
    "snippet",
    "user_agent",
]

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

SNIPPET = 300
"""Characters of an answer's body quoted in a reason."""

RESERVED_HEADERS = frozenset(
    {"content-type", "content-encoding", "content-length", "transfer-encoding", "host"}
)
"""Headers a sink sets itself: configured ones would corrupt the request."""
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_headers(
    headers: Mapping[str, SecretStr], reserved: Iterable[str] = ()
) -> Mapping[str, SecretStr]:
    """A config's extra request headers, checked (for a ``field_validator``): valid names, none
    that the sink sets itself (:data:`RESERVED_HEADERS` and ``reserved``), no line break or NUL
    in a value (which would smuggle in another header). Messages never quote a value."""
    refused = RESERVED_HEADERS | {name.lower() for name in reserved}
    for name, secret in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP header name")
        if name.lower() in refused:
            raise ValueError(f"header {name!r} is set by the sink itself; remove it")
        if any(ch in secret.get_secret_value() for ch in "\r\n\0"):
            raise ValueError(f"the value of header {name!r} contains a line break or NUL")
    return headers


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's body if it is a JSON object, else ``None`` (empty, not JSON, a list)."""
    content = response.content
    if not content or content.lstrip()[:1] != b"{":
        return None
    try:
        data = json.loads(content)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def snippet(text: str | bytes, limit: int = SNIPPET) -> str:
    """An answer's body for a reason: one line, whitespace folded, at most ``limit`` characters
    (so a hostile answer cannot forge log lines or flood them)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(text.split())[:limit]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def raise_for_status(
    status: int,
    headers: Mapping[str, str] | None = None,
    body: str = "",
    *,
    what: str = "",
    retry_after: float | None = None,
    mask: Callable[[str], str] = mask_url,
) -> None:
    """Classify an HTTP answer: return on 2xx, else raise the matching ``SinkError``.

    408, 425, 429 and 5xx are retryable (honouring ``Retry-After``), 413 asks the core to split
    the batch (:class:`~waypost.errors.PayloadTooLarge`, retryable), a 3xx is permanent (a
    redirect is never followed: the reason says where it pointed), every other status is
    permanent. The body's first 300 characters go in the reason, and the whole reason passes
    ``mask`` (URL credentials by default; a sink's :meth:`~waypost.Sink.mask` knows its secrets).
    ``retry_after`` (seconds) stands in for the header when a client library parsed it already.
    """
    if 200 <= status < 300:
        return
    quoted = snippet(body)
    reason = f"{what + ': ' if what else ''}HTTP {status}"
    if 300 <= status < 400:
        location = _header(headers, "Location")
        target = f" to {snippet(location, 200)}" if location else ""
        reason += (
            f": redirected{target}, which waypost does not follow (it would take the request "
            "and its credentials to an address nobody configured): configure the new address "
            "if it is the right one"
        )
        raise PermanentError(mask(reason))
    reason += f": {quoted}" if quoted else ""
    if status == 413:
        raise PayloadTooLarge(mask(reason))
    if status in RETRYABLE_STATUS or status >= 500:
        wait = (
            retry_after
            if retry_after is not None
            else parse_retry_after(_header(headers, "Retry-After"))
        )
        raise RetryableError(mask(reason), retry_after=wait)
    raise PermanentError(mask(reason))


def _product(text: str) -> str:
    """``text`` made safe for a User-Agent product token."""
    return re.sub(r"[^A-Za-z0-9.!#$%&'*+^_`|~-]+", "-", text).strip("-") or "app"


def user_agent(sink: Sink[Any]) -> str:
    """``<app>/<version> waypost/<version> <plugin>/<version>``: the application that sends,
    the framework, and the distribution of the sink's class."""
    context = getattr(sink, "context", None)
    agent = f"waypost/{waypost.__version__}"
    if context is not None:  # a sink made outside the core may have none
        agent = f"{_product(context.app)}/{_product(context.version)} {agent}"
    package = type(sink).__module__.partition(".")[0]
    if package == "waypost":
        return agent
    distribution = package.replace("_", "-")
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(sys.modules.get(package), "__version__", "") or "")
    return f"{agent} {_product(distribution)}/{_product(version)}" if version else agent


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``),
    decided once: httpx ignores the environment for a transport it is handed."""
    proxies = urllib.request.getproxies_environment()
    if not proxies:
        return None
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


class HttpTransport:
    """One sink's HTTP client (httpx), owned by one process.

    ``base_url`` is what relative paths are appended to (the config's ``base_url`` or ``url``
    by default); ``headers`` go with every request; ``secrets`` are the config's
    ``url_secrets`` by default: their user info becomes a Basic ``Authorization`` header, and
    each query parameter shown as ``name=***`` gets its value on the wire only; more can be
    given with ``params`` (GA4's ``api_secret``). ``what`` names the destination in reasons.
    The sink owns it: the sink's default ``open()`` and ``close()`` open and close it.
    """

    _httpx: Any  # the module, imported by __init__

    def __init__(
        self,
        sink: Sink[Any],
        *,
        base_url: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        secrets: UrlSecrets | None = None,
        agent: str | None = None,
        what: str = "",
    ) -> None:
        import httpx  # here, on the thread that builds the sink; never on a delivery thread

        self._httpx = httpx
        self.sink = sink
        self.what = what
        config = sink.config
        self.timeout = float(config.timeout)
        target = base_url or getattr(config, "base_url", None) or getattr(config, "url", "")
        self.base_url = str(target).rstrip("/")
        secrets = config.url_secrets if secrets is None else secrets
        self._agent = agent
        self._headers = dict(headers or {})
        basic = secrets.basic_auth
        if basic is not None:
            if any(k.lower() == "authorization" for k in self._headers):
                raise ConfigError(
                    "the URL carries user info and an Authorization header is set as well: "
                    "give the credentials in one place"
                )
            self._headers["Authorization"] = basic
        self._params = {**secrets.params, **(params or {})}
        # Shown as *** in every URL httpx sees, filled in on the wire.
        self._added = "&".join(f"{urllib.parse.quote(name)}={MASK}" for name in params or {})
        masker = sink.masker
        for name, value in self._headers.items():
            if is_secret_name(name):
                masker.add(value)
        for value in self._params.values():
            masker.add(value)
        self._clients: ProcessLocal[httpx.Client] = ProcessLocal(self._new_client, _close)
        self.answers = Answers()
        _import_what_a_client_imports()
        sink.own(self)  # opened and closed with the sink

    def open(self) -> None:
        """Build this process's client now (the core calls a sink's ``open()`` where no fork
        can cut across it: building one loads certificates, which takes a while)."""
        self._clients.get()

    def _new_client(self) -> httpx.Client:
        lib = self._httpx
        wire: httpx.BaseTransport = lib.HTTPTransport(proxy=_proxy_for(self.base_url))
        if self._params:
            wire = _secret_query()(wire, self._params)
        client: httpx.Client = lib.Client(
            transport=wire,
            headers={"User-Agent": self._agent or user_agent(self.sink), **self._headers},
            timeout=lib.Timeout(self.timeout),
            follow_redirects=False,
            trust_env=False,  # proxies are read above; netrc credentials are never picked up
        )
        return client

    @property
    def client(self) -> httpx.Client:
        """This process's client (a forked child gets its own on first use)."""
        return self._clients.get()

    def url(self, path: str = "", params: Mapping[str, str] | None = None) -> str:
        """``path`` on the base URL with the query ``params`` and the secret ones, as it may be
        shown (secret values as ``***``): the URL httpx is given."""
        url = path if "://" in path else f"{self.base_url}{path}"
        query = [urllib.parse.urlencode(params or {}), self._added]
        if any(query):  # put in the URL as is: httpx would show *** percent-encoded
            url += ("&" if "?" in url else "?") + "&".join(q for q in query if q)
        return url

    def request(
        self,
        method: str,
        path: str = "",
        *,
        content: bytes | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        what: str | None = None,
    ) -> httpx.Response:
        """Send one request and return the answer, whatever its status; a transport error
        (no answer in time, no connection, a broken answer, a body that has not ended within
        the timeout) raises ``RetryableError``. The body is read up to
        :data:`~waypost.sinks.bounded.ANSWER_BYTES` (the rest is cut off)."""
        lib = self._httpx
        url = self.url(path, params)
        label = self.what if what is None else what
        started = time.monotonic()
        try:
            with self.client.stream(
                method, url, content=content, data=data, json=json, headers=headers
            ) as answer:
                read_httpx(answer, started, self.timeout)
            self.answers.keep(answer)
            return answer
        except AnswerTooSlow:
            reason = f"the answer from {_where(url)} had not ended within {self.timeout:g} s"
        except lib.TimeoutException as exc:
            name = type(exc).__name__
            reason = f"no answer within {self.timeout:g} s from {_where(url)} ({name})"
        except lib.RequestError as exc:
            detail = snippet(str(exc), 200)
            reason = f"cannot reach {_where(url)}: {type(exc).__name__}{': ' if detail else ''}"
            reason += detail
        # Raised without the httpx error: its request holds the URL as it went on the wire.
        raise RetryableError(self.sink.mask(f"{label}: {reason}" if label else reason))

    def render(
        self,
        method: str,
        path: str = "",
        *,
        content: bytes | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The request :meth:`request` would send, for a sink's ``render`` (debug mode: nothing
        is sent): ``method``, ``url`` (as it may be shown), ``content_type`` and the ``form``
        (``data``) or the ``body`` (``json``, or ``content``: parsed where its type is JSON)."""
        rendered: dict[str, Any] = {"method": method, "url": self.url(path, params)}
        given = next((v for k, v in self._headers.items() if k.lower() == "content-type"), None)
        if data is not None:
            rendered.update(content_type="application/x-www-form-urlencoded", form=dict(data))
        elif json is not None:
            rendered.update(content_type=given or "application/json", body=json)
        elif content is not None:
            kind = given or "application/octet-stream"
            rendered.update(content_type=kind, body=_shown(content, kind))
        return rendered

    def check(self, response: httpx.Response, *, what: str | None = None) -> httpx.Response:
        """Return a 2xx answer; raise for any other (:func:`raise_for_status`, masked)."""
        raise_for_status(
            response.status_code,
            response.headers,
            response.text if not 200 <= response.status_code < 300 else "",
            what=self.what if what is None else what,
            mask=self.sink.mask,
        )
        return response

    def unreadable(
        self, response: httpx.Response, why: str, *, what: str | None = None
    ) -> NoReturn:
        """Raise for an answer whose body is not the destination's verdict (``why`` says how,
        e.g. "with a body that is not Acme's JSON answer"): a 2xx is retryable, since nothing
        says the events arrived (with the answer's ``Retry-After``); any other status is
        classified as :meth:`check` classifies it."""
        status = response.status_code
        if 200 <= status < 300:
            raise RetryableError(
                f"{self.what if what is None else what}: HTTP {status} {why}: "
                f"{self.text(response)!r}",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        self.check(response, what=what)
        raise AssertionError("check() raises for every status but 2xx")  # pragma: no cover

    def send(self, method: str, path: str = "", **kwargs: Any) -> httpx.Response:
        """:meth:`request`, then :meth:`check`: the 2xx answer, or a ``SinkError``."""
        return self.check(self.request(method, path, **kwargs), what=kwargs.get("what"))

    def text(self, response: httpx.Response, limit: int = SNIPPET) -> str:
        """The answer's body as a reason may quote it: one line, cut, masked."""
        return self.sink.mask(snippet(response.text, limit))

    def close(self) -> None:
        """Close this process's connections (an inherited client is left to its owner)."""
        self._clients.close()

    def test_request(self, event: Event) -> dict[str, Any]:
        """:meth:`Answers.test_request` for the sink this transport serves."""
        return self.answers.test_request(self.sink, event)


def requests_session(sink: Sink[Any], adapter: BaseAdapter | None = None) -> requests.Session:
    """A requests session for a sink on a vendor's requests-based layer: it answers a redirect
    instead of following it (requests' default follows one, credentials and all, to a host
    nobody configured), never retries (the core does: ``adapter``, a requests ``HTTPAdapter``
    of the sink's own, should be made with ``max_retries=0``), keeps to :func:`body_limit`,
    reads every answer within bounds, whatever the adapter (its body up to
    :data:`~waypost.sinks.bounded.ANSWER_BYTES`, the rest cut off, and ended within the sink's
    ``timeout`` of the request's start or a second after its headers, whichever is later, else
    ``requests.ReadTimeout``; the adapter is asked to stream, so that it leaves the body unread,
    as ``HTTPAdapter`` and its subclasses do) and sends the user info taken out of the
    configured URL as Basic auth. Make one per process (:class:`ProcessLocal`)."""
    session = bounded_session(float(sink.config.timeout), adapter)
    secrets = sink.config.url_secrets
    if secrets.username is not None:
        session.auth = (secrets.username, secrets.password or "")
    return session


def bounded_session(timeout: float, adapter: BaseAdapter | None = None) -> requests.Session:
    """A requests session as :func:`requests_session` makes it (no redirect followed, no retry,
    every answer read within bounds of ``timeout`` seconds), for a requests-based layer that is
    not a sink's, such as a metrics exporter's."""
    from requests.adapters import HTTPAdapter

    session = _session_class()()
    inner = HTTPAdapter(max_retries=0) if adapter is None else adapter
    bounded = requests_adapter(inner, timeout)
    session.mount("https://", bounded)
    session.mount("http://", bounded)
    return session


@functools.cache
def _session_class() -> type[requests.Session]:
    """The requests session class that never follows a redirect and keeps to
    :func:`body_limit` (defined once requests is in)."""
    import requests

    class KeptSession(requests.Session):
        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            kwargs["allow_redirects"] = False
            at_most = getattr(_body_limits, "at_most", 0)
            body = request.body
            if at_most and isinstance(body, (str, bytes)):  # a streamed body is not measured
                size = len(body.encode() if isinstance(body, str) else body)
                if size > at_most:
                    raise BodyOverLimit(size, at_most)
            return super().send(request, **kwargs)

    return KeptSession


@contextlib.contextmanager
def requests_errors(sink: Sink[Any], url: str, what: str = "") -> Iterator[None]:
    """Within it, a transport error of a :func:`requests_session` (no answer within the sink's
    ``timeout``, no connection, a broken answer) raises ``RetryableError`` naming ``what`` and
    ``url`` (give it without its query), masked: requests' errors are mapped once, as
    :class:`HttpTransport` maps httpx's."""
    import requests  # imported already by the sink that made the session

    label = f"{what}: " if what else ""
    try:
        yield
    except requests.Timeout:
        timeout = float(sink.config.timeout)
        reason = f"{label}no answer from {url} within {timeout:g} s"
        raise RetryableError(sink.mask(reason)) from None
    except requests.RequestException as exc:
        reason = f"{label}cannot reach {url}: {type(exc).__name__}"
        raise RetryableError(sink.mask(reason)) from None


class BodyOverLimit(Exception):
    """A request body over the thread's :func:`body_limit`; it was not sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a request body of {size} bytes, over the {limit} allowed")
        self.size = size
        self.limit = limit


_body_limits = threading.local()


@contextlib.contextmanager
def body_limit(at_most: int) -> Iterator[None]:
    """Within it, a request this thread makes through a :func:`requests_session` whose body is
    over ``at_most`` bytes (text or bytes: a streamed body is not measured) raises
    :class:`BodyOverLimit` unsent (0: no limit): a vendor's
    request layer builds and encodes the body itself, so only the wire knows its size."""
    before = getattr(_body_limits, "at_most", 0)
    _body_limits.at_most = at_most
    try:
        yield
    finally:
        _body_limits.at_most = before


class Answers:
    """What a sink's destination answered, kept per thread while ``test_request`` runs (for
    ``waypost test-sink``). A transport keeps its own; a sink on a vendor's request layer
    owns one (``self.own(Answers())``: the sink's default ``test_request`` then reports it) and
    calls :meth:`keep` with each answer it gets (anything with ``status_code``, ``text`` and
    ``url``: an httpx or a requests response)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def open(self) -> None:
        """Nothing to open (an owned resource of the sink)."""

    def close(self) -> None:
        """Nothing to close."""

    def keep(self, answer: Any) -> None:
        kept = getattr(self._local, "answers", None)
        if kept is not None:
            kept.append(answer)

    def test_request(self, sink: Sink[Any], event: Event) -> dict[str, Any]:
        """Send ``event`` through the sink's own ``send`` and report: ``delivered``; the
        ``url``, ``status`` and ``answer`` (its JSON, else its text; masked) of the last answer
        kept; and, if not delivered, the ``reason`` and whether it is ``retryable`` (or
        ``dropped``, the destination's word for it); the ``receipt`` and the ``control`` block if
        there was one."""
        kept: list[Any] = []
        self._local.answers = kept
        try:
            result = sink.send([event])
            reason = result.failed.get(event.id) or result.retry.get(event.id)
            retryable = event.id not in result.failed
            dropped, receipt = result.dropped_by_destination.get(event.id), result.receipt
            control = result.control
        except SinkError as exc:
            reason, retryable, dropped, receipt = exc.reason, exc.retryable, None, None
            control = None
        finally:
            self._local.answers = None
        report: dict[str, Any] = {"delivered": reason is None and dropped is None}
        if kept:
            last = kept[-1]
            report["url"] = sink.mask(str(last.url))
            report["status"] = last.status_code
            text = sink.mask(last.text)
            try:
                report["answer"] = json.loads(text) if text.strip() else None
            except ValueError:
                report["answer"] = snippet(text, 500)
        if reason is not None:
            report.update(reason=reason, retryable=retryable)
        if dropped is not None:
            report["dropped"] = dropped
        if receipt:
            report["receipt"] = receipt
        if control is not None:
            report["control"] = control
        return report


def _close(client: httpx.Client) -> None:
    client.close()


@functools.cache
def _import_what_a_client_imports() -> None:
    """httpx imports httpcore (with h11) and certifi when its first client is made: done here,
    on the thread that builds the sink, so that a delivery thread never imports."""
    import certifi
    import httpcore  # noqa: F401

    certifi.where()


def _shown(content: bytes, kind: str) -> Any:
    """A request body as debug mode shows it: its JSON where its type is JSON, else its text."""
    return json.loads(content) if "json" in kind else content.decode("utf-8", "replace")


def _where(url: str) -> str:
    """``url`` without its query, for a reason."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(query="", fragment=""))


@functools.cache
def _secret_query() -> Callable[[httpx.BaseTransport, Mapping[str, str]], httpx.BaseTransport]:
    """The wire-side transport that puts secret query values in (defined once httpx is in)."""
    import httpx

    class SecretQuery(httpx.BaseTransport):
        """Puts the secret query values in the request line, below the client: httpx logs (and
        its errors quote) the URL it was given, which holds ``name=***`` instead."""

        def __init__(self, inner: httpx.BaseTransport, params: Mapping[str, str]) -> None:
            self._inner = inner
            self._params = {name: urllib.parse.quote(v, safe="") for name, v in params.items()}

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            query = request.url.query.decode("ascii")
            pieces = []
            for piece in query.split("&") if query else ():
                name, _, value = piece.partition("=")
                real = self._params.get(urllib.parse.unquote_plus(name))
                if real is not None and urllib.parse.unquote_plus(value) == MASK:
                    piece = f"{name}={real}"
                pieces.append(piece)
            wire = httpx.Request(
                request.method,
                request.url.copy_with(query="&".join(pieces).encode("ascii")),
                headers=request.headers,
                stream=request.stream,
                extensions=request.extensions,
            )
            return self._inner.handle_request(wire)

        def close(self) -> None:
            self._inner.close()

    return SecretQuery
