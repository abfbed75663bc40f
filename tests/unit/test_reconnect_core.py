"""The reconnect schedule (sans-IO) on a virtual clock: backoff, jitter, notices, refusal."""

from __future__ import annotations

import random

import pytest

from qpc_node.client.reconnect import Phase, Reconnector, ReconnectPolicy, failover_order
from qpc_node.client.session import dial_order, parse_address
from qpc_node.client.state import KnownNode
from qpc_node.errors import ConfigError, LocalProtocolError

POLICY = ReconnectPolicy(initial_delay=0.5, max_delay=30.0, multiplier=2.0, attempt_timeout=15.0)


def test_delay_doubles_within_equal_jitter_and_is_capped() -> None:
    caps = [0.5, 1, 2, 4, 8, 16, 30, 30]
    for failures, cap in enumerate(caps):
        assert POLICY.delay(failures, 0.0) == pytest.approx(cap / 2)
        assert POLICY.delay(failures, 0.999999) == pytest.approx(cap, rel=1e-5)
    # A very long outage neither overflows nor exceeds the cap.
    assert POLICY.delay(10_000, 0.999999) <= POLICY.max_delay


@pytest.mark.parametrize(
    "kw",
    [
        {"initial_delay": 0},
        {"initial_delay": 5, "max_delay": 1},
        {"multiplier": 0.5},
        {"attempt_timeout": 0},
    ],
)
def test_policy_rejects_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ReconnectPolicy(**kw)


def test_outage_is_announced_once_and_its_end_once() -> None:
    r = Reconnector(POLICY, lambda: 0.0)
    lost = r.lost(100.0, "node shutting down")
    assert lost is not None and lost.kind == "lost" and "node shutting down" in lost.text
    assert r.lost(100.1, "again") is None  # every later report of the same outage is quiet
    assert (r.phase, r.next_attempt_at) == (Phase.WAITING, 100.25)

    assert r.begin_attempt(100.25) == 100.25 + POLICY.attempt_timeout
    assert r.attempt_failed(101.0, "timed out") is None  # no line per retry
    assert r.next_attempt_at == pytest.approx(101.5)  # failures=1: cap 1 s, half of it
    r.begin_attempt(101.5)
    restored = r.attempt_succeeded(103.0)
    assert restored.kind == "restored"
    assert "after 3.0 s (2 attempts)" in restored.text
    assert (r.phase, r.failures, r.outages) == (Phase.UP, 0, 1)
    # The next outage starts a fresh schedule.
    assert r.lost(200.0, "Idle timeout") is not None
    assert r.next_attempt_at == pytest.approx(200.25)
    assert r.outages == 2


def test_attempts_only_when_due_and_in_order() -> None:
    r = Reconnector(POLICY, lambda: 0.5)
    with pytest.raises(LocalProtocolError):
        r.begin_attempt(0.0)  # nothing lost
    r.lost(10.0, "x")
    assert r.next_attempt_at is not None
    with pytest.raises(LocalProtocolError):
        r.begin_attempt(r.next_attempt_at - 0.01)
    with pytest.raises(LocalProtocolError):
        r.attempt_succeeded(11.0)  # no attempt running
    r.begin_attempt(r.next_attempt_at)
    with pytest.raises(LocalProtocolError):
        r.begin_attempt(20.0)  # one at a time


def test_refusal_is_final() -> None:
    r = Reconnector(POLICY, lambda: 0.0)
    r.lost(0.0, "node shutting down")
    r.begin_attempt(1.0)
    notice = r.attempt_failed(
        1.2, "server certificate does not match the pinned fingerprint", permanent=True
    )
    assert notice is not None and notice.kind == "refused"
    assert "pinned fingerprint" in notice.text
    assert (r.phase, r.next_attempt_at) == (Phase.REFUSED, None)
    assert r.lost(2.0, "x") is None
    with pytest.raises(LocalProtocolError):
        r.begin_attempt(100.0)
    assert "not reconnecting" in r.describe(3.0)


def test_describe_says_when_the_next_attempt_is() -> None:
    r = Reconnector(POLICY, lambda: 0.0)
    assert r.describe(0.0) == "connected"
    r.lost(0.0, "Idle timeout")
    r.begin_attempt(0.25)
    assert "attempt 1 running" in r.describe(0.3)
    r.attempt_failed(10.25, "timed out")
    text = r.describe(10.25)
    assert "next attempt in 0.5 s after 1 failed" in text
    assert "timed out" in text


