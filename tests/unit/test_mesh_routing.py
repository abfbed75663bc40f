"""Routing core (sans-IO) with real Ed25519 signatures: acceptance rules, bindings, seqs.

Topology scenarios with loss and churn live in test_mesh_routing_sim.py.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mesh_sim import T0, ed25519_verify, raw_public

from qpc_node.errors import LocalProtocolError, RemoteProtocolError
from qpc_node.mesh.routing import (
    HOME_DOMAIN,
    INFINITY,
    ROUTE_DOMAIN,
    Announcement,
    HomeBinding,
    Local,
    NextHop,
    NoRoute,
    Outcome,
    PersistSeq,
    Router,
    RouteUpdate,
    RoutingPolicy,
    Send,
    SeqRequest,
    binding_signed_bytes,
    node_id_of,
    route_signed_bytes,
    sign_announcement,
    sign_binding,
)

POLICY = RoutingPolicy(
    update_interval_ms=10_000,
    stale_after_ms=35_000,
    route_lifetime_ms=120_000,
    min_send_interval_ms=500,
    trigger_delay_ms=0,
    request_interval_ms=1_000,
)


class Node:
    def __init__(self, seed: int, policy: RoutingPolicy = POLICY, seq_floor: int = 0) -> None:
        self.key = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
        self.pub = raw_public(self.key)
        self.id = node_id_of(self.pub)
        self.persisted: list[int] = []
        self.router = Router(
            self.pub,
            self.key.sign,
            ed25519_verify,
            policy=policy,
            rand=random.Random(seed).random,
            seq_floor=seq_floor,
            now_ms=T0,
        )

    def ann(self, seq: int, *, hops: int = 0, life: int = 60_000, now: int = T0) -> Announcement:
        return sign_announcement(self.pub, self.key.sign, seq, now + life, hops)


def user(seed: int) -> tuple[Ed25519PrivateKey, bytes]:
    k = Ed25519PrivateKey.from_private_bytes(bytes([100 + seed]) * 32)
    return k, raw_public(k)


def binding(seed: int, node: bytes, seq: int, life: int = 3_600_000) -> HomeBinding:
    k, pub = user(seed)
    return sign_binding(pub, k.sign, node, seq, T0 + life)


def exchange(nodes: list[Node], links: set[tuple[int, int]], now: int, until: int) -> int:
    """Lossless, instant delivery; every node polled each 50 ms. Returns the end time."""
    for a, b in links:
        nodes[a].router.link_up(nodes[b].id, now)
        nodes[b].router.link_up(nodes[a].id, now)
    index = {n.id: i for i, n in enumerate(nodes)}
    while now < until:
        for i, n in enumerate(nodes):
            for out in n.router.poll(now):
                if isinstance(out, Send):
                    j = index[out.neighbour]
                    if (i, j) in links or (j, i) in links:
                        data = out.update.encode()
                        nodes[j].router.receive(n.id, RouteUpdate.decode(data), now)
                else:
                    n.persisted.append(out.seq)
        now += 50
    return now


def line(n: int) -> tuple[list[Node], set[tuple[int, int]]]:
    return [Node(i + 1) for i in range(n)], {(i, i + 1) for i in range(n - 1)}


# -- signed bytes and codec -----------------------------------------------------------------


def test_signed_bytes_are_fixed_width_with_domain_prefix() -> None:
    o, k = b"\x01" * 32, b"\x02" * 32
    m = route_signed_bytes(o, k, 0x0102, 0x0A0B)
    assert m == ROUTE_DOMAIN + o + k + bytes(6) + b"\x01\x02" + bytes(6) + b"\x0a\x0b"
    u, n = b"\x03" * 32, b"\x04" * 32
    assert binding_signed_bytes(u, k, n, 1, 2) == HOME_DOMAIN + u + k + n + (
        (1).to_bytes(8, "big") + (2).to_bytes(8, "big")
    )
    assert ROUTE_DOMAIN != HOME_DOMAIN and len(ROUTE_DOMAIN) == len(HOME_DOMAIN) + 1


def test_route_and_binding_signatures_are_not_interchangeable() -> None:
    """A node key's route signature never verifies as a home binding (domain separation)."""
    a = Node(1)
    ann = a.ann(5)
    forged = HomeBinding(a.id, a.pub, a.id, 5, ann.expiry_ms, ann.signature)
    assert not ed25519_verify(a.pub, forged.signed_bytes(), forged.signature)


