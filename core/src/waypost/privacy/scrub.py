"""Scrubbing: the built-in rules and the :class:`Scrubber` that redacts personal data and
secrets from every string property and application-chosen id (see ``docs/privacy.md``)."""

from __future__ import annotations

import base64
import heapq
import html
import re
import time
from collections.abc import Callable, Collection, Iterable
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
    rule keeps the path and hides the user name). ``flags`` apply to this rule alone. Where
    several rules match at the same place, the first one listed wins.
    ``needs``, if given, lists characters of which every match holds at least one (``"@"`` for
    an address): a text without any of them is not searched for this rule, which saves time.
    """

    name: str
    pattern: str
    check: Callable[[str], bool] | None = None
    flags: int = 0
    replacement: Callable[[str], str] | None = None
    needs: str = ""


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
_SCHEME_GAP = re.compile(r"[ \t+]+")


def _token(text: str) -> bool:
    """Anything after ``Bearer``/``Token`` is a credential unless it is a plain word:
    ``Bearer authentication`` and ``token-based`` are prose."""
    return _PROSE.fullmatch(_SCHEME_GAP.split(text, 1)[1].rstrip(".,;:!?")) is None


def _basic(text: str) -> bool:
    """``Basic`` credentials decode to ``user:password`` (standard or URL-safe base64, with or
    without its padding)."""
    value = _SCHEME_GAP.split(text, 1)[1].rstrip("=")
    padded = value + "=" * (-len(value) % 4)
    try:
        altchars = b"-_" if "-" in value or "_" in value else None
        decoded = base64.b64decode(padded, altchars=altchars, validate=True).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return False
    return ":" in decoded and decoded.isprintable()


def _mod97(text: str) -> int:
    total = 0
    for ch in text:
        total = (total * (100 if ch.isalpha() else 10) + int(ch, 36)) % 97
    return total


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
"""The length of an IBAN in each country that issues them (the SWIFT IBAN registry)."""


def _iban(text: str) -> bool:
    """An IBAN of its country's length whose check digits hold (ISO 13616: the number, its
    first four characters moved to the end, is 1 modulo 97), perhaps followed by a group of
    capitals that is not part of it."""
    want = _IBAN_LENGTHS.get(text[:2])
    if want is None:
        return False
    compact = ""
    for group in text.split(" "):
        compact += group
        if len(compact) == want:
            return _mod97(compact[4:] + compact[:4]) == 1
    return False


def _phone(text: str) -> bool:
    """An international number has 8 to 15 digits (E.164), 10 or more when nothing separates
    them, so that a signed count (``+12345678``) is not taken for one."""
    digits = sum(ch.isdigit() for ch in text)
    if not text.startswith("+"):
        return True
    return 8 <= digits <= 15 and (digits >= 10 or not text[1:].isdigit())


def _home(found: str) -> str:
    return _HOME_USER.sub("<user>", found)


def _url_credentials(found: str) -> str:
    """The scheme stays, the user info goes: ``postgresql://[REDACTED:url_credentials]@``."""
    return found[: found.index("://") + 3] + "[REDACTED:url_credentials]@"


_PAIR_HEAD = re.compile(r"""[^=:]*(?:=>|:=|[=:])[ \t+]*["']?""")


def _pair(found: str) -> str:
    """The name and its separator stay, the value goes: ``db_password=[REDACTED:secret_pair]``,
    ``"token": "[REDACTED:secret_pair]"``."""
    head = _PAIR_HEAD.match(found)
    kept = head.group() if head else ""
    quote = kept[-1:] if kept[-1:] in ("'", '"') else ""
    return f"{kept}[REDACTED:secret_pair]{quote if found.endswith(quote) else ''}"


