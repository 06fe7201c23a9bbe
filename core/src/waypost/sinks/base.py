"""The sink contract: a config model, a batch ``send`` that reports per event, ``close``.

Sinks are thin transports. The core owns buffering, batching, retries, the outbox and the
privacy gate; a sink turns a batch of :class:`~waypost.Event` into one request (or a few) and
says, for each event, whether it was delivered, should be retried or was refused for good.
"""

from __future__ import annotations

import builtins
import ipaddress
import logging
import typing
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import TypeVar

from waypost.config.values import flag, is_flag_field
from waypost.events import Event
from waypost.sinks.masking import Masker, UrlSecrets, mask_url, split_url

__all__ = [
    "HttpSinkConfig",
    "SendResult",
    "Sink",
    "SinkConfig",
    "SinkContext",
    "check_endpoint",
    "destination_of",
    "is_loopback_host",
    "not_blank",
]


class SinkConfig(BaseModel):
    """Base of every sink's config model. Unknown keys are refused, so typos are caught."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _flags(cls, value: Any, info: ValidationInfo) -> Any:
        # Booleans through the project's one parser, as in the core's own config.
        return flag(value) if info.field_name and is_flag_field(cls, info.field_name) else value

    batch_size: int | None = Field(
        default=None, ge=1, description="Events per request; capped at the sink's own maximum."
    )
    timeout: float = Field(default=10.0, gt=0, le=300, description="Seconds per request.")
    concurrency: int | None = Field(
        default=None, ge=1, le=16, description="Batches in flight at once (sink's default)."
    )
    events: list[str] | None = Field(
        default=None, description="Only events whose name matches one of these globs."
    )
    exclude_events: list[str] = Field(
        default_factory=list, description="Never events whose name matches one of these globs."
    )

    def accepts(self, event_name: str) -> bool:
        """Whether this sink instance receives events of that name (``events`` and
        ``exclude_events`` are shell-style globs: ``page_*``, ``$pageview``)."""
        from fnmatch import fnmatchcase

        if self.events is not None and not any(fnmatchcase(event_name, p) for p in self.events):
            return False
        return not any(fnmatchcase(event_name, p) for p in self.exclude_events)

    @property
    def routes_all(self) -> bool:
        return self.events is None and not self.exclude_events

    _url_secrets: UrlSecrets = PrivateAttr(default_factory=UrlSecrets)

    @property
    def url_secrets(self) -> UrlSecrets:
        """The user info and secret query values taken out of the configured URL, which keeps
        ``***`` in their place (see :func:`~waypost.sinks.masking.split_url`)."""
        return self._url_secrets

    def _take_url_secrets(self, url: str, what: str) -> str:
        """``url`` with its credentials taken out into ``url_secrets``."""
        try:
            clean, secrets = split_url(url)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        self._url_secrets = secrets
        return clean

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # URLs in plain str fields may still carry credentials a subclass did not take out.
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if isinstance(value, str) else value


FieldCheck: TypeAlias = "classmethod[SinkConfig, [Any, ValidationInfo], Any]"
"""What :func:`not_blank` makes: a field validator to name in a config class's body, typed as
pydantic's ``field_validator`` types the classmethod it decorates."""


