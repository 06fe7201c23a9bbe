"""The privacy gate: consent resolution, levels, scrubbers and the IP-hashing helper.

One gate stands in front of every sink. Consent is resolved by a fixed precedence, first match
wins, and the deciding rule is kept for ``status()``:

1. ``DO_NOT_TRACK`` set to a true value (``1``, ``true``, ``yes``, ``on``, any case) -> off.
2. The application's own variable (``disable_env``: true means off; ``enable_env``: true means
   on, false means off). A value that is not a recognised boolean is ignored.
3. The config file's ``telemetry.enabled``.
4. The stored admin choice (``waypost consent on|off``, ``Telemetry.set_consent``).
5. The application's default: ``opt-out`` is on, ``opt-in`` is off.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waypost.config import TelemetryConfig
from waypost.events import LEVELS

TRUE_VALUES = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE_VALUES = frozenset({"0", "false", "no", "off", "n", "f"})
CONSENT_FILE = "consent.json"


def parse_bool(value: str | None) -> bool | None:
    """True/False for a recognised boolean string, None otherwise (unset, empty, unknown)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in TRUE_VALUES:
        return True
    if text in FALSE_VALUES:
        return False
    return None


# --- consent ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether telemetry is on, which rule decided (``do_not_track``, ``app_env``, ``config``,
    ``admin``, ``default``) and why, in words."""

    enabled: bool
    rule: str
    reason: str


@dataclass(frozen=True)
class StoredConsent:
    enabled: bool
    policy_version: str
    at: float

    @classmethod
    def read(cls, data_dir: Path) -> StoredConsent | None:
        try:
            raw = json.loads((data_dir / CONSENT_FILE).read_text(encoding="utf-8"))
            return cls(bool(raw["enabled"]), str(raw.get("policy_version", "1")), float(raw["at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{CONSENT_FILE}.{os.getpid()}"
        tmp.write_text(
            json.dumps(
                {"enabled": self.enabled, "policy_version": self.policy_version, "at": self.at}
            ),
            encoding="utf-8",
        )
        os.replace(tmp, data_dir / CONSENT_FILE)


def resolve_consent(
    config: TelemetryConfig,
    env: Mapping[str, str],
    stored: StoredConsent | None,
    *,
    config_source: str | None = None,
) -> Decision:
    """Apply the fixed precedence and return the first rule that decides."""
    dnt = env.get("DO_NOT_TRACK")
    if parse_bool(dnt):
        return Decision(False, "do_not_track", f"DO_NOT_TRACK={dnt} is set in the environment")
    if config.disable_env:
        value = env.get(config.disable_env)
        flag = parse_bool(value)
        if flag is not None:
            return Decision(
                not flag, "app_env", f"{config.disable_env}={value} is set in the environment"
            )
    if config.enable_env:
        value = env.get(config.enable_env)
        flag = parse_bool(value)
        if flag is not None:
            return Decision(
                flag, "app_env", f"{config.enable_env}={value} is set in the environment"
            )
    if config.enabled is not None:
        where = config_source or "configuration"
        state = "true" if config.enabled else "false"
        return Decision(config.enabled, "config", f"telemetry.enabled is {state} in {where}")
    if stored is not None:
        if not stored.enabled:
            return Decision(False, "admin", "the administrator turned telemetry off")
        if stored.policy_version == config.policy_version:
            return Decision(True, "admin", "the administrator turned telemetry on")
        if config.mode == "opt-in":
            return Decision(
                False,
                "default",
                f"consent was given for policy version {stored.policy_version}, the policy is "
                f"now version {config.policy_version}: opt-in mode asks again",
            )
    if config.mode == "opt-in":
        return Decision(False, "default", "the application is opt-in and nobody opted in")
    return Decision(True, "default", "the application is opt-out and nobody opted out")


# --- levels -----------------------------------------------------------------------------------


def level_allows(configured: str, event_level: str) -> bool:
    """True when an event of ``event_level`` passes the configured level."""
    return 0 < LEVELS.get(event_level, 2) <= LEVELS[configured]


# --- scrubbers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A scrubbing rule: text matching ``pattern`` is replaced by ``[REDACTED:<name>]``.

    ``check``, if given, confirms a match (a Luhn check, an address parse) so that look-alikes
    are left alone.
    """

    name: str
    pattern: str
    check: Callable[[str], bool] | None = None
    flags: int = 0


