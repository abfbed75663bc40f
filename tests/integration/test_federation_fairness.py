"""Mailbox fairness for relayed mail (issue 11 item 4, mesh part), over real links.

Nodes on loopback: real Node, QUIC, SQLite. The victim's home node has a small
mailbox (200 messages: a stranger pool of 20, a share of 2 per stranger) so a
flood fills what it can quickly. A stranger floods the victim through a
neighbour; the victim's contact (someone the victim has sent to, through the
federation) keeps writing during the flood. Its mail must all arrive, the
flood must get only its share (or the pool, with many origins), and the
refusals must end custody upstream instead of being retried forever.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from qpc_node.federation.core import M_RELAY
from qpc_node.federation.routes import StaticRoutes
from qpc_node.ops.clock import system_wall_ms
from qpc_node.store import Envelope
from qpc_node.store.fairness import SenderKey
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2
from tests.integration.fed_nodes import (
    FedNode,
    envelope,
    fed_node,
    identity,
    mailbox,
    peer,
    until,
)

F = federation_pb2
VICTIM = b"\x71" * 32  # homed on B (or C in the line)
CONTACT = b"\x72" * 32  # homed on A; the victim has sent to it
STRANGER = b"\x73" * 32  # sends through A; the victim never wrote to it
SMALL_MAILBOX = {"limits": {"mailbox_max_messages": "200"}}
POOL, SHARE = 20, 2  # what 200 messages make (store/fairness.py, defaults 10 % / 10)


def msgs(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def to(recipient: bytes, ids: list[bytes]) -> list[envelope_pb2.Envelope]:
    return [envelope(m, recipient) for m in ids]


async def held_for(node: FedNode, user: bytes) -> set[bytes]:
    return {e.msg_id for e in await mailbox(node, user)}


def neighbour(node: FedNode, nid: bytes) -> object:
    return {n.node_id: n for n in node.fed.statistics().neighbours}[nid]


async def sender_tags(node: FedNode, recipient: bytes) -> dict[bytes, int]:
    """The stranger shares the recipient's home node charges: sender tag -> messages."""
    store = node.node.store
    assert store is not None
    rows = await store.run(
        lambda s: s.conn.execute(
            "SELECT sender, depth FROM mailbox_senders WHERE recipient = ?", (recipient,)
        ).fetchall()
    )
    return {bytes(tag): int(n) for tag, n in rows}


async def custody_ends(*nodes: FedNode, within: float = 20.0) -> None:
    """Until no node holds custody any more (every envelope taken or refused for good);
    fails, saying what is still held, if a refusal is retried instead."""
    with trio.move_on_after(within):  # polls inside a wider bound: this one wins
        await until(lambda: not any(n.fed.statistics().queued for n in nodes), within + 5)
    held = {n.name: n.fed.statistics().queued for n in nodes}
    assert not any(held.values()), f"custody still held after {within:g}s: {held}"


@asynccontextmanager
async def pair(tmp: Path) -> AsyncIterator[tuple[FedNode, FedNode]]:
    """A - B. VICTIM homed on B (small mailbox), CONTACT on A; each routes the other's
    users over the link. The victim has written to its contact (through B's
    federation, as B's delivery will), and that envelope reached A."""
    _, a_id = identity(tmp, "a")
    _, b_id = identity(tmp, "b")
    homes = {VICTIM: b_id, CONTACT: a_id}
    async with (
        fed_node(tmp, "b", routes=StaticRoutes(b_id, homes), config=SMALL_MAILBOX) as b,
        fed_node(tmp, "a", routes=StaticRoutes(a_id, homes), peers=(peer(b.info.port, b_id),)) as a,
    ):
        await a.fed.wait_link(b_id)
        await b.fed.wait_link(a_id)
        hello = msgs(1)
        (res,) = await b.fed.submit(to(CONTACT, hello), origin=VICTIM)
        assert res.status == F.RELAY_QUEUED

        async def reached() -> bool:
            return await held_for(a, CONTACT) == set(hello)

        await until(reached)
        yield a, b


