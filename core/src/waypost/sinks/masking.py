"""Secrets kept out of every text a sink produces: one detector of secret-looking names, URLs
split from their credentials before any request is made, and one masking function per sink.

A sink's reasons reach logs, ``status()``, the outbox, the CLI and the admin page, so each reason
the toolkit builds passes :class:`Masker`, which knows the sink's configured secret values
(``SecretStr`` fields, header values, URL credentials) and also masks URL user info and
secret-looking query values wherever they appear in a text.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

__all__ = [
    "MASK",
    "Masker",
    "UrlSecrets",
    "basic_auth",
    "is_secret_name",
    "mask",
    "mask_url",
    "split_url",
]

MASK = "***"
"""What a masked value is replaced by, in URLs and reasons alike."""

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
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")

_MIN_SECRET = 3
"""Shorter values are not masked inside texts: they would blot out ordinary words."""

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]*@")
_PAIR = re.compile(r"(?<![\w-])([\w.-]{1,64})=([^&\s#\"'<>,;]+)")
# A credential after its scheme: at least 8 characters with a digit, so prose ("Basic
# authentication") is left alone; known values are masked whatever their shape.
_SCHEME_CREDENTIAL = re.compile(r"\b(Bearer|Basic)\s+(?=[\w.~+/=-]*\d)[\w.~+/=-]{8,}")


def is_secret_name(name: str) -> bool:
    """Whether a setting, header or query parameter of this name holds a secret.

    ``token``, ``api_key``, ``X-API-Key``, ``client_secret``, ``sslpassword``, ``sig``,
    ``X-Amz-Signature`` do; ``measurement_id``, ``project_id``, ``strict`` and ``keyword`` do not.
    """
    lowered = name.lower()
    if any(part in lowered for part in _SECRET_PARTS):
        return True
    words = [w.lower() for w in _WORD.findall(name)]
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
        found = [v for v in (self.username, self.password, *self.params.values()) if v]
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


def mask_url(text: str) -> str:
    """``text`` with URL user info and the values of secret-looking ``name=value`` pairs
    replaced by ``***``, wherever they stand in it."""
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    text = _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _PAIR.sub(
        lambda m: f"{m.group(1)}={MASK}" if is_secret_name(m.group(1)) else m.group(0), text
    )


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with ``secrets`` (in every form :class:`Masker` knows) and URL credentials
    masked as ``***``: the toolkit's one masking function, for texts that no sink's own
    :meth:`~waypost.Sink.mask` covers."""
    return Masker(secrets)(text)


class Masker:
    """Masks one sink's secrets in any text: the values it was given, in the forms an answer
    may echo them (as they are, URL-encoded, JSON-escaped, the token of ``Bearer <token>``, the
    password inside a Basic credential), then URL credentials by shape (:func:`mask_url`)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        for secret in secrets:
            self.add(secret)

    @classmethod
    def for_config(cls, config: BaseModel) -> Masker:
        """A masker for every secret in a config: ``SecretStr`` values at any depth, the values
        of header maps, and the credentials of URLs (including ``url_secrets``)."""
        masker = cls()
        for value in _secret_values(config):
            masker.add(value)
        return masker

    def add(self, secret: str) -> None:
        for variant in _variants(secret):
            if len(variant) >= _MIN_SECRET:
                self._values.add(variant)
        self._pattern = None

    def __bool__(self) -> bool:
        return bool(self._values)

    def __call__(self, text: str) -> str:
        if self._values:
            if self._pattern is None:
                ordered = sorted(self._values, key=len, reverse=True)  # longest first
                self._pattern = re.compile("|".join(map(re.escape, ordered)))
            text = self._pattern.sub(MASK, text)
        return mask_url(text)


def _variants(secret: str) -> Iterator[str]:
    yield secret
    yield urllib.parse.quote(secret, safe="")
    yield urllib.parse.quote_plus(secret, safe="")
    yield json.dumps(secret)[1:-1]
    scheme, _, credential = secret.partition(" ")
    if credential and scheme.isalpha():  # "Bearer <token>", "Basic <base64>"
        yield from _variants(credential.strip())
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return
            yield decoded
            yield decoded.partition(":")[2]


def _secret_values(value: Any, *, name: str = "") -> Iterator[str]:
    if isinstance(value, (SecretStr, SecretBytes)):
        secret = value.get_secret_value()
        text = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
        yield text
        if "://" in text:
            yield from _url_values(text)
    elif isinstance(value, UrlSecrets):
        yield from value.values()
    elif isinstance(value, BaseModel):
        for key in type(value).model_fields:
            yield from _secret_values(getattr(value, key, None), name=key)
        secrets = getattr(value, "url_secrets", None)
        if isinstance(secrets, UrlSecrets):
            yield from secrets.values()
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, str) and (name == "headers" or is_secret_name(str(key))):
                yield item
            else:
                yield from _secret_values(item, name=str(key))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _secret_values(item, name=name)
    elif isinstance(value, str):
        if "://" in value and ("@" in value or "=" in value):
            yield from _url_values(value)
        elif name and is_secret_name(name) and value:
            yield value


def _url_values(url: str) -> list[str]:
    try:
        return split_url(url)[1].values()
    except ValueError:
        return []