def _luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _ipv6(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(
        "private_key",
        r"-----BEGIN[A-Z ]*PRIVATE KEY-----(?:[\s\S]*?-----END[A-Z ]*PRIVATE KEY-----|[\s\S]*)",
    ),
    Rule("jwt", r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}"),
    Rule("bearer_token", r"(?i)\b(?:bearer|token|basic)\s+[A-Za-z0-9._~+/=-]{12,}"),
    Rule("url_credentials", r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]+:[^\s/@]+@"),
    Rule(
        "secret_pair",
        r"(?i)\b(?:password|passwd|pwd|pass|secret|client_secret|api[_-]?key|apikey|"
        r"access[_-]?token|refresh[_-]?token|auth[_-]?token|token)\s*[=:]\s*[^\s&;,'\"]+",
    ),
    Rule(
        "api_key",
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_\w{30,}"
        r"|\bxox[abprs]-[A-Za-z0-9-]{10,}|\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}"
        r"|\bsk-[A-Za-z0-9_-]{20,}|\bAIza[0-9A-Za-z_-]{35}\b|\bphx_[A-Za-z0-9]{20,}"
        r"|\bglpat-[A-Za-z0-9_-]{20,}|\bnpm_[A-Za-z0-9]{36}\b|\bhf_[A-Za-z0-9]{30,}\b",
    ),
    Rule("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    Rule("ipv4", rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)"),
    Rule(
        "ipv6",
        r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|"
        + _OCTET
        + r"(?:\."
        + _OCTET
        + r"){3})(?![\w:])",
        check=_ipv6,
    ),
    Rule("credit_card", r"(?<![\w-])(?:[2-6]\d{3})(?:[ -]?\d){9,15}(?![\w-])", check=_luhn),
    Rule(
        "home_path",
        r"(?:/home/|/Users/|[A-Za-z]:\\{1,2}Users\\{1,2}|/var/home/)(?!<user>)[^\s/\\:*?\"<>|]+",
    ),
)

SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "apikey",
        "accesstoken",
        "refreshtoken",
        "authtoken",
        "authorization",
        "auth",
        "cookie",
        "setcookie",
        "sessionid",
        "session",
        "privatekey",
        "clientsecret",
        "apisecret",
        "secretkey",
        "credentials",
        "credential",
        "email",
        "emailaddress",
        "ip",
        "ipaddress",
        "remoteaddr",
        "clientip",
    }
)


_CACHED_STRINGS = 4096
"""How many clean strings (and secret-key verdicts) a Scrubber remembers before starting over."""
_CACHED_LENGTH = 256
"""Longer strings are always scanned: they are rarely repeated."""


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


