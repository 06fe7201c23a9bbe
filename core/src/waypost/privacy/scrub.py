"""Scrubbing: the built-in rules and the :class:`Scrubber` that redacts personal data and
secrets from every string property and application-chosen id (see ``docs/privacy.md``)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from waypost.errors import ConfigError

if TYPE_CHECKING:
    from waypost.config import TelemetryConfig


@dataclass(frozen=True)
class Rule:
    """A scrubbing rule: text matching ``pattern`` is replaced by ``[REDACTED:<name>]``.

    ``check``, if given, confirms a match (a Luhn check, a decoding) so that look-alikes are
    left alone. ``replacement``, if given, builds the text put in place of a match (the home-path
    rule keeps the path and hides the user name). ``flags`` apply to this rule alone. Patterns
    are joined into one regular expression, so they must not use numbered backreferences.
    """

    name: str
    pattern: str
    check: Callable[[str], bool] | None = None
    flags: int = 0
    replacement: Callable[[str], str] | None = None


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(text: str) -> bool:
    """True when the digits of ``text`` up to some separator (or the end) are 14 to 19 digits
    passing the Luhn check: a card number, perhaps followed by another number."""
    digits = ""
    for chunk in re.split(r"[ -]", text):
        digits += chunk
        if len(digits) > 19:
            break
        if len(digits) >= 14 and _luhn_ok(digits):
            return True
    return False


_PROSE = re.compile(r"[A-Z]?[a-z]+(?:-[a-z]+)*")


def _token(text: str) -> bool:
    """Anything after ``Bearer``/``Token`` is a credential unless it is a plain word:
    ``Bearer authentication`` and ``token-based`` are prose."""
    return _PROSE.fullmatch(text.split(None, 1)[1].rstrip(".,;:!?")) is None


def _basic(text: str) -> bool:
    """``Basic`` credentials decode to ``user:password``."""
    value = text.split(None, 1)[1].rstrip("=")
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return False
    return ":" in decoded and decoded.isprintable()


def _home(found: str) -> str:
    return _HOME_USER.sub("<user>", found)


_HOME_USER = re.compile(r"[^/\\]+$")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_V4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = r"[0-9A-Fa-f]{1,4}"
_USER = r"\w(?:[\w.@$+-]*[\w$-])?"  # a user name: "jane", "jane.doe", "svc-build$"


def _ipv6_pattern() -> str:
    """Every textual form of an IPv6 address (RFC 4291 2.2, RFC 5952) as one alternation.

    Forms with a dotted IPv4 tail come first so that ``::ffff:192.0.2.1`` is taken whole; a
    bare ``::`` is not an address worth redacting and is left out.
    """

    def groups(n: int) -> str:
        return "" if n == 0 else _H if n == 1 else rf"{_H}(?::{_H}){{{n - 1}}}"

    alts = [rf"(?:{_H}:){{6}}{_V4}"]
    for left in range(6):  # groups before "::", IPv4 tail counts as two groups
        alts.append(rf"{groups(left)}::(?:{_H}:){{0,{5 - left}}}{_V4}")
    alts.append(rf"{_H}(?::{_H}){{7}}")
    for left in range(1, 8):
        right = 6 - left
        tail = rf"(?:{_H}(?::{_H}){{0,{right}}})?" if right >= 0 else ""
        alts.append(rf"{groups(left)}::{tail}")
    alts.append(rf"::{_H}(?::{_H}){{0,6}}")
    # the lookahead skips positions that cannot start an address before trying the forms
    return rf"(?<![\w.])(?=[0-9A-Fa-f]{{0,4}}:[0-9A-Fa-f:])(?:{'|'.join(alts)})(?!\w|\.\d)"


_CREDENTIAL_NAMES = (
    r"pass(?:word|wd|phrase)|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|"
    r"private[_-]?key|signing[_-]?key|credentials?|(?:proxy-)?authorization"
)

BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(
        "private_key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*)",
    ),
    Rule("jwt", r"(?<![\w-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    Rule(
        "url_credentials",
        r"(?<![\w+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]+@",
    ),
    Rule(
        "api_key",
        r"(?<![A-Za-z0-9])(?:"
        r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?![0-9A-Z])"  # AWS access key ids
        r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,}"  # GitHub
        r"|xox[abeoprs]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}"  # Slack tokens
        r"|hooks\.slack\.com/services/[A-Za-z0-9/]+"  # Slack webhooks
        r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9]{16,}"  # Stripe
        r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI (sk-..., sk-proj-...) and look-alikes
        r"|AIza[0-9A-Za-z_-]{35}|ya29\.[0-9A-Za-z_-]{20,}"  # Google
        r"|glpat-[A-Za-z0-9_-]{20,}|npm_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,}"
        r"|phx_[A-Za-z0-9]{20,}"
        r")",
    ),
    Rule(
        "secret_pair",
        # The name ends in a credential word (``db_password=``, ``accessToken:``); the cheap
        # lookahead skips most positions before the alternation is tried.
        rf"(?=[AaCcPpSsTt])(?i:(?:{_CREDENTIAL_NAMES})[\"']?[ \t]*[=:][ \t]*"
        r"(?:(?:bearer|basic|token)[ \t]+)?(?:\"[^\"\n]*\"|'[^'\n]*'|[^\s&;,'\"]+))",
    ),
    Rule(
        "bearer_token",
        r"(?<![\w-])(?:[Bb]earer|BEARER|[Tt]oken|TOKEN)[ \t]+[A-Za-z0-9_.~+/-]{8,}=*",
        check=_token,
    ),
    Rule("basic_auth", r"(?<![\w-])(?:[Bb]asic|BASIC)[ \t]+[A-Za-z0-9+/]{4,}={0,2}", check=_basic),
    Rule(
        "email",
        r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]+@"
        r"[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)*\.(?:[Xx][Nn]--[\w-]+|[^\W\d_]{2,})",
    ),
    Rule("ipv4", rf"(?=\d)(?<![\d.]){_V4}(?!\d|\.\d)"),
    Rule("ipv6", _ipv6_pattern()),
    Rule(
        "credit_card",
        r"(?=[2-6])(?<![\w.])(?<!\w-)[2-6]\d{3}(?:[ -]?\d){10,15}(?!\w|\.\d|-\w)",
        check=_card,
    ),
    Rule(
        "home_path",
        # A user name starts with a letter or digit ("/home/." and "/home/," are no one); on
        # Windows it may hold spaces when a further path segment follows.
        rf"(?=/[hU])(?<![\w.~-])(?:/home/|/Users/)(?!<user>){_USER}"
        r"|(?=[A-Za-z]:[\\/])(?<![A-Za-z])[A-Za-z]:(?:\\+|/)(?:[Uu]sers|USERS)(?:\\+|/)"
        rf"(?!<user>)(?:[^\s\\/:*?\"<>|.,;][^\\/:*?\"<>|\r\n\t]*(?=[\\/])|{_USER})",
        replacement=_home,
    ),
)
"""The built-in rules, in the order they are tried at each position of a text."""

SECRET_KEYS = frozenset(
    {
        "password", "passwd", "pwd", "passphrase", "secret", "token", "apikey", "accesskey",
        "secretkey", "privatekey", "signingkey", "clientsecret", "credential", "credentials",
        "authorization", "cookie", "setcookie", "email", "emailaddress", "ip",
        "ipaddress", "ipaddr", "remoteaddr", "remoteaddress", "xforwardedfor", "xrealip",
    }
)  # fmt: skip
"""Property names whose values are redacted whatever they hold. A name matches when it is one
of these, or when its last word or last two words are (``accessToken``, ``client_ip``,
``X-API-Key``), so ``tokenCount``, ``max_tokens`` and ``tooltip`` are left alone."""

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_REDACTION = re.compile(r"\[REDACTED:[^\]]*\]")


_CACHED_STRINGS = 4096
"""How many clean strings a Scrubber remembers before starting over."""
_CACHED_LENGTH = 256
"""Longer strings are always scanned: they are rarely repeated."""


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


_PLAIN, _SENSITIVE, _VERSION = 0, 1, 2
_KEY_REDACTED = "[REDACTED:secret_key]"
_INF = float("inf")
_BIG_INT = 10**13  # 14 digits and more may be a card number; counts and sizes stay below


@dataclass
class Scrubber:
    """Redacts personal data and secrets from property values (and keys), leaving remarks.

    Remarks read ``<rule>@<field path>``; the redacted value itself is never kept. All rules
    are one combined regular expression, so an ordinary short string costs one ``search``.
    """

    rules: list[Rule] = field(default_factory=lambda: list(BUILTIN_RULES))
    secret_keys: frozenset[str] = SECRET_KEYS

    def __post_init__(self) -> None:
        self._keys: dict[str, int] = {}
        self._compile()

    @classmethod
    def from_config(cls, config: TelemetryConfig, extra: Iterable[Rule] = ()) -> Scrubber:
        scrub = config.scrub
        rules = [r for r in BUILTIN_RULES if r.name not in scrub.disable]
        for name, pattern in scrub.patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"invalid regular expression: {exc}", key=f"telemetry.scrub.patterns.{name}"
                ) from None
            rules.append(Rule(name, pattern))
        rules += list(extra)
        keys = SECRET_KEYS | {_norm_key(k) for k in scrub.keys}
        return cls(rules=rules, secret_keys=keys)

    def add(self, rule: Rule) -> None:
        self.rules.append(rule)
        self._compile()

    def _compile(self) -> None:
        parts = []
        self._by_group: dict[str, Rule] = {}
        # Telemetry repeats the same short strings (keys, plans, feature names): remembering
        # which ones matched no rule spares the combined regex most of its work.
        self._clean: dict[str, None] = {}
        for i, rule in enumerate(self.rules):
            group = f"_wp{i}"
            re.compile(rule.pattern, rule.flags)  # fail early with the rule's own pattern
            inline, letters = rule.pattern, ""
            lead = re.match(r"\(\?([aiLmsux]+)\)", inline)
            if lead:
                inline, letters = inline[lead.end() :], lead.group(1)
            for flag, letter in ((re.I, "i"), (re.M, "m"), (re.S, "s"), (re.X, "x")):
                if rule.flags & flag and letter not in letters:
                    letters += letter
            body = f"(?{letters}:{inline})" if letters else inline
            parts.append(f"(?P<{group}>{body})")
            self._by_group[group] = rule
        self._regex = re.compile("|".join(parts)) if parts else None

    def scrub_text(
        self, text: str, path: str, remarks: list[str], *, exempt: str | None = None
    ) -> str:
        """``text`` with every match redacted; one remark per redaction. The rule named
        ``exempt``, if any, is not applied."""
        cache = self._clean
        if text in cache and exempt is None:
            return text
        clean = self._scan(text, path, remarks, exempt)
        if clean is text and exempt is None and len(text) <= _CACHED_LENGTH:
            if len(cache) >= _CACHED_STRINGS:  # bounded: values may be generated
                cache.clear()
            cache[text] = None
        # A redaction can uncover a match its neighbour hid (``token=a&b@example.org``: the
        # address started inside the secret); look again, only when something was redacted.
        for _ in range(3):
            if clean is text:
                break
            text, clean = clean, self._scan(clean, path, remarks, exempt)
        return clean

    def _scan(self, text: str, path: str, remarks: list[str], exempt: str | None) -> str:
        regex = self._regex
        if regex is None:
            return text
        match = regex.search(text)
        if match is None:
            return text
        out: list[str] = []
        last = 0
        while match is not None:
            start, end = match.span()
            rule = self._by_group[match.lastgroup or ""]
            found = match.group()
            if (
                end == start
                or rule.name == exempt
                or (rule.check is not None and not rule.check(found))
            ):
                # A look-alike: look again from the next character, so that a real match
                # overlapping the look-alike is not skipped.
                match = regex.search(text, start + 1)
                continue
            out.append(text[last:start])
            out.append(rule.replacement(found) if rule.replacement else f"[REDACTED:{rule.name}]")
            remarks.append(f"{rule.name}@{path}")
            last = end
            match = regex.search(text, end)
        out.append(text[last:])
        return "".join(out)

    def sensitive_key(self, key: str) -> bool:
        """True when a property named ``key`` holds a secret or personal data by its name."""
        return self._key_kind(key) == _SENSITIVE

    def _key_kind(self, key: str) -> int:
        kind = self._keys.get(key)
        if kind is None:
            keys = self.secret_keys
            name = _REDACTION.sub(" ", key)  # "[REDACTED:bearer_token]" names no token
            words = [w.lower() for w in _WORDS.findall(name)]
            if (
                _norm_key(name) in keys
                or (len(words) >= 1 and words[-1] in keys)
                or (len(words) >= 2 and words[-2] + words[-1] in keys)
            ):
                kind = _SENSITIVE
            elif words and words[-1] == "version":
                kind = _VERSION
            else:
                kind = _PLAIN
            if len(self._keys) >= 4096:  # bounded: keys may be generated
                self._keys.clear()
            self._keys[key] = kind
        return kind

    def as_is(self, properties: dict[str, Any]) -> bool:
        """True when ``properties``, a flat dict, needs neither coercion nor scrubbing: every
        key and string was seen clean before, and every other value is a JSON scalar that no
        rule applies to (a finite float, a short int, a bool, None)."""
        cache, kinds = self._clean, self._keys
        for key, item in properties.items():
            if type(key) is not str or key not in cache or kinds.get(key) != _PLAIN:
                return False
            of = type(item)
            if of is str:
                if item not in cache:
                    return False
            elif of is int:
                if not -_BIG_INT < item < _BIG_INT:
                    return False
            elif of is float:
                if not -_INF < item < _INF:  # nan compares false too
                    return False
            elif of is not bool and item is not None:
                return False
        return True

    def scrub(self, value: Any, path: str, remarks: list[str]) -> Any:
        """Return ``value`` with every match redacted; append a remark per redaction.

        Values are JSON data (as :func:`waypost.events.coerce` returns): strings are scanned,
        integers of 14 digits and more too (a card number sent as a number), keys of mappings
        too; a value under a sensitive name (:data:`SECRET_KEYS`) is replaced whole.
        """
        if isinstance(value, str):
            return self.scrub_text(value, path, remarks)
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            cache, kinds = self._clean, self._keys
            for key, item in value.items():
                if key in cache and kinds.get(key) == _PLAIN and key not in out:
                    # The common case, kept fast: a known clean key holding a known clean
                    # string or a scalar that no rule applies to; no path is built for it.
                    of = type(item)
                    if (
                        (of is str and item in cache)
                        or of is bool
                        or of is float
                        or item is None
                        or (of is int and -_BIG_INT < item < _BIG_INT)
                    ):
                        out[key] = item
                        continue
                if not key or key in cache:
                    clean = key
                else:
                    clean = self.scrub_text(key, f"{path}.<key>", remarks)
                if clean in out:  # two keys redacted alike: keep both values
                    n = 2
                    while f"{clean}#{n}" in out:
                        n += 1
                    clean = f"{clean}#{n}"
                sub = f"{path}.{clean}"
                kind = self._key_kind(clean)
                if kind == _SENSITIVE and item is not None and not isinstance(item, bool):
                    if item != _KEY_REDACTED:  # scrubbed twice: one remark
                        remarks.append(f"secret_key@{sub}")
                    out[clean] = _KEY_REDACTED
                elif kind == _VERSION and isinstance(item, str):
                    # In a field named *version, 1.2.3.4 is a version, not an address.
                    out[clean] = self.scrub_text(item, sub, remarks, exempt="ipv4")
                else:
                    out[clean] = self.scrub(item, sub, remarks)
            return out
        if isinstance(value, list):
            return [self.scrub(item, f"{path}[{i}]", remarks) for i, item in enumerate(value)]
        if type(value) is int and not -_BIG_INT < value < _BIG_INT:
            text = str(value)
            clean = self.scrub_text(text, path, remarks)
            return value if clean == text else clean
        return value
