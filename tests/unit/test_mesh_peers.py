"""Peer table (sans-IO) on a virtual clock: dialling, backoff, liveness from the link only."""

from __future__ import annotations

import hashlib
import random

import pytest

from qpc_node.errors import ConfigError, LocalProtocolError
from qpc_node.mesh.peers import (
    TRANSITIONS,
    CloseLink,
    Dial,
    PeerAddress,
    PeerDown,
    PeerGone,
    PeerPolicy,
    PeerState,
    PeerTable,
    PeerUp,
    Source,
)


def nid(i: int) -> bytes:
    return hashlib.sha256(b"node %d" % i).digest()


V6 = PeerAddress("fe80::1", 7000, scope_id=3)
V4 = PeerAddress("192.0.2.1", 7000)


def table(seed: int = 1, **kw: float) -> PeerTable:
    return PeerTable(PeerPolicy(**kw), random.Random(seed).random)  # type: ignore[arg-type]


def test_addresses_keep_ipv6_scope_and_refuse_ambiguity() -> None:
    assert str(V6) == "[fe80::1%3]:7000"
    assert PeerAddress("2001:DB8::0:1", 1).host == "2001:db8::1"
    with pytest.raises(LocalProtocolError, match="needs an interface scope"):
        PeerAddress("fe80::1", 7000)
    with pytest.raises(LocalProtocolError, match="scope id on an IPv4"):
        PeerAddress("192.0.2.1", 7000, scope_id=2)
    with pytest.raises(LocalProtocolError, match="IP literal"):
        PeerAddress("router.local", 7000)
    with pytest.raises(LocalProtocolError, match="port"):
        PeerAddress("192.0.2.1", 0)


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ConfigError):
        PeerPolicy(liveness_timeout=0)
    with pytest.raises(ConfigError):
        PeerPolicy(initial_backoff=10, max_backoff=1)


def test_discovered_peer_is_dialled_ipv6_first_and_comes_up() -> None:
    t = table()
    t.discovered(nid(1), [V4, V6], Source.MDNS, 0.0)
    assert t.poll(0.0) == [Dial(nid(1), V6)]
    assert t.get(nid(1)).state is PeerState.CONNECTING  # type: ignore[union-attr]
    t.link_up(nid(1), 0.05, rtt=0.05)
    assert t.poll(0.05) == [PeerUp(nid(1))]
    assert t.up() == (nid(1),)
    info = t.get(nid(1))
    assert info is not None and info.srtt == pytest.approx(0.05) and info.failures == 0


def test_silent_link_is_down_within_budget_whatever_mdns_says() -> None:
    """kill -9: keepalives stop; the mDNS record stays. Down within 15 s of the last frame."""
    t = table(liveness_timeout=12.0)
    t.discovered(nid(1), [V6], Source.MDNS, 0.0)
    t.poll(0.0)
    t.link_up(nid(1), 0.1)
    t.poll(0.1)
    now = 0.1
    for _ in range(10):  # keepalives every 2 s
        now += 2.0
        t.link_activity(nid(1), now, rtt=0.01)
        assert t.poll(now) == []
    last_frame = now
    # mDNS keeps re-confirming the (stale) record: no effect on liveness.
    t.discovered(nid(1), [V6], Source.MDNS, now + 5)
    events: list[object] = []
    while not any(isinstance(e, PeerDown) for e in events):
        deadline = t.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        events += t.poll(now)
        assert now - last_frame <= 15.0
    assert CloseLink(nid(1), f"silent for {now - last_frame:.1f}s") in events
    assert nid(1) not in t.up()
    assert t.best(now) is None
    assert t.statistics().liveness_timeouts == 1


def test_best_skips_silent_peers_even_before_poll() -> None:
    t = table(liveness_timeout=10.0)
    for i, rtt in ((1, 0.030), (2, 0.010), (3, 0.020)):
        t.discovered(nid(i), [PeerAddress(f"192.0.2.{i}", 7000)], Source.STATIC, 0.0)
        t.link_up(nid(i), 0.0, rtt=rtt)
    t.poll(0.0)
    assert t.best(1.0).node == nid(2)  # type: ignore[union-attr]
    t.link_activity(nid(1), 9.0)
    t.link_activity(nid(3), 9.0)
    # nid(2) silent for 10.5 s: not "best" any more, though poll has not run.
    assert t.best(10.5).node == nid(3)  # type: ignore[union-attr]


def test_mdns_goodbye_does_not_take_an_up_link_down() -> None:
    t = table()
    t.discovered(nid(1), [V6], Source.MDNS, 0.0)
    t.poll(0.0)
    t.link_up(nid(1), 0.1)
    t.poll(0.1)
    t.lost(nid(1), Source.MDNS, 1.0)
    assert t.poll(1.0) == []
    assert t.up() == (nid(1),)
    # ... but once the link is gone and nothing says where it is, it is forgotten.
    t.link_down(nid(1), 2.0)
    assert t.poll(2.0) == [PeerDown(nid(1), "link closed"), PeerGone(nid(1))]
    assert t.get(nid(1)) is None


def test_inbound_peer_keeps_its_link_address_for_redial() -> None:
    t = table()
    addr = PeerAddress("2001:db8::7", 7000)
    t.link_up(nid(1), 0.0, address=addr)
    assert t.poll(0.0) == [PeerUp(nid(1))]
    t.link_down(nid(1), 1.0)
    assert t.poll(1.0) == [PeerDown(nid(1), "link closed")]
    info = t.get(nid(1))
    assert info is not None and info.sources == {Source.INBOUND} and info.addresses == (addr,)
    assert info.next_attempt_at is not None
    assert t.poll(info.next_attempt_at) == [Dial(nid(1), addr)]


