"""Inventory sync wired to the real stores, over real nodes on loopback.

Scope 1 (channel messages): what one node published while its link was down reaches
the other after the link comes back -- more of it than Plumtree's relink IHAVEs cover
(the newest 256 ids; re-announcements run for 5 s after a reception only): the rest
comes through the inventory sync, each stored exactly once. And a member reads a page
that a heal filled in arrival order in the senders' creation order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from node_harness import running_node, users

from qpc_node import crypto
from qpc_node.client.channels import parse_secret, seal
from qpc_node.ops.clock import ManualWallClock, system_wall_ms
from qpc_node.store.channels import ChannelStore
from tests.integration.fed_nodes import fed_node, identity, until

pytestmark = pytest.mark.timeout(120)


def store_of(node: object) -> ChannelStore:
    ch = node.node.channels  # type: ignore[attr-defined]
    assert ch is not None
    return ch  # type: ignore[no-any-return]


async def test_messages_published_during_a_cut_all_arrive_by_sync(tmp_path: Path) -> None:
    n = 600  # > the 256 newest ids Plumtree announces on relink
    ident = crypto.Identity.create(tmp_path / "sender", os.urandom(32), durable=False)
    secret = os.urandom(32)
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(90):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
            await until(lambda: a.fed.link_up(b_id) and b.fed.link_up(a.node_id))
            first = seal(secret, ident.public_key, ident.sign, "before", now_ms=system_wall_ms())
            await store_of(a).published(first, system_wall_ms())
            await until(lambda: store_of(b).statistics().stored == 1, within=10)
            # The cut.
            a.fed._link(b_id).conn.close_now(0, "cut")
            await until(lambda: not a.fed.link_up(b_id) and not b.fed.link_up(a.node_id))
            sent = [first.msg_id]
            for k in range(n):
                now = system_wall_ms()
                m = seal(secret, ident.public_key, ident.sign, f"during {k}", now_ms=now)
                await store_of(a).published(m, now)
                sent.append(m.msg_id)
            assert store_of(b).statistics().stored == 1
            # Plumtree re-announces a message for 5 s after it was published: heal only
            # once A's core has no timer left (what it still announces on relink is
            # the newest 256 ids).
            ga = a.node.gossip
            assert ga is not None
            await until(lambda: ga.core.next_deadline() is None, within=30, step=0.1)
            sa, sb = a.node.syncer, b.node.syncer
            assert sa is not None and sb is not None
            before = [s.statistics() for s in (sa, sb)]
            # The heal.
            t0 = trio.current_time()
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)

            async def all_there() -> bool:
                held = await store_of(b).holding(system_wall_ms())
                return len(held) == n + 1

            await until(all_there, within=60)
            took = trio.current_time() - t0
            held = await store_of(b).holding(system_wall_ms())
            assert sorted(mid for _, mid in held) == sorted(sent)
            st_b = store_of(b).statistics()
            assert st_b.stored == n + 1  # each once (copies that raced are duplicates)
            after = [s.statistics() for s in (sa, sb)]
            moved = sum(x.items_taken - y.items_taken for x, y in zip(after, before, strict=True))
            assert moved >= n - 256  # what the relink IHAVEs could not cover came by sync
            sync_bytes = sum(
                x.bytes_sent - y.bytes_sent for x, y in zip(after, before, strict=True)
            )
            gossip_b = b.node.gossip
            assert gossip_b is not None
            print(
                f"heal: {n} channel messages published during the cut, all on B after"
                f" {took:.2f}s; via sync {moved} items, sync bytes {sync_bytes}"
                f" (both directions); B's gossip delivered {gossip_b.statistics().delivered},"
                f" duplicates at B's store {st_b.duplicates}"
            )


async def test_a_page_filled_out_of_order_is_shown_in_creation_order(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """After a heal the node's seq is arrival order (gossip brings the newest first,
    the sync the rest); the member still reads each sender's lines as written."""
    async with (
        running_node(tmp_path, wall) as (node, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        secret_text = await a.channel_create("news")
        await b.channel_join("news", secret_text)
        secret = parse_secret(secret_text)
        t = wall()
        msgs = [
            seal(secret, a.ident.public_key, a.ident.sign, f"line {k}", now_ms=t + k)
            for k in range(6)
        ]
        assert node.channels is not None
        arrival = [msgs[k] for k in (4, 5, 0, 3, 1, 2)]
        for m in arrival:
            await node.channels.store_checked([m], wall())
        got = await b.receive(0)
        assert [m.text for m in got] == [f"line {k}" for k in range(6)]


async def test_what_the_sync_brings_goes_on_down_the_tree(tmp_path: Path) -> None:
    """Line A - B - C; A - B cut while A publishes. After the heal B gets most of it
    by sync, and C -- whose link to B never went down, so no session of its own runs
    for a minute -- gets it all from B's gossip: a sync-taken message is pushed on
    the tree like a first reception."""
    n = 400
    ident = crypto.Identity.create(tmp_path / "sender", os.urandom(32), durable=False)
    secret = os.urandom(32)
    _, b_id = identity(tmp_path, "b")
    _, c_id = identity(tmp_path, "c")
    with trio.fail_after(90):
        async with (
            fed_node(tmp_path, "a") as a,
            fed_node(tmp_path, "b") as b,
            fed_node(tmp_path, "c") as c,
        ):
            await b.fed.connect("127.0.0.1", c.info.port, expected=c_id)
            await until(lambda: b.fed.link_up(c_id) and c.fed.link_up(b.node_id))
            sb, sc = b.node.syncer, c.node.syncer
            assert sb is not None and sc is not None
            # Both ends' link-up sessions (one starts at once, the other 2 s later) are
            # over before anything is published: C's next one is a minute away.
            await until(
                lambda: (
                    sb.statistics().sessions_completed >= 1
                    and sc.statistics().sessions_completed >= 1
                ),
                within=15,
            )
            sent = []
            for k in range(n):
                now = system_wall_ms()
                m = seal(secret, ident.public_key, ident.sign, f"during {k}", now_ms=now)
                await store_of(a).published(m, now)
                sent.append(m.msg_id)
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)

            async def on(node: object, count: int) -> bool:
                return len(await store_of(node).holding(system_wall_ms())) == count

            await until(lambda: on(b, n), within=30)
            await until(lambda: on(c, n), within=20)
            held = await store_of(c).holding(system_wall_ms())
            assert sorted(mid for _, mid in held) == sorted(sent)
            gb = b.node.gossip
            assert gb is not None and gb.statistics().injected >= n - 256
            assert sc.statistics().items_taken == 0  # not by C's sync
