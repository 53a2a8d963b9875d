"""A token bucket: what a client may send, or ask for, per second."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Hashable


class RateLimiter:
    """Allow ``rate`` units a second on average, and bursts of ``burst``.

    A unit is whatever the caller charges: a frame, a byte, a ticket.
    ``strikes`` counts the charges refused in one spell of refusals (no gap
    of a second between them): a client that slows down when refused ends
    its spell, one that stays over the rate piles strikes up until
    ``exhausted``.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "strikes", "refused_at")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.strikes = 0
        self.refused_at = 0.0

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def allow(self, cost: float = 1) -> bool:
        """Take ``cost`` units if they are there; count a strike if not."""
        self._refill()
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        self.strike()
        return False

    def strike(self) -> None:
        """Count a refusal, this bucket's or another's charged with it."""
        now = time.monotonic()
        if now - self.refused_at > 1.0:
            self.strikes = 0
        self.refused_at = now
        self.strikes += 1

    def retry_after(self, cost: float = 1) -> float:
        """Seconds until ``cost`` units are there (0 when they are now)."""
        self._refill()
        return max(0.0, (cost - self.tokens) / self.rate)

    @property
    def exhausted(self) -> bool:
        """Whether the client ignored ``burst`` refusals in a row."""
        return self.strikes > self.burst


class CallerRateLimit:
    """A token bucket per caller (``tickets.caller``: an identity from one
    client IP), for tickets and for presence joins.

    Memory stays bounded whoever asks, so a caller rotating identities or
    addresses cannot grow it: a bucket left alone for ``burst / rate``
    seconds has filled up again and is no different from a new one, so it is
    dropped; past ``max_callers`` buckets the least recently used go first,
    which at worst gives the caller that waited longest a fresh burst.

    :param rate: units a second per caller, on average.
    :param burst: units one caller may take at once.
    :param max_callers: buckets kept at most. 10,000 is about 2.5 MB, and
        2,500 new callers a second at the tickets' default rate.
    """

    def __init__(self, rate: float, burst: float, max_callers: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_callers = max_callers
        #: Least recently asked first.
        self._buckets: OrderedDict[Hashable, RateLimiter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, caller: Hashable) -> float:
        """Charge one unit to ``caller``: 0 when it may have it, else the
        seconds until it may ask again."""
        self._sweep()
        bucket = self._buckets.pop(caller, None)
        if bucket is None:
            bucket = RateLimiter(self.rate, self.burst)
        self._buckets[caller] = bucket
        if bucket.allow():
            return 0.0
        return max(bucket.retry_after(), 1e-3)

    def _sweep(self) -> None:
        refilled = time.monotonic() - self.burst / self.rate
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest.stamp > refilled and len(buckets) < self.max_callers:
                return
            buckets.popitem(last=False)
