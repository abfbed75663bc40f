"""Inventory sync between two real nodes on loopback (QUIC, federation links, RPCs).

The sources are in-memory sets here (the channel store and the held store register
theirs when they are wired); what is under test is the driver: a session on link-up,
the periodic session, pushes and fetches over the real federation methods, and that
the sending source's ``offer`` decides what crosses.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import msgspec
import trio
from msgspec.structs import replace

from qpc_node._core import Negentropy
from qpc_node.ops.clock import system_wall_ms
from qpc_node.storefwd.sync import KIND_CHANNEL, KIND_HELD, SCOPE_CHANNELS, SCOPE_HELD, sync_id
from qpc_node.storefwd.syncer import M_SYNC, Syncer
from qpc_node.wire.gen.qpc.v1 import sync_pb2
from tests.integration.fed_nodes import FedNode, fed_node, identity, until


class SetSource:
    """A set of items ``expiry (8, big-endian) || msg_id (16) || body``."""

    def __init__(self, scope: int, kind: int, withhold: frozenset[bytes] = frozenset()) -> None:
        self._scope = scope
        self._kind = kind
        self.items_by_id: dict[bytes, bytes] = {}
        self.withhold = withhold
        """msg ids this source never offers (what a peer may not carry)."""
        self.taken_from: list[bytes] = []

    @property
    def scope(self) -> int:
        return self._scope

    def _id(self, item: bytes) -> bytes:
        return sync_id(self._scope, self._kind, item[8:24])

    def add(self, msg_id: bytes, expiry_ms: int, body: bytes = b"b" * 200) -> None:
        item = struct.pack(">Q", expiry_ms) + msg_id + body
        self.items_by_id[self._id(item)] = item

    def msg_ids(self) -> set[bytes]:
        return {it[8:24] for it in self.items_by_id.values()}

    async def items(self, now_ms: int) -> list[tuple[int, bytes]]:
        return [
            (struct.unpack(">Q", it[:8])[0], i)
            for i, it in self.items_by_id.items()
            if struct.unpack(">Q", it[:8])[0] > now_ms
        ]

    async def offer(self, peer: bytes, ids: Sequence[bytes], now_ms: int) -> list[bytes]:
        out = []
        for i in ids:
            it = self.items_by_id.get(i)
            if it is not None and it[8:24] not in self.withhold:
                out.append(it)
        return out

    async def take(self, peer: bytes, items: Sequence[bytes], now_ms: int) -> int:
        n = 0
        for it in items:
            if len(it) < 24 or struct.unpack(">Q", it[:8])[0] <= now_ms:
                continue
            i = self._id(it)
            if i not in self.items_by_id:
                self.items_by_id[i] = it
                self.taken_from.append(peer)
                n += 1
        return n


def _mid(tag: str, n: int) -> bytes:
    return hashlib.sha256(f"{tag}-{n}".encode()).digest()[:16]


def syncer_of(node: FedNode, sources: Sequence[SetSource], **timing: float) -> Syncer:
    """The node's own syncer with ``sources`` registered (as the node wiring will do)
    and test timing (``interval_s``, ``jitter``, ``link_up_delay_s``)."""
    syncer = node.node.syncer
    assert syncer is not None
    for src in sources:
        syncer.add_source(src, replace=True)
    interval = timing.pop("interval_s", None)
    syncer.config = replace(syncer.config, **timing)
    if interval is not None:
        syncer.set_interval(interval)
    return syncer


async def test_link_up_session_leaves_both_with_the_union(tmp_path: Path) -> None:
    exp = system_wall_ms() + 3_600_000
    a_ch, b_ch = SetSource(SCOPE_CHANNELS, KIND_CHANNEL), SetSource(SCOPE_CHANNELS, KIND_CHANNEL)
    a_held, b_held = SetSource(SCOPE_HELD, KIND_HELD), SetSource(SCOPE_HELD, KIND_HELD)
    for k in range(500):
        if k % 10 != 0:
            a_ch.add(_mid("c", k), exp + k)
        if k % 10 != 5:
            b_ch.add(_mid("c", k), exp + k)
    for k in range(30):
        (a_held if k % 2 else b_held).add(_mid("h", k), exp + k)
    want_ch = a_ch.msg_ids() | b_ch.msg_ids()
    want_held = a_held.msg_ids() | b_held.msg_ids()
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            sa = syncer_of(a, [a_ch, a_held], interval_s=3600.0)  # only the link-up session
            sb = syncer_of(b, [b_ch, b_held], interval_s=3600.0)
            t0 = trio.current_time()
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
            await until(
                lambda: (
                    a_ch.msg_ids() == b_ch.msg_ids() == want_ch
                    and a_held.msg_ids() == b_held.msg_ids() == want_held
                )
            )
            took = trio.current_time() - t0
            st_a, st_b = sa.statistics(), sb.statistics()
            first = st_a if a.node_id < b.node_id else st_b
            assert first.sessions_initiated >= 2 and first.sessions_completed >= 2
            assert st_a.sessions_failed == st_b.sessions_failed == 0
            assert first.ids_have + first.ids_need == 50 + 50 + 30
            print(
                f"link-up sync: {took:.2f}s; initiator sent {first.bytes_sent} B,"
                f" received {first.bytes_received} B, rounds {first.rounds}"
            )
            # Both saw the other's items arrive from the right neighbour.
            assert set(a_ch.taken_from) == {b.node_id} and set(b_ch.taken_from) == {a.node_id}


async def test_periodic_session_and_offer_decides(tmp_path: Path) -> None:
    exp = system_wall_ms() + 3_600_000
    secret = _mid("secret", 0)
    a_src = SetSource(SCOPE_CHANNELS, KIND_CHANNEL, withhold=frozenset({secret}))
    b_src = SetSource(SCOPE_CHANNELS, KIND_CHANNEL)
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            sa = syncer_of(a, [a_src], interval_s=0.3, jitter=0.5, link_up_delay_s=0.0)
            syncer_of(b, [b_src], interval_s=0.3, jitter=0.5, link_up_delay_s=0.0)
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
            # Items that appear after the link came up move with a periodic session.
            for k in range(20):
                a_src.add(_mid("late", k), exp + k)
            a_src.add(secret, exp)
            await until(lambda: b_src.msg_ids() == a_src.msg_ids() - {secret})
            # Sessions keep finding the withheld item and keep not moving it.
            done = sa.statistics().sessions_completed + 2
            await until(lambda: sa.statistics().sessions_completed >= done)
            assert secret not in b_src.msg_ids()


async def test_sync_bytes_follow_the_difference(tmp_path: Path) -> None:
    """Equal 2,000-item sets: a session moves a few hundred bytes, not the id list."""
    exp = system_wall_ms() + 3_600_000
    a_src, b_src = SetSource(SCOPE_CHANNELS, KIND_CHANNEL), SetSource(SCOPE_CHANNELS, KIND_CHANNEL)
    for k in range(2000):
        a_src.add(_mid("eq", k), exp + k)
        b_src.add(_mid("eq", k), exp + k)
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            sa = syncer_of(a, [a_src], interval_s=3600.0, link_up_delay_s=0.0)
            sb = syncer_of(b, [b_src], interval_s=3600.0, link_up_delay_s=0.0)
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
            await until(
                lambda: (
                    sa.statistics().sessions_completed >= 1
                    and sb.statistics().sessions_completed >= 1
                )
            )
            st = sa.statistics()
            assert st.ids_have == st.ids_need == 0
            assert st.bytes_sent + st.bytes_received < 2_000  # the id list alone: 64,000


async def test_interval_reload_applies_to_the_running_wait(tmp_path: Path) -> None:
    """sync.interval_s is live: a reload cuts a one-hour wait short, and the item added
    after link-up moves with the next (now short) periodic session."""
    exp = system_wall_ms() + 3_600_000
    a_src, b_src = SetSource(SCOPE_CHANNELS, KIND_CHANNEL), SetSource(SCOPE_CHANNELS, KIND_CHANNEL)
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with (
            fed_node(tmp_path, "a", config={"sync": {"interval_s": "3600"}}) as a,
            fed_node(tmp_path, "b", config={"sync": {"interval_s": "3600"}}) as b,
        ):
            sa = syncer_of(a, [a_src], link_up_delay_s=0.0)
            sb = syncer_of(b, [b_src], link_up_delay_s=0.0)
            assert sa.config.interval_s == 3600.0
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
            await until(
                lambda: (
                    sa.statistics().sessions_completed >= 1
                    and sb.statistics().sessions_completed >= 1
                )
            )
            a_src.add(_mid("after", 1), exp)
            report = await a.node.reload(
                msgspec.structs.replace(
                    a.node.cfg, sync=msgspec.structs.replace(a.node.cfg.sync, interval_s=1.0)
                )
            )
            assert report.applied == ("sync.interval_s",)
            assert sa.config.interval_s == 1.0
            await until(lambda: b_src.msg_ids() == a_src.msg_ids(), within=5.0)


async def test_flooding_and_bad_inventories_refused_typed_and_counted(tmp_path: Path) -> None:
    """Over the real Federation/Sync method: a neighbour opening sessions in a loop is
    refused RATE_LIMITED with a retry time once its burst is spent; malformed and
    oversized inventories are refused by reason; every refusal is counted and nothing
    reaches the source."""
    exp = system_wall_ms() + 3_600_000
    b_src = SetSource(SCOPE_CHANNELS, KIND_CHANNEL)
    b_src.add(_mid("b", 0), exp)
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            sb = syncer_of(b, [b_src], interval_s=3600.0, link_up_delay_s=3600.0)
            # a's own syncer opens a link-up session too when a has the lower node id (at
            # once, racing the calls below): it spends one of b's tokens, and b's count
            # includes its refusals. Otherwise it waits (an hour here).
            sa = syncer_of(a, [], interval_s=3600.0, link_up_delay_s=3600.0)
            await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
            bad = [
                (b"\x61\x01\x00\x05", sync_pb2.SyncRefusal.MALFORMED),  # mode 5
                (b"\x61" * 40_000, sync_pb2.SyncRefusal.TOO_LARGE),
            ]
            for message, reason in bad:
                req = sync_pb2.SyncRequest(
                    session_id=b"m" * 16, scope=SCOPE_CHANNELS, message=message
                )
                resp = await a.fed.call_neighbour(b_id, M_SYNC, req, sync_pb2.SyncResponse)
                assert resp.WhichOneof("result") == "refusal" and resp.refusal.reason == reason
            first = Negentropy([]).initiate()
            reasons = []
            for k in range(12):
                req = sync_pb2.SyncRequest(
                    session_id=bytes([k]) * 16, scope=SCOPE_CHANNELS, message=first
                )
                resp = await a.fed.call_neighbour(b_id, M_SYNC, req, sync_pb2.SyncResponse)
                if resp.WhichOneof("result") == "refusal":
                    assert resp.refusal.retry_after_ms > 0
                    reasons.append(resp.refusal.reason)
            # The malformed session took one token of the burst; the oversized one none.
            assert set(reasons) == {sync_pb2.SyncRefusal.RATE_LIMITED}
            assert len(reasons) >= 12 - int(sb.config.limits.session_burst) + 1

            def a_sessions_done() -> bool:
                s = sa.statistics()
                ended = s.sessions_completed + s.sessions_capped + s.sessions_failed
                return s.sessions_initiated == ended

            await until(a_sessions_done)
            # b refused a's own session for whatever reason applied when its messages
            # came: rate_limited once the burst was spent, or unknown_session for its
            # next round once one of the calls above (same peer, same scope) replaced
            # it at b. a counted each refusal it got; b must have counted the same.
            expected = Counter({"rate_limited": len(reasons), "malformed": 1, "too_large": 1})
            expected.update(sa.statistics().refusals_received)
            st = sb.statistics()
            assert dict(st.refusals_sent) == dict(expected)
            assert st.items_taken == 0 and b_src.msg_ids() == {_mid("b", 0)}
