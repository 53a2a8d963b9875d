"""A token bucket: what a client may send, or ask for, per second."""
from __future__ import annotations

import time


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
