"""Sans-IO keyed token-bucket rate limiter (per identity, per source IP...).

No clock, no I/O: the caller passes ``now`` (seconds, monotonic, e.g.
``trio.current_time()``), which is what makes it testable with a virtual clock.

Memory is bounded because keys are attacker-controlled (a flood from cycling source
addresses must not grow the table without bound):

* a bucket that has refilled to ``burst`` carries no information (it behaves exactly
  like a fresh one), so idle buckets are dropped opportunistically from the LRU end —
  amortised O(1), no timer needed; :meth:`TokenBucketLimiter.sweep` does it on demand;
* at ``max_keys`` the least recently used bucket is evicted even if not full. That
  forgets one key's debt, which is the price of the bound; ``evicted_capacity`` in
  :meth:`TokenBucketLimiter.statistics` shows when it happens (then a coarser limiter,
  e.g. a global key, is what protects the node).

Denied calls do not consume tokens, so a client that respects ``retry_after`` gets in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

import msgspec

from qpc_node.errors import ConfigError, LocalProtocolError

K = TypeVar("K", bound=Hashable)

DEFAULT_RATE = 50.0  # calls per second (policy: 50 req/s per IP and per identity)
DEFAULT_BURST = 50.0
DEFAULT_MAX_KEYS = 10_000


class Decision(msgspec.Struct, frozen=True):
    allowed: bool
    retry_after: float  # seconds until the same call would be allowed; 0.0 if allowed
    remaining: float  # tokens left in the bucket after this decision


class RateLimiterStatistics(msgspec.Struct, frozen=True):
    keys: int
    max_keys: int
    allowed: int
    denied: int
    evicted_idle: int
    evicted_capacity: int


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class TokenBucketLimiter(Generic[K]):
    """``rate`` tokens per second, at most ``burst`` saved up, per key."""

    def __init__(
        self,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError("rate limit: rate must be a positive number")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ConfigError("rate limit: burst must be >= 1")
        if max_keys < 1:
            raise ConfigError("rate limit: max_keys must be >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, _Bucket] = OrderedDict()
        self._allowed = 0
        self._denied = 0
        self._evicted_idle = 0
        self._evicted_capacity = 0

    def allow(self, key: K, now: float, cost: float = 1.0) -> bool:
        return self.check(key, now, cost).allowed

    def check(self, key: K, now: float, cost: float = 1.0) -> Decision:
        """Take ``cost`` tokens from ``key``'s bucket if it has them."""
        if not 0 < cost <= self.burst:
            raise LocalProtocolError(f"rate limit cost must be in (0, {self.burst}]")
        bucket = self._buckets.get(key)
        if bucket is None:
            self._evict_idle(now)
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self._evicted_capacity += 1
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            self._refill(bucket, now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            self._allowed += 1
            return Decision(True, 0.0, bucket.tokens)
        self._denied += 1
        return Decision(False, (cost - bucket.tokens) / self.rate, bucket.tokens)

    def sweep(self, now: float) -> int:
        """Drop every bucket that has refilled; returns how many were dropped."""
        full = [key for key, b in self._buckets.items() if self._level(b, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        self._evicted_idle += len(full)
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            keys=len(self._buckets),
            max_keys=self.max_keys,
            allowed=self._allowed,
            denied=self._denied,
            evicted_idle=self._evicted_idle,
            evicted_capacity=self._evicted_capacity,
        )

    def _level(self, bucket: _Bucket, now: float) -> float:
        # A clock that went backwards (it should not: monotonic) refills nothing.
        return min(self.burst, bucket.tokens + max(0.0, now - bucket.stamp) * self.rate)

    def _refill(self, bucket: _Bucket, now: float) -> None:
        bucket.tokens = self._level(bucket, now)
        bucket.stamp = max(bucket.stamp, now)

    def _evict_idle(self, now: float) -> None:
        # Oldest-touched first; stop at the first one still owing tokens. Each bucket is
        # removed at most once, so this is amortised O(1) per call.
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            if self._level(oldest, now) < self.burst:
                return
            del self._buckets[key]
            self._evicted_idle += 1


RateLimiter = TokenBucketLimiter
"""Short name used by the node composition (``RateLimiter(rate=50, burst=50)``)."""
