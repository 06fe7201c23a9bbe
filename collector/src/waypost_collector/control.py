"""Instructions for the fleet: the control block an app's installations receive with every
answer (and from ``GET /v1/{app}/control``), per version range where the config says so."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from waypost_collector.config import AppControl


@lru_cache(maxsize=256)
def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


@lru_cache(maxsize=256)
def _specifiers(text: str) -> SpecifierSet:
    return SpecifierSet(text)


def control_block(control: AppControl | None, version: str | None) -> dict[str, Any]:
    """The block for an installation running ``version``: the app's settings, with those of
    the first version range that holds ``version`` on top. Empty when nothing is set."""
    if control is None:
        return {}
    block = control.as_wire()
    parsed = _version(version) if version else None
    if parsed is not None:
        for spec, override in control.versions.items():
            if _specifiers(spec).contains(parsed, prereleases=True):
                block.update(override.as_wire())
                break
    return block
