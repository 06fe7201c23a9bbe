"""Secrets kept out of everything waypost prints: one sanitiser, for the whole process, that
knows every configured secret value of what is live and runs the scrubbers over any text before
it reaches a log line, ``status()``, the outbox, the CLI or the admin page.

    from waypost.privacy import secrets

    held = secrets.SANITISER.hold()      # a Telemetry's, released when it shuts down
    held.add_config(sink_config)         # SecretStr fields, header values, URL credentials
    reason = secrets.sanitise(f"HTTP 401: {body}")

:func:`sanitise` masks each known secret (as given, URL-encoded, JSON-escaped, the token of
``Bearer <token>``, the parts of a Basic credential) with ``***``, then applies the scrubbers'
rules (URL user info, ``name=value`` pairs of secret names, bearer tokens, vendor keys, e-mail
addresses...; network addresses are left, since an operator needs the destination's) and masks
the value of any ``name=value`` pair whose name says secret (``key=``, ``sig=``, ``token=``).
:func:`guard_loggers` makes the loggers of waypost, its plugins, httpx and httpcore pass every
record through it, so that not even a library's own log line can print a known secret.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

from waypost.privacy.scrub import BUILTIN_RULES, Scrubber

__all__ = [
    "MASK",
    "Sanitiser",
    "SecretHold",
    "UrlSecrets",
    "add_config",
    "add_secrets",
    "basic_auth",
    "guard_loggers",
    "is_secret_name",
    "masked",
    "sanitise",
    "sanitise_record",
    "secret_values",
    "split_url",
]

MASK = "***"
"""What a known secret value is replaced by."""

_MIN_SECRET = 4
"""Shorter values are not masked inside texts: they would blot out ordinary words."""
_MIN_CUT = 6
"""A text that ends with this many characters or more of a known secret's beginning ends with
a secret that was cut: they are masked too."""
_LONGEST_CUT = 512
"""Longer beginnings are not looked for (a secret that long is masked whole, mostly)."""

# Names holding one of these anywhere (``sslpassword``, ``client_secret``, ``X-Amz-Signature``).
_SECRET_PARTS = (
    "password", "passwd", "passphrase", "secret", "token", "credential", "signature", "apikey",
    "api_key", "api-key", "privatekey", "private_key", "accesskey", "access_key",
)  # fmt: skip
# Names with one of these as a word of their own (``key``, ``X-API-Key``, ``auth``, ``sig``).
_SECRET_WORDS = frozenset(
    {"key", "auth", "authorization", "pwd", "pw", "pass", "sig", "session", "cookie", "jwt",
     "dsn", "bearer"}
)  # fmt: skip
_NAME_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_USERINFO = re.compile(next(r.pattern for r in BUILTIN_RULES if r.name == "url_credentials"))
_MAPS_OF_SECRETS = frozenset({"headers", "params", "query", "cookies"})
"""Settings whose values are all secrets, whatever their names (``headers: {X-Key: ...}``)."""
_PAIR = re.compile(r"(?<![\w-])([\w.-]{1,64})=(?!\[REDACTED|\*\*\*)([^&\s#\"'<>,;]+)")


def is_secret_name(name: str) -> bool:
    """Whether a setting, header or query parameter of this name holds a secret.

    ``token``, ``api_key``, ``X-API-Key``, ``client_secret``, ``sslpassword``, ``sig``,
    ``X-Amz-Signature``, ``writeKey`` do; ``measurement_id``, ``project_id``, ``strict`` and
    ``keyword`` do not.
    """
    lowered = name.lower()
    if any(part in lowered for part in _SECRET_PARTS):
        return True
    words = [w.lower() for w in _NAME_WORD.findall(name)]
    return any(w in _SECRET_WORDS for w in words) or bool(words and words[-1].endswith("key"))


def basic_auth(username: str, password: str) -> str:
    """The ``Authorization`` header value of HTTP Basic authentication."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


