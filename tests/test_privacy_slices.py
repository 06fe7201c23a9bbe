"""Long texts are scrubbed a slice at a time (so that no other thread of the host waits on one
long regular-expression call), and nothing is missed for it: every planted value of the recall
corpus, and long secrets (a JWT, URL credentials, a bearer token, a private key, a header
line), are redacted wherever they fall across a slice's edge. How long other threads wait is
measured in ``bench/scrub_wait.py``, not here."""

from __future__ import annotations

import base64
import json
import random
import re
from typing import Any

import pytest
from privacy_corpus import leaks, planted

from waypost.privacy import Scrubber
from waypost.privacy import scrub as scrubbing

SLICE, OVERLAP = scrubbing._SLICE, scrubbing._OVERLAP
WIDEST = 2 * SLICE + OVERLAP
"""The most characters one search of a long text may look at."""


class Recording:
    """A compiled pattern that notes how many characters each search may look at."""

    def __init__(self, regex: re.Pattern[str], spans: list[int]) -> None:
        self.regex, self.spans = regex, spans

    def search(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        self.spans.append((len(text) if endpos is None else min(endpos, len(text))) - pos)
        return self.regex.search(text, pos, len(text) if endpos is None else endpos)

    def match(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        found = self.regex.match(text, pos, len(text) if endpos is None else endpos)
        # matched again whole only when a match ran to a slice's end: as long as the match
        self.spans.append(found.end() - pos if found is not None else 0)
        return found


def _log(lines: int) -> str:
    rnd = random.Random(7)
    return "".join(
        f"2026-12-01T10:00:{i % 60:02d}Z GET /api/items?id={rnd.randint(1, 999)} "
        f"user=jane{i}@example.org from 10.0.{i % 250}.{rnd.randint(1, 250)} took {i % 90}ms\n"
        for i in range(lines)
    )


def test_a_long_text_is_searched_a_slice_at_a_time() -> None:
    scrubber = Scrubber()
    spans: list[int] = []
    scrubber._compiled = [Recording(r, spans) for r in scrubber._compiled]  # type: ignore[misc]
    text = _log(2000)
    assert len(text) > 100 * SLICE
    out = scrubber.scrub_text(text, "v", [])
    assert "jane7@example.org" not in out and "[REDACTED:email]" in out
    assert spans and max(spans) <= WIDEST, max(spans)
    assert len(spans) > len(text) // WIDEST  # many searches, none over the whole text


def _jwt() -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    rnd = random.Random(3)
    payload = json.dumps({"sub": "x" * 1400, "n": rnd.random()}).encode()
    return b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload) + "." + b64(bytes(32))


_RANDOM = random.Random(5)
TOKEN = "".join(_RANDOM.choice("abcdefghjkmnpqrstuvwxyzABCDEFGH23456789") for _ in range(1800))
KEY_BODY = "\n".join(TOKEN[i : i + 64] for i in range(0, len(TOKEN), 64))
LONG_SECRETS = {
    "jwt": (_jwt(), _jwt()[200:240]),
    "url_credentials": ("postgres://admin:" + TOKEN + "@db.example.org/app", TOKEN[-40:]),
    "bearer_token": ("sent with Bearer " + TOKEN + " to the api", TOKEN[-40:]),
    "api_key": ("ghp_" + TOKEN, TOKEN[-40:]),
    "private_key": (
        f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}\n-----END RSA PRIVATE KEY-----",
        TOKEN[900:940],
    ),
    "header_line": (
        "Cookie: " + "; ".join(f"k{i}=v{TOKEN[i : i + 20]}" for i in range(120)),
        "k119=v",
    ),
    "words": ("password=" + " ".join(TOKEN[i : i + 30] for i in range(0, 1800, 30)), TOKEN[-20:]),
}
FILLERS = {
    "lines": ("lorem ipsum dolor sit amet\n", "\n"),
    "one_line": ("lorem ipsum dolor sit amet ", " "),
    "minified_json": ('{"a":"b","n":1},', '"'),
}


@pytest.mark.parametrize("filler", list(FILLERS))
@pytest.mark.parametrize("secret", list(LONG_SECRETS))
def test_a_long_secret_across_a_slice_edge_is_redacted(secret: str, filler: str) -> None:
    if secret == "private_key" and filler != "lines":
        pytest.skip("a private key is written on lines")
    text, needle = LONG_SECRETS[secret]
    unit, edge = FILLERS[filler]
    scrubber = Scrubber()
    assert needle not in scrubber.scrub_text(text, "v", [])
    missed = []
    for start in range(1, WIDEST + 1, 173):  # places all across the first slices
        before = (unit * (start // len(unit) + 1))[:start] + edge
        out = scrubber.scrub_text(before + text + edge + unit * 40, "v", [])
        if needle in out:
            missed.append(start)
    assert not missed, missed


def test_every_planted_value_across_a_slice_edge_is_redacted() -> None:
    """The recall corpus, each value placed so that it straddles the end of a slice (or of
    its overlap) in a long text of lines, of one line, or of one repeated character (in turn,
    one place a value: the scrubbers take a few milliseconds for each such text)."""
    scrubber = Scrubber()
    fillers = ["lorem ipsum dolor sit amet\n", "lorem ipsum dolor sit ", "x" * 50 + " "]
    cases = [case for case in planted() if not leaks(scrubber.scrub_text(case.text, "v", []),
                                                     case.needles)]  # fmt: skip
    assert len(cases) > 500
    missed = []
    for i, case in enumerate(cases):
        unit = fillers[i % len(fillers)]
        start = (2 * SLICE if i % 2 else 2 * SLICE + OVERLAP) - len(case.text) // 2
        before = (unit * (start // len(unit) + 1))[: start - 1] + "\n"
        out = scrubber.scrub_text(before + case.text + "\n" + unit * 20, "v", [])
        if leaks(out, case.needles):
            missed.append((unit[:5], start, case.text))
    assert not missed, missed[:5]


def test_a_long_text_is_decoded_a_piece_at_a_time_as_it_would_be_whole() -> None:
    rnd = random.Random(11)
    parts = ["%40", "%2540", "&#64;", "&amp;#64;", "\\u0040", "\\/", "+", " ", "\n", ",",
             "%41%42%43" * 30, "abc", "x" * 300, "&lt;", "%", "&", "\\"]  # fmt: skip
    text = "".join(rnd.choice(parts) for _ in range(6000))
    assert len(text) > 20 * SLICE
    for plus in (False, True):
        assert scrubbing.decoded(text, plus=plus) == scrubbing._decoded(text, plus)
