"""Store-and-forward over real nodes on loopback (QUIC, SQLite): DMs across partitions.

Routes are static (fed_nodes) but, like the routing core, a node has no route through
a neighbour whose link is down (:class:`Withdrawing`): exactly what makes a node
without a route hold an envelope. Line A - B - C with C away while A's DMs flow:
B holds them (A gets RELAY_HELD, custody passed), C comes back, B releases them,
C stores each once and signs a receipt that travels C -> B -> A, purging replicas
and leaving tombstones (a replayed msg_id is a duplicate). Also: a holder restarted
loses nothing; what expires while held is never delivered; bad input at a relay is
typed and counted with nothing stored; a carrier ("laptop") moved between two
islands carries held copies across (binary spray-and-wait), its cost measured.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from qpc_node.federation.core import Federation, FederationLimits
from qpc_node.federation.routes import NextHop, NoRoute, Route, StaticRoutes
from qpc_node.ops.clock import system_wall_ms
from qpc_node.store.held import delivered, held_count, held_for
from qpc_node.storefwd import receipts as rc
from qpc_node.storefwd.forward import M_RECEIPT
from qpc_node.storefwd.held import HoldPolicy
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2
from tests.integration.fed_nodes import (
    FAST,
    USER_A,
    USER_C,
    FedNode,
    envelope,
    fed_node,
    free_port,
    identity,
    mailbox,
    peer,
    until,
)

pytestmark = pytest.mark.timeout(90)

F = federation_pb2
TIMERS = msgspec.structs.replace(FAST, sweep_interval=0.2)


class Withdrawing(StaticRoutes):
    """Static routes with the routing core's one rule that matters here: no route
    through a neighbour whose link is down."""

    fed: Federation | None = None

    def resolve(self, recipient: bytes) -> Route:
        r = super().resolve(recipient)
        if isinstance(r, NextHop) and self.fed is not None and not self.fed.link_up(r.node_id):
            return NoRoute()
        return r


def routes_of(node: FedNode) -> Withdrawing:
    assert isinstance(node.routes, Withdrawing)
    return node.routes


@asynccontextmanager
async def running(
    tmp: Path,
    name: str,
    routes: StaticRoutes,
    *,
    port: int = 0,
    peers: tuple[tuple[int, bytes], ...] = (),
    policy: HoldPolicy | None = None,
) -> AsyncIterator[FedNode]:
    limits = FederationLimits(storefwd=policy or HoldPolicy())
    async with fed_node(
        tmp,
        name,
        routes=routes,
        port=port,
        peers=tuple(peer(p, nid) for p, nid in peers),
        limits=limits,
        timers=TIMERS,
    ) as n:
        if isinstance(routes, Withdrawing):
            routes.fed = n.fed
        yield n


def store_of(n: FedNode):  # type: ignore[no-untyped-def]
    s = n.node.store
    assert s is not None
    return s


async def held(n: FedNode) -> int:
    return await store_of(n).run(held_count)


async def holds(n: FedNode, count: int, within: float = 10) -> None:
    async def exact() -> bool:
        return await held(n) == count

    await until(exact, within=within)


async def tombstone(n: FedNode, msg_id: bytes) -> bool:
    return await store_of(n).run(lambda s: delivered(s, msg_id))


def ids(tmp: Path) -> tuple[bytes, bytes, bytes]:
    return identity(tmp, "a")[1], identity(tmp, "b")[1], identity(tmp, "c")[1]


def line_routes(tmp: Path) -> tuple[Withdrawing, Withdrawing, Withdrawing]:
    a_id, b_id, c_id = ids(tmp)
    return (
        Withdrawing(a_id, {USER_C: c_id}, via={c_id: b_id}),
        Withdrawing(b_id, {USER_C: c_id}),
        Withdrawing(c_id, {USER_C: c_id}),
    )


async def submit(a: FedNode, envs: list[envelope_pb2.Envelope]) -> list[int]:
    got = await a.fed.submit(envs, origin=USER_A)
    return [r.status for r in got]


async def test_c_away_b_holds_then_delivers_once_and_receipts_purge(tmp_path: Path) -> None:
    a_id, b_id, c_id = ids(tmp_path)
    ra, rb, rcc = line_routes(tmp_path)
    c_port, b_port = free_port(), free_port()
    with trio.fail_after(60):
        async with (
            running(tmp_path, "b", rb, port=b_port, peers=((c_port, c_id),)) as b,
            running(tmp_path, "a", ra, peers=((b_port, b_id),)) as a,
        ):
            await a.fed.wait_link(b_id)
            envs = [envelope(os.urandom(16), USER_C) for _ in range(5)]
            # A has a route (via B); B has none (C is away): B holds, A's custody passes.
            assert await submit(a, envs) == [F.RELAY_QUEUED] * 5
            await holds(b, 5)
            await until(lambda: a.fed.custody.queued_toward(b_id) == 0, within=10)
            stats = b.fed.statistics()
            assert stats.storefwd.held == 5 and stats.storefwd.held_now == 5
            assert sum(x.relay_in.get("RELAY_HELD", 0) for x in stats.neighbours) == 5

            async with running(tmp_path, "c", rcc, port=c_port) as c:
                await until(lambda: b.fed.link_up(c_id), within=15)
                await until(lambda: mailbox(c, USER_C), within=15)

                async def all_there() -> bool:
                    return len(await mailbox(c, USER_C)) >= 5

                await until(all_there, within=15)
                got = [e.msg_id for e in await mailbox(c, USER_C)]
                assert sorted(got) == sorted(e.msg_id for e in envs)  # each exactly once
                assert got == [e.msg_id for e in envs]  # released in arrival order
                # Receipts: C -> B -> A; replicas purged, tombstones kept.
                for e in envs:
                    await until(lambda e=e: tombstone(a, e.msg_id), within=10)  # type: ignore[misc]
                    assert await tombstone(b, e.msg_id)
                assert await held(b) == 0 and await held(a) == 0
                sf_b, sf_a = b.fed.statistics().storefwd, a.fed.statistics().storefwd
                assert sf_b.released == 5 and sf_b.receipts_applied == 5
                assert sf_a.receipts_applied == 5
                assert c.fed.statistics().storefwd.receipts_sent == 5
                # A replayed msg_id after delivery is refused as a duplicate (tombstone)
                # at the entry node and at B, and never reaches C's mailbox twice.
                assert await submit(a, envs[:1]) == [F.RELAY_DUPLICATE]
                again = await b.fed.take_custody(envs[:1], from_node=a_id)
                assert [r.status for r in again] == [F.RELAY_DUPLICATE]
                assert len(await mailbox(c, USER_C)) == 5


async def test_a_holder_restarted_while_holding_loses_nothing(tmp_path: Path) -> None:
    _a_id, b_id, c_id = ids(tmp_path)
    ra, rb, rcc = line_routes(tmp_path)
    c_port, b_port = free_port(), free_port()
    envs = [envelope(os.urandom(16), USER_C) for _ in range(4)]
    with trio.fail_after(70):
        async with running(tmp_path, "a", ra, peers=((b_port, b_id),)) as a:
            async with running(tmp_path, "b", rb, port=b_port, peers=((c_port, c_id),)) as b:
                await a.fed.wait_link(b_id)
                assert await submit(a, envs) == [F.RELAY_QUEUED] * 4
                await holds(b, 4)
            # B is gone (its process state with it); its store keeps what it held.
            _, rb2, _ = line_routes(tmp_path)
            async with (
                running(tmp_path, "b", rb2, port=b_port, peers=((c_port, c_id),)) as b,
                running(tmp_path, "c", rcc, port=c_port) as c,
            ):
                assert b.fed.statistics().storefwd.held_now in (0, 4)  # (released at once)

                async def delivered_all() -> bool:
                    return len(await mailbox(c, USER_C)) == 4

                await until(delivered_all, within=20)
                assert sorted(e.msg_id for e in await mailbox(c, USER_C)) == sorted(
                    e.msg_id for e in envs
                )
                await until(lambda: tombstone(a, envs[-1].msg_id), within=10)


async def test_what_expires_while_held_is_never_delivered(tmp_path: Path) -> None:
    _a_id, b_id, c_id = ids(tmp_path)
    ra, rb, rcc = line_routes(tmp_path)
    c_port, b_port = free_port(), free_port()
    with trio.fail_after(60):
        async with (
            running(tmp_path, "b", rb, port=b_port, peers=((c_port, c_id),)) as b,
            running(tmp_path, "a", ra, peers=((b_port, b_id),)) as a,
        ):
            await a.fed.wait_link(b_id)
            short = envelope(os.urandom(16), USER_C, expiry_ms=system_wall_ms() + 1500)
            long = envelope(os.urandom(16), USER_C)
            assert await submit(a, [short, long]) == [F.RELAY_QUEUED] * 2
            await holds(b, 2)
            # The short one expires while held (the sweep drops it, counted).
            await until(lambda: b.fed.statistics().storefwd.expired_held == 1, within=10)
            async with running(tmp_path, "c", rcc, port=c_port) as c:

                async def got_long() -> bool:
                    return len(await mailbox(c, USER_C)) == 1

                await until(got_long, within=15)
                assert [e.msg_id for e in await mailbox(c, USER_C)] == [long.msg_id]
                assert await held(b) == 0


async def test_bad_input_at_a_relay_is_typed_counted_and_not_stored(tmp_path: Path) -> None:
    a_id, b_id, c_id = ids(tmp_path)
    ra, rb, _ = line_routes(tmp_path)
    b_port = free_port()
    policy = HoldPolicy(max_expiry_ahead_s=3600)
    with trio.fail_after(40):
        async with (
            running(tmp_path, "b", rb, port=b_port, policy=policy) as b,
            running(tmp_path, "a", ra, peers=((b_port, b_id),)) as a,
        ):
            await a.fed.wait_link(b_id)
            now = system_wall_ms()
            # The cap (1 h here) plus the clock-skew allowance (1 h), and a minute more.
            too_far = envelope(os.urandom(16), USER_C, expiry_ms=now + 2 * 3600_000 + 60_000)
            expired = envelope(os.urandom(16), USER_C, expiry_ms=now - 1)
            over_hops = envelope(os.urandom(16), USER_C, hop_limit=17)
            link = a.fed._link(b_id)
            resp = await link.rpc.call(
                "qpc.v1.Federation/RelayEnqueue",
                F.RelayEnqueueRequest(envelopes=[too_far, expired, over_hops]),
                F.RelayEnqueueResponse,
                timeout=5,
            )
            assert [r.status for r in resp.results] == [
                F.RELAY_EXPIRY_TOO_FAR,
                F.RELAY_EXPIRED,
                F.RELAY_INVALID,
            ]
            assert "hop_limit" in resp.results[2].detail
            st = b.fed.statistics()
            assert st.storefwd.expiry_too_far == 1
            (from_a,) = (x for x in st.neighbours if x.node_id == a_id)
            assert {k: v for k, v in from_a.relay_in.items() if v} == {
                "RELAY_EXPIRY_TOO_FAR": 1,
                "RELAY_EXPIRED": 1,
                "RELAY_INVALID": 1,
            }
            assert await held(b) == 0 and b.fed.custody.queued_toward(c_id) == 0
            # At the entry node too (a client's envelope): typed, to the sender.
            entry = await a.fed.submit(
                [envelope(os.urandom(16), USER_C, expiry_ms=now + 30 * 24 * 3600_000)],
                origin=USER_A,
            )
            assert [r.status for r in entry] == [F.RELAY_EXPIRY_TOO_FAR]  # default cap: 7 d
            assert a.fed.statistics().storefwd.expiry_too_far == 1

            # Receipts: forged, from the wrong home, for an unknown msg_id, malformed.
            held_env = envelope(os.urandom(16), USER_C)
            assert [r.status for r in await b.fed.take_custody([held_env], from_node=a_id)] == [
                F.RELAY_HELD
            ]
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            liar = Ed25519PrivateKey.generate()
            liar_pub = liar.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            c_creds, _ = identity(tmp_path, "c")
            c_key = c_creds.private_key()
            assert isinstance(c_key, Ed25519PrivateKey)
            c_pub = c_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            wrong_home = rc.make_receipt(liar.sign, liar_pub, held_env.msg_id, USER_C, now)
            forged = rc.Receipt(held_env.msg_id, USER_C, c_pub, now, bytes(64))
            unknown = rc.make_receipt(c_key.sign, c_pub, os.urandom(16), USER_C, now)
            malformed = F.DeliveryReceipt(msg_id=b"short")
            resp = await link.rpc.call(
                M_RECEIPT,
                F.ReceiptRequest(
                    receipts=[
                        wrong_home.to_proto(),
                        forged.to_proto(),
                        unknown.to_proto(),
                        malformed,
                    ]
                ),
                F.ReceiptResponse,
                timeout=5,
            )
            assert resp.taken == 0
            sf = b.fed.statistics().storefwd
            assert (
                sf.receipts_wrong_home,
                sf.receipts_forged,
                sf.receipts_unknown_msg,
                sf.receipts_malformed,
                sf.receipts_applied,
            ) == (1, 1, 1, 1, 0)
            assert await held(b) == 1 and not await tombstone(b, held_env.msg_id)
            # A neighbour cannot hand out more spray copies than this node would.
            greedy = envelope(os.urandom(16), USER_C)
            got = await b.fed.take_custody([greedy], from_node=a_id, spray_tokens=[1_000_000])
            assert [r.status for r in got] == [F.RELAY_HELD]
            rows = await store_of(b).run(lambda s: held_for(s, USER_C, system_wall_ms()))
            assert [r.tokens for r in rows if r.envelope.msg_id == greedy.msg_id] == [
                HoldPolicy().spray_tokens
            ]
            # The real home's receipt is taken: the held replica goes, a tombstone stays.
            good = rc.make_receipt(c_key.sign, c_pub, held_env.msg_id, USER_C, now)
            resp = await link.rpc.call(
                M_RECEIPT,
                F.ReceiptRequest(receipts=[good.to_proto()]),
                F.ReceiptResponse,
                timeout=5,
            )
            assert resp.taken == 1
            assert await held(b) == 1 and await tombstone(b, held_env.msg_id)  # (greedy stays)


async def test_a_carrier_moved_between_islands_carries_held_copies(tmp_path: Path) -> None:
    """Island 1: A (the sender's node). Island 2: C (the recipient's home). L, a
    carrier, first links to A, then "moves": its link to A closes and one to C opens.
    A holds (no route to C), sprays L a copy; L delivers it on reaching C; L's
    receipt purges A's held copy once L is back in A's island."""
    a_id, _, c_id = ids(tmp_path)
    _, l_id = identity(tmp_path, "l")
    spray = HoldPolicy(spray_delay_s=0.2, spray_tokens=4)
    ra = Withdrawing(a_id, {USER_C: c_id})
    rl = Withdrawing(l_id, {USER_C: c_id})
    rcc = Withdrawing(c_id, {USER_C: c_id})
    n = 5
    with trio.fail_after(60):
        async with (
            running(tmp_path, "a", ra, policy=spray) as a,
            running(tmp_path, "c", rcc) as c,
            running(tmp_path, "l", rl, policy=msgspec.structs.replace(spray, carrier=True)) as lap,
        ):
            envs = [envelope(os.urandom(16), USER_C) for _ in range(n)]
            assert await submit(a, envs) == [F.RELAY_HELD] * n  # no route at the entry
            await lap.fed.connect("127.0.0.1", a.info.port, expected=a_id)
            await until(lambda: a.fed.statistics().storefwd.sprayed == n, within=15)
            await holds(lap, n)
            assert await held(a) == n  # a copy each side
            # The laptop moves: out of A's island, into C's.
            lap.fed._link(a_id).conn.close_now(0, "moved away")
            await until(lambda: not lap.fed.link_up(a_id) and not a.fed.link_up(l_id), within=10)
            await lap.fed.connect("127.0.0.1", c.info.port, expected=c_id)

            async def all_there() -> bool:
                return len(await mailbox(c, USER_C)) == n

            await until(all_there, within=15)
            assert sorted(e.msg_id for e in await mailbox(c, USER_C)) == sorted(
                e.msg_id for e in envs
            )
            await until(lambda: lap.fed.statistics().storefwd.receipts_applied == n, within=10)
            assert await held(lap) == 0 and await held(a) == n  # A is not reachable yet
            # Back in A's island: the receipts L kept for A purge A's copies.
            lap.fed._link(c_id).conn.close_now(0, "moved back")
            await lap.fed.connect("127.0.0.1", a.info.port, expected=a_id)
            await until(lambda: a.fed.statistics().storefwd.receipts_applied == n, within=15)
            assert await held(a) == 0
            # Exactly once, and the cost: transmissions of the envelope per delivery.
            assert len(await mailbox(c, USER_C)) == n
            copies = sum(x.fed.statistics().storefwd.sprayed for x in (a, lap, c))
            hops = sum(nb.relayed_out for x in (a, lap, c) for nb in x.fed.statistics().neighbours)
            cost = (copies + hops) / n
            print(
                f"carrier spray: {copies} copies + {hops} custody hops for {n} deliveries "
                f"= {cost:.2f} transmissions per delivered message"
            )
            assert cost == 2.0  # A -> L (copy), L -> C (custody)


async def test_custody_bound_to_a_hop_that_stays_down_is_rerouted(tmp_path: Path) -> None:
    """A took custody toward B (its route then); B never comes up and the route moves
    to D. After storefwd.reroute_after_s the rows bound to B go through the resolver
    again and reach C via D, once each."""
    a_id, b_id, c_id = ids(tmp_path)
    _, d_id = identity(tmp_path, "d")
    b_port = free_port()  # nobody listens there: B is away for good
    policy = HoldPolicy(reroute_after_s=0.5)
    ra = StaticRoutes(a_id, {USER_C: c_id}, via={c_id: b_id})
    with trio.fail_after(60):
        async with (
            running(tmp_path, "c", StaticRoutes(c_id, {USER_C: c_id})) as c,
            running(tmp_path, "d", StaticRoutes(d_id, {USER_C: c_id}), peers=((c.info.port, c_id),)) as d,
            running(tmp_path, "a", ra, peers=((b_port, b_id), (d.info.port, d_id)), policy=policy) as a,
        ):  # fmt: skip
            await a.fed.wait_link(d_id)
            await d.fed.wait_link(c_id)
            envs = [envelope(os.urandom(16), USER_C) for _ in range(3)]
            assert await submit(a, envs) == [F.RELAY_QUEUED] * 3
            assert a.fed.custody.queued_toward(b_id) == 3
            ra.update({USER_C: c_id}, {c_id: d_id})  # the route moved; the rows did not

            async def all_there() -> bool:
                return len(await mailbox(c, USER_C)) == 3

            await until(all_there, within=20)
            assert sorted(e.msg_id for e in await mailbox(c, USER_C)) == sorted(
                e.msg_id for e in envs
            )
            sf = a.fed.statistics().storefwd
            assert (sf.rerouted, sf.rerouted_held) == (3, 0)
            assert a.fed.custody.queued_toward(b_id) == 0
