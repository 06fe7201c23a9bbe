"""The circuit breaker counts on the monotonic clock: the wall clock may jump either way."""

from __future__ import annotations

import time
from typing import Any

import pytest

from waypost.delivery import breaker as breaker_module
from waypost.delivery.backoff import Backoff
from waypost.delivery.breaker import Breaker


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 2_000_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


@pytest.fixture
def clocks(monkeypatch: Any) -> Clocks:
    clocks = Clocks()
    monkeypatch.setattr(breaker_module, "time", clocks)
    return clocks


def test_it_opens_after_the_threshold_and_a_wall_clock_jump_changes_nothing(
    clocks: Clocks,
) -> None:
    b = Breaker(3, Backoff(initial=10.0, maximum=10.0, multiplier=1.0))
    b.batch_failed(None)
    b.batch_failed(None)
    assert not b.is_open() and b.failures == 2
    b.batch_failed(None)
    assert b.is_open() and 0 < b.remaining() <= 10.0
    held = b.remaining()
    clocks.wall -= 7 * 86400  # set back a week: an open circuit on wall time would stay open
    assert b.remaining() == held
    clocks.mono += 10.0
    assert not b.is_open() and b.remaining() == 0.0
    b.succeeded()
    assert b.failures == 0


def test_retry_after_holds_back_before_the_threshold_capped_at_a_day(clocks: Clocks) -> None:
    b = Breaker(5, Backoff())
    b.batch_failed(30.0)
    assert b.remaining() == 30.0
    b.batch_failed(10 * 86400.0)
    assert b.remaining() == breaker_module.LONGEST_HOLD
    b.close()
    assert not b.is_open() and b.failures == 2  # submit now: closed, the count stays


def test_the_real_clock_is_monotonic() -> None:
    assert breaker_module.time is time
