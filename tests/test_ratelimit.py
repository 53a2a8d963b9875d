"""The token bucket (ratelimit.py) on a clock that moves only when told."""
from __future__ import annotations

import pytest

from flask_robe_sockets import ratelimit
from flask_robe_sockets.ratelimit import RateLimiter


class Clock:
    """Stands in for the ``time`` module that ratelimit.py reads."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(ratelimit, "time", fake)
    return fake


def take(limiter: RateLimiter, count: int, cost: float = 1) -> list[bool]:
    return [limiter.allow(cost) for _ in range(count)]


def test_a_full_bucket_allows_a_burst_then_refuses(clock):
    """A new bucket allows ``burst`` charges at once, and refuses the next."""
    limiter = RateLimiter(rate=1, burst=5)
    assert take(limiter, 6) == [True] * 5 + [False]


def test_the_bucket_refills_at_the_rate_up_to_the_burst(clock):
    """Tokens come back at ``rate`` a second, and never beyond ``burst``."""
    limiter = RateLimiter(rate=2, burst=5)
    take(limiter, 5)
    clock.now += 0.5  # one token at 2 a second
    assert take(limiter, 2) == [True, False]
    clock.now += 1.25  # 2.5 tokens
    assert take(limiter, 3) == [True, True, False]
    clock.now += 3600  # a long pause refills the burst, no more
    assert take(limiter, 6) == [True] * 5 + [False]


def test_a_charge_costs_its_units(clock):
    """allow(cost) takes ``cost`` units at once, or none when fewer are left."""
    limiter = RateLimiter(rate=8, burst=8)
    assert limiter.allow(5) is True
    assert limiter.allow(4) is False  # 3 left: nothing is taken
    assert limiter.allow(3) is True
    assert limiter.allow(0.5) is False
    clock.now += 0.0625  # half a unit back (binary fractions keep the sums exact)
    assert limiter.allow(0.5) is True
    assert RateLimiter(rate=8, burst=8).allow(9) is False  # more than a whole burst: never


def test_refusals_count_strikes_within_a_spell(clock):
    """Each refusal is a strike; refusals less than a second apart are one spell."""
    limiter = RateLimiter(rate=1, burst=1)
    limiter.allow()
    for n in range(1, 4):
        assert limiter.allow() is False
        assert limiter.strikes == n
        clock.now += 0.3  # refused before a whole token is back
    assert limiter.strikes == 3


def test_a_gap_of_more_than_a_second_ends_the_spell(clock):
    """A refusal more than a second after the last starts counting again; one exactly a second after does not."""
    limiter = RateLimiter(rate=0.001, burst=1)
    limiter.allow()
    limiter.allow()
    clock.now += 1.0
    limiter.allow()
    assert limiter.strikes == 2
    clock.now += 1.01
    limiter.allow()
    assert limiter.strikes == 1


def test_strike_counts_without_taking_units(clock):
    """strike() counts a refusal charged by another bucket and leaves the tokens alone."""
    limiter = RateLimiter(rate=1, burst=2)
    limiter.strike()
    limiter.strike()
    assert limiter.strikes == 2
    assert take(limiter, 3) == [True, True, False]
    assert limiter.strikes == 3


def test_exhausted_once_strikes_pass_the_burst(clock):
    """A client that ignores ``burst`` refusals in a row is exhausted; a pause forgives it."""
    limiter = RateLimiter(rate=0.001, burst=3)
    take(limiter, 3)
    for _ in range(3):
        limiter.allow()
        assert not limiter.exhausted
    limiter.allow()
    assert limiter.strikes == 4 and limiter.exhausted
    clock.now += 2
    limiter.allow()
    assert limiter.strikes == 1 and not limiter.exhausted


def test_retry_after_says_when_the_units_are_back(clock):
    """retry_after(cost) is the seconds until ``cost`` units are there, 0 when they are."""
    limiter = RateLimiter(rate=4, burst=4)
    assert limiter.retry_after() == 0
    take(limiter, 4)
    assert limiter.retry_after() == 0.25
    assert limiter.retry_after(3) == 0.75
    clock.now += 0.25
    limiter.allow()  # the token that came back
    assert limiter.retry_after(2) == 0.5


def test_retry_after_counts_the_refill_since_the_last_charge(clock):
    """retry_after() asked a while after the last charge counts the tokens that came back meanwhile."""
    limiter = RateLimiter(rate=2, burst=2)
    take(limiter, 2)
    clock.now += 1  # both tokens are back
    assert limiter.retry_after() == 0