@dataclass
class Scrubber:
    """Redacts personal data and secrets from property values (and keys), leaving remarks.

    Remarks read ``<rule>@<field path>``; the redacted value itself is never kept.
    """

    rules: list[Rule] = field(default_factory=lambda: list(BUILTIN_RULES))
    secret_keys: frozenset[str] = SECRET_KEYS

    def __post_init__(self) -> None:
        self._compile()

    @classmethod
    def from_config(cls, config: TelemetryConfig, extra: Iterable[Rule] = ()) -> Scrubber:
        scrub = config.scrub
        rules = [r for r in BUILTIN_RULES if r.name not in scrub.disable]
        rules += [Rule(name, pattern) for name, pattern in scrub.patterns.items()]
        rules += list(extra)
        keys = SECRET_KEYS | {_norm_key(k) for k in scrub.keys}
        return cls(rules=rules, secret_keys=keys)

    def add(self, rule: Rule) -> None:
        self.rules.append(rule)
        self._compile()

    def _compile(self) -> None:
        parts = []
        self._by_group: dict[str, Rule] = {}
        # Telemetry repeats the same keys and short values: remembering which strings matched
        # no rule (and which keys are secret) spares the combined regex most of the work.
        self._clean: dict[str, None] = {}
        self._secret: dict[str, bool] = {}
        for i, rule in enumerate(self.rules):
            group = f"r{i}"
            re.compile(rule.pattern, rule.flags)  # fail early with the rule's own pattern
            inline = rule.pattern
            flags = ""
            if inline.startswith("(?i)"):
                inline, flags = inline[4:], "i"
            parts.append(f"(?P<{group}>{'(?' + flags + ':' + inline + ')' if flags else inline})")
            self._by_group[group] = rule
        self._regex = re.compile("|".join(parts)) if parts else None

    def scrub_text(self, text: str, path: str, remarks: list[str]) -> str:
        clean = self._clean
        if text in clean:
            return text
        regex = self._regex
        if regex is None or regex.search(text) is None:
            if len(text) <= _CACHED_LENGTH:
                if len(clean) >= _CACHED_STRINGS:
                    clean.clear()
                clean[text] = None
            return text
        by_group = self._by_group

        def replace(match: re.Match[str]) -> str:
            group = match.lastgroup
            assert group is not None
            rule = by_group[group]
            found = match.group(0)
            if rule.check is not None and not rule.check(found):
                return found
            remarks.append(f"{rule.name}@{path}")
            if rule.name == "home_path":
                return re.sub(r"[^/\\]+$", "<user>", found)
            return f"[REDACTED:{rule.name}]"

        return regex.sub(replace, text)

    def _is_secret_key(self, key: str) -> bool:
        secret = self._secret.get(key)
        if secret is None:
            if len(self._secret) >= _CACHED_STRINGS:
                self._secret.clear()
            secret = self._secret[key] = _norm_key(key) in self.secret_keys
        return secret

    def scrub(self, value: Any, path: str, remarks: list[str]) -> Any:
        """Return ``value`` with every match redacted; append a remark per redaction."""
        if isinstance(value, str):
            return self.scrub_text(value, path, remarks)
        if isinstance(value, dict):
            out = {}
            clean = self._clean
            for key, item in value.items():
                if (
                    self._is_secret_key(key)
                    and item is not None
                    and not isinstance(item, (bool, dict, list))
                ):
                    remarks.append(f"secret_key@{path}.{key}")
                    out[key] = "[REDACTED:secret_key]"
                    continue
                clean_key = key
                if key and key not in clean:
                    clean_key = self.scrub_text(key, f"{path}.<key>", remarks)
                kind = type(item)
                if kind is str:
                    if item not in clean:
                        item = self.scrub_text(item, f"{path}.{key}", remarks)
                elif (
                    kind is not int and kind is not float and kind is not bool and item is not None
                ):
                    item = self.scrub(item, f"{path}.{key}", remarks)
                out[clean_key] = item
            return out
        if isinstance(value, list):
            return [self.scrub(item, f"{path}[{i}]", remarks) for i, item in enumerate(value)]
        return value


# --- IP hashing -------------------------------------------------------------------------------


class IpHasher:
    """Salted SHA-256 of IP addresses with a rotating salt, for receivers that must key on an
    address without storing it (FlowForge stores such a hash, never the address).

    The current and the previous salt are kept in ``path`` (mode 0600); a rotation destroys the
    older one, so hashes older than two periods can no longer be linked to an address.
    """

    def __init__(self, path: str | os.PathLike[str], *, rotate_every: float = 86400.0) -> None:
        self.path = Path(path)
        self.rotate_every = rotate_every

    def _load(self, now: float) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(state.get("current"), dict):
                raise ValueError
        except (OSError, ValueError):
            state = {"current": {"salt": secrets.token_hex(32), "at": now}, "previous": None}
            self._save(state)
        if now - float(state["current"]["at"]) >= self.rotate_every:
            state = {
                "current": {"salt": secrets.token_hex(32), "at": now},
                "previous": state["current"],
            }
            self._save(state)
        return state

    def _save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, self.path)

    @staticmethod
    def _digest(salt: str, address: str) -> str:
        import ipaddress

        try:
            canonical = str(ipaddress.ip_address(address.strip()))
        except ValueError:
            canonical = address.strip().lower()
        return hashlib.sha256(bytes.fromhex(salt) + canonical.encode()).hexdigest()

    def hash(self, address: str, *, now: float | None = None) -> str:
        """The hash of ``address`` under the current salt."""
        state = self._load(time.time() if now is None else now)
        return self._digest(state["current"]["salt"], address)

    def matches(self, address: str, hashed: str, *, now: float | None = None) -> bool:
        """True if ``hashed`` is ``address`` under the current or the previous salt."""
        state = self._load(time.time() if now is None else now)
        salts = [state["current"]["salt"]] + (
            [state["previous"]["salt"]] if state.get("previous") else []
        )
        return any(secrets.compare_digest(self._digest(salt, address), hashed) for salt in salts)
