"""The labelled corpora the scrubbers are measured on: values of every promised kind (with
what must not be readable of them afterwards) and the forms they travel in, ordinary telemetry
values that must pass unchanged, and a reader that decodes text independently of the
scrubbers' own decoder."""

from __future__ import annotations

import base64
import html
import json
import random
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from waypost.events import uuid7


@dataclass(frozen=True)
class Planted:
    kind: str
    form: str
    text: str
    needles: tuple[str, ...]  # what must not be readable in the output, in any decoding


# --- the values of each promised kind ------------------------------------------------------------


def luhn_complete(body: str) -> str:
    """``body`` with the check digit that makes it pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def _iban(country: str, bban: str) -> str:
    digits = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, object], signature: bytes) -> str:
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{head}.{_b64url(json.dumps(claims).encode())}.{_b64url(signature)}"


def _pem(kind: str, body: bytes) -> tuple[str, str]:
    text = base64.b64encode(body).decode()
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {kind}-----\n{lines}\n-----END {kind}-----", text[:40]


CARDS = [luhn_complete(p) for p in ("411111111111111", "555555555555444", "37828224631000",
                            "601111111111111", "353011133330000", "36227206271667"[:13],
                            "222100000000000", "622126000000000")]  # fmt: skip
IBANS = [
    _iban("DE", "370400440532013000"), _iban("GB", "WEST12345698765432"),
    _iban("FR", "20041010050500013M02606"), _iban("NL", "ABNA0417164300"),
    _iban("ES", "21000418450200051332"), _iban("IT", "X0542811101000000123456"),
    _iban("CH", "00762011623852957"), _iban("BE", "539007547034"),
    _iban("AT", "1904300234573201"), _iban("PL", "109010140000071219812874"),
]  # fmt: skip


def _grouped(iban: str) -> str:
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))


TOKEN_CHARS = "ABCDEFGHJKMNPQRSTVWXYZabcdefghjkmnpqrstvwxyz23456789"


def kinds() -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Per promised kind: (value, needles) in the shapes people write them."""
    rng = random.Random(20)

    def token(n: int) -> str:
        return "".join(rng.choice(TOKEN_CHARS) for _ in range(n))

    out: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    out["email"] = [(e, (e,)) for e in (
        "jane.doe@example.com", "j.smith+newsletter@mail.example.co.uk", "ops-team@acme.io",
        "JOHN_DOE@EXAMPLE.ORG", "x@a.xn--p1ai", "josé@bücher.de", "first.last@sub.domain.example",
        "a1b2c3@company-name.com",
    )]  # fmt: skip
    out["email"] += [
        ("Jane Doe <jane@example.net>", ("jane@example.net",)),
        ("mailto:support@example.org?subject=hi", ("support@example.org",)),
    ]
    out["ipv4"] = [(a, (a,)) for a in ("192.168.1.20", "10.0.0.1", "172.16.254.3", "8.8.8.8",
                                       "203.0.113.77", "100.64.12.9")]  # fmt: skip
    out["ipv4"] += [("10.1.2.3:8080", ("10.1.2.3",)), ("http://192.0.2.10/admin", ("192.0.2.10",))]
    out["ipv6"] = [(a, (a,)) for a in ("2001:db8::1", "fe80::1ff:fe23:4567:890a",
                                       "2001:0db8:0000:0000:0000:ff00:0042:8329",
                                       "::ffff:192.0.2.128", "2606:4700:4700::1111",
                                       "FE80::ABCD:EF01")]  # fmt: skip
    out["ipv6"] += [("[2001:db8::7]:443", ("2001:db8::7",)), ("fe80::1%eth0", ("fe80::1",))]
    amex = CARDS[2]
    out["credit_card"] = [(c, (c,)) for c in CARDS[:5]] + [
        (" ".join(CARDS[0][i : i + 4] for i in range(0, 16, 4)), (CARDS[0][-8:],)),
        ("-".join(CARDS[1][i : i + 4] for i in range(0, 16, 4)), (CARDS[1][-8:],)),
        (f"{amex[:4]} {amex[4:10]} {amex[10:]}", (f"{amex[4:10]} {amex[10:]}",)),
    ]  # fmt: skip
    out["iban"] = [(i, (i,)) for i in IBANS[:6]] + [
        (_grouped(i), (_grouped(i)[5:],)) for i in IBANS[6:]
    ]
    out["phone"] = [(p, (p,)) for p in (
        "+44 20 7946 0958", "+1 (202) 555-0143", "+1-202-555-0143", "+4915112345678",
        "+33 1 23 45 67 89", "+81 3-1234-5678", "(202) 555-0143", "202-555-0143",
    )]  # fmt: skip
    out["national_id"] = [(n, (n,)) for n in ("078-05-1120", "219-09-9999", "457-55-5462")]
    out["jwt"] = [
        (t, (t.split(".")[1],))
        for t in (
            _jwt({"sub": "1234567890", "name": "Jane Doe"}, b"\x01" * 32),
            _jwt({"sub": "u_42", "scope": "admin"}, b"sig-bytes-here"),
            _jwt({"iss": "https://id.example", "exp": 1732531200}, b""),
        )
    ]
    out["api_key"] = [(k, (k,)) for k in (
        "AKIA" + token(16).upper(), "ASIA" + token(16).upper(), "ghp_" + token(36),
        "github_pat_11" + token(20) + "_" + token(59), "xoxb-123456789012-" + token(24),
        "sk_live_" + token(24), "rk_test_" + token(24), "sk-proj-" + token(48),
        "sk-ant-api03-" + token(40), "AIza" + token(35), "glpat-" + token(20),
        "npm_" + token(36), "hf_" + token(34), "phx_" + token(40), "dckr_pat_" + token(27),
        "pypi-AgEIcHlwaS5vcmc" + token(50), "SG." + token(22) + "." + token(43),
        "hooks.slack.com/services/T000/B000/" + token(24),
    )]  # fmt: skip
    pems = ["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY"]  # fmt: skip
    out["private_key"] = [
        (pem, (needle,)) for pem, needle in (_pem(k, rng.randbytes(96)) for k in pems)
    ]
    bearer = [token(32), _b64url(rng.randbytes(30)), token(12) + "." + token(20)]
    out["bearer_token"] = [(f"Bearer {t}", (t,)) for t in bearer] + [
        (f"Token {bearer[0]}", (bearer[0],)), (f"BEARER {bearer[1]}", (bearer[1],)),
    ]  # fmt: skip
    basic = [base64.b64encode(p.encode()).decode() for p in ("admin:hunter22", "svc:p@ss/w0rd!")]
    out["basic_auth"] = [(f"Basic {b}", (b,)) for b in basic] + [(f"basic {basic[0]}", (basic[0],))]
    secret = token(20)
    phrase = "correct horse battery staple"
    words = tuple(phrase.split())
    out["secret_pair"] = [
        (f"password={secret}", (secret,)), (f"db_password: {secret}", (secret,)),
        (f"password: {phrase}", words), (f"passphrase = '{phrase}'", words),
        (f'"apiKey": "{secret}"', (secret,)), (f"?access_token={secret}&page=2", (secret,)),
        (f"client_secret='{phrase}'", words), (f"aws_secret_access_key={secret}", (secret,)),
        (f"Authorization=Bearer {secret}", (secret,)),
        (f"Authorization: Bearer {secret}", (secret,)),
        (f"authorization: Basic {basic[1]}", (basic[1],)), (f"X-API-Key: {secret}", (secret,)),
        (f"Cookie: sessionid={secret}; csrftoken={secret[::-1]}", (secret, secret[::-1])),
        (f"Set-Cookie: sid={secret}; Path=/; HttpOnly", (secret,)),
        (f"host=db user=app password={secret[:8]}/x@y dbname=app", (secret[:8] + "/x@y",)),
        (f"Server=db;User Id=app;Password={secret};", (secret,)),
        (f"X-Amz-Signature={secret}", (secret,)), (f"token: {phrase}", words),
        (f"secret => {secret}", (secret,)), (f"AccountKey={secret}==", (secret,)),
    ]  # fmt: skip
    pw_slash, pw_at = f"{token(6)}/{token(6)}", f"{token(5)}@{token(5)}:{token(3)}"
    out["url_credentials"] = [
        (f"postgresql://app:{secret}@db.internal:5432/app", (secret,)),
        (f"postgresql://app:{pw_slash}@db.internal/app", (pw_slash, pw_slash.split("/")[1])),
        (f"mongodb+srv://admin:{pw_at}@cluster0.example.net/db", (pw_at, pw_at.split("@")[1])),
        (f"redis://:{secret}@cache:6379/0", (secret,)),
        (f"https://deploy:{secret}@git.example.com/org/repo.git", (secret,)),
        (f"https://{secret}@sentry.example.io/42", (secret,)),
        (f"amqp://guest:{pw_slash}@[2001:db8::5]:5672/", (pw_slash,)),
    ]  # fmt: skip
    users = ["jdoe42", "maria.garcia", "svc-build"]
    out["home_path"] = [
        (f"/home/{users[0]}/project/app.py", (users[0],)),
        (f"/var/home/{users[1]}/.config/app", (users[1],)),
        (f"/usr/home/{users[2]}/src", (users[2],)),
        (f"/Users/{users[0]}/Library/Logs", (users[0],)),
        (f"/System/Volumes/Data/Users/{users[1]}/Documents", (users[1],)),
        (f"/Volumes/Macintosh HD/Users/{users[2]}/Desktop", (users[2],)),
        (f"C:\\Users\\{users[0]}\\AppData\\Local", (users[0],)),
        (f"C:/Users/{users[1]}/Documents/x.txt", (users[1],)),
        ("C:\\Users\\Maria Garcia\\AppData", ("Maria Garcia",)),
        (f"/mnt/c/Users/{users[2]}/src", (users[2],)),
        (f"/mnt/d/users/{users[0]}/x", (users[0],)),
        (f"\\\\fileserver\\Users\\{users[1]}\\Desktop", (users[1],)),
        (f"\\\\fs01\\profiles$\\{users[2]}\\AppData", (users[2],)),
        (f"C:\\Documents and Settings\\{users[0]}\\x", (users[0],)),
        (f"/cygdrive/c/Users/{users[1]}/x", (users[1],)),
        (f"file:///home/{users[2]}/notes.txt", (users[2],)),
    ]  # fmt: skip
    return out


