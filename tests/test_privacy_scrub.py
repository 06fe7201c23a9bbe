"""The scrubbers: no value matching a rule gets through, ordinary values are left alone."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from privacy_corpus import luhn_complete

from waypost.config import TelemetryConfig
from waypost.errors import ConfigError
from waypost.events import coerce, uuid7
from waypost.privacy import BUILTIN_RULES, Rule, Scrubber

SCRUBBER = Scrubber()
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def scrub(value: Any) -> tuple[Any, list[str]]:
    remarks: list[str] = []
    return SCRUBBER.scrub(value, "properties", remarks), remarks


def strings_in(value: Any) -> Iterator[str]:
    """Every string of a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


# --- generators of personal data and secrets ---------------------------------------------------
# Each yields (value, needles): the value as an application might send it, and the parts of it
# that must never reach a sink.

ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"


# (prefix, lengths): Visa, Mastercard (51-55 and 2221-2720), Amex, Discover, JCB, UnionPay, Diners
CARD_BRANDS = [
    ("4", (16, 19)),
    ("51", (16,)),
    ("55", (16,)),
    ("2221", (16,)),
    ("2720", (16,)),
    ("34", (15,)),
    ("37", (15,)),
    ("6011", (16, 19)),
    ("65", (16,)),
    ("35", (16, 19)),
    ("62", (16, 17, 18, 19)),
    ("36", (14,)),
]


@st.composite
def card_numbers(draw: st.DrawFn) -> tuple[str, list[str]]:
    prefix, lengths = draw(st.sampled_from(CARD_BRANDS))
    length = draw(st.sampled_from(lengths))
    fill = draw(st.text(string.digits, min_size=length - len(prefix) - 1, max_size=length - 1))
    number = luhn_complete(prefix + fill[: length - len(prefix) - 1])
    layout = draw(st.sampled_from(["plain", "4s", "amex"]))
    sep = draw(st.sampled_from([" ", "-"]))
    if layout == "4s":
        text = sep.join(number[i : i + 4] for i in range(0, len(number), 4))
    elif layout == "amex" and length == 15:
        text = sep.join((number[:4], number[4:10], number[10:]))
    else:
        text = number
    return text, [text, number]


@st.composite
def ipv6_addresses(draw: st.DrawFn) -> tuple[str, list[str]]:
    address = draw(st.ip_addresses(v=6).filter(lambda a: int(a) != 0))  # "::" identifies nobody
    form = draw(st.sampled_from(["compressed", "exploded", "upper", "mapped", "embedded"]))
    if form == "exploded":
        text = address.exploded
    elif form == "upper":
        text = str(address).upper()
    elif form in ("mapped", "embedded"):
        v4 = str(draw(st.ip_addresses(v=4)))
        head = (
            "::ffff:"
            if form == "mapped"
            else draw(st.sampled_from(["64:ff9b::", "::", "fe80::1:"]))
        )
        text = head + v4
        return text, [text, v4]
    else:
        text = str(address)
    return text, [text]


@st.composite
def jwts(draw: st.DrawFn) -> tuple[str, list[str]]:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    header = draw(st.fixed_dictionaries({"alg": st.sampled_from(["HS256", "RS256", "none"])}))
    payload = draw(
        st.dictionaries(st.sampled_from(["sub", "iat", "name", "scope"]), st.text(), min_size=1)
    )
    signature = draw(st.binary(max_size=64))
    sig = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    token = f"{part(header)}.{part(payload)}.{sig}"
    return token, [token, part(payload)]


def _key(prefix: str, alphabet: str, size: int) -> st.SearchStrategy[tuple[str, list[str]]]:
    return st.text(alphabet, min_size=size, max_size=size).map(
        lambda body: (prefix + body, [prefix + body])
    )