@dataclass(frozen=True)
class UrlSecrets:
    """The credentials taken out of a configured URL: its user info (sent as Basic auth) and
    the values of its secret-looking query parameters (put back on the wire only)."""

    username: str | None = None
    password: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def basic_auth(self) -> str | None:
        """The ``Authorization`` header value for the user info, if there was any."""
        if self.username is None and self.password is None:
            return None
        return basic_auth(self.username or "", self.password or "")

    def values(self) -> list[str]:
        """Everything taken out: the user name, the password, the query values, the Basic
        credential."""
        found = [v for v in (self.username, self.password, *self.params.values()) if v]
        basic = self.basic_auth
        return [*found, basic] if basic else found

    def secrets(self) -> list[str]:
        """What must never be shown: as :meth:`values`, without a user name that stands beside
        a password (no secret, and "admin" masked everywhere would blot out ordinary words)."""
        user = self.username if self.password is None else None
        found = [v for v in (user, self.password, *self.params.values()) if v]
        basic = self.basic_auth
        return [*found, basic] if basic else found

    def __bool__(self) -> bool:
        return self.username is not None or self.password is not None or bool(self.params)

    def __repr__(self) -> str:  # never the values
        return f"UrlSecrets(user_info={self.username is not None}, params={sorted(self.params)})"


def split_url(url: str) -> tuple[str, UrlSecrets]:
    """``url`` without its user info and with its secret-looking query values replaced by
    ``***``, and the secrets taken out. The query keeps its order; nothing else changes."""
    parts = urllib.parse.urlsplit(url)
    username = password = None
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        username = urllib.parse.unquote(user)
        password = urllib.parse.unquote(pw) if ":" in userinfo else None
    params: dict[str, str] = {}
    query = []
    for piece in parts.query.split("&") if parts.query else ():
        name, eq, value = piece.partition("=")
        plain = urllib.parse.unquote_plus(name)
        if eq and value and is_secret_name(plain):
            if plain in params:
                raise ValueError(f"the query parameter {plain!r} is given twice")
            params[plain] = urllib.parse.unquote_plus(value)
            piece = f"{name}={MASK}"
        query.append(piece)
    clean = urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="&".join(query)))
    return clean, UrlSecrets(username, password, params)


def _url_secrets(url: str) -> Iterator[str]:
    """The credentials a URL carries: its user info (found as the scrubbers find it, so that a
    password holding "/" or "@" is taken whole), and its secret-looking query values."""
    found = _USERINFO.search(url)
    if found is not None:
        userinfo = found.group()[found.group().index("://") + 3 : -1]
        user, colon, password = userinfo.partition(":")
        taken = UrlSecrets(
            urllib.parse.unquote(user), urllib.parse.unquote(password) if colon else None
        )
        yield userinfo
        yield from taken.secrets()
        url = url[: found.start()] + url[found.end() :]
    try:
        query = urllib.parse.urlsplit(url).query
    except ValueError:
        return
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=False):
        if is_secret_name(name):
            yield value


_IDENTIFIER = re.compile(r"[a-z][a-z0-9]*(?:[_.][a-z0-9]+)+")


def _names_a_field(name: str, value: str) -> bool:
    """Whether a ``*_key`` setting names a field rather than holding a key (``dedupe_key:
    instance_id``, ``partition_key: distinct_id``): masked, those would blot out the name."""
    return name.lower().endswith("key") and _IDENTIFIER.fullmatch(value) is not None


def secret_values(value: Any, *, name: str = "") -> Iterator[str]:
    """Every secret in a configuration: ``SecretStr`` values at any depth, the values of
    settings whose names say secret, every value of a ``headers``/``params`` map, and the
    credentials of URLs (their user info and secret-looking query values). ``name`` is the
    setting ``value`` sits under."""
    if isinstance(value, (SecretStr, SecretBytes)):
        secret = value.get_secret_value()
        text = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
        yield text
        if "://" in text:
            yield from _url_secrets(text)
    elif isinstance(value, BaseModel):
        for key in type(value).model_fields:
            yield from secret_values(getattr(value, key, None), name=key)
        extra = value.model_extra or {}
        for key, item in extra.items():
            yield from secret_values(item, name=str(key))
        found = getattr(value, "url_secrets", None)  # what a sink took out of its URL
        if isinstance(found, UrlSecrets):
            yield from secret_values(found)
    elif isinstance(value, UrlSecrets):
        yield from value.secrets()
    elif isinstance(value, Mapping):
        every = name.lower() in _MAPS_OF_SECRETS
        for key, item in value.items():
            if every and isinstance(item, (str, SecretStr)):
                yield from secret_values(SecretStr(item) if isinstance(item, str) else item)
            else:
                yield from secret_values(item, name=str(key))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from secret_values(item, name=name)
    elif isinstance(value, str) and "${" not in value:  # a reference names no secret
        if "://" in value:
            yield from _url_secrets(value)
        elif name and is_secret_name(name) and not _names_a_field(name, value):
            yield value