# --- the forms a value travels in -----------------------------------------------------------------


def _entities(text: str, named: bool) -> str:
    names = {"@": "&commat;", ".": "&period;", ":": "&colon;", "/": "&sol;", "=": "&equals;"}
    out = html.escape(text, quote=True)
    for ch, name in names.items():
        out = out.replace(ch, name if named else f"&#{ord(ch)};")
    return out


FORMS: dict[str, Callable[[str], str]] = {
    "plain": lambda v: v,
    "sentence": lambda v: f"step 3 failed for {v} (retrying)",
    "json": lambda v: json.dumps({"detail": v}),
    "json-escaped": lambda v: json.dumps(v).replace("@", "\\u0040").replace("/", "\\/"),
    "percent": lambda v: "https://app.example/callback?next=" + urllib.parse.quote(v, safe=""),
    "form": lambda v: "q=" + urllib.parse.quote_plus(v) + "&page=1",
    "percent-twice": lambda v: urllib.parse.quote(urllib.parse.quote(v, safe=""), safe=""),
    "html-numeric": lambda v: f"<p>{_entities(v, named=False)}</p>",
    "html-named": lambda v: _entities(v, named=True),
    "repr": lambda v: f"ValueError({v!r})",
    "html-hex": lambda v: "".join(f"&#x{ord(c):x};" if c in "@.:/=\\" else c for c in v),
    "unicode-escaped": lambda v: "".join(f"\\u{ord(c):04x}" if c in "@.:/" else c for c in v),
    "xml": lambda v: f"<error code='7'>{html.escape(v)}</error>",
    "log-line": lambda v: f"2024-11-25T12:30:45Z ERROR [worker-3] request failed: {v}",
    "traceback": lambda v: (
        'Traceback (most recent call last):\n  File "/app/run.py", line 3, in <module>\n'
        f"RuntimeError: {v}\n"
    ),
    "brackets": lambda v: f"[{v}] <{v}> ({v})",
    "csv": lambda v: f"42,{v},ok",
    "markdown": lambda v: f"see `{v}` for details",
}