_HOME_USER = re.compile(r"[^/\\]+$")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_V4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = r"[0-9A-Fa-f]{1,4}"
_USER = r"\w(?:[\w.@$+-]*[\w$-])?"  # a user name: "jane", "jane.doe", "svc-build$"
# On Windows a user name may hold spaces when a further path segment follows.
_WIN_USER = rf"(?!<user>)(?:[^\s\\/:*?\"<>|.,;][^\\/:*?\"<>|\r\n\t]*(?=[\\/])|{_USER})"


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


_DIGITS = "0123456789"

# Every pattern starts with a literal or a character class, with its lookbehinds after that
# first character: the regex engine then skips at once to the places where a match can start.

# A value masked already: redacted by a rule, or "***" (what waypost's sanitiser and the sinks
# put in place of a known secret), is left as it is.
# (after what a separator may end with: "password=>x", "password=+x")
_DONE = r"(?![=>:+ \t]*(?:\[REDACTED:|\*\*\*(?![^\s&;,'\"])))"
_SEPARATOR = r"[\"']?[ \t]*(?:=>|:=|[=:])[ \t+]*"
_QUOTED = r"\"(?!\[REDACTED:)(?:[^\"\\\r\n]|\\.)+\"|'(?!\[REDACTED:)(?:[^'\\\r\n]|\\.)+'"
_WORD = r"[^\s&;,'\"]+"
# A value of several words ends at the end of the line, at "&", ";" or ",", or where the next
# word starts another pair ("password=x user=bob" leaves "user=bob").
_VALUE_WORDS = rf"{_DONE}{_WORD}(?:[ \t]+(?![^\s=:]+[ \t]*(?:=|:(?:[ \t]|$))){_WORD})*"
# The rest of the line: "Cookie: a=1; b=2", "Authorization: AWS4-HMAC-SHA256 Credential=...".
# Either may follow a quote that is never closed ('password: "hunter2' in a broken file).
_LINE = rf"{_DONE}[^\s&\"'](?:[^\r\n&\"']*[^\s&\"'])?"

_HEADER_NAMES = (
    r"[AaCcPpSs](?i:(?<=a)uthorization|(?<=c)ookie|(?<=p)roxy-authorization|(?<=s)et-cookie)"
)
"""Header-like names whose value runs to the end of the line."""
_CREDENTIAL_NAMES = (
    r"[AaCcPpSsTt](?i:(?<=a)(?:pi[_-]?key|ccess[_-]?key|ccount[_-]?key)|(?<![a-z]a)(?<=a)uth"
    r"|(?<=c)redentials?|(?<=p)(?:ass(?:word|wd|phrase)|wd|rivate[_-]?key)"
    r"|(?<=s)(?:ecret(?:[_-]?key)?|igning[_-]?key|ignature)|(?<![a-z]s)(?<=s)ig|(?<=t)oken)"
)
"""Names (or the ends of names: ``db_password``, ``accessToken``) whose value is a secret."""

_VENDOR_KEYS = (
    ("A", "(?:KIA|SIA|BIA|CCA)[0-9A-Z]{16}(?![0-9A-Z])"),  # AWS access key ids
    ("gh", "[pousr]_[A-Za-z0-9]{30,}"), ("github_pat_", r"\w{30,}"),  # GitHub
    ("xox", "[abeoprs]-[A-Za-z0-9-]{10,}"), ("xapp-", "[A-Za-z0-9-]{10,}"),  # Slack tokens
    ("hooks.slack.com/services/", "[A-Za-z0-9/]+"),  # Slack webhooks
    ("sk_", "(?:live|test)_[A-Za-z0-9]{16,}"), ("rk_", "(?:live|test)_[A-Za-z0-9]{16,}"),
    ("pk_", "(?:live|test)_[A-Za-z0-9]{16,}"), ("whsec_", "[A-Za-z0-9]{16,}"),  # Stripe
    ("sk-", "[A-Za-z0-9_-]{20,}"),  # OpenAI (sk-..., sk-proj-...), Anthropic (sk-ant-...)
    ("A", "Iza[0-9A-Za-z_-]{35}"), ("ya29.", "[0-9A-Za-z_-]{20,}"),  # Google
    ("glpat-", "[A-Za-z0-9_-]{20,}"), ("npm_", "[A-Za-z0-9]{36}"), ("hf_", "[A-Za-z0-9]{30,}"),
    ("phx_", "[A-Za-z0-9]{20,}"), ("pypi-AgE", "[A-Za-z0-9_-]{50,}"),  # PostHog, PyPI
    ("dckr_pat_", "[A-Za-z0-9_-]{20,}"),  # Docker
    ("shp", "(?:at|ss|ca|pa)_[a-fA-F0-9]{32}"), ("dop_v1_", "[a-f0-9]{64}"),  # Shopify, DO
    ("SG.", r"[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"),  # SendGrid
)  # fmt: skip
"""Tokens that say what they are by a vendor's prefix: (prefix, the rest)."""

BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(
        "private_key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*)",
    ),
    Rule("jwt", r"eyJ(?<![\w-]eyJ)[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    Rule(
        "url_credentials",
        # With a password, the user info runs to the last "@" before a host, whatever the
        # password holds ("/", "@", ":"); "host:8080/pkg@1.2" is a port and a path, not a user
        # and a password. Without one, the user ends at the first "/".
        r"[A-Za-z](?<![\w+.-][A-Za-z])[A-Za-z0-9+.-]*://(?!\[REDACTED|\*\*\*@)"
        r"(?:[^\s/?#@:\[]*:(?!\d*(?:[/?#]|$))\S*|[^\s/?#@:\[]+)"
        # (a host in brackets may be an address redacted already: "[[REDACTED:ipv6]]")
        r"@(?=(?:\[[^\s\]]*\]\]?|[\w%-][\w.%-]*)(?::\d*)?(?:[/?#\s\"'<>)\]},;|\\]|$))",
        replacement=_url_credentials,
        needs="@",
    ),
    Rule(
        "api_key",
        "|".join(
            f"{re.escape(head)}(?<![A-Za-z0-9]{re.escape(head)}){rest}"
            for head, rest in _VENDOR_KEYS
        ),
    ),
    # The name and separator stay; the value runs to its end: a quoted string, the rest of the
    # line for header-like names, or its words up to the next pair.
    Rule(
        "secret_pair",
        rf"{_HEADER_NAMES}{_SEPARATOR}(?:{_QUOTED}|[\"']?{_LINE})",
        replacement=_pair,
        needs="=:",
    ),
    Rule(
        "secret_pair",
        rf"{_CREDENTIAL_NAMES}{_SEPARATOR}(?:{_QUOTED}|[\"']?{_VALUE_WORDS})",
        replacement=_pair,
        needs="=:",
    ),
    Rule(
        "bearer_token",
        r"[BbTt](?<![\w-][BbTt])(?:(?<=B)(?:earer|EARER)|(?<=b)earer|(?<=T)(?:oken|OKEN)"
        r"|(?<=t)oken)[ \t+]+[A-Za-z0-9_.~+/-]{8,}=*",
        check=_token,
    ),
    Rule(
        "basic_auth",
        r"[Bb](?<![\w-][Bb])(?:(?<=B)(?:asic|ASIC)|(?<=b)asic)[ \t+]+[A-Za-z0-9+/_-]{4,}={0,2}",
        check=_basic,
    ),
    Rule(
        "email",
        # "=", "?", "&" and "/" are allowed in an address but, past its start, begin one in
        # text ("?to=a@b.c" keeps "?to=")
        # ("https://***@host" is user info masked already, not an address)
        r"(?<![\w.!#$%'*+^`{|}~-])(?![=?&/]*\*\*\*@)"
        r"(?:[=?&/]*[\w.!#$%'*+^`{|}~-]+[=?&/]*|[=?&/]+)@"
        r"[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)*\.(?:[Xx][Nn]--[\w-]+|[^\W\d_]{2,})",
        needs="@",
    ),
    Rule("ipv4", rf"(?=\d)(?<![\d.]){_V4}(?!\d|\.\d)", needs=_DIGITS),
    Rule("ipv6", _ipv6_pattern(), needs=":"),
    Rule(
        "credit_card",
        r"[2-6](?<![\w.][2-6])(?<!\w-[2-6])\d{3}(?:[ -]?\d){10,15}(?!\w|\.\d|-\w)",
        check=_card,
        needs=_DIGITS,
    ),
    Rule(
        "iban",
        r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}"
        r"(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)(?![A-Za-z0-9])",
        check=_iban,
        needs=_DIGITS,
    ),
    Rule(
        "phone",
        r"\+(?<![\w+]\+)[1-9](?:[ .-]?\(?\d\)?){7,14}(?!\w)",  # +44 20 7946 0958
        check=_phone,
        needs=_DIGITS,
    ),
    Rule("phone", r"\((?<!\w\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?![\w-])", needs=_DIGITS),
    Rule("phone", r"\d(?<![\w.-]\d)\d{2}-\d{3}-\d{4}(?![\w-])", needs=_DIGITS),  # 202-555-0143
    Rule(
        "national_id",
        # US social security numbers as written: 078-05-1120 (area 000, 666 and 9xx, group 00
        # and serial 0000 are never issued)
        r"[0-8](?<![\w.-][0-8])(?!(?<=0)00|(?<=6)66)\d{2}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])",
        needs=_DIGITS,
    ),
    # A user name starts with a letter or digit ("/home/." and "/home/," are no one).
    Rule(
        "home_path",
        # Linux (also Silverblue's /var/home, BSD's /usr/home, Solaris' /export/home), macOS
        # (also its data volume and other volumes), WSL, Git Bash and Cygwin's drive mounts.
        r"/(?<![\w.~-]/)(?:(?:(?:var|usr|export|System/Volumes/Data)/)?home"
        r"|(?:(?:System/Volumes/Data|Volumes/[^/\r\n\t]{1,64})/)?Users"
        r"|(?:(?:mnt|cygdrive)/)?[A-Za-z]/(?:[Uu]sers|USERS))"
        rf"/(?!<user>){_USER}",
        replacement=_home,
        needs="/",
    ),
    Rule(
        "home_path",
        # Windows drives, forward slashes too, and JSON-escaped backslashes
        r"[A-Za-z](?<![A-Za-z][A-Za-z]):(?:\\+|/)(?i:users|documents and settings)(?:\\+|/)"
        + _WIN_USER,
        replacement=_home,
        needs=":",
    ),
    Rule(
        "home_path",
        # UNC paths to a profile share: \\server\Users\jane, \\server\profiles$\jane
        r"\\(?<![\w\\]\\)\\+[\w.$-]+(?:\\+[\w.$ -]+?){0,4}?\\+"
        r"(?i:users|profiles?\$?|homes?|documents and settings)\\+" + _WIN_USER,
        replacement=_home,
        needs="\\",
    ),
)
"""The built-in rules. Where two match at the same place, the first one listed is applied."""