def _variants(secret: str) -> Iterator[str]:
    """``secret`` in the forms an answer or a message may quote it."""
    yield secret
    yield urllib.parse.quote(secret, safe="")
    yield urllib.parse.quote_plus(secret, safe="")
    yield json.dumps(secret)[1:-1]
    yield json.dumps(secret, ensure_ascii=False)[1:-1]
    yield html.escape(secret)
    scheme, _, credential = secret.partition(" ")
    credential = credential.strip()
    if credential and scheme.isalpha():  # "Bearer <token>", "Basic <base64>"
        yield from _variants(credential)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential, validate=True).decode()
            except ValueError:
                return
            yield decoded
            yield decoded.partition(":")[2]


def _known_forms(secrets: Iterable[str]) -> frozenset[str]:
    """Every form of these secrets worth looking for."""
    return frozenset(
        variant
        for secret in secrets
        if isinstance(secret, str)
        for variant in _variants(secret.strip())
        if len(variant) >= _MIN_SECRET
    )


class SecretHold:
    """Secret values a :class:`Sanitiser` knows while this holds them: :meth:`add` more,
    :meth:`release` them (released, a hold that is added to holds again). Made by
    :meth:`Sanitiser.hold`."""

    def __init__(self, sanitiser: Sanitiser) -> None:
        self._sanitiser = sanitiser
        self._token: int | None = None

    def add(self, secrets: Iterable[str]) -> None:
        """Hold these values too."""
        if self._token is None:
            self._token = next(self._sanitiser._tokens)
        self._sanitiser._add_held(self._token, secrets)

    def add_config(self, config: Any) -> None:
        """Hold every secret of a configuration (see :func:`secret_values`)."""
        self.add(secret_values(config))

    def release(self, *, wait: bool = True) -> None:
        """Let go of every value held (a value another hold or :meth:`Sanitiser.add` gave
        stays known). Safe to call twice; ``wait=False`` for a finalizer."""
        token, self._token = self._token, None
        if token is not None:
            self._sanitiser._release(token, wait=wait)

    def __enter__(self) -> SecretHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:  # never the values
        return f"<SecretHold held={self._token is not None}>"