async def test_relayed_stranger_flood_gets_its_share_and_contacts_keep_arriving(
    tmp_path: Path,
) -> None:
    """A stranger floods the victim through A in three waves of 100; after each wave
    the contact sends 10. The stranger gets its share (2), the contact all 30; the
    other 298 are refused typed (RELAY_STRANGER_LIMIT) and end custody at A."""
    with trio.fail_after(60):
        async with pair(tmp_path) as (a, b):
            flood, wrote = [], []
            for _ in range(3):
                wave, dms = msgs(100), msgs(10)
                flood += wave
                wrote += dms
                res = await a.fed.submit(to(VICTIM, wave), origin=STRANGER)
                assert {r.status for r in res} == {F.RELAY_QUEUED}
                res = await a.fed.submit(to(VICTIM, dms), origin=CONTACT)
                assert {r.status for r in res} == {F.RELAY_QUEUED}
            # Custody ends upstream for every envelope: taken or refused for good.
            await custody_ends(a)

            got = await held_for(b, VICTIM)
            assert set(wrote) <= got, f"{len(set(wrote) - got)} of the contact's 30 missing"
            assert len(got & set(flood)) == SHARE
            assert len(got) == len(wrote) + SHARE
            assert await sender_tags(b, VICTIM) == {a.node_id + STRANGER: SHARE}

            refused = len(flood) - SHARE
            assert neighbour(a, b.node_id).refused_out == {  # type: ignore[attr-defined]
                "RELAY_STRANGER_LIMIT": refused
            }
            (sample,) = {r.detail.split(":")[0] for r in a.fed.refusals()}
            assert sample == "stranger_share_used"
            b_in = neighbour(b, a.node_id).relay_in  # type: ignore[attr-defined]
            assert b_in == {
                "RELAY_STORED_LOCAL": len(wrote) + SHARE,
                "RELAY_STRANGER_LIMIT": refused,
            }
            # The node's own refusal counters (qpc_mailbox_refusals_total) saw them.
            assert b.node.store is not None
            assert b.node.store.statistics().store.refused_stranger_share == refused