SECRET_KEYS = frozenset(
    {
        "password", "passwd", "pwd", "passphrase", "secret", "token", "apikey", "accesskey",
        "secretkey", "privatekey", "signingkey", "accountkey", "clientsecret", "credential",
        "credentials", "authorization", "cookie", "cookies", "setcookie", "email",
        "emailaddress", "ip", "ipaddress", "ipaddr", "remoteaddr", "remoteaddress",
        "xforwardedfor", "xrealip", "phone", "phonenumber", "telephone", "mobilenumber",
        "iban", "ssn", "username", "fullname", "firstname", "lastname",
    }
)  # fmt: skip
"""Property names whose values are redacted whatever they hold. A name matches when it is one
of these, or when its last word or last two words are (``accessToken``, ``client_ip``,
``X-API-Key``, ``user_name``), so ``tokenCount``, ``max_tokens`` and ``tooltip`` are left
alone."""

_KEY_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_REDACTION = re.compile(r"\[REDACTED:[^\]]*\]")


_ESCAPE = re.compile(
    r"(?:%[0-9A-Fa-f]{2})+"
    r"|&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
    r"|\\(?:u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2}|[\\/\"'bfnrt])"
)
"""Escapes that can hide what a rule looks for: percent-encoding (URLs, form bodies), HTML
character references, JSON and Python string escapes."""
_REESCAPE = re.compile(
    r"(?:%[0-9A-Fa-f]{2})+|&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
)
"""Escapes decoded again after the first round (``%2540``, ``&amp;#64;``): a backslash that
an escape produced is the text's own (``%5C%5Cserver`` is ``\\\\server``)."""
_JSON_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_DECODE_ROUNDS = 3
"""Escapes are decoded this many times over at most (``%2540`` is ``%40`` is ``@``)."""


