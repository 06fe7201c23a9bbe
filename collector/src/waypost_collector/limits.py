"""Who is asking and how often: the client address behind trusted proxies, and token buckets
for the per-address and per-installation rates (kept in memory, per process)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Iterable, Sequence

from waypost_collector.config import Rate

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_KEYS = 100_000
"""Buckets kept at most; past that, the full ones (idle keys) are forgotten."""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the nearest
    address in ``X-Forwarded-For`` (read right to left) that is not itself a trusted proxy.
    Nobody else's ``X-Forwarded-For`` is read, so a client cannot choose its own address."""
    address = _ip(peer) if peer else None
    if address is None:
        return peer
    if not trusted or not any(address in net for net in trusted):
        return str(address)
    hops = [h for header in forwarded_for for h in header.split(",") if h.strip()]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            break  # a garbled hop: do not trust anything further left
        address = ip
        if not any(ip in net for net in trusted):
            break
    return str(address)


class Buckets:
    """Token buckets keyed by text: ``rate.count`` tokens, refilled over ``rate.per`` seconds."""

    def __init__(self, rate: Rate | None) -> None:
        self.rate = rate
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str, n: int = 1, *, now: float | None = None) -> float:
        """Take ``n`` tokens: 0.0 if they were there, else the seconds until they will be
        (nothing is taken then)."""
        rate = self.rate
        if rate is None:
            return 0.0
        now = time.monotonic() if now is None else now
        per_second = rate.count / rate.per
        with self._lock:
            tokens, when = self._state.get(key, (float(rate.count), now))
            tokens = min(float(rate.count), tokens + (now - when) * per_second)
            if tokens >= n:
                self._state[key] = (tokens - n, now)
                if len(self._state) > MAX_KEYS:
                    self._prune(now, per_second)
                return 0.0
            self._state[key] = (tokens, now)
            return (n - tokens) / per_second

    def grant(self, key: str, wanted: int, *, now: float | None = None) -> int:
        """Take as many of ``wanted`` tokens as there are; returns how many were taken."""
        rate = self.rate
        if rate is None:
            return wanted
        now = time.monotonic() if now is None else now
        per_second = rate.count / rate.per
        with self._lock:
            tokens, when = self._state.get(key, (float(rate.count), now))
            tokens = min(float(rate.count), tokens + (now - when) * per_second)
            granted = min(wanted, int(tokens))
            self._state[key] = (tokens - granted, now)
            if len(self._state) > MAX_KEYS:
                self._prune(now, per_second)
        return granted

    def retry_after(self, n: int = 1) -> float:
        rate = self.rate
        return 0.0 if rate is None else n * rate.per / rate.count

    def _prune(self, now: float, per_second: float) -> None:
        assert self.rate is not None
        full = float(self.rate.count)
        for key, (tokens, when) in list(self._state.items()):
            if tokens + (now - when) * per_second >= full:
                del self._state[key]


class Pseudonyms:
    """Keys for in-memory rate buckets: an HMAC of the address under a key that lives only in
    this process, so not even memory holds a table of addresses."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def __call__(self, address: str) -> str:
        return hmac.new(self._key, address.encode(), hashlib.sha256).hexdigest()[:32]