async def test_relayed_sybil_flood_is_bounded_by_the_stranger_pool(tmp_path: Path) -> None:
    """Forty origins through one neighbour, five envelopes each: ten of them fill the
    pool (20), the rest are refused; the contact's mail still all arrives. A peer
    that declares no origins at all (one predating the field) is one stranger keyed
    by itself: its share, however many senders it relays for."""
    with trio.fail_after(60):
        async with pair(tmp_path) as (a, b):
            origins = [os.urandom(32) for _ in range(40)]
            flood: list[bytes] = []
            wrote = msgs(30)
            for i, origin in enumerate(origins):
                ids = msgs(5)
                flood += ids
                await a.fed.submit(to(VICTIM, ids), origin=origin)
                if i % 4 == 3:
                    await a.fed.submit(
                        to(VICTIM, wrote[i // 4 * 3 : i // 4 * 3 + 3]), origin=CONTACT
                    )
            await custody_ends(a)

            got = await held_for(b, VICTIM)
            assert set(wrote) <= got, f"{len(set(wrote) - got)} of the contact's 30 missing"
            assert len(got & set(flood)) == POOL
            tags = await sender_tags(b, VICTIM)
            assert sum(tags.values()) == POOL and set(tags.values()) == {SHARE}
            assert {t[:32] for t in tags} == {a.node_id}
            assert b.node.store is not None
            st = b.node.store.statistics().store
            assert st.refused_stranger_share + st.refused_stranger_pool == len(flood) - POOL
            assert st.refused_stranger_pool > 0

            # An origin-less relay call (an old peer's): keyed by the neighbour alone.
            raw = F.RelayEnqueueRequest(envelopes=to(b"\x74" * 32, msgs(6)))
            b.routes.home(b"\x74" * 32, b.node_id)
            resp = await a.fed._link(b.node_id).rpc.call(M_RELAY, raw, F.RelayEnqueueResponse)
            assert [r.status for r in resp.results] == [F.RELAY_STORED_LOCAL] * SHARE + [
                F.RELAY_STRANGER_LIMIT
            ] * (6 - SHARE)
            assert await sender_tags(b, b"\x74" * 32) == {a.node_id + bytes(32): SHARE}


async def test_origin_survives_two_hops_and_is_what_the_far_node_judges(tmp_path: Path) -> None:
    """A - B - C, the victim homed on C. The victim wrote to its contact on A (C -> B
    -> A); the contact's replies and a stranger's flood come back A -> B -> C. C keys
    each by (B, the origin A declared): the contact is accepted (all 30 arrive), each
    stranger gets its own share, and B drops what C refused for good."""
    _, a_id = identity(tmp_path, "a")
    _, b_id = identity(tmp_path, "b")
    _, c_id = identity(tmp_path, "c")
    homes = {VICTIM: c_id, CONTACT: a_id}
    other = b"\x75" * 32
    with trio.fail_after(60):
        async with (
            fed_node(
                tmp_path, "c", routes=StaticRoutes(c_id, homes, {a_id: b_id}), config=SMALL_MAILBOX
            ) as c,
            fed_node(
                tmp_path, "b", routes=StaticRoutes(b_id, homes), peers=(peer(c.info.port, c_id),)
            ) as b,
            fed_node(
                tmp_path,
                "a",
                routes=StaticRoutes(a_id, homes, {c_id: b_id}),
                peers=(peer(b.info.port, b_id),),
            ) as a,
        ):
            await a.fed.wait_link(b_id)
            await b.fed.wait_link(c_id)
            await c.fed.wait_link(b_id)
            hello = msgs(1)
            await c.fed.submit(to(CONTACT, hello), origin=VICTIM)

            async def reached() -> bool:
                return await held_for(a, CONTACT) == set(hello)

            await until(reached)

            flood, flood2, wrote = msgs(50), msgs(50), msgs(30)
            await a.fed.submit(to(VICTIM, flood), origin=STRANGER)
            await a.fed.submit(to(VICTIM, wrote), origin=CONTACT)
            await a.fed.submit(to(VICTIM, flood2), origin=other)
            await custody_ends(a, b)

            got = await held_for(c, VICTIM)
            assert set(wrote) <= got, f"{len(set(wrote) - got)} of the contact's 30 missing"
            assert len(got & set(flood)) == SHARE and len(got & set(flood2)) == SHARE
            assert await sender_tags(c, VICTIM) == {b_id + STRANGER: SHARE, b_id + other: SHARE}
            assert neighbour(b, c_id).refused_out == {  # type: ignore[attr-defined]
                "RELAY_STRANGER_LIMIT": 2 * (50 - SHARE)
            }
            assert neighbour(a, b_id).refused_out == {}  # type: ignore[attr-defined]


async def test_full_mailbox_keeps_custody_upstream_until_there_is_room(tmp_path: Path) -> None:
    """The contact fills the victim's whole mailbox (it is accepted: no share binds it).
    What does not fit is RELAY_MAILBOX_FULL: A keeps custody and retries with backoff
    (counted), and delivers once the victim fetched and acked -- nothing is lost."""
    with trio.fail_after(60):
        async with pair(tmp_path) as (a, b):
            first, more = msgs(200), msgs(10)
            await a.fed.submit(to(VICTIM, first), origin=CONTACT)
            await a.fed.submit(to(VICTIM, more), origin=CONTACT)
            # Answered "not yet" and still held (not dropped). Both are read together:
            # the drainer counts an answer before its store update lowers `queued`.
            await until(
                lambda: (
                    neighbour(a, b.node_id).deferred_out.get("RELAY_MAILBOX_FULL", 0)  # type: ignore[attr-defined]
                    >= len(more)
                    and a.fed.statistics().queued == len(more)
                )
            )
            assert await held_for(b, VICTIM) == set(first)
            assert b.node.store is not None
            await b.node.store.ack(VICTIM, up_to_seq=50)  # the victim came back for some
            await custody_ends(a)
            assert set(more) <= await held_for(b, VICTIM)
            assert neighbour(a, b.node_id).refused_out == {}  # type: ignore[attr-defined]


async def test_handed_over_mail_is_retried_not_dropped_at_the_stranger_limit(
    tmp_path: Path,
) -> None:
    """A was the victim's old home and still holds 5 messages a stranger sent it; the
    victim moved to B. A hands them over: B's share for that stranger takes 2 now;
    the rest is the user's own backlog, so A keeps it and retries as the victim reads
    at B, instead of ending custody with RELAY_STRANGER_LIMIT."""
    with trio.fail_after(60):
        async with pair(tmp_path) as (a, b):
            a_store = a.node.store
            b_store = b.node.store
            assert a_store is not None and b_store is not None
            old = msgs(5)
            now = system_wall_ms()
            await a_store.enqueue(
                [Envelope(m, VICTIM, now + 3_600_000, 8, os.urandom(64)) for m in old],
                now,
                sender=SenderKey.local(STRANGER),
            )
            got = await a.fed.custody.hand_over(VICTIM, b.node_id)
            assert (got.moved, got.left) == (5, 0)
            await until(lambda: held_for(b, VICTIM), within=10)

            def deferred() -> int:
                (n,) = [n for n in a.fed.statistics().neighbours if n.node_id == b.node_id]
                return sum(n.deferred_out.values())

            await until(lambda: deferred() > 0, within=10)
            assert a.fed.refusals() == []
            seen: set[bytes] = set()

            async def all_arrived() -> bool:
                for e in await mailbox(b, VICTIM):  # the victim reads and acks at B
                    seen.add(e.msg_id)
                await b_store.ack(VICTIM, up_to_seq=2**62)
                return seen == set(old)

            await until(all_arrived, within=30, step=0.1)
            await custody_ends(a)
            assert a.fed.refusals() == []