def planted() -> list[Planted]:
    out = []
    for kind, values in kinds().items():
        for value, needles in values:
            for form, encode in FORMS.items():
                out.append(Planted(kind, form, encode(value), needles))
    return out


def _json_unescape(text: str) -> str:
    return re.sub(
        r"\\(u[0-9A-Fa-f]{4}|[\\/\"'nrt])",
        lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] == "u"
        else {"n": "\n", "r": "\r", "t": "\t"}.get(m.group(1), m.group(1)),
        text,
    )  # fmt: skip


def readings(text: str) -> Iterator[str]:
    """``text`` as a reader could decode it (independently of the scrubber's own decoder)."""
    seen = {text}
    frontier = [text]
    for _ in range(3):
        new = []
        for t in frontier:
            for view in (urllib.parse.unquote(t), urllib.parse.unquote_plus(t),
                         html.unescape(t), _json_unescape(t)):  # fmt: skip
                if view not in seen:
                    seen.add(view)
                    new.append(view)
        frontier = new
    yield from seen


def leaks(text: str, needles: tuple[str, ...]) -> list[str]:
    return [n for n in needles for view in readings(text) if n in view]


# --- ordinary telemetry -------------------------------------------------------------------------


COMPONENTS = [
    "ChatOpenAI", "OpenAIEmbeddings", "RecursiveCharacterTextSplitter", "BufferMemory",
    "TextInput", "ChatInput", "ChatOutput", "PromptTemplate", "ConversationChain", "Chroma",
    "PineconeVectorStore", "SQLDatabaseChain", "APIRequest", "PythonREPLTool", "WebhookTrigger",
    "GoogleSearchAPI", "AstraDB", "OllamaEmbeddings", "AzureChatOpenAI", "AnthropicLLM",
]  # fmt: skip
FLOWS = [
    "customer-support-bot", "RAG pipeline v2", "invoice_parser", "Document QA", "lead-scoring",
    "nightly-export", "Slack notifier", "Onboarding Flow (copy)", "summarise-tickets", "My Flow 3",
]  # fmt: skip
FIXED = [
    "1.2.3", "10.0.19041", "0.0.1-rc.1+build.5", "v2.10.0", "3.11.7", "3.12.0rc1", "1.0.0-beta.2",
    "Windows-10-10.0.19041-SP0", "Windows-11-10.0.22631-SP0", "Linux-6.1.0-x86_64-with-glibc2.36",
    "macOS-14.1.1-arm64-arm-64bit", "3.11.7 (main, Dec  8 2023, 18:56:58) [GCC 11.4.0]",
    "CPython", "PyPy", "x86_64", "aarch64", "arm64", "node v20.11.1", "Node.js 18.19.0",
    "2024-11-25T12:30:45Z", "2024-11-25T12:30:45.123+00:00", "2024-11-25 12:30:45+05:30",
    "Mon, 25 Nov 2024 12:30:45 +0000", "12:30:45", "00:00:00.000", "2024-11-25", "25/11/2024",
    "PT1H30M", "P7D", "1h30m", "250ms", "1.5s", "00:01:23.456", "3 days, 4:05:06", "42 min",
    "12.5 MB", "512KiB", "1.2 GB", "4096 bytes", "3.4 TiB", "1,234,567", "1 234 567", "98.6%",
    "HTTP 429 Too Many Requests", "Error: ECONNREFUSED", "ETIMEDOUT", "KeyError: 'flow_id'",
    "TypeError: Cannot read properties of undefined (reading 'map')", "exit code 137",
    "SELECT count(*) FROM flows WHERE id = $1", "the tokenizer produced 512 tokens",
    "max_tokens=4096", "tokenCount: 12", "token_count=3", "num_tokens: 800", "tokens=512",
    "password reset requested", "password_length: 12", "Bearer authentication is enabled",
    "Basic authentication failed", "token-based auth", "Token expired", "api key missing",
    "secret santa", "bypass=true", "keyboard key=Enter", "primary_key=id", "sort=desc&page=2",
    "https://example.com/path?q=1", "http://localhost:8080/api", "https://api.openai.com/v1/chat/completions",
    "https://cdn.jsdelivr.net/npm/pkg@1.2.3/dist/x.js", "https://registry.npmjs.org/@scope%2fpkg",
    "https://github.com/langflow-ai/langflow/releases/tag/1.0.18", "https://hub.docker.com/r/flowiseai/flowise",
    "https://app.example/flows/42?tab=settings#runs", "http://localhost:3000/api/v1/prediction/abc",
    "https://example.com:8443/health", "wss://realtime.example.com/socket?vsn=2.0.0",
    "https://www.google.com/search?q=langflow+components", "s3://bucket-name/exports/2024/11/25.csv",
    "/app/flows/export.json", "src/components/Button.tsx", "C:\\Program Files\\App\\bin\\app.exe",
    "/opt/app/lib/python3.11/site-packages/langflow/main.py",
    "/usr/lib/node_modules/flowise/dist/index.js",
    "./data/app.db", "/var/lib/app/db.sqlite", "/srv/flowforge/var/", "/tmp/upload-1234.bin",
    "/usr/local/bin", "/etc/nginx/conf.d/app.conf", "/api/Users/42", "/home/", "~/project",
    "/root/.cache/pip", "C:\\ProgramData\\App\\logs", "D:\\builds\\release\\app.zip",
    "std::vector<int>", "Foo::Bar", "00:1a:2b:3c:4d:5e", "ratio 16:9", "at 9:30", "user@localhost",
    "pkg@1.2.3", "@scope/package", "a @ b", "git@", "eyJ", "sk-learn", "ghp_", "phone-home off",
    "count: 42", "n=1000000", "+1 day", "+12.5%", "-3", "+5", "ISBN 978-3-16-148410-0", "sha256:",
    "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "C++", "C#", "F# 8.0", ".NET 8.0.1",
    "en-US", "de_DE.UTF-8", "Europe/Berlin", "UTC+02:00", "GMT-5", "us-east-1", "eu-west-2",
    "t3.medium", "m5.xlarge", "Standard_D2s_v3", "gpt-4o-mini", "claude-3-5-sonnet-20241022",
    "text-embedding-3-small", "llama3.1:8b", "mistral-7b-instruct-v0.2.Q4_K_M.gguf",
    "auth_method=oauth", "session_id=5d0b1b1e", "csrf protection on", "cookie banner shown",
    "HTTP/1.1 200 OK", "HTTP/2", "TLSv1.3", "ECDHE-RSA-AES128-GCM-SHA256", "UTF-8", "gzip, br",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "postgres", "postgresql+asyncpg", "sqlite:///./langflow.db", "sqlite:////var/lib/app/app.db",
    "redis://cache:6379/0", "postgresql://db.internal:5432/app", "amqp://rabbitmq:5672/",
    "DE", "GB", "NL91", "AB12", "ABCD1234", "SKU-12345-XL", "ORD-2024-000123", "INV/2024/0042",
    "404", "500", "1732531200", "1732531200000", "0.5", "1e-06", "NaN handled", "true", "false",
]  # fmt: skip