def test_codec_round_trip_and_typed_errors() -> None:
    a = Node(1)
    upd = RouteUpdate((a.ann(3, hops=2),), (binding(1, a.id, 1),), (SeqRequest(a.id, 4, 3),))
    assert RouteUpdate.decode(upd.encode()) == upd
    for bad in (b"\xff\xff", b"\x0a\x05\x0a\x03abc", bytes(300_000)):
        with pytest.raises(RemoteProtocolError):
            RouteUpdate.decode(bad)
    short = msgspec.structs.replace(a.ann(3), signature=b"x")
    with pytest.raises(LocalProtocolError, match="signature"):
        short.encode()
    wire = RouteUpdate((a.ann(3),)).encode().replace(a.ann(3).signature, b"y" * 64)
    assert RouteUpdate.decode(wire).routes[0].signature == b"y" * 64  # shape only: router checks
    with pytest.raises(RemoteProtocolError, match="hops"):
        Announcement.decode(
            msgspec.structs.replace(a.ann(3)).to_proto().SerializeToString() + b"\x30\x80\x80\x04"
        )


# -- acceptance rules -----------------------------------------------------------------------


def linked(n: int = 2) -> list[Node]:
    nodes = [Node(i + 1) for i in range(n)]
    for i in range(1, n):
        nodes[0].router.link_up(nodes[i].id, T0)
    return nodes


def test_line_converges_and_resolves_users() -> None:
    nodes, links = line(4)
    exchange(nodes, links, T0, T0 + 3_000)
    a, d = nodes[0], nodes[3]
    assert a.router.route(d.id, T0 + 3_000) == NextHop(nodes[1].id, 3, d.id)
    b = binding(1, d.id, 1)
    assert d.router.home(b, T0 + 3_000) is Outcome.ACCEPTED
    now = exchange(nodes, links, T0 + 3_000, T0 + 6_000)
    assert a.router.resolve(b.user, now) == NextHop(nodes[1].id, 3, d.id)
    assert d.router.resolve(b.user, now) == Local()
    assert a.router.resolve(b"\x00" * 32, now) == NoRoute("unknown user")


def test_forged_announcements_are_ignored() -> None:
    a, b = linked()
    c = Node(3)
    now = T0
    good = c.ann(7, hops=1)
    flipped = msgspec.structs.replace(
        good, signature=bytes([good.signature[0] ^ 1]) + good.signature[1:]
    )
    # An attacker signs with its own key but claims the victim's id ...
    attacker = Node(9)
    wrong_id = msgspec.structs.replace(attacker.ann(7, hops=1), origin=c.id)
    # ... or presents the victim's id and key with its own signature.
    stolen_key = msgspec.structs.replace(attacker.ann(7, hops=1), origin=c.id, origin_key=c.pub)
    # ... or relays the genuine announcement as if it were the origin (hops 0).
    as_origin = msgspec.structs.replace(good, hops=0)
    rep = a.router.receive(b.id, RouteUpdate((flipped, wrong_id, stolen_key, as_origin)), now)
    assert rep.routes == (Outcome.FORGED,) * 4
    assert isinstance(a.router.route(c.id, now), NoRoute)
    assert a.router.statistics().routes_forged == 4
    assert a.router.receive(b.id, RouteUpdate((good,)), now).routes == (Outcome.ACCEPTED,)
    assert a.router.route(c.id, now) == NextHop(b.id, 2, c.id)


def test_replayed_expired_and_far_future_announcements_are_ignored() -> None:
    a, b = linked()
    c = Node(3)
    now = T0
    assert a.router.receive(b.id, RouteUpdate((c.ann(9, hops=1),)), now).routes == (
        Outcome.ACCEPTED,
    )
    rep = a.router.receive(
        b.id,
        RouteUpdate(
            (
                c.ann(8, hops=0),  # older seq, even with a better metric
                c.ann(10, hops=0, life=-1),  # expired
                c.ann(11, hops=0, life=POLICY.route_lifetime_ms + 3_600_000),  # too far ahead
            )
        ),
        now,
    )
    assert rep.routes == (Outcome.REPLAYED, Outcome.EXPIRED, Outcome.FUTURE)
    assert a.router.routes(now)[0].seq == 9


