"""``IpHasher``: salted SHA-256 with a rotating salt, current and previous kept."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from waypost.privacy import IpHasher

DAY = 86400.0
T0 = 1_732_531_200.0


def test_hash_is_salted_sha256_and_never_the_address(tmp_path: Path) -> None:
    hasher = IpHasher(tmp_path / "salt.json")
    hashed = hasher.hash("203.0.113.7", now=T0)
    assert len(hashed) == 64 and int(hashed, 16) >= 0
    assert "203.0.113.7" not in hashed
    assert "203.0.113.7" not in (tmp_path / "salt.json").read_text()
    # Another installation (another salt) gives another hash.
    assert IpHasher(tmp_path / "other.json").hash("203.0.113.7", now=T0) != hashed


def test_same_address_in_any_spelling_hashes_alike(tmp_path: Path) -> None:
    hasher = IpHasher(tmp_path / "salt.json")
    base = hasher.hash("2001:db8::1", now=T0)
    assert hasher.hash("2001:0DB8:0000:0000:0000:0000:0000:0001", now=T0) == base
    assert hasher.hash(" 2001:db8::1 ", now=T0) == base
    assert hasher.hash("::ffff:192.0.2.1", now=T0) == hasher.hash("192.0.2.1", now=T0)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_salt_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "salt.json"
    old = os.umask(0)
    try:
        IpHasher(path).hash("192.0.2.1", now=T0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # After a rotation, too.
    IpHasher(path).hash("192.0.2.1", now=T0 + DAY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_matches_across_one_rotation_but_not_two(tmp_path: Path) -> None:
    path = tmp_path / "salt.json"
    hasher = IpHasher(path, rotate_every=DAY)
    hashed = hasher.hash("198.51.100.4", now=T0)
    assert hasher.matches("198.51.100.4", hashed, now=T0 + 1)
    assert not hasher.matches("198.51.100.5", hashed, now=T0 + 1)

    # First rotation: the salt of the hash becomes the previous one and still matches.
    assert hasher.matches("198.51.100.4", hashed, now=T0 + DAY)
    assert hasher.hash("198.51.100.4", now=T0 + DAY) != hashed
    state = json.loads(path.read_text())
    assert state["previous"] is not None

    # Second rotation: that salt is destroyed; the hash can no longer be linked.
    assert not hasher.matches("198.51.100.4", hashed, now=T0 + 2 * DAY)
    assert len(json.dumps(json.loads(path.read_text()))) < 300  # two salts at most


def test_a_long_pause_destroys_both_salts(tmp_path: Path) -> None:
    hasher = IpHasher(tmp_path / "salt.json", rotate_every=DAY)
    hashed = hasher.hash("198.51.100.4", now=T0)
    # Nothing ran for three periods: the stale salt is not kept as "previous".
    assert not hasher.matches("198.51.100.4", hashed, now=T0 + 3 * DAY)
    assert json.loads((tmp_path / "salt.json").read_text())["previous"] is None


def test_a_second_instance_shares_the_salt(tmp_path: Path) -> None:
    hashed = IpHasher(tmp_path / "salt.json").hash("192.0.2.9", now=T0)
    assert IpHasher(tmp_path / "salt.json").matches("192.0.2.9", hashed, now=T0 + 5)


def test_a_damaged_salt_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "salt.json"
    path.write_text("{not json")
    hasher = IpHasher(path)
    hashed = hasher.hash("192.0.2.9", now=T0)
    assert hasher.matches("192.0.2.9", hashed, now=T0)


def test_rotation_period_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rotate_every"):
        IpHasher(tmp_path / "salt.json", rotate_every=0)