def ordinary() -> list[str]:
    rng = random.Random(21)
    n, pick = rng.randint, rng.choice
    out = list(FIXED)
    out += [f"{n(0, 30)}.{n(0, 99)}.{n(0, 999)}" for _ in range(80)]
    out += [f"v{n(0, 9)}.{n(0, 20)}.{n(0, 50)}-beta.{n(1, 9)}" for _ in range(20)]
    out += [f"10.0.{n(10000, 26100)}.{n(256, 4000)}" for _ in range(20)]
    out += [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(60)]
    out += [str(uuid7(1.7e9 + rng.random() * 1e8)) for _ in range(40)]
    out += [rng.randbytes(size).hex() for size in (16, 20, 32) for _ in range(25)]
    out += [rng.randbytes(4).hex()[:7] for _ in range(20)]  # short git revisions
    out += [f"{rng.uniform(0, 5000):.1f}ms" for _ in range(30)]
    out += [f"{n(0, 10**12)}" for _ in range(40)]
    out += [f"{n(1, 1023)}.{n(0, 9)} {pick(['KB', 'MB', 'GB', 'KiB', 'MiB'])}" for _ in range(30)]
    out += [
        f"2024-{n(1, 12):02d}-{n(1, 28):02d}T{n(0, 23):02d}:{n(0, 59):02d}:{n(0, 59):02d}"
        f".{n(0, 999):03d}Z"
        for _ in range(40)
    ]
    out += [
        f"{pick(COMPONENTS)}-{pick('abcdefghijk')}{n(10, 99)}{pick('XYZuvw')}" for _ in range(40)
    ]
    out += [f"{pick(COMPONENTS)} in {pick(FLOWS)}" for _ in range(40)]
    out += COMPONENTS + FLOWS
    out += [
        f"https://api.example.com/v1/flows/{n(1, 9999)}?page={n(1, 9)}&sort=desc" for _ in range(25)
    ]
    out += [f"/app/flows/{pick(FLOWS).replace(' ', '_')}/{n(1, 99)}.json" for _ in range(25)]
    out += [
        f"{pick(['took', 'waited', 'ran for'])} {n(1, 500)} {pick(['ms', 's', 'minutes'])}"
        for _ in range(25)
    ]
    out += [f"{n(0, 10**6):,} events" for _ in range(20)]
    out += [f"exit code {n(0, 255)} after {n(1, 99)} retries" for _ in range(20)]
    # Ordinary values travel encoded too: in JSON, in a query string, in HTML.
    for form in ("json", "percent", "html-numeric"):
        out += [FORMS[form](v) for v in rng.sample(FIXED, 60)]
    return list(dict.fromkeys(out))