class Sanitiser:
    """Masks known secret values in any text, then applies the scrubbers (see the module).

    A value is known for good (:meth:`add`) or while a :class:`SecretHold` holds it
    (:meth:`hold`): a sink's secrets are held for the sink's life, a ``Telemetry``'s until it
    shuts down, so that what one instance configured masks nothing of another's once it is
    gone."""

    def __init__(self, secrets: Iterable[str] = (), *, scrubber: Scrubber | None = None) -> None:
        self._scrubber = scrubber or Scrubber()
        self._values: frozenset[str] = frozenset()
        self._kept: frozenset[str] = frozenset()
        self._holds: dict[int, frozenset[str]] = {}
        self._dropped: list[int] = []  # released where the lock could not be waited for
        self._tokens = itertools.count(1)
        self._compiled: tuple[frozenset[str], re.Pattern[str] | None, frozenset[str], int] = (
            self._values,
            None,
            frozenset(),
            0,
        )
        self._lock = threading.Lock()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Know these secret values from now on (each in every form it may be quoted in)."""
        new = _known_forms(secrets)
        with self._lock:
            if not new <= self._kept:
                self._kept = self._kept | new
                self._update()

    def hold(self, secrets: Iterable[str] = ()) -> SecretHold:
        """Know these secret values (and those added to the hold) until it is released."""
        held = SecretHold(self)
        held.add(secrets)
        return held

    def apart(self, secrets: Iterable[str] = ()) -> Sanitiser:
        """A sanitiser that knows ``secrets`` alone, with the same scrubbers."""
        return Sanitiser(secrets, scrubber=self._scrubber)

    def _add_held(self, token: int, secrets: Iterable[str]) -> None:
        new = _known_forms(secrets)
        with self._lock:
            held = self._holds.get(token, frozenset())
            if not new <= held:
                self._holds[token] = held | new
                self._update()

    def _release(self, token: int, *, wait: bool = True) -> None:
        # Without waiting from a finalizer: the collector may run it in this very thread while
        # it holds the lock. The value is then dropped by the next change or lookup.
        self._dropped.append(token)
        if self._lock.acquire(blocking=wait):
            try:
                self._update()
            finally:
                self._lock.release()

    def _update(self) -> None:
        """The known values made again from what is kept and held (the lock held)."""
        while self._dropped:
            self._holds.pop(self._dropped.pop(), None)
        values = self._kept.union(*self._holds.values())
        if values != self._values:
            self._values = values  # a new set: readers hold the old one

    def _renew_lock(self) -> None:
        self._lock = threading.Lock()

    def add_config(self, config: Any) -> None:
        """Know every secret of a configuration (see :func:`secret_values`)."""
        self.add(secret_values(config))

    def knows(self, text: str) -> bool:
        """Whether ``text`` holds a known secret value."""
        pattern = self._known()[0]
        return pattern is not None and pattern.search(text) is not None

    def _known(self) -> tuple[re.Pattern[str] | None, frozenset[str], int]:
        """The pattern of every known value, and their beginnings (see :data:`_MIN_CUT`).

        No lock on this path: it runs in log filters, also in a child forked while another
        thread held a lock. What is made is kept with the set it was made of, so what was made
        while a secret was being added is made again."""
        if self._dropped and self._lock.acquire(blocking=False):
            try:
                self._update()
            finally:
                self._lock.release()
        values = self._values
        made, pattern, cuts, longest = self._compiled
        if made is not values:
            ordered = sorted(values, key=len, reverse=True)  # longest first
            pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
            cuts = frozenset(
                value[:n]
                for value in values
                if "://" not in value  # a URL's beginning is its scheme and host
                for n in range(_MIN_CUT, len(value))
            )
            longest = min(max(map(len, cuts), default=0), _LONGEST_CUT)
            self._compiled = (values, pattern, cuts, longest)
        return pattern, cuts, longest

    def __call__(self, text: str) -> str:
        if not text:
            return text
        text = str(text)
        pattern, cuts, longest = self._known()
        if pattern is not None:
            text = pattern.sub(MASK, text)
            text = _mask_cut(text, cuts, longest)
        # Credentials by shape, as the sinks mask them ("https://***@host", "token=***"); the
        # scrubbers leave "***" as it is, and find the rest.
        if "@" in text:
            text = _USERINFO.sub(_mask_userinfo, text)
        if "=" in text:
            text = _PAIR.sub(_mask_pair, text)
        kept: list[str] = []
        if "@" in text:  # the gate's remarks ("email@context.owner") are no addresses
            text = _REMARK.sub(lambda m: _keep(kept, m.group()), text)
        if "telemetry." in text:  # "telemetry.sinks.x.api_key: <reason>" names a place
            text = _KEY_PATH.sub(lambda m: _keep(kept, m.group()), text)
        text = self._scrubber.scrub_text(text, "", [], exempt=_KEEP)
        if kept:
            text = _KEPT.sub(lambda m: _kept(kept, m), text)
        return text


def _mask_cut(text: str, cuts: frozenset[str], longest: int) -> str:
    """``text`` without the beginning of a known secret it ends with: a reason cut to a length
    (an answer's snippet) may stop inside one."""
    for n in range(min(len(text), longest), _MIN_CUT - 1, -1):
        if text[-n:] in cuts:
            return text[:-n] + MASK
    return text


def _mask_userinfo(match: re.Match[str]) -> str:
    found = match.group()
    return found[: found.index("://") + 3] + MASK + "@"


def _keep(kept: list[str], text: str) -> str:
    """A placeholder the scrubbers leave alone, for ``text`` put back after them."""
    kept.append(text)
    return f"\x00{len(kept) - 1}\x00"


def _kept(kept: list[str], match: re.Match[str]) -> str:
    index = int(match.group(1))
    return kept[index] if index < len(kept) else ""  # a text may hold NULs of its own


_KEPT = re.compile("\x00(\\d{1,6})\x00")


_REMARK_NAMES = "|".join(
    sorted({rule.name for rule in BUILTIN_RULES} | {"secret_key", "undeclared"})
)
_REMARK = re.compile(
    rf"(?<![\w.+-])(?:{_REMARK_NAMES})@(?:properties|context|name|distinct_id)\b"
    r"(?:[.\[][\w.\[\]-]*)?"
)
"""A remark of the privacy gate: a rule's name and the place it redacted (never the value)."""

_KEY_PATH = re.compile(r"(?<![\w.])telemetry(?:\.[\w-]+|\[\d+\])+(?=: )")
"""A config key path as a ConfigError names it: the reason after it is no secret pair."""

_KEEP = frozenset({"ipv4", "ipv6"})
"""Rules the sanitiser does not apply: an operator needs the destination's address."""


def _mask_pair(match: re.Match[str]) -> str:
    return f"{match.group(1)}={MASK}" if is_secret_name(match.group(1)) else match.group(0)


SANITISER = Sanitiser()
"""The process's sanitiser: every configuration loaded in this process adds its secrets."""

if hasattr(os, "register_at_fork"):  # a child forked while a thread was adding secrets
    os.register_at_fork(after_in_child=SANITISER._renew_lock)


def sanitise(text: str) -> str:
    """``text`` with every known secret and everything the scrubbers find masked."""
    return SANITISER(text)


def add_secrets(secrets: Iterable[str]) -> None:
    """Make the process's sanitiser know these secret values."""
    SANITISER.add(secrets)


def add_config(config: Any) -> None:
    """Make the process's sanitiser know every secret of a configuration."""
    SANITISER.add_config(config)


def masked(value: Any, *, name: str = "") -> Any:
    """A copy of a configuration value fit to show (a ``repr``, a dump): the value of a setting
    whose name says secret, and every value of a ``headers``/``params`` map, is ``***``; texts
    pass :func:`sanitise` (URL user info, secret query values, known secrets). ``SecretStr``
    values stay as they are (they print as ``**********``)."""
    if isinstance(value, Mapping):
        every = name.lower() in _MAPS_OF_SECRETS
        return {
            key: MASK if (every and item is not None) else masked(item, name=str(key))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(masked(item, name=name) for item in value)
    if isinstance(value, str):
        if name and is_secret_name(name) and "${" not in value:
            return MASK
        return sanitise(value)
    return value


def sanitise_record(record: logging.LogRecord) -> bool:
    """Pass a log record's message (and its traceback) through :func:`sanitise`; a record that
    holds nothing to mask is left as it is, and so is an event the ``log`` sink writes (marked
    ``waypost_gated``: the gate scrubbed it, as it does for every sink). Always ``True``: a
    record is masked, never dropped."""
    if getattr(record, "waypost_gated", False):
        return True
    try:
        message = record.getMessage()
    except Exception:
        return True
    clean = sanitise(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = sanitise(logging.Formatter().formatException(record.exc_info))
    return True


_GUARDED = (
    "httpx", "httpcore", "h11", "h2", "hpack", "urllib3", "requests", "posthog", "mixpanel",
    "amplitude", "snowflake", "confluent_kafka", "clickhouse_connect", "chdb", "sqlalchemy",
    "psycopg", "psycopg2", "opentelemetry",
)  # fmt: skip
"""Libraries the sinks talk through, whose own lines may print a URL, a header or an answer
(PostHog's SDK logs every answer at DEBUG, hpack every header it encodes)."""


def guard_loggers() -> None:
    """Give the loggers of waypost, of its plugins (``waypost_*``) and of the libraries sinks talk
    through (httpx, httpcore, urllib3, the vendors' SDKs; their children too) the sanitising
    filter of :mod:`waypost.logs`. A filter applies to its own logger's records only, so this is
    called again once sinks are made and opened: loggers made since are guarded too (waypost's
    own get it from :func:`waypost.logs.get_logger`)."""
    from waypost.logs import SANITISING

    names = [
        name
        for name in list(logging.Logger.manager.loggerDict)
        if name == "waypost"
        or name.startswith(("waypost.", "waypost_"))
        or name.startswith(tuple(f"{lib}." for lib in _GUARDED))
    ]
    for name in {*names, *_GUARDED}:
        logger = logging.getLogger(name)
        if SANITISING not in logger.filters:
            logger.addFilter(SANITISING)