def test_backoff_is_exponential_with_jitter_capped() -> None:
    p = PeerPolicy(initial_backoff=1.0, max_backoff=16.0)
    for failures, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (40, 16.0)):
        assert p.backoff(failures, 0.0) == cap / 2
        assert p.backoff(failures, 0.999) == pytest.approx(cap / 2 + 0.999 * cap / 2)


def test_failed_dials_back_off_rotate_addresses_and_reset_on_success() -> None:
    t = table(initial_backoff=1.0, max_backoff=8.0, dial_timeout=5.0)
    t.discovered(nid(1), [V6, V4], Source.STATIC, 0.0)
    now = 0.0
    dialled = []
    for _ in range(5):
        (ev,) = [e for e in t.poll(now) if isinstance(e, Dial)]
        dialled.append(ev.address)
        t.dial_failed(nid(1), now + 0.1)
        info = t.get(nid(1))
        assert info is not None and info.state is PeerState.BACKOFF
        assert info.next_attempt_at is not None
        gap = info.next_attempt_at - (now + 0.1)
        cap = min(8.0, 2.0 ** (info.failures - 1))
        assert cap / 2 <= gap <= cap
        now = info.next_attempt_at
    assert dialled == [V6, V4, V6, V4, V6]
    assert t.statistics().dial_failures == 5
    t.poll(now)
    t.link_up(nid(1), now + 0.1)
    assert t.get(nid(1)).failures == 0  # type: ignore[union-attr]


def test_a_slow_dial_times_out() -> None:
    t = table(dial_timeout=5.0)
    t.discovered(nid(1), [V4], Source.MDNS, 0.0)
    t.poll(0.0)
    assert t.next_deadline() == 5.0
    assert t.poll(5.0)[0] == CloseLink(nid(1), "dial timed out")
    assert t.get(nid(1)).state is PeerState.BACKOFF  # type: ignore[union-attr]
    t.dial_failed(nid(1), 5.1)  # the driver's late report changes nothing
    assert t.statistics().dial_failures == 1


def test_dial_selection_static_first_and_bounded() -> None:
    t = table(max_connecting=2)
    t.discovered(nid(1), [PeerAddress("192.0.2.1", 1)], Source.MDNS, 0.0)
    t.discovered(nid(2), [PeerAddress("192.0.2.2", 1)], Source.MDNS, 0.0)
    t.discovered(nid(3), [PeerAddress("192.0.2.3", 1)], Source.STATIC, 0.0)
    dials = [e for e in t.poll(0.0) if isinstance(e, Dial)]
    assert len(dials) == 2 and dials[0].node == nid(3)
    assert t.poll(0.0) == []  # the third waits for a slot ...
    assert t.next_deadline() == PeerPolicy().dial_timeout  # ... not for the clock
    t.link_up(dials[0].node, 0.1)
    assert [e for e in t.poll(0.1) if isinstance(e, Dial)] != []


def test_non_static_peer_down_too_long_is_forgotten_static_is_not() -> None:
    t = table(forget_after=60.0, max_backoff=10.0)
    t.discovered(nid(1), [V4], Source.MDNS, 0.0)
    t.discovered(nid(2), [PeerAddress("192.0.2.2", 1)], Source.STATIC, 0.0)
    now = 0.0
    gone: list[bytes] = []
    while now < 200.0:
        for e in t.poll(now):
            if isinstance(e, Dial):
                t.dial_failed(e.node, now + 0.5)
            elif isinstance(e, PeerGone):
                gone.append(e.node)
        deadline = t.next_deadline()
        assert deadline is not None
        now = max(deadline, now + 0.5)
    assert gone == [nid(1)]
    assert t.get(nid(2)) is not None


def test_transition_table_has_no_exit_from_gone_and_rejects_driver_bugs() -> None:
    assert TRANSITIONS[PeerState.GONE] == {}
    for state, row in TRANSITIONS.items():
        for target in row.values():
            assert target in TRANSITIONS, (state, target)


def test_random_event_sequences_keep_the_table_consistent() -> None:
    """Any order of link/discovery reports (races included) is absorbed without error."""
    for seed in range(200):
        rng = random.Random(seed)
        t = table(seed, liveness_timeout=5.0, dial_timeout=3.0, forget_after=30.0)
        now = 0.0
        for _ in range(60):
            now += rng.random() * 3
            node = nid(rng.randrange(4))
            op = rng.randrange(7)
            if op == 0:
                t.discovered(node, [PeerAddress("192.0.2.9", 9)], rng.choice(list(Source)), now)
            elif op == 1:
                t.lost(node, rng.choice(list(Source)), now)
            elif op == 2:
                t.link_up(node, now, rtt=rng.random() / 10)
            elif op == 3:
                t.link_down(node, now)
            elif op == 4:
                t.link_activity(node, now, rtt=rng.random() / 10)
            elif op == 5:
                t.dial_failed(node, now)
            for e in t.poll(now):
                if isinstance(e, Dial):
                    assert e.address in t.get(e.node).addresses  # type: ignore[union-attr]
            deadline = t.next_deadline()
            assert deadline is None or deadline > now  # a driver never spins
            s = t.statistics()
            assert s.up == len(t.up()) and s.peers == len(t.peers())
            for info in t.peers():
                assert info.state is not PeerState.GONE
                if info.state is PeerState.UP:
                    assert info.last_seen is not None and now - info.last_seen < 5.0 + 3.0
