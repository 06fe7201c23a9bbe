"""The scrubbers measured both ways on labelled corpora: every planted value of every promised
kind, in many forms, is redacted (recall), and ordinary telemetry values pass unchanged
(precision). The figures are recorded below; a change that lowers either fails here.

    uv run pytest tests/test_privacy_corpus.py -q -s   # prints both figures
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from privacy_corpus import FORMS, Planted, leaks, ordinary, planted

from waypost.privacy import Scrubber

RECALL = 1.0
"""The share of planted values redacted, as last measured (a fraction of 1)."""
PRECISION = 1.0
"""The share of ordinary values left unchanged, as last measured."""
MIN_PLANTED = 600
MIN_ORDINARY = 900


# --- the tests ----------------------------------------------------------------------------------


@dataclass
class Figures:
    planted: list[Planted]
    missed: list[tuple[Planted, str, list[str]]]  # the case, what came out, what leaked
    ordinary: list[str]
    changed: list[tuple[str, str]]  # the value, what came out


def measure() -> Figures:
    scrubber = Scrubber()
    cases = planted()
    missed = []
    for case in cases:
        out = scrubber.scrub_text(case.text, "v", [])
        found = leaks(out, case.needles)
        if found:
            missed.append((case, out, found))
    values = ordinary()
    changed = []
    for value in values:
        remarks: list[str] = []
        out = scrubber.scrub_text(value, "v", remarks)
        if out != value or remarks:
            changed.append((value, out))
    return Figures(cases, missed, values, changed)


@pytest.fixture(scope="module")
def figures() -> Figures:
    return measure()


def test_the_corpora_are_as_large_as_promised(figures: Figures) -> None:
    assert len(figures.planted) >= MIN_PLANTED and len(set(figures.ordinary)) >= MIN_ORDINARY
    kinds_seen = {c.kind for c in figures.planted}
    assert kinds_seen >= {"email", "ipv4", "ipv6", "credit_card", "iban", "phone", "national_id",
                          "jwt", "api_key", "private_key", "bearer_token", "basic_auth",
                          "secret_pair", "url_credentials", "home_path"}  # fmt: skip


def test_recall_of_planted_values(figures: Figures) -> None:
    recall = 1 - len(figures.missed) / len(figures.planted)
    print(f"\nrecall {recall:.2%} of {len(figures.planted)} planted values")
    detail = "\n".join(
        f"{c.kind}/{c.form}: {c.text!r} -> {out!r} leaks {found}"
        for c, out, found in figures.missed[:20]
    )
    assert recall >= RECALL, detail


def test_precision_on_ordinary_values(figures: Figures) -> None:
    precision = 1 - len(figures.changed) / len(figures.ordinary)
    print(f"\nprecision {precision:.2%} of {len(figures.ordinary)} ordinary values")
    detail = "\n".join(f"{v!r} -> {out!r}" for v, out in figures.changed[:20])
    assert precision >= PRECISION, detail


def test_the_oracle_sees_through_every_form() -> None:
    # The check itself must be able to fail: an unscrubbed value is found in every form.
    for form, encode in FORMS.items():
        assert leaks(encode("jane.doe@example.com"), ("jane.doe@example.com",)), form