def test_own_announcement_from_a_previous_life_moves_our_seq_past_it() -> None:
    """The persisted floor was lost: a neighbour's copy of our seq 500 makes us jump."""
    a, b = linked()
    a.router.poll(T0)
    assert a.router.seq == 1
    old_self = a.ann(500, hops=1)
    assert a.router.receive(b.id, RouteUpdate((old_self,)), T0).routes == (Outcome.OWN,)
    a.router.poll(T0 + 1)
    assert a.router.seq == 501


def test_seq_block_is_persisted_before_use_and_survives_restart() -> None:
    a = Node(1, policy=msgspec.structs.replace(POLICY, seq_block=4))
    outs = a.router.poll(T0)
    assert outs[0] == PersistSeq(5)  # seqs < 5 may be used now
    seqs = [a.router.seq]
    now = T0
    for _ in range(6):
        now += POLICY.route_lifetime_ms
        outs = a.router.poll(now)
        seqs.append(a.router.seq)
        for o in outs:
            if isinstance(o, PersistSeq):
                a.persisted.append(o.seq)
    assert seqs == [1, 2, 3, 4, 5, 6, 7]
    assert a.persisted == [9]
    again = Node(1, seq_floor=a.persisted[-1])
    again.router.poll(now)
    assert again.router.seq == 9 > seqs[-1]


def test_link_down_retracts_through_the_mesh_before_anything_goes_stale() -> None:
    nodes, links = line(4)
    now = exchange(nodes, links, T0, T0 + 3_000)
    assert isinstance(nodes[0].router.route(nodes[3].id, now), NextHop)
    nodes[2].router.link_down(nodes[3].id, now)
    nodes[3].router.link_down(nodes[2].id, now)
    links.discard((2, 3))
    now = exchange(nodes, links, now, now + 2_000)  # << stale_after_ms (35 s)
    for n in nodes[:3]:
        assert isinstance(n.router.route(nodes[3].id, now), NoRoute)
    assert nodes[2].router.statistics().retractions_sent >= 1


def test_routes_go_stale_without_refresh() -> None:
    a, b = linked()
    c = Node(3)
    a.router.receive(b.id, RouteUpdate((c.ann(1, hops=1, life=110_000),)), T0)
    a.router.poll(T0 + POLICY.stale_after_ms - 1)
    assert isinstance(a.router.route(c.id, T0 + POLICY.stale_after_ms - 1), NextHop)
    a.router.poll(T0 + POLICY.stale_after_ms)
    assert a.router.route(c.id, T0 + POLICY.stale_after_ms) == NoRoute("no route to home", c.id)
    assert a.router.next_hops() == {}


def test_unfeasible_route_is_not_taken_until_a_seq_request_is_answered() -> None:
    """A-B-C and A-D-E-C. A routes to C via B (2 hops, FD = (s, 2)). B-C breaks: D's
    route (D is 2 hops from C) is not strictly better than A's FD, so A must not take it
    on the old seq; A asks (through D and E) for a new seq, and takes it with that."""
    nodes = [Node(i + 1) for i in range(5)]
    a, b, c, d, _e = nodes
    links = {(0, 1), (1, 2), (0, 3), (3, 4), (4, 2)}
    now = exchange(nodes, links, T0, T0 + 3_000)
    assert a.router.route(c.id, now) == NextHop(b.id, 2, c.id)
    seq_before = c.router.seq
    b.router.link_down(c.id, now)
    c.router.link_down(b.id, now)
    links.discard((1, 2))
    now = exchange(nodes, links, now, now + 3_000)
    assert a.router.route(c.id, now) == NextHop(d.id, 3, c.id)
    assert a.router.statistics().requests_sent >= 1
    assert c.router.statistics().requests_received >= 1
    assert c.router.seq > seq_before