UPPER_DIGITS = string.ascii_uppercase + string.digits
vendor_keys = st.one_of(
    _key("AKIA", UPPER_DIGITS, 16),  # AWS
    _key("ASIA", UPPER_DIGITS, 16),
    _key("ghp_", ALNUM, 36),  # GitHub
    _key("gho_", ALNUM, 36),
    _key("github_pat_", ALNUM + "_", 82),
    _key("xoxb-", string.digits + "-" + ALNUM, 40),  # Slack
    _key("xoxp-", string.digits + "-" + ALNUM, 60),
    _key("sk_live_", ALNUM, 24),  # Stripe
    _key("rk_test_", ALNUM, 24),
    _key("sk-", ALNUM, 48),  # OpenAI
    _key("sk-proj-", B64URL, 64),
    _key("AIza", B64URL, 35),  # Google
)


@st.composite
def bearer_tokens(draw: st.DrawFn) -> tuple[str, list[str]]:
    raw = draw(st.binary(min_size=16, max_size=48))
    token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER", "Token"]))
    header = draw(st.sampled_from(["", "Authorization: ", "authorization="]))
    return f"{header}{scheme} {token}", [token]


@st.composite
def basic_credentials(draw: st.DrawFn) -> tuple[str, list[str]]:
    user = draw(st.text(ALNUM, min_size=1, max_size=12))
    password = draw(st.text(ALNUM + "!#%", min_size=1, max_size=20))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Authorization: Basic {token}", [token]


SECRET_NAMES = [
    "password", "passwd", "PASSWORD", "db_password", "pwd", "secret", "client_secret",
    "api_key", "apiKey", "API-KEY", "token", "access_token", "accessToken", "refresh_token",
    "aws_secret_access_key", "private_key", "passphrase", "credentials",
]  # fmt: skip
SECRET_CHARS = ALNUM + "!#$%()*+-./<>?@[]^_{|}~"


@st.composite
def secret_pairs(draw: st.DrawFn) -> tuple[str, list[str]]:
    name = draw(st.sampled_from(SECRET_NAMES))
    value = draw(st.text(SECRET_CHARS, min_size=8, max_size=40).filter(lambda v: not v.isalpha()))
    form = draw(
        st.sampled_from(["{n}={v}", "{n}: {v}", '"{n}": "{v}"', "{n}='{v}'", "?{n}={v}&x=1"])
    )
    return form.format(n=name, v=value), [value]


@st.composite
def pem_blocks(draw: st.DrawFn) -> tuple[str, list[str]]:
    kind = draw(st.sampled_from(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY",
                                 "OPENSSH PRIVATE KEY", "ENCRYPTED PRIVATE KEY",
                                 "PGP PRIVATE KEY BLOCK"]))  # fmt: skip
    body = base64.b64encode(draw(st.binary(min_size=24, max_size=200))).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    end = draw(st.booleans())  # a truncated block is redacted to the end of the text
    block = f"-----BEGIN {kind}-----\n{lines}\n" + (f"-----END {kind}-----" if end else "")
    return block, [lines, body[:24]]


@st.composite
def url_credentials(draw: st.DrawFn) -> tuple[str, list[str]]:
    scheme = draw(st.sampled_from(["https", "http", "postgresql", "redis", "ftp", "git+ssh"]))
    user = draw(st.text(ALNUM + "._-", min_size=1, max_size=12))
    # a password with a non-letter in it, so that it cannot be a word of a field path
    password = draw(
        st.text(ALNUM + "%!$*~", min_size=6, max_size=24).filter(lambda p: not p.isalpha())
    )
    host = draw(st.sampled_from(["example.com", "db.internal", "localhost:5432"]))
    url = f"{scheme}://{user}:{password}@{host}/path"
    return url, [f"{user}:{password}", password]


@st.composite
def home_paths(draw: st.DrawFn) -> tuple[str, list[str]]:
    user = draw(st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,14}[A-Za-z0-9])?", fullmatch=True))
    rest = draw(st.sampled_from(["", "/project/app.py", "/.config/app/settings.json"]))
    kind = draw(st.sampled_from(["linux", "mac", "windows", "windows-escaped", "windows-space"]))
    if kind == "linux":
        path = prefix = f"/home/{user}"
        path += rest
    elif kind == "mac":
        path = prefix = f"/Users/{user}"
        path += rest
    else:
        if kind == "windows-space":
            user = f"{user} {draw(st.text(string.ascii_letters, min_size=1, max_size=8))}"
            rest = rest or "/Documents"
        sep = "\\\\" if kind == "windows-escaped" else "\\"
        drive = draw(st.sampled_from(["C", "D", "c"]))
        prefix = f"{drive}:{sep}Users{sep}{user}"
        path = prefix + rest.replace("/", sep)
    return path, [prefix]