def _unescape(escape: str) -> tuple[str, list[int]]:
    """One escape decoded, with the offset in ``escape`` at which each character starts."""
    first = escape[0]
    if first == "%":
        raw = bytes.fromhex(escape.replace("%", ""))
        chars = raw.decode("utf-8", "surrogateescape")
        offsets, at = [], 0
        for ch in chars:
            offsets.append(at)
            at += 3 * len(ch.encode("utf-8", "surrogateescape"))
        return chars, offsets
    if first == "&":
        chars = html.unescape(escape)
        return chars, [0] * len(chars)
    kind = escape[1]
    return (chr(int(escape[2:], 16)) if kind in "ux" else _JSON_ESCAPES.get(kind, kind)), [0]


def decoded(text: str, *, plus: bool = False) -> tuple[str, list[int]]:
    """``text`` with its escapes decoded (see :data:`_ESCAPE`; with ``plus``, each ``+`` read
    as a space, as in a form body), and for each character of the result (and its end) the
    offset in ``text`` where it comes from.

    A long text is decoded a piece at a time, each piece ending where no escape can reach
    across (see :func:`_decode_cut`), so the result is the same and no step holds the
    interpreter for long."""
    n = len(text)
    if n <= _SLICE + _OVERLAP:
        return _decoded(text, plus)
    views: list[str] = []
    where: list[int] = []
    start = 0
    while start < n:
        end = _decode_cut(text, start, n)
        view, at = _decoded(text[start:end], plus)
        views.append(view)
        where.extend([start + i for i in at[:-1]])  # its end is where the next piece starts
        start = end
        _let_others_run()
    where.append(n)
    return "".join(views), where


_UNESCAPED = re.compile(r"[^%&#;\\/\"'0-9A-Za-z]")
"""A character that is part of no escape, in any round of decoding."""
_ESCAPE_START = re.compile(r"[%&\\]")
_ESCAPE_REACH = 40
"""Every escape (of any round) is shorter than this, and starts with one of ``%&\\``."""


def _decode_cut(text: str, start: int, n: int) -> int:
    """Where a piece of ``text`` that begins at ``start`` ends for :func:`decoded`: before a
    character no escape holds, past ``start + _SLICE``; without one, at a place no escape is
    within reach of (so none of any round spans it); else further on."""
    low = start + _SLICE
    while low < n:
        high = min(n, low + _SLICE)
        found = _UNESCAPED.search(text, low, high)
        if found is not None:
            return found.start()
        reach = _ESCAPE_REACH
        if _ESCAPE_START.search(text, max(start, high - reach), min(n, high + reach)) is None:
            return high
        low = high
    return n