def not_blank(*fields: str) -> FieldCheck:
    """A validator for a config model refusing a blank value (text or ``SecretStr``) of
    ``fields``, e.g. ``_key = not_blank("api_key")``: "api_key must not be empty"."""

    def check(cls: type[SinkConfig], value: Any, info: ValidationInfo) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and not text.strip():
            raise ValueError(f"{info.field_name} must not be empty")
        return value

    return field_validator(*fields)(classmethod(check))


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, *, allow_http: bool = False, what: str = "url") -> str:
    """Validate an endpoint URL: a scheme and host, and ``http://`` only on loopback or when
    ``allow_http`` is set. Returns the URL without a trailing slash. Messages quote the URL
    with its credentials masked."""
    try:
        parsed = urllib.parse.urlsplit(url)
        hostname = parsed.hostname
        parsed.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        raise ValueError(f"{what} {mask_url(url)!r} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not hostname:
        raise ValueError(f"{what} must be an http(s) URL with a host, not {mask_url(url)!r}")
    if parsed.scheme == "http" and not allow_http and not is_loopback_host(hostname):
        raise ValueError(
            f"{what} {mask_url(url)!r} is plain http:// to a non-loopback host; use https://, "
            "or set allow_http: true if the network is trusted"
        )
    return url.rstrip("/")


def destination_of(url: str) -> str:
    """``url`` as status and the manifest show where events go: without credentials, query
    or fragment (a text that is not a URL as it is)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else url


class HttpSinkConfig(SinkConfig):
    """Config shared by sinks that talk HTTP to a vendor: ``host`` (a base URL with scheme,
    the vendor's cloud by default), ``region`` where the vendor has one, ``allow_http``."""

    default_hosts: ClassVar[dict[str, str]] = {}
    """Vendor hosts by region (``""`` is the default region); subclasses fill it."""

    host: str | None = Field(default=None, description="Base URL; defaults to the vendor's cloud.")
    region: str | None = Field(default=None, description="Vendor region, e.g. eu.")
    allow_http: bool = Field(default=False, description="Allow http:// to a non-loopback host.")

    @model_validator(mode="after")
    def _resolve_host(self) -> HttpSinkConfig:
        if self.host is None:
            hosts = type(self).default_hosts
            region = (self.region or "").lower()
            if region not in hosts:
                known = ", ".join(sorted(k for k in hosts if k)) or "none"
                raise ValueError(f"unknown region {self.region!r}; known regions: {known}")
            object.__setattr__(self, "host", hosts[region])
        host = check_endpoint(str(self.host), allow_http=self.allow_http, what="host")
        object.__setattr__(self, "host", self._take_url_secrets(host, "host"))
        return self

    @property
    def base_url(self) -> str:
        assert self.host is not None
        return self.host


@dataclass
class SinkContext:
    """What the core tells a sink about the application it runs in."""

    app: str
    version: str
    instance_id: str
    data_dir: Path
    strict: bool = False
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("waypost.sinks"))


@dataclass
class SendResult:
    """Per-event outcome of one ``send``: ids not named in ``retry`` or ``failed`` were delivered.

    ``retry`` and ``failed`` map event ids to the reason; ``retry_after`` is the destination's
    wish for the next attempt (seconds), if it said one. ``receipt`` is the destination's
    reference to the submission (logged, kept with the records); ``control`` a control block
    it answered (a waypost collector's ``heartbeat_every``, ``sample``, ``pause_until``), which
    the core keeps and applies only to send less (see ``waypost.control``).
    """

    retry: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    dropped_by_destination: dict[str, str] = field(default_factory=dict)
    receipt: str | None = None
    control: dict[str, Any] | None = None

    @classmethod
    def ok(cls, *, receipt: str | None = None) -> SendResult:
        """Every event of the batch was delivered."""
        return cls(receipt=receipt)

    @classmethod
    def retry_all(
        cls, events: Iterable[Event], reason: str, retry_after: float | None = None
    ) -> SendResult:
        return cls(retry={e.id: reason for e in events}, retry_after=retry_after)

    @classmethod
    def fail_all(cls, events: Iterable[Event], reason: str) -> SendResult:
        return cls(failed={e.id: reason for e in events})

    def mark_retry(self, event: Event | str, reason: str) -> None:
        self.retry[event if isinstance(event, str) else event.id] = reason

    def mark_failed(self, event: Event | str, reason: str) -> None:
        self.failed[event if isinstance(event, str) else event.id] = reason

    def mark_dropped(self, event: Event | str, reason: str) -> None:
        """The destination accepted the request but said it dropped this event (no retry)."""
        self.dropped_by_destination[event if isinstance(event, str) else event.id] = reason


class Resource(Protocol):
    """Something a sink opens and closes with itself (:meth:`Sink.own`)."""

    def open(self) -> None: ...

    def close(self) -> None: ...


R = TypeVar("R", bound=Resource)

C_co = TypeVar("C_co", bound=SinkConfig, default=SinkConfig, covariant=True)
"""The config model of a sink class: ``class AcmeSink(Sink[AcmeConfig])`` types ``self.config``."""


class Sink(Generic[C_co]):
    """Base class of sinks. Subclasses set ``type``, name their config model (``Sink[AcmeConfig]``,
    or ``Config = AcmeConfig``) and implement ``send``.

    The core creates one instance per configured sink (on the application's thread: import
    what the sink needs in ``__init__``, and keep it cheap: a forked child makes its own
    instance), calls ``open`` once before the first batch (from a delivery thread, where no
    fork can cut across it: build clients there), ``send`` with
    batches of at most ``max_batch_size`` events, and ``close`` at shutdown. ``send`` either
    returns a :class:`SendResult` or raises :class:`~waypost.errors.SinkError` for the whole
    batch; any other exception counts as a retryable failure of the batch.
    """

    type: ClassVar[str] = ""
    Config: ClassVar[builtins.type[SinkConfig]] = SinkConfig
    """The config model; taken from ``Sink[...]`` when a subclass does not set it."""
    max_batch_size: ClassVar[int] = 500
    default_concurrency: ClassVar[int] = 1
    """Batches in flight at once; raise it only if ``send`` is safe to call from several
    threads (an httpx or requests client is)."""
    deprecated: ClassVar[str | None] = None
    """If set, the sink is deprecated and this says what to use instead."""

    config: C_co
    _masker: Masker | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:
            return
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Sink:
                (model,) = typing.get_args(base)
                if isinstance(model, builtins.type) and issubclass(model, SinkConfig):
                    cls.Config = model

    def __init__(self, name: str, config: C_co, context: SinkContext) -> None:
        self.name = name
        self.config = config
        self.context = context

    @property
    def settings(self) -> C_co:
        """Deprecated: read ``self.config``, typed by ``Sink[...]``."""
        warnings.warn(
            f"{type(self).__name__}.settings is deprecated; use .config",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.config

    @property
    def masker(self) -> Masker:
        """The masking function of this sink: every configured secret and URL credential.
        Add a value the config does not hold with ``self.masker.add(value)``."""
        if self._masker is None:
            self._masker = Masker.for_config(self.config)
        return self._masker

    def mask(self, text: str) -> str:
        """``text`` (a reason, an answer) with this sink's secrets masked as ``***``."""
        return self.masker(text)

    def own(self, resource: R) -> R:
        """Open ``resource`` in :meth:`open` and close it in :meth:`close` (an
        :class:`~waypost.sinks.HttpTransport` is owned by the sink it is made for)."""
        self.__dict__.setdefault("_owned", []).append(resource)
        return resource

    @property
    def concurrency(self) -> int:
        return self.config.concurrency or type(self).default_concurrency

    @property
    def batch_size(self) -> int:
        wanted = self.config.batch_size or self.max_batch_size
        return max(1, min(wanted, self.max_batch_size))

    @property
    def destination(self) -> str:
        """Where events go, for status and the manifest (no credentials, no query string)."""
        target = getattr(self.config, "host", None) or getattr(self.config, "url", None)
        return destination_of(str(target)) if target else self.type

    def open(self) -> None:
        """Prepare connections or clients; called once, lazily, before the first send. The
        default opens what the sink owns (:meth:`own`)."""
        for resource in self.__dict__.get("_owned", ()):
            resource.open()

    def send(self, events: Sequence[Event]) -> SendResult:
        raise NotImplementedError

    def render(self, events: Sequence[Event]) -> Any:
        """What ``send`` would put on the wire, for debug mode (nothing is sent)."""
        return [e.to_dict() for e in events]

    def test_request(self, event: Event) -> dict[str, Any]:
        """Send one event to the destination's validation endpoint if it has one, and return
        the destination's answer for ``waypost test-sink``. The default sends it for real; a
        sink that owns an :class:`~waypost.sinks.HttpTransport` (or an
        :class:`~waypost.sinks.Answers`) reports what the destination answered
        (:meth:`~waypost.sinks.Answers.test_request`)."""
        from waypost.sinks.transport import Answers

        for resource in self.__dict__.get("_owned", ()):
            answers = getattr(resource, "answers", resource)
            if isinstance(answers, Answers):
                return answers.test_request(self, event)
        result = self.send([event])
        return {"delivered": not (result.retry or result.failed), "result": _result_dict(result)}

    def close(self) -> None:
        """Release connections; called once at shutdown, and safe to call twice. The default
        closes what the sink owns (:meth:`own`)."""
        for resource in self.__dict__.get("_owned", ()):
            resource.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} type={self.type!r}>"


def _result_dict(result: SendResult) -> dict[str, Any]:
    return {
        "retry": result.retry,
        "failed": result.failed,
        "dropped": result.dropped_by_destination,
        "retry_after": result.retry_after,
        "receipt": result.receipt,
        "control": result.control,
    }
