"""The privacy gate's parts: consent resolution and levels (:mod:`.consent`), the scrubbers
(:mod:`.scrub`), the IP-hashing helper (:mod:`.iphash`) and the sanitiser that keeps secrets out
of everything waypost prints (:mod:`.secrets`).

One gate stands in front of every sink (:mod:`waypost.gate` applies it on the worker thread);
``docs/privacy.md`` tells the whole story.
"""

from __future__ import annotations

from waypost.config.values import FALSE_VALUES, TRUE_VALUES, parse_bool
from waypost.privacy.consent import (
    CONSENT_FILE,
    Decision,
    StoredConsent,
    level_allows,
    resolve_consent,
)
from waypost.privacy.iphash import IpHasher
from waypost.privacy.scrub import BUILTIN_RULES, SECRET_KEYS, Rule, Scrubber
from waypost.privacy.secrets import Sanitiser, sanitise

__all__ = [
    "BUILTIN_RULES",
    "CONSENT_FILE",
    "FALSE_VALUES",
    "SECRET_KEYS",
    "TRUE_VALUES",
    "Decision",
    "IpHasher",
    "Rule",
    "Sanitiser",
    "Scrubber",
    "StoredConsent",
    "level_allows",
    "parse_bool",
    "resolve_consent",
    "sanitise",
]
