"""Token buckets on a virtual clock (plain floats): rate, burst, retry_after, memory bound."""

from __future__ import annotations

import pytest

from qpc_node.errors import ConfigError, LocalProtocolError
from qpc_node.service.ratelimit import TokenBucketLimiter


def test_burst_then_steady_rate() -> None:
    limiter: TokenBucketLimiter[str] = TokenBucketLimiter(rate=50, burst=50)
    now = 100.0
    assert sum(limiter.allow("ip", now) for _ in range(60)) == 50
    denied = limiter.check("ip", now)
    assert not denied.allowed and denied.retry_after == pytest.approx(1 / 50)
    # Over 10 virtual seconds at 200 calls/s, exactly 50/s get through.
    allowed = 0
    for step in range(1, 2001):
        allowed += limiter.allow("ip", now + step * 0.005)
    assert allowed == 500
    stats = limiter.statistics()
    assert (stats.allowed, stats.denied) == (550, 1511)


def test_keys_are_independent_and_retry_after_is_honest() -> None:
    limiter: TokenBucketLimiter[tuple[str, str]] = TokenBucketLimiter(rate=2, burst=2)
    assert limiter.allow(("id", "alice"), 0.0, cost=2)
    assert limiter.allow(("id", "bob"), 0.0)
    decision = limiter.check(("id", "alice"), 0.0)
    assert not decision.allowed
    assert not limiter.allow(("id", "alice"), decision.retry_after - 0.01)
    assert limiter.allow(("id", "alice"), decision.retry_after)


def test_denied_calls_do_not_consume_tokens() -> None:
    limiter: TokenBucketLimiter[str] = TokenBucketLimiter(rate=1, burst=1)
    assert limiter.allow("k", 0.0)
    for i in range(100):
        assert not limiter.allow("k", 0.5 + i * 0.001)
    assert limiter.allow("k", 1.0)


def test_memory_is_bounded_against_cycling_keys() -> None:
    limiter: TokenBucketLimiter[int] = TokenBucketLimiter(rate=50, burst=50, max_keys=1000)
    for key in range(20_000):  # a flood of distinct source addresses in one instant
        limiter.allow(key, 0.0)
        assert len(limiter) <= 1000
    assert limiter.statistics().evicted_capacity == 19_000
    # Once they have refilled, stale buckets make way without capacity evictions.
    for key in range(20_000, 20_500):
        limiter.allow(key, 1.0 + key * 1e-6)
    stats = limiter.statistics()
    assert stats.evicted_capacity == 19_000 and stats.keys <= 1000
    assert limiter.sweep(10.0) == stats.keys and len(limiter) == 0


def test_idle_bucket_forgotten_only_when_it_owes_nothing() -> None:
    limiter: TokenBucketLimiter[str] = TokenBucketLimiter(rate=10, burst=10, max_keys=100)
    for _ in range(10):
        limiter.allow("hot", 0.0)
    limiter.allow("other", 0.5)  # hot has 5 of 10 tokens back: kept
    assert not limiter.check("hot", 0.5, cost=6).allowed
    limiter.allow("third", 1.0)  # hot refilled at 1.0: a fresh bucket is equivalent
    assert limiter.statistics().evicted_idle >= 1


def test_invalid_configuration_and_cost() -> None:
    with pytest.raises(ConfigError):
        TokenBucketLimiter(rate=0)
    with pytest.raises(ConfigError):
        TokenBucketLimiter(burst=0.5)
    limiter: TokenBucketLimiter[str] = TokenBucketLimiter(burst=5)
    with pytest.raises(LocalProtocolError):
        limiter.check("k", 0.0, cost=6)