def _simulate(node_back_at: float, rand: random.Random, attempt_cost: float = 0.05) -> float:
    """Drive one client on a virtual clock; return when it is connected again."""
    r = Reconnector(POLICY, rand.random)
    r.lost(0.0, "node shutting down")
    for _ in range(1000):  # bounded: the schedule must converge long before
        assert r.next_attempt_at is not None
        now = r.next_attempt_at
        r.begin_attempt(now)
        now += attempt_cost
        if now >= node_back_at:
            r.attempt_succeeded(now)
            return now
        r.attempt_failed(now, "timed out")
    raise AssertionError("never reconnected")


def test_back_within_one_capped_delay_of_the_node() -> None:
    for back in (0.1, 3.0, 42.0, 600.0):
        up = _simulate(back, random.Random(int(back * 10)))
        # Never later than one full (capped) delay plus an attempt after the node returned.
        assert back <= up <= back + POLICY.max_delay + 0.05


def test_jitter_spreads_a_crowd_of_clients() -> None:
    rng = random.Random(7)
    firsts = []
    for _ in range(200):
        r = Reconnector(POLICY, rng.random)
        r.lost(0.0, "node shutting down")
        assert r.next_attempt_at is not None
        firsts.append(r.next_attempt_at)
    assert all(0.25 <= t <= 0.5 for t in firsts)
    # Spread over the window rather than clumped: most 25 ms slots are used.
    assert len({int(t / 0.025) for t in firsts}) >= 9


def test_failover_is_due_after_the_bounded_outage_only() -> None:
    """Virtual clock: the first attempts go to the lost node alone; from
    ``failover_after`` seconds into the outage each attempt also tries the others."""
    pol = ReconnectPolicy(initial_delay=0.5, max_delay=30.0, failover_after=10.0)
    r = Reconnector(pol, lambda: 0.5)
    assert not r.fail_over_due(0.0)  # up: nothing to fail over from
    r.lost(100.0, "idle timeout")
    now, tried_others_at = 100.0, None
    for _ in range(20):
        assert r.next_attempt_at is not None
        now = r.next_attempt_at
        if r.fail_over_due(now):
            tried_others_at = now
            break
        r.begin_attempt(now)
        r.attempt_failed(now + 0.1, "timed out")
    assert tried_others_at is not None and 110.0 <= tried_others_at < 120.0
    r.begin_attempt(now)
    assert r.fail_over_due(now)  # still due while the attempt runs
    notice = r.moved(now + 0.2, "aaaa0000", "bbbb0000")
    assert notice.kind == "moved" and "node aaaa0000 lost; now on node bbbb0000" in notice.text
    assert r.phase is Phase.UP and not r.fail_over_due(now + 100)


def test_a_refusal_never_fails_over() -> None:
    r = Reconnector(ReconnectPolicy(failover_after=0.0), lambda: 0.0)
    r.lost(0.0, "x")
    r.begin_attempt(r.next_attempt_at or 0.0)
    r.attempt_failed(1.0, "pin mismatch", permanent=True)
    assert not r.fail_over_due(100.0)


def test_failover_order_prefers_reliable_then_fast_then_recent() -> None:
    def node(b: int, rtt: float | None, seen: int, failures: int = 0, addrs: int = 1) -> KnownNode:
        return KnownNode(bytes([b]) * 32, ("h:1",) * addrs, rtt, seen, failures)

    current = node(1, 0.1, 9)
    nodes = [
        current,
        node(2, 9.0, 5),
        node(3, None, 8),
        node(4, 1.0, 5, failures=2),
        node(5, 3.0, 5),
        node(6, None, 9),
        node(7, 0.5, 5, addrs=0),  # no address: cannot be dialled
    ]
    order = [n.node_id[0] for n in failover_order(nodes, current.node_id)]
    assert order == [5, 2, 6, 3, 4]


@pytest.mark.parametrize("kw", [{"failover_after": -1}, {"failover_dial_timeout": 0}])
def test_failover_policy_rejects_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ReconnectPolicy(**kw)


def test_dial_order_puts_link_local_last_and_drops_garbage() -> None:
    got = dial_order(["[fe80::1%3]:4201", "10.0.0.2:4201", "nonsense", "[2001:db8::2]:4201"])
    assert got == ["10.0.0.2:4201", "[2001:db8::2]:4201", "[fe80::1%3]:4201"]
    assert parse_address("[fe80::1%3]:4201") == ("fe80::1%3", 4201)
    for bad in ("host", ":1", "h:0", "h:99999", "[::1:1"):
        with pytest.raises(LocalProtocolError):
            parse_address(bad)