def test_bindings_forged_expired_older_are_ignored_higher_seq_rehomes() -> None:
    a, b = linked()
    n1, n2 = Node(5).id, Node(6).id
    now = T0
    k, pub = user(1)
    b1 = binding(1, n1, 3)
    other_k, _ = user(2)
    forged_sig = msgspec.structs.replace(b1, signature=other_k.sign(b1.signed_bytes()))
    wrong_user = msgspec.structs.replace(binding(2, n1, 3), user=b1.user)
    rep = a.router.receive(
        b.id,
        RouteUpdate(
            bindings=(
                forged_sig,
                wrong_user,
                binding(1, n1, 4, life=-1),  # expired
                b1,
                binding(1, n2, 2),  # older seq, other node
            )
        ),
        now,
    )
    assert rep.bindings == (
        Outcome.FORGED,
        Outcome.FORGED,
        Outcome.EXPIRED,
        Outcome.ACCEPTED,
        Outcome.REPLAYED,
    )
    assert a.router.binding(b1.user) == b1
    rehome = sign_binding(pub, k.sign, n2, 4, T0 + 3_600_000)
    assert a.router.receive(b.id, RouteUpdate(bindings=(rehome,)), now).bindings == (
        Outcome.ACCEPTED,
    )
    assert a.router.binding(b1.user) == rehome
    # The old binding replayed afterwards changes nothing.
    assert a.router.receive(b.id, RouteUpdate(bindings=(b1,)), now).bindings == (Outcome.REPLAYED,)
    assert a.router.resolve(b1.user, now) == NoRoute("no route to home", n2)
    assert a.router.resolve(b1.user, T0 + 3_600_000) == NoRoute("binding expired", n2)


def test_home_refuses_a_binding_for_another_node() -> None:
    a = Node(1)
    assert a.router.home(binding(1, Node(2).id, 1), T0) is Outcome.FOREIGN
    assert a.router.home(binding(1, a.id, 1), T0) is Outcome.ACCEPTED
    assert a.router.resolve(node_id_of(user(1)[1]), T0) == Local()


def test_bindings_are_bounded_lru() -> None:
    a, b = linked()
    a.router = Router(
        a.pub,
        a.key.sign,
        ed25519_verify,
        policy=msgspec.structs.replace(POLICY, max_bindings=3),
        rand=random.Random(0).random,
        now_ms=T0,
    )
    a.router.link_up(b.id, T0)
    bs = [binding(i, b.id, 1) for i in range(4)]
    a.router.receive(b.id, RouteUpdate(bindings=tuple(bs[:3])), T0)
    a.router.resolve(bs[0].user, T0)  # touch: bs[1] is now least recently used
    a.router.receive(b.id, RouteUpdate(bindings=(bs[3],)), T0)
    assert a.router.binding(bs[1].user) is None
    assert all(a.router.binding(x.user) is not None for x in (bs[0], bs[2], bs[3]))
    assert a.router.statistics().bindings_evicted == 1


def test_signatures_are_verified_once_per_content() -> None:
    a, b = linked()
    c = Node(3)
    ann = c.ann(1, hops=1)
    calls = []

    def counting(pk: bytes, msg: bytes, sig: bytes) -> bool:
        calls.append(msg)
        return ed25519_verify(pk, msg, sig)

    a.router._verify_node = counting  # type: ignore[attr-defined]
    for _ in range(5):
        a.router.receive(b.id, RouteUpdate((ann,)), T0)
    a.router.receive(b.id, RouteUpdate((msgspec.structs.replace(ann, hops=2),)), T0)
    assert len(calls) == 1


def test_batches_per_link_are_rate_bounded_and_sized() -> None:
    policy = msgspec.structs.replace(POLICY, max_batch_entries=10, min_send_interval_ms=1_000)
    a = Node(1, policy=policy)
    b = Node(2)
    a.router.link_up(b.id, T0)
    now = T0
    sends: list[tuple[int, int]] = []
    for i in range(40):
        a.router.home(binding(i, a.id, 1), now)
        for o in a.router.poll(now):
            if isinstance(o, Send):
                sends.append((now, len(o.update)))
        now += 100
    # Until just before the first periodic dump (update interval 10 s, jitter 25 %).
    while now < T0 + 7_400:
        for o in a.router.poll(now):
            if isinstance(o, Send):
                sends.append((now, len(o.update)))
        now += 100
    assert sum(n for _t, n in sends) == 41  # own route + 40 bindings, each once
    assert all(n <= 10 for _t, n in sends)
    times = [t for t, _n in sends]
    assert all(t2 - t1 >= 1_000 for t1, t2 in itertools.pairwise(times))


