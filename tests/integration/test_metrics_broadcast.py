"""``qpc_gossip_*`` and ``qpc_sync_*`` scraped from real nodes on loopback: what an
operator's Prometheus sees is what the gossip driver and the syncer counted, after
real traffic (a broadcast A -> B -> C; a link-up inventory sync between two nodes).

Each scrape is compared with a ``statistics()`` snapshot taken in the same Trio step
(no checkpoint between them), so timers firing in between cannot make it flaky.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from qpc_node.node import Node
from qpc_node.ops.clock import system_wall_ms
from qpc_node.storefwd.gossip import GossipStatistics
from qpc_node.storefwd.sync import KIND_CHANNEL, SCOPE_CHANNELS, SyncStatistics
from tests.integration.fed_nodes import fed_node, identity, until
from tests.integration.test_gossip_nodes import gossiping, held_ids, make
from tests.integration.test_sync_nodes import SetSource, _mid, syncer_of

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: Node) -> Samples:
    out: Samples = {}
    text = node.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def gossip_now(node: Node) -> tuple[Samples, GossipStatistics]:
    assert node.gossip is not None
    return scrape(node), node.gossip.statistics()


async def test_gossip_families_from_a_broadcast_over_real_nodes(tmp_path: Path) -> None:
    async with gossiping(tmp_path) as (drivers, nodes):
        sent = [make(f"metrics {i}".encode()) for i in range(4)]
        for _, p in sent:
            drivers["a"].publish(p)
        ids = {mid for mid, _ in sent}

        async def c_has_all() -> bool:
            return ids <= set(await held_ids(nodes["c"]))

        await until(c_has_all, within=20.0)
        await until(lambda: all(d.core.statistics().unacked == 0 for d in drivers.values()))
        # B forwards a push before its own store write is counted (gossip.py hands the
        # payload over after dispatching it): C can hold all four a moment earlier.
        await until(lambda: drivers["b"].statistics().delivered == 4)
        got_a, a = gossip_now(nodes["a"].node)
        got_b, b = gossip_now(nodes["b"].node)
        assert got_a[("qpc_gossip_messages_total", (("outcome", "published"),))] == 4
        assert got_b[("qpc_gossip_messages_total", (("outcome", "delivered"),))] == 4
        assert b.delivered == 4 and a.published == 4
        for got, st in ((got_a, a), (got_b, b)):
            p = st.core
            assert got[("qpc_gossip_frames_total", (("direction", "in"),))] == st.frames_in
            assert got[("qpc_gossip_frames_total", (("direction", "out"),))] == st.frames_out
            assert got[("qpc_gossip_pushes_sent_total", (("kind", "push"),))] == p.pushes_sent
            ack_in = ("qpc_gossip_control_total", (("direction", "received"), ("frame", "ack")))
            assert got[ack_in] == p.acks_received
            assert got[("qpc_gossip_peers", (("edge", "eager"),))] == p.eager_peers
            assert got[("qpc_gossip_seen_ids", ())] == p.seen.ids
            assert got[("qpc_gossip_seen_bytes", ())] == p.seen.memory_bytes
            assert got[("qpc_gossip_cache_bytes", ())] == p.cache_bytes
            dropped = {
                k[1][0][1]: v for k, v in got.items() if k[0] == "qpc_gossip_pushes_dropped_total"
            }
            assert dropped == {"invalid": 0, "id_mismatch": 0, "over_hops": 0, "rate_limited": 0}
        # Real traffic, not zeros: A pushed to B and was ACKed; B holds the four ids.
        assert a.core.pushes_sent >= 4 and a.core.acks_received >= 1 and a.frames_out > 0
        assert b.core.seen.ids == 4 and b.core.seen.memory_bytes > 0
        assert b.core.cache_bytes > 0


async def test_sync_families_from_a_link_up_session_between_real_nodes(tmp_path: Path) -> None:
    exp = system_wall_ms() + 3_600_000
    a_src = SetSource(SCOPE_CHANNELS, KIND_CHANNEL)
    b_src = SetSource(SCOPE_CHANNELS, KIND_CHANNEL)
    for k in range(100):
        if k % 10 != 0:
            a_src.add(_mid("m", k), exp + k)
        if k % 10 != 5:
            b_src.add(_mid("m", k), exp + k)
    want = a_src.msg_ids() | b_src.msg_ids()
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            sa = syncer_of(a, [a_src], interval_s=3600.0, link_up_delay_s=5.0)
            sb = syncer_of(b, [b_src], interval_s=3600.0, link_up_delay_s=5.0)
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
            await until(lambda: a_src.msg_ids() == b_src.msg_ids() == want)
            await until(
                lambda: sa.statistics().sessions_completed + sb.statistics().sessions_completed >= 1
            )
            for fn, syncer in ((a, sa), (b, sb)):
                got, st = scrape(fn.node), syncer.statistics()
                check_sync(got, st)
            first = sa.statistics() if a.node_id < b.node_id else sb.statistics()
            assert first.ids_have + first.ids_need == 20
            assert first.bytes_sent > 0 and first.rounds >= 1


def check_sync(got: Samples, st: SyncStatistics) -> None:
    for role, outcome, want in (
        ("initiator", "started", st.sessions_initiated),
        ("initiator", "completed", st.sessions_completed),
        ("initiator", "failed", st.sessions_failed),
        ("responder", "served", st.sessions_served),
    ):
        assert got[("qpc_sync_sessions_total", (("outcome", outcome), ("role", role)))] == want
    assert got[("qpc_sync_rounds_total", ())] == st.rounds
    assert got[("qpc_sync_bytes_total", (("direction", "sent"),))] == st.bytes_sent
    assert got[("qpc_sync_bytes_total", (("direction", "received"),))] == st.bytes_received
    assert got[("qpc_sync_ids_total", (("side", "have"),))] == st.ids_have
    assert got[("qpc_sync_ids_total", (("side", "need"),))] == st.ids_need
    assert got[("qpc_sync_items_total", (("direction", "pushed"),))] == st.items_pushed
    assert got[("qpc_sync_items_total", (("direction", "taken"),))] == st.items_taken