def _single(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, list[str]]]:
    return strategy.map(lambda v: (v, [v]))


SENSITIVE = {
    "email": _single(st.emails()),
    "ipv4": _single(st.ip_addresses(v=4).map(str)),
    "ipv6": ipv6_addresses(),
    "credit_card": card_numbers(),
    "jwt": jwts(),
    "vendor_key": vendor_keys,
    "bearer_token": bearer_tokens(),
    "basic_auth": basic_credentials(),
    "secret_pair": secret_pairs(),
    "private_key": pem_blocks(),
    "url_credentials": url_credentials(),
    "home_path": home_paths(),
}

# Surrounding text: ordinary words, so that a needle cannot appear in it by chance.
WORDS = ["the", "run", "failed", "for", "Größe", "naïve", "über", "config", "at", "with", "user"]
SEPARATORS = [" ", "\n", "\t", ", ", "(", ")", "[", "]", '"', "'", "<", ">", "=", ": ", "; "]
text_around = st.lists(st.sampled_from(WORDS), max_size=4).map(" ".join)
SAFE_KEYS = ["a", "detail", "items", "meta", "message", "nodes", "x"]


@st.composite
def embedded(draw: st.DrawFn, value: str) -> str:
    """``value`` inside surrounding text."""
    before = draw(text_around) + draw(st.sampled_from(SEPARATORS))
    after = draw(st.sampled_from(SEPARATORS)) + draw(text_around)
    return draw(st.sampled_from([value, before + value, value + after, before + value + after]))


