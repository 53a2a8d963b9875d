"""A token bucket for frames read from one connection."""
from __future__ import annotations

import time


class RateLimiter:
    """Allow ``rate`` frames a second on average, and bursts of ``burst``.

    ``strikes`` counts the frames refused in one spell of refusals (no gap
    of a second between them): a client that slows down when refused ends
    its spell, one that stays over the rate piles strikes up until
    ``exhausted``.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "strikes", "refused_at")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.strikes = 0
        self.refused_at = 0.0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        if now - self.refused_at > 1.0:
            self.strikes = 0
        self.refused_at = now
        self.strikes += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Whether the client ignored ``burst`` refusals in a row."""
        return self.strikes > self.burst