def _decoded(text: str, plus: bool) -> tuple[str, list[int]]:
    view, where = (text.replace("+", " ") if plus else text), list(range(len(text) + 1))
    for round_ in range(_DECODE_ROUNDS):
        parts: list[str] = []
        index: list[int] = []
        last = 0
        for match in (_REESCAPE if round_ else _ESCAPE).finditer(view):
            start = match.start()
            parts.append(view[last:start])
            index.extend(range(last, start))
            chars, offsets = _unescape(match.group())
            parts.append(chars)
            index.extend(start + offset for offset in offsets)
            last = match.end()
        if not parts:
            break
        parts.append(view[last:])
        index.extend(range(last, len(view) + 1))
        view = "".join(parts)
        where = [where[i] for i in index]
    return view, where


_NONE: frozenset[str] = frozenset()


_CACHED_STRINGS = 4096
"""How many clean strings a Scrubber remembers before starting over."""
_CACHED_LENGTH = 256
"""Longer strings are always scanned: they are rarely repeated."""
_SLICE = 1024
_OVERLAP = 512
"""A long text is searched in slices of about ``_SLICE`` characters (each with ``_OVERLAP``
more, so that a match starting near its end is seen whole): well under a millisecond a search,
after which another thread of the host may run."""
_SEPARATORS = (" ", "\t", '"', "'", ",", ";")
"""Blanks, and the separators of JSON, CSV and headers."""
_CHUNK = 16 * 1024
"""A scan for single characters takes this many at a time."""
_RUN_FOR = 0.001
"""The longest the scrubbers work through a long text before they let other threads run."""
_ran_since = [0.0]


def _let_others_run() -> None:
    """Between slices of a long text: every ``_RUN_FOR`` seconds, let any other thread of the
    host that waits for the interpreter run (one slice of work is the longest it then waits).
    A real sleep, however short: ``sleep(0)`` takes the interpreter back before a waiting
    thread wakes, which then waits its whole switch interval (5 ms) again."""
    now = time.perf_counter()
    if now - _ran_since[0] >= _RUN_FOR:
        time.sleep(0.00005)
        _ran_since[0] = time.perf_counter()


def _cut(text: str, start: int, n: int) -> int:
    """Where a slice of ``text`` that begins at ``start`` ends, at most ``2 * _SLICE`` on: after
    its last line break, which no built-in rule's match crosses but a private key's (whose
    pattern then runs to the slice's end, and is matched again whole); else after its last
    blank or separator, which no token, JWT, address or key crosses (nor any match without one
    in it; shorter matches that hold one are seen whole in the overlap); else at the most
    (a text with neither for that long: there a match is seen whole up to ``_OVERLAP``
    characters past the cut)."""
    high = start + 2 * _SLICE
    if high >= n:
        return n
    at = text.rfind("\n", start, high)
    if at >= 0:
        return at + 1
    at = max(text.rfind(separator, start, high) for separator in _SEPARATORS)
    return at + 1 if at >= 0 else high


def _search(regex: re.Pattern[str], text: str, pos: int) -> re.Match[str] | None:
    """``regex.search(text, pos)``, a slice at a time on a long text: one search holds the GIL
    until it returns, and on a long text that would stop every other thread of the host for
    as long. A match starting in a slice (searched with ``_OVERLAP`` characters more) is taken;
    one reaching the end of what was searched is matched again from its start with the whole
    text after it, so that it is not cut short (a private key's END line far ahead, a
    lookahead at the edge)."""
    n = len(text)
    while True:
        cut = _cut(text, pos, n)
        end = min(n, cut + _OVERLAP)
        match = regex.search(text, pos, end)
        _let_others_run()
        if match is not None and (match.start() < cut or end == n):
            if end < n and match.end() > end - 8:  # cut short, or a lookahead was
                whole = regex.match(text, match.start())
                if whole is None:  # no match there once the text goes on
                    pos = match.start() + 1
                    continue
                match = whole
            return match
        if end == n:
            return None
        pos = cut