def nested(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``leaf`` somewhere in dicts and lists, or as a key."""
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3),
            st.dictionaries(st.sampled_from(SAFE_KEYS), inner, min_size=1, max_size=3),
        ),
        max_leaves=4,
    )


@st.composite
def planted(draw: st.DrawFn) -> tuple[str, Any, list[str]]:
    kind = draw(st.sampled_from(sorted(SENSITIVE)))
    value, needles = draw(SENSITIVE[kind])
    text = draw(embedded(value))
    where = draw(st.sampled_from(["value", "key"]))
    leaf = st.just({text: 1}) if where == "key" else st.just(text)
    return kind, draw(nested(leaf)), needles


@PROPERTY_SETTINGS
@given(planted())
def test_no_planted_value_survives(case: tuple[str, Any, list[str]]) -> None:
    kind, value, needles = case
    clean, remarks = scrub({"payload": value})
    for text in strings_in(clean):
        for needle in needles:
            assert needle not in text, f"{kind}: {needle!r} got through in {text!r}"
    assert remarks, kind
    for remark in remarks:
        assert all(needle not in remark for needle in needles)


@PROPERTY_SETTINGS
@given(planted())
def test_scrubbing_twice_changes_nothing_more(case: tuple[str, Any, list[str]]) -> None:
    _, value, _ = case
    once, _ = scrub({"payload": value})
    twice, remarks = scrub(once)
    assert twice == once
    assert remarks == []


@pytest.mark.parametrize("kind", sorted(SENSITIVE))
def test_each_kind_is_redacted_alone(kind: str) -> None:
    @settings(max_examples=60, deadline=None)
    @given(SENSITIVE[kind])
    def check(case: tuple[str, list[str]]) -> None:
        value, needles = case
        clean, remarks = scrub({"v": value})
        assert all(n not in s for s in strings_in(clean) for n in needles)
        assert remarks and all(r.endswith("@properties.v") for r in remarks)

    check()


# --- remarks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "remark", "result"),
    [
        ("mail jane.doe@example.com now", "email@properties.v", "mail [REDACTED:email] now"),
        ("from 192.168.1.20", "ipv4@properties.v", "from [REDACTED:ipv4]"),
        ("peer [2001:db8::7]:443", "ipv6@properties.v", "peer [[REDACTED:ipv6]]:443"),
        ("::ffff:10.1.2.3", "ipv6@properties.v", "[REDACTED:ipv6]"),
        ("card 4111 1111 1111 1111", "credit_card@properties.v", "card [REDACTED:credit_card]"),
        ("AKIAIOSFODNN7EXAMPLE", "api_key@properties.v", "[REDACTED:api_key]"),
        ("Authorization: Bearer abc.def-123_XYZ987", "secret_pair@properties.v",
         "Authorization: [REDACTED:secret_pair]"),
        ("sent Bearer abc.def-123_XYZ987", "bearer_token@properties.v",
         "sent [REDACTED:bearer_token]"),
        ("Basic dXNlcjpodW50ZXIy", "basic_auth@properties.v", "[REDACTED:basic_auth]"),
        ("db_password=hunter2 user=bob", "secret_pair@properties.v",
         "db_password=[REDACTED:secret_pair] user=bob"),
        ("postgres://app:s3cret@db/x", "url_credentials@properties.v",
         "postgres://[REDACTED:url_credentials]@db/x"),
        ("/home/jane/app/main.py", "home_path@properties.v", "/home/<user>/app/main.py"),
        ("/Users/jane/Library", "home_path@properties.v", "/Users/<user>/Library"),
        ("C:\\Users\\Jane Doe\\AppData", "home_path@properties.v", "C:\\Users\\<user>\\AppData"),
    ],
)  # fmt: skip
def test_remark_names_rule_and_field(value: str, remark: str, result: str) -> None:
    clean, remarks = scrub({"v": value})
    assert clean == {"v": result}
    assert remarks == [remark]


def test_remarks_name_the_nested_field_and_never_the_value() -> None:
    clean, remarks = scrub(
        {"a": {"b": ["ok", "write to ann@example.com"]}, "ann@example.com": 1, "pwd": "x"}
    )
    assert clean == {
        "a": {"b": ["ok", "write to [REDACTED:email]"]},
        "[REDACTED:email]": 1,
        "pwd": "[REDACTED:secret_key]",
    }
    assert remarks == [
        "email@properties.a.b[1]",
        "email@properties.<key>",
        "secret_key@properties.pwd",
    ]


def test_keys_redacted_alike_keep_both_values() -> None:
    clean, _ = scrub({"a@example.com": 1, "b@example.com": 2})
    assert clean == {"[REDACTED:email]": 1, "[REDACTED:email]#2": 2}


def test_a_clean_key_equal_to_an_earlier_redacted_key_keeps_both_values() -> None:
    scrubber = Scrubber()
    scrubber.scrub({"[REDACTED:email]": 0}, "properties", [])  # now a known clean key
    remarks: list[str] = []
    clean = scrubber.scrub({"a@example.com": 1, "[REDACTED:email]": 2}, "properties", remarks)
    assert clean == {"[REDACTED:email]": 1, "[REDACTED:email]#2": 2}
    assert remarks == ["email@properties.<key>"]


flat_keys = st.sampled_from(
    ["plan", "seats", "region", "password", "app_version", "ann@example.com", "[REDACTED:email]",
     "[REDACTED:email]#2", "", "n", "client_ip"]
)  # fmt: skip
flat_values = st.one_of(
    st.sampled_from(["pro", "eu-west", "1.2.3.4", "ann@example.com", "token=abcdefgh12345678"]),
    st.integers(-(10**16), 10**16),
    st.sampled_from([4111111111111111, 10**13 - 1, -(10**13) + 1, 10**13, -(10**13)]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.lists(st.sampled_from(["pro", "ann@example.com", 4111111111111111]), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(flat_keys, flat_values), max_size=6))
def test_known_clean_keys_and_values_scrub_as_the_first_time(pairs: list[Any]) -> None:
    # The first pass learns which keys and values are clean; the second takes the fast path
    # for them and must give the same properties and the same remarks.
    value = dict(pairs)
    scrubber = Scrubber()
    first: list[str] = []
    second: list[str] = []
    assert scrubber.scrub(value, "properties", first) == scrubber.scrub(value, "properties", second)
    assert first == second


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(flat_keys, st.one_of(flat_values, st.floats())), max_size=6))
def test_properties_taken_as_they_are_would_scrub_to_themselves(pairs: list[Any]) -> None:
    # The worker keeps a known-clean flat dict as it is; that must be what coercion and
    # scrubbing would have made of it, without a remark.
    value = dict(pairs)
    scrubber = Scrubber()
    scrubber.scrub(coerce(value), "properties", [])  # learns the clean keys and strings
    if scrubber.as_is(value):
        remarks: list[str] = []
        assert scrubber.scrub(coerce(value), "properties", remarks) == value
        assert remarks == []


def test_a_clean_dict_is_taken_as_it_is_only_once_known() -> None:
    scrubber = Scrubber()
    value = {"plan": "pro", "seats": 3, "ratio": 0.5, "ok": True, "none": None}
    assert not scrubber.as_is(value)  # nothing seen yet
    scrubber.scrub(value, "properties", [])
    assert scrubber.as_is(value)
    for changed in ({"plan": "ann@example.com"}, {"seats": 4111111111111111},
                    {"ratio": float("nan")}, {"ratio": float("inf")}, {"password": "pro"},
                    {"plan": ["pro"]}, {"plan": b"pro"}):  # fmt: skip
        assert not scrubber.as_is({**value, **changed}), changed


@pytest.mark.parametrize(
    "key",
    ["password", "db_password", "accessToken", "X-API-Key", "api_key", "client_secret",
     "Authorization", "set-cookie", "email", "user_email", "e_mail", "ip", "client_ip",
     "clientIP", "IPAddress", "remote_addr", "x-forwarded-for", "privateKey", "credentials"],
)  # fmt: skip
def test_sensitive_names_redact_the_whole_value(key: str) -> None:
    clean, remarks = scrub({key: {"nested": "anything"}, "flag": True})
    assert clean[key] == "[REDACTED:secret_key]"
    assert remarks == [f"secret_key@properties.{key}"]
    assert scrub({key: True})[0] == {key: True}  # a flag says nothing
    assert scrub({key: None})[0] == {key: None}


def test_card_number_sent_as_an_integer() -> None:
    assert scrub({"n": 4111111111111111})[0] == {"n": "[REDACTED:credit_card]"}
    assert scrub({"n": 4111111111111112})[0] == {"n": 4111111111111112}  # Luhn fails
    assert scrub({"ms": 1732531200000})[0] == {"ms": 1732531200000}


# --- no false positives --------------------------------------------------------------------------

ORDINARY_TEXT = [
    "1.2.3", "10.0.19041", "0.0.1-rc.1+build.5", "v2.10.0", "3.11.7", "3.12.0rc1",
    "Windows-10-10.0.19041-SP0", "Windows-11-10.0.22631-SP0", "Linux-6.1.0-x86_64-with-glibc2.36",
    "macOS-14.1.1-arm64-arm-64bit", "Linux-5.15.0-1057-azure-x86_64-with-glibc2.35",
    "3.11.7 (main, Dec  8 2023, 18:56:58) [GCC 11.4.0]", "CPython", "x86_64", "aarch64",
    "2024-11-25T12:30:45Z", "2024-11-25T12:30:45.123+00:00", "12:30:45", "00:00:00.000",
    "1732531200000", "1732531200", "550e8400-e29b-41d4-a716-446655440000",
    "d41d8cd98f00b204e9800998ecf8427e",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "TextInput", "ChatOpenAI", "RecursiveCharacterTextSplitter", "BufferMemory",
    "tokenizer", "tokens", "token", "the tokenizer produced 512 tokens", "max_tokens=4096",
    "tokenCount: 12", "token_count=3", "num_tokens: 800", "password reset requested",
    "Bearer authentication is enabled", "Basic authentication failed", "token-based auth",
    "Token expired", "api key missing", "secret santa", "bypass=true", "keyboard key=Enter",
    "main.py", "flows/export.json", "report_2024-11-25.csv", "README.md", "./data/app.db",
    "std::vector<int>", "Foo::Bar", "00:1a:2b:3c:4d:5e", "ratio 16:9", "at 9:30",
    "user@localhost", "pkg@1.2.3", "@scope/package", "a @ b", "git@", "/home/", "~/project",
    "/api/Users/42", "/usr/local/bin", "/var/lib/app", "C:\\Program Files\\App",
    "HTTP 429 Too Many Requests", "phone-home disabled", "count: 42", "n=1000000",
    "https://example.com/path?q=1", "http://localhost:8080/api", "eyJ", "sk-learn", "ghp_",
]  # fmt: skip


@pytest.mark.parametrize("text", ORDINARY_TEXT)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert scrub({"v": text}) == ({"v": text}, [])


ORDINARY_KEYS = {
    "tokenCount": 5, "max_tokens": 4096, "tokenizer": "cl100k_base", "tokens": 12,
    "num_tokens": 3, "token_type": "bpe", "tooltip": "Save", "zip": "yes", "skip": 1,
    "ipVersion": 6, "ip_count": 2, "emailVerified": True, "email_count": 3, "keyboard": "us",
    "primary_key": "id", "session_id": "5d0b1b1e", "passwordLength": 12, "auth_method": "oauth",
    "version": "1.2.3.4", "app_version": "10.0.0.1", "dotnetVersion": "4.0.0.0",
}  # fmt: skip


def test_ordinary_keys_are_left_alone() -> None:
    assert scrub(ORDINARY_KEYS) == (ORDINARY_KEYS, [])


semver = st.tuples(*[st.integers(0, 999)] * 3).map(lambda t: ".".join(map(str, t)))
windows_build = st.tuples(st.integers(10, 11), st.integers(10000, 99999)).map(
    lambda t: f"{t[0]}.0.{t[1]}"
)
platforms = st.one_of(
    st.integers(10000, 99999).map(lambda b: f"Windows-10-10.0.{b}-SP0"),
    st.tuples(st.integers(3, 6), st.integers(0, 20), st.integers(0, 200), st.integers(17, 40)).map(
        lambda t: f"Linux-{t[0]}.{t[1]}.{t[2]}-x86_64-with-glibc2.{t[3]}"
    ),
    st.tuples(st.integers(10, 15), st.integers(0, 9)).map(
        lambda t: f"macOS-{t[0]}.{t[1]}.1-arm64-arm-64bit"
    ),
)
python_versions = st.tuples(st.integers(8, 14), st.integers(0, 20)).map(
    lambda t: f"3.{t[0]}.{t[1]}"
)
timestamps = st.datetimes().map(lambda d: d.isoformat()) | st.datetimes().map(
    lambda d: d.isoformat(timespec="milliseconds") + "Z"
)
times = st.times().map(lambda t: t.isoformat())
uuid7s = st.floats(0, 4_000_000_000).map(lambda t: str(uuid7(t)))
hex_hashes = st.binary(min_size=16, max_size=32).map(bytes.hex)
file_names = st.from_regex(r"[a-z][a-z0-9_-]{0,15}\.(py|json|txt|csv|yaml)", fullmatch=True)
components = st.from_regex(r"[A-Z][a-z]{2,8}(?:[A-Z][a-z]{2,8}){0,3}", fullmatch=True)
# Counts stay below 10**13; millisecond timestamps run to the year 2286 with 13 digits.
counts = st.integers(-(10**13) + 1, 10**13 - 1)
ms_timestamps = st.integers(10**12, 10**13 - 1)

ordinary_values = st.one_of(
    semver, windows_build, platforms, python_versions, timestamps, times, st.uuids().map(str),
    uuid7s, hex_hashes, file_names, components, counts, ms_timestamps,
    ms_timestamps.map(str), st.sampled_from(ORDINARY_TEXT), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    nested(
        st.one_of(
            ordinary_values,
            st.dictionaries(st.sampled_from(sorted(ORDINARY_KEYS)), ordinary_values, max_size=3),
        )
    )
)
def test_no_false_positive_on_ordinary_values(value: Any) -> None:
    assert scrub({"v": value}) == ({"v": value}, [])


@settings(max_examples=200, deadline=None)
@given(st.lists(ordinary_values.filter(lambda v: isinstance(v, str)), min_size=1, max_size=5))
def test_no_false_positive_on_ordinary_values_in_a_sentence(parts: list[str]) -> None:
    text = "Run on " + ", ".join(parts) + "."
    assert scrub({"v": text}) == ({"v": text}, [])


# --- four-part versions -----------------------------------------------------------------------


def test_four_part_version_is_an_address_except_in_a_version_field() -> None:
    # A dotted quad of numbers up to 255 is taken for an IPv4 address in free text. In a field
    # whose name ends in "version" it is a version.
    assert scrub({"note": "upgraded to 1.2.3.4"})[0] == {"note": "upgraded to [REDACTED:ipv4]"}
    assert scrub({"version": "1.2.3.4", "appVersion": "1.0.0.0"})[1] == []
    # The exemption is for the IPv4 rule alone.
    clean, remarks = scrub({"version": "1.2.3.4 by ann@example.com"})
    assert clean == {"version": "1.2.3.4 by [REDACTED:email]"}
    assert remarks == ["email@properties.version"]
    # Parts above 255, or three or five parts, never look like an address.
    assert scrub({"v": "10.0.19041.1234 and 1.2.3.4.5"})[1] == []


# --- configuration and plugin rules -----------------------------------------------------------


def test_config_disables_rules_adds_patterns_and_keys() -> None:
    config = TelemetryConfig.model_validate(
        {
            "scrub": {
                "disable": ["ipv4"],
                "patterns": {"ticket": r"\bTCK-\d{4,}\b"},
                "keys": ["customerName"],
            }
        }
    )
    scrubber = Scrubber.from_config(config)
    remarks: list[str] = []
    clean = scrubber.scrub(
        {"a": "10.0.0.1 TCK-12345", "customer_name": "Ann", "b": "x@example.com"}, "p", remarks
    )
    assert clean == {
        "a": "10.0.0.1 [REDACTED:ticket]",
        "customer_name": "[REDACTED:secret_key]",
        "b": "[REDACTED:email]",
    }
    assert remarks == ["ticket@p.a", "secret_key@p.customer_name", "email@p.b"]


def test_a_bad_pattern_names_its_key() -> None:
    from waypost.config import load

    # Refused when the config is loaded, so production mode turns telemetry off, not the host.
    with pytest.raises(ConfigError, match=r"telemetry\.scrub\.patterns: pattern 'broken' is not"):
        load({"telemetry": {"scrub": {"patterns": {"broken": "(unclosed"}}}}, {})


def test_plugin_rule_flags_apply_to_that_rule_only() -> None:
    scrubber = Scrubber(rules=[*BUILTIN_RULES, Rule("codename", r"project\s+falcon", flags=re.I)])
    remarks: list[str] = []
    assert scrubber.scrub_text("PROJECT Falcon", "p", remarks) == "[REDACTED:codename]"
    # The built-in rules keep their own case sensitivity.
    assert scrubber.scrub_text("BEARER authentication", "p", remarks) == "BEARER authentication"


def test_a_failed_check_does_not_hide_a_later_match() -> None:
    # The card rule sees a Luhn-invalid number first; the card right after it still goes.
    clean, remarks = scrub({"v": "ref 4111111111111112 4111111111111111"})
    assert clean == {"v": "ref 4111111111111112 [REDACTED:credit_card]"}
    assert remarks == ["credit_card@properties.v"]


def test_redaction_uncovers_a_neighbour() -> None:
    clean, _ = scrub({"v": "token=a&b@example.org"})
    assert "example.org" not in json.dumps(clean)


def test_ipv6_rule_accepts_every_form_python_prints() -> None:
    for text in ["::1", "fe80::", "1::", "2001:db8::", "::ffff:0:0", "1:2:3:4:5:6:7:8",
                 "1:2:3:4:5:6:1.2.3.4", "64:ff9b::192.0.2.33"]:  # fmt: skip
        ipaddress.IPv6Address(text)
        assert scrub({"v": f"at {text}."})[0] == {"v": "at [REDACTED:ipv6]."}, text