def test_api_misuse_is_a_local_error() -> None:
    a = Node(1)
    with pytest.raises(LocalProtocolError):
        a.router.link_up(a.id, T0)
    with pytest.raises(LocalProtocolError):
        a.router.link_up(b"short", T0)
    with pytest.raises(RemoteProtocolError):
        a.router.home(msgspec.structs.replace(binding(1, a.id, 1), seq=0), T0)
    assert a.router.receive(Node(2).id, RouteUpdate((a.ann(1),)), T0).routes == (Outcome.NO_LINK,)
    assert INFINITY == 0xFFFF


def test_a_repeat_with_another_key_is_not_taken_as_a_refresh() -> None:
    """The refresh shortcut (no re-verification) applies to identical content only."""
    a, b = linked()
    c = Node(3)
    ann = c.ann(4, hops=1)
    a.router.receive(b.id, RouteUpdate((ann,)), T0)
    swapped = msgspec.structs.replace(ann, origin_key=Node(9).pub)
    assert a.router.receive(b.id, RouteUpdate((swapped,)), T0).routes == (Outcome.FORGED,)
    assert a.router._routes[c.id][b.id].ann.origin_key == c.pub  # type: ignore[attr-defined]


def test_binding_signed_by_a_client_identity_verifies_with_the_mls_core(tmp_path: Path) -> None:
    """The client signs with Identity.sign (which adds its own context); the node passes
    a verify built on qpc_node.crypto.verify. The router is agnostic of both."""
    from qpc_node import crypto

    ident = crypto.Identity.create(tmp_path / "id", b"s" * 32, durable=False)

    def verify_user(pk: bytes, msg: bytes, sig: bytes) -> bool:
        try:
            crypto.verify(pk, msg, sig)
        except crypto.MlsError:
            return False
        return True

    a = Node(1)
    a.router = Router(
        a.pub,
        a.key.sign,
        ed25519_verify,
        verify_user=verify_user,
        policy=POLICY,
        rand=random.Random(0).random,
        now_ms=T0,
    )
    b = sign_binding(ident.public_key, ident.sign, a.id, 1, T0 + 60_000)
    assert a.router.home(b, T0) is Outcome.ACCEPTED
    assert a.router.resolve(node_id_of(ident.public_key), T0) == Local()
    raw = sign_binding(user(1)[1], user(1)[0].sign, a.id, 1, T0 + 60_000)
    assert a.router.home(raw, T0) is Outcome.FORGED  # no context: not a client signature


def test_rehoming_spreads_and_wins_everywhere() -> None:
    """A user homed on D moves to A with seq + 1; after the exchange every node
    resolves to A, including D (which now forwards towards A)."""
    nodes, links = line(4)
    a, _b, _c, d = nodes
    now = exchange(nodes, links, T0, T0 + 3_000)
    k, pub = user(1)
    assert d.router.home(sign_binding(pub, k.sign, d.id, 1, T0 + 3_600_000), now) is (
        Outcome.ACCEPTED
    )
    now = exchange(nodes, links, now, now + 2_000)
    fp = node_id_of(pub)
    assert a.router.resolve(fp, now) == NextHop(nodes[1].id, 3, d.id)
    assert a.router.home(sign_binding(pub, k.sign, a.id, 2, T0 + 3_600_000), now) is (
        Outcome.ACCEPTED
    )
    now = exchange(nodes, links, now, now + 2_000)
    assert a.router.resolve(fp, now) == Local()
    assert d.router.resolve(fp, now) == NextHop(nodes[2].id, 3, a.id)
    assert all(n.router.binding(fp).seq == 2 for n in nodes)  # type: ignore[union-attr]


def test_a_neighbour_repeating_itself_does_not_grow_memory() -> None:
    a, b = linked()
    c = Node(3)
    ann = c.ann(1, hops=1, life=110_000)
    now = T0
    for _ in range(5_000):
        a.router.receive(b.id, RouteUpdate((ann,)), now)
        now += 7
        a.router.poll(now)
    assert len(a.router._expiry_heap) <= 2 * 1 + 64 + 1_500  # type: ignore[attr-defined]
    assert a.router.statistics().routes_refreshed == 4_999