def _find(regex: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The first match in ``text``, a slice at a time when it is long."""
    return _search(regex, text, 0) if len(text) > _SLICE + _OVERLAP else regex.search(text)


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


_PLAIN, _SENSITIVE, _VERSION = 0, 1, 2
_KEY_REDACTED = "[REDACTED:secret_key]"
_VERSION_EXEMPT = frozenset({"ipv4"})
_INF = float("inf")
_BIG_INT = 10**13  # 14 digits and more may be a card number; counts and sizes stay below


@dataclass
class Scrubber:
    """Redacts personal data and secrets from property values (and keys), leaving remarks.

    Remarks read ``<rule>@<field path>``; the redacted value itself is never kept. Each rule
    is searched for only where a text holds what it ``needs``, and short clean strings are
    remembered, so an ordinary string costs a few fast searches, and a repeated one none.
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
        self._compiled = [re.compile(rule.pattern, rule.flags) for rule in self.rules]
        # Telemetry repeats the same short strings (keys, plans, feature names): remembering
        # which ones matched no rule spares the regexes most of their work.
        self._clean: dict[str, None] = {}
        # A rule whose ``needs`` a text lacks is not searched for: the rules to search are
        # worked out once per set of such characters present. Characters that the same rules
        # need stand for each other (any digit for all digits).
        needed = sorted({ch for rule in self.rules for ch in rule.needs})
        first: dict[frozenset[str], str] = {}
        self._class_of = {
            ch: first.setdefault(frozenset(r.needs for r in self.rules if ch in r.needs), ch)
            for ch in needed
        }
        self._needed = re.compile(f"[{re.escape(''.join(needed))}]") if needed else None
        self._by_present: dict[frozenset[str], list[tuple[int, re.Pattern[str]]]] = {}

    def _searched(self, text: str) -> list[tuple[int, re.Pattern[str]]]:
        """The rules (by index) that can match ``text``, with their regexes."""
        needed = self._needed
        found: Collection[str] = ()
        if needed is None:
            pass
        elif len(text) <= _CHUNK:
            found = needed.findall(text)
        else:
            found = set()
            for at in range(0, len(text), _CHUNK):
                found.update(needed.findall(text, at, at + _CHUNK))
                _let_others_run()
        present = frozenset(map(self._class_of.__getitem__, found)) if found else _NONE
        searched = self._by_present.get(present)
        if searched is None:
            class_of = self._class_of
            searched = [
                (i, self._compiled[i]) for i, rule in enumerate(self.rules)
                if not rule.needs or any(class_of[ch] in present for ch in rule.needs)
            ]  # fmt: skip
            self._by_present[present] = searched
        return searched

    def scrub_text(
        self,
        text: str,
        path: str,
        remarks: list[str],
        *,
        exempt: str | Collection[str] | None = None,
    ) -> str:
        """``text`` with every match redacted; one remark per redaction. Rules named in
        ``exempt`` (a name or several) are not applied.

        The text is searched as it is, then, where it holds escapes (``%40``, ``&#64;``,
        ``\\u0040``, ``\\/``), as it reads once they are decoded (twice encoded too), so
        that an encoded value is found as well; the encoded text it came from is redacted."""
        cache = self._clean
        if exempt is None:
            if text in cache:
                return text
            skip: frozenset[str] = frozenset()
        else:
            skip = frozenset((exempt,)) if isinstance(exempt, str) else frozenset(exempt)
        clean = self._scan(text, path, remarks, skip)
        # A redaction can uncover a match its neighbour hid (``token=a&b@example.org``: the
        # address started inside the secret); look again, only when something was redacted.
        for _ in range(3):
            if clean is text:
                break
            text, clean = clean, self._scan(clean, path, remarks, skip)
        escaped = _find(_ESCAPE, clean) is not None
        if escaped:
            clean = self._scan_decoded(clean, path, remarks, skip, plus=False)
        if "+" in clean and ("%" in clean or "=" in clean):  # a form body: "+" is a space
            escaped = True
            clean = self._scan_decoded(clean, path, remarks, skip, plus=True)
        if not escaped and clean is text and exempt is None and len(text) <= _CACHED_LENGTH:
            if len(cache) >= _CACHED_STRINGS:  # bounded: values may be generated
                cache.clear()
            cache[text] = None
        return clean

    def _scan(self, text: str, path: str, remarks: list[str], exempt: frozenset[str]) -> str:
        spans = self._spans(text, exempt)
        return self._redact(text, spans, path, remarks, None) if spans else text

    def _scan_decoded(
        self, text: str, path: str, remarks: list[str], exempt: frozenset[str], *, plus: bool
    ) -> str:
        """``text`` with what matches once its escapes are decoded (and ``+`` read as a
        space, with ``plus``) redacted, in ``text``."""
        view, where = decoded(text, plus=plus)
        spans = self._spans(view, exempt)
        return self._redact(text, spans, path, remarks, where) if spans else text

    def _spans(self, text: str, exempt: frozenset[str]) -> list[tuple[int, int, Rule, str]]:
        """Where ``text`` is redacted, in order: at each place the first rule (in the order
        of ``rules``) that matches there and whose check accepts the match, then on after it."""
        rules = self.rules
        if len(text) > _SLICE + _OVERLAP:
            search: Callable[[re.Pattern[str], str, int], re.Match[str] | None] = _search
        else:
            search = re.Pattern.search
        heads: list[tuple[int, int, re.Match[str], re.Pattern[str]]] = []
        for i, regex in self._searched(text):
            match = search(regex, text, 0)
            if match is not None and rules[i].name not in exempt:
                heads.append((match.start(), i, match, regex))
        if not heads:
            return []
        heapq.heapify(heads)
        out: list[tuple[int, int, Rule, str]] = []
        done = 0  # the end of the last redaction
        while heads:
            start, i, match, regex = heapq.heappop(heads)
            rule = rules[i]
            end = match.end()
            if start < done:  # inside a redaction already: look again after it
                after = search(regex, text, done)
            elif end == start or (rule.check is not None and not rule.check(match.group())):
                # A look-alike: look again from the next character, so that a real match
                # overlapping the look-alike is not skipped.
                after = search(regex, text, start + 1)
            else:
                out.append((start, end, rule, match.group()))
                done = end
                after = search(regex, text, end)
            if after is not None:
                heapq.heappush(heads, (after.start(), i, after, regex))
        return out

    @staticmethod
    def _redact(
        text: str,
        spans: list[tuple[int, int, Rule, str]],
        path: str,
        remarks: list[str],
        where: list[int] | None,
    ) -> str:
        """``text`` with each span replaced; ``where`` maps the spans' offsets (found in a
        decoded view of ``text``) back to ``text``."""
        out: list[str] = []
        last = 0
        for start, end, rule, found in spans:
            if where is not None:
                start, end = where[start], where[end]
                if start < last:  # two matches within one escape: the first one covers it
                    continue
            out.append(text[last:start])
            out.append(rule.replacement(found) if rule.replacement else f"[REDACTED:{rule.name}]")
            remarks.append(f"{rule.name}@{path}")
            last = end
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
            words = [w.lower() for w in _KEY_WORDS.findall(name)]
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
        rule applies to (a finite float, a short int, a bool, None). Runs before any limit
        applies: a text is looked up only when it is short enough to be remembered (hashing
        20 MB holds every thread of the host for 12 ms or more)."""
        cache, kinds = self._clean, self._keys
        longest = _CACHED_LENGTH  # a longer text is never remembered: its hash is not made
        for key, item in properties.items():
            if (
                type(key) is not str
                or len(key) > longest
                or key not in cache
                or kinds.get(key) != _PLAIN
            ):
                return False
            of = type(item)
            if of is str:
                if len(item) > longest or item not in cache:
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
                    out[clean] = self.scrub_text(item, sub, remarks, exempt=_VERSION_EXEMPT)
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
