"""Salted hashes of IP addresses with a rotating salt (:class:`IpHasher`)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from waypost.datadir import atomic_write


class IpHasher:
    """Salted SHA-256 of IP addresses with a rotating salt, for receivers that must key on an
    address without storing it (FlowForge stores such a hash, never the address).

    A salt is current for ``rotate_every`` seconds, then previous for as long again, then
    destroyed: the file at ``path`` (mode 0600) holds at most these two. A hash can therefore be
    matched against its address across one rotation, never across two. ``now`` (Unix seconds)
    can be given for tests and replays.
    """

    def __init__(self, path: str | os.PathLike[str], *, rotate_every: float = 86400.0) -> None:
        if rotate_every <= 0:
            raise ValueError(f"rotate_every must be positive, not {rotate_every!r}")
        self.path = Path(path)
        self.rotate_every = rotate_every

    def _load(self, now: float) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            current = state["current"]
            bytes.fromhex(current["salt"])
            float(current["at"])
        except (OSError, ValueError, KeyError, TypeError):
            state = {"current": self._new_salt(now), "previous": None}
            self._save(state)
            return state
        age = now - float(current["at"])
        if age >= self.rotate_every:
            # The current salt retires; if it is already past its second period, it goes too.
            previous = current if age < 2 * self.rotate_every else None
            state = {"current": self._new_salt(now), "previous": previous}
            self._save(state)
        return state

    @staticmethod
    def _new_salt(now: float) -> dict[str, Any]:
        return {"salt": secrets.token_hex(32), "at": now}

    def _save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(state), mode=0o600)

    @staticmethod
    def _digest(salt: str, address: str) -> str:
        text = address.strip()
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            canonical = text.lower()
        else:
            mapped = getattr(ip, "ipv4_mapped", None)
            canonical = str(mapped or ip)
        return hashlib.sha256(bytes.fromhex(salt) + canonical.encode()).hexdigest()

    def hash(self, address: str, *, now: float | None = None) -> str:
        """The hash of ``address`` under the current salt (hex SHA-256)."""
        state = self._load(time.time() if now is None else now)
        return self._digest(state["current"]["salt"], address)

    def matches(self, address: str, hashed: str, *, now: float | None = None) -> bool:
        """True if ``hashed`` is ``address`` under the current or the previous salt."""
        state = self._load(time.time() if now is None else now)
        salts = [state["current"]["salt"]]
        if state.get("previous"):
            salts.append(state["previous"]["salt"])
        return any(secrets.compare_digest(self._digest(salt, address), hashed) for salt in salts)
